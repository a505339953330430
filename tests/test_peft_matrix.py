"""PEFT 0.21.2's own LoRA test matrix (``TEST_CASES`` of its ``tests/test_custom_models.py``),
run against lorasurgeon: every LoRA row is built as PEFT builds it, merged by us and by
``merge_and_unload()``, and compared; the rows PEFT itself cannot merge must be refused.

The rows and the tiny models are written out here (same names, shapes and LoraConfig kwargs
as PEFT's table), so that no download is needed. Each row also unmerges our merge where the
base is recoverable, and combine/resize must refuse the variants they cannot express.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora.config import BdLoraConfig, KasaConfig, MontecloraConfig, VeloraConfig
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorasurgeon
from lorasurgeon.errors import AdapterError, IncompatibleError, OptionError
from tests.conftest import (
    FP32_REL_TOL,
    DtypeRule,
    TinyBase,
    assert_matches_peft,
    make_adapter,
    peft_merge,
)
from tests.test_cli import run_cli

# ---------------------------------------------------------------------------------------------
# PEFT's test models (tests/test_custom_models.py), parameters only


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 2)


class ModelEmbConv1D(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 5)
        self.conv1d = Conv1D(1, 5)
        self.lin0 = nn.Linear(10, 2)


class ModelConv1D(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(1, 1, 2)
        self.lin0 = nn.Linear(9, 2)


class ModelConv2D(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(5, 10, 3)
        self.lin0 = nn.Linear(10, 2)


class ModelConv2DGroups(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(90, 288)
        self.conv2d = nn.Conv2d(16, 16, 3, groups=8)
        self.lin1 = nn.Linear(16, 2)


class ModelConv2DGroups2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(16, 32, 3, padding=1, groups=2)
        self.lin0 = nn.Linear(12800, 2)


class ModelConv3D(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv3d = nn.Conv3d(5, 10, 3)
        self.lin0 = nn.Linear(10, 2)


class ModelMha(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2)
        self.lin0 = nn.Linear(10, 2)


class _LinearUsingParameter(nn.Module):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(in_features, out_features))
        self.bias = nn.Parameter(torch.ones(out_features))


class MlpUsingParameters(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = _LinearUsingParameter(10, 20)
        self.lin1 = _LinearUsingParameter(20, 2)


# Not in PEFT's table: transformers v5's fused MoE experts, (E, out, in) like Mixtral or
# (E, in, out) like GPT-OSS (``is_transposed``), several targeted parameters nested.
class _Experts(nn.Module):
    def __init__(self, transposed: bool) -> None:
        super().__init__()
        self.is_transposed = transposed
        gate_up, down = ((3, 6, 8), (3, 4, 6)) if transposed else ((3, 8, 6), (3, 6, 4))
        self.gate_up_proj = nn.Parameter(torch.randn(gate_up))
        self.down_proj = nn.Parameter(torch.randn(down))


class MoE(nn.Module):
    def __init__(self, transposed: bool = False) -> None:
        super().__init__()
        self.experts = _Experts(transposed)
        self.lin0 = nn.Linear(6, 3)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "MLP": MLP,
    "EmbConv1D": ModelEmbConv1D,
    "Conv1d": ModelConv1D,
    "Conv2d": ModelConv2D,
    "Conv2dGroups": ModelConv2DGroups,
    "Conv2dGroups2": ModelConv2DGroups2,
    "Conv3d": ModelConv3D,
    "MHA": ModelMha,
    "MlpUsingParameters": MlpUsingParameters,
    "MoE": MoE,
    "MoETransposed": lambda: MoE(transposed=True),
}

# ---------------------------------------------------------------------------------------------
# The LoRA rows of PEFT's TEST_CASES (46), plus the MoE rows


@dataclass(frozen=True)
class Row:
    model: str
    kwargs: dict[str, Any]
    mergeable: bool = True  # False: PEFT cannot merge it either; we must refuse clearly
    unmergeable: bool = True  # our merge can be undone (the base is recoverable)


GROUPS = "grouped"
ROWS: dict[str, Row] = {
    "Vanilla MLP 1 LoRA": Row("MLP", {"target_modules": "lin0"}),
    "Vanilla MLP 2 LoRA": Row("MLP", {"target_modules": ["lin0"]}),
    "Vanilla MLP 3 LoRA": Row("MLP", {"target_modules": ["lin1"]}),
    "Vanilla MLP 4 LoRA": Row("MLP", {"target_modules": ["lin0", "lin1"]}),
    "Vanilla MLP 5 LoRA": Row(
        "MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}, unmergeable=False
    ),
    "Vanilla MLP 6 LoRA": Row(
        "MLP", {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1}
    ),
    "Vanilla MLP 7 LoRA with DoRA": Row(
        "MLP", {"target_modules": ["lin0"], "use_dora": True}, unmergeable=False
    ),
    "Vanilla MLP 8 LoRA with DoRA": Row(
        "MLP", {"target_modules": ["lin0", "lin1"], "use_dora": True}, unmergeable=False
    ),
    "Vanilla MLP 1 LoRA with KaSA": Row(
        "MLP",
        {"target_modules": ["lin0"], "kasa_config": KasaConfig(), "r": 4},
        unmergeable=False,
    ),  # fmt: skip
    "Vanilla MLP 1 LoRA with MiCA": Row(
        "MLP", {"target_modules": ["lin0"], "init_lora_weights": "mica", "r": 4}
    ),
    "Vanilla MLP 9 LoRA with DoRA": Row(
        "MLP", {"target_modules": "lin1", "use_dora": True, "lora_alpha": 32}, unmergeable=False
    ),
    "Vanilla MLP 10 LoRA with VeLoRA random": Row(
        "MLP",
        {
            "target_modules": ["lin0"],
            "velora_config": VeloraConfig(num_groups=2, init_type="random"),
        },
    ),
    "Vanilla MLP 11 LoRA with VeLoRA batch_average": Row(
        "MLP",
        {
            "target_modules": ["lin0", "lin1"],
            "velora_config": VeloraConfig(num_groups=2, init_type="batch_average"),
        },
    ),
    "Vanilla MLP 12 LoRA with VeLoRA batch_average_once": Row(
        "MLP",
        {
            "target_modules": ["lin0"],
            "velora_config": VeloraConfig(num_groups=2, init_type="batch_average_once"),
        },
    ),
    "Embedding + transformers Conv1D 1 LoRA": Row("EmbConv1D", {"target_modules": ["conv1d"]}),
    "Embedding + transformers Conv1D 2 LoRA": Row("EmbConv1D", {"target_modules": ["emb"]}),
    "Embedding + transformers Conv1D 3 LoRA": Row(
        "EmbConv1D", {"target_modules": ["emb", "conv1d"]}
    ),
    "Embedding + transformers Conv1D 1 DoRA": Row(
        "EmbConv1D", {"target_modules": ["conv1d"], "use_dora": True}, unmergeable=False
    ),
    "Embedding + transformers Conv1D 2 DoRA": Row(
        "EmbConv1D", {"target_modules": ["emb"], "use_dora": True}, unmergeable=False
    ),
    "Embedding + transformers Conv1D 3 DoRA": Row(
        "EmbConv1D", {"target_modules": ["emb", "conv1d"], "use_dora": True}, unmergeable=False
    ),
    "Embedding + transformers Conv1D 1 LoRA trainable_tokens": Row(
        "EmbConv1D",
        {"target_modules": ["conv1d"], "trainable_token_indices": {"emb": [0, 10]}},
        unmergeable=False,
    ),
    "Conv1d LoRA": Row("Conv1d", {"target_modules": ["conv1d"]}),
    "Conv1d LoRA with DoRA": Row(
        "Conv1d", {"target_modules": ["conv1d"], "use_dora": True}, unmergeable=False
    ),
    "Conv2d 1 LoRA": Row("Conv2d", {"target_modules": ["conv2d"]}),
    "Conv2d 2 LoRA": Row("Conv2d", {"target_modules": ["conv2d", "lin0"]}),
    "Conv2d 1 LoRA with DoRA": Row(
        "Conv2d", {"target_modules": ["conv2d"], "use_dora": True}, unmergeable=False
    ),
    "Conv2d 2 LoRA with DoRA": Row(
        "Conv2d", {"target_modules": ["conv2d", "lin0"], "use_dora": True}, unmergeable=False
    ),
    "Conv2d Groups LoRA": Row("Conv2dGroups", {"target_modules": ["conv2d"]}, mergeable=False),
    "Conv2d Groups2 LoRA": Row("Conv2dGroups2", {"target_modules": ["conv2d"]}, mergeable=False),
    "Conv2d Groups LoRA with DoRA": Row(
        "Conv2dGroups", {"target_modules": ["conv2d"], "use_dora": True}, mergeable=False
    ),
    "Conv2d Groups2 LoRA with DoRA": Row(
        "Conv2dGroups2", {"target_modules": ["conv2d"], "use_dora": True}, mergeable=False
    ),
    "Conv3d 1 LoRA": Row("Conv3d", {"target_modules": ["conv3d"]}),
    "Conv3d 2 LoRA": Row("Conv3d", {"target_modules": ["conv3d", "lin0"]}),
    "Conv3d 1 LoRA with DoRA": Row(
        "Conv3d", {"target_modules": ["conv3d"], "use_dora": True}, unmergeable=False
    ),
    "Conv3d 2 LoRA with DoRA": Row(
        "Conv3d", {"target_modules": ["conv3d", "lin0"], "use_dora": True}, unmergeable=False
    ),
    "Vanilla MLP 1 LoRA with lora_b bias": Row(
        "MLP", {"target_modules": ["lin0", "lin1"], "lora_bias": True, "lora_alpha": 32}
    ),
    "Conv2d 1 LoRA with lora_b bias": Row(
        "Conv2d", {"target_modules": ["conv2d"], "lora_bias": True, "lora_alpha": 32}
    ),
    "Conv3d 1 LoRA with lora_b bias": Row(
        "Conv3d", {"target_modules": ["conv3d"], "lora_bias": True, "lora_alpha": 32}
    ),
    "MHA 1 LoRA": Row("MHA", {"target_modules": ["mha"]}),
    "MHA 2 LoRA": Row("MHA", {"target_modules": ["mha", "lin0"]}),
    "MLP 1 using nn.Parameter LoRA": Row(
        "MlpUsingParameters", {"target_parameters": ["lin0.weight"]}
    ),
    "MLP 2 using nn.Parameter LoRA": Row(
        "MLP", {"target_modules": ["lin0"], "target_parameters": ["lin1.weight"]}
    ),
    "Vanilla MLP 1 LoRA with Monteclora": Row(
        "MLP", {"target_modules": ["lin0"], "monteclora_config": MontecloraConfig(num_samples=2)}
    ),
    "BD-LoRA A only": Row(
        "MLP",
        {
            "target_modules": ["lin0", "lin1"],
            "use_bdlora": BdLoraConfig(target_modules_bd_a=["lin0"], match_strict=False),
        },
    ),
    "BD-LoRA B only": Row(
        "MLP",
        {
            "target_modules": ["lin0", "lin1"],
            "use_bdlora": BdLoraConfig(target_modules_bd_b=["lin1"], nblocks=2, match_strict=False),
        },
    ),
    "BD-LoRA both A and B": Row(
        "MLP",
        {
            "target_modules": ["lin0", "lin1"],
            "use_bdlora": BdLoraConfig(
                target_modules_bd_a=["lin0"], target_modules_bd_b=["lin1"], nblocks=2
            ),
        },
    ),
    # not in PEFT's table: fused MoE expert stacks, two nested parameters, both layouts
    "MoE experts (E, out, in)": Row(
        "MoE", {"target_parameters": ["experts.gate_up_proj", "experts.down_proj"], "r": 2}
    ),
    "MoE experts (E, in, out)": Row(
        "MoETransposed",
        {
            "target_parameters": ["experts.gate_up_proj", "experts.down_proj"],
            "r": 2,
            "lora_alpha": 5,
        },
    ),  # fmt: skip
}

# The variants that combine and resize cannot express in plain LoRA factors.
VARIANT_ROWS = [
    "Vanilla MLP 1 LoRA with KaSA",
    "Vanilla MLP 10 LoRA with VeLoRA random",
    "Vanilla MLP 1 LoRA with Monteclora",
    "BD-LoRA both A and B",
    "MHA 1 LoRA",
    "MLP 1 using nn.Parameter LoRA",
    "MoE experts (E, out, in)",
]


def test_table_has_every_lora_row_of_peft() -> None:
    peft_rows = [name for name in ROWS if not name.startswith("MoE")]
    assert len(peft_rows) == 46
    assert sum(not ROWS[n].mergeable for n in peft_rows) == 4


# ---------------------------------------------------------------------------------------------
# Building a row


def _seeded(model: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return MODELS[model]()

    return build


@dataclass(frozen=True)
class Built:
    base: Path
    adapter: Path
    factory: Callable[[], nn.Module]
    conv1d: list[str] | str  # the layout, stated: a bare file has no config.json to tell it


def _build(name: str, tmp_path: Path) -> Built:
    row = ROWS[name]
    factory = _seeded(row.model)
    base = tmp_path / "base.safetensors"
    state = {k: v.detach().contiguous() for k, v in factory().state_dict().items()}
    save_file(state, base, metadata={"format": "pt"})
    config = LoraConfig(**copy.deepcopy(row.kwargs))
    adapter = make_adapter(factory, config, tmp_path / "adapter", seed=1, check_merge=row.mergeable)
    conv1d = [n for n, m in factory().named_modules() if isinstance(m, Conv1D)]
    return Built(base, adapter, factory, conv1d or "none")


# ---------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("name", [n for n, r in ROWS.items() if r.mergeable])
def test_merge_matches_peft(name: str, tmp_path: Path) -> None:
    built = _build(name, tmp_path)
    out = tmp_path / "merged.safetensors"

    lorasurgeon.merge(built.base, [built.adapter], out, fan_in_fan_out=built.conv1d)

    assert_matches_peft(out, peft_merge(built.factory, [built.adapter]), built.base)


@pytest.mark.parametrize("name", [n for n, r in ROWS.items() if r.mergeable and r.unmergeable])
def test_unmerge_restores_base(name: str, tmp_path: Path) -> None:
    built = _build(name, tmp_path)
    merged, restored = tmp_path / "merged.safetensors", tmp_path / "restored.safetensors"

    lorasurgeon.merge(built.base, [built.adapter], merged, fan_in_fan_out=built.conv1d)
    lorasurgeon.merge(merged, [built.adapter], restored, unmerge=True, fan_in_fan_out=built.conv1d)

    base, back, once = load_file(built.base), load_file(restored), load_file(merged)
    assert any(not torch.equal(once[k], base[k]) for k in base), "the merge changed nothing"
    for key, expected in base.items():
        err = (back[key] - expected).abs().max().item()
        assert err <= FP32_REL_TOL * max(1.0, expected.abs().max().item()), f"{key}: off by {err}"


@pytest.mark.parametrize("name", [n for n, r in ROWS.items() if not r.mergeable])
def test_grouped_convolutions_are_refused_as_peft_cannot_merge_them(
    name: str, tmp_path: Path
) -> None:
    built = _build(name, tmp_path)
    with pytest.raises((NotImplementedError, RuntimeError, ValueError)):
        peft_merge(built.factory, [built.adapter])  # PEFT cannot either

    with pytest.raises(AdapterError, match="grouped convolution") as caught:
        lorasurgeon.merge(built.base, [built.adapter], tmp_path / "merged.safetensors")

    assert "do not share a rank" not in str(caught.value)
    assert not (tmp_path / "merged.safetensors").exists()


def test_kasa_merge_cannot_be_undone(tmp_path: Path) -> None:
    built = _build("Vanilla MLP 1 LoRA with KaSA", tmp_path)
    with pytest.raises(OptionError, match="KaSA"):
        lorasurgeon.plan_merge(built.base, [built.adapter], unmerge=True)


def test_kasa_is_not_merged_with_other_adapters(tmp_path: Path) -> None:
    (tmp_path / "kasa").mkdir()
    kasa = _build("Vanilla MLP 1 LoRA with KaSA", tmp_path / "kasa")
    plain = make_adapter(
        kasa.factory, LoraConfig(target_modules=["lin1"]), tmp_path / "plain", seed=2
    )
    with pytest.raises(AdapterError, match="KaSA"):
        lorasurgeon.plan_merge(kasa.base, [kasa.adapter, plain])


@pytest.mark.parametrize("name", VARIANT_ROWS)
def test_combine_and_resize_refuse_variants(name: str, tmp_path: Path) -> None:
    built = _build(name, tmp_path)
    with pytest.raises(AdapterError, match="adapter; combine"):
        lorasurgeon.combine([built.adapter, built.adapter], tmp_path / "combined")
    with pytest.raises(AdapterError, match="adapter; resize"):
        lorasurgeon.resize(built.adapter, tmp_path / "resized", rank=2)
    assert not (tmp_path / "combined").exists() and not (tmp_path / "resized").exists()


def test_square_expert_stack_without_model_type_is_refused(tmp_path: Path) -> None:
    class Square(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.experts = nn.Module()
            self.experts.down_proj = nn.Parameter(torch.randn(2, 6, 6))

    base = tmp_path / "base.safetensors"
    torch.manual_seed(0)
    save_file({k: v.detach() for k, v in Square().state_dict().items()}, base)
    torch.manual_seed(0)
    config = LoraConfig(target_parameters=["experts.down_proj"], r=2)
    adapter = make_adapter(Square(), config, tmp_path / "adapter", seed=1)

    with pytest.raises(IncompatibleError, match="square"):
        lorasurgeon.plan_merge(base, [adapter])


def _bf16_base(built: Built, model: str) -> TinyBase:
    path = built.base.with_name("base_bf16.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(built.base).items()}, path)

    def load(path: Path, dtype: torch.dtype) -> nn.Module:
        module = MODELS[model]()
        module.load_state_dict({k: v.float() for k, v in load_file(path).items()})
        return module.to(dtype)

    return TinyBase(f"{model}_bf16", path, torch.bfloat16, load)


# PEFT's roundings per changed bf16 tensor (peft-lora.md 5.4): the delta is cast to the
# weight's dtype before the add (2), MHA's out_proj gets a second, fp32 add (3), VeLoRA's and
# MonteCLoRA's in-place add round once.
BF16_ROWS = {
    "MHA 2 LoRA": DtypeRule(roundings=2, roundings_for=((r"out_proj", 3), (r"lin0", 1))),
    "MLP 2 using nn.Parameter LoRA": DtypeRule(roundings=2, roundings_for=((r"lin0", 1),)),
    "MoE experts (E, out, in)": DtypeRule(roundings=2),
    "BD-LoRA both A and B": DtypeRule(roundings=2),
    "Vanilla MLP 11 LoRA with VeLoRA batch_average": DtypeRule(),
    "Vanilla MLP 1 LoRA with Monteclora": DtypeRule(),
}


@pytest.mark.parametrize("name", BF16_ROWS)
def test_bf16_merge_matches_peft_within_its_roundings(name: str, tmp_path: Path) -> None:
    built = _build(name, tmp_path)
    base = _bf16_base(built, ROWS[name].model)
    out = tmp_path / "merged.safetensors"

    lorasurgeon.merge(base.path, [built.adapter], out, fan_in_fan_out=built.conv1d)

    assert_matches_peft(
        out,
        peft_merge(base, [built.adapter]),
        base,
        dtype_rule=BF16_ROWS[name],
        exact_state_dict=peft_merge(base, [built.adapter], dtype=torch.float32),
    )


def test_cli_refuses_a_grouped_convolution_in_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    built = _build("Conv2d Groups2 LoRA", tmp_path)

    code, _, err = run_cli(capsys, "merge", built.base, built.adapter, "-o", tmp_path / "o")

    assert code == 1 and "Traceback" not in err
    assert err.splitlines()[0].startswith("error: ")
    assert "conv2d: LoRA on a grouped convolution" in err.splitlines()[0]

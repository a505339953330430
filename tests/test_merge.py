"""``lorasurgeon.merge`` against PEFT's ``merge_and_unload()`` (the oracle) on tiny seeded models.

Every comparison goes through ``assert_matches_peft`` (tests/conftest.py), which holds the
tolerances: float32 within 1e-5 relative per tensor; half precision within one ulp of PEFT where
PEFT rounds once, and within one ulp of the exact (float32) merge where PEFT rounds more than once;
untouched tensors bit for bit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors import safe_open

import lorasurgeon
from lorasurgeon.errors import (
    AdapterError,
    IncompatibleError,
    LorasurgeonError,
    OptionError,
    OutputError,
)
from tests.conftest import (
    FP32_REL_TOL,
    INDEX_NAME,
    LLAMA_LINEAR_MODULES,
    DtypeRule,
    TinyBase,
    assert_matches_peft,
    assert_same_layout,
    edit_adapter_config,
    load_checkpoint,
    make_adapter,
    peft_merge,
    read_raw_tensor_bytes,
    ulp_of,
)

# ---------------------------------------------------------------------------------------------
# Helpers


def output_path(tmp_path: Path, base: TinyBase) -> Path:
    """Where a merge of ``base`` writes: a directory, or a file when the base is a file."""
    return tmp_path / ("merged.safetensors" if base.is_file else "merged")


def run_merge(base: TinyBase | Path, adapters: list[Path], out: Path, **options: object) -> object:
    """``lorasurgeon.merge`` on the CPU (the GPU test passes ``device`` itself)."""
    options.setdefault("device", "cpu")
    location = base.path if isinstance(base, TinyBase) else base
    return lorasurgeon.merge(location, adapters, out, **options)


def build_adapters(base: TinyBase, configs: tuple[LoraConfig, ...], tmp_path: Path) -> list[Path]:
    """One adapter per config under ``tmp_path/adapters``, seeds 100, 101, ..."""
    root = tmp_path / "adapters"
    return [
        make_adapter(base, config, root / f"adapter{i}", seed=100 + i)
        for i, config in enumerate(configs)
    ]


def lora(*targets: str, **options: object) -> LoraConfig:
    """LoraConfig on the listed module names, r=4 and alpha=8 (scaling 2) unless overridden."""
    options.setdefault("target_modules", list(targets))
    options.setdefault("r", 4)
    options.setdefault("lora_alpha", 8)
    return LoraConfig(**options)


ALL_LINEAR = lora(*LLAMA_LINEAR_MODULES, r=8, lora_alpha=16)
GPT2_CONV1D = lora("c_attn", "c_proj", "c_fc")
# Names of tensors that no adapter below targets (for the bit-identity checks).
LLAMA_NORMS = (
    "model.norm.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.1.post_attention_layernorm.weight",
)


@dataclass(frozen=True)
class Case:
    """One merge compared with PEFT.

    Attributes:
        base: name of the base fixture in conftest.
        configs: one LoraConfig per adapter.
        weights: per-adapter weights (None: lorasurgeon's default 1.0 each).
        rule: output dtype and the roundings PEFT does (see DtypeRule).
        must_change: tensors the adapters must change (guards against a vacuous case).
        must_keep: tensors the adapters must leave bit-identical.
    """

    base: str
    configs: tuple[LoraConfig, ...]
    weights: tuple[float, ...] | None = None
    rule: DtypeRule = field(default_factory=DtypeRule)
    must_change: tuple[str, ...] = ()
    must_keep: tuple[str, ...] = ()


CASES = {
    "llama_fp32_sharded_all_linear": Case(
        "llama_fp32",
        (ALL_LINEAR,),
        must_change=(
            "model.layers.1.mlp.down_proj.weight",
            "model.layers.0.self_attn.k_proj.weight",
        ),
        must_keep=(*LLAMA_NORMS, "model.embed_tokens.weight", "lm_head.weight"),
    ),
    "llama_bf16_sharded_all_linear": Case(
        "llama_bf16",
        (ALL_LINEAR,),
        must_change=(
            "model.layers.1.mlp.down_proj.weight",
            "model.layers.0.self_attn.k_proj.weight",
        ),
        must_keep=(*LLAMA_NORMS, "model.embed_tokens.weight", "lm_head.weight"),
    ),
    "llama_all_linear_string": Case(
        "llama_fp32",
        (lora(target_modules="all-linear"),),
        must_change=("model.layers.0.mlp.gate_proj.weight",),
        must_keep=("lm_head.weight",),
    ),
    "gpt2_conv1d": Case(
        "gpt2",
        (GPT2_CONV1D,),
        must_change=(
            "transformer.h.0.attn.c_attn.weight",
            "transformer.h.1.attn.c_proj.weight",  # square: orientation must come from the arch
            "transformer.h.1.mlp.c_fc.weight",
            "transformer.h.0.mlp.c_proj.weight",
        ),
        must_keep=("transformer.h.0.attn.c_attn.bias", "transformer.wte.weight"),
    ),
    "gpt2_bf16_conv1d": Case(
        "gpt2_bf16",
        (GPT2_CONV1D,),
        must_change=("transformer.h.1.attn.c_proj.weight",),
    ),
    "seq_cls_modules_to_save_bias_all": Case(
        "llama_seq_cls",
        (lora("q_proj", "v_proj", task_type="SEQ_CLS", bias="all", modules_to_save=["score"]),),
        must_change=(
            "score.weight",  # modules_to_save copy replaces the head
            "model.layers.0.self_attn.q_proj.bias",  # bias of a LoRA module (base_layer.bias)
            "model.layers.1.mlp.down_proj.bias",  # bias of an untargeted module
            "model.layers.0.self_attn.v_proj.weight",
        ),
        must_keep=("model.layers.0.self_attn.k_proj.weight", *LLAMA_NORMS),
    ),
    "rank_and_alpha_pattern": Case(
        "llama_fp32",
        (
            lora(
                "q_proj",
                "v_proj",
                "down_proj",
                rank_pattern={"layers.0.self_attn.q_proj": 2, "down_proj": 6},
                alpha_pattern={"v_proj": 3, "layers.1.mlp.down_proj": 24},
            ),
        ),
        must_change=(
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.1.mlp.down_proj.weight",
        ),
    ),
    "use_rslora": Case(
        "llama_fp32",
        (lora("q_proj", "v_proj", "o_proj", use_rslora=True, rank_pattern={"v_proj": 2}),),
        must_change=("model.layers.0.self_attn.v_proj.weight",),
    ),
    "dora_linear_fp32": Case(
        "llama_fp32",
        (lora("q_proj", "v_proj", "down_proj", use_dora=True),),
        must_change=("model.layers.1.mlp.down_proj.weight",),
        must_keep=("model.layers.0.self_attn.k_proj.weight",),
    ),
    "dora_linear_bf16": Case(
        "llama_bf16",
        (lora("q_proj", "v_proj", "down_proj", use_dora=True),),
        must_change=("model.layers.1.mlp.down_proj.weight",),
    ),
    "dora_gpt2_conv1d": Case(
        "gpt2",
        (lora("c_attn", "c_proj", "c_fc", use_dora=True),),
        must_change=("transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_proj.weight"),
    ),
    "dora_embedding": Case(
        "llama_fp32",
        (lora("embed_tokens", "q_proj", use_dora=True),),
        must_change=("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"),
    ),
    "dora_conv2d_single_file": Case(
        "conv_net",
        (lora("conv", "pointwise", "head", use_dora=True),),
        must_change=("conv.weight", "pointwise.weight", "head.weight"),
    ),
    "layers_to_transform": Case(
        "llama_fp32",
        (lora("q_proj", "v_proj", "gate_proj", layers_to_transform=[1]),),
        must_change=(
            "model.layers.1.self_attn.q_proj.weight",
            "model.layers.1.mlp.gate_proj.weight",
        ),
        must_keep=("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.gate_proj.weight"),
    ),
    "regex_target_modules": Case(
        "llama_fp32",
        (lora(target_modules=r".*\.layers\.0\.(self_attn\.(q|o)_proj|mlp\.up_proj)"),),
        must_change=("model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.up_proj.weight"),
        must_keep=(
            "model.layers.1.self_attn.q_proj.weight",
            "model.layers.0.self_attn.k_proj.weight",
        ),
    ),
    "embedding_fp32": Case(
        "llama_fp32",
        (lora("embed_tokens", "q_proj"),),
        must_change=("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"),
        must_keep=("lm_head.weight",),
    ),
    "embedding_bf16": Case(
        "llama_bf16",
        (lora("embed_tokens", "q_proj"),),
        # PEFT's Embedding merge is rd(W + rd(delta)): two roundings (peft-lora.md 5.4).
        rule=DtypeRule(roundings_for=((r"embed_tokens", 2),)),
        must_change=("model.embed_tokens.weight",),
        must_keep=("lm_head.weight",),
    ),
    "tied_lora_on_lm_head": Case(
        "llama_tied",
        (lora("lm_head", "q_proj"),),
        # the head's delta lands on the one stored tensor (peft-lora.md 8.1)
        must_change=("model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight"),
    ),
    "tied_lora_on_embedding_and_lm_head": Case(
        "llama_tied",
        (lora("embed_tokens", "lm_head"),),
        # both deltas land on the one stored tensor (peft-lora.md 8.1, E20)
        must_change=("model.embed_tokens.weight",),
        must_keep=("model.layers.0.self_attn.q_proj.weight",),
    ),
    "lora_bias_linear": Case(
        "llama_seq_cls",
        (lora("q_proj", "o_proj", lora_bias=True),),
        must_change=(
            "model.layers.0.self_attn.q_proj.bias",
            "model.layers.1.self_attn.o_proj.weight",
        ),
        must_keep=("model.layers.0.self_attn.k_proj.bias", "score.weight"),
    ),
    "lora_bias_gpt2_conv1d": Case(
        "gpt2",
        (lora("c_attn", "c_fc", lora_bias=True),),
        must_change=("transformer.h.0.attn.c_attn.bias", "transformer.h.1.mlp.c_fc.bias"),
        must_keep=("transformer.h.0.attn.c_proj.bias",),
    ),
    "trainable_token_indices_fp32": Case(
        "llama_fp32",
        (lora("q_proj", trainable_token_indices=[1, 5, 7]),),
        must_change=("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"),
        must_keep=("lm_head.weight",),
    ),
    "trainable_token_indices_bf16": Case(
        "llama_bf16",
        (lora("q_proj", trainable_token_indices=[1, 5, 7]),),
        must_change=("model.embed_tokens.weight",),
    ),
    "two_adapters_weighted_fp32": Case(
        "llama_fp32",
        (lora("q_proj", "v_proj"), lora("q_proj", "k_proj", "down_proj", r=2, lora_alpha=6)),
        weights=(0.7, -0.4),
        must_change=(
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.1.mlp.down_proj.weight",
        ),
        must_keep=("model.layers.0.self_attn.o_proj.weight",),
    ),
    "two_adapters_weighted_bf16": Case(
        "llama_bf16",
        (lora("q_proj", "v_proj"), lora("q_proj", "k_proj", "down_proj", r=2, lora_alpha=6)),
        weights=(0.7, -0.4),
        # PEFT rounds after each adapter on the shared q_proj (peft-lora.md 5.4/5.6)
        rule=DtypeRule(roundings_for=((r"q_proj", 2),)),
        must_change=(
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.1.mlp.down_proj.weight",
        ),
    ),
    "conv2d_single_file_fp32": Case(
        "conv_net",
        (lora("conv", "pointwise", "head"),),
        must_change=("conv.weight", "pointwise.weight", "head.weight"),
        must_keep=("conv.bias", "head.bias"),
    ),
    # bias="all" also saves a modules_to_save module's bias as <m>.modules_to_save.bias and
    # <m>.original_module.bias; PEFT's loader ignores the first and discards the second at merge.
    "seq_cls_bias_all_modules_to_save_with_bias": Case(
        "llama_seq_cls",
        (lora("q_proj", "v_proj", task_type="SEQ_CLS", bias="all", modules_to_save=["down_proj"]),),
        must_change=(
            "model.layers.0.mlp.down_proj.bias",
            "model.layers.1.mlp.down_proj.weight",
            "model.layers.0.mlp.up_proj.bias",
            "score.weight",
        ),  # fmt: skip
    ),
    "seq_cls_bias_all_modules_to_save_and_trainable_tokens": Case(
        "llama_seq_cls",
        (
            lora(
                "q_proj",
                task_type="SEQ_CLS",
                bias="all",
                modules_to_save=["o_proj"],
                trainable_token_indices=[3, 5],
            ),
        ),  # fmt: skip
        must_change=("model.layers.0.self_attn.o_proj.bias", "model.embed_tokens.weight"),
    ),
    "seq_cls_bias_all_targeted_module_in_modules_to_save": Case(
        "llama_seq_cls",
        (lora("q_proj", "v_proj", task_type="SEQ_CLS", bias="all", modules_to_save=["q_proj"]),),
        must_change=(
            "model.layers.0.self_attn.q_proj.bias",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.1.self_attn.v_proj.bias",
        ),  # fmt: skip
    ),
    "seq_cls_bias_lora_only_modules_to_save": Case(
        "llama_seq_cls",
        (lora("q_proj", task_type="SEQ_CLS", bias="lora_only", modules_to_save=["up_proj"]),),
        must_change=("model.layers.0.self_attn.q_proj.bias", "model.layers.1.mlp.up_proj.bias"),
        must_keep=("model.layers.0.mlp.down_proj.bias",),
    ),
    "conv2d_single_file_bf16": Case(
        "conv_net_bf16",
        (lora("conv", "pointwise", "head"),),
        must_change=("conv.weight", "pointwise.weight", "head.weight"),
    ),
}


# ---------------------------------------------------------------------------------------------
# Merges compared with PEFT


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_merge_matches_peft_merge_and_unload(
    case: Case, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    base: TinyBase = request.getfixturevalue(case.base)
    adapters = build_adapters(base, case.configs, tmp_path)
    out = output_path(tmp_path, base)
    weights = list(case.weights) if case.weights is not None else None

    run_merge(base, adapters, out, weights=weights)

    expected = peft_merge(base, adapters, weights=weights)
    exact = None  # PEFT on the float32 base, for tensors PEFT rounds more than once
    if case.rule.needs_exact:
        exact = peft_merge(base, adapters, weights=weights, dtype=torch.float32)
    report = assert_matches_peft(out, expected, base, dtype_rule=case.rule, exact_state_dict=exact)
    assert set(case.must_change) <= report.changed, set(case.must_change) - report.changed
    assert set(case.must_keep) <= report.unchanged, set(case.must_keep) - report.unchanged
    if base.is_file:
        assert out.is_file(), "a single-file base must give a single output file"


def test_plain_weight_of_a_lora_module_is_ignored_as_peft_does(
    llama_fp32: TinyBase, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from safetensors.torch import load_file, save_file

    adapter = make_adapter(llama_fp32, lora("q_proj"), tmp_path / "a", seed=130)
    tensors = load_file(adapter / "adapter_model.safetensors")
    stray = "base_model.model.model.layers.0.self_attn.q_proj.weight"  # PEFT's: base_layer.weight
    tensors[stray] = torch.full((32, 32), 7.0)
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    run_merge(llama_fp32, [adapter], tmp_path / "merged")
    assert_matches_peft(tmp_path / "merged", peft_merge(llama_fp32, [adapter]), llama_fp32)
    assert stray in caplog.text


@pytest.mark.parametrize("base_name", ["llama_fp32", "llama_bf16"])
def test_merge_keeps_shard_names_index_metadata_and_config(
    base_name: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    base: TinyBase = request.getfixturevalue(base_name)
    adapters = build_adapters(base, (ALL_LINEAR,), tmp_path)
    out = output_path(tmp_path, base)

    run_merge(base, adapters, out)

    assert (out / "model.safetensors.index.json").is_file()
    assert (out / "config.json").read_bytes() == (base.path / "config.json").read_bytes()
    assert_same_layout(out, base.path)


def test_merge_single_file_keeps_names_and_metadata(conv_net: TinyBase, tmp_path: Path) -> None:
    adapters = build_adapters(conv_net, (lora("conv", "head"),), tmp_path)
    out = output_path(tmp_path, conv_net)

    run_merge(conv_net, adapters, out)

    with safe_open(out, "pt") as fo, safe_open(conv_net.path, "pt") as fb:
        assert sorted(fo.keys()) == sorted(fb.keys())
        metadata = dict(fo.metadata())
        assert json.loads(metadata.pop("lorasurgeon"))["command"] == "merge"  # provenance
        assert metadata == fb.metadata()


def test_merge_copies_untouched_tensors_bit_for_bit(llama_bf16: TinyBase, tmp_path: Path) -> None:
    adapters = build_adapters(llama_bf16, (lora("q_proj", "v_proj"),), tmp_path)
    out = output_path(tmp_path, llama_bf16)

    run_merge(llama_bf16, adapters, out)

    untouched = [
        name
        for name in load_checkpoint(llama_bf16.path)
        if not any(m in name for m in ("q_proj", "v_proj"))
    ]
    assert "model.embed_tokens.weight" in untouched and "model.norm.weight" in untouched
    for name in untouched:
        assert read_raw_tensor_bytes(out, name) == read_raw_tensor_bytes(llama_bf16.path, name), (
            name
        )


def test_merge_dtype_float32_on_bf16_base(llama_bf16: TinyBase, tmp_path: Path) -> None:
    adapters = build_adapters(llama_bf16, (ALL_LINEAR,), tmp_path)
    out = output_path(tmp_path, llama_bf16)

    run_merge(llama_bf16, adapters, out, dtype="float32")

    # PEFT on the base upcast to float32 (exact) merges in float32: "fp32, one rounding to fp32".
    expected = peft_merge(llama_bf16, adapters, dtype=torch.float32)
    rule = DtypeRule(out_dtype=torch.float32)
    report = assert_matches_peft(out, expected, llama_bf16, dtype_rule=rule)
    assert "model.norm.weight" in report.unchanged
    # same shards and weight map; total_size grows and config.json records the new dtype
    assert_same_layout(out, llama_bf16.path, new_dtype="float32")


def test_merge_dtype_bfloat16_on_fp32_base(llama_fp32: TinyBase, tmp_path: Path) -> None:
    adapters = build_adapters(llama_fp32, (ALL_LINEAR,), tmp_path)
    out = output_path(tmp_path, llama_fp32)

    run_merge(llama_fp32, adapters, out, dtype="bfloat16")

    # PEFT loads the base in bf16 first (one rounding) and rounds again after adding the delta;
    # we round W + delta once, so we are compared with the float32 merge rounded once.
    expected = peft_merge(llama_fp32, adapters, dtype=torch.bfloat16)
    exact = peft_merge(llama_fp32, adapters)
    rule = DtypeRule(out_dtype=torch.bfloat16, roundings=2)
    report = assert_matches_peft(out, expected, llama_fp32, dtype_rule=rule, exact_state_dict=exact)
    assert "model.embed_tokens.weight" in report.unchanged
    assert_same_layout(out, llama_fp32.path, new_dtype="bfloat16")


def test_merge_reshards_with_max_shard_size(llama_fp32: TinyBase, tmp_path: Path) -> None:
    adapters = build_adapters(llama_fp32, (ALL_LINEAR,), tmp_path)
    out = output_path(tmp_path, llama_fp32)
    base_shards = set(json.loads((llama_fp32.path / INDEX_NAME).read_text())["weight_map"].values())

    run_merge(llama_fp32, adapters, out, max_shard_size="20KB")

    shards = set(json.loads((out / INDEX_NAME).read_text())["weight_map"].values())
    assert len(shards) > len(base_shards), f"20KB should need more shards than 40KB: {shards}"
    assert {p.name for p in out.glob("*.safetensors")} == shards
    assert_matches_peft(out, peft_merge(llama_fp32, adapters), llama_fp32)


def test_merge_refuses_existing_output_unless_overwrite(
    llama_fp32: TinyBase, tmp_path: Path
) -> None:
    adapters = build_adapters(llama_fp32, (lora("q_proj", "v_proj"),), tmp_path)
    out = output_path(tmp_path, llama_fp32)
    out.mkdir()
    (out / "keep.txt").write_text("old output")
    (out / "model.safetensors").write_bytes(b"an earlier output")

    with pytest.raises(OutputError):
        run_merge(llama_fp32, adapters, out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "model.safetensors"], (
        "a refused merge touched the output"
    )

    run_merge(llama_fp32, adapters, out, overwrite=True)

    assert not (out / "keep.txt").exists()
    assert_matches_peft(out, peft_merge(llama_fp32, adapters), llama_fp32)


# ---------------------------------------------------------------------------------------------
# Unmerge


def assert_restores_fp32(restored: Path, merged: Path, base: TinyBase) -> None:
    """Restored within FP32_REL_TOL of the base; tensors the merge left alone bit-identical."""
    restored_sd, merged_sd = load_checkpoint(restored), load_checkpoint(merged)
    base_sd = load_checkpoint(base.path)
    assert set(restored_sd) == set(base_sd)
    worst = ("", 0.0)
    touched = 0
    for name, base_t in base_sd.items():
        got = restored_sd[name]
        assert got.dtype == base_t.dtype and got.shape == base_t.shape, name
        if torch.equal(merged_sd[name], base_t):
            assert torch.equal(got, base_t), f"{name}: untouched by the merge, changed by unmerge"
            continue
        touched += 1
        rel = ((got - base_t).abs().max() / base_t.abs().max()).item()
        worst = max(worst, (name, rel), key=lambda item: item[1])
    assert touched, "the merge changed nothing"
    assert worst[1] <= FP32_REL_TOL, f"worst {worst[0]}: rel err {worst[1]:.3e} > {FP32_REL_TOL}"


@pytest.mark.parametrize(
    ("base_name", "configs", "weights"),
    [
        pytest.param("llama_fp32", (ALL_LINEAR,), None, id="llama_all_linear"),
        pytest.param("gpt2", (GPT2_CONV1D,), None, id="gpt2_conv1d"),
        pytest.param(
            "llama_fp32",
            (lora("q_proj", "v_proj"), lora("q_proj", "down_proj", r=2)),
            [0.7, -0.4],
            id="two_adapters_weighted",
        ),
    ],
)
def test_unmerge_after_merge_restores_fp32_base(
    base_name: str,
    configs: tuple[LoraConfig, ...],
    weights: list[float] | None,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    base: TinyBase = request.getfixturevalue(base_name)
    adapters = build_adapters(base, configs, tmp_path)
    merged, restored = tmp_path / "merged", tmp_path / "restored"

    run_merge(base, adapters, merged, weights=weights)
    run_merge(merged, adapters, restored, weights=weights, unmerge=True)

    assert_restores_fp32(restored, merged, base)


def test_unmerge_after_merge_restores_bf16_base_within_rounding(
    llama_bf16: TinyBase, tmp_path: Path
) -> None:
    adapters = build_adapters(llama_bf16, (ALL_LINEAR,), tmp_path)
    merged, restored = tmp_path / "merged", tmp_path / "restored"

    run_merge(llama_bf16, adapters, merged)
    run_merge(merged, adapters, restored, unmerge=True)

    # In bf16 a round trip cannot be exact (peft-lora.md 5.4: PEFT's own rd(W' - rd(delta)) is
    # not W either). Bound: the merge stores M = rd(W + delta), off by <= ulp(M)/2; the unmerge
    # stores R = rd(M - delta), off by another <= ulp(R)/2 <= ulp(W) (R is within a rounding of
    # W, so at most one binade above it). Hence |R - W| <= ulp(M)/2 + ulp(W); we allow
    # ulp(M) + ulp(W): the extra ulp(M)/2 absorbs the float32 arithmetic (~2^-24 relative).
    base_sd, merged_sd, restored_sd = (
        load_checkpoint(p) for p in (llama_bf16.path, merged, restored)
    )
    touched = 0
    for name, base_t in base_sd.items():
        got, merged_t = restored_sd[name], merged_sd[name]
        assert got.dtype == torch.bfloat16 and got.shape == base_t.shape, name
        if torch.equal(merged_t, base_t):
            assert torch.equal(got, base_t), f"{name}: untouched by the merge, changed by unmerge"
            continue
        touched += 1
        err = (got.float() - base_t.float()).abs()
        bound = ulp_of(merged_t) + ulp_of(base_t)
        worst = int((err - bound).argmax())
        assert bool((err <= bound).all()), (
            f"{name}[{worst}]: |restored - base| = {err.flatten()[worst].item():.3e} > "
            f"ulp(merged) + ulp(base) = {bound.flatten()[worst].item():.3e}"
        )
    assert touched, "the merge changed nothing"


# ---------------------------------------------------------------------------------------------
# Planning


@pytest.mark.parametrize(
    ("base_name", "configs", "shared"),
    [
        pytest.param("llama_fp32", (ALL_LINEAR,), None, id="all_linear"),
        pytest.param(
            "llama_seq_cls",
            (lora("q_proj", "v_proj", task_type="SEQ_CLS", bias="all", modules_to_save=["score"]),),
            None,
            id="seq_cls_bias_all",
        ),
        pytest.param("llama_tied", (lora("lm_head", "q_proj"),), None, id="tied_lm_head"),
        pytest.param(
            "llama_fp32",
            (lora("q_proj", "v_proj"), lora("q_proj", "down_proj", r=2)),
            "model.layers.0.self_attn.q_proj.weight",
            id="two_adapters",
        ),
    ],
)
def test_plan_merge_lists_exactly_the_tensors_peft_changes(
    base_name: str,
    configs: tuple[LoraConfig, ...],
    shared: str | None,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    base: TinyBase = request.getfixturevalue(base_name)
    adapters = build_adapters(base, configs, tmp_path)
    base_sd = load_checkpoint(base.path)
    expected = peft_merge(base, adapters)
    peft_changed = {name for name, t in base_sd.items() if not torch.equal(expected[name], t)}

    plan = lorasurgeon.plan_merge(base.path, adapters)

    assert set(plan.changes) == peft_changed
    assert all(plan.changes[name] for name in peft_changed), "every change needs a description"
    if shared is not None:  # changed by both adapters: one description each
        assert len(plan.changes[shared]) >= 2, plan.changes[shared]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters"], "plan_merge wrote files"


# ---------------------------------------------------------------------------------------------
# Refusals


@dataclass(frozen=True)
class Refusal:
    """A merge lorasurgeon must refuse.

    Attributes:
        adapter_base: base fixture the adapter is trained on.
        config: the adapter's LoraConfig.
        merge_base: base fixture merged into (default: ``adapter_base``).
        config_edits: fields overwritten in adapter_config.json after saving.
        options: keyword options of ``lorasurgeon.merge``.
        error: the LorasurgeonError subclass expected (STYLE.md's hierarchy).
    """

    adapter_base: str
    config: LoraConfig
    error: type[LorasurgeonError]
    merge_base: str | None = None
    config_edits: dict[str, object] = field(default_factory=dict)
    options: dict[str, object] = field(default_factory=dict)


REFUSALS = {
    # DoRA unmerge needs the pre-merge row norms, which a merged checkpoint no longer has
    "dora_unmerge": Refusal(
        "llama_fp32", lora("q_proj", use_dora=True), OptionError, options={"unmerge": True}
    ),
    # a whole-module replacement cannot be undone without the original values
    "modules_to_save_unmerge": Refusal(
        "llama_seq_cls",
        lora("q_proj", task_type="SEQ_CLS", modules_to_save=["score"]),
        OptionError,
        options={"unmerge": True},
    ),
    "llama_adapter_on_gpt2_base": Refusal(
        "llama_fp32", lora("q_proj", "v_proj"), IncompatibleError, merge_base="gpt2"
    ),
    # olora adapters were trained against a residual base PEFT recomputes at load
    "init_lora_weights_olora": Refusal(
        "llama_fp32", lora("q_proj"), AdapterError, config_edits={"init_lora_weights": "olora"}
    ),
    "layer_replication": Refusal(
        "llama_fp32",
        lora("q_proj"),
        AdapterError,
        config_edits={"layer_replication": [[0, 2], [1, 2]]},
    ),
}


@pytest.mark.parametrize("refusal", list(REFUSALS.values()), ids=list(REFUSALS))
def test_merge_refuses_what_it_cannot_do_and_writes_nothing(
    refusal: Refusal, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    adapter_base: TinyBase = request.getfixturevalue(refusal.adapter_base)
    base: TinyBase = request.getfixturevalue(refusal.merge_base or refusal.adapter_base)
    (adapter,) = build_adapters(adapter_base, (refusal.config,), tmp_path)
    if refusal.config_edits:
        edit_adapter_config(adapter, **refusal.config_edits)
    out = tmp_path / "merged"

    with pytest.raises(refusal.error) as raised:
        run_merge(base, [adapter], out, **refusal.options)

    assert raised.value.path is not None or raised.value.tensor is not None, "name the culprit"

    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters"], "output left behind"


# ---------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("base_name", ["llama_fp32", "llama_bf16"])
def test_merge_on_cuda_matches_peft(
    base_name: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    base: TinyBase = request.getfixturevalue(base_name)
    adapters = build_adapters(base, (ALL_LINEAR,), tmp_path)
    out = output_path(tmp_path, base)

    run_merge(base, adapters, out, device="cuda")

    assert_matches_peft(out, peft_merge(base, adapters), base)


# ---------------------------------------------------------------------------------------------
# Storage layout (nn.Linear vs GPT-2 Conv1D) where the base has no config.json


class MixedConv1D(torch.nn.Module):
    """A custom (non-transformers) model mixing a square Conv1D and square Linear layers."""

    def __init__(self) -> None:
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.proj = Conv1D(16, 16)  # stored (in, out)
        self.gate = torch.nn.Linear(16, 16)
        self.wide = Conv1D(24, 16)  # (16, 24): its shape alone tells

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wide(self.gate(self.proj(x)))


def _mixed_conv1d() -> torch.nn.Module:
    torch.manual_seed(11)
    return MixedConv1D()


@pytest.fixture
def mixed_conv1d_file(tmp_path: Path) -> Path:
    from safetensors.torch import save_file

    model = _mixed_conv1d()
    path = tmp_path / "mixed.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


@pytest.fixture
def gpt2_file(gpt2: TinyBase, tmp_path: Path) -> Path:
    """The GPT-2 base as a bare .safetensors file: no config.json says it uses Conv1D."""
    path = tmp_path / "gpt2.safetensors"
    path.write_bytes((gpt2.path / "model.safetensors").read_bytes())
    return path


def test_square_conv1d_of_unknown_layout_is_refused_not_guessed(
    gpt2: TinyBase, gpt2_file: Path, tmp_path: Path
) -> None:
    adapters = build_adapters(gpt2, (GPT2_CONV1D,), tmp_path)
    with pytest.raises(IncompatibleError, match="--fan-in-fan-out") as e:
        run_merge(gpt2_file, adapters, tmp_path / "out.safetensors")
    assert e.value.tensor is not None and "attn.c_proj.lora_B" in e.value.tensor
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("stated", ["all", ["c_attn", "c_proj", "c_fc"]], ids=["all", "names"])
def test_stated_conv1d_layout_merges_a_bare_gpt2_file_like_peft(
    gpt2: TinyBase, gpt2_file: Path, tmp_path: Path, stated: object
) -> None:
    adapters = build_adapters(gpt2, (GPT2_CONV1D,), tmp_path)
    out = tmp_path / "out.safetensors"
    run_merge(gpt2_file, adapters, out, fan_in_fan_out=stated)
    report = assert_matches_peft(out, peft_merge(gpt2, adapters), gpt2_file)
    assert "transformer.h.0.attn.c_proj.weight" in report.changed


def test_custom_model_mixing_square_conv1d_and_linear(
    mixed_conv1d_file: Path, tmp_path: Path
) -> None:
    config = lora("proj", "gate", "wide")
    adapter = make_adapter(_mixed_conv1d, config, tmp_path / "a", seed=140)
    # PEFT rewrites fan_in_fan_out per module as it injects them: the saved flag is the last
    # module's, so true here although gate is an nn.Linear (peft-lora.md E33)
    assert json.loads((adapter / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    with pytest.raises(IncompatibleError, match="square"):
        run_merge(mixed_conv1d_file, [adapter], tmp_path / "x.safetensors")
    out = tmp_path / "out.safetensors"
    run_merge(mixed_conv1d_file, [adapter], out, fan_in_fan_out=["proj", "wide"])
    report = assert_matches_peft(out, peft_merge(_mixed_conv1d, [adapter]), mixed_conv1d_file)
    assert {"proj.weight", "gate.weight", "wide.weight"} <= report.changed


def test_stated_layout_that_config_contradicts_or_that_matches_nothing_is_refused(
    gpt2: TinyBase, gpt2_file: Path, tmp_path: Path
) -> None:
    adapters = build_adapters(gpt2, (GPT2_CONV1D,), tmp_path)
    with pytest.raises(OptionError, match="config.json"):
        run_merge(gpt2, adapters, tmp_path / "a", fan_in_fan_out="none")
    with pytest.raises(OptionError, match="c_projj"):
        run_merge(gpt2_file, adapters, tmp_path / "b.safetensors",
                  fan_in_fan_out=["c_attn", "c_projj"])  # fmt: skip


def test_cli_fan_in_fan_out_option(
    gpt2: TinyBase, gpt2_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lorasurgeon.cli import main

    adapters = [str(a) for a in build_adapters(gpt2, (GPT2_CONV1D,), tmp_path)]
    base, out = str(gpt2_file), str(tmp_path / "o.safetensors")
    with pytest.raises(SystemExit) as e:
        main(["merge", base, *adapters, "-o", out, "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: ") and "--fan-in-fan-out" in err
    with pytest.raises(SystemExit) as e:
        main(["merge", base, *adapters, "-o", out, "--device", "cpu", "--fan-in-fan-out",
              "c_attn,c_proj,c_fc"])  # fmt: skip
    assert e.value.code == 0
    assert_matches_peft(Path(out), peft_merge(gpt2, [Path(a) for a in adapters]), gpt2_file)


def test_merge_computes_on_one_thread_and_restores_the_callers_setting(
    llama_bf16: TinyBase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lorasurgeon import ops

    seen: list[int] = []
    apply = ops.apply_updates

    def recording(*args: object, **kwargs: object) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return apply(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ops, "apply_updates", recording)
    adapters = build_adapters(llama_bf16, (lora("q_proj", "v_proj"),), tmp_path)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_merge(llama_bf16, adapters, output_path(tmp_path, llama_bf16))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {1}

"""LoRA file formats detected from their keys and read into canonical updates: kohya LoRA/LoCon
(3×3, Tucker), LyCORIS LoHa/LoKr (incl. Tucker), DoRA, diffusers PEFT files written by diffusers'
own save_lora_weights, old diffusers spellings, FLUX names; bad inputs refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorasurgeon.errors import AdapterError
from lorasurgeon.formats import Component, Family, Kind, LoraFormat, read_lora
from tests.sd_models import (
    CONV_TARGETS,
    TEXT_TARGETS,
    UNET_TARGETS,
    kohya_modules,
    tiny_sd,
    write_kohya,
)


@pytest.fixture(scope="module")
def sd1():  # type: ignore[no-untyped-def]
    return tiny_sd("sd1")


def _save(
    tmp_path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Path:
    path = tmp_path / "lora.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


def test_kohya_lora_and_locon_read_with_alpha_rank_and_scaling(sd1, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    modules = kohya_modules(sd1.unet, "lora_unet_", UNET_TARGETS + CONV_TARGETS)
    modules |= kohya_modules(sd1.text_encoders[0], "lora_te_", TEXT_TARGETS, text=True)
    lora = read_lora(write_kohya(tmp_path / "l.safetensors", modules, rank=4, alpha=0.3))
    assert (lora.format, lora.family) == (LoraFormat.KOHYA, Family.SD1_SD2)
    assert len(lora.updates) == len(modules)
    assert {u.kind for u in lora.updates} == {Kind.LORA}
    assert {u.component for u in lora.updates} == {Component.UNET, Component.TE}
    update = next(u for u in lora.updates if u.source.endswith("resnets_0_conv1"))
    assert update.factors["down"].shape == (4, 32, 3, 3) and update.factors["up"].shape == (
        32,
        4,
        1,
        1,
    )
    # fp16 0.3 is stored as 0.300048828125 (spec V10): the stored value counts
    assert update.alpha == 0.300048828125 and update.rank == 4
    assert update.scaling == 0.300048828125 / 4
    assert update.module == "down_blocks_0_resnets_0_conv1" and update.key == update.module


@pytest.mark.parametrize(
    ("alpha", "dtype", "scaling"),
    [
        (None, None, 1.0),
        (8, torch.int64, 2.0),
        (0.3, torch.bfloat16, 0.30078125 / 4),
        (2.0, torch.float32, 0.5),
    ],
)
def test_alpha_of_any_dtype_or_none(
    tmp_path: Path, alpha: float | None, dtype: torch.dtype | None, scaling: float
) -> None:
    state = {
        "lora_unet_x.lora_down.weight": torch.ones(4, 3),
        "lora_unet_x.lora_up.weight": torch.ones(5, 4),
    }
    if alpha is not None:
        state["lora_unet_x.alpha"] = torch.tensor(alpha, dtype=dtype)
    (update,) = read_lora(_save(tmp_path, state)).updates
    assert update.scaling == scaling  # no alpha: α = r, s = 1 (sd-scripts, ComfyUI)


LYCORIS = {
    "locon-tucker": (
        {
            "lora_down.weight": (4, 8, 1, 1),
            "lora_mid.weight": (4, 4, 3, 3),
            "lora_up.weight": (16, 4, 1, 1),
        },
        Kind.LOCON_TUCKER,
        4,
        (16, 8, 3, 3),
    ),
    "loha": (
        {"hada_w1_a": (16, 4), "hada_w1_b": (4, 72), "hada_w2_a": (16, 4), "hada_w2_b": (4, 72)},
        Kind.LOHA,
        4,
        (16, 72),
    ),
    "loha-tucker": (
        {
            "hada_w1_a": (4, 16),
            "hada_w1_b": (4, 8),
            "hada_w2_a": (4, 16),
            "hada_w2_b": (4, 8),
            "hada_t1": (4, 4, 3, 3),
            "hada_t2": (4, 4, 3, 3),
        },
        Kind.LOHA_TUCKER,
        4,
        (16, 8, 3, 3),
    ),
    "lokr-full": ({"lokr_w1": (4, 2), "lokr_w2": (4, 4, 3, 3)}, Kind.LOKR, None, (16, 8, 3, 3)),
    "lokr-w2-factored": (
        {"lokr_w1": (4, 2), "lokr_w2_a": (4, 2), "lokr_w2_b": (2, 36)},
        Kind.LOKR,
        2,
        (16, 72),
    ),
    "lokr-tucker": (
        {"lokr_w1": (4, 2), "lokr_w2_a": (2, 4), "lokr_w2_b": (2, 4), "lokr_t2": (2, 2, 3, 3)},
        Kind.LOKR,
        2,
        (16, 8, 3, 3),
    ),
    "lokr-both": (
        {"lokr_w1_a": (4, 2), "lokr_w1_b": (2, 2), "lokr_w2": (4, 4)},
        Kind.LOKR,
        2,
        (16, 8),
    ),
    "full": ({"diff": (16, 8), "diff_b": (16,)}, Kind.FULL, None, (16, 8)),
    "norm": ({"w_norm": (16,), "b_norm": (16,)}, Kind.NORM, None, (16,)),
}


@pytest.mark.parametrize("algo", list(LYCORIS))
def test_lycoris_modules_read_with_kind_rank_and_shape(tmp_path: Path, algo: str) -> None:
    from lorasurgeon.layouts import delta_shape

    parts, kind, rank, shape = LYCORIS[algo]
    state = {f"lora_unet_m.{p}": torch.randn(s) for p, s in parts.items()}
    state["lora_unet_m.alpha"] = torch.tensor(3.0)
    (update,) = read_lora(_save(tmp_path, state, {"ss_network_module": "lycoris.kohya"})).updates
    assert (update.kind, update.rank, delta_shape(update)) == (kind, rank, shape)
    # LoKr with both halves full and diff/norm have no rank: scale 1 (LyCORIS, ComfyUI)
    assert update.scaling == (1.0 if rank is None else 3.0 / rank)


def test_dora_scale_is_kept_with_its_module(tmp_path: Path) -> None:
    state = {
        "lora_unet_m.lora_down.weight": torch.ones(2, 3),
        "lora_unet_m.lora_up.weight": torch.ones(4, 2),
        "lora_unet_m.dora_scale": torch.ones(4, 1),
    }
    (update,) = read_lora(_save(tmp_path, state)).updates
    assert update.dora_scale is not None and update.dora_scale.shape == (4, 1)


def _peft_unet_lora(sd1, r: int, alpha: int):  # type: ignore[no-untyped-def]
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = tiny_sd("sd1").unet
    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=["to_q", "to_k", "conv1"], alpha_pattern={"conv1": 1}
    )
    unet.add_adapter(config)
    layers = get_peft_model_state_dict(unet)  # PEFT keys, as diffusers' training scripts save
    return layers, config


def test_diffusers_file_scaling_from_lora_adapter_metadata(sd1, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from diffusers import StableDiffusionPipeline

    layers, config = _peft_unet_lora(sd1, r=4, alpha=8)
    metadata = config.to_dict()
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata
    )
    lora = read_lora(tmp_path / "pytorch_lora_weights.safetensors")
    assert (lora.format, lora.family) == (LoraFormat.DIFFUSERS, Family.UNKNOWN)
    by_kind = {u.module.rsplit(".", 1)[1]: u.scaling for u in lora.updates}
    assert by_kind == {"to_q": 2.0, "to_k": 2.0, "conv1": 0.25}  # alpha_pattern conv1: 1 / r 4
    conv = next(u for u in lora.updates if u.module.endswith("conv1"))
    assert conv.module.startswith("down_blocks.") and conv.factors["down"].shape[2:] == (3, 3)
    assert json.loads(lora.metadata["lora_adapter_metadata"])["unet.r"] == 4


def test_diffusers_file_without_metadata_has_scaling_one(sd1, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from diffusers import StableDiffusionPipeline

    layers, _ = _peft_unet_lora(sd1, r=4, alpha=8)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=layers)
    lora = read_lora(tmp_path / "pytorch_lora_weights.safetensors")
    assert {u.scaling for u in lora.updates} == {1.0}  # spec V07b


def test_old_diffusers_spellings(tmp_path: Path) -> None:
    """Attention-processor keys (spec §3.2, V12): processor dropped, to_out_lora -> to_out.0,
    text to_q_lora -> q_proj; .alpha next to the module or to its down weight."""
    block = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    text = "text_model.encoder.layers.0"
    state = {
        f"unet.{block}.processor.to_q_lora.down.weight": torch.ones(2, 8),
        f"unet.{block}.processor.to_q_lora.up.weight": torch.ones(8, 2),
        f"unet.{block}.processor.to_q_lora.down.weight.alpha": torch.tensor(1.0),
        f"unet.{block}.processor.to_out_lora.down.weight": torch.ones(2, 8),
        f"unet.{block}.processor.to_out_lora.up.weight": torch.ones(8, 2),
        "unet.down_blocks.0.resnets.0.conv1.lora.down.weight": torch.ones(2, 8, 3, 3),
        "unet.down_blocks.0.resnets.0.conv1.lora.up.weight": torch.ones(8, 2, 1, 1),
        "unet.down_blocks.0.resnets.0.conv1.alpha": torch.tensor(4.0),
        f"text_encoder.{text}.self_attn.to_k_lora.down.weight": torch.ones(2, 8),
        f"text_encoder.{text}.self_attn.to_k_lora.up.weight": torch.ones(8, 2),
        f"text_encoder.{text}.mlp.fc1.lora_linear_layer.down.weight": torch.ones(2, 8),
        f"text_encoder.{text}.mlp.fc1.lora_linear_layer.up.weight": torch.ones(8, 2),
    }
    lora = read_lora(_save(tmp_path, state))
    assert lora.format is LoraFormat.DIFFUSERS_OLD
    got = {(u.component, u.module): u.scaling for u in lora.updates}
    assert got == {
        (Component.UNET, f"{block}.to_q"): 0.5,
        (Component.UNET, f"{block}.to_out.0"): 1.0,
        (Component.UNET, "down_blocks.0.resnets.0.conv1"): 2.0,
        (Component.TE1, f"{text}.self_attn.k_proj"): 1.0,
        (Component.TE1, f"{text}.mlp.fc1"): 1.0,
    }


@pytest.mark.parametrize(
    ("names", "family", "metadata"),
    [
        (
            ["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_1_linear1"],
            Family.FLUX,
            None,
        ),
        (["lora_unet_input_blocks_4_1_proj_in", "lora_te1_x", "lora_te2_x"], Family.SDXL, None),
        (
            ["lora_unet_down_blocks_0_attentions_0_proj_in"],
            Family.SD2,
            {"ss_base_model_version": "sd_v2_v"},
        ),
        (
            ["lora_unet_down_blocks_0_attentions_0_proj_in"],
            Family.SDXL,
            {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"},
        ),
        (["transformer.single_transformer_blocks.0.attn.to_q"], Family.FLUX, None),
    ],
)
def test_family_from_metadata_else_names(
    tmp_path: Path, names: list[str], family: Family, metadata: dict[str, str] | None
) -> None:
    state = {}
    for name in names:
        if name.startswith("transformer."):
            state[f"{name}.lora_A.weight"] = torch.ones(2, 4)
            state[f"{name}.lora_B.weight"] = torch.ones(4, 2)
        else:
            state[f"{name}.lora_down.weight"] = torch.ones(2, 4)
            state[f"{name}.lora_up.weight"] = torch.ones(4, 2)
    assert read_lora(_save(tmp_path, state, metadata)).family is family


@pytest.mark.parametrize(
    ("state", "message", "tensor"),
    [
        (
            {
                "lora_unet_a.lora_down.weight": (2, 4),
                "lora_unet_a.lora_up.weight": (4, 2),
                "unet.b.lora_A.weight": (2, 4),
                "unet.b.lora_B.weight": (4, 2),
            },
            "mixes formats",
            "unet.b.lora_A.weight",
        ),
        (
            {"lora_unet_a.lora_down.weight": (2, 4), "lora_unet_a.lora_left.weight": (4, 2)},
            "unknown part 'lora_left.weight'",
            "lora_unet_a.lora_left.weight",
        ),
        (
            {"lora_unet_a.a1.weight": (2, 4)},
            "GLoRA modules are not supported",
            "lora_unet_a.a1.weight",
        ),
        (
            {"lora_unet_a.oft_blocks": (2, 4, 4)},
            "OFT modules are not supported",
            "lora_unet_a.oft_blocks",
        ),
        ({"lora_unet_a.lora_down.weight": (2, 4)}, "do not form one complete", "lora_unet_a"),
        (
            {"lora_unet_a.hada_w1_a": (4, 2), "lora_unet_a.lora_up.weight": (4, 2)},
            "do not form one complete",
            "lora_unet_a",
        ),
        ({"unet.a.lora_A.weight": (2, 4)}, r"no up \(lora_B\) weight", "unet.a"),
        (
            {"base_model.model.x.lora_A.weight": (2, 4)},
            "no known LoRA format",
            "base_model.model.x.lora_A.weight",
        ),
        ({"model.layers.0.weight": (2, 4)}, "no known LoRA format", "model.layers.0.weight"),
    ],
)
def test_bad_files_are_refused_naming_file_and_tensor(
    tmp_path: Path, state: dict[str, tuple[int, ...]], message: str, tensor: str
) -> None:
    path = _save(tmp_path, {k: torch.ones(s) for k, s in state.items()})
    with pytest.raises(AdapterError, match=message) as e:
        read_lora(path)
    assert (e.value.path, e.value.tensor) == (str(path), tensor)

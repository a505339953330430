"""extract from two diffusion checkpoints: a known low-rank change planted in tiny random SD1
and SDXL models (attention, feed-forward, a 3×3 conv, text-encoder projections incl. OpenCLIP
q/k/v inside the fused in_proj), extracted to kohya and diffusers files. Oracles: diffusers'
load_lora_weights + fuse_lora on the base pipeline, and our own merge into BASE, both must give
TUNED (the planted rank fits, so to float tolerance)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lorasurgeon
from lorasurgeon.extract import extract
from tests.conftest import TinyBase
from tests.sd_models import (
    TinySD,
    bfl_state,
    ldm_state,
    save_diffusers,
    save_ldm,
    tiny_flux,
    tiny_sd,
)
from tests.test_merge_diffusion import _pipeline, _run, _text_state, diffusers_fused_ldm

# module (diffusers/transformers spelling) -> planted rank; the UNet modules exist in SD1 and
# SDXL alike, the text-encoder ones in every text encoder (q_proj: OpenCLIP in_proj rows)
_UNET_PLANTS = {
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": 2,
    "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2": 2,
    "down_blocks.1.resnets.0.conv1": 3,  # 3×3 conv
}
# out_proj too: diffusers reads kohya text-encoder keys as its old attention-processor format
# only when a to_out_lora key is there (convert_state_dict_to_peft detects the format by it);
# q_proj and fc1 without out_proj load q_proj nowhere. sd-scripts files always have out_proj.
_TEXT_PLANTS = {
    "encoder.layers.1.self_attn.q_proj": 2,
    "encoder.layers.1.self_attn.out_proj": 1,
    "encoder.layers.0.mlp.fc1": 2,
}
# Tolerance: tuned - base, rank-r SVD and B@A all in float32 on weights of order 0.1-0.5.
_ATOL = 1e-6


def _module(root: nn.Module, path: str) -> nn.Module:
    """``path`` in ``root``, with or without transformers' ``text_model.`` level."""
    for name, module in root.named_modules():
        if name == path or name.removeprefix("text_model.") == path:
            return module
    raise KeyError(path)


def _plant(module: nn.Module, rank: int, gen: torch.Generator, scale: float = 0.05) -> None:
    weight = module.weight
    out, rest = weight.shape[0], weight[0].numel()
    delta = torch.randn(out, rank, generator=gen) @ torch.randn(rank, rest, generator=gen)
    with torch.no_grad():
        weight.add_(scale * delta.reshape(weight.shape))


def tuned_model(model: TinySD, *, text: bool = True, seed: int = 1) -> TinySD:
    """A copy of ``model`` with the planted low-rank changes (text encoders only if ``text``)."""
    gen = torch.Generator().manual_seed(seed)
    tuned = copy.deepcopy(model)
    for path, rank in _UNET_PLANTS.items():
        _plant(_module(tuned.unet, path), rank, gen)
    for encoder in tuned.text_encoders if text else []:
        for path, rank in _TEXT_PLANTS.items():
            _plant(_module(encoder, path), rank, gen)
    return tuned


@pytest.fixture(scope="module")
def models() -> dict[str, TinySD]:
    return {family: tiny_sd(family) for family in ("sd1", "sdxl")}


def _worst(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> tuple[float, str]:
    assert set(got) <= set(want)
    return max(((got[k].double() - want[k].double()).abs().max().item(), k) for k in got)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_ldm_extraction_loads_in_diffusers_and_merges_back_to_tuned(
    models: dict[str, TinySD], tmp_path: Path, family: str, fmt: str
) -> None:
    model = models[family]
    tuned = tuned_model(model)
    base = save_ldm(model, tmp_path / "base.safetensors")
    tuned_path = save_ldm(tuned, tmp_path / "tuned.safetensors")
    lora = tmp_path / "lora.safetensors"
    report = extract(base, tuned_path, lora, rank=4, output_format=fmt)
    planted = len(_UNET_PLANTS) + len(_TEXT_PLANTS) * len(model.text_encoders)
    assert len(report.modules) == planted and report.unchanged_text == []
    assert max(m.rel_error for m in report.modules) < 1e-5
    # diffusers, on the base pipeline, gives the tuned weights (mapped to the LDM layout)
    fused = diffusers_fused_ldm(model, lora, 1.0)
    want = ldm_state(tuned)
    worst = _worst(fused, want)
    assert worst[0] <= _ATOL, f"worst tensor {worst[1]}: {worst[0]:.3g}"
    # our merge of the extracted LoRA into BASE gives TUNED
    lorasurgeon.merge(base, [lora], tmp_path / "merged.safetensors")
    worst = _worst(load_file(str(tmp_path / "merged.safetensors")), load_file(str(tuned_path)))
    assert worst[0] <= _ATOL, f"worst tensor {worst[1]}: {worst[0]:.3g}"


def test_kohya_file_follows_sd_scripts_layout(models: dict[str, TinySD], tmp_path: Path) -> None:
    """Spec §5.6: lora_up = U·S (out, r[, 1, 1]), lora_down = Vh (r, in[, kh, kw]) with
    orthonormal rows, alpha = r; SDXL UNet names in LDM spelling, te1/te2 prefixes, ss_*."""
    model = models["sdxl"]
    base = save_ldm(model, tmp_path / "base.safetensors")
    tuned = save_ldm(tuned_model(model), tmp_path / "tuned.safetensors")
    lora = tmp_path / "lora.safetensors"
    extract(base, tuned, lora, rank=4, svd="exact")
    state = load_file(str(lora))
    conv = "lora_unet_input_blocks_4_0_in_layers_2"  # down_blocks.1.resnets.0.conv1
    assert state[f"{conv}.lora_down.weight"].shape == (4, 32, 3, 3)
    assert state[f"{conv}.lora_up.weight"].shape == (64, 4, 1, 1)
    assert state[f"{conv}.alpha"].item() == 4
    down = state[f"{conv}.lora_down.weight"].flatten(1)
    assert torch.allclose(down @ down.T, torch.eye(4), atol=1e-5)
    assert "lora_te2_text_model_encoder_layers_1_self_attn_q_proj.lora_down.weight" in state
    assert "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight" in state
    with safe_open(str(lora), "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert json.loads(metadata["ss_network_args"])["conv_dim"] == "4"


@pytest.mark.parametrize(("family", "fmt"), [("sd1", "kohya"), ("sd1", "diffusers"),
                                             ("sdxl", "kohya")])  # fmt: skip
def test_diffusers_folder_extraction_loads_in_diffusers(
    models: dict[str, TinySD], tmp_path: Path, family: str, fmt: str
) -> None:
    """A diffusers folder (SDXL: kohya names in LDM spelling, from a diffusers-spelled base;
    the text encoders in their own component files)."""
    model = models[family]
    tuned = tuned_model(model)
    base = save_diffusers(model, tmp_path / "base")
    tuned_dir = save_diffusers(tuned, tmp_path / "tuned")
    lora = tmp_path / "lora.safetensors"
    extract(base, tuned_dir, lora, rank=4, output_format=fmt)
    if family == "sdxl":
        assert any(
            k.startswith("lora_unet_input_blocks_4_0_in_layers_2") for k in load_file(str(lora))
        )
    pipe = _pipeline(model)
    pipe.load_lora_weights(str(lora))  # type: ignore[attr-defined]
    pipe.fuse_lora(lora_scale=1.0)  # type: ignore[attr-defined]
    pipe.unload_lora_weights()  # type: ignore[attr-defined]
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])  # type: ignore[attr-defined]
    got = {f"unet.{k}": v for k, v in pipe.unet.state_dict().items()}  # type: ignore[attr-defined]
    want = {f"unet.{k}": v for k, v in tuned.unet_state().items()}
    for i, encoder in enumerate(encoders):
        got |= {f"te{i}.{k}": v for k, v in _text_state(encoder).items()}
        want |= {f"te{i}.{k}": v for k, v in tuned.text_state(i).items()}
    worst = _worst(got, want)
    assert worst[0] <= _ATOL, f"worst tensor {worst[1]}: {worst[0]:.3g}"
    lorasurgeon.merge(base, [lora], tmp_path / "merged")
    merged = load_file(str(tmp_path / "merged" / "unet" / "diffusion_pytorch_model.safetensors"))
    worst = _worst(merged, tuned.unet_state())
    assert worst[0] <= _ATOL, f"worst tensor {worst[1]}: {worst[0]:.3g}"


def test_conv_rank_sets_the_rank_of_kxk_convs_only(
    models: dict[str, TinySD], tmp_path: Path
) -> None:
    model = models["sd1"]
    base = save_ldm(model, tmp_path / "base.safetensors")
    tuned = save_ldm(tuned_model(model), tmp_path / "tuned.safetensors")
    lora = tmp_path / "lora.safetensors"
    report = extract(base, tuned, lora, rank=4, conv_rank=2, svd="exact")
    ranks = {m.module: m.rank for m in report.modules}
    assert ranks.pop("down_blocks.1.resnets.0.conv1") == 2
    assert set(ranks.values()) == {4}
    state = load_file(str(lora))
    assert state["lora_unet_down_blocks_1_resnets_0_conv1.lora_down.weight"].shape == (2, 32, 3, 3)
    # the planted conv change has rank 3: rank 2 keeps the best rank-2 part, not all of it
    conv = next(m for m in report.modules if m.module == "down_blocks.1.resnets.0.conv1")
    assert 1e-3 < conv.rel_error < 1


@pytest.mark.parametrize(
    "method",
    [{"rank_method": "energy", "energy": 0.999999},
     {"rank_method": "sv_ratio", "sv_ratio": 1000.0},
     {"rank_method": "sv_cumulative", "sv_cumulative": 0.99999}],
)  # fmt: skip
def test_rank_methods_find_the_planted_ranks(
    models: dict[str, TinySD], tmp_path: Path, method: dict[str, object]
) -> None:
    model = models["sd1"]
    base = save_ldm(model, tmp_path / "base.safetensors")
    tuned = save_ldm(tuned_model(model), tmp_path / "tuned.safetensors")
    report = extract(base, tuned, tmp_path / "lora.safetensors", max_rank=8, svd="exact",
                     **method)  # type: ignore[arg-type]  # fmt: skip
    ranks = {m.module: m.rank for m in report.modules}
    assert ranks["down_blocks.1.resnets.0.conv1"] == 3
    assert ranks["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"] == 2
    assert ranks["text_model.encoder.layers.0.mlp.fc1"] == 2


def test_unchanged_text_encoder_is_left_out_and_counted(
    models: dict[str, TinySD], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """kohya's rule: a text encoder within 0.01 (rounding noise of a UNet-only fine-tune)
    counts as unchanged; --min-te-diff 0 keeps it."""
    model = models["sd1"]
    tuned = tuned_model(model, text=False)
    with torch.no_grad():
        fc1 = _module(tuned.text_encoders[0], "encoder.layers.0.mlp.fc1")
        fc1.weight.add_(0.005)  # type: ignore[operator]
    base = save_ldm(model, tmp_path / "base.safetensors")
    tuned_path = save_ldm(tuned, tmp_path / "tuned.safetensors")
    out = tmp_path / "lora.safetensors"
    code, err = _run(capsys, "extract", base, tuned_path, "-o", out, "--rank", "4")
    assert code == 0, err
    assert "text encoder te left out as unchanged: 1 modules" in err
    assert not any(k.startswith("lora_te") for k in load_file(str(out)))
    report = extract(base, tuned_path, tmp_path / "kept.safetensors", rank=4, min_te_diff=0)
    assert "text_model.encoder.layers.0.mlp.fc1" in {m.module for m in report.modules}
    assert report.unchanged_text == []


def test_peft_format_needs_one_component(models: dict[str, TinySD], tmp_path: Path) -> None:
    model = models["sd1"]
    base = save_ldm(model, tmp_path / "base.safetensors")
    tuned = save_ldm(tuned_model(model, text=False), tmp_path / "tuned.safetensors")
    out = tmp_path / "adapter"
    extract(base, tuned, out, rank=4, output_format="peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == set(_UNET_PLANTS)
    keys = load_file(str(out / "adapter_model.safetensors"))
    assert "base_model.model.down_blocks.1.resnets.0.conv1.lora_A.weight" in keys


def test_bad_inputs_exit_1_with_one_error_line_and_nothing_written(
    models: dict[str, TinySD], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sd1, sdxl = models["sd1"], models["sdxl"]
    base = save_ldm(sd1, tmp_path / "sd1.safetensors")
    tuned = save_ldm(tuned_model(sd1), tmp_path / "tuned.safetensors")
    xl = save_ldm(sdxl, tmp_path / "sdxl.safetensors")
    folder = save_diffusers(sd1, tmp_path / "folder")
    fp8 = save_ldm(sd1, tmp_path / "fp8.safetensors", dtype=torch.float8_e4m3fn)
    missing = load_file(str(tuned))
    name = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    del missing[name]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    cases = [
        (base, xl, "ldm sdxl checkpoint, but the base", "sd1.safetensors"),
        (base, folder, "diffusers sd1 checkpoint, but the base", "folder"),
        (fp8, tuned, "float8 checkpoints are not supported", "fp8.safetensors"),
        (base, tmp_path / "missing.safetensors", "is in the base checkpoint but not in",
         "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
    ]  # fmt: skip
    for base_path, tuned_path, message, named in cases:
        out = tmp_path / "out.safetensors"
        code, err = _run(capsys, "extract", base_path, tuned_path, "-o", out)
        assert code == 1, err
        assert err.startswith("error: ") and len(err.splitlines()) == 1, err
        assert message in err and named in err, err
        assert "Traceback" not in err
        assert not out.exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize(
    "args",
    [
        ["--layers-to-transform", "1"],
        ["--save-modules", "conv_in"],
        ["--rank-method", "energy", "--energy", "0.9", "--conv-rank", "2"],
        ["--exclude-modules", "no_such_module"],
    ],
)
def test_options_that_cannot_apply_are_usage_errors(
    models: dict[str, TinySD], tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    base = save_ldm(models["sd1"], tmp_path / "base.safetensors")
    tuned = save_ldm(tuned_model(models["sd1"]), tmp_path / "tuned.safetensors")
    code, err = _run(capsys, "extract", base, tuned, "-o", tmp_path / "out", *args)
    assert code == 2 and err.startswith("error: "), err
    assert not (tmp_path / "out").exists()


def test_exclude_modules_leaves_a_module_out(models: dict[str, TinySD], tmp_path: Path) -> None:
    model = models["sd1"]
    base = save_ldm(model, tmp_path / "base.safetensors")
    tuned = save_ldm(tuned_model(model), tmp_path / "tuned.safetensors")
    report = extract(base, tuned, tmp_path / "lora.safetensors", rank=4,
                     exclude_modules=["down_blocks.1.resnets.0.conv1"])  # fmt: skip
    assert "down_blocks.1.resnets.0.conv1" not in {m.module for m in report.modules}
    assert any("in_layers.2.weight differs" in n for n in report.notes)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_flux_bfl_file_fused_qkv_as_kohya_split_as_diffusers(tmp_path: Path, fmt: str) -> None:
    """FLUX: kohya names the fused BFL qkv/linear1 (one module), diffusers splits them into
    to_q/to_k/to_v/proj_mlp row slices; both merge back into the BFL base as TUNED. (diffusers
    cannot load FLUX LoRAs at tiny widths, spec: its converter hard-codes 3072.)"""
    state = {k: v.detach().clone() for k, v in tiny_flux().state_dict().items()}
    base = bfl_state(state)
    gen = torch.Generator().manual_seed(3)
    tuned = dict(base)
    for name in ("double_blocks.0.img_attn.qkv.weight", "single_blocks.1.linear1.weight",
                 "double_blocks.1.txt_mlp.2.weight"):  # fmt: skip
        w = base[name]
        tuned[name] = w + 0.05 * torch.randn(w.shape[0], 2, generator=gen) @ torch.randn(
            2, w.shape[1], generator=gen
        )
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    lora = tmp_path / "lora.safetensors"
    report = extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", lora,
                     rank=4, output_format=fmt)  # fmt: skip
    names = {m.module for m in report.modules}
    if fmt == "kohya":
        assert names == {"double_blocks.0.img_attn.qkv", "single_blocks.1.linear1",
                         "double_blocks.1.txt_mlp.2"}  # fmt: skip
    else:
        assert "transformer_blocks.0.attn.to_k" in names
        assert "single_transformer_blocks.1.proj_mlp" in names
        assert "transformer_blocks.1.ff_context.net.2" in names
        assert all(k.startswith("transformer.") for k in load_file(str(lora)))
    lorasurgeon.merge(tmp_path / "base.safetensors", [lora], tmp_path / "merged.safetensors")
    worst = _worst(load_file(str(tmp_path / "merged.safetensors")), tuned)
    assert worst[0] <= _ATOL, f"worst tensor {worst[1]}: {worst[0]:.3g}"


def test_unet_only_folder(models: dict[str, TinySD], tmp_path: Path) -> None:
    """A UNet component folder (diffusion_pytorch_model.safetensors): no text encoder."""
    model = models["sd1"]
    tuned = tuned_model(model)
    model.unet.save_pretrained(tmp_path / "base")
    tuned.unet.save_pretrained(tmp_path / "tuned")
    lora = tmp_path / "lora.safetensors"
    report = extract(tmp_path / "base", tmp_path / "tuned", lora, rank=4)
    assert {m.module for m in report.modules} == set(_UNET_PLANTS)
    lorasurgeon.merge(tmp_path / "base", [lora], tmp_path / "merged")
    merged = load_file(str(tmp_path / "merged" / "diffusion_pytorch_model.safetensors"))
    worst = _worst(merged, tuned.unet_state())
    assert worst[0] <= _ATOL, f"worst tensor {worst[1]}: {worst[0]:.3g}"


def test_a_module_only_in_tuned_is_refused(
    models: dict[str, TinySD], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = models["sd1"]
    base = load_file(str(save_ldm(model, tmp_path / "full.safetensors")))
    name = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_v.weight"
    save_file({k: v for k, v in base.items() if k != name}, str(tmp_path / "base.safetensors"))
    tuned = save_ldm(tuned_model(model), tmp_path / "tuned.safetensors")
    out = tmp_path / "out.safetensors"
    code, err = _run(capsys, "extract", tmp_path / "base.safetensors", tuned, "-o", out)
    assert code == 1 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert "tuned.safetensors: up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v" in err
    assert "is in the tuned checkpoint but not in" in err and not out.exists()
    missing = "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v"
    report = extract(tmp_path / "base.safetensors", tuned, out, rank=4, exclude_modules=[missing])
    assert len(report.modules) == len(_UNET_PLANTS) + len(_TEXT_PLANTS)


def test_diffusion_options_on_transformers_checkpoints_are_usage_errors(
    gpt2: TinyBase, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for args in (["--format", "kohya"], ["--conv-rank", "4"], ["--min-te-diff", "0.1"]):
        code, err = _run(capsys, "extract", gpt2.path, gpt2.path, "-o", tmp_path / "out", *args)
        assert code == 2 and err.startswith("error: ") and "diffusion checkpoints" in err, err


def test_a_non_finite_change_is_refused_by_name(models: dict[str, TinySD], tmp_path: Path) -> None:
    model = models["sd1"]
    base = save_ldm(model, tmp_path / "base.safetensors")
    tuned = tuned_model(model)
    with torch.no_grad():
        _module(tuned.unet, "down_blocks.1.resnets.0.conv1").weight[0, 0, 0, 0] = float("nan")
    tuned_path = save_ldm(tuned, tmp_path / "tuned.safetensors")
    with pytest.raises(lorasurgeon.IncompatibleError, match="not finite") as caught:
        extract(base, tuned_path, tmp_path / "lora.safetensors", rank=4)
    assert caught.value.tensor == "down_blocks.1.resnets.0.conv1"
    assert not (tmp_path / "lora.safetensors").exists()

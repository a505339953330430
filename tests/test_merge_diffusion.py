"""merge with diffusion LoRA files: every format into every applicable base layout of tiny
random SD1/SD2/SDXL/FLUX models, against diffusers' load_lora_weights + fuse_lora on an fp32
pipeline mapped to the base's layout; where diffusers is wrong (spec V03b) or cannot read the
file (LyCORIS, FLUX at tiny widths), against the spec's formula computed here in float64."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lorasurgeon
from lorasurgeon.cli import main
from tests.sd_models import (
    TinySD,
    bfl_state,
    ldm_names,
    open_clip,
    save_ldm,
    sd_kohya_modules,
    tiny_flux,
    tiny_sd,
    write_kohya,
)

_TEXT_ROOTS = {  # family -> [(LDM prefix, OpenCLIP?)] per text encoder
    "sd1": [("cond_stage_model.transformer.", False)],
    "sd2": [("cond_stage_model.model.", True)],
    "sdxl": [
        ("conditioner.embedders.0.transformer.", False),
        ("conditioner.embedders.1.model.", True),
    ],
}


@pytest.fixture(scope="module")
def models() -> dict[str, TinySD]:
    return {family: tiny_sd(family) for family in ("sd1", "sd2", "sdxl")}


def _pipeline(model: TinySD) -> object:
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    parts = dict(
        vae=copy.deepcopy(model.vae), unet=copy.deepcopy(model.unet), scheduler=DDIMScheduler()
    )
    if model.family == "sdxl":
        return StableDiffusionXLPipeline(
            text_encoder=copy.deepcopy(model.text_encoders[0]),
            text_encoder_2=copy.deepcopy(model.text_encoders[1]),
            tokenizer=None,
            tokenizer_2=None,
            **parts,
        )
    return StableDiffusionPipeline(
        text_encoder=copy.deepcopy(model.text_encoders[0]),
        tokenizer=None,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        **parts,
    )


def _text_state(encoder: nn.Module) -> dict[str, torch.Tensor]:
    return {
        (k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
        for k, v in encoder.state_dict().items()
    }


def diffusers_fused_ldm(model: TinySD, lora: Path, scale: float) -> dict[str, torch.Tensor]:
    """diffusers' fuse_lora(lora_scale=scale) of ``lora`` on an fp32 pipeline, renamed to the
    LDM layout of ``save_ldm`` (UNet by spec §2.2, OpenCLIP text encoders fused)."""
    pipe = _pipeline(model)
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()
    unet = pipe.unet.state_dict()
    out = {
        "model.diffusion_model." + ldm: unet[name] for name, ldm in ldm_names(list(unet)).items()
    }
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if model.family == "sdxl" else [])
    for (prefix, oc), encoder in zip(_TEXT_ROOTS[model.family], encoders, strict=True):
        state = _text_state(encoder)
        out |= {prefix + k: v for k, v in (open_clip(state) if oc else state).items()}
    return out


def assert_merged(
    out: Path, base: Path, expected: Mapping[str, torch.Tensor], *, atol: float = 1e-6
) -> None:
    """Every expected tensor matches (worst one named), every other tensor is bit-identical
    to the base's."""
    got, original = load_file(str(out)), load_file(str(base))
    assert set(got) == set(original)
    worst = max(((got[k].double() - v.double()).abs().max().item(), k) for k, v in expected.items())
    assert worst[0] <= atol, f"worst tensor {worst[1]}: max abs error {worst[0]:.3g} > {atol}"
    for name in set(got) - set(expected):
        assert torch.equal(got[name], original[name]), name


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_kohya_locon_into_ldm_file_equals_diffusers_fuse(
    models: dict[str, TinySD], tmp_path: Path, family: str
) -> None:
    """Attention, 3×3/1×1 LoCon convs and every text encoder (OpenCLIP q/k/v into in_proj row
    slices); one alpha for all modules, where diffusers is right (spec V03-V06)."""
    model = models[family]
    base = save_ldm(model, tmp_path / "base.safetensors")
    lora = write_kohya(tmp_path / "lora.safetensors", sd_kohya_modules(model), rank=4, alpha=2.0)
    report = lorasurgeon.merge(base, [lora], tmp_path / "out.safetensors", weights=[0.7])
    expected = diffusers_fused_ldm(model, lora, 0.7)
    changed = {k: v for k, v in expected.items() if not torch.equal(v, load_file(str(base))[k])}
    fused_qkv = 3 * model.text_encoders[-1].config.num_hidden_layers if family != "sd1" else 0
    assert report.changed == len(changed) == len(sd_kohya_modules(model)) - 2 * fused_qkv // 3
    assert_merged(tmp_path / "out.safetensors", base, expected)


def test_diffusers_peft_file_with_metadata_equals_diffusers_fuse(
    models: dict[str, TinySD], tmp_path: Path
) -> None:
    """A diffusers save_lora_weights file (lora_alpha 8, r 4, alpha_pattern) into an LDM SD1
    file: scaling from lora_adapter_metadata, as diffusers applies it (spec V07)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = models["sd1"]
    unet = copy.deepcopy(model.unet)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["to_q", "to_v", "proj_in", "conv1", "conv_shortcut"],
        alpha_pattern={"conv1": 2},
    )
    unet.add_adapter(config)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=config.to_dict(),
    )
    lora = tmp_path / "pytorch_lora_weights.safetensors"
    base = save_ldm(model, tmp_path / "base.safetensors")
    lorasurgeon.merge(base, [lora], tmp_path / "out.safetensors", weights=[0.5])
    assert_merged(tmp_path / "out.safetensors", base, diffusers_fused_ldm(model, lora, 0.5))


def _formula(
    base: Mapping[str, torch.Tensor],
    lora: Mapping[str, torch.Tensor],
    targets: Mapping[str, str],
    m: float,
) -> dict[str, torch.Tensor]:
    """Spec §1.2 in float64: W + m·(α/r)·B@A (α = r when absent), per kohya module."""
    out = {}
    for module, tensor in targets.items():
        down, up = (
            lora[f"{module}.lora_down.weight"].double(),
            lora[f"{module}.lora_up.weight"].double(),
        )
        rank = down.shape[0]
        alpha = lora[f"{module}.alpha"].item() if f"{module}.alpha" in lora else rank
        delta = (up.flatten(1) @ down.flatten(1)).reshape(base[tensor].shape)
        out[tensor] = (base[tensor].double() + m * alpha / rank * delta).float()
    return out


def test_per_module_alphas_follow_the_kohya_formula_where_diffusers_is_wrong(
    models: dict[str, TinySD], tmp_path: Path
) -> None:
    """Spec V03b: with alphas varying per module (and one module without alpha), diffusers
    merges attention and text-encoder modules with the most common alpha; the kohya formula
    (sd-scripts, ComfyUI, WebUI) is the oracle here, and diffusers is shown to differ."""
    model = models["sd1"]
    modules = sd_kohya_modules(model)
    lora_path = write_kohya(tmp_path / "lora.safetensors", modules, rank=4, alpha=2.0)
    lora = load_file(str(lora_path))
    for i, name in enumerate(modules):
        lora[f"{name}.alpha"] = torch.tensor(1.0 + i % 5, dtype=torch.float16)
    del lora[f"{next(iter(modules))}.alpha"]
    save_file(lora, str(lora_path))
    base = save_ldm(model, tmp_path / "base.safetensors")
    lorasurgeon.merge(base, [lora_path], tmp_path / "out.safetensors", weights=[0.8])
    layout = lorasurgeon_targets(base, lora_path)
    expected = _formula(load_file(str(base)), lora, layout, 0.8)
    assert_merged(tmp_path / "out.safetensors", base, expected)
    fused = diffusers_fused_ldm(model, lora_path, 0.8)
    wrong = [t for t, v in expected.items() if not torch.allclose(fused[t], v, atol=1e-5)]
    assert wrong, "diffusers now gets per-module alphas right: V03b no longer holds"


def lorasurgeon_targets(base: Path, lora: Path) -> dict[str, str]:
    """kohya module -> the one LDM tensor it changes (OpenCLIP slices excluded: not in SD1)."""
    from lorasurgeon.formats import read_lora
    from lorasurgeon.layouts import open_layout, resolve_updates

    resolution = resolve_updates(open_layout(base), read_lora(lora))
    return {u.source: t.pieces[0].tensor for u, t in resolution.matched}


def test_lycoris_modules_merge_as_lycoris_computes_them(
    models: dict[str, TinySD], tmp_path: Path
) -> None:
    """LoHa, LoHa Tucker, LoKr, LoCon Tucker and full modules (which diffusers' SD loader cannot
    read) against lycoris-lora's own weight computation."""
    lycoris = pytest.importorskip("lycoris.functional")
    model = models["sd1"]
    base = save_ldm(model, tmp_path / "base.safetensors")
    state = load_file(str(base))
    prefix = "model.diffusion_model."
    gen = torch.Generator().manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.2

    q = "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # (32, 32)
    conv = "down_blocks_2_resnets_0_conv1"  # (64, 32, 3, 3)
    ff = "up_blocks_1_attentions_0_transformer_blocks_0_ff_net_2"  # (64, 256)
    conv2 = "down_blocks_2_resnets_0_conv2"  # (64, 64, 3, 3)
    proj = "down_blocks_2_attentions_0_proj_out"  # (64, 64, 1, 1)
    lora = {
        f"lora_unet_{q}.hada_w1_a": r(32, 2),
        f"lora_unet_{q}.hada_w1_b": r(2, 32),
        f"lora_unet_{q}.hada_w2_a": r(32, 2),
        f"lora_unet_{q}.hada_w2_b": r(2, 32),
        f"lora_unet_{q}.alpha": torch.tensor(1.0),
        f"lora_unet_{conv}.hada_w1_a": r(2, 64),
        f"lora_unet_{conv}.hada_w1_b": r(2, 32),
        f"lora_unet_{conv}.hada_t1": r(2, 2, 3, 3),
        f"lora_unet_{conv}.hada_w2_a": r(2, 64),
        f"lora_unet_{conv}.hada_w2_b": r(2, 32),
        f"lora_unet_{conv}.hada_t2": r(2, 2, 3, 3),
        f"lora_unet_{conv}.alpha": torch.tensor(3.0),
        f"lora_unet_{ff}.lokr_w1": r(4, 8),
        f"lora_unet_{ff}.lokr_w2_a": r(16, 2),
        f"lora_unet_{ff}.lokr_w2_b": r(2, 32),
        f"lora_unet_{ff}.alpha": torch.tensor(1.0),
        f"lora_unet_{conv2}.lora_down.weight": r(3, 64, 1, 1),
        f"lora_unet_{conv2}.lora_mid.weight": r(3, 3, 3, 3),
        f"lora_unet_{conv2}.lora_up.weight": r(64, 3, 1, 1),
        f"lora_unet_{conv2}.alpha": torch.tensor(2.0),
        f"lora_unet_{proj}.diff": r(64, 64, 1, 1),
        f"lora_unet_{proj}.diff_b": r(64),
    }
    save_file(lora, str(tmp_path / "lyco.safetensors"))
    lorasurgeon.merge(
        base, [tmp_path / "lyco.safetensors"], tmp_path / "out.safetensors", weights=[0.6]
    )
    f = {k.split(".", 1)[1] if k.startswith(f"lora_unet_{q}") else k: v for k, v in lora.items()}
    loha = lycoris.loha.diff_weight(
        f["hada_w1_b"], f["hada_w1_a"], f["hada_w2_b"], f["hada_w2_a"], None, None, gamma=0.5
    )
    c = {k.split(".", 1)[1]: v for k, v in lora.items() if k.startswith(f"lora_unet_{conv}.")}
    loha_t = lycoris.loha.diff_weight(
        c["hada_w1_b"],
        c["hada_w1_a"],
        c["hada_w2_b"],
        c["hada_w2_a"],
        c["hada_t1"],
        c["hada_t2"],
        gamma=1.5,
    )
    k = {k.split(".", 1)[1]: v for k, v in lora.items() if k.startswith(f"lora_unet_{ff}.")}
    lokr = lycoris.lokr.kron_weight(
        k["lokr_w1"], None, None, None, k["lokr_w2_a"], k["lokr_w2_b"], None, scale=0.5
    )
    t = {k.split(".", 1)[1]: v for k, v in lora.items() if k.startswith(f"lora_unet_{conv2}.")}
    tucker = lycoris.locon.diff_weight(
        t["lora_down.weight"], t["lora_up.weight"], t["lora_mid.weight"], gamma=2 / 3
    )
    ldm = [  # the LDM paths of q, conv, ff, conv2 and proj (spec §2.2)
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
        "input_blocks.7.0.in_layers.2",
        "output_blocks.3.1.transformer_blocks.0.ff.net.2",
        "input_blocks.7.0.out_layers.3",
        "input_blocks.7.1.proj_out",
    ]
    deltas = [loha, loha_t, lokr, tucker, lora[f"lora_unet_{proj}.diff"]]
    expected = {}
    for path, delta in zip(ldm, deltas, strict=True):
        w = state[f"{prefix}{path}.weight"]
        expected[f"{prefix}{path}.weight"] = (
            w.double() + 0.6 * delta.double().reshape(w.shape)
        ).float()
    bias = f"{prefix}input_blocks.7.1.proj_out.bias"
    expected[bias] = (
        state[bias].double() + 0.6 * lora[f"lora_unet_{proj}.diff_b"].double()
    ).float()
    assert_merged(tmp_path / "out.safetensors", base, expected, atol=2e-6)


@pytest.fixture(scope="module")
def flux() -> nn.Module:
    return tiny_flux()


def test_flux_kohya_and_diffusers_files_into_a_bfl_file(flux: nn.Module, tmp_path: Path) -> None:
    """kohya FLUX (BFL names, fused qkv/linear1) and diffusers FLUX (split to_q/to_k/to_v,
    proj_mlp, norm_out.linear's swapped halves) LoRAs, merged together into a BFL file with
    the model.diffusion_model. prefix, equal the formula applied in diffusers space and then
    fused into BFL paths. (diffusers' own FLUX converters hard-code the released width.)"""
    state = {k: v.detach().clone() for k, v in flux.state_dict().items()}
    bfl = {"model.diffusion_model." + k: v for k, v in bfl_state(state).items()}
    save_file(bfl, str(tmp_path / "flux.safetensors"))
    gen = torch.Generator().manual_seed(1)
    diffusers_lora, kohya_lora = {}, {}
    expected_d = {k: v.double() for k, v in state.items()}
    for name in (
        "single_transformer_blocks.0.attn.to_k",
        "single_transformer_blocks.1.proj_mlp",
        "transformer_blocks.0.attn.add_v_proj",
        "norm_out.linear",
        "transformer_blocks.1.ff.net.2",
    ):
        w = state[name + ".weight"]
        a, b = torch.randn(2, w.shape[1], generator=gen), torch.randn(w.shape[0], 2, generator=gen)
        (
            diffusers_lora[f"transformer.{name}.lora_A.weight"],
            diffusers_lora[f"transformer.{name}.lora_B.weight"],
        ) = a, b
        expected_d[name + ".weight"] += 0.9 * (b.double() @ a.double())  # no metadata: s = 1
    save_file(diffusers_lora, str(tmp_path / "diffusers.safetensors"))
    expected = {"model.diffusion_model." + k: v.float() for k, v in bfl_state(expected_d).items()}
    for name in ("double_blocks_1_img_attn_qkv", "single_blocks_0_linear1", "final_layer_linear"):
        tensor = (
            "model.diffusion_model."
            + {
                "double_blocks_1_img_attn_qkv": "double_blocks.1.img_attn.qkv",
                "single_blocks_0_linear1": "single_blocks.0.linear1",
                "final_layer_linear": "final_layer.linear",
            }[name]
            + ".weight"
        )
        w = expected[tensor]
        a, b = torch.randn(3, w.shape[1], generator=gen), torch.randn(w.shape[0], 3, generator=gen)
        kohya_lora |= {
            f"lora_unet_{name}.lora_down.weight": a,
            f"lora_unet_{name}.lora_up.weight": b,
            f"lora_unet_{name}.alpha": torch.tensor(1.5),
        }
        expected[tensor] = (w.double() + 0.5 * 0.5 * (b.double() @ a.double())).float()
    save_file(kohya_lora, str(tmp_path / "kohya.safetensors"))
    out = tmp_path / "out.safetensors"
    lorasurgeon.merge(
        tmp_path / "flux.safetensors",
        [tmp_path / "diffusers.safetensors", tmp_path / "kohya.safetensors"],
        out,
        weights=[0.9, 0.5],
    )
    changed = {k: v for k, v in expected.items() if not torch.equal(v, bfl[k])}
    assert len(changed) == 7
    assert_merged(out, tmp_path / "flux.safetensors", changed, atol=1e-5)


def test_text_weight_and_unet_weight_are_separate(
    models: dict[str, TinySD], tmp_path: Path
) -> None:
    """--te-weight 0 leaves every text-encoder tensor bit-identical; the UNet merges at
    --weight; a separate TE strength gives the TE tensors of a run at that weight."""
    model = models["sd1"]
    base = save_ldm(model, tmp_path / "base.safetensors")
    lora = write_kohya(tmp_path / "lora.safetensors", sd_kohya_modules(model))
    lorasurgeon.merge(base, [lora], tmp_path / "a.safetensors", weights=[0.7], te_weights=[0.0])
    lorasurgeon.merge(base, [lora], tmp_path / "b.safetensors", weights=[0.7], te_weights=[1.3])
    lorasurgeon.merge(base, [lora], tmp_path / "c.safetensors", weights=[1.3])
    a, b, c, original = (
        load_file(str(tmp_path / n))
        for n in ("a.safetensors", "b.safetensors", "c.safetensors", "base.safetensors")
    )
    fused = diffusers_fused_ldm(model, lora, 0.7)
    for name in original:
        if name.startswith("cond_stage_model."):
            assert torch.equal(a[name], original[name]) and torch.equal(b[name], c[name]), name
        elif name.startswith("model.diffusion_model."):
            assert torch.allclose(a[name], fused[name], atol=1e-6) and torch.equal(
                a[name], b[name]
            ), name


def _run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exited:
        main([str(a) for a in args])
    _, err = capsys.readouterr()
    return int(exited.value.code or 0), err


def test_unet_only_folder_skips_or_refuses_text_encoder_modules(
    models: dict[str, TinySD], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = models["sd1"]
    model.unet.save_pretrained(tmp_path / "unet")
    lora = write_kohya(tmp_path / "lora.safetensors", sd_kohya_modules(model))
    code, err = _run(capsys, "merge", tmp_path / "unet", lora, "-o", tmp_path / "out")
    assert code == 1 and err.startswith("error: ") and "base has no such text encoder" in err
    assert (
        "lora_te_text_model_encoder" in err
        and "Traceback" not in err
        and len(err.splitlines()) == 1
    )
    assert not (tmp_path / "out").exists()
    code, err = _run(
        capsys,
        "merge",
        tmp_path / "unet",
        lora,
        "-o",
        tmp_path / "out",
        "--skip-text-encoder",
        "--weight",
        "0.7",
    )
    assert code == 0 and "18 text-encoder module(s) left out" in err
    got = load_file(str(tmp_path / "out" / "diffusion_pytorch_model.safetensors"))
    fused = diffusers_fused_ldm(model, lora, 0.7)
    to_ldm = ldm_names(list(got))
    worst = max(
        (got[k] - fused["model.diffusion_model." + to_ldm[k]]).abs().max().item() for k in got
    )
    assert worst <= 1e-6
    assert (tmp_path / "out" / "config.json").read_text() == (
        tmp_path / "unet" / "config.json"
    ).read_text()


def test_bad_inputs_exit_1_with_one_error_line_and_nothing_written(
    models: dict[str, TinySD], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sd1, sdxl = models["sd1"], models["sdxl"]
    base = save_ldm(sd1, tmp_path / "sd1.safetensors")
    fp8 = save_ldm(sd1, tmp_path / "fp8.safetensors", dtype=torch.float8_e4m3fn)
    xl_lora = write_kohya(tmp_path / "xl.safetensors", sd_kohya_modules(sdxl))
    sd1_lora = write_kohya(tmp_path / "sd1-lora.safetensors", sd_kohya_modules(sd1))
    mixed = load_file(str(sd1_lora)) | {
        "unet.x.lora_A.weight": torch.ones(2, 2),
        "unet.x.lora_B.weight": torch.ones(2, 2),
    }
    save_file(mixed, str(tmp_path / "mixed.safetensors"))
    cases = [
        (base, xl_lora, "a sdxl LoRA does not fit this sd1 base"),
        (fp8, sd1_lora, "float8 checkpoints are not supported"),
        (base, tmp_path / "mixed.safetensors", "the file mixes formats"),
    ]
    for base_path, lora, message in cases:
        out = tmp_path / "out.safetensors"
        code, err = _run(capsys, "merge", base_path, lora, "-o", out)
        assert code == 1, err
        assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
        assert str(lora.name) in err or str(base_path.name) in err
        assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_text_options_with_peft_adapters_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fixtures = Path(__file__).parent.parent / "fixtures"
    code, err = _run(
        capsys,
        "merge",
        fixtures / "base",
        fixtures / "adapter",
        "-o",
        tmp_path / "o",
        "--skip-text-encoder",
    )
    assert code == 2 and "apply to diffusion LoRA files only" in err


@pytest.mark.parametrize("axis", ["output", "input"])
def test_kohya_dora_follows_the_weight_decompose_formula(
    models: dict[str, TinySD], tmp_path: Path, axis: str
) -> None:
    """LyCORIS DoRA (dora_scale): W + m·(g·(W + sΔ)/‖W + sΔ‖ − W), the norm per output row
    (LyCORIS ≥ 3.1.1) or per input column (older files), spec §1.5. diffusers drops
    dora_scale, so the formula, in float64, is the oracle."""
    model = models["sd1"]
    base = save_ldm(model, tmp_path / "base.safetensors")
    state = load_file(str(base))
    gen = torch.Generator().manual_seed(2)
    modules = {
        "down_blocks_2_resnets_0_conv1": "input_blocks.7.0.in_layers.2",
        "down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v": (
            "input_blocks.1.1.transformer_blocks.0.attn2.to_v"
        ),
    }
    lora, expected = {}, {}
    for module, path in modules.items():
        w = state[f"model.diffusion_model.{path}.weight"].double()
        down = torch.randn(4, *w.shape[1:], generator=gen) * 0.1
        up = torch.randn(w.shape[0], 4, *([1] * (w.dim() - 2)), generator=gen) * 0.1
        g_shape = (w.shape[0], *([1] * (w.dim() - 1))) if axis == "output" else (1, *w.shape[1:])
        g = torch.rand(*g_shape, generator=gen) + 0.5
        lora |= {
            f"lora_unet_{module}.lora_down.weight": down,
            f"lora_unet_{module}.lora_up.weight": up,
            f"lora_unet_{module}.alpha": torch.tensor(2.0),
            f"lora_unet_{module}.dora_scale": g,
        }
        merged = w + 0.5 * (up.double().flatten(1) @ down.double().flatten(1)).reshape(w.shape)
        flat = merged.reshape(w.shape[0], -1)
        norm = (
            flat.norm(dim=1).reshape(g_shape)
            if axis == "output"
            else flat.norm(dim=0).reshape(g_shape)
        )
        expected[f"model.diffusion_model.{path}.weight"] = (
            w + 0.7 * (g.double() * merged / norm - w)
        ).float()
    save_file(lora, str(tmp_path / "dora.safetensors"))
    lorasurgeon.merge(
        base, [tmp_path / "dora.safetensors"], tmp_path / "out.safetensors", weights=[0.7]
    )
    assert_merged(tmp_path / "out.safetensors", base, expected, atol=2e-6)


def test_flux_kohya_file_into_a_diffusers_transformer_splits_fused_deltas(
    flux: nn.Module, tmp_path: Path
) -> None:
    """A kohya FLUX LoRA on fused qkv/linear1 merged into a diffusers FLUX transformer file:
    the fused delta's rows are split over to_q/to_k/to_v(/proj_mlp), i.e. the merged BFL
    weights (formula, float64) read back through the BFL layout equal our output."""
    state = {k: v.detach().clone() for k, v in flux.state_dict().items()}
    save_file(state, str(tmp_path / "flux-diffusers.safetensors"))
    bfl = bfl_state(state)
    gen = torch.Generator().manual_seed(3)
    lora, merged_bfl = {}, {k: v.double() for k, v in bfl.items()}
    for name in (
        "double_blocks.0.txt_attn.qkv",
        "single_blocks.1.linear1",
        "final_layer.adaLN_modulation.1",
    ):
        w = bfl[name + ".weight"]
        a, b = torch.randn(2, w.shape[1], generator=gen), torch.randn(w.shape[0], 2, generator=gen)
        kohya = "lora_unet_" + name.replace(".", "_")
        lora |= {
            f"{kohya}.lora_down.weight": a,
            f"{kohya}.lora_up.weight": b,
            f"{kohya}.alpha": torch.tensor(1.0),
        }
        merged_bfl[name + ".weight"] += 0.8 * 0.5 * (b.double() @ a.double())
    save_file(lora, str(tmp_path / "kohya.safetensors"))
    out = tmp_path / "out.safetensors"
    lorasurgeon.merge(
        tmp_path / "flux-diffusers.safetensors",
        [tmp_path / "kohya.safetensors"],
        out,
        weights=[0.8],
    )
    got = bfl_state(load_file(str(out)))
    worst = max((got[k].double() - v).abs().max().item() for k, v in merged_bfl.items())
    assert worst <= 1e-6
    original = load_file(str(tmp_path / "flux-diffusers.safetensors"))
    changed = [k for k, v in load_file(str(out)).items() if not torch.equal(v, original[k])]
    assert len(changed) == 3 + 4 + 1  # add_q/k/v_proj; to_q/k/v + proj_mlp; norm_out.linear


def test_old_diffusers_file_from_diffusers_own_kohya_conversion(
    models: dict[str, TinySD], tmp_path: Path
) -> None:
    """diffusers' kohya converter writes the old attention-processor spelling (spec V12) with
    its alphas as ``….alpha`` / ``….down.weight.alpha`` entries; that file merges like the
    kohya file it came from, which equals diffusers' fuse_lora (one alpha)."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers

    model = models["sd1"]
    base = save_ldm(model, tmp_path / "base.safetensors")
    kohya = write_kohya(tmp_path / "kohya.safetensors", sd_kohya_modules(model), rank=4, alpha=2.0)
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(load_file(str(kohya)))
    assert any(".processor.to_q_lora.down.weight" in k for k in converted)
    stored = converted | {k: torch.tensor(v) for k, v in alphas.items()}
    save_file({k: v.contiguous() for k, v in stored.items()}, str(tmp_path / "old.safetensors"))
    lorasurgeon.merge(
        base, [tmp_path / "old.safetensors"], tmp_path / "out.safetensors", weights=[0.6]
    )
    assert_merged(tmp_path / "out.safetensors", base, diffusers_fused_ldm(model, kohya, 0.6))


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_folder_merged_component_by_component(
    models: dict[str, TinySD], tmp_path: Path, family: str
) -> None:
    """A diffusers pipeline folder: unet/ and each text encoder merged (fp16 variant files
    chosen when they are the only ones), everything else (vae/, model_index.json) copied byte
    for byte, the same layout out as in; equal to diffusers' fuse_lora."""
    from tests.sd_models import save_diffusers

    model = models[family]
    base = save_diffusers(model, tmp_path / "base")
    lora = write_kohya(tmp_path / "lora.safetensors", sd_kohya_modules(model))
    out = tmp_path / "out"
    lorasurgeon.merge(base, [lora], out, weights=[0.6])
    pipe = _pipeline(model)
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora(lora_scale=0.6)
    pipe.unload_lora_weights()
    parts = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    if family == "sdxl":
        parts["text_encoder_2"] = pipe.text_encoder_2
    for name, module in parts.items():
        file = "diffusion_pytorch_model.safetensors" if name == "unet" else "model.safetensors"
        got, expected = load_file(str(out / name / file)), module.state_dict()
        assert set(got) == set(expected)
        worst = max((got[k] - expected[k]).abs().max().item() for k in got)
        assert worst <= 1e-6, (name, worst)
        assert (out / name / "config.json").read_bytes() == (
            base / name / "config.json"
        ).read_bytes()
    for path in (base / "vae").iterdir():
        assert (out / "vae" / path.name).read_bytes() == path.read_bytes()
    assert (out / "model_index.json").read_bytes() == (base / "model_index.json").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    record = json.loads((out / "lorasurgeon.json").read_text())
    merged = {e["name"]: e["sha256"] for e in record["outputs"]}
    assert set(merged) == {f"{n}/{f}" for n, f in _weight_files(out, parts)}
    for name, digest in merged.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    assert not list(out.glob("*/lorasurgeon.json"))  # one record, at the folder's top


def _weight_files(out: Path, parts: dict[str, object]) -> list[tuple[str, str]]:
    return [(n, p.name) for n in parts for p in (out / n).glob("*.safetensors")]


def test_diffusers_folder_failure_leaves_nothing(
    models: dict[str, TinySD], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure after the components are written (here: copying vae/) leaves no OUT and no
    staging directory; an existing OUT with overwrite stays as it was."""
    from lorasurgeon import merge_diffusion
    from tests.sd_models import save_diffusers

    model = models["sd1"]
    base = save_diffusers(model, tmp_path / "base")
    lora = write_kohya(tmp_path / "lora.safetensors", sd_kohya_modules(model))

    def fail(source: Path, target: Path, out: Path) -> None:
        raise lorasurgeon.OutputError("disk full", path=out)

    monkeypatch.setattr(merge_diffusion, "_copy_entry", fail)
    with pytest.raises(lorasurgeon.OutputError):
        lorasurgeon.merge(base, [lora], tmp_path / "out", weights=[0.6])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "lora.safetensors"]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("old")
    (tmp_path / "out" / "model_index.json").write_text("{}")  # an earlier pipeline output
    with pytest.raises(lorasurgeon.OutputError):
        lorasurgeon.merge(base, [lora], tmp_path / "out", weights=[0.6], overwrite=True)
    assert (tmp_path / "out" / "keep").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "lora.safetensors", "out"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep", "model_index.json"]


def _peft_dora(module: nn.Module, targets: list[str]) -> nn.Module:
    """A copy of ``module`` with a PEFT DoRA LoRA (r 4, alpha 8) on ``targets``: non-zero
    lora_B, magnitudes moved off the base's norms."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True)
    module = inject_adapter_in_model(config, copy.deepcopy(module))
    module.peft_config = {"default": config}
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
            elif "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.2 * torch.rand_like(p))
    return module


def _dora_layers(module: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT's saved names: no adapter name, the magnitude bare (``lora_magnitude_vector``)."""
    return {
        name.replace(".default", "").replace("vector.weight", "vector"): p.detach().clone()
        for name, p in module.named_parameters()
        if "lora_" in name
    }


def _peft_fused(module: nn.Module, scale: float) -> dict[str, torch.Tensor]:
    """PEFT's own merge after scale_layer(scale): what diffusers' fuse_lora(lora_scale) does."""
    from peft.tuners.lora import LoraLayer

    module = copy.deepcopy(module)
    for layer in module.modules():
        if isinstance(layer, LoraLayer):
            layer.scale_layer(scale)
            layer.merge()
    return {
        k.replace(".base_layer", ""): v for k, v in module.state_dict().items() if "lora_" not in k
    }


def _dora_file(model: TinySD, tmp_path: Path, *, text: bool = True) -> tuple[Path, list[nn.Module]]:
    """A diffusers save_lora_weights file of PEFT DoRA LoRAs on UNet attention and a 3×3 conv
    and (``text``) the first text encoder's q_proj and fc1; also the PEFT-wrapped modules."""
    from diffusers import StableDiffusionPipeline

    unet = _peft_dora(model.unet, ["to_q", "to_v", "conv1"])
    kwargs: dict[str, object] = {}
    wrapped = [unet]
    if text:
        encoder = _peft_dora(model.text_encoders[0], ["q_proj", "fc1"])
        wrapped.append(encoder)
        kwargs = {
            "text_encoder_lora_layers": _dora_layers(encoder),
            "text_encoder_lora_adapter_metadata": encoder.peft_config["default"].to_dict(),
        }
    StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=_dora_layers(unet),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        **kwargs,
    )
    return tmp_path / "pytorch_lora_weights.safetensors", wrapped


def test_diffusers_dora_file_equals_peft_and_diffusers_fuse(
    models: dict[str, TinySD], tmp_path: Path
) -> None:
    """A diffusers DoRA file (lora_magnitude_vector) into an LDM SD1 file: PEFT's DoRA merge
    of W + m·s·Δ on Linear and 3×3 conv modules of the UNet and the text encoder, equal to
    PEFT's own merge after scale_layer(m) and, for the UNet, to diffusers' fuse_lora(m).
    (diffusers 0.42 with transformers 5 drops text-encoder magnitudes when loading: there PEFT
    is the only oracle.)"""
    model = models["sd1"]
    lora, (unet, encoder) = _dora_file(model, tmp_path)
    assert any(k.endswith("lora_magnitude_vector") for k in load_file(str(lora)))
    base = save_ldm(model, tmp_path / "base.safetensors")
    lorasurgeon.merge(base, [lora], tmp_path / "out.safetensors", weights=[0.7])
    fused_unet = _peft_fused(unet, 0.7)
    expected = {
        "model.diffusion_model." + ldm: fused_unet[name]
        for name, ldm in ldm_names(list(fused_unet)).items()
    }
    expected |= {
        "cond_stage_model.transformer." + k: v
        for k, v in _text_state_of(_peft_fused(encoder, 0.7)).items()
    }
    original = load_file(str(base))
    changed = {k: v for k, v in expected.items() if not torch.equal(v, original[k])}
    assert any("in_layers.2" in k for k in changed) and any("attn1.to_q" in k for k in changed)
    assert any("q_proj" in k for k in changed) and any("fc1" in k for k in changed)
    assert_merged(tmp_path / "out.safetensors", base, changed, atol=2e-6)
    by_diffusers = diffusers_fused_ldm(model, lora, 0.7)
    got = load_file(str(tmp_path / "out.safetensors"))
    for name in (k for k in changed if k.startswith("model.diffusion_model.")):
        torch.testing.assert_close(got[name], by_diffusers[name], rtol=0, atol=2e-6)


def _text_state_of(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        (k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
        for k, v in state.items()
    }


def test_diffusers_dora_on_a_fused_tensor_or_unmerged_is_refused(
    models: dict[str, TinySD], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """DoRA rescales whole rows: onto SD2's fused OpenCLIP in_proj (q_proj rows) it is an
    error naming the file and module, and nothing is written; --unmerge likewise."""
    model = models["sd2"]
    lora, _ = _dora_file(model, tmp_path)
    base = save_ldm(model, tmp_path / "base.safetensors")
    out = tmp_path / "out.safetensors"
    code, err = _run(capsys, "merge", base, lora, "-o", out)
    assert code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "q_proj" in err and lora.name in err and not out.exists()
    unet_only, _ = _dora_file(model, tmp_path / "u", text=False)
    code, err = _run(capsys, "merge", base, unet_only, "-o", out, "--unmerge")
    assert code == 1 and "cannot be undone" in err and not out.exists()


def test_diffusers_file_with_lora_bias_adds_the_bias_delta(
    models: dict[str, TinySD], tmp_path: Path
) -> None:
    """A diffusers file of a lora_bias LoRA (lora_B.bias) into an LDM SD1 file: the base
    bias gets m·s·lora_B.bias as in PEFT's merge after scale_layer(m), on Linear and conv
    modules, weights as usual."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model

    model = models["sd1"]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_out.0", "conv1"], lora_bias=True)
    unet = inject_adapter_in_model(config, copy.deepcopy(model.unet))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    layers = _dora_layers(unet)
    assert any(k.endswith("lora_B.bias") for k in layers)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=layers, unet_lora_adapter_metadata=config.to_dict()
    )
    lora = tmp_path / "pytorch_lora_weights.safetensors"
    base = save_ldm(model, tmp_path / "base.safetensors")
    lorasurgeon.merge(base, [lora], tmp_path / "out.safetensors", weights=[0.7])
    fused = _peft_fused(unet, 0.7)
    expected = {
        "model.diffusion_model." + ldm: fused[name] for name, ldm in ldm_names(list(fused)).items()
    }
    original = load_file(str(base))
    changed = {k: v for k, v in expected.items() if not torch.equal(v, original[k])}
    assert any(k.endswith("to_out.0.bias") for k in changed)
    assert any(k.endswith("in_layers.2.bias") for k in changed)
    assert_merged(tmp_path / "out.safetensors", base, changed, atol=2e-6)

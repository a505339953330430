"""Base layouts: LDM/SGM single files, diffusers folders, UNet-only files and FLUX files of tiny
random SD1-, SD2-, SDXL- and FLUX-shaped models, detected from their keys, with every kohya
and diffusers module name resolved to the right base tensor (compared by value)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lorasurgeon.errors import IncompatibleError, OptionError
from lorasurgeon.formats import Component, Family, mangle, read_lora
from lorasurgeon.layouts import LayoutKind, Target, open_layout, resolve_updates
from lorasurgeon.reader import open_checkpoint
from tests.sd_models import (
    UNET_TARGETS,
    TinySD,
    bfl_state,
    kohya_modules,
    ldm_state,
    ldm_unet,
    open_clip,
    save_diffusers,
    save_ldm,
    sd_kohya_modules,
    tiny_flux,
    tiny_sd,
    write_kohya,
)


@pytest.fixture(scope="module")
def models() -> dict[str, TinySD]:
    return {family: tiny_sd(family) for family in ("sd1", "sd2", "sdxl")}


@pytest.fixture(scope="module")
def flux() -> nn.Module:
    return tiny_flux()


@pytest.fixture(scope="module")
def bases(
    tmp_path_factory: pytest.TempPathFactory, models: dict[str, TinySD], flux: nn.Module
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sd_bases")
    paths: dict[str, Path] = {}
    for family, model in models.items():
        paths[f"{family}-ldm"] = save_ldm(model, root / f"{family}.safetensors")
        paths[f"{family}-diffusers"] = save_diffusers(model, root / f"{family}-diffusers")
    unet = models["sd1"].unet_state()
    save_file(ldm_unet(unet), str(root / "sd1-unet-ldm.safetensors"))
    paths["sd1-unet-ldm"] = root / "sd1-unet-ldm.safetensors"
    save_file(unet, str(root / "sd1-unet-diffusers.safetensors"))
    paths["sd1-unet-diffusers"] = root / "sd1-unet-diffusers.safetensors"
    flux_state = {k: v.detach().contiguous() for k, v in flux.state_dict().items()}
    save_file(bfl_state(flux_state), str(root / "flux1.safetensors"))
    paths["flux-bfl"] = root / "flux1.safetensors"
    prefixed = {"model.diffusion_model." + k: v for k, v in bfl_state(flux_state).items()}
    save_file(prefixed, str(root / "flux1-comfy.safetensors"))
    paths["flux-bfl-prefixed"] = root / "flux1-comfy.safetensors"
    save_file(flux_state, str(root / "flux1-diffusers.safetensors"))
    paths["flux-dit"] = root / "flux1-diffusers.safetensors"
    return paths


def test_ldm_files_are_what_diffusers_reads(models: dict[str, TinySD]) -> None:
    """The fixtures' LDM files convert back to the diffusers/transformers state dicts with
    diffusers' own converters (spec V01, V02), so the layouts tested below are real ones."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_open_clip_checkpoint,
    )

    for family, model in models.items():
        ldm = ldm_state(model)
        unet = model.unet_state()
        back = convert_ldm_unet_checkpoint(ldm, dict(model.unet.config))
        assert set(back) == set(unet)
        assert all(torch.equal(back[k], unet[k]) for k in unet), family
        if family != "sd1":
            i, prefix = (
                (0, "cond_stage_model.model.")
                if family == "sd2"
                else (1, "conditioner.embedders.1.model.")
            )
            text = convert_open_clip_checkpoint(model.text_encoders[i], ldm, prefix=prefix)
            expected = model.text_state(i)
            assert set(text) == set(expected)
            assert all(torch.equal(text[k], expected[k]) for k in expected), family


@pytest.mark.parametrize(
    ("base", "kind", "family", "components"),
    [
        ("sd1-ldm", LayoutKind.LDM, Family.SD1, {"unet", "te", "te1"}),
        ("sd2-ldm", LayoutKind.LDM, Family.SD2, {"unet", "te", "te1"}),
        ("sdxl-ldm", LayoutKind.LDM, Family.SDXL, {"unet", "te1", "te2"}),
        ("sd1-diffusers", LayoutKind.DIFFUSERS, Family.SD1, {"unet", "te", "te1"}),
        ("sd2-diffusers", LayoutKind.DIFFUSERS, Family.SD2, {"unet", "te", "te1"}),
        ("sdxl-diffusers", LayoutKind.DIFFUSERS, Family.SDXL, {"unet", "te1", "te2"}),
        ("sd1-unet-ldm", LayoutKind.UNET, Family.SD1, {"unet"}),
        ("sd1-unet-diffusers", LayoutKind.UNET, Family.SD1, {"unet"}),
        ("flux-bfl", LayoutKind.BFL, Family.FLUX, {"unet"}),
        ("flux-bfl-prefixed", LayoutKind.BFL, Family.FLUX, {"unet"}),
        ("flux-dit", LayoutKind.DIT, Family.FLUX, {"unet"}),
    ],
)
def test_layout_and_family_detected_from_keys(
    bases: dict[str, Path], base: str, kind: LayoutKind, family: Family, components: set[str]
) -> None:
    layout = open_layout(bases[base])
    assert (layout.kind, layout.family) == (kind, family)
    assert {c.value for c in layout.components} == components
    assert not layout.inpainting


def _assemble(target: Target, expected_shape: tuple[int, ...]) -> torch.Tensor:
    """The base's values of a target, laid out as the module's weight the LoRA sees."""
    out = torch.full((expected_shape[0], math.prod(expected_shape[1:])), float("nan"))
    for piece in target.pieces:
        with open_checkpoint(piece.checkpoint) as checkpoint:
            w = checkpoint.load(piece.tensor).float()
        if piece.transposed:
            w = w.t()
        if piece.weight_rows is not None:
            w = w[piece.weight_rows[0] : piece.weight_rows[1]]
        start, stop = piece.delta_rows or (0, expected_shape[0])
        out[start:stop] = w.reshape(stop - start, -1)
    assert not out.isnan().any(), f"{target.module}: pieces leave rows uncovered"
    return out


def _check_resolved(
    lora: Path, base: Path, modules: Mapping[str, torch.Tensor], **kwargs: bool
) -> int:
    """Every module of ``lora`` resolves in ``base`` to a target holding ``modules[name]``."""
    resolution = resolve_updates(open_layout(base), read_lora(lora), **kwargs)
    for update, target in resolution.matched:
        expected = modules[update.source].float()
        got = _assemble(target, tuple(expected.shape))
        assert torch.equal(got, expected.reshape(expected.shape[0], -1)), (update.source, target)
    return len(resolution.matched)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("layout", ["ldm", "diffusers"])
def test_every_kohya_module_resolves_to_its_base_tensor(
    models: dict[str, TinySD], bases: dict[str, Path], tmp_path: Path, family: str, layout: str
) -> None:
    """sd-scripts names (diffusers UNet paths for SD1/SD2, SGM paths for SDXL; text encoders
    with text_model.) reach the right tensor in both layouts: OpenCLIP q/k/v as row slices
    of in_proj_weight, LDM and diffusers UNet spellings through the base's own keys."""
    modules = sd_kohya_modules(models[family])
    lora = write_kohya(tmp_path / "lora.safetensors", modules)
    weights = {name: m.weight.detach() for name, m in modules.items()}
    assert _check_resolved(lora, bases[f"{family}-{layout}"], weights) == len(modules)


@pytest.mark.parametrize(
    ("family", "kohya", "tensor"),
    [  # spec §2.4, the worked examples (the tiny models share the released block structure)
        (
            "sd1",
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        ),
        (
            "sd1",
            "lora_unet_up_blocks_1_attentions_2_proj_out",
            "model.diffusion_model.output_blocks.5.1.proj_out.weight",
        ),
        (
            "sd1",
            "lora_unet_down_blocks_1_resnets_0_conv1",
            "model.diffusion_model.input_blocks.4.0.in_layers.2.weight",
        ),
        (
            "sd1",
            "lora_unet_down_blocks_2_downsamplers_0_conv",
            "model.diffusion_model.input_blocks.9.0.op.weight",
        ),
        (
            "sd1",
            "lora_unet_up_blocks_0_upsamplers_0_conv",
            "model.diffusion_model.output_blocks.2.1.conv.weight",
        ),
        (
            "sd1",
            "lora_unet_up_blocks_3_resnets_2_conv_shortcut",
            "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
        ),
        (
            "sd1",
            "lora_te_text_model_encoder_layers_2_mlp_fc1",
            "cond_stage_model.transformer.text_model.encoder.layers.2.mlp.fc1.weight",
        ),
        (
            "sd2",
            "lora_te_text_model_encoder_layers_1_self_attn_k_proj",
            "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight",
        ),
        (
            "sdxl",
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",
            "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
        ),
        (
            "sdxl",
            "lora_unet_middle_block_0_emb_layers_1",
            "model.diffusion_model.middle_block.0.emb_layers.1.weight",
        ),
        (
            "sdxl",
            "lora_unet_output_blocks_2_2_conv",
            "model.diffusion_model.output_blocks.2.2.conv.weight",
        ),
        (
            "sdxl",
            "lora_te1_text_model_encoder_layers_0_self_attn_out_proj",
            "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.out_proj.weight",
        ),
        (
            "sdxl",
            "lora_te2_text_model_encoder_layers_2_mlp_fc2",
            "conditioner.embedders.1.model.transformer.resblocks.2.mlp.c_proj.weight",
        ),
    ],
)
def test_spec_worked_examples(bases: dict[str, Path], family: str, kohya: str, tensor: str) -> None:
    layout = open_layout(bases[f"{family}-ldm"])
    prefix = next(
        p for p in ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_") if kohya.startswith(p)
    )
    component = {
        "lora_unet_": Component.UNET,
        "lora_te_": Component.TE,
        "lora_te1_": Component.TE1,
        "lora_te2_": Component.TE2,
    }[prefix]
    target = layout.targets[(component, kohya.removeprefix(prefix))]
    assert [p.tensor for p in target.pieces] == [tensor]
    if "k_proj" in kohya:
        assert target.pieces[0].weight_rows == (32, 64)


def _bfl_modules(flux: nn.Module) -> dict[str, torch.Tensor]:
    state = {k: v.detach() for k, v in flux.state_dict().items()}
    return {
        "lora_unet_" + mangle(k.removesuffix(".weight")): v
        for k, v in bfl_state(state).items()
        if k.endswith(".weight") and v.dim() == 2
    }


def _write_from_shapes(path: Path, weights: Mapping[str, torch.Tensor], rank: int = 2) -> Path:
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, w in weights.items():
        state[f"{name}.lora_down.weight"] = torch.randn(rank, w.shape[1], generator=gen)
        state[f"{name}.lora_up.weight"] = torch.randn(w.shape[0], rank, generator=gen)
        state[f"{name}.alpha"] = torch.tensor(1.0)
    save_file(state, str(path))
    return path


@pytest.mark.parametrize("base", ["flux-bfl", "flux-bfl-prefixed", "flux-dit"])
def test_kohya_flux_modules_resolve_on_bfl_and_diffusers_transformers(
    flux: nn.Module, bases: dict[str, Path], tmp_path: Path, base: str
) -> None:
    """kohya FLUX names are BFL paths: one tensor in a BFL file, fused qkv/linear1 split over
    to_q/to_k/to_v(/proj_mlp) rows in a diffusers transformer."""
    weights = _bfl_modules(flux)
    lora = _write_from_shapes(tmp_path / "flux.safetensors", weights)
    assert _check_resolved(lora, bases[base], weights) == len(weights)


@pytest.mark.parametrize("base", ["flux-bfl", "flux-dit"])
def test_diffusers_flux_modules_resolve_on_bfl_and_diffusers_transformers(
    flux: nn.Module, bases: dict[str, Path], tmp_path: Path, base: str
) -> None:
    """diffusers FLUX names (transformer.…to_q) land in row slices of the BFL fused tensors;
    norm_out.linear's (scale, shift) halves land swapped in adaLN_modulation.1."""
    state = {
        k: v.detach()
        for k, v in flux.state_dict().items()
        if k.endswith(".weight") and v.dim() == 2
    }
    gen = torch.Generator().manual_seed(0)
    lora, weights = {}, {}
    for name, w in state.items():
        module = name.removesuffix(".weight")
        lora[f"transformer.{module}.lora_A.weight"] = torch.randn(2, w.shape[1], generator=gen)
        lora[f"transformer.{module}.lora_B.weight"] = torch.randn(w.shape[0], 2, generator=gen)
        weights[f"transformer.{module}"] = w
    save_file(lora, str(tmp_path / "flux.safetensors"))
    assert _check_resolved(tmp_path / "flux.safetensors", bases[base], weights) == len(weights)


def test_diffusers_lora_names_resolve_in_ldm_files(
    models: dict[str, TinySD], bases: dict[str, Path], tmp_path: Path
) -> None:
    """diffusers keys (unet.down_blocks…, text_encoder.text_model…) on an LDM SD2 file:
    the UNet through the LDM table, the text encoder onto OpenCLIP's fused in_proj."""
    model = models["sd2"]
    gen = torch.Generator().manual_seed(0)
    lora, weights = {}, {}
    sources = [("unet", model.unet_state()), ("text_encoder", model.text_state(0))]
    for prefix, state in sources:
        for name, w in state.items():
            if name.endswith(".weight") and w.dim() >= 2 and "embedding" not in name:
                module = name.removesuffix(".weight")
                lora[f"{prefix}.{module}.lora_A.weight"] = torch.randn(
                    2, *w.shape[1:], generator=gen
                )
                lora[f"{prefix}.{module}.lora_B.weight"] = torch.randn(
                    w.shape[0], 2, *([1] * (w.dim() - 2)), generator=gen
                )
                weights[f"{prefix}.{module}"] = w
    save_file(lora, str(tmp_path / "lora.safetensors"))
    assert _check_resolved(tmp_path / "lora.safetensors", bases["sd2-ldm"], weights) == len(weights)


def test_sdxl_lora_refused_on_sd1_base(
    models: dict[str, TinySD], bases: dict[str, Path], tmp_path: Path
) -> None:
    lora = write_kohya(tmp_path / "xl.safetensors", sd_kohya_modules(models["sdxl"]))
    with pytest.raises(IncompatibleError, match="a sdxl LoRA does not fit this sd1 base") as e:
        resolve_updates(open_layout(bases["sd1-ldm"]), read_lora(lora))
    assert e.value.path == str(lora)


def test_text_encoder_modules_on_a_unet_only_file(
    models: dict[str, TinySD], bases: dict[str, Path], tmp_path: Path
) -> None:
    """Refused by default, naming the module; left out and counted with skip_text_encoder."""
    modules = sd_kohya_modules(models["sd1"])
    lora = write_kohya(tmp_path / "lora.safetensors", modules)
    layout, read = open_layout(bases["sd1-unet-ldm"]), read_lora(lora)
    with pytest.raises(IncompatibleError, match="base has no such text encoder") as e:
        resolve_updates(layout, read)
    assert e.value.tensor is not None and e.value.tensor.startswith("lora_te_")
    resolution = resolve_updates(layout, read, skip_text_encoder=True)
    text = sum(name.startswith("lora_te_") for name in modules)
    assert (len(resolution.skipped_text), len(resolution.matched)) == (text, len(modules) - text)


def test_unknown_module_and_wrong_shape_are_named(
    models: dict[str, TinySD], bases: dict[str, Path], tmp_path: Path
) -> None:
    modules = kohya_modules(models["sd1"].unet, "lora_unet_", UNET_TARGETS)
    name = next(n for n in modules if "attn1_to_q" in n)
    renamed = {name.replace("transformer_blocks", "transformerblocks"): modules[name]}
    lora = write_kohya(tmp_path / "bad.safetensors", renamed)
    with pytest.raises(IncompatibleError, match="no such module in the base") as e:
        resolve_updates(open_layout(bases["sd1-ldm"]), read_lora(lora))
    assert e.value.tensor == next(iter(renamed))
    # SDXL-sized factors under an SD1 name: the shape check refuses it (family unknown by name)
    big = {name: nn.Linear(7, 5)}
    lora = write_kohya(tmp_path / "shape.safetensors", big)
    with pytest.raises(IncompatibleError, match="does not fit base module") as e:
        resolve_updates(open_layout(bases["sd1-ldm"]), read_lora(lora))
    assert e.value.tensor == name


def test_diffusers_folder_variants_shards_and_inpainting(tmp_path: Path) -> None:
    model = tiny_sd("sd1", in_channels=9)
    only_fp16 = save_diffusers(model, tmp_path / "fp16", variant="fp16")
    layout = open_layout(only_fp16)
    assert layout.checkpoints["unet"].name == "diffusion_pytorch_model.fp16.safetensors"
    assert layout.inpainting
    sharded = save_diffusers(model, tmp_path / "sharded", max_shard_size="1MB")
    layout = open_layout(sharded)
    assert layout.checkpoints["unet"].name == "diffusion_pytorch_model.safetensors.index.json"
    target = layout.targets[(Component.UNET, "down_blocks_0_attentions_0_proj_in")]
    assert target.pieces[0].checkpoint == layout.checkpoints["unet"]
    model.unet.save_pretrained(tmp_path / "sharded" / "unet", variant="bf16")
    model.unet.save_pretrained(tmp_path / "sharded" / "unet", variant="fp16")
    assert (
        open_layout(sharded, variant="fp16").checkpoints["unet"].name.endswith(".fp16.safetensors")
    )
    with pytest.raises(OptionError, match="--variant"):
        open_layout(_two_variants(model, tmp_path))


def _two_variants(model: TinySD, tmp_path: Path) -> Path:
    path = save_diffusers(model, tmp_path / "two", variant="fp16")
    model.unet.save_pretrained(path / "unet", variant="bf16")
    return path


def test_open_clip_helper_matches_spec_shapes(models: dict[str, TinySD]) -> None:
    oc = open_clip(models["sd2"].text_state(0))
    assert oc["transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)

"""Tiny random SD1-, SD2-, SDXL- and FLUX-shaped models built from diffusers/transformers
configs (nothing downloaded), saved in every base layout, and kohya/LyCORIS LoRA files written
by hand with sd-scripts' naming. Used by test_formats.py and test_layouts.py.

LDM single files are written from the diffusers state dicts with the spec's tables (§2.2,
§2.3); ``test_layouts`` checks them against diffusers' own LDM converters, so the layouts
under test are the ones diffusers reads.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lorasurgeon.layouts.unet import diffusers_structure, other_spelling

CLIP_HIDDEN = 32


@dataclass
class TinySD:
    """One tiny model's parts as diffusers/transformers modules."""

    family: str
    unet: nn.Module
    text_encoders: list[nn.Module] = field(default_factory=list)
    vae: nn.Module | None = None

    def unet_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone().contiguous() for k, v in self.unet.state_dict().items()}

    def text_state(self, i: int) -> dict[str, torch.Tensor]:
        """The i-th text encoder's state dict with the ``text_model.`` level (transformers 5
        drops it for ``CLIPTextModel``; published checkpoints have it)."""
        state = self.text_encoders[i].state_dict()
        return {
            (
                k if k.startswith(("text_model.", "text_projection")) else "text_model." + k
            ): v.detach().clone().contiguous()
            for k, v in state.items()
        }


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build()
        for p in module.parameters():  # random everywhere: zero-init layers would hide mix-ups
            p.data.normal_(0, 0.1)
    return module


def _clip(seed: int, projection: bool = False) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        hidden_size=CLIP_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        vocab_size=99,
        projection_dim=CLIP_HIDDEN,
        hidden_act="gelu" if projection else "quick_gelu",
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return _seeded(seed, lambda: cls(config))


def _vae(seed: int) -> nn.Module:
    from diffusers import AutoencoderKL

    return _seeded(
        seed,
        lambda: AutoencoderKL(
            block_out_channels=(32,),
            norm_num_groups=32,
            latent_channels=4,
            down_block_types=("DownEncoderBlock2D",),
            up_block_types=("UpDecoderBlock2D",),
        ),
    )


def tiny_sd(family: str, *, seed: int = 0, in_channels: int = 4) -> TinySD:
    """A tiny ``sd1``, ``sd2`` or ``sdxl`` model (UNet, text encoders, VAE)."""
    from diffusers import UNet2DConditionModel

    if family in ("sd1", "sd2"):
        config = dict(
            block_out_channels=(32, 32, 64, 64),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=CLIP_HIDDEN,
            attention_head_dim=8,
            use_linear_projection=family == "sd2",
        )
        encoders = [_clip(seed + 1)]
    else:
        config = dict(
            block_out_channels=(32, 64, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 2),
            cross_attention_dim=2 * CLIP_HIDDEN,
            attention_head_dim=8,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + CLIP_HIDDEN,
        )
        encoders = [_clip(seed + 1), _clip(seed + 2, projection=True)]
    unet = _seeded(
        seed,
        lambda: UNet2DConditionModel(
            sample_size=8, in_channels=in_channels, out_channels=4, norm_num_groups=32, **config
        ),
    )
    return TinySD(family, unet, encoders, _vae(seed + 3))


def tiny_flux(seed: int = 0) -> nn.Module:
    """A tiny FLUX transformer (diffusers ``FluxTransformer2DModel``): hidden 16, MLP 64."""
    from diffusers import FluxTransformer2DModel

    return _seeded(
        seed,
        lambda: FluxTransformer2DModel(
            patch_size=1,
            in_channels=4,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=16,
            pooled_projection_dim=16,
            guidance_embeds=True,
            axes_dims_rope=(4, 2, 2),
        ),
    )


# ---------------------------------------------------------------------------------------------
# Layouts written from the diffusers state dicts (spec §2.2, §2.3, §1.6)


def ldm_names(names: list[str]) -> dict[str, str]:
    """Each diffusers UNet tensor name with its LDM name (spec §2.2)."""
    structure = diffusers_structure(names)
    assert structure is not None
    rows = structure.prefixes()
    out = {}
    for name in names:
        other = other_spelling(name, rows, from_ldm=False)
        assert other is not None, name
        out[name] = other
    return out


def ldm_unet(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers UNet state dict renamed to LDM paths (spec §2.2)."""
    return {ldm: state[name] for name, ldm in ldm_names(list(state)).items()}


def open_clip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIP state dict (with ``text_model.``) as OpenCLIP: q/k/v fused into
    ``in_proj_weight``/``in_proj_bias``, ``text_projection`` transposed (spec §2.3)."""
    renames = {
        "self_attn.out_proj": "attn.out_proj",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
    }
    out: dict[str, torch.Tensor] = {}
    layers = sorted(
        {
            int(m.group(1))
            for k in state
            if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))
        }
    )
    for n in layers:
        layer = f"text_model.encoder.layers.{n}."
        for kind in ("weight", "bias"):
            out[f"transformer.resblocks.{n}.attn.in_proj_{kind}"] = torch.cat(
                [state[f"{layer}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            )
            for hf, oc in renames.items():
                out[f"transformer.resblocks.{n}.{oc}.{kind}"] = state[f"{layer}{hf}.{kind}"]
    out["token_embedding.weight"] = state["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = state["text_model.embeddings.position_embedding.weight"]
    out["ln_final.weight"] = state["text_model.final_layer_norm.weight"]
    out["ln_final.bias"] = state["text_model.final_layer_norm.bias"]
    if "text_projection.weight" in state:
        out["text_projection"] = state["text_projection.weight"].t().contiguous()
    return out


def _prefixed(prefix: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v.contiguous() for k, v in state.items()}


def ldm_state(model: TinySD) -> dict[str, torch.Tensor]:
    """The whole model as an LDM/SGM single file (spec §5.2)."""
    state = _prefixed("model.diffusion_model.", ldm_unet(model.unet_state()))
    if model.family == "sd1":
        state |= _prefixed("cond_stage_model.transformer.", model.text_state(0))
    elif model.family == "sd2":
        state |= _prefixed("cond_stage_model.model.", open_clip(model.text_state(0)))
    else:
        state |= _prefixed("conditioner.embedders.0.transformer.", model.text_state(0))
        state |= _prefixed("conditioner.embedders.1.model.", open_clip(model.text_state(1)))
    assert model.vae is not None
    vae = {k: v.detach().clone() for k, v in model.vae.state_dict().items()}
    return state | _prefixed("first_stage_model.", vae)


def save_ldm(model: TinySD, path: Path, dtype: torch.dtype = torch.float32) -> Path:
    save_file({k: v.to(dtype) for k, v in ldm_state(model).items()}, str(path))
    return path


def save_diffusers(model: TinySD, path: Path, *, variant: str | None = None,
                   max_shard_size: str | None = None) -> Path:  # fmt: skip
    """A diffusers pipeline folder: model_index.json, unet/, text_encoder(_2)/, vae/."""
    kwargs: dict[str, object] = {"variant": variant} if variant else {}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    model.unet.save_pretrained(path / "unet", **kwargs)
    names = ["text_encoder", "text_encoder_2"][: len(model.text_encoders)]
    for name, encoder in zip(names, model.text_encoders, strict=True):
        encoder.save_pretrained(path / name)
    assert model.vae is not None
    model.vae.save_pretrained(path / "vae")
    pipeline = "StableDiffusionXLPipeline" if model.family == "sdxl" else "StableDiffusionPipeline"
    (path / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    return path


# FLUX: diffusers -> BFL (the layout of diffusers' convert_flux_transformer_checkpoint_to_diffusers,
# read backwards; that converter hard-codes the 3072 width of the released model)
_FLUX_DOUBLE = {
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
}
_FLUX_GLOBAL = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
}


def bfl_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers FLUX transformer state dict in BFL paths (fused qkv and linear1)."""
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        module, _, kind = name.rpartition(".")
        kind = "scale" if ".norm_" in module and kind == "weight" else kind
        if m := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module):
            block, rest = f"double_blocks.{m.group(1)}", m.group(2)
            if rest in ("attn.to_q", "attn.add_q_proj"):
                side = "img" if rest == "attn.to_q" else "txt"
                parts = (
                    ("to_q", "to_k", "to_v")
                    if side == "img"
                    else ("add_q_proj", "add_k_proj", "add_v_proj")
                )
                out[f"{block}.{side}_attn.qkv.{kind}"] = torch.cat(
                    [state[f"transformer_blocks.{m.group(1)}.attn.{p}.{kind}"] for p in parts]
                )
            elif rest in _FLUX_DOUBLE:
                out[f"{block}.{_FLUX_DOUBLE[rest]}.{kind}"] = value
        elif m := re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", module):
            block, rest = f"single_blocks.{m.group(1)}", m.group(2)
            src = f"single_transformer_blocks.{m.group(1)}."
            if rest == "attn.to_q":
                out[f"{block}.linear1.{kind}"] = torch.cat(
                    [
                        state[f"{src}{p}.{kind}"]
                        for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
                    ]
                )
            elif rest == "proj_out":
                out[f"{block}.linear2.{kind}"] = value
            elif rest == "norm.linear":
                out[f"{block}.modulation.lin.{kind}"] = value
            elif rest in ("attn.norm_q", "attn.norm_k"):
                out[f"{block}.norm.{'query' if rest.endswith('q') else 'key'}_norm.{kind}"] = value
        elif module in _FLUX_GLOBAL:
            out[f"{_FLUX_GLOBAL[module]}.{kind}"] = value
        elif module == "norm_out.linear":
            scale, shift = value.chunk(2)
            out[f"final_layer.adaLN_modulation.1.{kind}"] = torch.cat([shift, scale])
    return {k: v.contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# kohya files written by hand (sd-scripts naming, networks/lora.py create_modules)

UNET_TARGETS = ("Transformer2DModel",)
CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


def kohya_modules(
    root: nn.Module, prefix: str, classes: tuple[str, ...], *, text: bool = False
) -> dict[str, nn.Module]:
    """sd-scripts' module names: for every module whose class is in ``classes``, each
    Linear/Conv2d descendant as ``prefix + (parent + "." + child).replace(".", "_")``. Text
    encoder paths get the ``text_model.`` level of transformers 4.x."""
    found: dict[str, nn.Module] = {}
    for name, module in root.named_modules():
        if type(module).__name__ not in classes:
            continue
        for child_name, child in module.named_modules():
            if isinstance(child, (nn.Linear, nn.Conv2d)) and child_name:
                path = f"{name}.{child_name}"
                if text and not path.startswith("text_model."):
                    path = "text_model." + path
                found[prefix + path.replace(".", "_")] = child
    return found


def lora_factors(
    module: nn.Module, rank: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (down, up) for a Linear or a Conv2d: down has the target's kernel, up is 1×1."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        down = torch.randn(rank, module.in_channels, kh, kw, generator=gen)
        up = torch.randn(module.out_channels, rank, 1, 1, generator=gen)
    else:
        down = torch.randn(rank, module.in_features, generator=gen)
        up = torch.randn(module.out_features, rank, generator=gen)
    return down * 0.1, up * 0.1


def write_kohya(
    path: Path,
    modules: Mapping[str, nn.Module],
    *,
    rank: int = 4,
    alpha: float | None = 2.0,
    seed: int = 0,
    metadata: dict[str, str] | None = None,
    alpha_dtype: torch.dtype = torch.float16,
) -> Path:
    """A plain kohya LoRA/LoCon file over ``modules`` (name -> target module)."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        down, up = lora_factors(module, rank, gen)
        state[f"{name}.lora_down.weight"] = down.contiguous()
        state[f"{name}.lora_up.weight"] = up.contiguous()
        if alpha is not None:
            state[f"{name}.alpha"] = torch.tensor(alpha, dtype=alpha_dtype)
    save_file(state, str(path), metadata=metadata)
    return path


def sd_kohya_modules(model: TinySD) -> dict[str, nn.Module]:
    """sd-scripts' modules of a tiny SD model: attention blocks, LoCon convs and every text
    encoder, by kohya name. SDXL's UNet names are SGM (LDM) paths, as sd-scripts writes them."""
    modules = kohya_modules(model.unet, "lora_unet_", UNET_TARGETS + CONV_TARGETS)
    if model.family == "sdxl":
        to_ldm = {
            k.removesuffix(".weight"): v.removesuffix(".weight")
            for k, v in ldm_names(list(model.unet_state())).items()
        }
        by_kohya = {
            "lora_unet_" + k.replace(".", "_"): "lora_unet_" + v.replace(".", "_")
            for k, v in to_ldm.items()
        }
        modules = {by_kohya[k]: m for k, m in modules.items()}
        prefixes = ["lora_te1_", "lora_te2_"]
    else:
        prefixes = ["lora_te_"]
    for prefix, encoder in zip(prefixes, model.text_encoders, strict=True):
        modules |= kohya_modules(encoder, prefix, TEXT_TARGETS, text=True)
    return modules

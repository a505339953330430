"""FLUX's two spellings (spec §1.6): BFL paths (``double_blocks.i.img_attn.qkv``, fused
``linear1``) and diffusers' ``FluxTransformer2DModel`` paths (split ``to_q``/``to_k``/``to_v``,
``proj_mlp``), as row relations built from the base's shapes. Strings and shapes only."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from ..reader import TensorInfo
from .table import Alias

__all__ = ["FluxRelation", "bfl_aliases", "diffusers_flux_aliases", "flux_relations"]

_DOUBLE = {"img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
           "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
           "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
           "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear"}  # fmt: skip
_SINGLE = {"linear2": "proj_out", "modulation.lin": "norm.linear"}
_GLOBAL = {"img_in": "x_embedder", "txt_in": "context_embedder",
           "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
           "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
           "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
           "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
           "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
           "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
           "final_layer.linear": "proj_out"}  # fmt: skip


@dataclass(frozen=True)
class FluxRelation:
    """Rows ``diffusers_rows`` of diffusers module ``diffusers`` are rows ``bfl_rows`` of BFL
    module ``bfl`` (None: all rows)."""

    bfl: str
    diffusers: str
    bfl_rows: tuple[int, int] | None = None
    diffusers_rows: tuple[int, int] | None = None


def _split(
    bfl: str, target: str, names: tuple[str, ...], sizes: tuple[int, ...]
) -> list[FluxRelation]:
    relations, at = [], 0
    for name, size in zip(names, sizes, strict=True):
        relations.append(FluxRelation(bfl, f"{target}.{name}", (at, at + size)))
        at += size
    return relations


def flux_relations(bfl_shapes: Mapping[str, tuple[int, ...]]) -> list[FluxRelation]:
    """Every BFL module with its diffusers counterpart(s), from the BFL weight shapes (module
    path -> shape). The final ``adaLN_modulation.1`` stores (shift, scale), diffusers'
    ``norm_out.linear`` (scale, shift)."""
    relations: list[FluxRelation] = []
    for module, shape in bfl_shapes.items():
        if m := re.fullmatch(r"double_blocks\.(\d+)\.(.+)", module):
            block, rest = f"transformer_blocks.{m.group(1)}", m.group(2)
            h = shape[0] // 3
            if rest == "img_attn.qkv":
                relations += _split(module, block + ".attn", ("to_q", "to_k", "to_v"), (h, h, h))
            elif rest == "txt_attn.qkv":
                names = ("add_q_proj", "add_k_proj", "add_v_proj")
                relations += _split(module, block + ".attn", names, (h, h, h))
            elif rest in _DOUBLE:
                relations.append(FluxRelation(module, f"{block}.{_DOUBLE[rest]}"))
        elif m := re.fullmatch(r"single_blocks\.(\d+)\.(.+)", module):
            block, rest = f"single_transformer_blocks.{m.group(1)}", m.group(2)
            if rest == "linear1":
                h = bfl_shapes[f"single_blocks.{m.group(1)}.linear2"][0]
                sizes = (h, h, h, shape[0] - 3 * h)
                relations += _split(
                    module, block, ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), sizes
                )
            elif rest in _SINGLE:
                relations.append(FluxRelation(module, f"{block}.{_SINGLE[rest]}"))
        elif module in _GLOBAL:
            relations.append(FluxRelation(module, _GLOBAL[module]))
        elif module == "final_layer.adaLN_modulation.1":
            h = shape[0] // 2
            relations.append(FluxRelation(module, "norm_out.linear", (0, h), (h, 2 * h)))
            relations.append(FluxRelation(module, "norm_out.linear", (h, 2 * h), (0, h)))
    return relations


def bfl_aliases(bfl_shapes: Mapping[str, tuple[int, ...]]) -> list[Alias]:
    """Diffusers FLUX module names on a BFL base: slices of the fused BFL tensors."""
    return [
        Alias(r.diffusers, r.bfl, weight_rows=r.bfl_rows, delta_rows=r.diffusers_rows)
        for r in flux_relations(bfl_shapes)
    ]


def diffusers_flux_aliases(tensors: Mapping[str, TensorInfo]) -> list[Alias]:
    """BFL module names (kohya FLUX LoRAs) on a diffusers FLUX transformer: the fused BFL
    delta's rows split over the diffusers tensors."""
    shapes = _bfl_shapes(tensors)
    return [
        Alias(r.bfl, r.diffusers, weight_rows=r.diffusers_rows, delta_rows=r.bfl_rows)
        for r in flux_relations(shapes)
    ]


def _bfl_shapes(tensors: Mapping[str, TensorInfo]) -> dict[str, tuple[int, ...]]:
    """The BFL weight shapes a diffusers FLUX transformer implies (for the row splits)."""

    def shape(name: str) -> tuple[int, ...] | None:
        info = tensors.get(name + ".weight")
        return info.shape if info is not None else None

    shapes: dict[str, tuple[int, ...]] = {}
    for name in tensors:
        if m := re.fullmatch(r"transformer_blocks\.(\d+)\.attn\.to_q\.weight", name):
            q = tensors[name].shape
            shapes[f"double_blocks.{m.group(1)}.img_attn.qkv"] = (3 * q[0], *q[1:])
            shapes[f"double_blocks.{m.group(1)}.txt_attn.qkv"] = (3 * q[0], *q[1:])
        elif m := re.fullmatch(r"single_transformer_blocks\.(\d+)\.attn\.to_q\.weight", name):
            q = tensors[name].shape
            mlp = shape(f"single_transformer_blocks.{m.group(1)}.proj_mlp")
            out = shape(f"single_transformer_blocks.{m.group(1)}.proj_out")
            if mlp is not None and out is not None:
                shapes[f"single_blocks.{m.group(1)}.linear1"] = (3 * q[0] + mlp[0], *q[1:])
                shapes[f"single_blocks.{m.group(1)}.linear2"] = out
        elif name == "norm_out.linear.weight":
            shapes["final_layer.adaLN_modulation.1"] = tensors[name].shape
    for bfl, diffusers in {**_GLOBAL}.items():
        found = shape(diffusers)
        if found is not None:
            shapes[bfl] = found
    for name in tensors:
        if m := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)\.weight", name):
            for bfl, diffusers in _DOUBLE.items():
                if m.group(2) == diffusers:
                    shapes[f"double_blocks.{m.group(1)}.{bfl}"] = tensors[name].shape
        elif m := re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)\.weight", name):
            for bfl, diffusers in _SINGLE.items():
                if m.group(2) == diffusers:
                    shapes[f"single_blocks.{m.group(1)}.{bfl}"] = tensors[name].shape
    return shapes

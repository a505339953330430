"""Planning for diffusion LoRA files (kohya/LyCORIS, diffusers): each file's canonical updates
matched to the base layout and turned into ``Change``s per base tensor. Headers only; knows no
format names (``formats`` and ``layouts`` do)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import AdapterError, IncompatibleError
from .formats import Kind, LoraFile, ModuleUpdate
from .layouts import Layout, Piece, Target, resolve_updates
from .plans import Change, ChangeKind
from .reader import TensorInfo

__all__ = ["DiffusionChanges", "diffusion_changes", "is_lora_file", "refuse_float8"]

_BIAS_PARTS = ("diff_b", "b_norm", "up_bias")  # full, norm, diffusers lora_B.bias


def is_lora_file(path: Path) -> bool:
    """A lone ``.safetensors`` file: a diffusion LoRA (PEFT adapters are directories)."""
    return path.is_file() and path.suffix == ".safetensors"


@dataclass(frozen=True)
class DiffusionChanges:
    """(checkpoint file, tensor name) -> its changes in LoRA order; text-encoder modules left
    out per LoRA."""

    per_tensor: Mapping[tuple[Path, str], list[Change]]
    skipped_text: tuple[int, ...]


def refuse_float8(where: Path, tensors: Mapping[str, TensorInfo]) -> None:
    """float8 checkpoints (common for FLUX) are out of scope (spec §5.5).

    Raises:
        IncompatibleError: a tensor of the base is stored in a float8 dtype.
    """
    for info in tensors.values():
        if info.dtype.startswith("F8"):
            raise IncompatibleError(
                f"is stored in {info.dtype}: float8 checkpoints are not supported",
                path=where,
                tensor=info.name,
                hint="merge into an fp16, bf16 or fp32 copy of the checkpoint",
            )


def _piece_changes(
    index: int, update: ModuleUpdate, target: Target, scaling: float, lora: Path
) -> list[tuple[tuple[Path, str], Change]]:
    changes: list[tuple[tuple[Path, str], Change]] = []
    bias_parts = [p for p in _BIAS_PARTS if p in update.factors]
    weight_parts = [p for p in update.factors if p not in _BIAS_PARTS]
    for piece in target.pieces:
        if weight_parts:
            change = _change(index, update, piece, scaling, bias=False)
            changes.append(((piece.checkpoint, piece.tensor), change))
        if bias_parts:
            if piece.bias is None or piece.weight_rows is not None:
                raise IncompatibleError(
                    f"has a bias update but base module {target.module} has no bias of its own",
                    path=lora, tensor=update.source, hint="was this LoRA made for another model?",
                )  # fmt: skip
            change = _change(index, update, piece, scaling, bias=True)
            changes.append(((piece.checkpoint, piece.bias), change))
    return changes


def _change(
    index: int, update: ModuleUpdate, piece: Piece, scaling: float, *, bias: bool
) -> Change:
    return Change(index, ChangeKind.DIFFUSION, update.source, scaling=scaling, update=update,
                  piece=piece, bias=bias)  # fmt: skip


def _check_dora(lora: Path, update: ModuleUpdate, target: Target, unmerge: bool) -> None:
    """DoRA (``dora_scale``) normalizes a whole weight; it cannot be undone offline."""
    if unmerge:
        raise AdapterError(
            "DoRA merges cannot be undone offline (the original weight norms are lost)",
            path=lora, tensor=update.source,
        )  # fmt: skip
    scale = update.dora_scale
    rows = target.shape[0]
    whole = len(target.pieces) == 1 and target.pieces[0].weight_rows is None
    fits = scale is not None and scale.numel in (rows, math.prod(target.shape[1:]))
    if not whole or not fits or update.scaling == 0 or update.kind in (Kind.FULL, Kind.NORM):
        raise AdapterError(
            f"DoRA scale {scale.shape if scale else ()} cannot be applied to base module "
            f"{target.module} {target.shape}",
            path=lora, tensor=update.source,
            hint="DoRA is merged only onto whole weights, one norm per row or per column",
        )  # fmt: skip


def _check_magnitude(lora: Path, update: ModuleUpdate, target: Target, unmerge: bool) -> None:
    """PEFT's DoRA (diffusers ``lora_magnitude_vector``) rescales whole output rows."""
    magnitude = update.factors["magnitude"]
    if unmerge:
        raise AdapterError(
            "DoRA merges cannot be undone offline (the original weight norms are lost)",
            path=lora, tensor=update.source,
        )  # fmt: skip
    whole = len(target.pieces) == 1 and target.pieces[0].weight_rows is None
    if update.kind is not Kind.LORA or not whole or target.pieces[0].transposed:
        raise AdapterError(
            f"DoRA magnitude cannot be applied to base module {target.module}: it is a slice "
            "of a fused tensor (OpenCLIP in_proj, FLUX qkv)",
            path=lora, tensor=update.source,
            hint="merge it into a checkpoint that stores the module as its own tensor "
            "(a diffusers folder)",
        )  # fmt: skip
    if magnitude.numel != target.shape[0]:
        raise AdapterError(
            f"DoRA magnitude has {magnitude.numel} values for {target.shape[0]} output units "
            f"of base module {target.module}",
            path=lora, tensor=update.source, hint="was this LoRA made for another model?",
        )  # fmt: skip


def _scaling(update: ModuleUpdate, weight: float, sign: float) -> float:
    """m · s: full and norm updates have s = 1 (spec §4)."""
    base = 1.0 if update.kind in (Kind.FULL, Kind.NORM) else update.scaling
    return base * weight * sign


def diffusion_changes(
    layout: Layout,
    loras: Sequence[LoraFile],
    unet_weights: Sequence[float],
    text_weights: Sequence[float],
    *,
    unmerge: bool = False,
    skip_text_encoder: bool = False,
) -> DiffusionChanges:
    """Every change the LoRAs make to the base, LoRA by LoRA (reversed to unmerge).

    A module's delta is ``m · s · Δ`` (spec §1.2, §4) with m its LoRA's UNet/transformer or
    text-encoder weight; m = 0 leaves the module untouched (spec §5.3). DoRA (``dora_scale``)
    modules give ``W + m·(g·(W + s·Δ)/‖W + s·Δ‖ − W)`` (ComfyUI's convention, spec §1.5);
    diffusers DoRA (``lora_magnitude_vector``) modules ``g·(W + m·s·Δ)/‖W + m·s·Δ‖`` (PEFT's merge
    after diffusers' ``fuse_lora(lora_scale=m)``).

    Raises:
        IncompatibleError: a module that fits no target (see ``resolve_updates``), two modules
            of one file on the same target.
        AdapterError: a DoRA (``dora_scale`` or ``lora_magnitude_vector``) module on a slice of
            a tensor or with a scale of the wrong size, or DoRA with ``unmerge``.
    """
    per_tensor: dict[tuple[Path, str], list[Change]] = {}
    skipped = []
    sign = -1.0 if unmerge else 1.0
    order = range(len(loras) - 1, -1, -1) if unmerge else range(len(loras))
    for i in order:
        lora = loras[i]
        resolution = resolve_updates(layout, lora, skip_text_encoder=skip_text_encoder)
        skipped.append(len(resolution.skipped_text))
        seen: dict[tuple[Path, str, tuple[int, int] | None], str] = {}
        for update, target in resolution.matched:
            weight = text_weights[i] if update.component.is_text_encoder else unet_weights[i]
            if update.dora_scale is not None:
                _check_dora(lora.path, update, target, unmerge)
            if "magnitude" in update.factors:
                _check_magnitude(lora.path, update, target, unmerge)
            if weight == 0:
                continue
            for piece in target.pieces:
                key = (piece.checkpoint, piece.tensor, piece.weight_rows)
                if key in seen:
                    raise IncompatibleError(
                        f"targets {piece.tensor} like module {seen[key]} of the same file",
                        path=lora.path, tensor=update.source,
                        hint="the file holds one module under two names; remove one",
                    )  # fmt: skip
                seen[key] = update.source
            for name, change in _piece_changes(
                i, update, target, _scaling(update, weight, sign), lora.path
            ):
                per_tensor.setdefault(name, []).append(change)
    return DiffusionChanges(per_tensor, tuple(skipped if not unmerge else reversed(skipped)))

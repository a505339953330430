"""Each update of a diffusion LoRA matched to its target in a base layout, by name and shape
(spec §2.5, §5.4). Nothing is guessed: a name not in the table or a shape that does not fit
is an error naming the LoRA file and module."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import IncompatibleError
from ..formats.model import Family, Kind, LoraFile, ModuleUpdate
from .model import Layout, Target

__all__ = ["Resolution", "delta_shape", "resolve_updates"]

# Which base families a LoRA of each family fits.
_FITS = {
    Family.SD1: {Family.SD1},
    Family.SD2: {Family.SD2},
    Family.SD1_SD2: {Family.SD1, Family.SD2},
    Family.SDXL: {Family.SDXL},
    Family.FLUX: {Family.FLUX},
    Family.SD3: {Family.SD3},
}


@dataclass(frozen=True)
class Resolution:
    """The updates with their targets, in file order, and the text-encoder updates left out
    because the base has no such text encoder (only with ``skip_text_encoder``)."""

    matched: tuple[tuple[ModuleUpdate, Target], ...]
    skipped_text: tuple[ModuleUpdate, ...]


def delta_shape(update: ModuleUpdate) -> tuple[int, ...]:
    """The shape of the update's delta as its factors define it (a 2-D (out, in·k·k) shape
    where the factors do not say the kernel)."""
    f = update.factors
    if update.kind is Kind.LORA:
        return (f["up"].shape[0], *f["down"].shape[1:])
    if update.kind is Kind.LOCON_TUCKER:
        return (f["up"].shape[0], f["down"].shape[1], *f["mid"].shape[2:])
    if update.kind is Kind.LOHA:
        return (f["w1a"].shape[0], math.prod(f["w1b"].shape[1:]))
    if update.kind is Kind.LOHA_TUCKER:
        return (f["w1a"].shape[1], f["w1b"].shape[1], *f["t1"].shape[2:])
    if update.kind is Kind.LOKR:
        return _lokr_shape(update)
    if update.kind is Kind.FULL:
        return f["diff"].shape
    return f["w_norm"].shape if "w_norm" in f else f["b_norm"].shape


def _lokr_shape(update: ModuleUpdate) -> tuple[int, ...]:
    f = update.factors
    a, c = (f["w1"].shape if "w1" in f else (f["w1a"].shape[0], f["w1b"].shape[1]))[:2]
    if "w2" in f:
        b, *rest = f["w2"].shape
    elif "t2" in f:
        b, rest = f["w2a"].shape[1], [f["w2b"].shape[1], *f["t2"].shape[2:]]
    else:
        b, rest = f["w2a"].shape[0], list(f["w2b"].shape[1:])
    if len(rest) == 3:  # a 4-D W2: kron gives (a·b, c·d, kh, kw)
        return (a * b, c * rest[0], rest[1], rest[2])
    return (a * b, c * math.prod(rest))


def _fits(shape: tuple[int, ...], target: tuple[int, ...], kind: Kind) -> bool:
    """Same rows and element count: a 1×1 conv delta fits a Linear and the reverse (spec
    §1.2); norm updates are 1-D."""
    if kind is Kind.NORM:
        return math.prod(shape) == math.prod(target)
    return shape[0] == target[0] and math.prod(shape) == math.prod(target)


def _check_family(layout: Layout, lora: LoraFile) -> None:
    fits = _FITS.get(lora.family)
    if fits is None or layout.family is Family.UNKNOWN or layout.family in fits:
        return
    raise IncompatibleError(
        f"a {lora.family.value} LoRA does not fit this {layout.family.value} base ({layout.path})",
        path=lora.path,
        hint="choose a base of the family the LoRA was trained for",
    )


def resolve_updates(
    layout: Layout, lora: LoraFile, *, skip_text_encoder: bool = False
) -> Resolution:
    """Match every update of ``lora`` to its target in ``layout``.

    Raises:
        IncompatibleError: the LoRA's family does not fit the base's, a UNet/transformer module
            has no target, a text-encoder module has none although the base has that text
            encoder, a text-encoder module has none and ``skip_text_encoder`` is False, or a
            delta does not fit its target's shape.
    """
    _check_family(layout, lora)
    matched: list[tuple[ModuleUpdate, Target]] = []
    skipped: list[ModuleUpdate] = []
    for update in lora.updates:
        target = layout.targets.get((update.component, update.key))
        if target is None:
            if update.component.is_text_encoder and update.component not in layout.components:
                if skip_text_encoder:
                    skipped.append(update)
                    continue
                raise IncompatibleError(
                    "text-encoder module, but the base has no such text encoder "
                    f"({layout.kind.value} {layout.family.value} at {layout.path})",
                    path=lora.path,
                    tensor=update.source,
                    hint="pass --skip-text-encoder to leave the text-encoder modules out",
                )
            raise IncompatibleError(
                f"no such module in the base ({layout.kind.value} {layout.family.value} at "
                f"{layout.path})",
                path=lora.path,
                tensor=update.source,
                hint="was this LoRA trained for another model?",
            )
        shape = delta_shape(update)
        if not _fits(shape, target.shape, update.kind):
            raise IncompatibleError(
                f"delta of shape {shape} does not fit base module {target.module} {target.shape}",
                path=lora.path,
                tensor=update.source,
                hint="was this LoRA trained for another model?",
            )
        matched.append((update, target))
    return Resolution(tuple(matched), tuple(skipped))

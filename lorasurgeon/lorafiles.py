"""``resize`` and ``combine`` of diffusion LoRA files (kohya/LyCORIS LoRA and LoCon, diffusers):
their modules as products of factors, matched across files, planned for the shared writer.

Each LoRA module's update is ``scaling · up @ down`` (convs flattened; LoCon Tucker as the
exact product ``up @ (mid ×₁ down)``). Nothing here forms a dense update where factors suffice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import AdapterError, IncompatibleError, OptionError
from .formats import Component, Family, Kind, LoraFile, LoraFormat, ModuleUpdate
from .formats.write import Factor, OutModule, OutputFormat
from .options import choice

if TYPE_CHECKING:
    import torch

__all__ = [
    "FileModule",
    "check_together",
    "is_lora_kind",
    "lora_factors",
    "match_modules",
    "module_name",
    "output_format",
    "kept_module",
    "refuse_kind",
    "resized_module",
]

#: The kinds a truncated SVD of ``up @ down`` can rewrite: LoRA/LoCon and LoCon Tucker.
_LORA_KINDS = (Kind.LORA, Kind.LOCON_TUCKER)
#: UNet names of the LDM (SGM) spelling, which kohya uses for SDXL (spec §2.1).
_LDM_BLOCKS = ("input_blocks", "output_blocks", "middle_block")


def is_lora_kind(update: ModuleUpdate) -> bool:
    """Whether the module is a plain low-rank product (no DoRA magnitude, no lora_B bias)."""
    return (
        update.kind in _LORA_KINDS and update.dora_scale is None and "up_bias" not in update.factors
    )


@dataclass(frozen=True)
class FileModule:
    """One LoRA module of an input file: ``index`` of the file, the update, and the shapes
    its output factors take: ``up`` (out, k[, 1, 1]) and ``down`` (k, in[, kh, kw])."""

    index: int
    path: Path
    update: ModuleUpdate

    @property
    def rank(self) -> int:
        return self.update.factors["down"].shape[0]

    @property
    def down_tail(self) -> tuple[int, ...]:
        """down's shape after the rank: (in,) or (in, kh, kw) (a Tucker mid's kernel)."""
        down = self.update.factors["down"].shape
        mid = self.update.factors.get("mid")
        return (down[1], *mid.shape[2:]) if mid is not None else tuple(down[1:])

    @property
    def up_tail(self) -> tuple[int, ...]:
        """up's shape after the rank: () for a Linear, (1, 1) for a conv."""
        return tuple(self.update.factors["up"].shape[2:])

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in·kh·kw): the update as a matrix."""
        return self.update.factors["up"].shape[0], math.prod(self.down_tail)


def lora_factors(
    module: FileModule, get: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up, right)``, float64, with ``scaling · up @ right`` the update flattened to
    (out, in·kh·kw): up (out, r), right (r, in·kh·kw) = down flattened. LoCon Tucker:
    right[m, (j,k,l)] = Σ_n mid[m,n,k,l] down[n,j], so up @ right is ``ops.tucker_delta``'s
    einsum (spec §4), exactly, without the dense update."""
    import torch

    up, down = get["up"].to(torch.float64), get["down"].to(torch.float64)
    up2d, down2d = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)
    if "mid" not in get:
        return up2d, down2d
    right = torch.einsum("mnkl,nj->mjkl", get["mid"].to(torch.float64), down2d)
    return up2d, right.reshape(right.shape[0], -1)


def output_format(reads: Sequence[LoraFile], given: str | None) -> OutputFormat:
    """The format to write: ``given``, else the inputs' one format (old diffusers files are
    written in the current diffusers format).

    Raises:
        OptionError: an unknown ``given``.
        IncompatibleError: inputs of several formats and no ``given``.
    """
    if given is not None:
        return choice(OutputFormat, given, "format")
    first = reads[0]
    for other in reads[1:]:
        if _written_as(other.format) is not _written_as(first.format):
            raise IncompatibleError(
                f"is a {other.format.value} LoRA, {first.path} a {first.format.value} one",
                path=other.path, hint="state the output's format with --format kohya|diffusers",
            )  # fmt: skip
    return _written_as(first.format)


def _written_as(fmt: LoraFormat) -> OutputFormat:
    return OutputFormat.KOHYA if fmt is LoraFormat.KOHYA else OutputFormat.DIFFUSERS


def _unet_style(read: LoraFile) -> str | None:
    keys = [u.key for u in read.updates if u.component is Component.UNET]
    if not keys:
        return None
    return "LDM" if any(k.startswith(_LDM_BLOCKS) for k in keys) else "diffusers"


def _compatible(a: Family, b: Family) -> bool:
    loose = (Family.UNKNOWN, Family.SD1_SD2)
    return a is b or Family.UNKNOWN in (a, b) or (
        (a in loose or b in loose) and {a, b} <= {Family.SD1, Family.SD2, Family.SD1_SD2}
    )  # fmt: skip


def check_together(reads: Sequence[LoraFile]) -> Family:
    """The family of LoRA files combined together: one family, one UNet spelling.

    Raises:
        IncompatibleError: two files of different families, or whose UNet modules are spelled
            in different layouts (LDM vs diffusers), naming both files.
    """
    family, first = reads[0].family, reads[0]
    for other in reads[1:]:
        if not _compatible(family, other.family):
            raise IncompatibleError(
                f"is a {other.family.value} LoRA, {first.path} a {family.value} one",
                path=other.path, hint="combine LoRAs trained for one model family",
            )  # fmt: skip
        if family in (Family.UNKNOWN, Family.SD1_SD2):
            family = other.family
        styles = (_unet_style(first), _unet_style(other))
        if None not in styles and styles[0] != styles[1]:
            raise IncompatibleError(
                f"names its UNet modules in the {styles[1]} layout, {first.path} in the "
                f"{styles[0]} one",
                path=other.path,
                hint="rewrite one with `lorasurgeon convert --base BASE` so that the names agree",
            )  # fmt: skip
    return family


def refuse_kind(module: FileModule, command: str, keep_flag: bool) -> AdapterError:
    """The error for a module ``command`` cannot treat as LoRA, naming file and module."""
    update = module.update
    if update.dora_scale is not None:
        what, hint = "a DoRA module (dora_scale)", "its magnitude belongs to its exact update"
    elif "up_bias" in update.factors:
        what, hint = "a module with a lora_B bias", "its bias is no low-rank factor"
    else:
        what = f"a {update.kind.value} module"
        hint = "only LoRA/LoCon modules (lora_down/lora_up[/lora_mid]) are low-rank products"
    if keep_flag:
        hint += "; --keep-lycoris copies LoHa, LoKr and full modules unchanged"
    return AdapterError(f"{what} cannot be {command}d as LoRA", path=module.path,
                        tensor=update.source, hint=hint)  # fmt: skip


def _match_key(update: ModuleUpdate) -> tuple[Component, str]:
    """(component, mangled path): kohya's ``lora_te_`` and ``lora_te1_`` are one text encoder,
    and text-encoder paths match with or without ``text_model.`` (spec §2.3)."""
    if update.component.is_text_encoder:
        component = Component.TE1 if update.component is Component.TE else update.component
        return component, update.key.removeprefix("text_model_")
    return update.component, update.key


def match_modules(reads: Sequence[LoraFile]) -> list[list[FileModule]]:
    """The LoRA modules of every file grouped by (component, mangled module path), each
    group in input order, groups in the first file's order then the others'.

    Raises:
        AdapterError: a module that is not LoRA (LoHa, LoKr, full, norm, DoRA, lora_B bias).
        IncompatibleError: a module whose update has another shape in another file.
    """
    groups: dict[tuple[Component, str], list[FileModule]] = {}
    for i, read in enumerate(reads):
        for update in read.updates:
            module = FileModule(i, read.path, update)
            if not is_lora_kind(update):
                raise refuse_kind(module, "combine", keep_flag=False)
            groups.setdefault(_match_key(update), []).append(module)
    for group in groups.values():
        first = group[0]
        for other in group[1:]:
            if (other.shape, other.down_tail, other.up_tail) != (
                first.shape, first.down_tail, first.up_tail
            ):  # fmt: skip
                raise IncompatibleError(
                    f"update of shape {other.shape} (down {other.down_tail}) here but "
                    f"{first.shape} (down {first.down_tail}) in {first.path}",
                    path=other.path, tensor=other.update.source,
                    hint="the LoRAs were trained on different base models",
                )  # fmt: skip
    return list(groups.values())


def module_name(module: FileModule, read: LoraFile, fmt: OutputFormat) -> str:
    """The module's name in ``fmt``: the input's own, mangled for kohya; kohya names cannot
    become diffusers/PEFT paths without a base.

    Raises:
        OptionError: kohya names to diffusers or PEFT.
    """
    from .convert import output_module_name

    try:
        return output_module_name(module.update, read, fmt, None)
    except OptionError as e:  # resize and combine take no base: convert does
        raise OptionError(
            e.message, path=e.path, tensor=e.tensor,
            hint=f"convert it first: `lorasurgeon convert LORA -o OUT --to {fmt.value} --base "
            "BASE`, then resize or combine that",
        ) from None  # fmt: skip


def resized_module(module: FileModule, name: str, rank: int, alpha: float, dtype: str) -> OutModule:
    """The output module of a LoRA module written at ``rank`` with ``alpha`` (computed
    factors, ``dtype``): down (k, in[, kh, kw]), up (out, k[, 1, 1])."""
    up_shape = (module.shape[0], rank, *module.up_tail)
    down_shape = (rank, *module.down_tail)
    if len(down_shape) > 2 and not module.up_tail:
        up_shape = (*up_shape, 1, 1)  # a conv's up is (out, k, 1, 1) (spec §1.1)
    factors = {"down": Factor(dtype, down_shape), "up": Factor(dtype, up_shape)}
    update = module.update
    return OutModule(update.component, name, Kind.LORA, factors, alpha, rank, None, update.source)


def kept_module(module: FileModule, name: str) -> OutModule:
    """A module copied unchanged, its alpha and every part kept byte for byte."""
    update = module.update
    factors = {part: Factor.copy_of(info) for part, info in update.factors.items()}
    dora = Factor.copy_of(update.dora_scale) if update.dora_scale is not None else None
    return OutModule(update.component, name, update.kind, factors, update.alpha, update.rank,
                     dora, update.source)  # fmt: skip

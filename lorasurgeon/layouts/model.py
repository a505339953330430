"""The records a base checkpoint's layout is described by. Plain data, no I/O."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from ..formats.model import Component, Family

__all__ = ["Layout", "LayoutKind", "Piece", "Target"]


class LayoutKind(str, Enum):
    """How a base checkpoint is laid out (shared/spec/sd-lora.md §5.2)."""

    LDM = "ldm"  # LDM/SGM single file: model.diffusion_model., cond_stage_model./conditioner.
    DIFFUSERS = "diffusers"  # a diffusers pipeline folder, one checkpoint per component
    UNET = "unet"  # a UNet-only file, LDM or diffusers paths
    BFL = "bfl"  # a FLUX transformer file with BFL paths (optionally model.diffusion_model.)
    DIT = "dit"  # a diffusers FLUX transformer-only file


@dataclass(frozen=True)
class Piece:
    """Where (part of) a module's delta goes: ``delta_rows`` of the delta (all when None) are
    added to ``weight_rows`` of ``tensor`` (all when None), transposed when ``transposed``
    (OpenCLIP's ``text_projection``). ``checkpoint`` is the component's file or index."""

    checkpoint: Path
    tensor: str
    shape: tuple[int, ...]
    weight_rows: tuple[int, int] | None = None
    delta_rows: tuple[int, int] | None = None
    transposed: bool = False
    bias: str | None = None  # the module's bias tensor, for diff_b / b_norm updates


@dataclass(frozen=True)
class Target:
    """A module of the base: the delta shape it takes and the pieces the delta lands in."""

    component: Component
    module: str  # the base's own dotted path of the module (of its first piece)
    shape: tuple[int, ...]  # the module's weight shape as a LoRA sees it
    pieces: tuple[Piece, ...]
    name: str = ""  # the dotted module path this entry spells (``module`` or another spelling)


@dataclass(frozen=True)
class Layout:
    """A base checkpoint's layout and family, and every module a LoRA may target.

    ``targets`` maps (component, mangled module path) to the target; each module is entered
    under every spelling it has (its own, the other layout's, with and without
    ``text_model.``), built from the checkpoint's own keys (spec §2.5). ``checkpoints`` are the
    files (or indexes) holding weights, by component name (``""`` for a single file).
    """

    path: Path
    kind: LayoutKind
    family: Family
    inpainting: bool
    checkpoints: Mapping[str, Path]
    components: tuple[Component, ...]
    targets: Mapping[tuple[Component, str], Target]

"""The plan records of ``merge``: what each output tensor is made of, worked out from headers.

Plain data shared by the planning (``merge``) and computing (``stream``) halves, so that
neither imports the other. No I/O, no tensor math.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from . import engine
from .adapters import LoraModule
from .formats.model import ModuleUpdate
from .layouts.model import Piece
from .locations import Location
from .reader import TensorInfo
from .writer import OutputLayout

__all__ = [
    "STARTING_KINDS", "Change", "ChangeKind", "MergePlan", "TensorPlan", "merge_output",
]  # fmt: skip


class ChangeKind(str, Enum):
    """What an adapter does to one output tensor."""

    LORA = "lora"  # + scaling · B @ A
    DORA = "dora"  # DoRA: magnitude / norm · (W + delta)
    LORA_BIAS = "lora_bias"  # bias + scaling · lora_B.bias
    REPLACE = "replace"  # saved whole by the adapter (modules_to_save, trained biases)
    COPY = "copy"  # PEFT's copy of a LoRA-targeted embedding's base weight
    ROWS = "rows"  # trainable token rows replace base rows
    EXPERTS = "experts"  # target_parameters on a stack of experts: + scaling · B_e @ A_e each
    TRUNCATE = "truncate"  # KaSA: the base loses its r smallest singular components first
    DIFFUSION = "diffusion"  # a diffusion LoRA module (LoRA, LoCon, LoHa, LoKr, full, norm)

    def __str__(self) -> str:
        return self.value


#: Kinds that replace the whole tensor the other changes then start from.
STARTING_KINDS = (ChangeKind.REPLACE, ChangeKind.COPY)


@dataclass(frozen=True)
class Change:
    """One adapter's contribution to one output tensor. ``scaling`` already includes the
    adapter's weight and, for unmerge, the sign."""

    adapter: int
    kind: ChangeKind
    module: str
    source: TensorInfo | None = None
    lora: LoraModule | None = None
    transposed: bool = False
    scaling: float = 1.0
    indices: tuple[int, ...] = ()
    update: ModuleUpdate | None = None  # DIFFUSION: the module's canonical update
    piece: Piece | None = None  # DIFFUSION: where its delta lands in this tensor
    bias: bool = False  # DIFFUSION: the update's bias part (diff_b, b_norm) on the bias tensor


@dataclass(frozen=True)
class TensorPlan:
    """How one output tensor is made from ``base``: ``changes`` in order, the first of which
    may be a whole-tensor replacement (kind ``replace`` or ``copy``) that the rest start from."""

    name: str
    base: TensorInfo
    dtype: str
    changes: tuple[Change, ...] = ()

    @property
    def start(self) -> TensorInfo:
        """The tensor the deltas are added to: a replacement, or the base tensor."""
        first = self.changes[0] if self.changes else None
        if first is not None and first.kind in STARTING_KINDS and first.source is not None:
            return first.source
        return self.base

    @property
    def deltas(self) -> tuple[Change, ...]:
        return tuple(c for c in self.changes if c.kind not in STARTING_KINDS)

    @property
    def copied(self) -> bool:
        """True when the stored bytes pass through unchanged (from the base or an adapter)."""
        return not self.deltas and self.dtype == self.start.dtype


@dataclass(frozen=True)
class MergePlan:
    """The whole merge, worked out from headers: every output tensor and the output layout."""

    base: Location
    adapters: tuple[Location, ...]
    weights: tuple[float, ...]
    unmerge: bool
    tensors: tuple[TensorPlan, ...]
    layout: OutputLayout
    output_is_file: bool
    side_files: tuple[tuple[str, Path], ...] = ()
    config_text: str | None = None
    notes: tuple[str, ...] = ()
    # A diffusers pipeline folder: one plan per merged component (written to that
    # subdirectory) and the folder's other entries, copied unchanged.
    components: tuple[tuple[str, MergePlan], ...] = ()
    copied_entries: tuple[tuple[str, Path], ...] = ()

    @property
    def changes(self) -> dict[str, list[str]]:
        """Base tensor name -> what changes it, e.g. ``["lora from my-adapter/"]``."""
        described: dict[str, list[str]] = {}
        for t in self.tensors:
            items = [f"{c.kind} from {self.adapters[c.adapter]}" for c in t.changes]
            if t.dtype != t.base.dtype:
                items.append(f"{t.base.dtype} -> {t.dtype}")
            if items:
                described[t.name] = items
        return described


def merge_output(plan: MergePlan, out: Path) -> engine.Output:
    """The engine's view of the merge: unchanged tensors copied, side files (config.json with
    its dtype updated) beside a directory output."""
    copies = tuple(engine.Copy(t.name, t.start) for t in plan.tensors if t.copied)
    files = () if plan.output_is_file else plan.side_files
    texts: dict[str, str] = {}
    if plan.config_text is not None and not plan.output_is_file:
        texts["config.json"] = plan.config_text
        files = tuple((rel, path) for rel, path in files if rel != "config.json")
    return engine.Output(out, plan.layout, copies, files, texts)

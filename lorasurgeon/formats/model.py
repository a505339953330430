"""The canonical records every diffusion LoRA format is read into. Plain data, no I/O."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from ..reader import TensorInfo

__all__ = [
    "Component",
    "Family",
    "Kind",
    "LoraFile",
    "LoraFormat",
    "ModuleUpdate",
    "mangle",
]


class LoraFormat(str, Enum):
    """A LoRA file's format, detected from its keys (shared/spec/sd-lora.md §5.1)."""

    KOHYA = "kohya"  # kohya sd-scripts and LyCORIS: lora_unet_…/lora_te…_ names
    DIFFUSERS = "diffusers"  # PEFT keys under unet./text_encoder./transformer. prefixes
    DIFFUSERS_OLD = "diffusers-old"  # attention-processor keys: …to_q_lora.down.weight


class Component(str, Enum):
    """The model part a module belongs to. ``TE`` is the single text encoder of a kohya
    ``lora_te_`` name (SD1/SD2, the SDXL refiner); ``UNET`` also stands for a DiT."""

    UNET = "unet"
    TE = "te"
    TE1 = "te1"
    TE2 = "te2"
    TE3 = "te3"

    @property
    def is_text_encoder(self) -> bool:
        return self is not Component.UNET


class Kind(str, Enum):
    """The algorithm of one module's update (spec §4)."""

    LORA = "lora"  # lora_down/lora_up (LoRA, LoCon incl. k×k convs)
    LOCON_TUCKER = "locon-tucker"  # lora_down (1×1) + lora_mid (k×k) + lora_up
    LOHA = "loha"
    LOHA_TUCKER = "loha-tucker"
    LOKR = "lokr"
    FULL = "full"  # diff (+ diff_b)
    NORM = "norm"  # w_norm / b_norm


class Family(str, Enum):
    """The model family a LoRA or a checkpoint belongs to."""

    SD1 = "sd1"
    SD2 = "sd2"
    SD1_SD2 = "sd1/sd2"  # a LoRA whose names fit both; the base's shapes decide
    SDXL = "sdxl"
    SDXL_REFINER = "sdxl-refiner"
    FLUX = "flux"
    SD3 = "sd3"
    UNKNOWN = "unknown"


def mangle(path: str) -> str:
    """A module path as kohya spells it: every ``.`` replaced by ``_``. One-way only: the
    inverse is never computed (spec §2.5); lookups mangle the base's own names instead."""
    return path.replace(".", "_")


@dataclass(frozen=True)
class ModuleUpdate:
    """One module's update as stored in a LoRA file, in canonical terms.

    ``module`` is the module's name in the file's own spelling (kohya name without its
    prefix, or a dotted module path); ``key`` is its mangled form, which layouts look up.
    ``factors`` maps canonical part names to tensors: ``down``/``up``/``mid`` (LoRA, LoCon),
    ``up_bias`` (diffusers ``lora_B.bias``), ``w1a``/``w1b``/``w2a``/``w2b``/``t1``/``t2``
    (LoHa), ``w1``/``w1a``/``w1b``/``w2``/``w2a``/``w2b``/``t2`` (LoKr), ``diff``/``diff_b``
    (full), ``w_norm``/``b_norm`` (norm); a diffusers DoRA module adds ``magnitude`` (PEFT's
    ``lora_magnitude_vector``). ``scaling`` is the multiplier-free factor the
    format defines (α/r, or 1 where the format stores no alpha).
    """

    component: Component
    module: str
    source: str  # the name shown in errors: the file's key prefix of this module
    kind: Kind
    factors: Mapping[str, TensorInfo]
    alpha: float | None
    rank: int | None
    scaling: float
    dora_scale: TensorInfo | None = None

    @property
    def key(self) -> str:
        return mangle(self.module)


@dataclass(frozen=True)
class LoraFile:
    """A diffusion LoRA file read into canonical updates (headers and alphas only)."""

    path: Path
    format: LoraFormat
    family: Family
    updates: tuple[ModuleUpdate, ...]
    metadata: Mapping[str, str] = field(default_factory=dict)

    def components(self) -> tuple[Component, ...]:
        return tuple(sorted({u.component for u in self.updates}, key=list(Component).index))

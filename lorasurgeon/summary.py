"""What a checkpoint or adapter holds, from headers alone: ``summarize`` (the ``inspect`` command).

No tensor data is read and torch is not imported (except for a diffusion LoRA's alpha scalars).
"""

from __future__ import annotations

import collections
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .adapters import ADAPTER_CONFIG_NAME, LoraModule, open_adapter
from .clients import ClientCheck, client_checks
from .errors import AdapterError
from .locations import Role, resolve
from .provenance import read_provenance
from .reader import Checkpoint, open_checkpoint, read_config

__all__ = [
    "AdapterModuleSummary",
    "DiffusionModuleSummary",
    "DiffusionSummary",
    "LoraGroup",
    "Summary",
    "summarize",
]

#: Tensor-name prefixes of the UNet/DiT of a diffusion checkpoint (a layout is read only then).


@dataclass(frozen=True)
class AdapterModuleSummary:
    """One LoRA module of an adapter."""

    module: str
    rank: int
    alpha: float
    scaling: float
    dora: bool


@dataclass(frozen=True)
class DiffusionModuleSummary:
    """One module of a diffusion LoRA file, in the file's own spelling."""

    component: str
    module: str
    kind: str
    rank: int | None
    alpha: float | None
    scaling: float
    dora: bool


@dataclass(frozen=True)
class LoraGroup:
    """The modules of one component sharing kind, rank and alpha (None: no alpha, α = r)."""

    component: str
    kind: str
    rank: int | None
    alpha: float | None
    modules: int


@dataclass(frozen=True)
class DiffusionSummary:
    """A diffusion LoRA file (``format``: kohya, diffusers, diffusers-old) or checkpoint
    (``layout``: ldm, diffusers, unet, bfl, dit): its family and components, with modules per
    component (a checkpoint's: the modules a LoRA may target)."""

    format: str | None
    layout: str | None
    family: str
    components: dict[str, int]
    groups: list[LoraGroup] = field(default_factory=list)
    modules: list[DiffusionModuleSummary] = field(default_factory=list)
    inpainting: bool = False
    parts: list[str] = field(default_factory=list)  # a diffusers folder's component folders


@dataclass(frozen=True)
class Summary:
    """What ``inspect`` shows. ``kind`` is ``checkpoint`` or ``adapter``; the adapter fields are
    empty for a checkpoint."""

    location: str
    path: str
    kind: str
    format: str
    files: int
    tensors: int
    parameters: int
    size_bytes: int
    dtypes: dict[str, int]
    model_type: str | None = None
    metadata: dict[str, str] | None = None
    peft_type: str | None = None
    r: int | None = None
    lora_alpha: float | None = None
    use_rslora: bool = False
    use_dora: bool = False
    target_modules: list[str] | str | None = None
    modules: list[AdapterModuleSummary] = field(default_factory=list)
    saved_whole: list[str] = field(default_factory=list)
    ignored_modules: list[str] = field(default_factory=list)
    clients: list[ClientCheck] = field(default_factory=list)
    provenance: dict[str, Any] | None = None
    diffusion: DiffusionSummary | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what ``inspect --json`` prints)."""
        return asdict(self)


def _counts(checkpoint: Checkpoint) -> dict[str, Any]:
    dtypes: dict[str, int] = {}
    for info in checkpoint:
        dtypes[info.dtype] = dtypes.get(info.dtype, 0) + info.numel
    shards = len(checkpoint.shards)
    fmt = "safetensors" + (f", {shards} shards with an index" if checkpoint.index_path else "")
    return {
        "format": fmt,
        "files": shards,
        "tensors": len(checkpoint.tensors),
        "parameters": sum(info.numel for info in checkpoint),
        "size_bytes": sum(info.nbytes for info in checkpoint),
        "dtypes": dtypes,
        "metadata": checkpoint.shards[0].metadata if checkpoint.shards else None,
    }


def _lora_summary(path: Path) -> DiffusionSummary | None:
    """A diffusion LoRA file's summary; None when the file's keys are no LoRA format's.

    Raises:
        AdapterError: a LoRA file with a bad module (unknown part, incomplete, mixed formats).
    """
    from .formats import detect_format, read_lora

    with open_checkpoint(path) as checkpoint:
        names = list(checkpoint.tensors)
    try:
        detect_format(path, names)
    except AdapterError:
        return None
    lora = read_lora(path)
    modules = [
        DiffusionModuleSummary(u.component.value, u.module, u.kind.value, u.rank, u.alpha,
                               u.scaling, u.dora_scale is not None)
        for u in lora.updates
    ]  # fmt: skip
    groups = collections.Counter((m.component, m.kind, m.rank, m.alpha) for m in modules)
    return DiffusionSummary(
        lora.format.value, None, lora.family.value,
        {c.value: sum(m.component == c.value for m in modules) for c in lora.components()},
        [LoraGroup(*key, n) for key, n in groups.items()], modules,
    )  # fmt: skip


def _layout_summary(path: Path) -> DiffusionSummary:
    """A diffusion checkpoint's layout, family and targetable modules per component."""
    from .layouts import open_layout

    layout = open_layout(path)
    distinct: dict[str, set[Any]] = {}
    for (component, _), target in layout.targets.items():
        distinct.setdefault(component.value, set()).add(target.pieces)
    return DiffusionSummary(
        None, layout.kind.value, layout.family.value,
        {c.value: len(distinct.get(c.value, ())) for c in layout.components},
        inpainting=layout.inpainting, parts=sorted(p for p in layout.checkpoints if p),
    )  # fmt: skip


def _is_diffusion_checkpoint(checkpoint: Checkpoint) -> bool:
    from .layouts import has_diffusion_tensors

    return has_diffusion_tensors(checkpoint.tensors)


def _folder_counts(path: Path, layout: DiffusionSummary) -> dict[str, Any]:
    """The counts of a diffusers folder: its components' weight files together."""
    total: dict[str, Any] = {"files": 0, "tensors": 0, "parameters": 0, "size_bytes": 0,
                             "dtypes": {}}  # fmt: skip
    for part in layout.parts:
        with open_checkpoint(path / part) as checkpoint:
            counts = _counts(checkpoint)
        for key in ("files", "tensors", "parameters", "size_bytes"):
            total[key] += counts[key]
        for dtype, n in counts["dtypes"].items():
            total["dtypes"][dtype] = total["dtypes"].get(dtype, 0) + n
    return {**total, "format": f"diffusers folder ({', '.join(layout.parts)})"}


def _module_summary(m: LoraModule) -> AdapterModuleSummary:
    return AdapterModuleSummary(m.module, m.rank, m.alpha, m.scaling, m.magnitude is not None)


def summarize(location: str | os.PathLike[str]) -> Summary:
    """Describe a checkpoint or adapter: format, tensor count, parameters, dtypes, size; for an
    adapter also its targets, each module's rank, alpha and scaling, and whether PEFT,
    llama.cpp and vLLM apply it as PEFT does (``clients``). A diffusion LoRA file (kind
    ``lora``) gets its format, family, components, modules grouped by kind, rank and alpha,
    and each module; a diffusion checkpoint or diffusers folder its layout, family and
    components (``diffusion``).

    Raises:
        LocationError, CheckpointError, AdapterError.
    """
    loc = resolve(location, role=Role.ANY)
    path = loc.path
    if path.is_dir() and (path / ADAPTER_CONFIG_NAME).is_file():
        with open_adapter(path, file_targets=True) as adapter:
            config = adapter.config
            target = config.raw.get("target_modules")
            return Summary(
                str(loc), str(path), "adapter", **_counts(adapter.checkpoint),
                peft_type=str(config.raw.get("peft_type")), r=config.r,
                lora_alpha=config.lora_alpha, use_rslora=config.use_rslora,
                use_dora=config.use_dora,
                target_modules=target if isinstance(target, (str, type(None))) else list(target),
                modules=[_module_summary(m) for m in adapter.modules.values()],
                saved_whole=sorted(adapter.replacements) + sorted(adapter.token_rows),
                ignored_modules=list(adapter.ignored), clients=client_checks(adapter),
                provenance=read_provenance(path),
            )  # fmt: skip
    if path.is_dir() and (path / "model_index.json").is_file():
        layout = _layout_summary(path)
        return Summary(str(loc), str(path), "checkpoint", **_folder_counts(path, layout),
                       provenance=read_provenance(path), diffusion=layout)  # fmt: skip
    lora = _lora_summary(path) if path.is_file() else None
    with open_checkpoint(path) as checkpoint:
        model_type = read_config(path).get("model_type")
        diffusion = lora or (_layout_summary(path) if _is_diffusion_checkpoint(checkpoint)
                             else None)  # fmt: skip
        return Summary(
            str(loc), str(path), "lora" if lora else "checkpoint", **_counts(checkpoint),
            model_type=model_type, provenance=read_provenance(path), diffusion=diffusion,
        )  # fmt: skip

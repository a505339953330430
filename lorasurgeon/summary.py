"""What a checkpoint or adapter holds, from headers alone: ``summarize`` (the ``inspect`` command).

No tensor data is read and torch is not imported.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from .adapters import ADAPTER_CONFIG_NAME, LoraModule, open_adapter
from .clients import ClientCheck, client_checks
from .locations import Role, resolve
from .provenance import read_provenance
from .reader import Checkpoint, open_checkpoint, read_config

__all__ = ["AdapterModuleSummary", "Summary", "summarize"]


@dataclass(frozen=True)
class AdapterModuleSummary:
    """One LoRA module of an adapter."""

    module: str
    rank: int
    alpha: float
    scaling: float
    dora: bool


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


def _module_summary(m: LoraModule) -> AdapterModuleSummary:
    return AdapterModuleSummary(m.module, m.rank, m.alpha, m.scaling, m.magnitude is not None)


def summarize(location: str | os.PathLike[str]) -> Summary:
    """Describe a checkpoint or adapter: format, tensor count, parameters, dtypes, size; for an
    adapter also its targets, each module's rank, alpha and scaling, and whether PEFT,
    llama.cpp and vLLM apply it as PEFT does (``clients``).

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
    with open_checkpoint(path) as checkpoint:
        model_type = read_config(path).get("model_type")
        return Summary(
            str(loc), str(path), "checkpoint", **_counts(checkpoint), model_type=model_type,
            provenance=read_provenance(path),
        )  # fmt: skip

"""Fold PEFT LoRA adapters into a base checkpoint, tensor by tensor: ``plan_merge`` and ``merge``.

Planning reads headers only and surfaces every error visible in metadata. Execution streams:
untouched tensors are copied by the kernel, changed ones are read, merged in float32 and
written at their planned offsets, while the next ones are being read.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from .adapters import Adapter, LoraModule, open_adapter
from .dtypes import COMPUTE_DTYPES, DTYPES, DType
from .errors import AdapterError, IncompatibleError, OptionError
from .locations import Location, Role, resolve
from .options import check_finite
from .reader import (
    Checkpoint,
    TensorInfo,
    open_checkpoint,
    read_config,
    side_files,
)
from .targets import INPUT_EMBEDDING_NAMES, OUTPUT_EMBEDDING_NAMES, is_conv1d_module
from .writer import (
    OutputLayout,
    OutputTensor,
    check_output_path,
    parse_size,
    plan_layout,
)

__all__ = [
    "Change", "ChangeKind", "DType", "MergePlan", "MergeReport", "TensorPlan", "merge",
    "plan_merge",
]  # fmt: skip

logger = logging.getLogger(__name__)

#: ``progress(done_bytes, total_bytes)``, called from worker threads as output is written.
ProgressCallback = Callable[[int, int], None]


class ChangeKind(str, Enum):
    """What an adapter does to one output tensor."""

    LORA = "lora"  # + scaling · B @ A
    DORA = "dora"  # DoRA: magnitude / norm · (W + delta)
    LORA_BIAS = "lora_bias"  # bias + scaling · lora_B.bias
    REPLACE = "replace"  # saved whole by the adapter (modules_to_save, trained biases)
    COPY = "copy"  # PEFT's copy of a LoRA-targeted embedding's base weight
    ROWS = "rows"  # trainable token rows replace base rows

    def __str__(self) -> str:
        return self.value


_STARTS = (ChangeKind.REPLACE, ChangeKind.COPY)


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
        if first is not None and first.kind in _STARTS and first.source is not None:
            return first.source
        return self.base

    @property
    def deltas(self) -> tuple[Change, ...]:
        return tuple(c for c in self.changes if c.kind not in _STARTS)

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


@dataclass(frozen=True)
class MergeReport:
    """What ``merge`` wrote."""

    out: Path
    tensors: int
    changed: int
    copied: int
    bytes_written: int
    seconds: float
    notes: tuple[str, ...] = field(default=())


@dataclass
class _Base:
    """The base checkpoint as planning sees it."""

    checkpoint: Checkpoint
    model_type: str | None
    tensors: Mapping[str, TensorInfo] = field(init=False)

    def __post_init__(self) -> None:
        self.tensors = self.checkpoint.tensors

    def find(self, name: str, *, adapter: Adapter, tensor: str) -> TensorInfo:
        """The base tensor ``name``; a tied output embedding resolves to the input embedding."""
        info = self.tensors.get(name)
        if info is not None:
            return info
        module = name.rsplit(".", 1)[0]
        if module.rsplit(".", 1)[-1] in OUTPUT_EMBEDDING_NAMES and name.endswith(".weight"):
            for candidate in self.tensors:
                if candidate.endswith(INPUT_EMBEDDING_NAMES):
                    return self.tensors[candidate]  # tied: one tensor serves both
        raise IncompatibleError(
            f"matches no base tensor (looked for {name})",
            path=adapter.checkpoint.path,
            tensor=tensor,
            hint="was this adapter trained on a different base model?",
        )


def _lora_change(
    index: int, adapter: Adapter, lm: LoraModule, base: _Base, scaling: float
) -> tuple[str, Change]:
    where = adapter.checkpoint.path
    w = base.find(lm.module + ".weight", adapter=adapter, tensor=lm.lora_a.name)
    a, b = lm.lora_a.shape, lm.lora_b.shape
    expected: list[tuple[int, ...]]
    if lm.embedding:
        expected, transposed = [(a[1], b[0])], True
    elif len(a) > 2:
        if len(w.shape) != len(a) or w.shape[1] != a[1]:
            raise IncompatibleError(
                f"conv LoRA {a} does not fit base {w.shape} (grouped convolutions cannot be "
                "merged)",
                path=where,
                tensor=lm.lora_a.name,
            )
        expected, transposed = [(b[0], *a[1:])], False
    elif is_conv1d_module(base.model_type, lm.module):
        expected, transposed = [(a[1], b[0])], True
    else:
        expected = [(b[0], a[1]), (a[1], b[0])]  # nn.Linear, else an unknown Conv1D model
        transposed = w.shape == expected[1] and w.shape != expected[0]
    if w.shape not in expected or any(d != 1 for d in b[2:]):
        raise IncompatibleError(
            f"delta shape {expected[0]} does not fit base tensor {w.name} {w.shape}",
            path=where,
            tensor=lm.lora_b.name,
            hint="was this adapter trained on a different base model?",
        )
    if lm.magnitude is not None:
        units = w.shape[1] if transposed else w.shape[0]
        if lm.magnitude.numel != units:
            raise AdapterError(
                f"DoRA magnitude has {lm.magnitude.numel} values for {units} output units",
                path=where,
                tensor=lm.magnitude.name,
            )
    kind = ChangeKind.DORA if lm.magnitude is not None else ChangeKind.LORA
    return w.name, Change(index, kind, lm.module, lora=lm, transposed=transposed, scaling=scaling)


def _bias_change(
    index: int, adapter: Adapter, lm: LoraModule, base: _Base, scaling: float
) -> tuple[str, Change]:
    assert lm.lora_b_bias is not None
    bias = base.tensors.get(lm.module + ".bias")
    if bias is None or bias.shape != lm.lora_b_bias.shape:
        raise IncompatibleError(
            "lora_bias needs a base bias of the same shape, and the base has none",
            path=adapter.checkpoint.path,
            tensor=lm.lora_b_bias.name,
        )
    change = Change(index, ChangeKind.LORA_BIAS, lm.module, source=lm.lora_b_bias, scaling=scaling)
    return bias.name, change


def _replacements(
    index: int, adapter: Adapter, base: _Base, unmerge: bool
) -> list[tuple[str, Change]]:
    found = []
    for name, info in adapter.replacements.items():
        copy = name in adapter.embedding_copies
        if name not in base.tensors and not copy:
            module = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
            hint = (
                "saving a tied output embedding whole unties it, which lorasurgeon does not do yet"
                if module in OUTPUT_EMBEDDING_NAMES
                else "was this adapter trained on a different base model?"
            )
            raise IncompatibleError(
                f"saved whole, but the base has no tensor {name}",
                path=adapter.checkpoint.path,
                tensor=info.name,
                hint=hint,
            )
        target = base.find(name, adapter=adapter, tensor=info.name)
        if target.shape != info.shape:
            raise IncompatibleError(
                f"saved whole with shape {info.shape}, base {target.name} is {target.shape}",
                path=adapter.checkpoint.path,
                tensor=info.name,
                hint="a resized vocabulary? resize the base first",
            )
        if unmerge:
            if copy:
                continue  # a copy of the base weight: nothing to undo
            raise OptionError(
                "was saved whole by the adapter, so the base value is lost; cannot unmerge",
                path=adapter.checkpoint.path,
                tensor=info.name,
            )
        kind = ChangeKind.COPY if copy else ChangeKind.REPLACE
        found.append((target.name, Change(index, kind, name, source=info)))
    return found


def _token_changes(
    index: int, adapter: Adapter, base: _Base, unmerge: bool
) -> list[tuple[str, Change]]:
    found = []
    for module, (indices, info) in adapter.token_rows.items():
        if unmerge:
            raise OptionError(
                "trainable token rows replace base rows; the originals are lost; cannot unmerge",
                path=adapter.checkpoint.path,
                tensor=info.name,
            )
        w = base.find(module + ".weight", adapter=adapter, tensor=info.name)
        if (
            len(w.shape) != 2
            or info.shape != (len(indices), w.shape[1])
            or max(indices) >= w.shape[0]
        ):
            raise IncompatibleError(
                f"{len(indices)} token rows {info.shape} do not fit {w.name} {w.shape}",
                path=adapter.checkpoint.path,
                tensor=info.name,
            )
        found.append((w.name, Change(index, ChangeKind.ROWS, module, source=info, indices=indices)))
    return found


def _adapter_changes(
    index: int, adapter: Adapter, weight: float, base: _Base, unmerge: bool
) -> list[tuple[str, Change]]:
    sign = -1.0 if unmerge else 1.0
    changes = _replacements(index, adapter, base, unmerge)
    for lm in adapter.modules.values():
        if unmerge and lm.magnitude is not None:
            raise OptionError(
                "DoRA merges cannot be undone offline (the original weight norms are lost)",
                path=adapter.checkpoint.path,
                tensor=lm.module,
            )
        scaling = lm.scaling * weight * sign
        changes.append(_lora_change(index, adapter, lm, base, scaling))
        if lm.lora_b_bias is not None:
            changes.append(_bias_change(index, adapter, lm, base, scaling))
    changes += _token_changes(index, adapter, base, unmerge)
    return changes


def _order(changes: list[Change], where: Path, name: str) -> tuple[Change, ...]:
    """Order one tensor's changes: the replacement it starts from, deltas, then token rows."""
    starts = [c for c in changes if c.kind in _STARTS]
    if sum(c.kind is ChangeKind.REPLACE for c in starts) > 1:
        raise AdapterError(
            "saved whole by more than one adapter; merge them one at a time",
            path=where,
            tensor=name,
        )
    starts.sort(
        key=lambda c: c.kind is not ChangeKind.REPLACE
    )  # a trained tensor wins over a base copy
    rows = [c for c in changes if c.kind is ChangeKind.ROWS]
    seen: set[int] = set()
    for c in rows:
        if seen & set(c.indices):
            raise AdapterError("two adapters replace the same token rows", path=where, tensor=name)
        seen |= set(c.indices)
    deltas = [c for c in changes if c.kind not in _STARTS and c.kind is not ChangeKind.ROWS]
    return tuple(starts[:1] + deltas + rows)


def _output_dtype(info: TensorInfo, dtype: str | None, changed: bool, where: Path) -> str:
    if changed and info.dtype not in COMPUTE_DTYPES:
        raise IncompatibleError(
            f"cannot merge into a {info.dtype} tensor (quantized base?)",
            path=where,
            tensor=info.name,
        )
    return dtype if dtype is not None and info.dtype in COMPUTE_DTYPES else info.dtype


def _plan_tensors(
    base: _Base,
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    unmerge: bool,
    dtype: str | None,
) -> tuple[TensorPlan, ...]:
    per_tensor: dict[str, list[Change]] = {}
    order = range(len(adapters) - 1, -1, -1) if unmerge else range(len(adapters))
    for i in order:
        for name, change in _adapter_changes(i, adapters[i], weights[i], base, unmerge):
            per_tensor.setdefault(name, []).append(change)
    plans = []
    where = base.checkpoint.path
    for info in base.tensors.values():
        changes = _order(per_tensor.get(info.name, []), where, info.name)
        has_deltas = any(c.kind not in _STARTS for c in changes)
        out_dtype = _output_dtype(info, dtype, has_deltas, where)
        plans.append(TensorPlan(info.name, info, out_dtype, changes))
    return tuple(plans)


def _config_text(base: Location, dtype: str | None) -> str | None:
    """config.json with its dtype updated, when --dtype changes it."""
    config = read_config(base.path)
    if dtype is None or not config:
        return None
    name = DTYPES[dtype].torch_name
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = name
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def _normalize(
    adapters: Sequence[str | os.PathLike[str]], weights: Sequence[float] | None, dtype: str
) -> tuple[tuple[float, ...], str | None]:
    if not adapters:
        raise OptionError("at least one adapter is needed")
    if weights is None:
        weights = [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise OptionError(f"{len(weights)} weights given for {len(adapters)} adapters")
    for w in weights:
        check_finite("--weight", w)
    code = DType.code_of(dtype)
    return tuple(float(w) for w in weights), code


def plan_merge(
    base: str | os.PathLike[str],
    adapters: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str] | None = None,
    *,
    weights: Sequence[float] | None = None,
    unmerge: bool = False,
    dtype: str = "auto",
    max_shard_size: int | str | None = None,
) -> MergePlan:
    """Work out a merge from headers alone; nothing is computed or written.

    Every error visible in metadata surfaces here: adapters that don't fit the base, unsupported
    adapter kinds, what cannot be unmerged. ``plan.changes`` says which base tensors change and
    by which adapter (what ``--dry-run`` prints).

    Raises:
        LocationError, CheckpointError, AdapterError, IncompatibleError, OptionError.
    """
    weights_t, dtype_code = _normalize(adapters, weights, dtype)
    shard_limit = _shard_limit(max_shard_size)
    base_loc = resolve(base, role=Role.CHECKPOINT)
    adapter_locs = tuple(resolve(a, role=Role.ADAPTER) for a in adapters)
    output_is_file = base_loc.path.is_file()
    if output_is_file and shard_limit is not None:
        raise OptionError("--max-shard-size needs a base directory (the output is one file)")
    model_type = read_config(base_loc.path).get("model_type")
    with open_checkpoint(base_loc.path) as checkpoint:
        opened: list[Adapter] = []
        try:
            for loc in adapter_locs:
                opened.append(open_adapter(loc.path, model_type=model_type))
            tensors = _plan_tensors(
                _Base(checkpoint, model_type), opened, weights_t, unmerge, dtype_code
            )
            notes = _notes(opened, adapter_locs)
        finally:
            for adapter in opened:
                adapter.close()
        out_name = Path(out).name if out is not None and output_is_file else None
        planned = [OutputTensor(t.name, t.dtype, t.base.shape) for t in tensors]
        layout = plan_layout(checkpoint, planned, max_shard_size=shard_limit, file_name=out_name)
        files, skipped = side_files(checkpoint)
    if skipped:
        notes += (f"not copied (weights that the merge does not cover): {', '.join(skipped)}",)
    return MergePlan(
        base_loc, adapter_locs, weights_t, unmerge, tensors, layout, output_is_file,
        tuple(files), _config_text(base_loc, dtype_code), notes,
    )  # fmt: skip


def _shard_limit(max_shard_size: int | str | None) -> int | None:
    if max_shard_size is None:
        return None
    try:
        return parse_size(max_shard_size)
    except ValueError as e:
        raise OptionError(str(e)) from e


def _notes(adapters: Sequence[Adapter], locations: Sequence[Location]) -> tuple[str, ...]:
    notes = []
    for adapter, loc in zip(adapters, locations, strict=True):
        if adapter.ignored:
            notes.append(
                f"{loc}: {len(adapter.ignored)} module(s) with LoRA tensors are not selected by "
                f"its adapter_config.json and are ignored, as PEFT does (e.g. {adapter.ignored[0]})"
            )
        if not adapter.modules and not adapter.replacements and not adapter.token_rows:
            notes.append(f"{loc}: the adapter changes nothing")
    return tuple(notes)


def merge(
    base: str | os.PathLike[str],
    adapters: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    weights: Sequence[float] | None = None,
    unmerge: bool = False,
    dtype: str = "auto",
    max_shard_size: int | str | None = None,
    overwrite: bool = False,
    device: str = "auto",
    progress: ProgressCallback | None = None,
) -> MergeReport:
    """Fold PEFT LoRA adapters into a base checkpoint, as PEFT's ``merge_and_unload()`` does.

    Each adapter's delta (``scaling · B @ A``, per layer type as in PEFT, times its weight) is
    added in float32 and the result rounded once to the output dtype. Tensors the adapters do
    not touch are copied byte for byte; names, shapes, dtypes, shard files, the index and the
    metadata are kept, and the base directory's other files are copied. Nothing exists at
    ``out`` unless this returns: the output is built in a temporary sibling and renamed.

    Args:
        base: a checkpoint directory, a ``.safetensors`` file, or a Hub repo id.
        adapters: PEFT adapter directories or Hub repo ids, merged in order.
        out: the output directory (a file when ``base`` is a file).
        weights: one factor per adapter (default 1.0 each).
        unmerge: subtract the deltas instead (undo a merge); refused for DoRA and for
            tensors an adapter saved whole.
        dtype: ``auto`` keeps each tensor's dtype; ``float32``/``float16``/``bfloat16`` converts
            every floating-point tensor.
        max_shard_size: re-shard the output (bytes, or text like ``"5GB"``).
        overwrite: replace an existing ``out`` (the old one is removed only after success).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        progress: called with (bytes done, bytes total) as the output is written.

    Raises:
        LocationError, CheckpointError, AdapterError, IncompatibleError, OptionError, OutputError.
    """
    started = time.monotonic()
    plan = plan_merge(
        base, adapters, out, weights=weights, unmerge=unmerge, dtype=dtype,
        max_shard_size=max_shard_size,
    )  # fmt: skip
    out_path = Path(out)
    inputs = [plan.base.path, *(a.path for a in plan.adapters)]
    check_output_path(out_path, inputs, overwrite=overwrite)
    if device != "auto" and device != "cpu":
        from .ops import resolve_device  # a GPU needs torch anyway: check it before writing

        resolve_device(device)
    for note in plan.notes:
        logger.warning(note)
    from .stream import execute  # imports torch: kept out of planning, --help and inspect

    written = execute(plan, out_path, overwrite=overwrite, device=device, progress=progress)
    changed = sum(1 for t in plan.tensors if not t.copied)
    return MergeReport(
        out_path, len(plan.tensors), changed, len(plan.tensors) - changed, written,
        time.monotonic() - started, plan.notes,
    )  # fmt: skip

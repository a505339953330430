"""The computing half of ``merge``: the merged tensors of a ``MergePlan`` as a stream for
the engine, which copies the unchanged tensors meanwhile and writes these.

Inputs are read ahead on a prefetch thread (with a kernel readahead window ahead of it) and
merged through a few reused buffers: memory follows the largest merged tensor, not the model.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .deltas import placed_update
from .dtypes import tensor_nbytes
from .engine import Computed
from .errors import IncompatibleError
from .pipeline import BufferPool, Readahead, prefetch
from .plans import Change, ChangeKind, MergePlan, TensorPlan
from .reader import TensorFiles, TensorInfo, as_tensor, check_finite_inputs

__all__ = ["computed_tensors"]

# How far the kernel reads ahead of the merge: enough to keep the disk busy while torch
# imports, small next to any page cache.
_READAHEAD_BYTES = 512 * 1024 * 1024


def _inputs(t: TensorPlan) -> list[TensorInfo]:
    """Every stored tensor that computing ``t`` reads."""
    needed = [t.start]
    for c in t.deltas:
        if c.update is not None:
            parts = [*c.update.factors.values(), c.update.dora_scale]
            needed += [info for info in parts if info is not None and info not in needed]
        elif c.lora is not None:
            needed += [c.lora.lora_a, c.lora.lora_b]
            if c.lora.diag is not None:
                needed.append(c.lora.diag)
            if c.kind is ChangeKind.DORA and c.lora.magnitude is not None:
                needed.append(c.lora.magnitude)
        elif c.source is not None:
            needed.append(c.source)
    return needed


def _updates(t: TensorPlan, loaded: Mapping[TensorInfo, Any], device: Any) -> list[Any]:
    import torch

    def get(info: TensorInfo) -> torch.Tensor:
        tensor: torch.Tensor = loaded[info].to(device=device, dtype=torch.float32)
        return tensor

    updates = [
        placed_update(c.update, c.piece, get, c.scaling, t.base.shape, bias=c.bias)
        if c.update is not None and c.piece is not None
        else _update(c, get, device)
        for c in t.deltas
    ]
    return [u for u in updates if u is not None]


def _update(c: Change, get: Callable[[TensorInfo], Any], device: Any) -> Any:
    """The ``ops`` update that carries out one planned change."""
    import torch

    from . import ops

    lm = c.lora
    if c.kind is ChangeKind.TRUNCATE and lm is not None:
        return ops.SvdTruncate(lm.rank)
    if lm is not None:
        a, b = get(lm.lora_a), get(lm.lora_b)
        a = ops.block_diagonal(a, lm.blocks_a) if lm.blocks_a > 1 else a
        b = ops.block_diagonal(b, lm.blocks_b) if lm.blocks_b > 1 else b
        b = b * get(lm.diag) if lm.diag is not None else b  # KaSA: (B · diag) @ A
        if c.kind is ChangeKind.EXPERTS:
            return ops.ExpertDelta(a, b, c.scaling, a.shape[0] // lm.rank, c.transposed)
        stored = lm.magnitude if c.kind is ChangeKind.DORA else None
        magnitude = get(stored).reshape(-1) if stored is not None else None
        a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
        return ops.LoraDelta(a2, b2, c.scaling, c.transposed, magnitude)
    if c.kind is ChangeKind.LORA_BIAS and c.source is not None:
        return ops.AddDelta(get(c.source) * c.scaling)
    if c.kind is ChangeKind.ROWS and c.source is not None:
        rows = torch.tensor(c.indices, dtype=torch.long, device=device)
        return ops.SetRows(rows, get(c.source))
    return None


@dataclass
class _Loaded:
    """One tensor's stored inputs: the start tensor in a pooled buffer, the small rest."""

    start: bytearray
    others: dict[TensorInfo, bytearray]


def _read_inputs(
    t: TensorPlan, files: TensorFiles, pool: BufferPool, stop: threading.Event
) -> _Loaded:
    start = pool.acquire(stop)
    try:
        files.read_into(t.start, memoryview(start)[: t.start.nbytes])
        others = {info: files.read(info) for info in _inputs(t)[1:]}
    except BaseException:
        pool.release(start)
        raise
    return _Loaded(start, others)


def _in_place(t: TensorPlan) -> bool:
    """Whether ``t`` is merged into its own read buffer: same dtype in and out (the blocked
    merge reads each block of rows before writing it), which saves a result buffer."""
    return t.dtype == t.start.dtype and t.start.shape == t.base.shape


def _compute(
    t: TensorPlan, inputs: _Loaded, device: Any, out: bytearray, files: TensorFiles
) -> memoryview:
    """Merge one tensor into ``out`` (which may be ``inputs.start`` itself) and return the
    bytes to store."""
    from . import ops

    loaded = {info: as_tensor(info, data) for info, data in inputs.others.items()}
    start = as_tensor(t.start, inputs.start).to(device)
    result = as_tensor(t.base, out, t.dtype)
    ops.apply_updates(start, _updates(t, loaded, device), result.dtype, out=result)
    if not ops.all_finite(result):
        if out is inputs.start:  # the stored tensor was overwritten: read it again to judge
            start = as_tensor(t.start, files.read(t.start))
        _refuse_non_finite(t, start, loaded)
    return memoryview(out)[: _out_bytes(t)]


def _refuse_non_finite(t: TensorPlan, start: Any, loaded: Mapping[TensorInfo, Any]) -> None:
    """Name the input that made ``t`` NaN or infinite, or else say that the result overflows."""
    check_finite_inputs([(t.start, start), *loaded.items()],
                 hint="merging it would write NaN/inf into " + t.name)  # fmt: skip
    what = "the merged value overflows" if t.deltas else "its values overflow"
    raise IncompatibleError(
        f"{what} {t.dtype} (inf)", path=t.start.path, tensor=t.name,
        hint=("check the --weight values, or " if t.deltas else "") + "write a wider --dtype",
    )  # fmt: skip


def computed_tensors(plan: MergePlan, device: str) -> Callable[[TensorFiles], Iterator[Computed]]:
    """The merged tensors of ``plan`` as the engine's stream: inputs read ahead on a prefetch
    thread (with a kernel readahead window ahead of it) into reused buffers, each merged on
    this thread into a pooled result buffer that the engine returns once written. torch is
    imported only when the first tensor is needed, while the copier already streams."""
    computed = [t for t in plan.tensors if not t.copied]
    largest = max([t.start.nbytes for t in computed] + [_out_bytes(t) for t in computed] + [0])

    def produce(files: TensorFiles) -> Iterator[Computed]:
        stop = threading.Event()
        # Reads: one read ahead, one being merged, and (merged in place) one queued for and
        # one in the writer. Results, for tensors whose dtype changes: made only if needed.
        reads = BufferPool(largest, 3)
        results = BufferPool(largest, 3)  # one merged, one queued, one being written
        ahead = Readahead(
            computed, lambda t: t.start.nbytes, lambda t: files.advise(t.start),
            window=_READAHEAD_BYTES,
        )  # fmt: skip
        positions = {t.name: i for i, t in enumerate(computed)}

        def load(t: TensorPlan) -> _Loaded:
            ahead.advance(positions[t.name])
            return _read_inputs(t, files, reads, stop)

        loads = prefetch(computed, load, depth=1, stop=stop)
        try:
            from . import ops  # torch loads while the copier and the prefetcher stream

            dev = ops.resolve_device(device)
            with ops.one_compute_thread(dev):
                for t, inputs in loads:
                    pool = reads if _in_place(t) and dev.type == "cpu" else results
                    buffer = inputs.start if pool is reads else results.acquire(stop)
                    try:
                        data = _compute(t, inputs, dev, buffer, files)
                    except BaseException:
                        pool.release(buffer)
                        raise
                    finally:
                        if pool is not reads:
                            reads.release(inputs.start)
                    yield Computed(t.name, data, functools.partial(_release, data, pool, buffer))
        finally:
            stop.set()
            loads.close()  # type: ignore[attr-defined]

    return produce


def _release(data: memoryview, pool: BufferPool, buffer: bytearray) -> None:
    data.release()
    pool.release(buffer)


def _out_bytes(t: TensorPlan) -> int:
    return tensor_nbytes(t.dtype, t.base.numel) or 0

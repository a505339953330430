"""Execute a ``MergePlan``: the streaming half of ``merge``.

A copier thread streams unchanged tensors inside the kernel while the main thread imports
torch and merges the others; their inputs are read ahead on a prefetch thread (with a kernel
readahead window ahead of it) and their results written on a writer thread, all through a few
reused buffers. Memory follows the largest merged tensor, not the model.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .dtypes import tensor_nbytes
from .errors import IncompatibleError
from .merge import ChangeKind, MergePlan, ProgressCallback, TensorPlan
from .pipeline import BufferPool, Drain, Readahead, Worker, prefetch
from .reader import TensorFiles, TensorInfo, as_tensor, check_finite_inputs
from .writer import CheckpointWriter

__all__ = ["execute"]

# How far the kernel reads ahead of the merge: enough to keep the disk busy while torch
# imports, small next to any page cache.
_READAHEAD_BYTES = 512 * 1024 * 1024


class _Meter:
    """Adds up bytes written by several threads and reports them to ``progress``."""

    def __init__(self, progress: ProgressCallback | None, total: int) -> None:
        self._progress = progress
        self._total = total
        self._done = 0
        self._lock = threading.Lock()

    def add(self, nbytes: int) -> None:
        with self._lock:
            self._done += nbytes
            if self._progress is not None:
                self._progress(self._done, self._total)


def _copy_all(
    tensors: Sequence[TensorPlan], files: TensorFiles, writer: CheckpointWriter, meter: _Meter,
    stop: threading.Event,
) -> None:  # fmt: skip
    """Copy unchanged tensors from their files to the output, in the kernel."""
    for t in tensors:
        if stop.is_set():
            return
        source = t.start
        writer.copy(t.name, files.fd(source.path), source.offset, source.nbytes)
        meter.add(source.nbytes)


def _inputs(t: TensorPlan) -> list[TensorInfo]:
    """Every stored tensor that computing ``t`` reads."""
    needed = [t.start]
    for c in t.deltas:
        if c.lora is not None:
            needed += [c.lora.lora_a, c.lora.lora_b]
            if c.kind is ChangeKind.DORA and c.lora.magnitude is not None:
                needed.append(c.lora.magnitude)
        elif c.source is not None:
            needed.append(c.source)
    return needed


def _updates(t: TensorPlan, loaded: Mapping[TensorInfo, Any], device: Any) -> list[Any]:
    import torch

    from . import ops

    def get(info: TensorInfo) -> torch.Tensor:
        tensor: torch.Tensor = loaded[info].to(device=device, dtype=torch.float32)
        return tensor

    updates: list[ops.Update] = []
    for c in t.deltas:
        if c.lora is not None:
            a, b = get(c.lora.lora_a), get(c.lora.lora_b)
            stored = c.lora.magnitude if c.kind is ChangeKind.DORA else None
            magnitude = get(stored).reshape(-1) if stored is not None else None
            a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
            updates.append(ops.LoraDelta(a2, b2, c.scaling, c.transposed, magnitude))
        elif c.kind is ChangeKind.LORA_BIAS and c.source is not None:
            updates.append(ops.AddDelta(get(c.source) * c.scaling))
        elif c.kind is ChangeKind.ROWS and c.source is not None:
            rows = torch.tensor(c.indices, dtype=torch.long, device=device)
            updates.append(ops.SetRows(rows, get(c.source)))
    return updates


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


def _compute(t: TensorPlan, inputs: _Loaded, device: Any, out: bytearray) -> memoryview:
    """Merge one tensor into ``out`` and return the bytes to store."""
    from . import ops

    loaded = {info: as_tensor(info, data) for info, data in inputs.others.items()}
    start = as_tensor(t.start, inputs.start).to(device)
    result = as_tensor(t.base, out, t.dtype)
    ops.apply_updates(start, _updates(t, loaded, device), result.dtype, out=result)
    if result.is_floating_point() and not bool(result.isfinite().all()):
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


def _write(
    writer: CheckpointWriter, meter: _Meter, pool: BufferPool, name: str, buffer: bytearray,
    data: memoryview,
) -> None:  # fmt: skip
    nbytes = data.nbytes
    try:
        writer.write(name, data)
    finally:
        data.release()
        pool.release(buffer)
    meter.add(nbytes)


def execute(
    plan: MergePlan, out: Path, *, overwrite: bool, device: str,
    progress: ProgressCallback | None,
) -> int:  # fmt: skip
    """Write the planned output. A copier thread streams unchanged tensors while this thread
    imports torch and merges the others; their inputs are read ahead on a prefetch thread and
    their results written on a writer thread, all through a few reused buffers."""
    meter = _Meter(progress, plan.layout.total_size)
    stop = threading.Event()
    copied = [t for t in plan.tensors if t.copied]
    computed = [t for t in plan.tensors if not t.copied]
    largest = max([t.start.nbytes for t in computed] + [_out_bytes(t) for t in computed] + [0])
    reads = BufferPool(largest, 2)  # prefetch depth 1: one being merged, one read ahead
    results = BufferPool(largest, 3)  # drain depth 1: one merged, one queued, one writing
    with TensorFiles() as files, CheckpointWriter(out, plan.layout, overwrite=overwrite) as writer:
        copier = Worker(lambda: _copy_all(copied, files, writer, meter, stop), "lorasurgeon-copy")
        copier.start()
        drain = Drain(depth=1, stop=stop, name="lorasurgeon-write")
        try:
            ahead = Readahead(
                computed, lambda t: t.start.nbytes, lambda t: files.advise(t.start),
                window=_READAHEAD_BYTES,
            )  # fmt: skip

            def load(t: TensorPlan) -> _Loaded:
                ahead.advance(positions[t.name])
                return _read_inputs(t, files, reads, stop)

            positions = {t.name: i for i, t in enumerate(computed)}
            loads = prefetch(computed, load, depth=1, stop=stop)
            from . import ops  # torch loads while the copier and the prefetcher stream

            dev = ops.resolve_device(device)
            for t, inputs in loads:
                buffer = results.acquire(stop)
                try:
                    data = _compute(t, inputs, dev, buffer)
                except BaseException:
                    results.release(buffer)
                    raise
                finally:
                    reads.release(inputs.start)
                drain.submit(
                    functools.partial(_write, writer, meter, results, t.name, buffer, data)
                )
            drain.close()
            copier.join()
        except BaseException:
            stop.set()
            for finish in (drain.close, copier.join):
                with contextlib.suppress(BaseException):
                    finish()
            raise
        _add_side_files(plan, writer)
        writer.commit()
    return plan.layout.total_size


def _out_bytes(t: TensorPlan) -> int:
    return tensor_nbytes(t.dtype, t.base.numel) or 0


def _add_side_files(plan: MergePlan, writer: CheckpointWriter) -> None:
    if plan.output_is_file:
        return
    for relative, path in plan.side_files:
        if relative == "config.json" and plan.config_text is not None:
            writer.add_text(relative, plan.config_text)
        else:
            writer.add_file(relative, path)

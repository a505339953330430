"""The statistics of ``diff``: for each pair of tensors A, B, whether they are equal bit for bit,
‖B - A‖_F², ‖A‖_F², max |B - A| and, when asked, B - A in float32. Reads and computes only.

Both checkpoints are read in chunks of ``CHUNK`` elements into small buffers that stay in the
CPU's cache, by two threads that each read a chunk and then compute on it (``pread`` and torch
kernels release the GIL). One chunk takes one pass per statistic: upcast A, upcast B and
subtract, the sums of squares of A and of B - A, the largest and smallest element of B - A.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .dtypes import DTYPES, torch_dtype
from .errors import OptionError
from .reader import TensorFiles, TensorInfo

if TYPE_CHECKING:
    import torch

__all__ = ["CHUNK", "Measure", "measure_pairs", "sum_of_squares"]

#: Elements read and compared at a time: 2 MiB of bfloat16 per side, 4 MiB of float32 scratch.
CHUNK = 1 << 20
# Sums of squares are taken by rows of this many float32 elements (torch sums each row by
# cascade, about 1e-8 relative), the rows' sums added in float64.
_ROW = 4096
# A chunk whose float32 sum of squares is not in [_TINY, inf) is done again in float64:
# squares below ~1e-38 lose bits to underflow (at most CHUNK · 2^-149 ≈ 1.5e-39 in all, so
# 1e-30 keeps that under 1e-9 of the sum), squares above ~3e38 overflow.
_TINY = 1e-30
# Kept (float32 B - A) tensors open at a time: one decomposed while the next one is read.
_OPEN = 2
_WORKERS = 2

Pair = tuple[TensorInfo, TensorInfo]


@dataclass(frozen=True)
class Measure:
    """What one pair's values say. ``energy`` = ‖B - A‖_F², ``base`` = ‖A‖_F² and
    ``max_abs`` = max |B - A|, None when a dtype cannot be decoded (or the pair is equal);
    ``change``: B - A in float32, flat, when kept and finite in float32 (return it with
    ``release``)."""

    equal: bool
    energy: float | None = None
    base: float | None = None
    max_abs: float | None = None
    change: torch.Tensor | None = None


class _Tally:
    """One pair's chunks as they come in (updated under the measuring lock)."""

    def __init__(self, numel: int, room: torch.Tensor | None) -> None:
        self.remaining = max(1, math.ceil(numel / CHUNK))
        self.numel = numel
        self.room = room  # float32 room for B - A (at least numel), or None
        self.equal = True
        self.energy = self.base = self.biggest = 0.0
        self.overflow = False  # B - A is not finite in float32: no change handed out

    def add(self, equal: bool, sums: tuple[float, float, float, bool] | None) -> None:
        self.equal = self.equal and equal
        if sums is not None:
            energy, base, biggest, finite = sums
            self.energy += energy
            self.base += base
            self.biggest = biggest if math.isnan(biggest) else max(self.biggest, biggest)
            self.overflow = self.overflow or not finite
        self.remaining -= 1


def sum_of_squares(v: torch.Tensor) -> float:
    """Σ v² of a flat float32 or float64 tensor: rows of ``_ROW`` summed by torch, the rows'
    sums in float64."""
    import torch

    head = v.numel() - v.numel() % _ROW
    rows = v[:head].view(-1, _ROW)
    total = float(torch.linalg.vecdot(rows, rows).sum(dtype=torch.float64)) if head else 0.0
    if head < v.numel():
        total += float(torch.linalg.vecdot(v[head:], v[head:]).double())
    return total


def _decodable(code: str) -> bool:
    try:
        torch_dtype(code)
    except OptionError:
        return False
    return True


def _same_bytes(left: bytearray, right: bytearray, size: int) -> bool:
    """The first ``size`` bytes of both buffers are equal (``memcmp`` when they are whole)."""
    if size == len(left) == len(right):
        return left == right
    import torch

    if size == 0:
        return True
    code = torch.int64 if size % 8 == 0 else torch.uint8
    count = size // (8 if code is torch.int64 else 1)
    return torch.equal(torch.frombuffer(left, dtype=code, count=count),
                       torch.frombuffer(right, dtype=code, count=count))  # fmt: skip


@dataclass
class _Scratch:
    """One worker's buffers: the stored bytes of a chunk of A and of B, float32 room for a
    chunk of A and of B - A, and float64 room made when a chunk must be done again."""

    raw: tuple[bytearray, bytearray]
    work: torch.Tensor  # (2, CHUNK) float32
    wide: torch.Tensor | None = None  # (2, CHUNK) float64


def _chunk_sums(pair: Pair, raw: tuple[bytearray, bytearray], scratch: _Scratch, n: int,
                change: torch.Tensor | None) -> tuple[float, float, float, bool]:  # fmt: skip
    """‖b - a‖², ‖a‖², max |b - a| of one chunk of n elements, and whether b - a is finite in
    float32; b - a (float32) goes into ``change`` when given."""
    import torch

    a = torch.frombuffer(raw[0], dtype=torch_dtype(pair[0].dtype), count=n)
    b = torch.frombuffer(raw[1], dtype=torch_dtype(pair[1].dtype), count=n)
    x = scratch.work[0, :n]
    d = change if change is not None else scratch.work[1, :n]
    x.copy_(a)
    d.copy_(b)
    d.sub_(x)
    energy, base = sum_of_squares(d), sum_of_squares(x)
    high, low = float(d.amax()), float(d.amin())
    finite = math.isfinite(energy)
    exact_zero = energy == 0 and high == low == 0  # b - a is 0 exactly (gradual underflow)
    if (_TINY <= energy < math.inf or exact_zero) and (_TINY <= base < math.inf or
                                                       (base == 0 and not x.any())):  # fmt: skip
        return energy, base, max(high, -low), finite
    return (*_wide_sums(a, b, scratch, n), finite)


def _wide_sums(a: torch.Tensor, b: torch.Tensor, scratch: _Scratch,
               n: int) -> tuple[float, float, float]:  # fmt: skip
    """The sums of ``_chunk_sums`` in float64: tiny values whose float32 squares underflow,
    huge ones whose squares overflow, and NaN/inf (which stay NaN/inf, as in float64)."""
    import torch

    if scratch.wide is None:
        scratch.wide = torch.empty(2, CHUNK, dtype=torch.float64)
    x, d = scratch.wide[0, :n], scratch.wide[1, :n]
    x.copy_(a)
    d.copy_(b)
    d.sub_(x)
    biggest = float(d.abs().max()) if n else 0.0
    return sum_of_squares(d), sum_of_squares(x), biggest


def _chunks(pairs: Sequence[Pair]) -> Iterator[tuple[int, int, int]]:
    """(pair index, first element, end element) of every chunk, pair by pair."""
    for i, (a, _) in enumerate(pairs):
        for start in range(0, max(a.numel, 1), CHUNK):
            yield i, start, min(a.numel, start + CHUNK)


class _Changes:
    """Reused float32 room for kept changes (``_OPEN`` tensors at most): smallest fit first,
    so that memory grows with the largest changed tensor, not with the model."""

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def acquire(self, numel: int) -> torch.Tensor:
        import torch

        with self._lock:
            fits = [i for i, t in enumerate(self._free) if t.numel() >= numel]
            if fits:
                return self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
            if self._free:
                self._free.pop()  # too small: make room for a larger one
        return torch.empty(numel, dtype=torch.float32)

    def release(self, room: torch.Tensor) -> None:
        with self._lock:
            self._free.append(room)


def _bytes(info: TensorInfo, start: int, end: int) -> tuple[int, int]:
    """The stored bytes of elements start..end (sub-byte dtypes: CHUNK is a multiple of 8)."""
    bits = DTYPES[info.dtype].bits
    return start * bits // 8, (end * bits // 8 if end < info.numel else info.nbytes)


class _Run:
    """The chunks of every pair, handed out in order to the workers; finished pairs are put on
    ``done`` (their index), a worker's error too."""

    def __init__(self, pairs: Sequence[Pair], files: TensorFiles, keep: Callable[[Pair], bool],
                 stop: threading.Event) -> None:  # fmt: skip
        self.pairs, self.files, self.keep, self.stop = pairs, files, keep, stop
        self.done: queue.Queue[int | BaseException] = queue.Queue()
        self.tallies: dict[int, _Tally] = {}
        self.changes = _Changes()
        self._tasks = _chunks(pairs)
        self._hand_out = threading.Lock()  # the chunk order (may wait for an open slot)
        self._tally = threading.Lock()  # the tallies' sums
        self._open = threading.Semaphore(_OPEN)
        self._decodable = {c: _decodable(c) for p in pairs for c in (p[0].dtype, p[1].dtype)}
        widest = max((DTYPES[i.dtype].bits for p in pairs for i in p), default=8)
        self.raw_size = CHUNK * widest // 8

    def _begin(self, i: int) -> _Tally:
        numel = self.pairs[i][0].numel
        if not self.keep(self.pairs[i]):
            return _Tally(numel, None)
        while not self._open.acquire(timeout=0.1):  # the consumer frees one per finished pair
            if self.stop.is_set():
                raise InterruptedError("stopped while waiting for room")
        return _Tally(numel, self.changes.acquire(numel))

    def next_chunk(self) -> tuple[int, int, int, _Tally] | None:
        with self._hand_out:
            task = next(self._tasks, None)
            if task is None or self.stop.is_set():
                return None
            i, start, end = task
            if start == 0:
                tally = self._begin(i)
                with self._tally:
                    self.tallies[i] = tally
            return i, start, end, self.tallies[i]

    def finish(self, i: int) -> None:
        """Give back pair i's room after the consumer is done with its change."""
        tally = self.tallies.pop(i)
        if tally.room is not None:
            self.changes.release(tally.room)
            self._open.release()

    def work(self) -> None:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # this thread only (OpenMP): the two workers fill both cores
        try:
            scratch = _Scratch((bytearray(self.raw_size), bytearray(self.raw_size)),
                               torch.empty(2, CHUNK, dtype=torch.float32))  # fmt: skip
            while (task := self.next_chunk()) is not None:
                i, start, end, tally = task
                equal, sums = self._measure(self.pairs[i], start, end, tally, scratch)
                with self._tally:
                    tally.add(equal, sums)
                    finished = tally.remaining == 0
                if finished:
                    self.done.put(i)
        except BaseException as e:  # handed to the consumer
            self.stop.set()
            self.done.put(e)
        finally:
            torch.set_num_threads(threads)

    def _measure(self, pair: Pair, start: int, end: int, tally: _Tally, scratch: _Scratch
                 ) -> tuple[bool, tuple[float, float, float, bool] | None]:  # fmt: skip
        sizes = []
        for info, buffer in zip(pair, scratch.raw, strict=True):
            first, last = _bytes(info, start, end)
            self.files.read_into(info, memoryview(buffer)[: last - first], start=first)
            sizes.append(last - first)
        n = end - start
        change = tally.room[start:end] if tally.room is not None else None
        same = pair[0].dtype == pair[1].dtype and _same_bytes(*scratch.raw, sizes[0])
        if not (self._decodable[pair[0].dtype] and self._decodable[pair[1].dtype]):
            return same, None
        if not same:
            return False, _chunk_sums(pair, scratch.raw, scratch, n, change)
        if change is not None:
            change.zero_()
        return True, _equal_sums(pair[0], scratch, n)


def _equal_sums(info: TensorInfo, scratch: _Scratch, n: int) -> tuple[float, float, float, bool]:
    """A chunk equal in A and B: only ‖a‖² (wanted if another chunk differs)."""
    import torch

    x = scratch.work[0, :n]
    x.copy_(torch.frombuffer(scratch.raw[0], dtype=torch_dtype(info.dtype), count=n))
    base = sum_of_squares(x)
    if not (_TINY <= base < math.inf or (base == 0 and not x.any())):
        base = _wide_sums(x, x, scratch, n)[1]
    return 0.0, base, 0.0, True


def measure_pairs(pairs: Sequence[Pair], files: TensorFiles, *, keep: Callable[[Pair], bool],
                  stop: threading.Event) -> Iterator[tuple[int, Measure]]:  # fmt: skip
    """``(index, Measure)`` of every pair, in the order they finish; two threads read and
    measure the chunks meanwhile. ``keep(pair)``: hand out B - A as a float32 tensor, valid
    until the next item is asked for (``_OPEN`` such tensors exist at most).

    Each chunk's sums of squares are taken in float32 by rows (``sum_of_squares``) and added
    in float64; chunks where float32 squares could underflow or overflow are done in float64.
    So ``energy`` and ``base`` are within about 1e-7 (relative) of the float64 sums and
    ``max_abs`` within 2^-24 of max |B - A| (B - A rounded to float32 once); see
    ``tests/test_diff.py``.
    """
    import torch

    torch.get_num_threads()  # fixes this thread's count before the workers lower theirs
    run = _Run(pairs, files, keep, stop)
    workers = [threading.Thread(target=run.work, name=f"lorasurgeon-diff-{n}", daemon=True)
               for n in range(_WORKERS)]  # fmt: skip
    for worker in workers:
        worker.start()
    try:
        for _ in range(len(pairs)):
            item = _next_done(run, workers)
            yield item, _result(run.tallies[item])
            run.finish(item)
    finally:
        stop.set()
        for worker in workers:
            worker.join()


def _result(tally: _Tally) -> Measure:
    if tally.equal:
        return Measure(True)
    keep = tally.room is not None and not tally.overflow
    change = tally.room[: tally.numel] if tally.room is not None and keep else None
    return Measure(False, tally.energy, tally.base, tally.biggest, change)


def _next_done(run: _Run, workers: Sequence[threading.Thread]) -> int:
    while True:
        try:
            item = run.done.get(timeout=0.1)
        except queue.Empty:
            if any(w.is_alive() for w in workers):
                continue
            raise InterruptedError("stopped before every tensor was compared") from None
        if isinstance(item, BaseException):
            raise item
        return item

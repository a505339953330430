"""The statistics of ``diff``: for each pair of tensors A, B, whether they are equal bit for bit,
‖B - A‖_F², ‖A‖_F², max |B - A| and, when asked, B - A in float32. Reads and computes only.

Both checkpoints are read in chunks of ``CHUNK`` elements into small buffers that stay in the
CPU's cache, by two threads that each read a chunk and then compute on it with numpy (``pread``
and numpy's loops release the GIL). Plain ``diff`` never imports torch: its import alone
takes about as long as reading a 1B model. float16 and the rarer dtypes are decoded by torch.
A kept change is decomposed by the thread that completes it, with one torch thread: two
decompositions side by side keep both cores busier than one on two threads does.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .dtypes import DTYPES, torch_dtype
from .errors import OptionError
from .reader import TensorFiles, TensorInfo

__all__ = ["CHUNK", "Measure", "measure_pairs", "sum_of_squares"]

#: Elements read and compared at a time: 1 MiB of bfloat16 per side, 2 MiB of float32 scratch.
CHUNK = 1 << 19
# Sums of squares are taken by rows of this many float32 elements (a BLAS dot each, about 1e-7
# relative at worst), the rows' sums added in float64.
_ROW = 1024
# A chunk whose float32 sum of squares is not in [_TINY, inf) is done again in float64:
# squares below ~1e-38 lose bits to underflow (at most CHUNK · 2^-149 < 1e-39 in all, so
# 1e-30 keeps that under 1e-9 of the sum), squares above ~3e38 overflow.
_TINY = 1e-30
# A change is handed out for its spectrum only if its squares fit float32, where SVDs run.
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# Kept (float32 B - A) tensors open at a time: one decomposed by each worker, one being read.
_OPEN = 3
_WORKERS = 2
_NATIVE = {"F32": np.float32, "F64": np.float64}  # stored as numpy reads them

Pair = tuple[TensorInfo, TensorInfo]
Sums = tuple[float, float, float]  # ‖b - a‖², ‖a‖², max |b - a|
Decompose = Callable[[Pair, np.ndarray], Any]


@dataclass(frozen=True)
class Measure:
    """What one pair's values say. ``energy`` = ‖B - A‖_F², ``base`` = ‖A‖_F² and
    ``max_abs`` = max |B - A|, None when a dtype cannot be decoded (or the pair is equal);
    ``decomposed``: what ``decompose`` returned for B - A, when it was called."""

    equal: bool
    energy: float | None = None
    base: float | None = None
    max_abs: float | None = None
    decomposed: Any = None


class _Tally:
    """One pair's chunks as they come in (updated under the measuring lock)."""

    def __init__(self, numel: int, room: np.ndarray | None) -> None:
        self.remaining = max(1, math.ceil(numel / CHUNK))
        self.numel = numel
        self.room = room  # float32 room for B - A (at least numel), or None
        self.equal = True
        self.energy = self.base = self.biggest = 0.0
        self.decoded = True
        self.decomposed: Any = None
        self.equal_chunks: list[tuple[int, int]] = []

    def add(self, chunk: tuple[int, int], equal: bool, sums: Sums | None) -> None:
        self.equal = self.equal and equal
        if equal and self.room is not None:
            self.equal_chunks.append(chunk)  # B - A is 0 there: zeroed if another chunk differs
        if sums is None:
            self.decoded = False
        else:
            self.energy += sums[0]
            self.base += sums[1]
            self.biggest = sums[2] if math.isnan(sums[2]) else max(self.biggest, sums[2])
        self.remaining -= 1

    def change(self) -> np.ndarray | None:
        """B - A in float32 when it was kept, differs and its squares fit float32 (chunks
        equal in A and B are zeroed only now: an equal tensor never touches its room)."""
        fits = not self.equal and self.decoded and 0 < self.energy < _FLOAT32_MAX
        if not fits or self.room is None:
            return None
        for start, end in self.equal_chunks:
            self.room[start:end] = 0
        return self.room[: self.numel]

    def result(self) -> Measure:
        if self.equal:
            return Measure(True)
        if not self.decoded:
            return Measure(False)
        return Measure(False, self.energy, self.base, self.biggest, self.decomposed)


def sum_of_squares(v: np.ndarray) -> float:
    """Σ v² of a flat float32 or float64 array: float32 by rows of ``_ROW``, whose sums are
    added in float64; float64 at once."""
    if v.dtype == np.float64:
        return float(np.dot(v, v))
    head = v.size - v.size % _ROW
    rows = v[:head].reshape(-1, _ROW)
    # one BLAS dot per row (a batch of 1x_ROW by _ROWx1 products)
    total = float(np.matmul(rows[:, None, :], rows[:, :, None]).sum(dtype=np.float64))
    return total + float(np.dot(v[head:].astype(np.float64), v[head:]))


def _decodable(code: str) -> bool:
    if code in _NATIVE or code == "BF16":
        return True  # numpy decodes it: no need to import torch
    try:
        torch_dtype(code)
    except OptionError:
        return False
    return True


def _same_bytes(left: bytearray, right: bytearray, size: int) -> bool:
    """The first ``size`` bytes of both buffers are equal (``memcmp`` when they are whole)."""
    if size == len(left) == len(right):
        return left == right
    code = np.uint64 if size % 8 == 0 else np.uint8  # 8 bytes at a time where they divide
    count = size // np.dtype(code).itemsize
    return bool(np.array_equal(np.frombuffer(left, code, count),
                               np.frombuffer(right, code, count)))  # fmt: skip


_local = threading.local()


def _decode(code: str, raw: bytearray, n: int, out: np.ndarray) -> np.ndarray:
    """The chunk's n values, float32 or float64: a view of ``raw`` where numpy reads the
    dtype as stored, else decoded into ``out`` (float32, exact for every dtype torch knows)."""
    if code in _NATIVE:
        return np.frombuffer(raw, _NATIVE[code], n)
    if code == "BF16":  # the upper half of a float32: exact by a shift
        bits = out[:n].view(np.uint32)
        np.copyto(bits, np.frombuffer(raw, np.uint16, n))  # faster than a shift that casts
        np.left_shift(bits, 16, out=bits)
        return out[:n]
    import torch

    _torch_threads.lower()
    torch.from_numpy(out[:n]).copy_(torch.frombuffer(raw, dtype=torch_dtype(code), count=n))
    return out[:n]


class _TorchThreads:
    """torch on one thread in each worker that uses it (OpenMP's count is per thread): the two
    workers fill both cores, and torch on two threads from each would make four. The count
    found before the first worker lowered it is put back as each worker ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lowered = 0  # workers at one thread now
        self._original = 0

    def lower(self) -> None:
        if getattr(_local, "lowered", False):
            return
        import torch

        with self._lock:
            if self._lowered == 0:
                self._original = torch.get_num_threads()
            self._lowered += 1
            torch.set_num_threads(1)
        _local.lowered = True

    def restore(self) -> None:
        if not getattr(_local, "lowered", False):
            return
        import torch

        with self._lock:
            self._lowered -= 1
            torch.set_num_threads(self._original)  # this thread's and new threads' count
        _local.lowered = False


_torch_threads = _TorchThreads()


@dataclass
class _Scratch:
    """One worker's buffers: the stored bytes of a chunk of A and of B, float32 room for a
    chunk of A and of B - A, and float64 room made when a chunk must be done again."""

    raw: tuple[bytearray, bytearray]
    x: np.ndarray = field(default_factory=lambda: np.empty(CHUNK, np.float32))
    d: np.ndarray = field(default_factory=lambda: np.empty(CHUNK, np.float32))
    wide: np.ndarray | None = None  # (2, CHUNK) float64


def _chunk_sums(codes: tuple[str, str], scratch: _Scratch, n: int,
                change: np.ndarray | None) -> Sums:  # fmt: skip
    """The ``Sums`` of one chunk of n elements; b - a (float32) goes into ``change`` if given."""
    if "F64" in codes:
        return _wide_sums(codes, scratch, n, change)
    x = _decode(codes[0], scratch.raw[0], n, scratch.x)
    d = change if change is not None else scratch.d[:n]
    np.subtract(_decode(codes[1], scratch.raw[1], n, d), x, out=d)
    energy, base = sum_of_squares(d), sum_of_squares(x)
    high, low = (float(d.max()), float(d.min())) if n else (0.0, 0.0)
    exact_zero = energy == 0 and high == low == 0  # b - a is 0 exactly (gradual underflow)
    if (_TINY <= energy < math.inf or exact_zero) and (
        _TINY <= base < math.inf or (base == 0 and not x.any())
    ):
        return energy, base, max(high, -low)
    return _wide_sums(codes, scratch, n, None)


def _wide_sums(codes: tuple[str, str], scratch: _Scratch, n: int,
               change: np.ndarray | None) -> Sums:  # fmt: skip
    """The sums of ``_chunk_sums`` in float64: float64 inputs, tiny values whose float32
    squares underflow, huge ones whose squares overflow, and NaN/inf (which stay NaN/inf)."""
    if scratch.wide is None:
        scratch.wide = np.empty((2, CHUNK), np.float64)
    a, d = scratch.wide[0, :n], scratch.wide[1, :n]
    np.copyto(a, _decode(codes[0], scratch.raw[0], n, scratch.x))
    np.copyto(d, _decode(codes[1], scratch.raw[1], n, scratch.d))
    np.subtract(d, a, out=d)
    if change is not None:
        np.copyto(change, d)
    biggest = float(np.abs(d).max()) if n else 0.0
    return sum_of_squares(d), sum_of_squares(a), biggest


def _equal_sums(code: str, scratch: _Scratch, n: int) -> Sums:
    """A chunk equal in A and B: only ‖a‖² (wanted if another chunk differs)."""
    x = _decode(code, scratch.raw[0], n, scratch.x)
    base = sum_of_squares(x)
    if not (_TINY <= base < math.inf or (base == 0 and not x.any())):
        base = sum_of_squares(x.astype(np.float64))
    return 0.0, base, 0.0


def _chunks(pairs: Sequence[Pair]) -> Iterator[tuple[int, int, int]]:
    """(pair index, first element, end element) of every chunk, pair by pair."""
    for i, (a, _) in enumerate(pairs):
        for start in range(0, max(a.numel, 1), CHUNK):
            yield i, start, min(a.numel, start + CHUNK)


def _bytes(info: TensorInfo, start: int, end: int) -> tuple[int, int]:
    """The stored bytes of elements start..end (sub-byte dtypes: CHUNK is a multiple of 8)."""
    bits = DTYPES[info.dtype].bits
    return start * bits // 8, (end * bits // 8 if end < info.numel else info.nbytes)


class _Changes:
    """Reused float32 room for kept changes (``_OPEN`` tensors at most): smallest fit first,
    so that memory grows with the largest changed tensor, not with the model."""

    def __init__(self) -> None:
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def acquire(self, numel: int) -> np.ndarray:
        with self._lock:
            fits = [i for i, t in enumerate(self._free) if t.size >= numel]
            if fits:
                return self._free.pop(min(fits, key=lambda i: self._free[i].size))
            if self._free:
                self._free.pop()  # too small: make room for a larger one
        return np.empty(numel, np.float32)

    def release(self, room: np.ndarray) -> None:
        with self._lock:
            self._free.append(room)


class _Run:
    """The chunks of every pair, handed out in order to the workers; finished pairs are put on
    ``done`` (their index), a worker's error too."""

    def __init__(self, pairs: Sequence[Pair], files: TensorFiles, keep: Callable[[Pair], bool],
                 decompose: Decompose | None, stop: threading.Event) -> None:  # fmt: skip
        self.pairs, self.files, self.keep, self.stop = pairs, files, keep, stop
        self.decompose = decompose
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

    def _finish(self, i: int, tally: _Tally) -> None:
        """Decompose pair i's change (here, on this worker), give back its room, hand it on."""
        change = tally.change()
        if change is not None and self.decompose is not None:
            _torch_threads.lower()
            tally.decomposed = self.decompose(self.pairs[i], change)
        if tally.room is not None:
            self.changes.release(tally.room)
            tally.room = None
            self._open.release()
        self.done.put(i)

    def work(self) -> None:
        try:
            scratch = _Scratch((bytearray(self.raw_size), bytearray(self.raw_size)))
            with np.errstate(all="ignore"):  # overflow to inf is handled, not warned about
                while (task := self.next_chunk()) is not None:
                    i, start, end, tally = task
                    equal, sums = self._measure(self.pairs[i], start, end, tally, scratch)
                    with self._tally:
                        tally.add((start, end), equal, sums)
                        finished = tally.remaining == 0
                    if finished:
                        self._finish(i, tally)
        except BaseException as e:  # handed to the consumer
            self.stop.set()
            self.done.put(e)
        finally:
            _torch_threads.restore()

    def _measure(self, pair: Pair, start: int, end: int, tally: _Tally,
                 scratch: _Scratch) -> tuple[bool, Sums | None]:  # fmt: skip
        sizes = []
        for info, buffer in zip(pair, scratch.raw, strict=True):
            first, last = _bytes(info, start, end)
            self.files.read_into(info, memoryview(buffer)[: last - first], start=first)
            sizes.append(last - first)
        codes = pair[0].dtype, pair[1].dtype
        change = tally.room[start:end] if tally.room is not None else None
        same = codes[0] == codes[1] and _same_bytes(*scratch.raw, sizes[0])
        if not (self._decodable[codes[0]] and self._decodable[codes[1]]):
            return same, None
        if end == start:  # an empty tensor
            return same, (0.0, 0.0, 0.0)
        if not same:
            return False, _chunk_sums(codes, scratch, end - start, change)
        return True, _equal_sums(codes[0], scratch, end - start)


def measure_pairs(pairs: Sequence[Pair], files: TensorFiles, *, keep: Callable[[Pair], bool],
                  decompose: Decompose | None = None,
                  stop: threading.Event) -> Iterator[tuple[int, Measure]]:  # fmt: skip
    """``(index, Measure)`` of every pair, in the order they finish; two threads read and
    measure the chunks meanwhile. For each pair that ``keep(pair)`` accepts and that differs
    (with squares that fit float32), ``decompose(pair, B - A)`` is called on the worker that
    completes it, with B - A flat in float32 and torch on one thread; ``Measure.decomposed``
    holds what it returns. At most ``_OPEN`` such changes are held at a time.

    Each chunk's sums of squares are taken in float32 by rows (``sum_of_squares``) and added
    in float64; chunks where float32 squares could underflow or overflow, and float64 inputs,
    are done in float64. So ``energy`` and ``base`` are within 1e-6 (relative) of the float64
    sums and ``max_abs`` within 2^-24 of max |B - A| (B - A rounded to float32 once); see
    ``tests/test_diff.py``.
    """
    run = _Run(pairs, files, keep, decompose, stop)
    workers = [threading.Thread(target=run.work, name=f"lorasurgeon-diff-{n}", daemon=True)
               for n in range(_WORKERS)]  # fmt: skip
    for worker in workers:
        worker.start()
    try:
        for _ in range(len(pairs)):
            item = _next_done(run, workers)
            yield item, run.tallies.pop(item).result()
    finally:
        stop.set()
        for worker in workers:
            worker.join()


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

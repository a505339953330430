"""Threads that keep the disk busy while tensors are computed: a background worker and a
bounded prefetching iterator. Generic: knows nothing about checkpoints or LoRA.

File reads (``pread``), kernel copies and torch kernels release the GIL, so these threads
overlap for real. Every thread stops early when the shared ``stop`` event is set.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Generic, TypeVar

__all__ = ["BufferPool", "Drain", "Readahead", "Worker", "prefetch"]

T = TypeVar("T")
R = TypeVar("R")
_DONE = object()


class Worker:
    """Run ``target`` on a daemon thread; ``join`` re-raises what it raised."""

    def __init__(self, target: Callable[[], None], name: str) -> None:
        self._target = target
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        try:
            self._target()
        except BaseException as e:  # handed to the joining thread
            self._error = e

    def start(self) -> Worker:
        self._thread.start()
        return self

    def join(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


class _Failure(Generic[R]):
    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetch(
    items: Iterable[T], load: Callable[[T], R], *, depth: int, stop: threading.Event
) -> Iterator[tuple[T, R]]:
    """Yield ``(item, load(item))`` in order, loading up to ``depth`` items ahead on a thread
    that starts at once (before the first item is asked for).

    At most ``depth + 1`` items are loaded (or being loaded) at a time, the one the consumer
    works on included: the loader takes a permit before each load, and the consumer gives it
    back when it asks for the next item. Closing the iterator early (an exception in the
    consumer, Ctrl-C) stops the loader; so does ``stop``.
    """
    slots: queue.Queue[object] = queue.Queue()
    permits = threading.Semaphore(depth + 1)
    halt = threading.Event()  # this iterator closed; ``stop`` halts everything

    def halted() -> bool:
        return halt.is_set() or stop.is_set()

    def run() -> None:
        try:
            for item in items:
                while not permits.acquire(timeout=0.1):
                    if halted():
                        return
                if halted():
                    return
                slots.put((item, load(item)))
        except BaseException as e:
            slots.put(_Failure(e))
            return
        slots.put(_DONE)

    thread = threading.Thread(target=run, name="lorasurgeon-prefetch", daemon=True)
    thread.start()
    return _consume(slots, permits, thread, halt)


def _consume(
    slots: queue.Queue[object],
    permits: threading.Semaphore,
    thread: threading.Thread,
    halt: threading.Event,
) -> Iterator[tuple[T, R]]:
    try:
        while True:
            try:
                value = slots.get(timeout=0.1)
            except queue.Empty:
                if thread.is_alive():
                    continue
                return  # halted by ``stop``: the caller sees what is missing
            if value is _DONE:
                return
            if isinstance(value, _Failure):
                raise value.error
            yield value  # type: ignore[misc]
            permits.release()  # the consumer is done with that item
    finally:
        halt.set()
        thread.join()


class Drain:
    """Run submitted jobs in order on one thread, with at most ``depth`` waiting; ``submit``
    blocks while the queue is full, so memory holds at most ``depth + 1`` pending jobs.

    ``close`` waits for the queue to empty and re-raises the first error a job raised;
    ``submit`` re-raises it too, as soon as it is known.
    """

    def __init__(self, *, depth: int, stop: threading.Event, name: str) -> None:
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=depth)
        self._stop = stop
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if self._error is not None or self._stop.is_set():
                continue  # drain without running
            try:
                job()
            except BaseException as e:
                self._error = e

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, job: Callable[[], None]) -> None:
        self._check()
        self._jobs.put(job)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()
        self._check()


class BufferPool:
    """A fixed set of reusable byte buffers of one size, shared by threads.

    Allocating (and page-faulting) a fresh buffer per tensor costs as much as the merge
    arithmetic; buffers from the pool are touched once and reused. ``acquire`` waits for a
    free buffer (or for ``stop``).
    """

    def __init__(self, size: int, count: int) -> None:
        self.size = size
        self._free: queue.Queue[bytearray] = queue.Queue()
        self._unmade = count  # buffers are made on first need: an unused pool costs nothing
        self._lock = threading.Lock()

    def acquire(self, stop: threading.Event) -> bytearray:
        while True:
            try:
                return self._free.get_nowait()
            except queue.Empty:
                pass
            with self._lock:
                if self._unmade > 0:
                    self._unmade -= 1
                    return bytearray(self.size)
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                if stop.is_set():
                    raise InterruptedError("stopped while waiting for a buffer") from None

    def release(self, buffer: bytearray) -> None:
        self._free.put(buffer)


class Readahead(Generic[T]):
    """Keep the disk busy ahead of a reader: ``advance(i)`` hints items after ``i`` until
    ``window`` bytes are hinted beyond it (``advise`` is e.g. ``posix_fadvise(WILLNEED)``).

    The kernel then reads while the CPU does other work (importing torch, merging), and page
    cache use stays within the window.
    """

    def __init__(
        self, items: Sequence[T], size: Callable[[T], int], advise: Callable[[T], None],
        *, window: int,
    ) -> None:  # fmt: skip
        self._items = items
        self._size = size
        self._advise = advise
        self._window = window
        self._next = 0  # first item not hinted yet

    def advance(self, current: int) -> None:
        ahead = sum(self._size(x) for x in self._items[current + 1 : self._next])
        while self._next < len(self._items) and ahead < self._window:
            if self._next > current:
                self._advise(self._items[self._next])
                ahead += self._size(self._items[self._next])
            self._next += 1

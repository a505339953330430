"""The background threads of ``lorasurgeon.pipeline``: ``prefetch`` and ``Worker``.

Every test that could hang on a broken implementation runs its body through ``within`` so it
fails after a few seconds instead.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from lorasurgeon.pipeline import Worker, prefetch

T = TypeVar("T")
PREFETCH_THREAD = "lorasurgeon-prefetch"
TIMEOUT = 10.0


def within(seconds: float, body: Callable[[], T]) -> T:
    """Run ``body`` on a helper thread; fail if it has not finished after ``seconds``."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = body()
        except BaseException as e:  # handed back to the test
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"did not finish within {seconds} s"
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


def prefetch_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == PREFETCH_THREAD and t.is_alive()}


class LiveCounter:
    """Counts loaded items the consumer has not released yet, and the peak of that count."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.loaded = 0
        self.live = 0
        self.peak = 0

    def load(self, item: int) -> int:
        with self._lock:
            self.loaded += 1
            self.live += 1
            self.peak = max(self.peak, self.live)
        return item * 10

    def release(self) -> None:
        with self._lock:
            self.live -= 1


class Boom(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# prefetch


@pytest.mark.parametrize("depth", [1, 2, 5])
@pytest.mark.parametrize("count", [0, 1, 7, 30])
def test_prefetch_yields_every_item_in_order(depth: int, count: int) -> None:
    def load(i: int) -> tuple[int, int]:
        time.sleep(0.001 * (i % 3))  # uneven load times must not reorder
        return i, i * i

    got = within(
        TIMEOUT, lambda: list(prefetch(range(count), load, depth=depth, stop=threading.Event()))
    )
    assert got == [(i, (i, i * i)) for i in range(count)]


@pytest.mark.parametrize("error", [Boom("load 3"), KeyboardInterrupt(), ValueError("bad")])
def test_loader_exception_reaches_consumer_after_earlier_items(error: BaseException) -> None:
    def load(i: int) -> int:
        if i == 3:
            raise error
        return i

    def consume() -> tuple[list[int], BaseException | None]:
        seen = []
        try:
            for item, _ in prefetch(range(10), load, depth=2, stop=threading.Event()):
                seen.append(item)
        except BaseException as e:  # KeyboardInterrupt included
            return seen, e
        return seen, None

    before = prefetch_threads()
    seen, raised = within(TIMEOUT, consume)
    assert seen == [0, 1, 2]
    assert raised is error
    assert prefetch_threads() - before == set()


def test_exception_from_items_iterator_reaches_consumer() -> None:
    def items() -> Iterator[int]:
        yield 0
        yield 1
        raise Boom("listing failed")

    def consume() -> list[int]:
        seen = []
        with pytest.raises(Boom, match="listing failed"):
            for item, _ in prefetch(items(), lambda i: i, depth=3, stop=threading.Event()):
                seen.append(item)
        return seen

    assert within(TIMEOUT, consume) == [0, 1]


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_consumer_breaking_early_stops_the_loader(depth: int) -> None:
    counter = LiveCounter()
    before = prefetch_threads()

    def consume() -> None:
        # an endless source: only a loader that stops can let this finish
        stream = prefetch(itertools.count(), counter.load, depth=depth, stop=threading.Event())
        for item, _ in stream:
            if item == 3:
                break
        stream.close()

    within(TIMEOUT, consume)
    assert prefetch_threads() - before == set()
    loaded = counter.loaded
    time.sleep(0.3)
    assert counter.loaded == loaded, "the loader kept loading after the consumer stopped"
    assert loaded <= 4 + depth + 1


def test_exception_in_consumer_stops_the_loader() -> None:
    counter = LiveCounter()
    before = prefetch_threads()

    def consume() -> None:
        for item, _ in prefetch(itertools.count(), counter.load, depth=2, stop=threading.Event()):
            if item == 2:
                raise Boom("consumer failed")

    with pytest.raises(Boom):
        within(TIMEOUT, consume)
    # CPython closes the abandoned generator as the exception unwinds the consumer's frame
    assert prefetch_threads() - before == set()
    loaded = counter.loaded
    time.sleep(0.3)
    assert counter.loaded == loaded


def test_stop_event_ends_iteration_and_loader() -> None:
    stop = threading.Event()
    counter = LiveCounter()
    before = prefetch_threads()

    def consume() -> list[int]:
        seen = []
        for item, _ in prefetch(itertools.count(), counter.load, depth=2, stop=stop):
            seen.append(item)
            if item == 4:
                stop.set()
        return seen

    seen = within(TIMEOUT, consume)
    assert seen[:5] == [0, 1, 2, 3, 4]
    assert seen == list(range(len(seen)))  # in order, nothing skipped, then it ends
    assert len(seen) <= 5 + 2 + 1
    assert prefetch_threads() - before == set()


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_prefetch_holds_at_most_depth_plus_one_loaded_items(depth: int) -> None:
    """The docstring's promise: memory holds at most ``depth + 1`` loaded items, counting the
    one the consumer is working on. A slow consumer gives the loader every chance to exceed it.
    """
    counter = LiveCounter()

    def consume() -> None:
        for _item, _loaded in prefetch(
            range(12), counter.load, depth=depth, stop=threading.Event()
        ):
            time.sleep(0.02)  # work on the item while the loader runs ahead
            counter.release()

    within(TIMEOUT, consume)
    assert counter.loaded == 12
    assert counter.peak <= depth + 1, f"{counter.peak} loaded items held at once, depth={depth}"


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_prefetch_loads_ahead_while_consumer_works(depth: int) -> None:
    counter = LiveCounter()

    def consume() -> None:
        for _item, _loaded in prefetch(
            range(12), counter.load, depth=depth, stop=threading.Event()
        ):
            time.sleep(0.02)
            counter.release()

    within(TIMEOUT, consume)
    assert counter.peak >= depth + 1  # the consumer's item plus ``depth`` loaded ahead


# ---------------------------------------------------------------------------------------------
# Worker


@pytest.mark.parametrize("error", [Boom("copy failed"), KeyboardInterrupt(), OSError(28, "full")])
def test_worker_join_reraises_what_target_raised(error: BaseException) -> None:
    def target() -> None:
        raise error

    worker = Worker(target, "test-worker").start()
    with pytest.raises(type(error)) as e:
        within(TIMEOUT, worker.join)
    assert e.value is error


def test_worker_runs_target_on_its_own_named_thread() -> None:
    seen: list[tuple[str, int]] = []
    worker = Worker(
        lambda: seen.append((threading.current_thread().name, threading.get_ident())),
        "lorasurgeon-test-worker",
    )
    assert worker.start() is worker
    within(TIMEOUT, worker.join)
    assert len(seen) == 1
    assert seen[0][0] == "lorasurgeon-test-worker"
    assert seen[0][1] != threading.get_ident()


def test_worker_join_waits_for_target() -> None:
    release = threading.Event()
    done: list[bool] = []

    def target() -> None:
        release.wait(TIMEOUT)
        done.append(True)

    worker = Worker(target, "test-worker").start()
    threading.Timer(0.1, release.set).start()
    within(TIMEOUT, worker.join)
    assert done == [True]


# ---------------------------------------------------------------- BufferPool, Readahead


def test_buffer_pool_hands_out_each_buffer_once_until_released() -> None:
    from lorasurgeon.pipeline import BufferPool

    pool = BufferPool(16, 2)
    first, second = pool.acquire(threading.Event()), pool.acquire(threading.Event())
    assert first is not second and len(first) == len(second) == 16
    stop = threading.Event()
    stop.set()
    with pytest.raises(InterruptedError):
        pool.acquire(stop)  # empty pool: waits until stopped
    pool.release(first)
    assert pool.acquire(threading.Event()) is first


def test_buffer_pool_makes_a_buffer_only_when_none_is_free() -> None:
    from lorasurgeon.pipeline import BufferPool

    pool = BufferPool(16, 3)
    first = pool.acquire(threading.Event())
    pool.release(first)
    assert pool.acquire(threading.Event()) is first  # reused, no second buffer made
    second = pool.acquire(threading.Event())
    assert second is not first


@pytest.mark.parametrize(
    ("sizes", "window", "steps", "expected"),
    [
        # item sizes, window bytes, advance(i) calls, items hinted after all of them
        ([10, 10, 10, 10], 15, [0], [1, 2]),
        ([10, 10, 10, 10], 15, [0, 1], [1, 2, 3]),
        ([10, 10, 10, 10], 100, [0], [1, 2, 3]),
        ([50, 5, 5, 5], 8, [0, 1, 2, 3], [1, 2, 3]),
        ([10], 100, [0], []),
    ],
)
def test_readahead_hints_each_later_item_once_within_the_window(
    sizes: list[int], window: int, steps: list[int], expected: list[int]
) -> None:
    from lorasurgeon.pipeline import Readahead

    hinted: list[int] = []
    ahead = Readahead(list(range(len(sizes))), lambda i: sizes[i], hinted.append, window=window)
    for step in steps:
        ahead.advance(step)
    assert hinted == expected

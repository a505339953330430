"""Runners of batch jobs: in this process, on local worker processes, or as Ray tasks.

Runners only schedule: each job is ``batch.run_job``, and every result is handed to
``on_result`` as it arrives. Workers die with the batch (a killed batch leaves no job running).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing
import os
import queue
import signal
import sys
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from .batch import Job, JobResult, Status, run_job
from .errors import OptionError

__all__ = ["Launcher", "ray_resources", "run_local", "run_ray", "run_scheduled"]

logger = logging.getLogger(__name__)

OnResult = Callable[[JobResult], None]
_WORKER_INDEX: Any = None


def _gpu_count() -> int:
    """GPUs visible here, without importing torch: CUDA_VISIBLE_DEVICES, else the driver's."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    with contextlib.suppress(OSError):
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    return 0


def _init_worker(counter: Any, gpus: int, threads: int) -> None:
    """A worker: dies with its parent (Linux), computes on its share of the CPUs (unless
    OMP_NUM_THREADS says otherwise), and gets one GPU of its own where there are GPUs (round
    robin)."""
    # torch is imported later, by the first job: the thread count must be set before that.
    # Workers that each start one thread per core spin against each other on small tensors.
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, str(threads))
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM when the batch dies
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    if gpus > 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = [d.strip() for d in visible.split(",")] if visible else [str(i) for i in range(gpus)]
        os.environ["CUDA_VISIBLE_DEVICES"] = ids[index % len(ids)]


def _threads(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


class Launcher(Protocol):
    """Where the scheduler starts jobs: ``start`` returns at once, ``wait`` blocks until one
    started job has finished and returns its key and result."""

    def start(self, key: int, job: Job) -> None: ...

    def wait(self) -> tuple[int, JobResult]: ...


class _InProcess:
    """Runs each started job here, when ``wait`` is called (one job at a time)."""

    def __init__(self) -> None:
        self._started: deque[tuple[int, Job]] = deque()

    def start(self, key: int, job: Job) -> None:
        self._started.append((key, job))

    def wait(self) -> tuple[int, JobResult]:
        key, job = self._started.popleft()
        return key, run_job(job)


class _Pool:
    """Runs started jobs on a pool of worker processes."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._done: queue.Queue[tuple[int, JobResult]] = queue.Queue()

    def start(self, key: int, job: Job) -> None:
        def failed(e: BaseException) -> None:  # run_job records errors: this is a dead worker
            self._done.put((key, _failed(job, f"error: worker failed: {type(e).__name__}: {e}")))

        self._pool.apply_async(run_job, (job,), callback=lambda r: self._done.put((key, r)),
                               error_callback=failed)  # fmt: skip

    def wait(self) -> tuple[int, JobResult]:
        while True:  # in slices, so that Ctrl-C and SIGTERM are handled at once
            with contextlib.suppress(queue.Empty):
                return self._done.get(timeout=0.2)


def _failed(job: Job, error: str) -> JobResult:
    return JobResult(job.name, job.command.value, os.fspath(job.output), Status.FAILED, 0.0,
                     error)  # fmt: skip


def run_scheduled(
    jobs: Sequence[Job], launcher: Launcher, *, workers: int,
    estimates: Sequence[int] | None = None, budget: int | None = None, fail_fast: bool = False,
    on_result: OnResult | None = None,
) -> list[JobResult]:  # fmt: skip
    """Start ``jobs`` in order on ``launcher``: at most ``workers`` at a time and, with a
    ``budget``, only while the ``estimates`` (bytes) of the running jobs and the next one add up
    to at most ``budget``. A job estimated above the whole budget waits until nothing runs and
    then runs alone, with a warning. In order (first come, first started), so that a large job
    is never passed over for ever. Results in the order they finish; with ``fail_fast``
    nothing new starts after a failure."""
    from .footprint import describe, fits

    needs = list(estimates) if estimates is not None else [0] * len(jobs)
    waiting = deque(range(len(jobs)))
    running: dict[int, int] = {}
    results: list[JobResult] = []
    while waiting or running:
        while waiting and len(running) < workers and fits(
            needs[waiting[0]], list(running.values()), budget
        ):  # fmt: skip
            key = waiting.popleft()
            if budget is not None and needs[key] > budget:
                logger.warning("%s: estimated %s exceeds --memory %s; it runs alone",
                               jobs[key].name, describe(needs[key]), describe(budget))  # fmt: skip
            launcher.start(key, jobs[key])
            running[key] = needs[key]
        key, result = launcher.wait()
        del running[key]
        results.append(result)
        if on_result is not None:
            on_result(result)
        if fail_fast and result.status is Status.FAILED:
            break
    return results


def run_local(
    jobs: Sequence[Job], *, workers: int = 1, memory: int | None = None, fail_fast: bool = False,
    on_result: OnResult | None = None,
) -> list[JobResult]:  # fmt: skip
    """Run ``jobs`` here (``workers=1``) or on ``workers`` processes; results in the order they
    finish. With ``memory`` (bytes), a job starts only when its estimated peak memory and the
    running jobs' fit in it (``footprint.estimate_memory``; one larger than all of it runs
    alone). With ``fail_fast`` nothing new starts after a failure. An interrupt (Ctrl-C,
    SIGTERM) stops the workers, which clean up like a single run, and passes through."""
    estimates = None
    if memory is not None:
        from .footprint import estimate_memory

        estimates = [estimate_memory(job) for job in jobs]
    # An idle worker keeps the interpreter and torch it imported: no more workers than the
    # budget holds bare processes.
    size = min(workers, len(jobs), _processes(memory) if memory is not None else workers)
    schedule = functools.partial(
        run_scheduled, jobs, workers=max(size, 1), estimates=estimates, budget=memory,
        fail_fast=fail_fast, on_result=on_result,
    )  # fmt: skip
    if size <= 1:
        return schedule(_InProcess())
    context = multiprocessing.get_context("spawn")  # no fork of a process holding threads
    counter = context.Value("i", 0)
    pool = context.Pool(size, initializer=_init_worker,
                        initargs=(counter, _gpu_count(), _threads(size)))  # fmt: skip
    try:
        return schedule(_Pool(pool))
    finally:
        pool.terminate()  # SIGTERM: a worker mid-job cleans up as a single run does
        pool.join()


def _processes(memory: int) -> int:
    from .footprint import PROCESS_BYTES

    return max(1, memory // PROCESS_BYTES)


def ray_resources(job: Job) -> dict[str, int]:
    """What ``job``'s Ray task requests besides its CPU: ``memory``, its estimated peak in bytes,
    and ``num_gpus``, 1 for a job that asks for a CUDA device (``device: cuda`` or
    ``cuda:N``), else 0."""
    from .footprint import estimate_memory

    device = str(job.options.get("device", "auto"))
    return {"memory": estimate_memory(job), "num_gpus": 1 if device.startswith("cuda") else 0}


def _unschedulable(request: dict[str, int], nodes: Sequence[dict[str, Any]]) -> str | None:
    """Why no alive node of the cluster can ever run a task requesting ``request``, or None.
    Ray would keep such a task pending without end."""
    from .footprint import describe

    offers = [n.get("Resources") or {} for n in nodes if n.get("Alive")]
    memory = max((float(o.get("memory", 0)) for o in offers), default=0.0)
    gpus = max((float(o.get("GPU", 0)) for o in offers), default=0.0)
    if request["num_gpus"] > gpus:
        return "it asks for a CUDA device and no node of the Ray cluster has a GPU"
    if request["memory"] > memory:
        return (f"its estimated peak memory {describe(request['memory'])} exceeds every "
                f"Ray node's memory (largest: {describe(int(memory))})")  # fmt: skip
    return None


def run_ray(
    jobs: Sequence[Job], address: str, *, fail_fast: bool = False,
    on_result: OnResult | None = None,
) -> list[JobResult]:  # fmt: skip
    """Run ``jobs`` as Ray tasks on the cluster at ``address`` (``auto``: the one this machine
    belongs to), each requesting one CPU and ``ray_resources(job)`` and retried if its worker
    dies; results in the order they finish. A job that no node can hold fails at once with
    its reason instead of waiting for ever.

    Raises:
        OptionError: Ray is not installed.
    """
    try:
        import ray
    except ImportError:
        raise OptionError("--ray needs Ray installed",
                          hint="pip install 'lorasurgeon[ray]'") from None  # fmt: skip
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    task = ray.remote(num_cpus=1, max_retries=3)(run_job)
    nodes = ray.nodes()
    results: list[JobResult] = []
    pending: dict[Any, Job] = {}

    def take(result: JobResult) -> bool:
        results.append(result)
        if on_result is not None:
            on_result(result)
        return fail_fast and result.status is Status.FAILED

    try:
        for job in jobs:
            request = ray_resources(job)
            reason = _unschedulable(request, nodes)
            if reason is None:
                pending[task.options(**request).remote(job)] = job
            elif take(_failed(job, f"error: {job.output}: not schedulable on Ray: {reason}; "
                                   "give the cluster larger nodes, or run it with local "
                                   "workers")):  # fmt: skip
                return results
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                job = pending.pop(ref)
                try:
                    result: JobResult = ray.get(ref)
                except Exception as e:  # the task failed every retry (its worker died)
                    result = _failed(job, f"error: Ray task failed: {e}")
                if take(result):
                    return results
    finally:
        for ref in pending:
            with contextlib.suppress(Exception):
                ray.cancel(ref)
    return results

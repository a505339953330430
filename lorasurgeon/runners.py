"""Runners of batch jobs: in this process, on local worker processes, or as Ray tasks.

Runners only schedule: each job is ``batch.run_job``, and every result is handed to
``on_result`` as it arrives. Workers die with the batch (a killed batch leaves no job running).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .batch import Job, JobResult, Status, run_job
from .errors import OptionError

__all__ = ["run_local", "run_ray"]

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


def run_local(
    jobs: Sequence[Job], *, workers: int = 1, fail_fast: bool = False,
    on_result: OnResult | None = None,
) -> list[JobResult]:  # fmt: skip
    """Run ``jobs`` here (``workers=1``) or on ``workers`` processes; results in the order they
    finish. With ``fail_fast`` nothing new starts after a failure. An interrupt (Ctrl-C,
    SIGTERM) stops the workers, which clean up like a single run, and passes through."""
    results: list[JobResult] = []

    def take(result: JobResult) -> bool:
        results.append(result)
        if on_result is not None:
            on_result(result)
        return fail_fast and result.status is Status.FAILED

    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            if take(run_job(job)):
                break
        return results
    context = multiprocessing.get_context("spawn")  # no fork of a process holding threads
    counter = context.Value("i", 0)
    pool = context.Pool(min(workers, len(jobs)), initializer=_init_worker,
                        initargs=(counter, _gpu_count(), _threads(workers)))  # fmt: skip
    try:
        for result in pool.imap_unordered(run_job, jobs):
            if take(result):
                break
    finally:
        pool.terminate()  # SIGTERM: a worker mid-job cleans up as a single run does
        pool.join()
    return results


def run_ray(
    jobs: Sequence[Job], address: str, *, fail_fast: bool = False,
    on_result: OnResult | None = None, gpus_per_job: float = 0,
) -> list[JobResult]:  # fmt: skip
    """Run ``jobs`` as Ray tasks on the cluster at ``address`` (``auto``: the one this machine
    belongs to), each retried if its worker dies; results in the order they finish.

    Raises:
        OptionError: Ray is not installed.
    """
    try:
        import ray
    except ImportError:
        raise OptionError("--ray needs Ray installed",
                          hint="pip install 'lorasurgeon[ray]'") from None  # fmt: skip
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    task = ray.remote(num_cpus=1, num_gpus=gpus_per_job, max_retries=3)(run_job)
    pending = {task.remote(job): job for job in jobs}
    results: list[JobResult] = []
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                job = pending.pop(ref)
                try:
                    result: JobResult = ray.get(ref)
                except Exception as e:  # the task failed every retry (its worker died)
                    error = f"error: Ray task failed: {e}"
                    result = JobResult(job.name, job.command.value, os.fspath(job.output),
                                       Status.FAILED, 0.0, error)  # fmt: skip
                results.append(result)
                if on_result is not None:
                    on_result(result)
                if fail_fast and result.status is Status.FAILED:
                    for other in pending:
                        ray.cancel(other)
                    return results
    finally:
        for ref in pending:
            with contextlib.suppress(Exception):
                ray.cancel(ref)
    return results

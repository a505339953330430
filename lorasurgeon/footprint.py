"""Peak memory of a batch job, estimated from its inputs' headers before it runs, and the
``--memory`` budget that the local runner schedules jobs in.

An estimate bounds the peak resident memory (RSS) of the job run alone in a fresh process:
the interpreter with torch, plus the buffers and float32/float64 work the command holds at its
worst tensor. No tensor is read and torch is not imported here. Host memory only: memory on a
GPU is not counted, nor the host memory of a CUDA context (not measured: no GPU here).
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .batch import Command, Job
from .errors import LorasurgeonError

__all__ = [
    "PROCESS_BYTES",
    "available_memory",
    "describe",
    "estimate_memory",
    "exact_svd_bytes",
    "fits",
    "parse_memory",
]

logger = logging.getLogger(__name__)

_MB = 10**6
# Measured (/usr/bin/time -v, 2026-11-29, CPU torch 2.x): `python -c "import torch,
# lorasurgeon"` peaks at 229 MB; merge, extract, combine and resize of the tiny fixtures at
# 246-266 MB (which parts of torch load varies). Every job is this much plus its own work.
PROCESS_BYTES = 320 * _MB
# merge (stream.py): at most 5 buffers of the largest merged tensor as stored (3 read buffers,
# merged in place when the dtype is kept; with --dtype 2 read + 3 result buffers); the CPU
# LoRA path then works in small row blocks, every other path (DoRA, replaced tensors, a GPU,
# diffusion modules) on whole float32 copies: start, delta and result. Plus each adapter's
# largest tensor, as stored and in float32. Measured: the 1.1B bf16 merge (largest merged
# tensor 23 MB, a 50 MB float32 adapter) peaks at 330 MB; estimate 436 MB.
_MERGE_BUFFERS = 5
_MERGE_DENSE_COPIES = 3
# extract (extract.py): 6 pooled buffers (three pairs read ahead) of the largest stored
# tensor, one float32 work matrix, the SVD's workspace, and every module's factors kept until
# the ranks are chosen. Measured: see _estimate_extract.
_EXTRACT_BUFFERS = 6
# Inputs under this size (LoRA files) are counted as held whole by the header-based estimate.
_SMALL_INPUT = 2 * 10**9
# randomized SVD (lowrank.py): Ω, Q, the products and the float64 Rayleigh-Ritz basis, each
# (rows or columns) x (rank + oversample); counted as 8 such float64 matrices on both sides.
_RANDOMIZED_COPIES = 8
_OVERSAMPLE = 10
# combine and resize: one module at a time, its factors as stored, in float32 and float64,
# stacked and decomposed (product SVD); counted as 24 bytes per stored factor element. Plus
# the inputs' total size: measured, resize of the 1.1B rank-16 float32 adapter (50 MB, 154
# modules of at most 123k factor elements) peaks 19-32 MB above the bare process, more than its
# largest module explains; combine --svd of three 25 MB bf16 adapters 7 MB above it.
_FACTOR_BYTES = 24
_PRUNE_COPIES = 8
# `auto`: what the kernel says is available, less a margin for the batch process itself,
# the page cache the jobs stream through, and other programs.
_AUTO_MARGIN = 0.1
_AUTO_MARGIN_MIN = 512 * 2**20


def estimate_memory(job: Job) -> int:
    """An upper bound of ``job``'s peak resident memory in bytes, from its inputs' headers.

    A job whose inputs cannot be resolved or planned is estimated as the bare process: it fails
    at the same step when it runs, before any tensor is read. ``device: auto`` is counted as a
    GPU may take it (whole float32 copies in host memory on the way).
    """
    estimators: dict[Command, Callable[[Job], int]] = {
        Command.MERGE: _estimate_merge, Command.EXTRACT: _estimate_extract,
        Command.COMBINE: _estimate_adapters, Command.RESIZE: _estimate_adapters,
    }  # fmt: skip
    estimator = estimators.get(job.command)
    try:
        if estimator is None or _reads_diffusion_files(job):
            return PROCESS_BYTES + _estimate_from_headers(job)
        return PROCESS_BYTES + estimator(job)
    except LorasurgeonError as e:
        logger.debug("%s: no estimate (%s); the job will fail as it plans", job.name, e)
        return PROCESS_BYTES


def _reads_diffusion_files(job: Job) -> bool:
    """extract of diffusion checkpoints, combine and resize of diffusion LoRA files: inputs the
    plan-based estimates do not read (merge plans them itself)."""
    from .diffusion import is_lora_file
    from .layouts import is_diffusion_checkpoint
    from .locations import Role, resolve

    if job.command is Command.EXTRACT:
        return is_diffusion_checkpoint(resolve(job.inputs[0], role=Role.CHECKPOINT).path)
    if job.command in (Command.COMBINE, Command.RESIZE):
        return is_lora_file(resolve(job.inputs[0], role=Role.ANY).path)
    return False


def _estimate_from_headers(job: Job) -> int:
    """The commands and inputs without a plan-based estimate (convert; diffusion LoRA files and
    checkpoints in extract, combine and resize), which all work one module at a time: the LoRA
    files (inputs under 2 GB) held whole twice, plus for the largest tensor of any input its
    stored copies, float32 copies and an exact SVD's workspace. Deliberately generous."""
    from .locations import Role, resolve
    from .reader import open_checkpoint

    small, largest, widest = 0, 0, (0, 0)
    for text in job.inputs:
        path = resolve(text, role=Role.ANY).path
        files = [path] if path.is_file() else sorted(path.rglob("*.safetensors"))
        for file in files:
            with open_checkpoint(file) as checkpoint:
                size = sum(info.nbytes for info in checkpoint)
                small += 2 * size if size < _SMALL_INPUT else 0
                for info in checkpoint:
                    largest = max(largest, info.numel)
                    if len(info.shape) >= 2 and info.numel > widest[0] * widest[1]:
                        widest = (info.shape[0], info.numel // info.shape[0])
    return small + _EXTRACT_BUFFERS * _f32(largest) + exact_svd_bytes(*widest)


def _keywords(function: Callable[..., Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """The job's options that ``function`` (a plan function) takes."""
    accepted = inspect.signature(function).parameters
    return {k: v for k, v in options.items() if k in accepted}


def _f32(numel: int) -> int:
    return 4 * numel


def _estimate_merge(job: Job) -> int:
    from .merge import plan_merge
    from .plans import ChangeKind, MergePlan, TensorPlan

    plan = plan_merge(job.inputs[0], job.inputs[1:], **_keywords(plan_merge, job.options))

    def tensors(p: MergePlan) -> Iterable[TensorPlan]:
        yield from p.tensors
        for _, component in p.components:
            yield from tensors(component)

    computed = [t for t in tensors(plan) if not t.copied]
    if not computed:
        return 0
    stored = max(max(t.start.nbytes, _nbytes(t.dtype, t.base.numel)) for t in computed)
    dense = job.options.get("device", "auto") != "cpu" or any(
        c.kind is not ChangeKind.LORA for t in computed for c in t.deltas
    )  # fmt: skip
    numel = max(t.base.numel for t in computed)
    adapters = sum(2 * _f32(_largest_numel(loc.path)) for loc in plan.adapters)
    return _MERGE_BUFFERS * stored + (_MERGE_DENSE_COPIES * _f32(numel) if dense else 0) + adapters


def _nbytes(code: str, numel: int) -> int:
    from .dtypes import tensor_nbytes

    return tensor_nbytes(code, numel) or _f32(numel)


def _largest_numel(path: Path) -> int:
    from .reader import open_checkpoint

    with open_checkpoint(path) as checkpoint:
        return max((info.numel for info in checkpoint), default=0)


def exact_svd_bytes(rows: int, columns: int) -> int:
    """Workspace of ``torch.linalg.svd(full_matrices=False)`` of a float32 (rows, columns)
    matrix: LAPACK gesdd's copy of it, U, Vᴴ and its k² work arrays (k = min(rows, columns))."""
    k = min(rows, columns)
    return _f32(rows * columns + (rows + columns) * k + 5 * k * k)


def _estimate_extract(job: Job) -> int:
    """Measured: the 1.1B bf16 pair, all 154 linear modules (largest 5632x2048), randomized:
    rank 16 peaks at 512 MB (estimate 618 MB), rank 64 at 699 MB (estimate 943 MB)."""
    from .extract import plan_extraction
    from .options import DEFAULT_MAX_RANK

    plan = plan_extraction(job.inputs[0], job.inputs[1],
                           **_keywords(plan_extraction, job.options))  # fmt: skip
    if not plan.modules:
        return 0
    fixed = job.options.get("rank_method", "fixed") == "fixed"
    rank = job.options.get("rank", 0) if fixed else job.options.get("max_rank") or DEFAULT_MAX_RANK
    exact = job.options.get("svd", "randomized") == "exact"
    shapes = [m.matrix_shape for m in plan.modules]
    stored = max(max(m.base.nbytes, m.tuned.nbytes) for m in plan.modules)
    work = _f32(max(m.base.numel for m in plan.modules))
    svd = max(_svd_bytes(rows, columns, rank, exact) for rows, columns in shapes)
    # every module's factors are kept until the ranks are chosen, then the adapter's tensors
    # are built from them: counted twice
    kept = 2 * sum(_f32((rows + columns) * min(rank, rows, columns)) for rows, columns in shapes)
    return _EXTRACT_BUFFERS * stored + work + svd + kept


def _svd_bytes(rows: int, columns: int, rank: int, exact: bool) -> int:
    width = min(rank, rows, columns) + _OVERSAMPLE
    if exact or width >= min(rows, columns):  # lowrank falls back to the exact SVD
        return exact_svd_bytes(rows, columns)
    return _RANDOMIZED_COPIES * 8 * (rows + columns) * width


def _estimate_adapters(job: Job) -> int:
    """combine and resize, one module at a time: the largest module's factors over all inputs;
    the pruning methods' ``svd`` variants form each input's dense delta and decompose their
    combination exactly."""
    from .adapters import open_adapter

    factors: dict[str, int] = {}
    shapes: dict[str, tuple[int, int]] = {}
    total = 0
    for text in job.inputs:
        with open_adapter(_local(text), file_targets=True) as adapter:
            total += sum(info.nbytes for info in adapter.checkpoint)
            for name, lora in adapter.modules.items():
                factors[name] = factors.get(name, 0) + lora.lora_a.numel + lora.lora_b.numel
                shapes[name] = (lora.b_shape[0], math.prod(lora.a_shape[1:]))
    if not factors:
        return 0
    data = total + _FACTOR_BYTES * max(factors.values())
    pruned = job.options.get("method", "linear") not in ("linear", "cat")
    if job.command is Command.COMBINE and job.options.get("svd") and pruned:
        # each input's dense delta and, while pruning and electing signs, their magnitudes,
        # masks, signs and stack: measured, ties --svd of two adapters on a 2816x1024 module
        # peaks 290 MB above the bare process, 25 float32 copies of the matrix; counted as
        # 8·(n + 1) = 24 copies plus the exact SVD's workspace (4.2 copies at that shape).
        copies = _PRUNE_COPIES * (len(job.inputs) + 1)
        data += max(copies * _f32(r * c) + exact_svd_bytes(r, c) for r, c in shapes.values())
    return data


def _local(text: str) -> Path:
    from .locations import Role, resolve

    return resolve(text, role=Role.ADAPTER).path


def available_memory() -> int:
    """Bytes of memory available to new processes here: the kernel's MemAvailable, or less
    where a cgroup (a container, a Slurm allocation) limits this process.

    Raises:
        OSError: neither can be read (not Linux).
    """
    with open("/proc/meminfo", encoding="ascii") as f:
        fields = dict(line.split(":", 1) for line in f)
    available = int(fields["MemAvailable"].split()[0]) * 1024
    limit = _cgroup_room()
    return min(available, limit) if limit is not None else available


def _cgroup_room() -> int | None:
    """cgroup v2: memory.max less memory.current for this process's group, None without one."""
    try:
        with open("/proc/self/cgroup", encoding="ascii") as f:
            group = next(line.split(":", 2)[2].strip() for line in f if line.startswith("0::"))
        root = Path("/sys/fs/cgroup") / group.lstrip("/")
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((root / "memory.current").read_text()))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def parse_memory(text: str, *, available: Callable[[], int] = available_memory) -> int:
    """``--memory``: a size (``16G``, ``16GB``, ``500MiB``, bytes) or ``auto``, the available
    memory less a margin (10%, at least 512 MiB).

    Raises:
        ValueError: not a size, or ``auto`` where the available memory cannot be read.
    """
    from .writer import parse_size

    value = text.strip()
    if value.lower() == "auto":
        try:
            free = available()
        except (OSError, KeyError, ValueError):
            raise ValueError("cannot read the available memory here; give a size") from None
        return max(1, free - max(int(free * _AUTO_MARGIN), _AUTO_MARGIN_MIN))
    if value[-1:].upper() in ("K", "M", "G", "T"):
        value += "B"  # 16G as 16GB
    return parse_size(value)


def fits(need: int, running: Sequence[int], budget: int | None) -> bool:
    """Whether a job estimated at ``need`` may start beside jobs estimated at ``running``:
    all within ``budget``; a job larger than the whole budget starts once nothing runs."""
    return budget is None or not running or sum(running) + need <= budget


def describe(nbytes: int) -> str:
    """A memory size for messages: 1.2 GB, 350 MB."""
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 10**9 else f"{nbytes / 1e6:.0f} MB"

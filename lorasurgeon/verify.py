"""Whether a merged checkpoint is what ``merge`` would write: ``verify``.

Plans the merge with ``plan_merge`` and computes every merged tensor with the merge's own
stream (``stream.computed_tensors``), then compares instead of writing. Nothing is written.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .engine import ProgressCallback
from .locations import Location, Role, resolve
from .merge import plan_merge
from .pipeline import prefetch
from .plans import MergePlan, TensorPlan
from .reader import Checkpoint, TensorFiles, TensorInfo, as_tensor, open_checkpoint

__all__ = ["Mismatch", "VerifyReport", "verify"]

# A floor under each element's tolerance, in units of the dtype's epsilon times the largest
# |delta| of the tensor: float32 matrix products summed in another order (another tool, a GPU)
# differ by a few epsilons of the delta's scale where an element's delta nearly cancels.
_DELTA_FLOOR = 4.0


@dataclass(frozen=True)
class Mismatch:
    """One tensor of MERGED that is not what the merge gives.

    ``what`` says how; for a value mismatch ``max_abs`` = max |merged - expected|,
    ``share_of_delta`` = ‖merged - expected‖_F / ‖expected - base‖_F (1.0: as if the delta
    were missing; None when the merge does not change the tensor), ``elements`` how many
    elements lie outside the tolerance.
    """

    tensor: str
    path: str
    what: str
    max_abs: float | None = None
    share_of_delta: float | None = None
    elements: int | None = None


@dataclass(frozen=True)
class VerifyReport:
    """What ``verify`` found; ``matches`` is True when every tensor is within rounding."""

    merged: Location
    base: Location
    adapters: tuple[Location, ...]
    weights: tuple[float, ...]
    unmerge: bool
    checked: int
    merged_count: int
    mismatches: list[Mismatch]
    seconds: float
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def matches(self) -> bool:
        return not self.mismatches

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["merged"], data["base"] = str(self.merged), str(self.base)
        data["adapters"] = [str(a) for a in self.adapters]
        data["matches"] = self.matches
        return data


def _epsilon(*codes: str) -> float:
    """The coarsest machine epsilon of the floating dtypes among ``codes``."""
    import torch

    from .dtypes import torch_dtype

    found = [torch.finfo(torch_dtype(c)).eps for c in codes if torch_dtype(c).is_floating_point]
    return max(found, default=0.0)


def _compare(t: TensorPlan, expected: Any, merged: Any, start: Any, got: TensorInfo,
             device: Any) -> Mismatch | None:  # fmt: skip
    """``merged`` against ``expected`` within rounding: per element, |m - e| <= eps · ((n + 1)
    |e| + |w| + 4 max|e - w|), w the tensor the deltas start from, n the deltas, eps the
    coarser dtype's. Bounds PEFT's extra roundings (its delta rounded to the weight's dtype
    before the sum, one more per adapter) and float32 products summed in another order."""
    import torch

    f32 = torch.float32
    e, m = expected.to(device, f32), merged.to(device, f32)
    w = start.to(device, f32)
    if not expected.is_floating_point() or not merged.is_floating_point():
        return None if torch.equal(e, m) else Mismatch(t.name, str(got.path), "values differ")
    eps = _epsilon(t.dtype, got.dtype)
    delta = e - w
    biggest = float(delta.abs().max()) if delta.numel() else 0.0
    tol = eps * ((len(t.deltas) + 1) * e.abs() + w.abs() + _DELTA_FLOOR * biggest)
    error = (m - e).abs()
    outside = int((error > tol).sum()) + int((~torch.isfinite(m)).sum())
    if outside == 0:
        return None
    delta_norm = float(torch.linalg.vector_norm(delta, dtype=torch.float64))
    error_norm = float(torch.linalg.vector_norm(m - e, dtype=torch.float64))
    share = error_norm / delta_norm if delta_norm else None
    return Mismatch(t.name, str(got.path), "values differ beyond rounding",
                    float(error.max()), share, outside)  # fmt: skip


def _header_mismatch(t: TensorPlan, got: TensorInfo | None, merged: Checkpoint) -> Mismatch | None:
    if got is None:
        return Mismatch(t.name, str(merged.path), "missing from MERGED")
    if got.shape != t.base.shape:
        what = f"shape {list(got.shape)} where the merge gives {list(t.base.shape)}"
        return Mismatch(t.name, str(got.path), what)
    return None


def _check_copied(plan: Sequence[TensorPlan], merged: Checkpoint, files: TensorFiles,
                  device: Any, stop: threading.Event) -> Iterator[Mismatch | None]:  # fmt: skip
    """Tensors the merge copies: equal bytes, or equal values within the dtypes' rounding."""

    def load(t: TensorPlan) -> tuple[bytearray, bytearray]:
        return files.read(t.start), files.read(merged.tensors[t.name])

    loads = prefetch(plan, load, depth=1, stop=stop)
    try:
        for t, (want, have) in loads:
            got = merged.tensors[t.name]
            if got.dtype == t.start.dtype and want == have:
                yield None
                continue
            e = as_tensor(t.start, want)
            yield _compare(t, e, as_tensor(got, have), e, got, device)
    finally:
        loads.close()  # type: ignore[attr-defined]


def _check_computed(plan: MergePlan, merged: Checkpoint, files: TensorFiles,
                    device: str) -> Iterator[Mismatch | None]:  # fmt: skip
    """Tensors the merge computes: the merge's own stream, compared instead of written."""
    from .ops import resolve_device
    from .stream import computed_tensors

    dev = resolve_device(device)
    by_name = {t.name: t for t in plan.tensors}
    for item in computed_tensors(plan, device)(files):
        try:
            t = by_name[item.name]
            got = merged.tensors[t.name]
            expected = as_tensor(t.base, item.data, t.dtype)
            have = as_tensor(got, files.read(got))
            start = as_tensor(t.start, files.read(t.start))
            yield _compare(t, expected, have, start, got, dev)
        finally:
            if item.release is not None:
                item.release()


def verify(
    merged: str | os.PathLike[str],
    base: str | os.PathLike[str],
    adapters: Sequence[str | os.PathLike[str]],
    *,
    weights: Sequence[float] | None = None,
    unmerge: bool = False,
    fan_in_fan_out: Sequence[str] | str | None = None,
    device: str = "auto",
    progress: ProgressCallback | None = None,
) -> VerifyReport:
    """Check, streaming, that MERGED holds what ``merge(base, adapters, ...)`` would write.

    Every tensor is compared with the merge's result: bytes for tensors the merge copies,
    values within the dtypes' rounding for the rest (see ``_compare``: PEFT's merge rounds
    the delta to a half-precision weight's dtype before adding it, one more rounding than
    ours). MERGED may come from another tool and store other dtypes or shards; a tensor
    missing from it, of another shape, or only in it is a mismatch. Nothing is written.

    Args:
        merged: the checkpoint to check (directory, ``.safetensors`` file or Hub id).
        base, adapters, weights, unmerge, fan_in_fan_out: as ``merge`` takes them.
        device: where the expected tensors are computed.
        progress: called with (tensors checked, tensors).

    Raises:
        LocationError, CheckpointError, AdapterError, IncompatibleError, OptionError: as
            ``plan_merge`` does, and for an unreadable MERGED.
    """
    started = time.monotonic()
    plan = plan_merge(base, adapters, None, weights=weights, unmerge=unmerge,
                      fan_in_fan_out=fan_in_fan_out)  # fmt: skip
    loc = resolve(merged, role=Role.CHECKPOINT)
    with open_checkpoint(loc.path) as checkpoint:
        found = _check(plan, checkpoint, device, progress)
    found.sort(key=lambda m: _natural(m.tensor))
    computed = sum(1 for t in plan.tensors if not t.copied)
    return VerifyReport(loc, plan.base, plan.adapters, plan.weights, plan.unmerge,
                        len(plan.tensors), computed, found, time.monotonic() - started,
                        plan.notes)  # fmt: skip


def _check(plan: MergePlan, merged: Checkpoint, device: str,
           progress: ProgressCallback | None) -> list[Mismatch]:  # fmt: skip
    from .ops import resolve_device

    found: list[Mismatch] = []
    comparable = []
    for t in plan.tensors:
        problem = _header_mismatch(t, merged.tensors.get(t.name), merged)
        if problem is not None:
            found.append(problem)
        else:
            comparable.append(t)
    planned = {t.name for t in plan.tensors}
    found += [Mismatch(n, str(i.path), "only in MERGED; the merge does not write it")
              for n, i in merged.tensors.items() if n not in planned]  # fmt: skip
    copied = [t for t in comparable if t.copied]
    sub = _subplan(plan, [t for t in comparable if not t.copied])
    done, total, stop = 0, len(comparable), threading.Event()
    with TensorFiles() as files:
        try:
            checks = [_check_copied(copied, merged, files, resolve_device(device), stop),
                      _check_computed(sub, merged, files, device)]  # fmt: skip
            for check in checks:
                for result in check:
                    done += 1
                    if result is not None:
                        found.append(result)
                    if progress is not None:
                        progress(done, total)
        finally:
            stop.set()
    return found


def _natural(name: str) -> list[tuple[int, int | str]]:
    """Sort key: layer 2 before layer 10 (numbers compared as numbers)."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", name)]


def _subplan(plan: MergePlan, tensors: list[TensorPlan]) -> MergePlan:
    """``plan`` restricted to ``tensors`` (those MERGED holds with the right shape)."""
    from dataclasses import replace

    return replace(plan, tensors=tuple(tensors))

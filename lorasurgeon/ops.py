"""Pure tensor math: LoRA deltas, the merge of updates into one weight, truncated SVD and rank
selection. torch only, no I/O.

Everything is computed in float32 and rounded once to the output dtype. On the CPU a weight is
processed in blocks of rows, so that the float32 intermediates stay in cache and memory holds
only the stored weight and its result.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from functools import cached_property
from typing import TypeVar

import torch

from .errors import OptionError

__all__ = ["AddDelta", "LoraDelta", "SetRows", "Update", "apply_updates", "resolve_device"]

# About 4 MiB of float32 per block: large enough for fast kernels, small enough for cache.
_BLOCK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class LoraDelta:
    """``delta = scaling · B @ A`` laid out like the stored weight.

    ``a``: (r, in) and ``b``: (out, r), float32, already flattened for convs. ``transposed``
    means the weight is stored (in, out): GPT-2 ``Conv1D`` and ``nn.Embedding`` (vocab, dim),
    whose delta is ``scaling · (B @ A)ᵀ``. ``scaling`` includes the user's weight and the sign
    (negative to unmerge). With ``magnitude`` (DoRA, one value per output unit) the merge is
    ``W' = m / ‖W + Δ‖ · (W + Δ)``, the norm taken per output unit (PEFT's DoRA merge).
    """

    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    transposed: bool = False
    magnitude: torch.Tensor | None = None

    def rows(self, start: int, stop: int, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of the delta, as stored (float32); ``out`` is a scratch buffer
        with at least that many rows, used when the layout allows."""
        if self.transposed:
            # (B @ A)·s first, as PEFT does, then the transpose: bit-identical products.
            return torch.mm(self.b, self.a[:, start:stop]).mul_(self.scaling).t()
        if out is not None:
            return torch.mm(self.b[start:stop], self.a, out=out[: stop - start]).mul_(self.scaling)
        return torch.mm(self.b[start:stop], self.a).mul_(self.scaling)

    def full(self) -> torch.Tensor:
        return self.rows(0, self.a.shape[1] if self.transposed else self.b.shape[0])


@dataclass(frozen=True)
class AddDelta:
    """A dense delta (e.g. ``scaling · lora_B.bias``), shaped like the weight."""

    delta: torch.Tensor


@dataclass(frozen=True)
class SetRows:
    """Replace rows ``indices`` of the weight with ``values`` (PEFT's trainable tokens)."""

    indices: torch.Tensor
    values: torch.Tensor


Update = LoraDelta | AddDelta | SetRows


def resolve_device(device: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU.

    Raises:
        OptionError: ``device`` is not auto/cpu/cuda/cuda:N, or names a GPU that is not there.
    """
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise OptionError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from e
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (resolved.index or 0) >= count:
            raise OptionError(
                f"device {device} is not available ({count} CUDA device(s) found)",
                hint="use --device cpu or auto",
            )
    elif resolved.type != "cpu":
        raise OptionError(f"unsupported device {device!r}; use auto, cpu, cuda or cuda:N")
    return resolved


def _dora(current: torch.Tensor, start: torch.Tensor, u: LoraDelta) -> torch.Tensor:
    """PEFT's DoRA merge: the norm comes from the unmerged weight plus this delta only, the
    factor multiplies the current weight plus this delta."""
    assert u.magnitude is not None
    delta = u.full()
    dim = 0 if u.transposed else 1
    norm = (start + delta).norm(p=2, dim=dim)
    factor = u.magnitude / norm
    shaped = factor.unsqueeze(0) if u.transposed else factor.unsqueeze(1)
    merged: torch.Tensor = shaped * (current + delta)
    return merged


def _apply_dense(
    weight2d: torch.Tensor, updates: Sequence[Update], out_dtype: torch.dtype
) -> torch.Tensor:
    start = weight2d.to(torch.float32)
    current = start.clone()
    for u in updates:
        if isinstance(u, LoraDelta):
            current = _dora(current, start, u) if u.magnitude is not None else current + u.full()
        elif isinstance(u, AddDelta):
            current += u.delta.reshape(current.shape)
        else:
            current[u.indices] = u.values.reshape(-1, current.shape[1]).to(torch.float32)
    return current.to(out_dtype)


def _apply_blocked(
    weight2d: torch.Tensor, deltas: Sequence[LoraDelta], out: torch.Tensor, block_rows: int
) -> None:
    # Two scratch blocks reused for the whole weight: no allocation, no page faults per block.
    cols = weight2d.shape[1]
    block = torch.empty(block_rows, cols, dtype=torch.float32)
    scratch = torch.empty(block_rows, cols, dtype=torch.float32)
    for start in range(0, weight2d.shape[0], block_rows):
        stop = min(start + block_rows, weight2d.shape[0])
        acc = block[: stop - start]
        acc.copy_(weight2d[start:stop])
        for u in deltas:
            acc += u.rows(start, stop, out=scratch)  # PEFT's order: (B @ A) * s, then W + delta
        out[start:stop].copy_(acc)


def apply_updates(
    weight: torch.Tensor,
    updates: Sequence[Update],
    out_dtype: torch.dtype,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply ``updates`` in order to ``weight`` in float32 and round once to ``out_dtype``.

    ``weight`` has any shape; deltas and rows address its 2-D view (dim 0, then the rest
    flattened). With no updates this is a plain dtype conversion. ``out`` (a CPU tensor of
    ``weight``'s shape and ``out_dtype``) receives the result, e.g. a reused buffer.

    Example:
        >>> w = torch.zeros(4, 3)
        >>> d = LoraDelta(a=torch.ones(1, 3), b=torch.ones(4, 1), scaling=0.5)
        >>> apply_updates(w, [d], torch.float32)[0].tolist()
        [0.5, 0.5, 0.5]
    """
    shape = weight.shape
    if out is None:
        out = torch.empty(shape, dtype=out_dtype, device=weight.device)
    weight2d = weight.reshape(shape[0], -1) if weight.dim() > 1 else weight.reshape(1, -1)
    only_lora = all(isinstance(u, LoraDelta) and u.magnitude is None for u in updates)
    if only_lora and weight.device.type == "cpu" and out.device.type == "cpu" and weight.dim() > 1:
        block_rows = max(1, min(weight2d.shape[0], _BLOCK_ELEMENTS // max(1, weight2d.shape[1])))
        deltas = [u for u in updates if isinstance(u, LoraDelta)]
        _apply_blocked(weight2d, deltas, out.view(weight2d.shape), block_rows)
    else:
        out.copy_(_apply_dense(weight2d, updates, out_dtype).reshape(shape))
    return out


# ---------------------------------------------------------------------------------------------
# Truncated SVD and rank selection: delta ≈ scaling · B @ A, for extract and combine.

__all__ += ["RankMethod", "SvdMethod", "TruncatedSVD", "select_ranks", "truncated_svd"]

# The randomized SVD's test matrix comes from this seed when no generator is given, so that
# the same delta always gives the same factors, whatever the global RNG state.
_SVD_SEED = 0
# Passed to torch.linalg.svd on CUDA only; None is torch's choice, "gesvdj"/"gesvda" are faster
# and less accurate. The one place to change it.
_CUDA_SVD_DRIVER: str | None = None

_E = TypeVar("_E", bound=Enum)


class SvdMethod(str, Enum):
    """How ``truncated_svd`` finds the leading singular vectors."""

    EXACT = "exact"
    RANDOMIZED = "randomized"


class RankMethod(str, Enum):
    """How ``select_ranks`` picks the rank of each module."""

    FIXED = "fixed"
    ENERGY = "energy"
    BUDGET = "budget"


def _choice(kind: type[_E], value: object, what: str) -> _E:
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(str(c.value) for c in kind)
        raise OptionError(f"{what} must be one of {choices}, not {value!r}") from None


@dataclass(frozen=True)
class TruncatedSVD:
    """``delta ≈ u @ diag(s) @ vh``: the leading k singular triplets of an (m, n) delta.

    ``u``: (m, k) with orthonormal columns and ``vh``: (k, n) with orthonormal rows, in the
    delta's dtype (float32); ``s``: (k,), descending, float64; ``total_energy`` = ‖delta‖_F²
    (float64). For every rank r <= k, ``u_r diag(s_r) vh_r`` is the projection
    ``u_r u_rᵀ delta``, so its residual is orthogonal to it and the error is known without
    forming it: ‖delta - u_r diag(s_r) vh_r‖_F² = ‖delta‖_F² - Σ_{i<r} s_i².
    ``truncated_svd`` makes this identity hold to float64 precision (see there). Rounding ``u``
    and ``vh`` to float32 moves the reconstruction by about 1e-7·‖delta‖_F more.
    """

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    total_energy: float

    @property
    def max_rank(self) -> int:
        """k, the most triplets this decomposition holds."""
        return int(self.s.shape[0])

    @cached_property
    def _squares(self) -> list[float]:
        return [x * x for x in self.s.tolist()]

    @cached_property
    def _kept(self) -> list[float]:
        return [0.0, *itertools.accumulate(self._squares)]

    def kept_energy(self, rank: int) -> float:
        """Σ_{i<rank} s_i² in float64: the energy of the rank-``rank`` approximation.

        Raises:
            OptionError: ``rank`` is outside 0..k.
        """
        if not 0 <= rank <= self.max_rank:
            raise OptionError(f"rank {rank} is outside 0..{self.max_rank}, what this SVD holds")
        return self._kept[rank]

    def _lost(self, rank: int) -> float:
        kept = self.kept_energy(rank)
        if self.total_energy == 0:
            return 0.0
        return max(self.total_energy - kept, 0.0) / self.total_energy

    def rel_error(self, rank: int) -> float:
        """‖delta - u_r diag(s_r) vh_r‖_F / ‖delta‖_F = sqrt(max(total - kept, 0) / total).

        0 for a zero delta. Raises ``OptionError`` for a rank outside 0..k.
        """
        return math.sqrt(self._lost(rank))

    def energy_kept(self, rank: int) -> float:
        """The fraction of ‖delta‖_F² that rank ``rank`` keeps: 1 - rel_error(rank)².

        1 for a zero delta. Raises ``OptionError`` for a rank outside 0..k.
        """
        return 1.0 - self._lost(rank)

    def factors(self, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lora_a, lora_b)`` with ``scaling · lora_b @ lora_a = u_r diag(s_r) vh_r``.

        lora_a: (rank, n), lora_b: (m, rank), float32, on the device of ``u``. The singular
        values are split evenly: ``lora_b = u_r · sqrt(s_r / scaling)``, ``lora_a =
        sqrt(s_r / scaling)[:, None] · vh_r``, computed in float64 and rounded once.

        Raises:
            OptionError: ``rank`` is outside 0..k, or ``scaling`` is not a positive number.
        """
        self.kept_energy(rank)  # validates rank
        if not (math.isfinite(scaling) and scaling > 0):
            raise OptionError(f"scaling must be a positive number, not {scaling}")
        root = (self.s[:rank].to(torch.float64) / scaling).sqrt()
        lora_b = (self.u[:, :rank].to(torch.float64) * root).to(torch.float32)
        lora_a = (root[:, None] * self.vh[:rank].to(torch.float64)).to(torch.float32)
        return lora_a, lora_b


def _check_svd_args(delta: torch.Tensor, rank: int, oversample: int, iterations: int) -> None:
    if delta.dim() != 2 or not delta.is_floating_point() or delta.numel() == 0:
        raise OptionError(
            f"delta must be a non-empty 2-D floating point matrix, not {delta.dtype} "
            f"{tuple(delta.shape)}"
        )
    if rank < 1:
        raise OptionError(f"rank must be >= 1, not {rank}")
    if oversample < 0 or iterations < 0:
        raise OptionError(f"oversample and iterations must be >= 0, not {oversample}, {iterations}")


def _full_svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    driver = _CUDA_SVD_DRIVER if a.device.type == "cuda" else None
    u, s, vh = torch.linalg.svd(a, full_matrices=False, driver=driver)
    return u, s, vh


def _range_finder(
    a: torch.Tensor, columns: int, iterations: int, generator: torch.Generator | None
) -> torch.Tensor:
    """An orthonormal (m, columns) basis that nearly contains a's leading left singular
    vectors: Halko, Martinsson & Tropp (2011), Algorithm 4.4 (subspace iteration)."""
    if generator is None:
        generator = torch.Generator().manual_seed(_SVD_SEED)
    omega = torch.randn(
        a.shape[1], columns, generator=generator, device=generator.device, dtype=a.dtype
    ).to(a.device)
    # Each product is re-orthonormalized: plain powers (A Aᵀ)^q A Ω would lose every direction
    # but the first to rounding once (σ_1/σ_j)^(2q) passes 1/eps.
    q: torch.Tensor = torch.linalg.qr(a @ omega)[0]
    for _ in range(iterations):
        q, _ = torch.linalg.qr(a.mT @ q)
        q, _ = torch.linalg.qr(a @ q)
    return q


def _rayleigh_ritz(
    a: torch.Tensor, basis: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """The best rank-``rank`` approximation of ``a`` within span(basis), in float64, and ‖a‖².

    q = qr(basis) in float64, then the SVD of qᵀ a (float64, small): u = q u_b. Float64 makes q
    orthonormal and s exact for it, so ‖a‖² - Σ s² is the true residual. With float32 s the
    identity would carry ~1e-7·‖a‖² of rounding: a floor of ~3e-4 under every rel_error.
    ‖a‖² is summed from the same float64 blocks, so it costs no extra pass over ``a``.
    """
    q, _ = torch.linalg.qr(basis.to(torch.float64))
    projected = torch.zeros(q.shape[1], a.shape[1], dtype=torch.float64, device=a.device)
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    rows = max(1, _BLOCK_ELEMENTS // a.shape[1])
    for start in range(0, a.shape[0], rows):  # blocks: only one block of a is ever float64
        block = a[start : start + rows].to(torch.float64)
        projected.addmm_(q[start : start + rows].mT, block)
        total += torch.linalg.vecdot(block.reshape(-1), block.reshape(-1))
    u_b, s, vh = torch.linalg.svd(projected, full_matrices=False)
    u = q @ u_b[:, :rank]
    return u.to(a.dtype), s[:rank], vh[:rank].to(a.dtype), float(total)


def truncated_svd(
    delta: torch.Tensor,
    rank: int,
    *,
    method: SvdMethod = SvdMethod.RANDOMIZED,
    oversample: int = 10,
    iterations: int = 3,
    generator: torch.Generator | None = None,
) -> TruncatedSVD:
    """The leading ``rank`` singular triplets of ``delta`` (m, n), exactly or randomized.

    ``exact`` truncates ``torch.linalg.svd``. ``randomized`` is Halko, Martinsson & Tropp
    (2011), Algorithms 4.4 and 5.1: Q = qr(delta Ω) for a Gaussian Ω with rank + oversample
    columns, then ``iterations`` times Q = qr(deltaᵀ Q), Q = qr(delta Q); it falls back to exact
    when rank + oversample >= min(m, n). Its relative error stays within 1% of the exact one on
    decaying spectra and within 0.5% on flat ones (Gaussian 64×64 at rank 8); see
    ``tests/test_svd.py``. Both end with a float64 Rayleigh-Ritz step: the SVD of Qᵀ delta for
    Q, the found basis made orthonormal in float64. So ``s`` are exact singular values of a
    projection of delta, and the errors ``TruncatedSVD`` reports are exact to float64. The
    work runs on ``delta``'s device; with the same generator state the result is the same.

    Args:
        delta: float32 (float64 stays float64; other dtypes are converted to float32).
        rank: triplets to keep; at most min(m, n) are returned.
        oversample: extra columns of Ω (randomized only).
        iterations: power iterations q (randomized only); they shrink the pull of a trailing
            singular direction j on a leading one i from σ_j/σ_i to (σ_j/σ_i)^(2q+1).
        generator: draws Ω on its own device; None: a fresh one seeded with 0 (reproducible,
            and the global RNG is left alone).

    Raises:
        OptionError: ``delta`` is not a non-empty 2-D floating point matrix or holds inf/NaN;
            ``rank`` < 1; ``oversample`` or ``iterations`` < 0; an unknown ``method``.

    Example:
        >>> svd = truncated_svd(torch.ones(6, 4), 2, method=SvdMethod.EXACT)
        >>> svd.rel_error(1) < 1e-7, svd.factors(1, scaling=2.0)[0].shape
        (True, torch.Size([1, 4]))
    """
    method = _choice(SvdMethod, method, "svd method")
    _check_svd_args(delta, rank, oversample, iterations)
    a = delta if delta.dtype in (torch.float32, torch.float64) else delta.to(torch.float32)
    if not bool(torch.isfinite(a.sum())):  # one cheap pass; NaN and inf both propagate
        raise OptionError("delta holds inf or NaN values", hint="check the tuned checkpoint")
    k = min(rank, *a.shape)
    if method is SvdMethod.EXACT or k + oversample >= min(a.shape):
        # A test matrix as wide as the matrix costs as much as the full SVD and gains nothing.
        basis = _full_svd(a)[0][:, :k]
    else:
        basis = _range_finder(a, k + oversample, iterations, generator)
    u, s, vh, total = _rayleigh_ritz(a, basis, k)
    return TruncatedSVD(u=u, s=s, vh=vh, total_energy=total)


def _bounds(
    svd: TruncatedSVD, shape: tuple[int, int], min_rank: int, max_rank: int | None
) -> tuple[int, int]:
    """The ranks a module may take: min(m, n) and what its spectrum holds beat min_rank."""
    m, n = shape
    if svd.u.shape[0] != m or svd.vh.shape[1] != n:
        raise OptionError(
            f"a spectrum of a {svd.u.shape[0]}x{svd.vh.shape[1]} delta was given for shape {m}x{n}"
        )
    high = min(m, n, svd.max_rank) if max_rank is None else min(m, n, svd.max_rank, max_rank)
    return min(min_rank, high), high


def _energy_rank(svd: TruncatedSVD, energy: float) -> int:
    # energy_kept is non-decreasing in the rank, so the first rank that reaches it is minimal.
    reached = (r for r in range(svd.max_rank + 1) if svd.energy_kept(r) >= energy)
    return next(reached, svd.max_rank)


def _budget_ranks(
    spectra: Sequence[TruncatedSVD], costs: list[int], bounds: list[tuple[int, int]], budget: int
) -> list[int]:
    ranks = [low for low, _ in bounds]
    spent = sum(r * c for r, c in zip(ranks, costs, strict=True))
    if spent > budget:
        raise OptionError(
            f"a parameter budget of {budget} is below the {spent} parameters that the minimum "
            "ranks already need",
            hint="raise param_budget or lower min_rank",
        )

    def offer(i: int) -> None:  # the next rank of module i, keyed by error removed per parameter
        gain = spectra[i]._squares[ranks[i]] if ranks[i] < bounds[i][1] else 0.0
        if gain > 0:  # a rank that removes no error is not worth its parameters
            heapq.heappush(heap, (-gain / costs[i], i))

    heap: list[tuple[float, int]] = []
    for i in range(len(ranks)):
        offer(i)
    while heap:
        i = heapq.heappop(heap)[1]
        if spent + costs[i] <= budget:  # else module i is done: its next ranks cost the same
            spent += costs[i]
            ranks[i] += 1
            offer(i)
    return ranks


def _check_rank_options(
    rank: int,
    energy: float | None,
    param_budget: int | None,
    min_rank: int,
    max_rank: int | None,
) -> None:
    if rank < 1 or min_rank < 1:
        raise OptionError(f"rank and min_rank must be >= 1, not {rank} and {min_rank}")
    if max_rank is not None and min_rank > max_rank:
        raise OptionError(f"min_rank {min_rank} is above max_rank {max_rank}")
    if energy is not None and not 0 < energy <= 1:
        raise OptionError(f"energy must be in (0, 1], not {energy}")
    if param_budget is not None and param_budget < 0:
        raise OptionError(f"param_budget must be >= 0, not {param_budget}")


def select_ranks(
    spectra: Sequence[TruncatedSVD],
    shapes: Sequence[tuple[int, int]],
    *,
    method: RankMethod,
    rank: int = 16,
    energy: float | None = None,
    param_budget: int | None = None,
    min_rank: int = 1,
    max_rank: int | None = None,
) -> list[int]:
    """One rank per module, from the modules' spectra and (m, n) shapes.

    Every rank lies in [min_rank, max_rank], and also within min(m, n) and the triplets its
    spectrum holds, which win over min_rank.

    - ``fixed``: ``rank``.
    - ``energy``: the smallest r with ``energy_kept(r) >= energy``; when the spectrum cannot
      reach it, the most it holds (so compute spectra up to max_rank).
    - ``budget``: minimize the total squared error Σ_i ‖delta_i - approx_i‖_F² =
      Σ_i (total_i - kept_i(r_i)) subject to Σ_i r_i·(m_i + n_i) <= param_budget, where a rank-r
      module costs r·(m + n) LoRA parameters. The error is absolute, which is what the merged
      model sees: a module with a large delta earns more rank than a small one with the same
      relative error. (Weighting modules equally, Σ_i rel_error_i², is the alternative not
      taken.) Greedy: every module starts at its lowest rank, then ranks are added one at a
      time where s_i[r_i]² / (m_i + n_i), the error removed per parameter, is largest; a module
      whose next rank no longer fits is done, and ranks that remove no error are not added.
      Each module's gains s_i[r]² are non-increasing in r, so the steps taken in this order,
      plus the fitting fraction of the first step that did not fit, solve the fractional
      relaxation (a step may be taken in part), whose optimum bounds the integer one. So the
      greedy stops at most one step short: its error exceeds the optimum by less than that
      step's gain (at most the largest gain left out), and with the same m + n for every
      module it is exactly optimal.

    Args:
        spectra: one ``truncated_svd`` result per module.
        shapes: (m, n) of each module's delta, as decomposed.
        energy: the fraction F of ‖delta‖_F² to keep (``energy``).
        param_budget: total LoRA parameters N over all modules (``budget``).
        max_rank: None: no limit beyond the shapes and spectra.

    Raises:
        OptionError: an unknown method; rank or min_rank < 1; min_rank > max_rank; energy
            missing or outside (0, 1]; param_budget missing or negative, or below what the
            minimum ranks need; spectra and shapes that differ in number or size.
    """
    method = _choice(RankMethod, method, "rank method")
    _check_rank_options(rank, energy, param_budget, min_rank, max_rank)
    if len(spectra) != len(shapes):
        raise OptionError(f"{len(spectra)} spectra given for {len(shapes)} shapes")
    bounds = [
        _bounds(s, shape, min_rank, max_rank) for s, shape in zip(spectra, shapes, strict=True)
    ]
    if method is RankMethod.BUDGET:
        if param_budget is None:
            raise OptionError("the budget rank method needs param_budget (total LoRA parameters)")
        return _budget_ranks(spectra, [m + n for m, n in shapes], bounds, param_budget)
    if method is RankMethod.ENERGY:
        if energy is None:
            raise OptionError("the energy rank method needs energy, a fraction in (0, 1]")
        wanted = [_energy_rank(svd, energy) for svd in spectra]
    else:
        wanted = [rank] * len(spectra)
    return [min(max(r, low), high) for r, (low, high) in zip(wanted, bounds, strict=True)]

"""Low-rank math: truncated SVD (exact, randomized, or of a product of factors), rank selection,
and the quantile clamp of PEFT's SVD combinations. torch only, no I/O.

``delta ≈ scaling · B @ A`` for extract, combine and resize. Decompositions end in float64
where it is cheap, so that the errors they report are exact to float64.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from .errors import OptionError
from .ops import all_finite
from .options import RankMethod, RankPolicy, SvdMethod
from .options import choice as _choice

__all__ = [
    "RankMethod",
    "SvdMethod",
    "TruncatedSVD",
    "clamp_factors",
    "product_svd",
    "relative_distance",
    "select_ranks",
    "stored_rel_error",
    "truncated_svd",
]

# The randomized SVD's test matrix comes from this seed when no generator is given, so that
# the same delta always gives the same factors, whatever the global RNG state.
_SVD_SEED = 0
# Passed to torch.linalg.svd on CUDA only; None is torch's choice, "gesvdj"/"gesvda" are faster
# and less accurate. The one place to change it.
_CUDA_SVD_DRIVER: str | None = None

# Rows of a matrix are converted to float64 in blocks of about this many elements (8 MiB).
_BLOCK_ELEMENTS = 1 << 20


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
    ``nuclear`` = Σ of all of delta's singular values (float64) where the decomposition saw
    them all (``product_svd``, or every triplet kept), else None.
    """

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    total_energy: float
    nuclear: float | None = None

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

    def factors(
        self, rank: int, scaling: float, *, balanced: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lora_a, lora_b)`` with ``scaling · lora_b @ lora_a = u_r diag(s_r) vh_r``.

        lora_a: (rank, n), lora_b: (m, rank), float32, on the device of ``u``. ``balanced``:
        the singular values are split evenly, ``lora_b = u_r · sqrt(s_r / scaling)``,
        ``lora_a = sqrt(s_r / scaling)[:, None] · vh_r``; otherwise they all go into lora_b
        (``lora_b = u_r · s_r / scaling``, ``lora_a = vh_r``, PEFT's SVD combinations).
        Computed in float64 and rounded once.

        Raises:
            OptionError: ``rank`` is outside 0..k, or ``scaling`` is not a positive number.
        """
        self.kept_energy(rank)  # validates rank
        if not (math.isfinite(scaling) and scaling > 0):
            raise OptionError(f"scaling must be a positive number, not {scaling}")
        values = self.s[:rank].to(torch.float64) / scaling
        left = values.sqrt() if balanced else values
        right = values.sqrt() if balanced else torch.ones_like(values)
        lora_b = (self.u[:, :rank].to(torch.float64) * left).to(torch.float32)
        lora_a = (right[:, None] * self.vh[:rank].to(torch.float64)).to(torch.float32)
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
    scratch = torch.empty(min(rows, a.shape[0]), a.shape[1], dtype=torch.float64, device=a.device)
    for start in range(0, a.shape[0], rows):  # blocks: only one block of a is ever float64
        block = scratch[: min(rows, a.shape[0] - start)]
        block.copy_(a[start : start + rows])
        projected.addmm_(q[start : start + rows].mT, block)
        total += torch.linalg.vecdot(block.reshape(-1), block.reshape(-1))
    u_b, s, vh = torch.linalg.svd(projected, full_matrices=False)
    u, vh = _canonical_signs(q @ u_b[:, :rank], vh[:rank])
    return u.to(a.dtype), s[:rank], vh.to(a.dtype), float(total)


def _canonical_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip singular pairs (u_i, vh_i) so that the largest-magnitude entry of each u_i is
    positive: the decomposition no longer depends on the SVD driver's sign choices, which
    matters where the factors are clamped by a quantile of their signed values."""
    if u.shape[1] == 0:
        return u, vh
    rows = u.abs().argmax(dim=0)
    signs = torch.sign(u[rows, torch.arange(u.shape[1], device=u.device)])
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return u * signs, vh * signs[:, None]


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
    if not all_finite(a):
        raise OptionError("delta holds inf or NaN values", hint="check the tuned checkpoint")
    k = min(rank, *a.shape)
    if method is SvdMethod.EXACT or k + oversample >= min(a.shape):
        # A test matrix as wide as the matrix costs as much as the full SVD and gains nothing.
        basis = _full_svd(a)[0][:, :k]
    else:
        basis = _range_finder(a, k + oversample, iterations, generator)
    u, s, vh, total = _rayleigh_ritz(a, basis, k)
    nuclear = float(s.sum()) if k == min(a.shape) else None
    return TruncatedSVD(u=u, s=s, vh=vh, total_energy=total, nuclear=nuclear)


def stored_rel_error(
    svd: TruncatedSVD, rank: int, a: torch.Tensor, b: torch.Tensor, scaling: float
) -> float:
    """||delta - scaling·B@A|| / ||delta|| for factors of ``svd`` as stored (rounded to their
    dtype): ``a`` (rank, n...) and ``b`` (m, rank...).

    With Y = U_r S_r V_rᵀ (the truncated SVD, whose error ||delta - Y||² = ||delta||² - Σ s_i²
    is known) and X = scaling·B@A as stored: ||delta - X||² = ||delta - Y||² + ||Y - X||², since
    delta - Y is orthogonal to Y's column space and X leaves it only by rounding (a second-order
    cross term). ||Y - X||² comes from r x r Gram matrices in float64: O((m + n) r²).
    """
    total = svd.total_energy
    if total == 0:
        return 0.0
    left_y = svd.u[:, :rank].double() * svd.s[:rank].double()
    right_y = svd.vh[:rank].double()
    left_x = b.double().reshape(b.shape[0], -1) * scaling
    right_x = a.double().reshape(a.shape[0], -1)
    rounding = _squared_distance(left_y, right_y, left_x, right_x)
    truncation = total - svd.kept_energy(rank)
    return math.sqrt(max(truncation + rounding, 0.0) / total)


def _inner(l1: torch.Tensor, r1: torch.Tensor, l2: torch.Tensor, r2: torch.Tensor) -> float:
    """<l1 @ r1, l2 @ r2>_F = Σ (l1ᵀ l2) ⊙ (r1 r2ᵀ), without forming either product."""
    return float(((l1.mT @ l2) * (r1 @ r2.mT)).sum())


def _squared_distance(
    left_x: torch.Tensor, right_x: torch.Tensor, left_y: torch.Tensor, right_y: torch.Tensor
) -> float:
    distance = (
        _inner(left_x, right_x, left_x, right_x)
        - 2 * _inner(left_x, right_x, left_y, right_y)
        + _inner(left_y, right_y, left_y, right_y)
    )
    return max(distance, 0.0)


def relative_distance(
    left_x: torch.Tensor, right_x: torch.Tensor, left_y: torch.Tensor, right_y: torch.Tensor
) -> float:
    """||X - Y||_F / ||X||_F for X = left_x @ right_x and Y = left_y @ right_y, from Gram
    matrices (use float64 factors): O((m + n) r²) for ranks r, never the m x n products.
    0 when both are zero, inf when only X is. Precise to about 1e-8 of ||X||_F."""
    norm = _inner(left_x, right_x, left_x, right_x)
    distance = _squared_distance(left_x, right_x, left_y, right_y)
    if norm <= 0:
        return 0.0 if _inner(left_y, right_y, left_y, right_y) == 0 else math.inf
    return math.sqrt(distance / norm)


def product_svd(left: torch.Tensor, right: torch.Tensor, rank: int | None = None) -> TruncatedSVD:
    """The exact truncated SVD of ``left @ right`` without forming the product.

    ``left`` (m, R) and ``right`` (R, n), e.g. the stacked ``w_i s_i B_i`` and ``A_i`` of a sum
    of LoRA deltas Σ_i w_i s_i B_i A_i, whose rank is at most R. With left = Q_l R_l and
    rightᵀ = Q_r R_r (thin QR), left @ right = Q_l (R_l R_rᵀ) Q_rᵀ, so the SVD of the small core
    R_l R_rᵀ = U_c S V_cᵀ gives u = Q_l U_c and vh = V_cᵀ Q_rᵀ: O((m + n) R²) work instead of
    O(m n min(m, n)), all in float64. ``total_energy`` is Σ of every squared singular value,
    so the errors of each truncation are exact to float64. u and vh are float64; at most
    ``rank`` (default all, min(m, n, R)) triplets are kept.

    Raises:
        OptionError: not two 2-D floating point matrices with a shared inner size, or a rank < 1.
    """
    if left.dim() != 2 or right.dim() != 2 or left.shape[1] != right.shape[0]:
        raise OptionError(
            f"factors of shapes {tuple(left.shape)} and {tuple(right.shape)} do not multiply"
        )
    if not (left.is_floating_point() and right.is_floating_point()) or left.shape[1] == 0:
        raise OptionError("factors must be floating point with an inner size of at least 1")
    if rank is not None and rank < 1:
        raise OptionError(f"rank must be >= 1, not {rank}")
    q_l, r_l = torch.linalg.qr(left.to(torch.float64))
    q_r, r_r = torch.linalg.qr(right.to(torch.float64).mT)
    u_c, s, vh_c = torch.linalg.svd(r_l @ r_r.mT, full_matrices=False)
    total = float(torch.linalg.vecdot(s, s))
    k = s.shape[0] if rank is None else min(rank, s.shape[0])
    u, vh = _canonical_signs(q_l @ u_c[:, :k], vh_c[:k] @ q_r.mT)
    return TruncatedSVD(u=u, s=s[:k], vh=vh, total_energy=total, nuclear=float(s.sum()))


def _quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile(values, q) (linear interpolation) for 1-D inputs of any size; torch's
    own refuses more than 2**24 elements."""
    position = torch.tensor(q, dtype=values.dtype, device=values.device) * (values.numel() - 1)
    below = int(position.floor())
    above = min(below + 1, values.numel() - 1)
    low = torch.kthvalue(values, below + 1).values
    high = torch.kthvalue(values, above + 1).values if above != below else low
    return torch.lerp(low, high, position - below)


def clamp_factors(
    lora_a: torch.Tensor, lora_b: torch.Tensor, quantile: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both factors clamped to [-t, t], t the ``quantile`` of all their values (signed, linear
    interpolation): PEFT's ``svd_clamp``.

    Raises:
        OptionError: ``quantile`` outside [0, 1].
    """
    if not 0 <= quantile <= 1:
        raise OptionError(f"the clamp quantile must be in [0, 1], not {quantile}")
    values = torch.cat([lora_b.reshape(-1), lora_a.reshape(-1)])
    high = _quantile(values, quantile)
    return lora_a.clamp(-high, high), lora_b.clamp(-high, high)


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


def _ratio_rank(svd: TruncatedSVD, ratio: float) -> int:
    """The count of singular values s_i >= s_0 / ratio; zeros are never kept."""
    values = svd.s.tolist()
    if not values or values[0] <= 0:
        return 0
    floor = values[0] / ratio
    return sum(1 for x in values if x > 0 and x >= floor)


def _cumulative_rank(svd: TruncatedSVD, fraction: float) -> int:
    """The smallest r with Σ_{i<r} s_i >= fraction · Σ_i s_i (all of delta's values)."""
    if svd.nuclear is None:
        raise OptionError(
            "the sv_cumulative rank method needs every singular value of each update",
            hint="use --svd exact",
        )
    if svd.nuclear <= 0:
        return 0
    sums = itertools.accumulate(svd.s.tolist())
    reached = (r + 1 for r, total in enumerate(sums) if total >= fraction * svd.nuclear)
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


def select_by_policy(
    spectra: Sequence[TruncatedSVD],
    shapes: Sequence[tuple[int, int]],
    policy: RankPolicy,
    rank: int,
) -> list[int]:
    """``select_ranks`` with ``policy``'s method and values; ``rank`` is the fixed rank (the
    command's default when the policy has none)."""
    return select_ranks(
        spectra, shapes, method=policy.method, rank=rank, energy=policy.energy,
        param_budget=policy.param_budget, min_rank=policy.min_rank, max_rank=policy.max_rank,
        sv_ratio=policy.sv_ratio, sv_cumulative=policy.sv_cumulative,
    )  # fmt: skip


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
    sv_ratio: float | None = None,
    sv_cumulative: float | None = None,
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
    - ``sv_ratio`` (kohya's): the count of singular values s_i >= s_0 / ``sv_ratio``.
    - ``sv_cumulative`` (kohya's): the smallest r with Σ_{i<r} s_i >= ``sv_cumulative`` ·
      Σ_i s_i, the sum over all of delta's singular values (``TruncatedSVD.nuclear``).
    kohya's sv_fro P, the smallest r with sqrt(Σ_{i<r} s_i² / Σ_i s_i²) >= P, is ``energy``
    P². Unlike kohya's resize_lora.py these may keep every rank (kohya keeps at most one less
    than the input's) and are bounded by ``min_rank``/``max_rank`` instead of 1..r-1.

    Args:
        spectra: one ``truncated_svd`` result per module.
        shapes: (m, n) of each module's delta, as decomposed.
        energy: the fraction F of ‖delta‖_F² to keep (``energy``).
        param_budget: total LoRA parameters N over all modules (``budget``).
        max_rank: None: no limit beyond the shapes and spectra.
        sv_ratio: the ratio R >= 1 (``sv_ratio``); sv_cumulative: the fraction F in (0, 1]
            (``sv_cumulative``).

    Raises:
        OptionError: an unknown method; rank or min_rank < 1; min_rank > max_rank; energy
            missing or outside (0, 1]; param_budget missing or negative, or below what the
            minimum ranks need; sv_ratio or sv_cumulative missing or out of range, or a
            spectrum without its nuclear norm for sv_cumulative; spectra and shapes that
            differ in number or size.
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
    elif method is RankMethod.SV_RATIO:
        if sv_ratio is None or not sv_ratio >= 1:
            raise OptionError(f"the sv_ratio rank method needs sv_ratio >= 1, not {sv_ratio}")
        wanted = [_ratio_rank(svd, sv_ratio) for svd in spectra]
    elif method is RankMethod.SV_CUMULATIVE:
        if sv_cumulative is None or not 0 < sv_cumulative <= 1:
            raise OptionError(
                f"the sv_cumulative rank method needs sv_cumulative in (0, 1], not {sv_cumulative}"
            )
        wanted = [_cumulative_rank(svd, sv_cumulative) for svd in spectra]
    else:
        wanted = [rank] * len(spectra)
    return [min(max(r, low), high) for r, (low, high) in zip(wanted, bounds, strict=True)]

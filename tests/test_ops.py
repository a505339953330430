"""Properties of ``lorasurgeon.ops``: LoRA deltas, DoRA, row replacement, one rounding.

References are computed in float64. Float32 results are checked against the classic forward
error bound of the float32 evaluation (Higham, "Accuracy and Stability of Numerical
Algorithms", 3.1): a length-r dot product, one multiplication by the scaling, the rounding of
the scaling itself to float32 and one addition give ``|fl(W + s·B@A) - (W + s·B@A)| <=
gamma(r + 3) · (|W| + |s|·|B|@|A|)`` elementwise, whatever the summation order or fusing
(GEMM kernels, FMA) the implementation uses. Inputs with few significant bits ("dyadic":
multiples of 1/8 of magnitude <= 10) make every float32 operation exact, so those results
must equal the reference bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis.extra.numpy import arrays

from lorasurgeon import ops
from lorasurgeon.errors import OptionError
from lorasurgeon.ops import AddDelta, LoraDelta, SetRows, apply_updates, resolve_device
from lorasurgeon.options import CombineMethod, MajoritySign

# The autouse offline-Hub fixture of conftest.py is function scoped; it only sets environment
# variables, so sharing it between the examples of a hypothesis test is harmless.
PROPERTY = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

U32 = 2.0**-24  # unit roundoff of float32
U64 = 2.0**-53  # unit roundoff of float64 (the reference's own error)
# Absolute error per multiplication in the subnormal range; 2**-126 rather than 2**-150 so the
# bound stays valid if a BLAS kernel flushes subnormal products to zero.
TINY32 = 2.0**-126
MAX_DIM = 24
# Block sizes (float32 elements) that force one row or a few rows per block; None = the default.
BLOCK_SIZES = [1, 5, 64, None]


def gamma(n: int, u: float = U32) -> float:
    """Higham's gamma_n = n·u / (1 - n·u): the relative error bound of n roundings."""
    return n * u / (1 - n * u)


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class Case:
    """A weight and one LoRA update. ``w`` is (in, out) when ``transposed``, else (out, in)."""

    w: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    transposed: bool

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def delta(self, scaling: float | None = None, **kwargs: object) -> LoraDelta:
        s = self.scaling if scaling is None else scaling
        return LoraDelta(a=self.a, b=self.b, scaling=s, transposed=self.transposed, **kwargs)


def _floats(
    shape: tuple[int, ...], *, dyadic: bool = False, normal: bool = False
) -> st.SearchStrategy[torch.Tensor]:
    """float32 arrays in [-10, 10]; ``dyadic``: multiples of 1/8; ``normal``: 0 or |x| >= 2**-20
    (so that no product or sum of a rank <= 24 delta is subnormal)."""
    if dyadic:
        eighths = arrays(np.int8, shape, elements=st.integers(-80, 80))
        return eighths.map(lambda k: torch.from_numpy(k.astype(np.float32) / 8))
    if normal:
        elements = (
            st.just(0.0) | st.floats(2**-20, 10, width=32) | st.floats(-10, -(2**-20), width=32)
        )
    else:
        elements = st.floats(-10, 10, width=32)
    return arrays(np.float32, shape, elements=elements).map(torch.from_numpy)


@st.composite
def lora_cases(
    draw: st.DrawFn,
    *,
    transposed: bool | None = None,
    dyadic: bool = False,
    normal: bool = False,
    conv: bool = False,
) -> Case:
    out_f = draw(st.integers(1, MAX_DIM))
    in_f = draw(st.integers(1, MAX_DIM))
    rank = draw(st.integers(1, MAX_DIM))
    layout = draw(st.booleans()) if transposed is None else transposed
    a = draw(_floats((rank, in_f), dyadic=dyadic, normal=normal))
    b = draw(_floats((out_f, rank), dyadic=dyadic, normal=normal))
    if conv:  # a (out, in/k, k) conv weight: the delta addresses its (out, in) 2-D view
        kernel = draw(st.sampled_from([d for d in (1, 2, 3, 4) if in_f % d == 0]))
        w = draw(_floats((out_f, in_f // kernel, kernel), dyadic=dyadic))
        layout = False
    else:
        w = draw(_floats((in_f, out_f) if layout else (out_f, in_f), dyadic=dyadic))
    if dyadic:  # products and sums stay exact in float32 (|sum| <= 24·100·3 < 2**24 / 256)
        scaling = draw(st.sampled_from([0.25, 0.5, 0.75, 1.0, 2.0, 3.0, -0.5, -1.0, -3.0]))
    else:
        scaling = draw(st.floats(-4, 4, allow_nan=False))
    return Case(w, a, b, scaling, layout)


def _product(case: Case) -> tuple[np.ndarray, np.ndarray]:
    """B@A and |B|@|A| in float64, laid out like the weight."""
    a = case.a.double().numpy()
    b = case.b.double().numpy()
    prod, mag = b @ a, np.abs(b) @ np.abs(a)
    if case.transposed:
        prod, mag = prod.T, mag.T
    shape = tuple(case.w.shape)
    return prod.reshape(shape), mag.reshape(shape)


def reference(
    case: Case, scalings: tuple[float, ...] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``W + Σ s·B@A`` in float64 and the elementwise error bound of its float32 evaluation.

    Each scaling is one update; k updates cost k more additions, hence gamma(r + 2 + k).
    """
    scalings = (case.scaling,) if scalings is None else scalings
    prod, mag = _product(case)
    w = case.w.double().numpy()
    exact = w + sum(s * prod for s in scalings)
    terms = np.abs(w) + sum(abs(s) for s in scalings) * mag
    n = case.rank + 2 + len(scalings)
    bound = (gamma(n) + gamma(n, U64)) * terms + len(scalings) * (case.rank + 1) * TINY32
    return exact, bound


def assert_within(got: torch.Tensor, exact: np.ndarray, bound: np.ndarray, what: str) -> None:
    """Elementwise |got - exact| <= bound; reports the worst element."""
    err = np.abs(got.double().numpy() - exact)
    excess = err - bound
    worst = np.unravel_index(int(np.argmax(excess)), excess.shape) if excess.size else ()
    assert excess.size == 0 or excess[worst] <= 0, (
        f"{what}: element {worst} = {got.double().numpy()[worst]!r}, exact {exact[worst]!r}, "
        f"error {err[worst]:.3e} > bound {bound[worst]:.3e}"
    )


@contextmanager
def forced_block_size(count: int | None) -> Iterator[None]:
    """Force ``apply_updates``'s CPU block size to ``count`` float32 elements (None: default)."""
    if count is None:
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops, "_BLOCK_ELEMENTS", count)
        yield


# ---------------------------------------------------------------------------------------------
# LoRA deltas in float32


@PROPERTY
@given(case=lora_cases())
def test_lora_delta_matches_float64_reference_within_float32_bound(case: Case) -> None:
    exact, bound = reference(case)
    got = apply_updates(case.w, [case.delta()], torch.float32)
    assert got.dtype == torch.float32 and got.shape == case.w.shape
    assert_within(got, exact, bound, f"transposed={case.transposed}")


@PROPERTY
@given(case=lora_cases(conv=True))
def test_lora_delta_addresses_2d_view_of_conv_weight(case: Case) -> None:
    exact, bound = reference(case)
    got = apply_updates(case.w, [case.delta()], torch.float32)
    assert got.shape == case.w.shape
    assert_within(got, exact, bound, "conv weight")


@pytest.mark.parametrize("block_elements", BLOCK_SIZES)
@pytest.mark.parametrize("transposed", [False, True])
@PROPERTY
@given(data=st.data())
def test_dyadic_lora_delta_is_exact_for_every_block_size(
    data: st.DataObject, transposed: bool, block_elements: int | None
) -> None:
    case = data.draw(lora_cases(transposed=transposed, dyadic=True))
    exact, _ = reference(case)
    with forced_block_size(block_elements):
        got = apply_updates(case.w, [case.delta()], torch.float32)
    assert torch.equal(got, torch.from_numpy(exact.astype(np.float32)))


@pytest.mark.parametrize("block_elements", [1, 5, 64])
@PROPERTY
@given(data=st.data())
def test_blocked_and_dense_paths_agree_to_float32_error_bound(
    data: st.DataObject, block_elements: int
) -> None:
    """Row blocks (one fused ``addmm`` per block) versus the dense path (``W + (B@A)·s``).

    Neither bit-identity nor a 1-ulp bound holds between the two: a GEMM over a slice of rows
    (or, transposed, of columns of A), with the scaling and the addition fused, may sum the r
    products in another order than PEFT's ``(B@A)·s + W``, and where the dot product cancels
    that moves the float32 result by thousands of ulps (measured: up to ~7000 ulps of the
    result on 24x24 inputs in [-10, 10]). What holds, for any order or fusing, is that both
    lie within the float32 forward error bound of the exact value, so they differ by at most
    twice that bound.
    """
    case = data.draw(lora_cases())
    exact, bound = reference(case)
    # A zero AddDelta makes apply_updates take its dense (whole-matrix, unblocked) path.
    dense = apply_updates(case.w, [case.delta(), AddDelta(torch.zeros_like(case.w))], torch.float32)
    with forced_block_size(block_elements):
        blocked = apply_updates(case.w, [case.delta()], torch.float32)
    assert_within(dense, exact, bound, "dense path")
    assert_within(blocked, exact, bound, f"blocked path ({block_elements} elements per block)")
    assert_within(blocked, dense.double().numpy(), 2 * bound, "blocked vs dense")


@PROPERTY
@given(case=lora_cases())
def test_merge_then_unmerge_restores_weight_within_two_roundings(case: Case) -> None:
    merged = apply_updates(case.w, [case.delta()], torch.float32)
    restored = apply_updates(merged, [case.delta(-case.scaling)], torch.float32)
    _, mag = _product(case)
    n = case.rank + 3
    w = case.w.double().numpy()
    # Each call is within its own forward error bound; the second one starts from ``merged``.
    terms = np.abs(w) + np.abs(merged.double().numpy()) + 2 * abs(case.scaling) * mag
    bound = (gamma(n) + gamma(n, U64)) * terms + 2 * (case.rank + 1) * TINY32
    assert_within(restored, w, bound, "merge then unmerge")


@PROPERTY
@given(case=lora_cases(dyadic=True))
def test_dyadic_merge_then_unmerge_restores_weight_exactly(case: Case) -> None:
    merged = apply_updates(case.w, [case.delta()], torch.float32)
    restored = apply_updates(merged, [case.delta(-case.scaling)], torch.float32)
    assert torch.equal(restored, case.w)


@PROPERTY
@given(case=lora_cases(dyadic=True), other=st.sampled_from([0.25, 0.5, 1.0, -1.0, -0.75]))
def test_two_scalings_add_like_their_sum(case: Case, other: float) -> None:
    """Linearity in the scaling, exact on dyadic inputs: Δ(s1) + Δ(s2) = Δ(s1 + s2)."""
    twice = apply_updates(case.w, [case.delta(), case.delta(other)], torch.float32)
    once = apply_updates(case.w, [case.delta(case.scaling + other)], torch.float32)
    exact, _ = reference(case, (case.scaling + other,))
    assert torch.equal(twice, torch.from_numpy(exact.astype(np.float32)))
    assert torch.equal(once, twice)


@PROPERTY
@given(case=lora_cases(), other=st.floats(-4, 4, allow_nan=False))
def test_two_scalings_match_float64_sum_within_bound(case: Case, other: float) -> None:
    exact, bound = reference(case, (case.scaling, other))
    got = apply_updates(case.w, [case.delta(), case.delta(other)], torch.float32)
    assert_within(got, exact, bound, "two deltas")


@PROPERTY
@given(
    case=lora_cases(normal=True),
    scaling=st.sampled_from([0.0, 1.0, -1.0]) | st.floats(2**-20, 4) | st.floats(-4, -(2**-20)),
    power=st.integers(-3, 3),
)
def test_power_of_two_scaling_scales_the_delta_exactly(
    case: Case, scaling: float, power: int
) -> None:
    """Scaling by 2**k commutes with every float32 rounding (no under/overflow here)."""
    case = Case(case.w, case.a, case.b, scaling, case.transposed)
    zeros = torch.zeros_like(case.w)
    base = apply_updates(zeros, [case.delta()], torch.float32)
    scaled = apply_updates(zeros, [case.delta(case.scaling * 2.0**power)], torch.float32)
    assert torch.equal(scaled, base * 2.0**power)


# ---------------------------------------------------------------------------------------------
# One rounding to bfloat16


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round float64 values to the nearest bfloat16 (ties to even), directly from float64.

    ``torch.tensor(x, dtype=float64).to(torch.bfloat16)`` goes through float32 and so rounds
    twice (1 + 2**-8 + 2**-30 becomes 1.0 instead of 1 + 2**-7).
    """
    _, exponent = np.frexp(x)
    # bfloat16 keeps 8 significant bits; below 2**-126 the spacing is fixed at 2**-133.
    quantum = np.ldexp(1.0, np.maximum(exponent - 8, -133))
    return np.rint(x / quantum) * quantum  # np.rint rounds half to even; both steps are exact


@pytest.mark.parametrize(
    ("x", "expected"),
    [
        (1.0, 1.0),
        (1 + 2**-8, 1.0),  # tie, to even
        (1 + 2**-8 + 2**-30, 1 + 2**-7),  # just above the tie
        (1 + 3 * 2**-8, 1 + 2**-6),  # tie, to even (up)
        (-(1 + 2**-8 + 2**-30), -(1 + 2**-7)),
        (2**-130 + 2**-134, 2**-130),  # subnormal spacing 2**-133
        (0.0, 0.0),
    ],
)
def test_round_to_bf16_helper(x: float, expected: float) -> None:
    assert round_to_bf16(np.array([x]))[0] == expected


@PROPERTY
@given(case=lora_cases())
def test_bf16_result_is_the_exact_value_rounded_once(case: Case) -> None:
    """Precise criterion: the result is ``rd(v)`` for some ``v`` within the float32 error
    bound ``e`` of the exact value ``x``, i.e. ``rd(x - e) <= result <= rd(x + e)`` (rounding
    is monotonic). So it equals ``rd(x)`` wherever no bfloat16 rounding boundary lies within
    ``e`` of ``x``, and is the other neighbour of that boundary otherwise. A double rounding
    ``rd(W + rd(Δ))`` breaks it.
    """
    w16 = case.w.to(torch.bfloat16)
    exact, bound = reference(Case(w16, case.a, case.b, case.scaling, case.transposed))
    got = apply_updates(w16, [case.delta()], torch.bfloat16)
    assert got.dtype == torch.bfloat16
    low, high = round_to_bf16(exact - bound), round_to_bf16(exact + bound)
    value = got.double().numpy()
    bad = (value < low) | (value > high)
    assert not bad.any(), (
        f"{int(bad.sum())} elements outside [rd(x - e), rd(x + e)], first at "
        f"{np.argwhere(bad)[0]}: got {value[bad][0]!r}, exact {exact[bad][0]!r}"
    )


@pytest.mark.parametrize(
    ("weight", "deltas", "expected"),
    [
        # rd(1 + 2**-8 + 2**-20) = 1 + 2**-7, but rd(1 + rd(2**-8 + 2**-20)) = rd(1 + 2**-8) = 1
        (1.0, [2**-8 + 2**-20], 1 + 2**-7),
        (1.0, [2**-8 + 2**-16], 1 + 2**-7),
        (-1.0, [-(2**-8 + 2**-20)], -(1 + 2**-7)),
        (1.0, [2**-8], 1.0),  # an exact tie rounds to even
        # two updates, still one rounding: rounding after each would give 1.0 twice
        (1.0, [2**-9, 2**-9 + 2**-20], 1 + 2**-7),
    ],
)
def test_bf16_updates_are_rounded_once(weight: float, deltas: list[float], expected: float) -> None:
    w = torch.tensor([[weight]], dtype=torch.bfloat16)
    updates = [LoraDelta(a=torch.tensor([[d]]), b=torch.ones(1, 1), scaling=1.0) for d in deltas]
    got = apply_updates(w, updates, torch.bfloat16)
    assert got.item() == expected


def test_no_updates_is_a_plain_dtype_conversion() -> None:
    w = torch.linspace(-3, 3, 35, dtype=torch.float32).reshape(5, 7) / 3
    assert torch.equal(apply_updates(w, [], torch.bfloat16), w.to(torch.bfloat16))
    assert torch.equal(apply_updates(w, [], torch.float32), w)


# ---------------------------------------------------------------------------------------------
# DoRA


@st.composite
def dora_cases(draw: st.DrawFn, *, dyadic: bool = False) -> tuple[Case, torch.Tensor]:
    case = draw(lora_cases(dyadic=dyadic))
    out_units = case.b.shape[0]
    magnitude = draw(arrays(np.float32, (out_units,), elements=st.floats(0.5, 4, width=32)))
    return case, torch.from_numpy(magnitude)


def _output_major(t: np.ndarray, transposed: bool) -> np.ndarray:
    return t.T if transposed else t


@PROPERTY
@given(data=dora_cases())
def test_dora_output_unit_norms_equal_magnitude(data: tuple[Case, torch.Tensor]) -> None:
    """Rows (columns when transposed) of W' = m / ‖W + Δ‖ · (W + Δ) have norm m."""
    case, magnitude = data
    delta32 = torch.mm(case.b, case.a) * case.scaling
    v32 = case.w + (delta32.t() if case.transposed else delta32)
    norms_v = np.linalg.norm(_output_major(v32.double().numpy(), case.transposed), axis=1)
    assume(norms_v.min() >= 1e-2)
    got = apply_updates(case.w, [case.delta(magnitude=magnitude)], torch.float32)
    rows = _output_major(got.double().numpy(), case.transposed)
    norms = np.linalg.norm(rows, axis=1)
    m = magnitude.double().numpy()
    # float32 norm (d squares and sums, one sqrt), one division, one multiplication per element
    d = rows.shape[1]
    bound = gamma(d + 4) * m + d * TINY32
    assert np.all(np.abs(norms - m) <= bound), (norms, m)


@PROPERTY
@given(data=dora_cases(dyadic=True))
def test_dora_output_units_keep_direction_of_weight_plus_delta(
    data: tuple[Case, torch.Tensor],
) -> None:
    case, magnitude = data
    exact, _ = reference(case)  # dyadic: W + Δ is exact in float32
    v = _output_major(exact, case.transposed)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    assume(norms.min() > 0)
    expected = magnitude.double().numpy()[:, None] / norms * v
    got = _output_major(
        apply_updates(case.w, [case.delta(magnitude=magnitude)], torch.float32).double().numpy(),
        case.transposed,
    )
    bound = gamma(v.shape[1] + 4) * np.abs(expected)
    assert_within(torch.from_numpy(got), expected, bound, "DoRA direction")


@PROPERTY
@given(data=dora_cases(dyadic=True), lora_scaling=st.sampled_from([0.5, -1.0, 2.0]))
def test_dora_after_lora_takes_norm_from_base_plus_own_delta(
    data: tuple[Case, torch.Tensor], lora_scaling: float
) -> None:
    """peft-lora.md 5.3: merging LoRA X then DoRA Y gives m/‖W + Δ_Y‖ · (W + Δ_X + Δ_Y)."""
    case, magnitude = data
    other = Case(case.w, case.a.flip(1), case.b.flip(0), lora_scaling, case.transposed)
    w_plus_y, _ = reference(case)
    norms = np.linalg.norm(_output_major(w_plus_y, case.transposed), axis=1, keepdims=True)
    assume(norms.min() > 0)
    total, _ = reference(case, (case.scaling,))
    total = total + lora_scaling * _product(other)[0]
    expected = magnitude.double().numpy()[:, None] / norms * _output_major(total, case.transposed)
    got = apply_updates(
        case.w, [other.delta(), case.delta(magnitude=magnitude)], torch.float32
    ).double()
    got_major = _output_major(got.numpy(), case.transposed)
    bound = gamma(expected.shape[1] + 4) * np.abs(expected)
    assert_within(torch.from_numpy(got_major), expected, bound, "LoRA then DoRA")


# ---------------------------------------------------------------------------------------------
# Row replacement and dense deltas


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_set_rows_replaces_exactly_those_rows(dtype: torch.dtype) -> None:
    w = (torch.arange(24, dtype=torch.float32).reshape(6, 4) / 7).to(dtype)
    values = torch.tensor([[10.5, -1.25, 3.0, 0.0], [7.0, 8.0, -9.5, 2.5]], dtype=dtype)
    got = apply_updates(w, [SetRows(indices=torch.tensor([4, 1]), values=values)], dtype)
    expected = w.clone()
    expected[4], expected[1] = values[0], values[1]
    assert got.dtype == dtype and torch.equal(got, expected)


def test_set_rows_on_conv_weight_takes_flattened_values() -> None:
    w = torch.zeros(3, 2, 2)
    values = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    got = apply_updates(w, [SetRows(indices=torch.tensor([2]), values=values)], torch.float32)
    assert torch.equal(got[2], values[0]) and not got[:2].any()


@pytest.mark.parametrize(
    ("order", "expected_row"),
    [
        ("rows_then_delta", [3.0, 4.0, 5.0]),  # replaced row, then + 1 (B@A = ones, s = 1)
        ("delta_then_rows", [2.0, 3.0, 4.0]),  # the replacement wins
    ],
)
def test_updates_apply_in_order(order: str, expected_row: list[float]) -> None:
    w = torch.zeros(2, 3)
    rows = SetRows(indices=torch.tensor([1]), values=torch.tensor([[2.0, 3.0, 4.0]]))
    delta = LoraDelta(a=torch.ones(1, 3), b=torch.ones(2, 1), scaling=1.0)
    updates = [rows, delta] if order == "rows_then_delta" else [delta, rows]
    got = apply_updates(w, updates, torch.float32)
    assert got[1].tolist() == expected_row
    assert got[0].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("weight", "delta", "expected"),
    [
        ([[1.0, 2.0]], [[0.5, -2.0]], [[1.5, 0.0]]),
        ([0.25, -4.0, 8.0], [0.25, 4.0, -0.125], [0.5, 0.0, 7.875]),  # a 1-D bias
        ([[[1.0], [2.0]]], [[[-1.0], [0.5]]], [[[0.0], [2.5]]]),  # 3-D
    ],
)
def test_add_delta_adds(weight: list, delta: list, expected: list) -> None:
    got = apply_updates(torch.tensor(weight), [AddDelta(torch.tensor(delta))], torch.float32)
    assert got.tolist() == expected


def test_add_delta_is_added_in_float32_and_rounded_once() -> None:
    # bf16: 1 + 2**-8 + 2**-20 -> 1 + 2**-7; adding a bf16-rounded delta would give 1.0
    w = torch.tensor([1.0], dtype=torch.bfloat16)
    got = apply_updates(w, [AddDelta(torch.tensor([2**-8 + 2**-20]))], torch.bfloat16)
    assert got.item() == 1 + 2**-7


# ---------------------------------------------------------------------------------------------
# Devices


@pytest.mark.parametrize(
    ("device", "cuda_count", "expected"),
    [
        ("cpu", 0, torch.device("cpu")),
        ("cpu", 2, torch.device("cpu")),
        ("auto", 0, torch.device("cpu")),
        ("auto", 2, torch.device("cuda", 0)),
        ("cuda", 1, torch.device("cuda")),
        ("cuda:1", 2, torch.device("cuda", 1)),
    ],
)
def test_resolve_device(
    monkeypatch: pytest.MonkeyPatch, device: str, cuda_count: int, expected: torch.device
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_count)
    assert resolve_device(device) == expected


@pytest.mark.parametrize(
    ("device", "cuda_count"),
    [("cuda", 0), ("cuda:0", 0), ("cuda:2", 2), ("bogus", 0), ("meta", 0)],
)
def test_resolve_device_refuses_missing_or_unknown_devices(
    monkeypatch: pytest.MonkeyPatch, device: str, cuda_count: int
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_count)
    with pytest.raises(OptionError):
        resolve_device(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine")
def test_resolve_auto_on_this_cpu_machine_is_cpu() -> None:
    assert resolve_device("auto") == torch.device("cpu")


def test_error_bound_helper_is_tight_enough_to_catch_a_double_rounding() -> None:
    """Guards the tolerance above: one bf16 rounding of the delta is far outside it."""
    case = Case(
        w=torch.tensor([[1.0]]), a=torch.tensor([[1 / 3]]), b=torch.ones(1, 1), scaling=1.0,
        transposed=False,
    )  # fmt: skip
    exact, bound = reference(case)
    double_rounded = 1.0 + torch.tensor(1 / 3).to(torch.bfloat16).double().item()
    assert abs(double_rounded - exact[0, 0]) > bound[0, 0]


def test_bf16_single_adapter_equals_peft_float32_order_bit_for_bit() -> None:
    """peft-lora.md 5.4: for one adapter on a Linear/Conv1D weight PEFT computes
    ``rd(W + (B@A)·s)`` in float32; an implementation using the same float32 order matches it
    bit for bit. Checked on a fixed batch of random cases (seeded, no hypothesis: a mismatch is
    rare, about 1 case in 1000)."""
    rng = np.random.default_rng(0)
    mismatches = []
    for i in range(4000):
        out_f, in_f, rank = (int(x) for x in rng.integers(1, MAX_DIM + 1, size=3))
        transposed = bool(rng.integers(0, 2))
        a = torch.from_numpy(rng.uniform(-10, 10, (rank, in_f)).astype(np.float32))
        b = torch.from_numpy(rng.uniform(-10, 10, (out_f, rank)).astype(np.float32))
        shape = (in_f, out_f) if transposed else (out_f, in_f)
        w = torch.from_numpy(rng.uniform(-10, 10, shape).astype(np.float32)).to(torch.bfloat16)
        scaling = float(rng.uniform(-4, 4))
        product = torch.mm(b, a) * scaling
        peft = (w.float() + (product.t() if transposed else product)).to(torch.bfloat16)
        delta = LoraDelta(a=a, b=b, scaling=scaling, transposed=transposed)
        if not torch.equal(apply_updates(w, [delta], torch.bfloat16), peft):
            mismatches.append(i)
    assert mismatches == []


# ---------------------------------------------------------------------------------------------
# combine's tensor combinations against PEFT's merge_utils, in PEFT's float order


def _tasks(seed: int, count: int = 3, shape: tuple[int, ...] = (6, 10)) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(count)]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    ("method", "density", "sign"),
    [
        (CombineMethod.LINEAR, 1.0, "total"),
        (CombineMethod.MAGNITUDE_PRUNE, 0.4, "total"),
        (CombineMethod.TIES, 0.5, "total"),
        (CombineMethod.TIES, 0.7, "frequency"),
        (CombineMethod.DARE_LINEAR, 0.5, "total"),
        (CombineMethod.DARE_TIES, 0.3, "frequency"),
    ],
)
def test_combine_tensors_equals_peft_merge_utils(
    seed: int, method: CombineMethod, density: float, sign: str
) -> None:
    from peft.utils import merge_utils

    tensors = _tasks(seed)
    weights = [0.7, -0.4, 1.3]
    cpu = torch.device("cpu")
    masks = [ops.random_mask(t.shape, density, generator=torch.Generator().manual_seed(seed + i),
                             device=cpu) for i, t in enumerate(tensors)]  # fmt: skip
    replay = iter(masks)
    original = torch.bernoulli
    torch.bernoulli = lambda *a, **k: next(replay)  # type: ignore[assignment]
    try:
        w = torch.tensor(weights)
        expected = {
            CombineMethod.LINEAR: lambda: merge_utils.task_arithmetic(tensors, w),
            CombineMethod.MAGNITUDE_PRUNE: lambda: merge_utils.magnitude_prune(tensors, w, density),
            CombineMethod.TIES: lambda: merge_utils.ties(tensors, w, density, sign),
            CombineMethod.DARE_LINEAR: lambda: merge_utils.dare_linear(tensors, w, density),
            CombineMethod.DARE_TIES: lambda: merge_utils.dare_ties(tensors, w, density, sign),
        }[method]()
    finally:
        torch.bernoulli = original
    ours = ops.combine_tensors(tensors, weights, method, density=density,
                               sign_method=MajoritySign(sign), masks=masks)  # fmt: skip
    assert torch.equal(ours, expected)


def test_magnitude_prune_keeps_the_largest_floor_d_n() -> None:
    x = torch.tensor([0.5, -3.0, 2.0, -0.1, 1.0, 0.0, -2.5])
    kept = ops.magnitude_prune(x, 0.5)  # floor(3.5) = 3
    assert torch.equal(kept, torch.tensor([0.0, -3.0, 2.0, 0.0, 0.0, 0.0, -2.5]))
    assert ops.magnitude_prune(x, 1.0) is x


def test_random_mask_has_the_density_in_distribution() -> None:
    n, density = 200_000, 0.3
    mask = ops.random_mask((n,), density, generator=torch.Generator().manual_seed(0),
                           device=torch.device("cpu"))  # fmt: skip
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert abs(float(mask.sum()) - density * n) <= 5 * (n * density * (1 - density)) ** 0.5


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"method": CombineMethod.TIES, "density": 0.0}, "density"),
        ({"method": CombineMethod.DARE_LINEAR, "density": 0.5}, "mask"),
        ({"method": CombineMethod.LINEAR, "weights": [1.0]}, "weights"),
    ],
)
def test_combine_tensors_refuses_bad_arguments(kwargs: dict, words: str) -> None:
    arguments = {"tensors": _tasks(0, 2), "weights": [1.0, 1.0], **kwargs}
    with pytest.raises(OptionError, match=words):
        ops.combine_tensors(**arguments)

"""Pure tensor math: LoRA deltas, the merge of updates into one weight, and the tensor
combinations of ``combine`` (task arithmetic, TIES, DARE, magnitude pruning). torch only, no I/O.

Everything is computed in float32 and rounded once to the output dtype. On the CPU a weight is
processed in blocks of rows, so that the float32 intermediates stay in cache and memory holds
only the stored weight and its result.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .errors import OptionError
from .options import CombineMethod, MajoritySign

__all__ = [
    "AddDelta", "ExpertDelta", "LoraDelta", "SetRows", "SvdTruncate", "Update", "WeightDecompose",
    "all_finite",
    "apply_updates", "block_diagonal", "one_compute_thread", "resolve_device",
]  # fmt: skip

# About 1 MiB of float32 per block: the block and its scratch stay in a core's cache (measured
# on a 5632 x 2048 bf16 weight: 2^18 elements 20% faster than 2^20, 2.5x faster than 2^22).
_BLOCK_ELEMENTS = 1 << 18


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


@dataclass(frozen=True)
class ExpertDelta:
    """LoRA on a stack of E expert matrices (``target_parameters`` on a 3-D parameter), as
    PEFT's ``ParamWrapper.get_delta_weight``: ``a``: (r·E, in), ``b``: (out, r·E); expert e
    uses rows ``e·r .. e·r+r-1`` of A and the strided columns ``j·E + e`` of B, and
    ``delta[e] = scaling · B_e @ A_e`` (out, in), or its transpose (in, out) when the stack is
    stored (E, in, out) (``transposed``, transformers' ``is_transposed`` experts)."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    experts: int
    transposed: bool = False

    def full(self) -> torch.Tensor:
        """The (E, out, in) or (E, in, out) delta in float32."""
        a = self.a.reshape(self.experts, -1, self.a.shape[-1])  # (E, r, in)
        b = self.b.reshape(self.b.shape[0], -1, self.experts)  # (out, r, E)
        layout = "o r e, e r i -> e i o" if self.transposed else "o r e, e r i -> e o i"
        return torch.einsum(layout, b, a) * self.scaling


@dataclass(frozen=True)
class SvdTruncate:
    """Drop the ``rank`` smallest singular components of the (out, in) weight: KaSA's base
    truncation (PEFT's ``KasaLinearVariant._truncate_base_weight``), W -> U_k · diag(S_k) · Vh_k
    with k = min(out, in) - rank, from ``torch.linalg.svd`` of the float32 weight."""

    rank: int

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        keep = min(weight.shape) - self.rank
        truncated: torch.Tensor = (u[:, :keep] * s[:keep]) @ vh[:keep, :]
        return truncated


def block_diagonal(blocks: torch.Tensor, count: int) -> torch.Tensor:
    """BD-LoRA's factor from its stored blocks (PEFT's ``weight_as_blockdiagonal_matrix``):
    ``blocks`` (R, c) as stored is cut into ``count`` row chunks that
    are laid on the diagonal of a (R, c · count) matrix, zeros elsewhere."""
    chunks = torch.chunk(blocks, count, dim=0)
    rows, cols = blocks.shape[0], blocks.shape[1] * count
    out = torch.zeros(rows, cols, dtype=blocks.dtype, device=blocks.device)
    at_row, at_col = 0, 0
    for chunk in chunks:
        out[at_row : at_row + chunk.shape[0], at_col : at_col + chunk.shape[1]] = chunk
        at_row, at_col = at_row + chunk.shape[0], at_col + chunk.shape[1]
    return out


@dataclass(frozen=True)
class WeightDecompose:
    """LyCORIS DoRA (``dora_scale``) on the current weight: see ``dora_kohya``. ``delta`` is the
    multiplier-free delta shaped like the weight's 2-D view, ``scale`` the stored norms."""

    delta: torch.Tensor
    scale: torch.Tensor
    multiplier: float


Update = LoraDelta | AddDelta | SetRows | ExpertDelta | SvdTruncate | WeightDecompose


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a floating-point tensor holds no NaN or inf (other dtypes: always true).

    One min/max reduction, which propagates NaN: far cheaper than ``isfinite().all()``
    (47 ms against 1 ms for a 5632 x 2048 bf16 weight on one core), which allocates a mask.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


@contextlib.contextmanager
def one_compute_thread(device: torch.device) -> Iterator[None]:
    """Run torch's CPU kernels of the calling thread on one thread while the block runs.

    For streaming work whose other cores are busy anyway (reading, writing, hashing): torch's
    intra-op pool spins while it waits for its workers, so on a machine whose cores are all in
    use a multi-threaded elementwise kernel costs several times its single-threaded CPU time
    (measured: a 1.1B merge took 38 s of CPU with the default pool on two loaded cores, 4.7 s
    with one thread). GPU work is left alone.
    """
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
        elif isinstance(u, ExpertDelta):
            current += u.full().reshape(current.shape)
        elif isinstance(u, SvdTruncate):
            current = u.apply(current)
        elif isinstance(u, WeightDecompose):
            current = dora_kohya(current, u.delta, u.scale, u.multiplier)
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
# Tensor combinations of ``combine``: PEFT's merge_utils semantics (shared/spec/peft-lora.md §6.7)

__all__ += ["combine_tensors", "magnitude_prune", "random_mask"]


def magnitude_prune(x: torch.Tensor, density: float) -> torch.Tensor:
    """``x`` with all but its ``floor(density · numel)`` largest-magnitude elements zeroed.

    Over the whole tensor, as PEFT's ``magnitude_based_pruning``; ``density >= 1`` keeps all.
    """
    if density >= 1:
        return x
    keep = torch.zeros(x.numel(), dtype=x.dtype, device=x.device)
    count = int(density * x.numel())
    keep[torch.topk(x.abs().reshape(-1), k=count, largest=True).indices] = 1
    return x * keep.view(x.shape)


def random_mask(
    shape: Sequence[int], density: float, *, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """A float32 0/1 mask whose elements are 1 with probability ``density``, independently."""
    probability = torch.full(tuple(shape), float(density), dtype=torch.float32, device=device)
    return torch.bernoulli(probability, generator=generator)


def _elect(stacked: torch.Tensor, method: MajoritySign) -> torch.Tensor:
    """Where each tensor agrees with the elected sign (+1 on ties); pruned zeros never agree."""
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if method is MajoritySign.TOTAL else signs.sum(dim=0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(stacked.dtype)
    return signs == elected


def combine_tensors(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    method: CombineMethod,
    *,
    density: float = 1.0,
    sign_method: MajoritySign = MajoritySign.TOTAL,
    masks: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Merge same-shaped float32 tensors as PEFT's ``merge_utils`` does, in its float order.

    - ``linear``: Σ w_i X_i. ``magnitude_prune``: each X_i pruned to its ``density`` largest
      magnitudes first. ``dare_linear``: each X_i ⊙ mask_i / density first.
    - ``ties`` / ``dare_ties``: pruned as above; a sign is elected per element from the
      unweighted pruned tensors (``total``: sign of Σ X_i, ``frequency``: of Σ sign(X_i),
      ties +1), and the result is Σ_i w_i X_i M_i / max(1, Σ_i M_i) with M_i where X_i has
      the elected sign: a mean over the agreeing tensors, not a sum.

    ``masks`` (one 0/1 tensor per input) are the DARE masks; the caller draws them (see
    ``random_mask``), so that they can be replayed. Weights are rounded to float32 first.

    Raises:
        OptionError: no tensors, a count mismatch, shapes that differ, a density outside
            (0, 1] for a pruning method, or a DARE method without masks.
    """
    _check_combination(tensors, weights, method, density, masks)
    if method in (CombineMethod.TIES, CombineMethod.MAGNITUDE_PRUNE):
        tensors = [magnitude_prune(x, density) for x in tensors]
    elif method.random and density < 1:
        assert masks is not None
        tensors = [(x * m) / density for x, m in zip(tensors, masks, strict=True)]
    stacked = torch.stack(list(tensors), dim=0)
    w = torch.tensor(list(weights), dtype=torch.float32, device=stacked.device)
    weighted = stacked * w.view(-1, *([1] * (stacked.dim() - 1)))
    if not method.elects_sign:
        return weighted.sum(dim=0)
    agree = _elect(stacked, sign_method)
    return (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


def _check_combination(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    method: CombineMethod,
    density: float,
    masks: Sequence[torch.Tensor] | None,
) -> None:
    if not tensors or len(tensors) != len(weights):
        raise OptionError(f"{len(tensors)} tensors given with {len(weights)} weights")
    if any(x.shape != tensors[0].shape for x in tensors):
        raise OptionError(f"tensors of different shapes: {[tuple(x.shape) for x in tensors]}")
    if method is CombineMethod.CAT:
        raise OptionError("cat is not an element-wise combination")
    if method.prunes and not 0 < density <= 1:
        raise OptionError(f"density must be in (0, 1], not {density}")
    if method.random and density < 1 and (masks is None or len(masks) != len(tensors)):
        raise OptionError(f"{method.value} needs one random mask per tensor")


__all__ += ["pad_rank"]


def pad_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``lora_a`` (k, ...) and ``lora_b`` (out, k, ...) zero-padded to ``rank`` >= k: the same
    B @ A, stored at ``rank`` (``--uniform-rank``)."""
    import torch

    k = a.shape[0]
    if rank == k:
        return a, b
    if rank < k:
        raise ValueError(f"cannot pad rank {k} down to {rank}")
    a = torch.cat([a, a.new_zeros(rank - k, *a.shape[1:])], dim=0)
    b = torch.cat([b, b.new_zeros(b.shape[0], rank - k, *b.shape[2:])], dim=1)
    return a, b


# ---------------------------------------------------------------------------------------------
# LyCORIS deltas (shared/spec/sd-lora.md §4): dense float32 deltas shaped like the target weight

__all__ += ["dora_kohya", "loha_delta", "lokr_delta", "tucker_delta", "tucker_rebuild"]


def tucker_rebuild(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """A Tucker-factored kernel: ``T[p, q, h, w] = Σ_ij core[i, j, h, w] · wa[i, p] · wb[j, q]``.

    ``core``: (r, r, kh, kw), ``wa``: (r, out), ``wb``: (r, in); returns (out, in, kh, kw)
    (LyCORIS' ``rebuild_tucker``, einsum ``"ijkl,ip,jr->prkl"``).
    """
    return torch.einsum("ijkl,ip,jr->prkl", core.float(), wa.float(), wb.float()).contiguous()


def tucker_delta(
    down: torch.Tensor, mid: torch.Tensor, up: torch.Tensor, scaling: float
) -> torch.Tensor:
    """LoCon with Tucker: ``Δ = scaling · einsum("mnkl,im,nj->ijkl", mid, up₂ᴰ, down₂ᴰ)``.

    ``down``: (r, in, 1, 1), ``mid``: (r, r, kh, kw), ``up``: (out, r, 1, 1); returns
    (out, in, kh, kw). The chain down 1×1 → mid k×k → up 1×1 is this one k×k conv (spec V11).
    """
    up2d = up.reshape(up.shape[0], -1).float()
    down2d = down.reshape(down.shape[0], -1).float()
    return tucker_rebuild(mid, up2d.t(), down2d).mul_(scaling)


def loha_delta(
    w1a: torch.Tensor,
    w1b: torch.Tensor,
    w2a: torch.Tensor,
    w2b: torch.Tensor,
    scaling: float,
    shape: Sequence[int],
    *,
    t1: torch.Tensor | None = None,
    t2: torch.Tensor | None = None,
) -> torch.Tensor:
    """LoHa (Hadamard product of two low-rank matrices), laid out as ``shape``.

    Plain: ``Δ = scaling · (w1a @ w1b) ⊙ (w2a @ w2b)``, ``w?a``: (out, r), ``w?b``:
    (r, in·kh·kw). Tucker (convs): ``Δ = scaling · T1 ⊙ T2`` with
    ``Ti = tucker_rebuild(ti, w?a, w?b)``, ``ti``: (r, r, kh, kw), ``w?a``: (r, out),
    ``w?b``: (r, in). Matches PEFT's LoHa ``get_delta_weight`` and LyCORIS' ``loha.diff_weight``.
    """
    if t1 is not None and t2 is not None:
        product = tucker_rebuild(t1, w1a, w1b) * tucker_rebuild(t2, w2a, w2b)
    else:
        left = w1a.float() @ w1b.float().reshape(w1b.shape[0], -1)
        right = w2a.float() @ w2b.float().reshape(w2b.shape[0], -1)
        product = left * right
    return product.reshape(tuple(shape)).mul_(scaling)


def _lokr_half(
    full: torch.Tensor | None,
    a: torch.Tensor | None,
    b: torch.Tensor | None,
    tucker: torch.Tensor | None,
) -> torch.Tensor:
    if full is not None:
        return full.float()
    assert a is not None and b is not None  # the format reader guarantees a pair
    if tucker is not None:
        return tucker_rebuild(tucker, a, b)
    product = a.float() @ b.float().reshape(b.shape[0], -1)
    return product.reshape(a.shape[0], *b.shape[1:])


def lokr_delta(
    shape: Sequence[int],
    scaling: float,
    *,
    w1: torch.Tensor | None = None,
    w1a: torch.Tensor | None = None,
    w1b: torch.Tensor | None = None,
    w2: torch.Tensor | None = None,
    w2a: torch.Tensor | None = None,
    w2b: torch.Tensor | None = None,
    t2: torch.Tensor | None = None,
) -> torch.Tensor:
    """LoKr: ``Δ = scaling · kron(W1, W2)``, laid out as ``shape`` (a·b, c·d[, kh, kw]).

    ``W1`` is ``w1`` (a, c) or ``w1a @ w1b`` ((a, r) @ (r, c)). ``W2`` is ``w2``
    (b, d[, kh, kw]), ``w2a @ w2b`` ((b, r) @ (r, d·kh·kw)), or with the Tucker core ``t2``
    (r, r, kh, kw) ``tucker_rebuild(t2, w2a, w2b)`` (``w2a``: (r, b), ``w2b``: (r, d)). A 4-D
    ``W2`` gives ``W1`` trailing 1×1 dims. Matches PEFT's LoKr ``get_delta_weight`` and
    LyCORIS' ``lokr.diff_weight``.
    """
    left = _lokr_half(w1, w1a, w1b, None)
    right = _lokr_half(w2, w2a, w2b, t2)
    return _kron(left, right, scaling, shape)


def _kron(
    left: torch.Tensor, right: torch.Tensor, scaling: float, shape: Sequence[int]
) -> torch.Tensor:
    if right.dim() == 4 and left.dim() == 2:
        left = left[:, :, None, None]
    # torch.kron needs contiguous inputs (Tucker einsum outputs are not).
    return torch.kron(left.contiguous(), right.contiguous()).reshape(tuple(shape)).mul_(scaling)


def dora_kohya(
    weight: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor, multiplier: float
) -> torch.Tensor:
    """LyCORIS DoRA (``dora_scale``) in float32: ``W* = g · (W + Δ) / ‖W + Δ‖_axis``, returned as
    ``W + multiplier · (W* − W)`` (ComfyUI's convention; LyCORIS' own agrees at multiplier 1).

    ``g`` (``scale``) is (out, 1[, 1, 1]) for one norm per output row (LyCORIS ≥ 3.1.1, as
    PEFT) or (1, in[, 1, 1]) for one norm per input column (older files). ``Δ`` excludes the
    multiplier.
    """
    w = weight.float()
    merged = w + delta.float().reshape(w.shape)
    flat = merged.reshape(merged.shape[0], -1)
    g = scale.float()
    if g.shape[0] == 1 and w.shape[0] != 1:  # one norm per input column
        norm = flat.norm(dim=0, keepdim=True).reshape((1, *w.shape[1:]))
    else:
        norm = flat.norm(dim=1).reshape((w.shape[0],) + (1,) * (w.dim() - 1))
    target = g.reshape(norm.shape) * merged / norm
    result: torch.Tensor = w + multiplier * (target - w)
    return result

"""Dense deltas of canonical diffusion LoRA updates, placed in the tensor they change: the
formulas of ``ops`` applied to an update's factors by their canonical part names. torch only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from . import ops
from .formats.model import Kind, ModuleUpdate
from .layouts.model import Piece
from .reader import TensorInfo

if TYPE_CHECKING:
    import torch

__all__ = ["update_delta", "placed_update"]


def update_delta(
    update: ModuleUpdate, factors: Mapping[str, torch.Tensor], scaling: float
) -> torch.Tensor:
    """The update's float32 delta, ``scaling`` included, as (rows, rest) of the module's weight.

    LoRA/LoCon: ``scaling · B.flatten(1) @ A.flatten(1)`` (spec §1.2); LoCon Tucker, LoHa and
    LoKr: ``ops.tucker_delta``, ``ops.loha_delta``, ``ops.lokr_delta`` (spec §4); full and
    norm: the stored ``diff`` / ``w_norm`` times ``scaling``.
    """
    f = factors
    if update.kind is Kind.LORA:
        down, up = f["down"], f["up"]
        delta = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
        return delta.mul_(scaling)
    if update.kind is Kind.LOCON_TUCKER:
        delta = ops.tucker_delta(f["down"], f["mid"], f["up"], scaling)
    elif update.kind in (Kind.LOHA, Kind.LOHA_TUCKER):
        rows = f["w1a"].shape[1] if "t1" in f else f["w1a"].shape[0]
        delta = ops.loha_delta(f["w1a"], f["w1b"], f["w2a"], f["w2b"], scaling, (rows, -1),
                               t1=f.get("t1"), t2=f.get("t2"))  # fmt: skip
    elif update.kind is Kind.LOKR:
        w1 = f["w1"] if "w1" in f else f["w1a"] @ f["w1b"]
        w2_rows = f["w2"].shape[0] if "w2" in f else f["w2a"].shape[1 if "t2" in f else 0]
        delta = ops.lokr_delta((w1.shape[0] * w2_rows, -1), scaling, w1=w1, w2=f.get("w2"),
                               w2a=f.get("w2a"), w2b=f.get("w2b"), t2=f.get("t2"))  # fmt: skip
    else:
        stored = f["diff"] if update.kind is Kind.FULL else f["w_norm"]
        delta = stored.float() * scaling
    return delta.reshape(delta.shape[0], -1) if delta.dim() > 1 else delta.reshape(1, -1)


def _bias_delta(
    update: ModuleUpdate, factors: Mapping[str, torch.Tensor], scaling: float
) -> torch.Tensor:
    # full: diff_b, norm: b_norm, LoRA with lora_bias: PEFT's ``scaling · lora_B.bias``
    part = {Kind.FULL: "diff_b", Kind.NORM: "b_norm"}.get(update.kind, "up_bias")
    return factors[part].float().reshape(1, -1) * scaling


def placed_update(
    update: ModuleUpdate,
    piece: Piece,
    get: Callable[[TensorInfo], torch.Tensor],
    scaling: float,
    shape: tuple[int, ...],
    *,
    bias: bool = False,
) -> ops.Update:
    """The ``ops`` update that adds ``update``'s delta (``delta_rows`` of it) to the tensor of
    ``shape`` (into ``weight_rows``, transposed when the piece says so). A plain LoRA on a whole
    tensor stays factored (``ops.LoraDelta``, merged block by block); with a ``magnitude``
    (diffusers DoRA) it is merged as PEFT's DoRA (``ops.LoraDelta.magnitude``)."""
    import torch

    factors = {name: get(info) for name, info in update.factors.items()}
    whole = piece.weight_rows is None and piece.delta_rows is None and not piece.transposed
    if update.dora_scale is not None and not bias:
        # planning puts m·s in ``scaling``; DoRA normalizes W + s·Δ, then applies m
        delta = update_delta(update, factors, update.scaling)
        return ops.WeightDecompose(delta, get(update.dora_scale), scaling / update.scaling)
    if update.kind is Kind.LORA and whole and not bias:
        a, b = factors["down"], factors["up"]
        # PEFT's DoRA (diffusers files): m·s in ``scaling``, as fuse_lora(lora_scale=m) scales
        # the layer before merging, so the norm is taken of W + m·s·Δ
        magnitude = factors["magnitude"].reshape(-1) if "magnitude" in factors else None
        return ops.LoraDelta(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1), scaling,
                             magnitude=magnitude)  # fmt: skip
    delta = (
        _bias_delta(update, factors, scaling) if bias else update_delta(update, factors, scaling)
    )
    if piece.delta_rows is not None:
        delta = delta[piece.delta_rows[0] : piece.delta_rows[1]]
    if piece.transposed:
        delta = delta.t()
    if piece.weight_rows is None:
        return ops.AddDelta(delta.reshape(shape))
    full = torch.zeros(shape[0], delta[0].numel(), dtype=torch.float32, device=delta.device)
    full[piece.weight_rows[0] : piece.weight_rows[1]] = delta.reshape(-1, full.shape[1])
    return ops.AddDelta(full.reshape(shape))

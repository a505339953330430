"""The LyCORIS deltas of ops.py (LoCon Tucker, LoHa, LoKr, kohya DoRA) against PEFT's LoHa/LoKr
merges and the lycoris-lora package's own weight computation (spec §4, V08, V11)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoHaConfig, LoKrConfig, get_peft_model
from torch import nn

from lorasurgeon.ops import dora_kohya, loha_delta, lokr_delta, tucker_delta

lycoris = pytest.importorskip("lycoris.functional")


MODULES = ("lin", "conv", "small")


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 48)
        self.conv = nn.Conv2d(32, 48, 3, padding=1)
        self.small = nn.Linear(6, 4)  # LoKr keeps both halves full: no rank


def _peft_deltas(
    config: LoHaConfig | LoKrConfig, seed: int
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A PEFT model with every adapter parameter random, and the delta its merge adds to
    each target weight."""
    torch.manual_seed(seed)
    base = Tiny()
    model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "hada_" in name or "lokr_" in name:
                p.normal_(0, 0.3)
    merged = copy.deepcopy(model).merge_and_unload()
    deltas = {m: getattr(merged, m).weight - getattr(base, m).weight for m in MODULES}
    return model, deltas


def _factor(model: nn.Module, module: str, name: str) -> torch.Tensor | None:
    layer = getattr(model.base_model.model, module)
    store = getattr(layer, name)
    return store["default"].detach() if "default" in store else None


@pytest.mark.parametrize("tucker", [False, True])
def test_loha_delta_matches_peft_and_lycoris(tucker: bool) -> None:
    config = LoHaConfig(r=4, alpha=6, target_modules=list(MODULES), use_effective_conv2d=tucker)
    model, deltas = _peft_deltas(config, seed=1)
    for module, delta in deltas.items():
        f = {
            n: _factor(model, module, f"hada_{n}")
            for n in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")
        }
        ours = loha_delta(
            f["w1_a"], f["w1_b"], f["w2_a"], f["w2_b"], 6 / 4, delta.shape, t1=f["t1"], t2=f["t2"]
        )
        torch.testing.assert_close(ours, delta, rtol=1e-5, atol=1e-6)
        if f["t1"] is not None:
            theirs = lycoris.loha.diff_weight(
                f["w1_b"], f["w1_a"], f["w2_b"], f["w2_a"], f["t1"], f["t2"], gamma=6 / 4
            )
        else:
            w1d = f["w1_b"].reshape(4, *delta.shape[1:])
            w2d = f["w2_b"].reshape(4, *delta.shape[1:])
            theirs = lycoris.loha.diff_weight(
                w1d, f["w1_a"], w2d, f["w2_a"], None, None, gamma=6 / 4
            )
        torch.testing.assert_close(ours, theirs.reshape(delta.shape), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("decompose_both", "tucker"), [(False, False), (True, False), (False, True), (True, True)]
)
def test_lokr_delta_matches_peft_and_lycoris(decompose_both: bool, tucker: bool) -> None:
    config = LoKrConfig(
        r=2,
        alpha=3,
        target_modules=list(MODULES),
        decompose_both=decompose_both,
        use_effective_conv2d=tucker,
        decompose_factor=4,
    )
    model, deltas = _peft_deltas(config, seed=2)
    kinds = set()
    for module, delta in deltas.items():
        names = ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")
        f = {n: _factor(model, module, f"lokr_{n}") for n in names}
        # PEFT scales by alpha/r always; LyCORIS by alpha/rank of a decomposed half, 1 when
        # both halves are full (spec §4): kohya files follow LyCORIS.
        ours = lokr_delta(
            delta.shape,
            3 / 2,
            w1=f["w1"],
            w1a=f["w1_a"],
            w1b=f["w1_b"],
            w2=f["w2"],
            w2a=f["w2_a"],
            w2b=f["w2_b"],
            t2=f["t2"],
        )
        torch.testing.assert_close(ours, delta, rtol=1e-5, atol=1e-6)
        decomposed = f["w1_b"] if f["w1_b"] is not None else f["w2_b"]
        scaling = 1.0 if decomposed is None else 3 / decomposed.shape[0]
        ours = lokr_delta(
            delta.shape,
            scaling,
            w1=f["w1"],
            w1a=f["w1_a"],
            w1b=f["w1_b"],
            w2=f["w2"],
            w2a=f["w2_a"],
            w2b=f["w2_b"],
            t2=f["t2"],
        )
        if f["t2"] is None and f["w2_b"] is not None and delta.dim() == 4:
            w2b = f["w2_b"].reshape(f["w2_b"].shape[0], -1, *delta.shape[2:])
        else:
            w2b = f["w2_b"]
        # kron_weight with the module's own scale: the functional diff_weight reads the rank
        # from w2_a.shape[1], which is b, not r, for Tucker factors (lycoris-lora 4.1.3)
        theirs = lycoris.lokr.kron_weight(
            f["w1"], f["w1_a"], f["w1_b"], f["w2"], f["w2_a"], w2b, f["t2"], scale=scaling
        )
        torch.testing.assert_close(ours, theirs.reshape(delta.shape), rtol=1e-5, atol=1e-6)
        kinds.add(tuple(n for n in names if f[n] is not None))
    assert len(kinds) >= 2  # full and decomposed halves, Tucker on the conv


def test_lokr_with_both_halves_decomposed_matches_lycoris() -> None:
    """PEFT never decomposes W1 at these sizes; LyCORIS files may (lokr_w1_a/lokr_w1_b)."""
    gen = torch.Generator().manual_seed(5)
    w1a, w1b = torch.randn(4, 2, generator=gen), torch.randn(2, 6, generator=gen)
    w2a, w2b = torch.randn(8, 2, generator=gen), torch.randn(2, 5 * 9, generator=gen)
    ours = lokr_delta((32, 30, 3, 3), 3 / 2, w1a=w1a, w1b=w1b, w2a=w2a, w2b=w2b)
    theirs = lycoris.lokr.diff_weight(
        None, w1a, w1b, None, w2a, w2b.reshape(2, 5, 3, 3), None, gamma=3.0
    )
    torch.testing.assert_close(ours, theirs)


def test_locon_tucker_delta_matches_lycoris_and_the_conv_chain() -> None:
    """down 1×1 -> mid 3×3 -> up 1×1 equals one 3×3 conv with the rebuilt kernel (V11)."""
    gen = torch.Generator().manual_seed(3)
    down = torch.randn(3, 6, 1, 1, generator=gen)
    mid = torch.randn(3, 3, 3, 3, generator=gen)
    up = torch.randn(8, 3, 1, 1, generator=gen)
    ours = tucker_delta(down, mid, up, 0.5)
    torch.testing.assert_close(ours, lycoris.locon.diff_weight(down, up, mid, gamma=0.5))
    x = torch.randn(2, 6, 7, 7, generator=gen)
    chain = 0.5 * nn.functional.conv2d(
        nn.functional.conv2d(nn.functional.conv2d(x, down), mid, padding=1), up
    )
    torch.testing.assert_close(
        nn.functional.conv2d(x, ours, padding=1), chain, rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("axis", ["output", "input"])
def test_dora_kohya_normalizes_along_the_stored_axis(axis: str) -> None:
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(8, 6, 3, 3, generator=gen)
    delta = torch.randn(8, 6, 3, 3, generator=gen) * 0.1
    g = (
        torch.rand(8, 1, 1, 1, generator=gen) + 0.5
        if axis == "output"
        else torch.rand(1, 6, 3, 3, generator=gen) + 0.5
    )
    full = dora_kohya(w, delta, g, 1.0)
    merged = (w + delta).double()
    if axis == "output":
        norm = merged.reshape(8, -1).norm(dim=1).reshape(8, 1, 1, 1)
    else:
        norm = merged.reshape(8, -1).norm(dim=0).reshape(1, 6, 3, 3)
    torch.testing.assert_close(full.double(), g.double() * merged / norm, rtol=1e-5, atol=1e-6)
    half = dora_kohya(w, delta, g, 0.5)
    torch.testing.assert_close(half, w + 0.5 * (full - w))

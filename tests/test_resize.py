"""``resize``: the exact truncated SVD of each module's ``scaling · B @ A``.

Lossless at or above the input rank, optimal below it (Eckart-Young on the product, checked
against a dense float64 SVD), the report's errors are the measured ones, rank selection obeys
its constraints, and PEFT loads the result with each module's update kept under one
lora_alpha (the config's r, so scaling 1 at that rank; no alpha_pattern, no rslora).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lorasurgeon
from lorasurgeon import AdapterError, OptionError
from lorasurgeon.lowrank import product_svd
from tests.conftest import FP32_REL_TOL, TinyBase, assert_matches_peft, make_adapter, peft_merge
from tests.test_combine import effective, loaded_by_peft, lora, rel

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def rank8(llama_fp32: TinyBase, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("resize")
    return make_adapter(llama_fp32, lora(*ALL, "embed_tokens", r=8, lora_alpha=16), root / "a",
                        seed=300)  # fmt: skip


def optimal_error(update: torch.Tensor, rank: int) -> float:
    s = torch.linalg.svdvals(update.double())
    return float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt())


@pytest.mark.parametrize("rank", [8, 12])
def test_resize_at_or_above_the_input_rank_is_lossless(
    llama_fp32: TinyBase, rank8: Path, tmp_path: Path, rank: int
) -> None:
    report = lorasurgeon.resize(rank8, tmp_path / "out", rank=rank)
    ours, source = loaded_by_peft(llama_fp32, tmp_path / "out"), loaded_by_peft(llama_fp32, rank8)
    assert ours.keys() == source.keys()
    for module, factors in ours.items():
        assert factors[0].shape[0] == 8  # never padded above the input rank
        assert factors[2] == 1.0  # one lora_alpha, = r: the input's scaling 2 is folded in
        assert rel(effective(factors), effective(source[module])) <= FP32_REL_TOL
    assert report.to_dict()["worst_rel_error"] <= FP32_REL_TOL


def test_smaller_rank_is_the_eckart_young_optimum(
    llama_fp32: TinyBase, rank8: Path, tmp_path: Path
) -> None:
    report = lorasurgeon.resize(rank8, tmp_path / "out", rank=3)
    ours, source = loaded_by_peft(llama_fp32, tmp_path / "out"), loaded_by_peft(llama_fp32, rank8)
    reported = {m.module: m for m in report.modules}
    for module, factors in ours.items():
        delta = effective(source[module])
        measured = rel(effective(factors), delta)
        best = optimal_error(delta, 3)
        assert best > 0.05  # a real truncation
        assert measured == pytest.approx(best, rel=1e-5)
        assert reported[module].rel_error == pytest.approx(measured, rel=1e-5)
        assert reported[module].rank == 3 and reported[module].alpha == 3.0


def test_energy_ranks_keep_the_fraction_and_are_minimal(rank8: Path, tmp_path: Path) -> None:
    report = lorasurgeon.resize(rank8, tmp_path / "out", rank_method="energy", energy=0.8)
    for m in report.modules:
        assert m.energy_kept >= 0.8 - 1e-9
    # minimal: one rank less would keep less than the fraction
    for m in report.modules:
        if m.rank > 1:
            smaller = lorasurgeon.resize(rank8, tmp_path / "one", rank=m.rank - 1, overwrite=True)
            kept = {r.module: r.energy_kept for r in smaller.modules}[m.module]
            assert kept < 0.8
            break


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [("sv_ratio", {"sv_ratio": 3.0}), ("sv_cumulative", {"sv_cumulative": 0.7})],
)
def test_kohya_dynamic_ranks_follow_their_definition_on_each_update(
    llama_fp32: TinyBase, rank8: Path, tmp_path: Path, method: str, kwargs: dict[str, float]
) -> None:
    report = lorasurgeon.resize(rank8, tmp_path / "out", rank_method=method, max_rank=6,
                                **kwargs)  # type: ignore[arg-type]  # fmt: skip
    source = loaded_by_peft(llama_fp32, rank8)
    reported = {m.module: m.rank for m in report.modules}
    for module, factors in source.items():
        s = torch.linalg.svdvals(effective(factors).double())
        if method == "sv_ratio":
            wanted = int((s >= s[0] / kwargs["sv_ratio"]).sum())
        else:
            wanted = int((s.cumsum(0) < kwargs["sv_cumulative"] * s.sum()).sum()) + 1
        assert reported[module] == min(max(wanted, 1), 6), module
    assert len(set(reported.values())) > 1  # the spectra differ, and so do the ranks


def test_budget_ranks_stay_within_the_budget(rank8: Path, tmp_path: Path) -> None:
    report = lorasurgeon.resize(rank8, tmp_path / "out", rank_method="budget", param_budget=4000)
    assert report.total_params <= 4000 < report.input_params
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert len({m.rank for m in report.modules}) > 1 and config["rank_pattern"]


def test_rslora_conv_and_embedding_modules_keep_their_update(
    conv_net: TinyBase, tmp_path: Path
) -> None:
    source_dir = make_adapter(conv_net, lora("conv", "pointwise", "head", use_rslora=True),
                              tmp_path / "a", seed=301)  # fmt: skip
    lorasurgeon.resize(source_dir, tmp_path / "out", rank=2)
    ours, source = loaded_by_peft(conv_net, tmp_path / "out"), loaded_by_peft(conv_net, source_dir)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["use_rslora"] is False and config["lora_alpha"] == config["r"] == 2
    for module, factors in ours.items():
        assert factors[2] == 1.0  # alpha / sqrt(r) folded into the factors
        best = optimal_error(effective(source[module]), 2)
        assert rel(effective(factors), effective(source[module])) == pytest.approx(best, rel=1e-5)


def test_whole_tensors_are_copied(llama_fp32: TinyBase, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    source_dir = make_adapter(llama_fp32, lora("q_proj", modules_to_save=["lm_head"]),
                              tmp_path / "a", seed=302)  # fmt: skip
    lorasurgeon.resize(source_dir, tmp_path / "out", rank=2)
    ours = load_file(tmp_path / "out" / "adapter_model.safetensors")
    source = load_file(source_dir / "adapter_model.safetensors")
    head = [k for k in source if "lm_head" in k]
    assert head and all(torch.equal(ours[k], source[k]) for k in head)


def test_bias_all_wrapper_copies_are_left_out_as_peft_loads_them(
    llama_seq_cls: TinyBase, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    config = lora("q_proj", task_type="SEQ_CLS", bias="all", modules_to_save=["up_proj"])
    source_dir = make_adapter(llama_seq_cls, config, tmp_path / "a", seed=303)
    lorasurgeon.resize(source_dir, tmp_path / "out", rank=4)
    ours = load_file(tmp_path / "out" / "adapter_model.safetensors")
    source = load_file(source_dir / "adapter_model.safetensors")
    inner = [k for k in source if ".modules_to_save." in k or ".original_module." in k]
    assert inner and not set(inner) & set(ours)
    lorasurgeon.merge(llama_seq_cls.path, [tmp_path / "out"], tmp_path / "merged", device="cpu")
    expected = peft_merge(llama_seq_cls, [source_dir])  # rank 4 = the input's: lossless
    report = assert_matches_peft(tmp_path / "merged", expected, llama_seq_cls)
    assert "model.layers.0.mlp.up_proj.bias" in report.changed


def test_resize_refuses_dora_and_options_that_cannot_apply(
    llama_fp32: TinyBase, rank8: Path, tmp_path: Path
) -> None:
    dora = make_adapter(llama_fp32, lora("q_proj", use_dora=True), tmp_path / "d", seed=303)
    with pytest.raises(AdapterError, match="DoRA"):
        lorasurgeon.resize(dora, tmp_path / "out", rank=2)
    with pytest.raises(OptionError, match="--min-rank"):
        lorasurgeon.resize(rank8, tmp_path / "out", min_rank=2)  # bounds of no rank method
    with pytest.raises(OptionError, match="--energy"):
        lorasurgeon.resize(rank8, tmp_path / "out", rank_method="energy")
    assert not (tmp_path / "out").exists()


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(1, 24), n=st.integers(1, 24), ranks=st.lists(st.integers(1, 6), min_size=1,
                                                               max_size=3),
    seed=st.integers(0, 2**16),
)  # fmt: skip
def test_factored_svd_equals_the_dense_svd(m: int, n: int, ranks: list[int], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    total = sum(ranks)
    left = torch.randn(m, total, generator=gen, dtype=torch.float64)
    right = torch.randn(total, n, generator=gen, dtype=torch.float64)
    product = left @ right
    svd = product_svd(left, right)
    dense = torch.linalg.svdvals(product)
    k = min(m, n, total)
    assert svd.max_rank == k
    scale = float(dense[0]) if dense.numel() else 1.0
    assert torch.allclose(svd.s, dense[:k], atol=1e-10 * scale)
    rebuilt = (svd.u * svd.s) @ svd.vh
    assert torch.allclose(rebuilt, product, atol=1e-10 * scale)
    assert svd.total_energy == pytest.approx(float(product.square().sum()), rel=1e-10)
    for r in range(k + 1):  # Eckart-Young for every truncation
        best = float(dense[r:].square().sum())
        lost = svd.total_energy - svd.kept_energy(r)
        assert lost == pytest.approx(best, rel=1e-8, abs=1e-10 * scale**2)

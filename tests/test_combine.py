"""``combine`` against PEFT's ``add_weighted_adapter`` on tiny models.

The oracle is PEFT itself: the base is loaded, the adapters loaded into it, combined with
``add_weighted_adapter`` and the new adapter's factors read from the model. Our output is read
back through ``PeftModel.from_pretrained``, so every comparison also checks that PEFT loads it
(exact target names, rank_pattern/alpha_pattern). Deterministic methods must match PEFT's
tensors; SVD methods PEFT's effective update ``scaling · B @ A``; DARE methods match exactly
when PEFT's random masks are replayed into ours, and in distribution otherwise.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

import lorasurgeon
from lorasurgeon import AdapterError, IncompatibleError, OptionError
from tests.conftest import (
    FP32_REL_TOL,
    TinyBase,
    assert_matches_peft,
    make_adapter,
    peft_merge,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

Factors = dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # module -> (A, B, scaling)


def lora(*targets: str, **options: Any) -> LoraConfig:
    options.setdefault("r", 4)
    options.setdefault("lora_alpha", 8)
    return LoraConfig(target_modules=list(targets), **options)


# Two adapters that share q/v, each with a module of its own, different scalings.
FIRST = lora("q_proj", "v_proj", "o_proj")
SECOND = lora("q_proj", "k_proj", "v_proj", lora_alpha=16)
WEIGHTS = (0.7, 0.4)


@pytest.fixture(scope="module")
def pair(llama_fp32: TinyBase, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("combine-pair")
    return [make_adapter(llama_fp32, c, root / f"a{i}", seed=200 + i)
            for i, c in enumerate((FIRST, SECOND))]  # fmt: skip


def _factors_of(model: torch.nn.Module, name: str) -> Factors:
    found: Factors = {}
    for path, module in model.named_modules():
        if not isinstance(module, LoraLayer) or name not in module.scaling:
            continue
        if name in module.lora_A:
            a, b = module.lora_A[name].weight, module.lora_B[name].weight
        else:
            a, b = module.lora_embedding_A[name], module.lora_embedding_B[name]
        module_name = path.removeprefix("base_model.model.")
        found[module_name] = (a.detach().clone(), b.detach().clone(), module.scaling[name])
    return found


def _load(base: TinyBase, adapters: Sequence[Path], dtype: torch.dtype | None = None) -> PeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(base.load(dtype), adapters[0], adapter_name="a0")
        for i, path in enumerate(adapters[1:], start=1):
            model.load_adapter(path, adapter_name=f"a{i}")
    return model


def peft_combine(
    base: TinyBase, adapters: Sequence[Path], weights: Sequence[float], kind: str,
    dtype: torch.dtype | None = None, **kw: Any,
) -> Factors:  # fmt: skip
    """The oracle: PEFT's add_weighted_adapter, its new adapter's factors and scalings.

    With ``dtype=torch.float64`` PEFT computes in float64 (the model and the adapters loaded
    in it): its SVD of the weighted sum is then exact to float64, where in float32 singular
    vectors are only as good as eps32 · ||delta|| / (gap between singular values), up to
    1e-5 here, and MKL's float32 SVD varies in its last bits from run to run.
    """
    model = _load(base, adapters, dtype)
    names = [f"a{i}" for i in range(len(adapters))]
    model.add_weighted_adapter(names, list(weights), "mix", combination_type=kind, **kw)
    return _factors_of(model, "mix")


def loaded_by_peft(base: TinyBase, adapter: Path) -> Factors:
    """Our output as PEFT loads it."""
    return _factors_of(_load(base, [adapter]), "a0")


def effective(factors: tuple[torch.Tensor, torch.Tensor, float]) -> torch.Tensor:
    a, b, scaling = factors
    return scaling * (b.reshape(b.shape[0], -1).double() @ a.reshape(a.shape[0], -1).double())


def exact_sum(base: TinyBase, adapters: Sequence[Path], weights: Sequence[float]) -> dict:
    """Σ w_i s_i B_i @ A_i per module, float64, from the adapters as PEFT loads them."""
    total: dict[str, torch.Tensor] = {}
    for path, w in zip(adapters, weights, strict=True):
        for module, f in loaded_by_peft(base, [path][0]).items():
            total[module] = total.get(module, 0) + w * effective(f)
    return total


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.double() - y.double()).norm() / y.double().norm())


def assert_same_tensors(ours: Factors, peft: Factors) -> None:
    assert ours.keys() == peft.keys()
    for module, (a, b, scaling) in ours.items():
        pa, pb, ps = peft[module]
        assert scaling == ps, module
        for mine, theirs in ((a, pa), (b, pb)):
            assert mine.shape == theirs.shape, module
            assert rel(mine, theirs) <= FP32_REL_TOL, (module, rel(mine, theirs))


def assert_same_updates(ours: Factors, peft: Factors, tol: float = FP32_REL_TOL) -> None:
    assert ours.keys() == peft.keys()
    for module in ours:
        assert rel(effective(ours[module]), effective(peft[module])) <= tol, module


def run(adapters: Sequence[Path], out: Path, **kw: Any) -> lorasurgeon.CombineReport:
    return lorasurgeon.combine(adapters, out, **kw)


# ---------------------------------------------------------------------------------------------
# Deterministic methods: PEFT's tensors


@pytest.mark.parametrize(
    ("method", "options", "weights"),
    [
        ("linear", {}, WEIGHTS),
        ("linear", {}, (0.7, -0.4)),
        ("ties", {"density": 0.5}, WEIGHTS),
        ("ties", {"density": 0.6, "majority_sign": "frequency"}, (0.7, -0.4)),
        ("magnitude_prune", {"density": 0.5}, WEIGHTS),
    ],
)
def test_factor_wise_methods_match_peft_tensors(
    llama_fp32: TinyBase, pair: list[Path], tmp_path: Path, method: str, options: dict,
    weights: tuple[float, float],
) -> None:  # fmt: skip
    run(pair, tmp_path / "out", weights=weights, method=method, **options)
    peft_kw = {k.replace("majority_sign", "majority_sign_method"): v for k, v in options.items()}
    expected = peft_combine(llama_fp32, pair, weights, method, **peft_kw)
    assert_same_tensors(loaded_by_peft(llama_fp32, tmp_path / "out"), expected)


@pytest.fixture(scope="module")
def mixed_ranks(llama_fp32: TinyBase, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("combine-mixed")
    return [
        make_adapter(llama_fp32, FIRST, root / "a0", seed=1),
        make_adapter(llama_fp32, lora("q_proj", "k_proj", r=8, lora_alpha=8), root / "a1", seed=2),
    ]


def test_cat_is_peft_without_its_zero_padding(
    llama_fp32: TinyBase, mixed_ranks: list[Path], tmp_path: Path
) -> None:
    adapters = mixed_ranks
    run(adapters, tmp_path / "out", weights=WEIGHTS, method="cat")
    ours = loaded_by_peft(llama_fp32, tmp_path / "out")
    peft = peft_combine(llama_fp32, adapters, WEIGHTS, "cat")
    exact = exact_sum(llama_fp32, adapters, WEIGHTS)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["alpha_pattern"] == {} and config["lora_alpha"] == config["r"]
    for module, (a, b, scaling) in ours.items():
        pa, pb, _ = peft[module]
        rank = a.shape[0]  # ours: the sum of the ranks present here; PEFT pads to 4 + 8
        assert rank == (12 if "q_proj" in module else 8 if "k_proj" in module else 4)
        assert scaling == config["lora_alpha"] / rank  # one alpha: PEFT's, llama.cpp's rule
        root = math.sqrt(scaling)  # PEFT's factors (scaling 1) with the scaling folded in
        assert rel(a * root, pa[:rank]) <= FP32_REL_TOL
        assert rel(b * root, pb[:, :rank]) <= FP32_REL_TOL
        assert not pa[rank:].any() and not pb[:, rank:].any()
        assert rel(effective(ours[module]), exact[module]) <= FP32_REL_TOL


# ---------------------------------------------------------------------------------------------
# SVD methods: PEFT's effective update


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("linear", {}),
        ("linear", {"rank": 3}),
        ("linear", {"rank": 16}),
        ("ties", {"density": 0.5, "rank": 4}),
        ("magnitude_prune", {"density": 0.7}),
    ],
)
def test_svd_methods_match_peft_updates(
    llama_fp32: TinyBase, pair: list[Path], tmp_path: Path, method: str, options: dict
) -> None:
    run(pair, tmp_path / "out", weights=WEIGHTS, method=method, svd=True, **options)
    kind = "svd" if method == "linear" else f"{method}_svd"
    peft_kw = {"svd_rank" if k == "rank" else k: v for k, v in options.items()}
    ours = loaded_by_peft(llama_fp32, tmp_path / "out")
    # the pruning methods prune float32 deltas (as we do): float64 would move their ties
    dtype = torch.float64 if method == "linear" else None
    peft = peft_combine(llama_fp32, pair, WEIGHTS, kind, dtype=dtype, **peft_kw)
    assert_same_updates(ours, peft)
    if method == "linear" and options.get("rank", 4) >= 8:  # rank >= the sum: exact
        exact = exact_sum(llama_fp32, pair, WEIGHTS)
        for module, factors in ours.items():
            assert rel(effective(factors), exact[module]) <= FP32_REL_TOL
            assert factors[0].shape[0] <= 8  # the true rank, not 16 (PEFT: 16, zero-padded)


@pytest.mark.parametrize("rank", [None, 5])
def test_svd_of_mixed_ranks_matches_peft(
    llama_fp32: TinyBase, mixed_ranks: list[Path], tmp_path: Path, rank: int | None
) -> None:
    run(mixed_ranks, tmp_path / "out", weights=WEIGHTS, svd=True, rank=rank)
    ours = loaded_by_peft(llama_fp32, tmp_path / "out")
    peft = peft_combine(llama_fp32, mixed_ranks, WEIGHTS, "svd", torch.float64, svd_rank=rank)
    assert_same_updates(ours, peft)
    assert ours["model.layers.0.self_attn.o_proj"][0].shape[0] == 4  # only the r=4 adapter


@contextmanager
def canonical_svd_signs() -> Iterator[None]:
    """torch.linalg.svd with each left singular vector's largest-magnitude entry positive: the
    sign convention lorasurgeon documents, imposed on PEFT so that a clamp by a quantile of the
    signed factor values is comparable."""
    original = torch.linalg.svd

    def svd(a: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        u, s, vh = original(a, *args, **kwargs)
        rows = u.abs().argmax(dim=0)
        signs = torch.sign(u[rows, torch.arange(u.shape[1])])
        signs[signs == 0] = 1
        k = vh.shape[0]
        return u * signs, s, vh * signs[:k, None] if k == u.shape[1] else _flip(vh, signs)

    def _flip(vh: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
        vh = vh.clone()
        vh[: signs.shape[0]] *= signs[: vh.shape[0], None]
        return vh

    torch.linalg.svd = svd
    try:
        yield
    finally:
        torch.linalg.svd = original


def test_svd_clamp_matches_peft(llama_fp32: TinyBase, pair: list[Path], tmp_path: Path) -> None:
    run(pair, tmp_path / "out", weights=WEIGHTS, svd=True, rank=4, clamp=0.9)
    with canonical_svd_signs():
        peft = peft_combine(llama_fp32, pair, WEIGHTS, "svd", torch.float64, svd_rank=4,
                            svd_clamp=0.9)  # fmt: skip
    ours = loaded_by_peft(llama_fp32, tmp_path / "out")
    assert_same_tensors(ours, peft)  # same split (all of S in B), same clamp
    unclamped = peft_combine(llama_fp32, pair, WEIGHTS, "svd", svd_rank=4)
    assert any(rel(effective(ours[m]), effective(unclamped[m])) > 1e-3 for m in ours)


@pytest.mark.parametrize("kind", ["svd", "cat", "linear"])
def test_conv_and_embedding_modules_combine_like_peft(
    conv_net: TinyBase, llama_fp32: TinyBase, tmp_path: Path, kind: str
) -> None:
    for base, config in ((conv_net, lora("conv", "pointwise", "head")),
                         (llama_fp32, lora("embed_tokens", "q_proj"))):  # fmt: skip
        root = tmp_path / base.name
        adapters = [make_adapter(base, config, root / f"a{i}", seed=30 + i) for i in range(2)]
        svd = kind == "svd"
        run(adapters, root / "out", weights=WEIGHTS, method="linear" if svd else kind, svd=svd)
        ours = loaded_by_peft(base, root / "out")
        peft = peft_combine(base, adapters, WEIGHTS, kind, torch.float64 if svd else None)
        if kind == "cat":
            assert_same_updates(ours, peft)
        else:
            (assert_same_updates if svd else assert_same_tensors)(ours, peft)


def test_gpt2_conv1d_svd_matches_peft(gpt2: TinyBase, tmp_path: Path) -> None:
    config = lora("c_attn", "c_proj")
    adapters = [make_adapter(gpt2, config, tmp_path / f"a{i}", seed=40 + i) for i in range(2)]
    run(adapters, tmp_path / "out", weights=WEIGHTS, svd=True, rank=3)
    peft = peft_combine(gpt2, adapters, WEIGHTS, "svd", torch.float64, svd_rank=3)
    assert_same_updates(loaded_by_peft(gpt2, tmp_path / "out"), peft)


# ---------------------------------------------------------------------------------------------
# DARE: exact under PEFT's masks, right in distribution under ours


@contextmanager
def recorded_bernoulli(draws: list[torch.Tensor]) -> Iterator[None]:
    original = torch.bernoulli

    def bernoulli(*args: Any, **kwargs: Any) -> torch.Tensor:
        mask = original(*args, **kwargs)
        draws.append(mask.clone())
        return mask

    torch.bernoulli = bernoulli
    try:
        yield
    finally:
        torch.bernoulli = original


def replayed_masks(
    base: TinyBase, adapters: Sequence[Path], kind: str, draws: list[torch.Tensor]
) -> Callable[[str, str, int], torch.Tensor]:
    """PEFT's masks by (module, part, adapter): PEFT walks the modules in model order and, per
    module, draws one mask per present adapter for lora_A, then for lora_B (factor-wise), or
    one per present adapter's delta (svd variants)."""
    model = _load(base, adapters)
    names = [f"a{i}" for i in range(len(adapters))]
    parts = ["delta"] if kind.endswith("_svd") else ["lora_A", "lora_B"]
    keyed, queue = {}, iter(draws)
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer):
            present = [i for i, n in enumerate(names) if n in module.lora_A]
            for part in parts:
                for i in present:
                    keyed[(path.removeprefix("base_model.model."), part, i)] = next(queue)
    assert next(queue, None) is None, "more masks drawn than modules need"
    return lambda module, part, i: keyed[(module, part, i)]


@pytest.mark.parametrize("kind", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_dare_matches_peft_under_its_masks(
    llama_fp32: TinyBase, pair: list[Path], tmp_path: Path, kind: str
) -> None:
    draws: list[torch.Tensor] = []
    with recorded_bernoulli(draws):
        peft = peft_combine(llama_fp32, pair, WEIGHTS, kind, density=0.6, svd_rank=4)
    masks = replayed_masks(llama_fp32, pair, kind, draws)
    svd = kind.endswith("_svd")
    run(pair, tmp_path / "out", weights=WEIGHTS, method=kind.removesuffix("_svd"), svd=svd,
        density=0.6, masks=masks, **({"rank": 4} if svd else {}))  # fmt: skip
    ours = loaded_by_peft(llama_fp32, tmp_path / "out")
    (assert_same_updates if svd else assert_same_tensors)(ours, peft)


def test_dare_masks_keep_the_density_and_rescale(
    llama_fp32: TinyBase, pair: list[Path], tmp_path: Path
) -> None:
    """One adapter's module under dare_linear: each element kept with probability d, kept
    elements scaled by w_A / d exactly; different seeds draw different masks."""
    density = 0.3
    outs = []
    for seed in (0, 1):
        run(pair, tmp_path / f"out{seed}", weights=WEIGHTS, method="dare_linear",
            density=density, seed=seed)  # fmt: skip
        outs.append(load_file(tmp_path / f"out{seed}" / "adapter_model.safetensors"))
    source = load_file(pair[0] / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"  # only in FIRST
    weight_a = math.sqrt(WEIGHTS[0] * 2.0)  # sqrt(w · scaling), scaling 8 / 4
    kept_total = 0
    for out in outs:
        kept = out[key] != 0
        expected = (source[key] / density) * torch.tensor(weight_a, dtype=torch.float32)
        assert torch.equal(out[key][kept], expected[kept])
        kept_total += int(kept.sum())
    n = 2 * source[key].numel()
    assert abs(kept_total - density * n) <= 5 * math.sqrt(n * density * (1 - density))
    assert not torch.equal(outs[0][key], outs[1][key])


# ---------------------------------------------------------------------------------------------
# Where PEFT is surprising (matched) or wrong (not matched)


def test_linear_doubles_an_adapter_combined_with_itself_and_warns(
    llama_fp32: TinyBase, pair: list[Path], tmp_path: Path
) -> None:
    twice = [pair[0], pair[0]]
    report = run(twice, tmp_path / "lin", weights=(0.5, 0.5))
    run(twice, tmp_path / "svd", weights=(0.5, 0.5), svd=True)
    single = loaded_by_peft(llama_fp32, pair[0])
    for name, ratio in (("lin", 2.0), ("svd", 1.0)):
        ours = loaded_by_peft(llama_fp32, tmp_path / name)
        for module, factors in ours.items():
            assert rel(effective(factors), ratio * effective(single[module])) <= FP32_REL_TOL
    assert any("cross terms" in note for note in report.notes)
    assert report.to_dict()["worst_rel_error"] == pytest.approx(1.0, rel=1e-6)


def test_rslora_inputs_give_the_exact_sum_where_peft_is_sqrt_r_too_large(
    llama_fp32: TinyBase, tmp_path: Path
) -> None:
    config = lora("q_proj", "v_proj", use_rslora=True)
    adapters = [make_adapter(llama_fp32, config, tmp_path / f"a{i}", seed=50 + i)
                for i in range(2)]  # fmt: skip
    run(adapters, tmp_path / "out", weights=WEIGHTS, method="cat")
    ours = loaded_by_peft(llama_fp32, tmp_path / "out")
    peft = peft_combine(llama_fp32, adapters, WEIGHTS, "cat")
    exact = exact_sum(llama_fp32, adapters, WEIGHTS)
    for module in exact:
        assert rel(effective(ours[module]), exact[module]) <= FP32_REL_TOL
        ratio = effective(peft[module]).norm() / exact[module].norm()
        assert float(ratio) == pytest.approx(math.sqrt(8), rel=1e-5)


def test_rank_pattern_inputs_keep_per_module_ranks(llama_fp32: TinyBase, tmp_path: Path) -> None:
    """PEFT's linear gives factors its own config contradicts (they cannot be reloaded); ours
    writes each module's rank in rank_pattern and reloads, with PEFT's factors times
    1 / sqrt(scaling) each (one lora_alpha = r: scaling 2 at rank 2), so PEFT's update."""
    config = lora("q_proj", "v_proj", rank_pattern={"q_proj": 2})
    adapters = [make_adapter(llama_fp32, config, tmp_path / f"a{i}", seed=60 + i)
                for i in range(2)]  # fmt: skip
    run(adapters, tmp_path / "out", weights=WEIGHTS)
    ours = loaded_by_peft(llama_fp32, tmp_path / "out")
    peft = peft_combine(llama_fp32, adapters, WEIGHTS, "linear")
    folded = {m: (a * math.sqrt(s), b * math.sqrt(s), 1.0) for m, (a, b, s) in ours.items()}
    assert_same_tensors(folded, peft)
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["r"] == saved["lora_alpha"] == 4 and set(saved["rank_pattern"].values()) == {2}
    assert saved["alpha_pattern"] == {}
    assert {m: s for m, (_, _, s) in ours.items() if s != 1} == {
        m: 2.0 for m in ours if "q_proj" in m
    }


def test_whole_tensors_of_one_adapter_are_kept(llama_fp32: TinyBase, tmp_path: Path) -> None:
    adapters = [
        make_adapter(llama_fp32, lora("q_proj", modules_to_save=["lm_head"]), tmp_path / "a0",
                     seed=70),
        make_adapter(llama_fp32, lora("v_proj"), tmp_path / "a1", seed=71),
    ]  # fmt: skip
    run(adapters, tmp_path / "out", weights=WEIGHTS, method="cat")
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    source = load_file(adapters[0] / "adapter_model.safetensors")
    head = [k for k in source if "lm_head" in k]
    assert head and all(torch.equal(saved[k], source[k]) for k in head)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["lm_head"]


def test_bias_all_wrapper_copies_are_left_out_as_peft_loads_them(
    llama_seq_cls: TinyBase, tmp_path: Path
) -> None:
    # bias="all" with modules_to_save saves <m>.modules_to_save.bias and <m>.original_module.bias
    # besides <m>.bias; PEFT loads only <m>.bias, so the combination keeps only that one.
    config = lora("q_proj", task_type="SEQ_CLS", bias="all", modules_to_save=["down_proj"])
    adapters = [make_adapter(llama_seq_cls, config, tmp_path / "a0", seed=72),
                make_adapter(llama_seq_cls, lora("v_proj"), tmp_path / "a1", seed=73)]  # fmt: skip
    run(adapters, tmp_path / "out", weights=WEIGHTS, method="cat")
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    source = load_file(adapters[0] / "adapter_model.safetensors")
    inner = [k for k in source if ".modules_to_save." in k or ".original_module." in k]
    assert inner and not set(inner) & set(saved)
    biases = [k for k in source if k.endswith(".bias") and k not in inner]
    assert biases and all(torch.equal(saved[k], source[k]) for k in biases)
    lorasurgeon.merge(llama_seq_cls.path, [tmp_path / "out"], tmp_path / "merged", device="cpu")
    expected = peft_merge(llama_seq_cls, [tmp_path / "out"])
    report = assert_matches_peft(tmp_path / "merged", expected, llama_seq_cls)
    assert "model.layers.1.mlp.down_proj.bias" in report.changed


# ---------------------------------------------------------------------------------------------
# Refusals


def test_mixed_ranks_name_the_methods_that_work(
    llama_fp32: TinyBase, pair: list[Path], tmp_path: Path
) -> None:
    other = make_adapter(llama_fp32, lora("q_proj", r=8), tmp_path / "r8", seed=80)
    with pytest.raises(OptionError, match=r"cat or --svd"):
        run([pair[0], other], tmp_path / "out", method="ties", density=0.5)
    with pytest.raises(ValueError, match="same r"):  # PEFT refuses too
        peft_combine(llama_fp32, [pair[0], other], WEIGHTS, "ties", density=0.5)
    assert not (tmp_path / "out").exists()
    run([pair[0], other], tmp_path / "out", svd=True)  # any ranks


def test_dora_adapters_are_refused(llama_fp32: TinyBase, pair: list[Path], tmp_path: Path) -> None:
    dora = make_adapter(llama_fp32, lora("q_proj", use_dora=True), tmp_path / "dora", seed=81)
    with pytest.raises(AdapterError, match="DoRA"):
        run([pair[0], dora], tmp_path / "out")


def test_adapters_of_different_bases_are_refused(pair: list[Path], tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "adapter_config.json").write_text((pair[1] / "adapter_config.json").read_text())
    tensors = load_file(pair[1] / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1)
    save_file(tensors, other / "adapter_model.safetensors")
    with pytest.raises(IncompatibleError, match="q_proj") as info:
        run([pair[0], other], tmp_path / "out")
    assert "different base" in str(info.value)


def test_conflicting_modules_to_save_are_refused(llama_fp32: TinyBase, tmp_path: Path) -> None:
    config = lora("q_proj", modules_to_save=["lm_head"])
    adapters = [make_adapter(llama_fp32, config, tmp_path / f"a{i}", seed=90 + i)
                for i in range(2)]  # fmt: skip
    with pytest.raises(IncompatibleError, match="lm_head"):
        run(adapters, tmp_path / "out")


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"method": "ties"}, "--density"),
        ({"method": "linear", "density": 0.5}, "pruning"),
        ({"method": "cat", "svd": True}, "cat has no --svd"),
        ({"rank": 4}, "--svd"),
        ({"clamp": 0.9}, "--svd"),
        ({"weights": [1.0]}, "one finite --weight per adapter"),
        ({"method": "mean"}, "one of linear"),
    ],
)
def test_bad_options_are_refused_before_anything_is_written(
    pair: list[Path], tmp_path: Path, options: dict, words: str
) -> None:
    with pytest.raises(OptionError, match=words):
        run(pair, tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_one_adapter_is_scaled_as_peft_does(
    llama_fp32: TinyBase, pair: list[Path], tmp_path: Path
) -> None:
    # PEFT silently runs linear for one adapter; a method that cannot apply is refused instead
    with pytest.raises(OptionError, match="one adapter"):
        run([pair[0]], tmp_path / "out", weights=[0.5], method="ties", density=0.5)
    with pytest.raises(OptionError, match="one adapter"):
        run([pair[0]], tmp_path / "out", weights=[0.5], svd=True)
    assert not (tmp_path / "out").exists()
    report = run([pair[0]], tmp_path / "out", weights=[0.5])
    assert report.method == "linear" and any("resize" in n for n in report.notes)
    ours = loaded_by_peft(llama_fp32, tmp_path / "out")
    single = loaded_by_peft(llama_fp32, pair[0])
    for module, factors in ours.items():
        assert rel(effective(factors), 0.5 * effective(single[module])) <= FP32_REL_TOL


def test_adapters_saved_with_different_base_embeddings_are_refused(
    llama_fp32: TinyBase, tmp_path: Path
) -> None:
    from tests.conftest import _tiny_llama

    config = lora("embed_tokens", "q_proj")
    mine = make_adapter(llama_fp32, config, tmp_path / "a0", seed=95)
    other_base = make_adapter(lambda: _tiny_llama(seed=5), config, tmp_path / "a1", seed=96)
    with pytest.raises(IncompatibleError, match="different base embeddings"):
        run([mine, other_base], tmp_path / "out", method="cat")
    run([mine, mine], tmp_path / "same", method="cat")  # the same base copy twice is fine


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_a_failed_combination_leaves_nothing_behind(
    pair: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    import importlib

    module = importlib.import_module("lorasurgeon.combine")
    original, calls = module.combine_module, []

    def failing(*args: Any) -> Any:
        calls.append(1)
        if len(calls) == 3:
            raise error
        return original(*args)

    monkeypatch.setattr(module, "combine_module", failing)
    with pytest.raises(type(error)):
        run(pair, tmp_path / "out", svd=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("options", [{"svd": True}, {"method": "ties", "density": 0.5,
                                                     "svd": True}, {"method": "cat"}])  # fmt: skip
def test_gpu_combine_and_resize_match_cpu(pair: list[Path], tmp_path: Path, options: dict) -> None:
    for device in ("cpu", "cuda"):
        run(pair, tmp_path / f"mix-{device}", weights=WEIGHTS, device=device, **options)
        lorasurgeon.resize(pair[1], tmp_path / f"small-{device}", rank=2, device=device)
    for kind in ("mix", "small"):
        cpu = load_file(tmp_path / f"{kind}-cpu" / "adapter_model.safetensors")
        gpu = load_file(tmp_path / f"{kind}-cuda" / "adapter_model.safetensors")
        assert cpu.keys() == gpu.keys()
        for key_a in (k for k in cpu if "lora_A" in k):  # updates: vectors depend on gaps
            key_b = key_a.replace("lora_A", "lora_B")
            updates = [f[key_b].double() @ f[key_a].double() for f in (gpu, cpu)]
            assert rel(*updates) <= FP32_REL_TOL, key_a

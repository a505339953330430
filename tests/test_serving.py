"""Adapters every client applies right: PEFT's rule, llama.cpp's rule and vLLM's rule.

Each adapter that extract, combine and resize write is read three ways from its files:

- PEFT (the oracle): the adapter loaded by ``PeftModel.from_pretrained``, its scalings.
- llama.cpp: ``convert_lora_to_gguf.py`` keeps only ``lora_alpha``; the runtime scales each
  module by ``lora_alpha / rank`` with the rank of that module's tensors.
- vLLM: ``PEFTHelper`` applies ``lora_alpha / r`` (``/ sqrt(r)`` with use_rslora), the
  config's ``r``, to every module and ignores rank_pattern and alpha_pattern.

Every output (one alpha, no alpha_pattern) must give the intended update under PEFT's and
llama.cpp's rule; with ``--uniform-rank`` under vLLM's too, and PEFT's merge of it must equal
ours. Without it, mixed ranks are mis-scaled by vLLM exactly where the note and ``inspect``
say. ``inspect``'s verdicts are checked against the same rules on adapters PEFT writes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import lorasurgeon
from lorasurgeon.adapters import KEY_PREFIX
from tests.conftest import (
    FP32_REL_TOL,
    TinyBase,
    assert_matches_peft,
    make_adapter,
    peft_merge,
)
from tests.test_combine import (
    FIRST,
    WEIGHTS,
    effective,
    exact_sum,
    loaded_by_peft,
    lora,
    peft_combine,
    rel,
)
from tests.test_extract import _make_tuned

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

Updates = dict[str, torch.Tensor]
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _factors(adapter: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    tensors = load_file(adapter / "adapter_model.safetensors")
    found = {}
    for key, a in tensors.items():
        for suffix_a, suffix_b in ((".lora_A.weight", ".lora_B.weight"),
                                   (".lora_embedding_A", ".lora_embedding_B")):  # fmt: skip
            if key.endswith(suffix_a):
                module = key.removeprefix(KEY_PREFIX).removesuffix(suffix_a)
                found[module] = (a, tensors[key.removesuffix(suffix_a) + suffix_b])
    return found


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return b.reshape(b.shape[0], -1).double() @ a.reshape(a.shape[0], -1).double()


def llama_cpp_rule(adapter: Path) -> Updates:
    """What llama.cpp applies: the config's lora_alpha over each module's tensor rank."""
    alpha = json.loads((adapter / "adapter_config.json").read_text())["lora_alpha"]
    return {m: alpha / a.shape[0] * _product(a, b) for m, (a, b) in _factors(adapter).items()}


def vllm_rule(adapter: Path) -> Updates:
    """What vLLM applies: one factor lora_alpha / r (sqrt(r) with rslora), patterns ignored."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    r = math.sqrt(config["r"]) if config.get("use_rslora") else config["r"]
    return {m: config["lora_alpha"] / r * _product(a, b) for m, (a, b) in _factors(adapter).items()}


def peft_rule(base: TinyBase, adapter: Path) -> Updates:
    return {m: effective(f) for m, f in loaded_by_peft(base, adapter).items()}


def mismatched(got: Updates, want: Updates, tol: float = FP32_REL_TOL) -> set[str]:
    assert got.keys() == want.keys()
    return {m for m in want if rel(got[m], want[m]) > tol}


def check_outputs(base: TinyBase, plain: Path, uniform: Path, intended: Updates) -> None:
    """The checks every command's outputs get (see the module docstring)."""
    config = json.loads((plain / "adapter_config.json").read_text())
    assert config["alpha_pattern"] == {} and config["use_rslora"] is False
    peft = peft_rule(base, plain)
    assert mismatched(peft, intended) == set()
    assert mismatched(llama_cpp_rule(plain), intended) == set()
    ranks = {m: a.shape[0] for m, (a, _) in _factors(plain).items()}
    assert mismatched(vllm_rule(plain), intended) == {m for m, k in ranks.items()
                                                      if k != config["r"]}  # fmt: skip
    assert bool(config["rank_pattern"]) == (len(set(ranks.values())) > 1)
    saved = json.loads((uniform / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == {} and saved["alpha_pattern"] == {}
    assert saved["r"] == max(ranks.values())
    assert {a.shape[0] for a, _ in _factors(uniform).values()} == {saved["r"]}
    for rule in (peft_rule(base, uniform), llama_cpp_rule(uniform), vllm_rule(uniform)):
        assert mismatched(rule, intended) == set()
    lorasurgeon.merge(base.path, [uniform], uniform.parent / "merged", device="cpu")
    assert_matches_peft(uniform.parent / "merged", peft_merge(base, [uniform]), base)


def outputs(tmp_path: Path) -> tuple[Path, Path]:
    """The plain and the --uniform-rank output paths (each in a directory of its own, where
    check_outputs merges it)."""
    for name in ("plain", "uniform"):
        (tmp_path / name).mkdir()
    return tmp_path / "plain" / "a", tmp_path / "uniform" / "a"


def notes_of(report: Any) -> tuple[list[str], list[str]]:
    mixed = [n for n in report.notes if "vLLM" in n and "--uniform-rank" in n]
    cost = [n for n in report.notes if n.startswith("--uniform-rank:")]
    return mixed, cost


# ---------------------------------------------------------------------------------------------
# extract


@pytest.fixture(scope="module")
def noisy(llama_fp32: TinyBase, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_tuned(llama_fp32, tmp_path_factory.mktemp("serving_tuned"), noise=0.01)


@pytest.mark.parametrize(
    "options",
    [
        {"rank": 4},
        {"rank": 4, "alpha": 32.0},
        {"rank_method": "energy", "energy": 0.5},
        {"rank_method": "budget", "param_budget": 6000},
    ],
)
def test_extract_is_applied_right_by_every_client(
    llama_fp32: TinyBase, noisy: Path, tmp_path: Path, options: dict
) -> None:
    common = {"svd": "exact", "dtype": "float32", "device": "cpu", **options}
    plain_dir, uniform_dir = outputs(tmp_path)
    plain = lorasurgeon.extract(llama_fp32.path, noisy, plain_dir, **common)
    uniform = lorasurgeon.extract(llama_fp32.path, noisy, uniform_dir,
                                  uniform_rank=True, **common)  # fmt: skip
    intended = peft_rule(llama_fp32, plain_dir)
    deltas = {}
    from tests.conftest import load_checkpoint

    b, t = load_checkpoint(llama_fp32.path), load_checkpoint(noisy)
    for m in plain.modules:  # the intended update is the reported approximation of tuned - base
        delta = t[m.module + ".weight"].double() - b[m.module + ".weight"].double()
        deltas[m.module] = delta
        assert rel(intended[m.module], delta) == pytest.approx(m.rel_error, rel=1e-3, abs=1e-6)
    check_outputs(llama_fp32, plain_dir, uniform_dir, intended)
    config = json.loads((plain_dir / "adapter_config.json").read_text())
    assert config["lora_alpha"] == options.get("alpha", config["r"])
    ranks = {m.rank for m in plain.modules}
    mixed, _ = notes_of(plain)
    assert len(mixed) == (1 if len(ranks) > 1 else 0)
    assert [m.rank for m in uniform.modules] == [m.rank for m in plain.modules]
    _, cost = notes_of(uniform)
    assert len(cost) == 1 and uniform.total_params >= plain.total_params


def test_extract_energy_ranks_differ(llama_fp32: TinyBase, noisy: Path, tmp_path: Path) -> None:
    """The energy case above is a real mixed-rank case (else its vLLM check is vacuous)."""
    report = lorasurgeon.extract(llama_fp32.path, noisy, tmp_path / "a", rank_method="energy",
                                 energy=0.5, svd="exact", device="cpu")  # fmt: skip
    assert len({m.rank for m in report.modules}) > 1


# ---------------------------------------------------------------------------------------------
# combine


@pytest.fixture(scope="module")
def mixed(llama_fp32: TinyBase, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("serving-mixed")
    return [
        make_adapter(llama_fp32, FIRST, root / "a0", seed=1),
        make_adapter(llama_fp32, lora("q_proj", "k_proj", r=8, lora_alpha=8, use_rslora=True),
                     root / "a1", seed=2),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def same_rank(llama_fp32: TinyBase, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("serving-same")
    return [
        make_adapter(llama_fp32, FIRST, root / "a0", seed=3),
        make_adapter(llama_fp32, lora("q_proj", "k_proj", "v_proj", lora_alpha=16,
                                      alpha_pattern={"v_proj": 2}), root / "a1", seed=4),
    ]  # fmt: skip


# (method, options, inputs, PEFT's combination type or None: the exact weighted sum)
COMBINATIONS = [
    ("cat", {}, "mixed", None),
    ("linear", {"svd": True}, "mixed", "svd"),
    ("linear", {"svd": True, "rank": 3}, "mixed", "svd"),
    ("ties", {"svd": True, "density": 0.5}, "mixed", "ties_svd"),
    ("magnitude_prune", {"svd": True, "density": 0.7}, "mixed", "magnitude_prune_svd"),
    ("linear", {}, "same_rank", "linear"),
    ("ties", {"density": 0.5}, "same_rank", "ties"),
    ("magnitude_prune", {"density": 0.5}, "same_rank", "magnitude_prune"),
    ("dare_linear", {"density": 0.5, "seed": 1}, "same_rank", "dare"),
    ("dare_ties", {"density": 0.5, "seed": 1}, "same_rank", "dare"),
]


@pytest.mark.parametrize(("method", "options", "inputs", "peft_type"), COMBINATIONS)
def test_combine_is_applied_right_by_every_client(
    llama_fp32: TinyBase, request: pytest.FixtureRequest, tmp_path: Path, method: str,
    options: dict, inputs: str, peft_type: str | None,
) -> None:  # fmt: skip
    adapters = request.getfixturevalue(inputs)
    plain_dir, uniform_dir = outputs(tmp_path)
    common = {"weights": WEIGHTS, "method": method, "device": "cpu", **options}
    plain = lorasurgeon.combine(adapters, plain_dir, **common)
    lorasurgeon.combine(adapters, uniform_dir, uniform_rank=True, **common)
    ours = peft_rule(llama_fp32, plain_dir)
    if peft_type is None:
        intended = exact_sum(llama_fp32, adapters, WEIGHTS)
    elif peft_type == "dare":  # random masks: the same seed gives the same masks both times
        intended = ours
    else:
        kw = {k: v for k, v in options.items() if k in ("density",)}
        if "rank" in options:
            kw["svd_rank"] = options["rank"]
        svd = options.get("svd", False)
        dtype = torch.float64 if svd else None
        peft = peft_combine(llama_fp32, adapters, WEIGHTS, peft_type, dtype, **kw)
        intended = {m: effective(f) for m, f in peft.items()}
    assert mismatched(ours, intended, 1e-4 if options.get("svd") else FP32_REL_TOL) == set()
    check_outputs(llama_fp32, plain_dir, uniform_dir, ours)
    mixed_note, _ = notes_of(plain)
    assert len(mixed_note) == (1 if len({m.rank for m in plain.modules}) > 1 else 0)


def test_cat_of_mixed_ranks_is_mixed(
    llama_fp32: TinyBase, mixed: list[Path], tmp_path: Path
) -> None:
    """cat over ``mixed`` writes ranks 12, 8 and 4 (the vLLM check above is not vacuous), and
    the CLI prints the note once."""
    report = lorasurgeon.combine(mixed, tmp_path / "a", method="cat", device="cpu")
    assert {m.rank for m in report.modules} == {4, 8, 12}
    assert len(notes_of(report)[0]) == 1


# ---------------------------------------------------------------------------------------------
# resize: normalize anyone's adapter


@pytest.fixture(scope="module")
def patterned(llama_fp32: TinyBase, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PEFT adapter that llama.cpp and vLLM both get wrong: alpha_pattern and rank_pattern."""
    config = lora(*ALL, r=8, lora_alpha=16, rank_pattern={"q_proj": 4, "down_proj": 2},
                  alpha_pattern={"v_proj": 64, "q_proj": 4})  # fmt: skip
    return make_adapter(llama_fp32, config, tmp_path_factory.mktemp("patterned") / "a", seed=7)


@pytest.fixture(scope="module")
def rslora(llama_fp32: TinyBase, tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = lora(*ALL, r=8, lora_alpha=16, use_rslora=True, rank_pattern={"o_proj": 2})
    return make_adapter(llama_fp32, config, tmp_path_factory.mktemp("rslora") / "a", seed=8)


@pytest.mark.parametrize("source", ["patterned", "rslora"])
@pytest.mark.parametrize("options", [{}, {"rank": 3}, {"rank_method": "energy", "energy": 0.8}])
def test_resize_is_applied_right_by_every_client(
    llama_fp32: TinyBase, request: pytest.FixtureRequest, tmp_path: Path, source: str,
    options: dict,
) -> None:  # fmt: skip
    adapter = request.getfixturevalue(source)
    plain_dir, uniform_dir = outputs(tmp_path)
    plain = lorasurgeon.resize(adapter, plain_dir, device="cpu", **options)
    lorasurgeon.resize(adapter, uniform_dir, uniform_rank=True, device="cpu",
                       **options)  # fmt: skip
    ours, theirs = peft_rule(llama_fp32, plain_dir), peft_rule(llama_fp32, adapter)
    for m in plain.modules:
        assert rel(ours[m.module], theirs[m.module]) == pytest.approx(m.rel_error, abs=1e-5)
    if not options:  # keep: lossless, every rank kept
        assert plain.rank_method == "keep"
        assert mismatched(ours, theirs) == set()
        kept = {m: a.shape[0] for m, (a, _) in _factors(adapter).items()}
        assert {m.module: m.rank for m in plain.modules} == kept
    check_outputs(llama_fp32, plain_dir, uniform_dir, ours)


# ---------------------------------------------------------------------------------------------
# inspect: the verdicts agree with the rules


def _verdicts(adapter: Path) -> dict[str, str]:
    return {c.client: c.verdict for c in lorasurgeon.summarize(adapter).clients}


def _rule_verdict(got: Updates, want: Updates) -> str:
    return "wrong" if mismatched(got, want) else "right"


def test_inspect_verdicts_match_the_rules(
    llama_fp32: TinyBase, patterned: Path, rslora: Path, tmp_path: Path
) -> None:
    plain = make_adapter(llama_fp32, lora(*ALL, r=8, lora_alpha=16), tmp_path / "plain", seed=9)
    ranks = make_adapter(llama_fp32, lora(*ALL, r=8, rank_pattern={"k_proj": 2}),
                         tmp_path / "ranks", seed=10)  # fmt: skip
    lorasurgeon.resize(patterned, tmp_path / "fixed", device="cpu")
    lorasurgeon.resize(patterned, tmp_path / "uniform", uniform_rank=True, device="cpu")
    expected = {
        plain: ("right", "right"), ranks: ("right", "wrong"), patterned: ("wrong", "wrong"),
        rslora: ("wrong", "wrong"), tmp_path / "fixed": ("right", "wrong"),
        tmp_path / "uniform": ("right", "right"),
    }  # fmt: skip
    for adapter, (llama_cpp, vllm) in expected.items():
        peft = peft_rule(llama_fp32, adapter)
        rules = (
            _rule_verdict(llama_cpp_rule(adapter), peft),
            _rule_verdict(vllm_rule(adapter), peft),
        )
        assert rules == (llama_cpp, vllm), adapter
        verdicts = _verdicts(adapter)
        assert verdicts == {"PEFT, transformers": "right", "llama.cpp": llama_cpp, "vLLM": vllm}


def test_inspect_names_what_clients_refuse(llama_fp32: TinyBase, tmp_path: Path) -> None:
    dora = make_adapter(llama_fp32, lora("q_proj", use_dora=True), tmp_path / "d", seed=11)
    saved = make_adapter(llama_fp32, lora("q_proj", modules_to_save=["lm_head"]),
                         tmp_path / "s", seed=12)  # fmt: skip
    for adapter, words in ((dora, "DoRA"), (saved, "modules_to_save")):
        checks = {c.client: c for c in lorasurgeon.summarize(adapter).clients}
        assert checks["llama.cpp"].verdict == checks["vLLM"].verdict == "refused"
        assert any(words in r for r in checks["vLLM"].reasons)


def test_cli_notes_mixed_ranks_once_and_inspect_says_why(
    mixed: list[Path], patterned: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.test_cli import run_cli

    code, _, err = run_cli(capsys, "combine", *mixed, "--method", "cat", "-o", tmp_path / "c")
    assert code == 0 and sum("--uniform-rank" in line for line in err.splitlines()) == 1, err
    code, _, err = run_cli(capsys, "combine", *mixed, "--method", "cat", "--uniform-rank",
                           "-o", tmp_path / "u")  # fmt: skip
    assert code == 0 and "every module at rank 12" in err and "more than at" in err, err
    code, out, _ = run_cli(capsys, "inspect", patterned)
    lines = out.splitlines()
    llama = next(line for line in lines if line.strip().startswith("llama.cpp"))
    vllm = next(line for line in lines if line.strip().startswith("vLLM"))
    assert "NO (alpha_pattern" in llama and "NO (rank_pattern and alpha_pattern" in vllm, out
    assert any(line.strip().startswith("fix: lorasurgeon resize") for line in lines), out
    code, _, err = run_cli(capsys, "resize", patterned, "-o", tmp_path / "n", "--uniform-rank")
    assert code == 0 and "ranks 2-8 (each kept)" in err and "worst 0.0000" in err, err
    code, out, _ = run_cli(capsys, "inspect", tmp_path / "n")
    assert "NO" not in out and "fix:" not in out, out


def test_rank_layout_has_one_alpha_and_patterns_only_where_ranks_differ() -> None:
    from lorasurgeon.adapters import RankLayout

    layout = RankLayout.of({"a": 4, "b": 8, "c.d": 8})
    assert (layout.r, layout.lora_alpha, layout.scaling("a"), layout.scaling("b")) == (8, 8, 2, 1)
    assert layout.config() == {"r": 8, "lora_alpha": 8.0, "rank_pattern": {"a": 4},
                               "alpha_pattern": {}, "use_rslora": False}  # fmt: skip
    assert RankLayout.of({"a": 4, "b": 8}).r == 8  # a tie: the larger rank
    uniform = RankLayout.of({"a": 4, "b": 8, "c.d": 8}, alpha=2.0, uniform=True)
    assert uniform.stored_rank("a") == 8 and uniform.config()["rank_pattern"] == {}
    assert uniform.scaling("a") == 0.25 and not uniform.mixed
    assert RankLayout.of({"a": 4, "c.d": 8}).config()["rank_pattern"] == {"a": 4}
    assert RankLayout.of({"a": 4, "b": 4}).notes({"a": 10, "b": 10}) == []
    (note,) = RankLayout.of({"a": 4, "b": 8, "c": 8}).notes({"a": 10, "b": 10, "c": 10})
    assert "1 of 3 modules" in note and "40 more parameters" in note
    (cost,) = uniform.notes({"a": 10, "b": 10, "c.d": 10})
    assert "rank 8, 240 LoRA parameters, 40 more" in cost

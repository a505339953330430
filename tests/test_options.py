"""Options: every usage error exits 2 before anything is written, options that cannot apply are
refused (never a no-op), non-finite values are refused, and the choices come from one enum."""

from __future__ import annotations

import math
import re
from pathlib import Path

import click
import pytest

import lorasurgeon
from lorasurgeon import CombineOptions, OptionError, RankPolicy
from lorasurgeon.cli import cli, main
from lorasurgeon.options import CombineMethod, MajoritySign, RankMethod, SvdMethod

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "fixtures"
BASE, TUNED, ADAPTER = FIXTURES / "base", FIXTURES / "tuned", FIXTURES / "adapter"


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    code = exited.value.code
    return (code if isinstance(code, int) else 1), out, err


EXTRACT = ["extract", BASE, TUNED]
COMBINE = ["combine", ADAPTER, ADAPTER]
USAGE_ERRORS = [
    # (command line, words of the one error line)
    (EXTRACT + ["--energy", "0.9"], "--energy applies to --rank-method energy"),
    (EXTRACT + ["--param-budget", "1000"], "--param-budget applies to --rank-method budget"),
    (EXTRACT + ["--rank-method", "energy", "--energy", "0.9", "--rank", "8"], "--rank is"),
    (EXTRACT + ["--rank-method", "budget", "--param-budget", "900", "--rank", "4"], "--rank is"),
    (EXTRACT + ["--max-rank", "4"], "--max-rank bound"),
    (EXTRACT + ["--min-rank", "2"], "--min-rank"),
    (EXTRACT + ["--rank-method", "energy"], "needs --energy"),
    (
        EXTRACT
        + ["--rank-method", "energy", "--energy", "0.5", "--min-rank", "5", "--max-rank", "4"],
        "--min-rank <= --max-rank",
    ),  # fmt: skip
    (EXTRACT + ["--alpha", "nan"], "--alpha must be a finite number"),
    (EXTRACT + ["--alpha", "inf"], "--alpha must be a finite number"),
    (EXTRACT + ["--alpha", "0"], "--alpha must be positive"),
    (EXTRACT + ["--layers-pattern", "layers"], "give --layers-to-transform too"),
    (EXTRACT + ["--save-modules", "lm_haed"], "--save-modules lm_haed matches no module"),
    (EXTRACT + ["--exclude-modules", "q_prj"], "--exclude-modules q_prj matches no module"),
    (EXTRACT + ["--target-modules", "nothing_here"], "no weight matches"),
    (COMBINE + ["--seed", "3"], "--seed seeds the DARE masks"),
    (COMBINE + ["--method", "ties", "--density", "0.5", "--seed", "3"], "--seed"),
    (COMBINE + ["--majority-sign", "frequency"], "--majority-sign applies to ties"),
    (
        COMBINE + ["--method", "dare_linear", "--density", "0.5", "--majority-sign", "total"],
        "--majority-sign",
    ),  # fmt: skip
    (COMBINE + ["--method", "ties"], "needs --density"),
    (COMBINE + ["--clamp", "0.9"], "--clamp Q needs --svd"),
    (COMBINE + ["--weight", "nan", "--weight", "1"], "finite --weight"),
    (COMBINE + ["--weight", "1", "--weight", "inf"], "finite --weight"),
    (COMBINE + ["--method", "ties", "--density", "nan"], "--density"),
    (COMBINE + ["--svd", "--clamp", "nan"], "--clamp"),
    (["combine", ADAPTER, "--method", "ties", "--density", "0.5"], "one adapter"),
    (["merge", BASE, ADAPTER, "--weight", "nan"], "--weight must be a finite number"),
    (["merge", BASE, ADAPTER, "--weight", "-inf"], "--weight must be a finite number"),
    (["resize", ADAPTER, "--rank", "2", "--rank-method", "energy", "--energy", "0.5"], "--rank"),
    (["resize", ADAPTER, "--rank", "2", "--energy", "0.5"], "--energy applies"),
    (["resize", ADAPTER, "--rank", "2", "--max-rank", "4"], "--max-rank"),
    (["resize", ADAPTER, "--rank-method", "budget"], "needs --param-budget"),
]


@pytest.mark.parametrize(("args", "words"), USAGE_ERRORS, ids=[c[1] for c in USAGE_ERRORS])
def test_usage_errors_exit_2_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[object], words: str
) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *args, "-o", out, "--quiet", "--device", "cpu")
    assert code == 2, err
    assert "Traceback" not in err
    assert words in err, err
    assert not out.exists()


def test_extract_layers_to_transform_applies_to_all_linear(tmp_path: Path) -> None:
    report = lorasurgeon.extract(BASE, TUNED, tmp_path / "lora", rank=2, layers_to_transform=[1],
                                 device="cpu")  # fmt: skip
    modules = [m.module for m in report.modules]
    assert modules and all(".layers.1." in m for m in modules), modules
    everything = lorasurgeon.extract(BASE, TUNED, tmp_path / "all", rank=2, device="cpu")
    expected = [m.module for m in everything.modules if ".layers.1." in m.module]
    assert sorted(modules) == sorted(expected)


def test_extract_layers_to_transform_refused_with_a_regex_target() -> None:
    with pytest.raises(OptionError, match="regex"):
        lorasurgeon.plan_extraction(BASE, TUNED, target_modules=r".*q_proj",
                                    layers_to_transform=[0])  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"method": "energy"}, "needs --energy"),
        ({"method": "energy", "energy": math.nan}, "finite"),
        ({"method": "energy", "energy": 1.5}, r"\(0, 1\]"),
        ({"method": "budget", "param_budget": 0}, ">= 1"),
        ({"method": "fixed", "energy": 0.5}, "--energy applies"),
        ({"method": "fixed", "max_rank": 3}, "--max-rank"),
        ({"method": "energy", "energy": 0.5, "rank": 3}, "--rank is"),
        ({"method": "middle"}, "one of fixed, energy, budget, sv_ratio, sv_cumulative"),
        ({"method": "sv_ratio"}, "needs --sv-ratio"),
        ({"method": "sv_ratio", "sv_ratio": 0.5}, ">= 1"),
        ({"method": "sv_ratio", "sv_ratio": math.inf}, "finite"),
        ({"method": "sv_cumulative"}, "needs --sv-cumulative"),
        ({"method": "sv_cumulative", "sv_cumulative": 0.0}, r"\(0, 1\]"),
        ({"method": "energy", "energy": 0.5, "sv_ratio": 2.0}, "--sv-ratio applies"),
        ({"method": "sv_ratio", "sv_ratio": 2.0, "sv_cumulative": 0.5}, "--sv-cumulative app"),
        ({"method": "sv_ratio", "sv_ratio": 2.0, "rank": 3}, "--rank is"),
    ],
)
def test_rank_policy_refuses_what_cannot_apply(kwargs: dict[str, object], words: str) -> None:
    with pytest.raises(OptionError, match=words):
        RankPolicy(**kwargs)  # type: ignore[arg-type]


def test_rank_policy_keeps_what_applies() -> None:
    policy = RankPolicy(RankMethod.BUDGET, param_budget=100, min_rank=2, max_rank=8)
    assert (policy.method, policy.min_rank, policy.max_rank) == (RankMethod.BUDGET, 2, 8)
    assert RankPolicy("energy", energy=0.5).method is RankMethod.ENERGY  # type: ignore[arg-type]


def test_combine_options_default_sign_is_total() -> None:
    options = CombineOptions(CombineMethod.TIES, density=0.5)
    assert options.sign is MajoritySign.TOTAL
    with pytest.raises(OptionError, match="--majority-sign"):
        CombineOptions(CombineMethod.MAGNITUDE_PRUNE, density=0.5,
                       majority_sign=MajoritySign.FREQUENCY)  # fmt: skip


def _choices(command: str, option: str) -> list[str]:
    param = next(p for p in cli.commands[command].params if p.name == option)
    assert isinstance(param.type, click.Choice)
    return list(param.type.choices)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("command", "option", "enum"),
    [
        ("combine", "method", CombineMethod),
        ("combine", "majority_sign", MajoritySign),
        ("extract", "rank_method", RankMethod),
        ("resize", "rank_method", RankMethod),
        ("extract", "svd", SvdMethod),
        ("merge", "dtype", lorasurgeon.DType),
    ],
)
def test_cli_choices_are_the_enums(command: str, option: str, enum: type) -> None:
    assert _choices(command, option) == [m.value for m in enum]


def test_device_accepts_any_case_and_shows_lower_case(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(capsys, "resize", "--help")
    assert code == 0 and "auto|cpu|cuda|cuda:N" in out and "AUTO" not in out
    code, _, err = run_cli(capsys, "resize", ADAPTER, "--rank", "2", "-o", tmp_path / "o",
                           "--device", "CPU", "--quiet")  # fmt: skip
    assert code == 0, err


def test_debug_works_before_the_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "--debug", "inspect", ADAPTER, "--json")
    assert code == 0 and '"modules"' in out, err


@pytest.mark.parametrize(
    ("location", "words"),
    [
        ("fixtures/adaptr", "fixtures/adaptr: no such file or directory"),
        ("./nothing/here", "no such file or directory"),
        ("tests/nothing", "no such file or directory"),
    ],
)
def test_mistyped_local_path_is_not_a_hub_miss(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], location: str,
    words: str,
) -> None:  # fmt: skip
    monkeypatch.chdir(REPO)
    code, _, err = run_cli(capsys, "inspect", location)
    assert code == 1 and words in err and "Hub" not in err, err


def test_adapter_given_as_base_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "merge", ADAPTER, ADAPTER, "-o", tmp_path / "o", "--quiet")
    assert code == 1 and "is a PEFT adapter directory, not a model checkpoint" in err, err
    code, _, err = run_cli(capsys, "extract", BASE, ADAPTER, "-o", tmp_path / "o", "--quiet")
    assert code == 1 and "is a PEFT adapter directory, not a model checkpoint" in err, err


def test_checkpoint_given_as_adapter_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(capsys, "resize", BASE, "--rank", "2", "-o", tmp_path / "o")
    assert code == 1 and "is a model checkpoint, not a PEFT adapter" in err, err


def test_config_file_given_to_inspect_says_it_is_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "inspect", BASE / "config.json")
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert re.search(r"config\.json: is a JSON file, not a safetensors file", lines[0]), err


def test_equal_checkpoints_are_bad_input_not_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(capsys, "extract", BASE, BASE, "-o", tmp_path / "o", "--quiet")
    assert code == 1 and "equal in both checkpoints" in err, err


def test_all_linear_layers_selection_matches_peft_with_the_linear_names(tmp_path: Path) -> None:
    # PEFT refuses layers_to_transform with target_modules="all-linear" (a string); with the
    # same linear module names as a list it selects what extract selects
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    plan = lorasurgeon.plan_extraction(BASE, TUNED, layers_to_transform=[1])
    ours = sorted(m.module for m in plan.modules)
    names = sorted({m.rsplit(".", 1)[-1] for m in ours})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = LoraConfig(r=2, target_modules=names, layers_to_transform=[1])
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(BASE), config)
    peft = sorted(n.removeprefix("base_model.model.").removesuffix(".lora_A.default.weight")
                  for n, _ in model.named_parameters() if "lora_A" in n)  # fmt: skip
    assert ours == peft and ours

"""Non-finite values: a NaN or inf in a tensor that is computed on is an error naming its file
and tensor (exit 1); one in a tensor that is only copied is copied."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorasurgeon
from lorasurgeon import CheckpointError
from lorasurgeon.cli import main

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "fixtures"
SHARD1 = "model-00001-of-00002.safetensors"
PREFIX = "base_model.model."
Q0 = "model.layers.0.self_attn.q_proj"


def poison(path: Path, name: str, value: float) -> None:
    """Set element [0, 0] (or [0]) of one tensor of a safetensors file to ``value``."""
    tensors = load_file(path)
    t = tensors[name].clone()
    t.view(-1)[0] = value
    tensors[name] = t
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture
def work(tmp_path: Path) -> Path:
    for name in ("base", "tuned", "adapter"):
        shutil.copytree(FIXTURES / name, tmp_path / name)
    return tmp_path


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exited:
        main([str(a) for a in args] + ["--quiet", "--device", "cpu"])
    code = exited.value.code
    return (code if isinstance(code, int) else 1), capsys.readouterr().err


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_merge_refuses_a_non_finite_adapter_factor(
    work: Path, capsys: pytest.CaptureFixture[str], value: float
) -> None:
    key = f"{PREFIX}{Q0}.lora_B.weight"
    poison(work / "adapter" / "adapter_model.safetensors", key, value)
    code, err = run_cli(capsys, "merge", work / "base", work / "adapter", "-o", work / "out")
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert f"adapter_model.safetensors: {key}: holds NaN or infinite values" in lines[0]
    assert f"{Q0}.weight" in lines[0]  # the output tensor it would spoil
    assert not (work / "out").exists()


def test_merge_refuses_a_non_finite_base_tensor_it_computes_on(work: Path) -> None:
    poison(work / "base" / SHARD1, f"{Q0}.weight", math.inf)
    with pytest.raises(CheckpointError) as e:
        lorasurgeon.merge(work / "base", [work / "adapter"], work / "out", device="cpu")
    assert (e.value.tensor, Path(e.value.path or "").name) == (f"{Q0}.weight", SHARD1)
    assert not (work / "out").exists()


def test_merge_copies_a_non_finite_tensor_it_does_not_touch(work: Path) -> None:
    name = "model.layers.0.input_layernorm.weight"
    poison(work / "base" / SHARD1, name, math.nan)
    lorasurgeon.merge(work / "base", [work / "adapter"], work / "out", device="cpu")
    assert math.isnan(float(load_file(work / "out" / SHARD1)[name][0]))


def test_merge_reports_an_overflowing_result(work: Path) -> None:
    with pytest.raises(lorasurgeon.IncompatibleError, match="overflows"):
        lorasurgeon.merge(work / "base", [work / "adapter"], work / "out", weights=[1e300],
                          device="cpu")  # fmt: skip
    assert not (work / "out").exists()


@pytest.mark.parametrize("side", ["base", "tuned"])
def test_extract_names_the_non_finite_tensor(
    work: Path, capsys: pytest.CaptureFixture[str], side: str
) -> None:
    poison(work / side / SHARD1, f"{Q0}.weight", math.nan)
    code, err = run_cli(capsys, "extract", work / "base", work / "tuned", "-o", work / "out")
    assert code == 1, err  # bad input, not a usage error
    assert f"{side}/{SHARD1}: {Q0}.weight: holds NaN or infinite values" in err, err
    assert not (work / "out").exists()


def test_combine_and_resize_name_the_non_finite_factor(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = f"{PREFIX}{Q0}.lora_A.weight"
    poison(work / "adapter" / "adapter_model.safetensors", key, -math.inf)
    other = work / "other"
    shutil.copytree(FIXTURES / "adapter", other)
    code, err = run_cli(capsys, "combine", other, work / "adapter", "-o", work / "c")
    assert code == 1 and f"{key}: holds NaN or infinite values" in err, err
    code, err = run_cli(capsys, "resize", work / "adapter", "--rank", "2", "-o", work / "r")
    assert code == 1 and f"{key}: holds NaN or infinite values" in err, err
    assert not (work / "c").exists() and not (work / "r").exists()


def test_finite_inputs_pass(work: Path) -> None:
    assert torch.isfinite(load_file(work / "adapter" / "adapter_model.safetensors")[
        f"{PREFIX}{Q0}.lora_A.weight"]).all()  # fmt: skip
    lorasurgeon.resize(work / "adapter", work / "r", rank=2, device="cpu")


def test_merge_refuses_a_dtype_conversion_that_overflows(work: Path) -> None:
    name = "model.layers.0.input_layernorm.weight"
    tensors = load_file(work / "base" / SHARD1)
    tensors[name] = tensors[name].to(torch.float32) * 1e30  # finite in float32, not in float16
    save_file(tensors, work / "base" / SHARD1, metadata={"format": "pt"})
    with pytest.raises(lorasurgeon.IncompatibleError, match="its values overflow F16") as e:
        lorasurgeon.merge(work / "base", [work / "adapter"], work / "out", dtype="float16",
                          device="cpu")  # fmt: skip
    assert e.value.tensor == name
    assert not (work / "out").exists()

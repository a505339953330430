"""The device option: the GPU path gives the CPU's result; the CPU fallback is always tested."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorasurgeon

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _merged(tmp_path: Path, device: str) -> dict[str, torch.Tensor]:
    out = tmp_path / device.replace(":", "-")
    lorasurgeon.merge(FIXTURES / "base", [FIXTURES / "adapter"], out, device=device)
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_auto_device_on_a_cpu_machine_equals_cpu(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("auto picks the GPU here; see test_gpu_merge_matches_cpu")
    cpu, auto = _merged(tmp_path, "cpu"), _merged(tmp_path, "auto")
    assert cpu.keys() == auto.keys() and all(torch.equal(cpu[k], auto[k]) for k in cpu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_merge_matches_cpu(tmp_path: Path) -> None:
    cpu, gpu = _merged(tmp_path, "cpu"), _merged(tmp_path, "cuda")
    assert cpu.keys() == gpu.keys()
    for name in cpu:
        ulps = (cpu[name].view(torch.int16).int() - gpu[name].view(torch.int16).int()).abs()
        assert ulps.max() <= 1, name  # bf16 fixtures: one rounding each, GEMMs may differ


def test_unknown_cuda_device_is_an_error_not_a_crash(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device exists")
    with pytest.raises(lorasurgeon.OptionError, match="cuda"):
        lorasurgeon.merge(FIXTURES / "base", [FIXTURES / "adapter"], tmp_path / "o", device="cuda")
    assert not (tmp_path / "o").exists()

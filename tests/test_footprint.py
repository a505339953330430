"""Peak memory estimates of batch jobs (footprint.py) against peaks measured in child processes,
and the --memory budget's parsing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

import lorasurgeon
from lorasurgeon import footprint

from .conftest import _save_hf, _tiny_llama, make_adapter
from .test_batch import BASE, JOBS, write_manifest
from .test_cli import REPO

# An estimate may exceed the measured peak by at most this factor. Measured with
# /usr/bin/time -v: 1.2x-1.3x on the fixtures (the bare process dominates), 1.1x-1.5x on the
# 1.1B bench inputs (footprint.py, README).
SLACK = 2.0

# The child reports its own high-water mark. Not getrusage's ru_maxrss: Linux carries it across
# execve, and a child spawned (vfork) from this pytest process starts at pytest's peak.
_MEASURE = """
import sys
from lorasurgeon import read_manifest
from lorasurgeon.batch import run_job
job = read_manifest(sys.argv[1]).jobs[int(sys.argv[2])]
result = run_job(job)
assert result.status.value == "done", result.error
with open("/proc/self/status") as f:
    print(next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")))
"""


def measured_peak(manifest: Path, index: int) -> int:
    """The peak RSS (bytes, VmHWM) of a fresh process that runs job ``index`` of ``manifest``."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(manifest), str(index)],
                         env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A one-layer Llama wide enough (MLP 2048x768 float32, 6.3 MB) that the jobs' own work
    outweighs the interpreter's noise: base, tuned (base plus a rank-8 change) and an adapter
    on the MLP's up and down projections."""
    root = tmp_path_factory.mktemp("wide")
    model = _tiny_llama(seed=5, hidden_size=768, intermediate_size=2048, num_hidden_layers=1,
                        num_attention_heads=8, num_key_value_heads=8)  # fmt: skip
    base = _save_hf(model, root / "base")
    tuned = _save_hf(model, root / "tuned")
    weights = load_file(tuned / "model.safetensors")
    generator = torch.Generator().manual_seed(6)
    for name, w in weights.items():
        if w.dim() == 2 and "proj" in name:
            b, a = (torch.randn(w.shape[0], 8, generator=generator),
                    torch.randn(8, w.shape[1], generator=generator))  # fmt: skip
            weights[name] = w + 1e-3 * b @ a
    save_file(weights, tuned / "model.safetensors", metadata={"format": "pt"})
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["up_proj", "down_proj"])
    adapter = make_adapter(model, config, root / "adapter", seed=7)
    return {"base": str(base), "tuned": str(tuned), "adapter": str(adapter)}


def _wide_jobs(paths: dict[str, str]) -> list[dict[str, Any]]:
    base, tuned, adapter = paths["base"], paths["tuned"], paths["adapter"]
    return [
        {"name": "wm", "command": "merge", "inputs": [base, adapter], "output": "wm",
         "device": "cpu"},
        {"name": "wd", "command": "merge", "inputs": [base, adapter], "output": "wd",
         "device": "cpu", "dtype": "bfloat16"},
        {"name": "wx", "command": "extract", "inputs": [base, tuned], "output": "wx",
         "device": "cpu", "rank": 8, "svd": "exact", "target_modules": "up_proj,down_proj"},
        {"name": "wr", "command": "extract", "inputs": [base, tuned], "output": "wr",
         "device": "cpu", "rank": 8, "target_modules": "up_proj,down_proj"},
        {"name": "wc", "command": "combine", "inputs": [adapter, adapter], "output": "wc",
         "svd": True, "method": "ties", "density": 0.5, "rank": 8},
        {"name": "ws", "command": "resize", "inputs": [adapter], "output": "ws", "rank": 4},
    ]  # fmt: skip


def _check(manifest: Path, index: int) -> tuple[int, int]:
    job = lorasurgeon.read_manifest(manifest).jobs[index]
    estimate = lorasurgeon.estimate_memory(job)
    peak = measured_peak(manifest, index)
    assert peak <= estimate <= SLACK * peak, (job.name, peak, estimate)
    return peak, estimate


@pytest.mark.parametrize("index", range(len(JOBS)), ids=[j["name"] for j in JOBS])
def test_estimates_bound_the_measured_peaks_of_the_fixture_jobs(tmp_path: Path, index: int) -> None:
    _check(write_manifest(tmp_path, JOBS), index)


WIDE_IDS = ["merge", "merge-bf16", "extract-exact", "extract", "combine-ties-svd", "resize"]


@pytest.mark.parametrize("index", range(len(WIDE_IDS)), ids=WIDE_IDS)
def test_estimates_bound_the_measured_peaks_of_wide_jobs(
    tmp_path: Path, wide: dict[str, str], index: int
) -> None:
    peak, estimate = _check(write_manifest(tmp_path, _wide_jobs(wide)), index)
    # the job's own work is counted, not only the bare process
    assert estimate > footprint.PROCESS_BYTES or peak < footprint.PROCESS_BYTES


def test_a_job_whose_inputs_cannot_be_planned_is_estimated_as_the_bare_process(
    tmp_path: Path,
) -> None:
    bad = {"name": "bad", "command": "merge", "inputs": [BASE, BASE], "output": "o"}
    [job] = lorasurgeon.read_manifest(write_manifest(tmp_path, [bad])).jobs
    assert lorasurgeon.estimate_memory(job) == footprint.PROCESS_BYTES


@pytest.mark.parametrize(("text", "expected"), [
    ("16G", 16 * 10**9), ("16GB", 16 * 10**9), ("2GiB", 2 * 2**30), ("500M", 500 * 10**6),
    ("1234", 1234), (" auto ", 9 * 10**9), ("AUTO", 9 * 10**9),
])  # fmt: skip
def test_memory_budgets_parse(text: str, expected: int) -> None:
    assert lorasurgeon.parse_memory(text, available=lambda: 10 * 10**9) == expected


def test_auto_keeps_at_least_half_a_gibibyte_back() -> None:
    assert lorasurgeon.parse_memory("auto", available=lambda: 2**30) == 2**30 - 2**29


@pytest.mark.parametrize("text", ["", "lots", "12X", "-1G", "0", "G"])
def test_bad_memory_budgets_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        lorasurgeon.parse_memory(text)


def test_the_available_memory_is_read_here() -> None:
    assert 0 < footprint.available_memory()


@pytest.fixture(scope="module")
def diffusion(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny SD1 LDM file, a tuned copy and a kohya LoRA on its modules."""
    from .sd_models import save_ldm, sd_kohya_modules, tiny_sd, write_kohya
    from .test_extract_diffusion import tuned_model

    root = tmp_path_factory.mktemp("sd")
    model = tiny_sd("sd1")
    return {
        "base": str(save_ldm(model, root / "base.safetensors")),
        "tuned": str(save_ldm(tuned_model(model), root / "tuned.safetensors")),
        "lora": str(write_kohya(root / "lora.safetensors", sd_kohya_modules(model))),
    }


DIFFUSION_IDS = ["merge", "extract", "convert", "resize", "combine"]


@pytest.mark.parametrize("index", range(len(DIFFUSION_IDS)), ids=DIFFUSION_IDS)
def test_estimates_bound_the_measured_peaks_of_diffusion_jobs(
    tmp_path: Path, diffusion: dict[str, str], index: int
) -> None:
    """Diffusion inputs, which the plan-based estimates do not read, and convert jobs, which
    have none, are estimated from the inputs' headers."""
    base, tuned, lora = diffusion["base"], diffusion["tuned"], diffusion["lora"]
    jobs = [
        {"name": "m", "command": "merge", "inputs": [base, lora], "output": "m.safetensors",
         "device": "cpu"},
        {"name": "x", "command": "extract", "inputs": [base, tuned], "output": "x.safetensors",
         "device": "cpu", "rank": 4},
        {"name": "c", "command": "convert", "inputs": [lora], "output": "c.safetensors",
         "to": "diffusers", "base": base},
        {"name": "r", "command": "resize", "inputs": [lora], "output": "r.safetensors",
         "rank": 2},
        {"name": "k", "command": "combine", "inputs": [lora, lora], "output": "k.safetensors",
         "svd": True, "rank": 4},
    ]  # fmt: skip
    _check(write_manifest(tmp_path, jobs), index)

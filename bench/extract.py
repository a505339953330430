"""Benchmark ``lorasurgeon extract`` against ``mergekit-extract-lora``.

Run from the repository root with the project's virtualenv:

    .venv/bin/python bench/extract.py                     # 1b pair, rank 16, everything
    .venv/bin/python bench/extract.py --exact             # also a --svd exact row
    .venv/bin/python bench/extract.py --error-layers 0,21 --json /tmp/extract-bench.json
    .venv/bin/python bench/extract.py --size tiny --repeat 1   # a smoke test, seconds

What it does
------------
1. Generates (once, cached under ``--workdir``, default /tmp/lorasurgeon-bench)
   the Llama-shaped bf16 base of ``bench/merge.py`` (``1b``: TinyLlama-shaped,
   1.1e9 parameters, 2.2 GB in ~1 GB shards; reused when that benchmark made
   it already) and a "tuned" checkpoint beside it with the same files: every
   linear weight (q, k, v, o, gate, up, down of every layer) is base + a
   planted rank-8..32 update with geometrically decaying singular values +
   Gaussian noise holding 10% of the update's energy, stored bf16; one norm
   changes slightly, everything else is equal (see ``_common.TuneSpec``).
2. Installs mergekit into its own virtualenv (``WORKDIR/mergekit-venv``,
   ``pip install torch==2.13.0 mergekit`` so that the CPU torch is used; a
   dry run first refuses to go on when the resolution would pull a CUDA
   torch or nvidia packages), reads ``mergekit-extract-lora --help`` to pick
   its argument style, and records the version. When any of that fails its
   row says "unavailable" with the reason, and the rest still runs.
3. Times, each as its own process under ``/usr/bin/time -v`` (whole-process
   wall time, CPU time and peak RSS), every command ending with ``sync``:

   lorasurgeon  ``python -m lorasurgeon extract BASE TUNED -o OUT --rank 16
                --quiet --report REPORT`` (default randomized SVD), ``--repeat``
                times; with ``--exact`` once more with ``--svd exact``
   mergekit     ``mergekit-extract-lora --model TUNED --base-model BASE
                --out-path OUT --max-rank 16`` on the CPU, ``--mergekit-repeat``
                times (default 1: it takes minutes)

   Before each run the inputs are fsynced and evicted from the page cache
   (``posix_fadvise(DONTNEED)``), the previous output is deleted, and the
   Python libraries of both virtualenvs are read once so that only checkpoint
   I/O starts cold.
4. Error against the optimum, in float64: for every module of
   ``--error-layers`` (default: all), delta = tuned - base, the best rank-16
   relative error ||delta - best_16||_F / ||delta||_F from the singular values
   (``torch.linalg.svdvals``), and each tool's actual error
   ||delta - scaling * B @ A||_F / ||delta||_F from its adapter (scaling from
   its adapter_config: lora_alpha / r, rank_pattern / alpha_pattern, rsLoRA).
   Prints the median and worst ratio tool error / optimum per tool, and how
   far lorasurgeon's ``--report`` rel_error is from the measured one.
5. Flat spectra, the randomized SVD's worst case: on unstructured Gaussian
   matrices (``--flat-shapes``) ``lorasurgeon.lowrank.truncated_svd`` randomized
   against exact at the same rank: error ratio and captured-energy ratio.
6. Prints a table (wall median and min-max, CPU s, peak RSS, speedup against
   mergekit, error / optimum) and the issue's targets: mergekit / lorasurgeon
   >= 20x, lorasurgeon wall < 19 s, error within 1% of the optimum, peak RSS
   < 1 GB. ``--json FILE`` writes every number.

The machine should be otherwise idle: before each run the CPUs' load is
sampled and a note under the table says when something else was running.
Disk: base and tuned take 2.2 GB each, the mergekit virtualenv about 1.6 GB;
the outputs (25 MB ours, 288 MB mergekit's, which saves embeddings, LM head
and norms whole) are deleted at the end unless ``--keep-outputs``. On two
cores: tuned generation about 25 s (once), the mergekit install about two
minutes (once), lorasurgeon about 20 s a run, mergekit about five minutes
(``--exact`` as long again), the float64 optimum about 11 s per layer (four
minutes for all 22), the flat spectra 15 s: about 13 minutes in all with
``--exact``. Nothing asserts on the numbers: it is a benchmark.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    REPO_ROOT,
    SPECS,
    ModelSpec,
    RunResult,
    TuneSpec,
    cpu_busy,
    dir_size,
    ensure_checkpoints,
    ensure_tuned,
    evict,
    linear_modules,
    parameter_count,
    parse_size,
    print_busy_note,
    ratio,
    remove_output,
    stat,
    subprocess_env,
    summarize,
    target_line,
    timed_run,
    warm,
)

# Targets stated with the project's issue. Printed next to the measured
# values; the script never fails on them.
TARGET_SPEEDUP = 20.0  # mergekit wall / lorasurgeon wall: at least
TARGET_WALL_S = 19.0  # lorasurgeon wall: below
TARGET_ERROR = 0.01  # worst (tool error / optimum) - 1: at most
TARGET_RSS_MB = 1000.0  # lorasurgeon peak RSS: below


# A few-second smoke test of the whole script (``--size tiny``).
BENCH_SPECS = {
    **SPECS,
    "tiny": ModelSpec("tiny", hidden=256, intermediate=688, layers=2, heads=8, kv_heads=2),
}

# Packages whose presence means pip would install a CUDA build.
CUDA_PACKAGES = re.compile(r"^(nvidia-.*|triton|pytorch-triton.*)$", re.I)


# --------------------------------------------------------------------------
# mergekit: install and argument style
# --------------------------------------------------------------------------


@dataclass
class Mergekit:
    """What the benchmark knows about its mergekit install."""

    venv: Path
    available: bool = False
    reason: str = ""
    version: str | None = None
    torch_version: str | None = None
    install: dict = field(default_factory=dict)
    style: str | None = None  # "options" (--model/--base-model/...) or "positional"

    @property
    def exe(self) -> Path:
        return self.venv / "bin" / "mergekit-extract-lora"

    def command(self, base: Path, tuned: Path, out: Path, rank: int) -> list[str]:
        if self.style == "options":
            return [
                str(self.exe),
                *("--model", str(tuned), "--base-model", str(base), "--out-path", str(out)),
                *("--max-rank", str(rank)),
            ]
        return [str(self.exe), str(tuned), str(base), str(out), f"--rank={rank}"]


def _pip(venv: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", *args]
    return subprocess.run(cmd, capture_output=True, text=True, errors="replace")


def _tail(text: str, lines: int = 6) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _venv_python_value(venv: Path, code: str) -> str | None:
    proc = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True
    )
    return proc.stdout.strip() if proc.returncode == 0 else None


def install_mergekit(mk: Mergekit, requirements: list[str]) -> bool:
    """Create the virtualenv and pip install; False (with ``mk.reason``) on failure."""
    shutil.rmtree(mk.venv, ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "venv", str(mk.venv)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        mk.reason = f"python -m venv failed: {_tail(proc.stderr, 2)}"
        return False
    # A dry run first: what pip would install, before downloading anything big.
    proc = _pip(mk.venv, "install", "--dry-run", "--quiet", "--report", "-", *requirements)
    if proc.returncode != 0:
        mk.reason = f"pip cannot resolve {' '.join(requirements)}: {_tail(proc.stderr, 3)}"
        return False
    try:
        planned = {
            item["metadata"]["name"]: item["metadata"]["version"]
            for item in json.loads(proc.stdout)["install"]
        }
    except (ValueError, KeyError) as exc:
        mk.reason = f"unreadable pip --dry-run report: {exc}"
        return False
    cuda = sorted(n for n in planned if CUDA_PACKAGES.match(n))
    torch_planned = planned.get("torch", "")
    if cuda or (torch_planned and "+cpu" not in torch_planned):
        mk.reason = (
            f"installing mergekit would pull a CUDA torch (torch {torch_planned or '?'}, "
            f"{', '.join(cuda) or 'no nvidia packages'}); not installed"
        )
        return False
    mk.install["planned"] = {k: planned[k] for k in sorted(planned)}
    proc = _pip(mk.venv, "install", *requirements)
    (mk.venv / "bench-install.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        mk.reason = f"pip install failed: {_tail(proc.stderr, 3)}"
        return False
    mk.install["seconds"] = round(time.perf_counter() - start, 1)
    mk.install["packages"] = len(planned)
    (mk.venv / ".bench-complete").write_text(json.dumps(mk.install, indent=2) + "\n")
    return True


def detect_style(mk: Mergekit) -> None:
    """Read ``mergekit-extract-lora --help`` and pick the argument style."""
    proc = subprocess.run(
        [str(mk.exe), "--help"], capture_output=True, text=True, env=mergekit_env()
    )
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        mk.available, mk.reason = False, f"--help failed: {_tail(text, 3)}"
    elif all(f in text for f in ("--model", "--base-model", "--out-path", "--max-rank")):
        mk.style = "options"
    elif "--rank" in text and re.search(r"FINETUNED_MODEL|BASE_MODEL", text):
        mk.style = "positional"  # older releases: FINETUNED_MODEL BASE_MODEL OUT_PATH --rank
    else:
        mk.available, mk.reason = False, "unrecognised mergekit-extract-lora arguments"


def setup_mergekit(venv: Path, torch_pin: str, reinstall: bool) -> Mergekit:
    """Install mergekit (once; cached by a marker in the venv) and check it runs."""
    mk = Mergekit(venv)
    marker = venv / ".bench-complete"
    requirements = [f"torch=={torch_pin}", "mergekit"]
    if reinstall or not (marker.exists() and mk.exe.exists()):
        print(f"   installing {' '.join(requirements)} into {venv} ...", flush=True)
        if not install_mergekit(mk, requirements):
            return mk
        mk.install["reused"] = False
    else:
        mk.install = json.loads(marker.read_text())
        mk.install["reused"] = True
    mk.version = _venv_python_value(
        venv, "import importlib.metadata as m; print(m.version('mergekit'))"
    )
    mk.torch_version = _venv_python_value(venv, "import torch; print(torch.__version__)")
    if not mk.exe.exists():
        mk.reason = "no mergekit-extract-lora entry point in the installed mergekit"
        return mk
    if mk.torch_version is None or "+cpu" not in mk.torch_version:
        mk.reason = f"mergekit's virtualenv has torch {mk.torch_version}, not the CPU build"
        return mk
    mk.available = True
    detect_style(mk)
    return mk


def mergekit_env() -> dict:
    """Nothing is fetched from the Hub: every path is local."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


# --------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------


@dataclass
class Tool:
    key: str
    label: str
    repeat: int
    argv: list[str]
    out: Path
    env: dict

    def command(self) -> list[str]:
        # "$@" keeps every argument intact; sh waits for the tool, so GNU
        # time's peak RSS still covers it.
        return ["sh", "-c", '"$@" && sync', "sh", *self.argv]


def make_tools(
    args: argparse.Namespace, base: Path, tuned: Path, out_root: Path, mk: Mergekit
) -> list[Tool]:
    def ours(svd: str | None) -> list[str]:
        key = "lorasurgeon" if svd is None else f"lorasurgeon-{svd}"
        argv = [sys.executable, "-m", "lorasurgeon", "extract", str(base), str(tuned)]
        argv += ["-o", str(out_root / key), "--rank", str(args.rank), "--quiet"]
        argv += ["--report", str(out_root / f"{key}-report.json")]
        return argv + (["--svd", svd] if svd else [])

    env = subprocess_env()
    tools = [
        Tool(
            "lorasurgeon",
            "lorasurgeon (randomized)",
            args.repeat,
            ours(None),
            out_root / "lorasurgeon",
            env,
        )
    ]
    if args.exact:
        tools.append(
            Tool(
                "lorasurgeon-exact",
                "lorasurgeon --svd exact",
                1,
                ours("exact"),
                out_root / "lorasurgeon-exact",
                env,
            )
        )
    if mk.available and args.mergekit_repeat > 0:
        out = out_root / "mergekit"
        tools.append(
            Tool(
                "mergekit",
                f"mergekit-extract-lora {mk.version or ''}".strip(),
                args.mergekit_repeat,
                mk.command(base, tuned, out, args.rank),
                out,
                mergekit_env(),
            )
        )
    return tools


def library_dirs(mk: Mergekit) -> list[Path]:
    """Where the interpreters and their packages live (warmed before each run)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    dirs = {Path(sys.prefix) / "lib", Path(sys.base_prefix) / "lib" / version}
    if mk.available:
        dirs.add(mk.venv / "lib")
    return sorted(d for d in dirs if d.is_dir())


def describe(result: RunResult) -> str:
    if not result.ok:
        return f"FAILED (exit {result.returncode}) after {result.wall_s:.1f} s"
    cpu = f"  CPU {result.cpu_s:6.1f} s" if result.cpu_s is not None else ""
    busy = result.extra.get("busy_before")
    others = f"  (CPUs {busy:.0%} busy before)" if busy is not None else ""
    return f"{result.wall_s:7.2f} s  {result.max_rss_mb:8.0f} MB{cpu}{others}"


def run_tools(
    tools: list[Tool], inputs: list[Path], libs: list[Path], args: argparse.Namespace
) -> dict[str, list[RunResult]]:
    """Run every tool cold; repeats are interleaved across tools."""
    results: dict[str, list[RunResult]] = {}
    failed: set[str] = set()
    for rep in range(max(t.repeat for t in tools)):
        for tool in tools:
            if rep >= tool.repeat or tool.key in failed:
                continue
            remove_output(tool.out)
            if not args.no_warm_libs:
                warm(*libs)
            evict(*inputs)
            os.sync()
            busy = cpu_busy()  # we are idle now: this is everyone else
            result = timed_run(tool.command(), env=tool.env, cwd=REPO_ROOT)
            result.extra["busy_before"] = busy
            results.setdefault(tool.key, []).append(result)
            print(f"  {tool.key:18} #{rep + 1}: {describe(result)}", flush=True)
            if not result.ok:
                failed.add(tool.key)
                print(indent(result.stderr_tail or "(no stderr)", "      | "), flush=True)
    return results


def indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def summarize_runs(results: dict[str, list[RunResult]]) -> dict:
    summary = {}
    for key, runs in results.items():
        ok = [r for r in runs if r.ok]
        entry = {"runs": [vars(r) for r in runs], "failed": len(ok) < len(runs)}
        if ok:
            entry["wall_s"] = summarize([r.wall_s for r in ok])
            entry["rss_mb"] = summarize([r.max_rss_mb for r in ok])
            if all(r.cpu_s is not None for r in ok):
                entry["cpu_s"] = summarize([r.cpu_s for r in ok])
        summary[key] = entry
    return summary


# --------------------------------------------------------------------------
# Errors against the float64 optimum
# --------------------------------------------------------------------------


class Checkpoint:
    """Tensors of a safetensors checkpoint directory, by name, opened lazily."""

    def __init__(self, directory: Path):
        index = directory / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: directory / f for name, f in weight_map.items()}
        else:
            from safetensors import safe_open

            self.files = {}
            for path in sorted(directory.glob("*.safetensors")):
                with safe_open(str(path), framework="pt") as f:
                    self.files.update(dict.fromkeys(f.keys(), path))
        self._open: dict[Path, object] = {}

    def get(self, name: str):
        from safetensors import safe_open

        path = self.files[name]
        if path not in self._open:
            self._open[path] = safe_open(str(path), framework="pt")
        return self._open[path].get_tensor(name)


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the name's end."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class Adapter:
    """A PEFT LoRA adapter directory: per-module (A, B, scaling)."""

    def __init__(self, directory: Path):
        self.config = json.loads((directory / "adapter_config.json").read_text())
        self.tensors = Checkpoint(directory)

    def factors(self, module: str):
        key = f"base_model.model.{module}"
        a_key, b_key = f"{key}.lora_A.weight", f"{key}.lora_B.weight"
        if a_key not in self.tensors.files or b_key not in self.tensors.files:
            return None
        cfg = self.config
        r = _pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"])
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        return self.tensors.get(a_key), self.tensors.get(b_key), scaling


def error_modules(spec: ModelSpec, layers: str) -> list[str]:
    chosen = (
        range(spec.layers) if layers == "all" else [int(x) for x in layers.split(",") if x.strip()]
    )
    return [m for layer in chosen for m, _, _ in linear_modules(spec, layer)]


def optimum_error(delta, rank: int) -> float:
    """min over rank-``rank`` X of ||delta - X||_F / ||delta||_F, from float64 singular values."""
    import torch

    # LAPACK's bidiagonalization is ~3x faster on a tall matrix than on its transpose.
    s = torch.linalg.svdvals(delta if delta.shape[0] >= delta.shape[1] else delta.t())
    squares = s.square()
    total = float(squares.sum())
    return math.sqrt(float(squares[rank:].sum()) / total) if total else 0.0


def measure_errors(
    spec: ModelSpec,
    base: Path,
    tuned: Path,
    adapters: dict[str, Path],
    layers: str,
    rank: int,
) -> list[dict]:
    """Per module: the optimum and each tool's actual relative error, all in float64."""
    import torch

    base_ckpt, tuned_ckpt = Checkpoint(base), Checkpoint(tuned)
    opened = {key: Adapter(path) for key, path in adapters.items()}
    rows = []
    for module in error_modules(spec, layers):
        name = f"{module}.weight"
        delta = tuned_ckpt.get(name).double() - base_ckpt.get(name).double()
        norm = float(torch.linalg.vector_norm(delta))
        row = {"module": module, "shape": list(delta.shape), "optimum": optimum_error(delta, rank)}
        for key, adapter in opened.items():
            found = adapter.factors(module)
            if found is None or norm == 0:
                row[key] = None
                continue
            a, b, scaling = found
            approx = (b.double() @ a.double()).mul_(scaling)
            row[key] = float(torch.linalg.vector_norm(delta - approx)) / norm
        rows.append(row)
    return rows


def error_summary(rows: list[dict], key: str) -> dict | None:
    ratios = [r[key] / r["optimum"] for r in rows if r.get(key) is not None and r["optimum"] > 0]
    if not ratios:
        return None
    worst = max(range(len(ratios)), key=lambda i: ratios[i])
    with_key = [r for r in rows if r.get(key) is not None and r["optimum"] > 0]
    return {
        "modules": len(ratios),
        "missing": sum(1 for r in rows if r.get(key) is None),
        "median_ratio": statistics.median(ratios),
        "worst_ratio": ratios[worst],
        "worst_module": with_key[worst]["module"],
        "median_error": statistics.median(r[key] for r in with_key),
    }


def report_agreement(rows: list[dict], key: str, report: Path) -> dict | None:
    """How far lorasurgeon's --report rel_error is from the error measured here."""
    if not report.exists():
        return None
    reported = {m["module"]: m["rel_error"] for m in json.loads(report.read_text())["modules"]}
    diffs = [
        abs(reported[r["module"]] - r[key]) / r[key]
        for r in rows
        if r.get(key) and r["module"] in reported
    ]
    if not diffs:
        return None
    return {
        "modules": len(diffs),
        "max_rel_diff": max(diffs),
        "median_rel_diff": statistics.median(diffs),
    }


# --------------------------------------------------------------------------
# Flat spectra: the randomized SVD's worst case
# --------------------------------------------------------------------------


def flat_spectrum(shapes: list[tuple[int, int]], seeds: int, rank: int) -> list[dict]:
    """Randomized vs exact ``truncated_svd`` on Gaussian matrices (no structure at all)."""
    import torch

    from lorasurgeon import lowrank

    rows = []
    for shape in shapes:
        for seed in range(seeds):
            a = torch.randn(shape, generator=torch.Generator().manual_seed(1000 + seed))
            row = {"shape": list(shape), "seed": seed}
            for method in (lowrank.SvdMethod.EXACT, lowrank.SvdMethod.RANDOMIZED):
                start = time.perf_counter()
                svd = lowrank.truncated_svd(a, rank, method=method)
                row[method.value] = {
                    "rel_error": svd.rel_error(rank),
                    "energy_kept": svd.energy_kept(rank),
                    "seconds": time.perf_counter() - start,
                }
            row["error_ratio"] = row["randomized"]["rel_error"] / row["exact"]["rel_error"]
            row["energy_ratio"] = row["randomized"]["energy_kept"] / row["exact"]["energy_kept"]
            rows.append(row)
            print(
                f"  {shape[0]}x{shape[1]} seed {seed}: error exact {row['exact']['rel_error']:.5f}"
                f", randomized {row['randomized']['rel_error']:.5f} (ratio "
                f"{row['error_ratio']:.5f}); energy kept {row['exact']['energy_kept']:.4f} vs "
                f"{row['randomized']['energy_kept']:.4f} ({row['energy_ratio']:.3f}); "
                f"{row['exact']['seconds']:.1f} s vs {row['randomized']['seconds']:.2f} s",
                flush=True,
            )
    return rows


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def print_table(
    spec: ModelSpec, tools: list[Tool], summary: dict, errors: dict, mk: Mergekit, rank: int
) -> None:
    mk_wall = stat(summary, "mergekit", "wall_s", "median")
    print(
        f"\n{spec.name}: {parameter_count(spec) / 1e9:.2f}B parameters, bf16 pair, rank {rank}, "
        "cold page cache"
    )
    header = (
        f"  {'tool':28} {'runs':>4} {'wall s':>8} {'(min-max)':>17} {'CPU s':>7} "
        f"{'peak RSS MB':>11} {'vs mergekit':>11} {'err/opt median':>14} {'worst':>8}"
    )
    print(header)
    print("  " + "-" * (len(header) - 2))
    for tool in tools:
        entry = summary.get(tool.key, {})
        err = errors.get(tool.key)
        err_text = f"{err['median_ratio']:14.4f} {err['worst_ratio']:8.4f}" if err else ""
        if "wall_s" not in entry:
            print(f"  {tool.label:28} {len(entry.get('runs', [])):>4} {'FAILED':>8}")
            continue
        w, r = entry["wall_s"], entry["rss_mb"]
        rng = f"({w['min']:.1f}-{w['max']:.1f})" if w["n"] > 1 else ""
        cpu = f"{entry['cpu_s']['median']:.1f}" if "cpu_s" in entry else "-"
        speed = ratio(mk_wall, w["median"])
        vs = f"{speed:.1f}x" if speed else "-"
        flag = " (some runs failed)" if entry["failed"] else ""
        print(
            f"  {tool.label:28} {w['n']:>4} {w['median']:8.1f} {rng:>17} {cpu:>7} "
            f"{r['max']:11.0f} {vs:>11} {err_text}{flag}"
        )
    if not mk.available:
        print(f"  {'mergekit-extract-lora':28}    - unavailable: {mk.reason}")
    print_busy_note(summary)


def headline(summary: dict, errors: dict, flat: list[dict]) -> dict:
    ours_wall = stat(summary, "lorasurgeon", "wall_s", "median")
    ours_err = errors.get("lorasurgeon") or {}
    return {
        "speedup": ratio(stat(summary, "mergekit", "wall_s", "median"), ours_wall),
        "ours_wall_s": ours_wall,
        "ours_worst_excess": (ours_err["worst_ratio"] - 1) if ours_err else None,
        "ours_median_excess": (ours_err["median_ratio"] - 1) if ours_err else None,
        "ours_rss_mb": stat(summary, "lorasurgeon", "rss_mb", "max"),
        "flat_worst_excess": max((r["error_ratio"] - 1 for r in flat), default=None),
        "flat_worst_energy_ratio": min((r["energy_ratio"] for r in flat), default=None),
    }


def print_headline(h: dict) -> None:
    v = h["speedup"]
    print(
        target_line(
            "mergekit / lorasurgeon (wall):",
            v,
            f"{v or 0:.1f}x",
            f"target >= {TARGET_SPEEDUP:g}x",
            lambda x: x >= TARGET_SPEEDUP,
        )
    )
    v = h["ours_wall_s"]
    print(
        target_line(
            "lorasurgeon wall (cold):",
            v,
            f"{v or 0:.1f} s",
            f"target < {TARGET_WALL_S:g} s",
            lambda x: x < TARGET_WALL_S,
        )
    )
    v = h["ours_worst_excess"]
    median = h["ours_median_excess"]
    print(
        target_line(
            "error vs optimum (worst module):",
            v,
            f"within {v or 0:.3%} of optimum (median {median or 0:.4%})",
            f"target {TARGET_ERROR:.0%}",
            lambda x: x <= TARGET_ERROR,
        )
    )
    v = h["ours_rss_mb"]
    print(
        target_line(
            "lorasurgeon peak RSS:",
            v,
            f"{v or 0:.0f} MB",
            f"target < {TARGET_RSS_MB / 1000:g} GB",
            lambda x: x < TARGET_RSS_MB,
        )
    )
    v = h["flat_worst_excess"]
    if v is not None:
        print(
            f"  {'flat spectra (worst case):':32} randomized within {v:.3%} of the exact error; "
            f"keeps {h['flat_worst_energy_ratio']:.1%} of the energy exact keeps"
        )


def print_errors(errors: dict, agreement: dict | None, tools: list[Tool], rows: list[dict]) -> None:
    print(f"\nError against the float64 optimum ({len(rows)} modules):")
    if rows:
        opt = [r["optimum"] for r in rows]
        print(
            f"  optimum rank error ||delta - best||/||delta||: median {statistics.median(opt):.4f}"
            f", range {min(opt):.4f}-{max(opt):.4f}"
        )
    for tool in tools:
        e = errors.get(tool.key)
        if e is None:
            print(f"  {tool.label:28} no output to measure")
            continue
        missing = f", {e['missing']} modules missing" if e["missing"] else ""
        print(
            f"  {tool.label:28} error/optimum median {e['median_ratio']:.6f}, worst "
            f"{e['worst_ratio']:.6f} ({e['worst_module']}){missing}"
        )
    if agreement:
        print(
            f"  lorasurgeon --report rel_error vs measured: max relative difference "
            f"{agreement['max_rel_diff']:.2e} (median {agreement['median_rel_diff']:.2e}) over "
            f"{agreement['modules']} modules"
        )


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for part in text.split(","):
        if part.strip():
            rows, cols = part.lower().split("x")
            shapes.append((int(rows), int(cols)))
    return shapes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", default="1b", choices=sorted(BENCH_SPECS), help="model (default: 1b)")
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path("/tmp/lorasurgeon-bench"),
        help="where checkpoints, mergekit's virtualenv and outputs live",
    )
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default: 16)")
    p.add_argument("--repeat", type=int, default=3, help="lorasurgeon runs (default: 3)")
    p.add_argument(
        "--mergekit-repeat", type=int, default=1, help="mergekit runs (default: 1; 0: skip it)"
    )
    p.add_argument("--exact", action="store_true", help="also one run with --svd exact")
    p.add_argument(
        "--mergekit-venv", type=Path, help="mergekit's virtualenv (default: WORKDIR/mergekit-venv)"
    )
    p.add_argument(
        "--torch-pin",
        default="2.13.0",
        help="torch version installed with mergekit (default: 2.13.0, the CPU wheel on disk)",
    )
    p.add_argument("--reinstall", action="store_true", help="recreate mergekit's virtualenv")
    p.add_argument(
        "--error-layers",
        default="all",
        help="layers whose modules are checked against the optimum: 'all' or e.g. 0,21; "
        "'none' skips the check (default: all, ~10 s per layer)",
    )
    p.add_argument(
        "--flat-shapes",
        default="2048x2048,2048x5632",
        help="Gaussian matrices for the flat-spectrum check ('' skips it)",
    )
    p.add_argument("--flat-seeds", type=int, default=2, help="matrices per flat shape (default 2)")
    p.add_argument(
        "--no-warm-libs",
        action="store_true",
        help="do not read the Python libraries into the page cache before each run",
    )
    p.add_argument("--keep-outputs", action="store_true", help="leave the adapters in the workdir")
    p.add_argument("--shard-size", default="1GB", help="base checkpoint shard size (default: 1GB)")
    p.add_argument("--json", type=Path, help="also write all numbers to this JSON file")
    return p.parse_args(argv)


def prepare_inputs(spec: ModelSpec, args: argparse.Namespace) -> tuple[Path, Path, dict]:
    print(f"\n== {spec.name}: preparing checkpoints", flush=True)
    # adapter_dtype fp32 as bench/merge.py's default, so its cached base is reused.
    base, _, base_s = ensure_checkpoints(spec, args.workdir, parse_size(args.shard_size), "fp32")
    tuned, tuned_s = ensure_tuned(spec, args.workdir, base, TuneSpec())
    info = {
        "base_bytes": dir_size(base),
        "tuned_bytes": dir_size(tuned),
        "base_generation_s": base_s,
        "tuned_generation_s": tuned_s,
    }
    for label, path, seconds in (("base", base, base_s), ("tuned", tuned, tuned_s)):
        made = f"generated in {seconds:.1f} s" if seconds is not None else "cached"
        print(f"   {label:5} {path}: {dir_size(path) / 1e9:.2f} GB ({made})", flush=True)
    return base, tuned, info


def report_mergekit(mk: Mergekit) -> None:
    if not mk.available:
        print(f"   mergekit unavailable: {mk.reason}", flush=True)
        return
    how = "reused" if mk.install.get("reused") else f"installed in {mk.install.get('seconds')} s"
    print(
        f"   mergekit {mk.version} with torch {mk.torch_version} in {mk.venv} ({how}; "
        f"{mk.style} arguments)",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = BENCH_SPECS[args.size]
    timer = "/usr/bin/time -v" if os.access("/usr/bin/time", os.X_OK) else "getrusage fallback"
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, timing with {timer}, "
        f"workdir {args.workdir}",
        flush=True,
    )
    base, tuned, disk = prepare_inputs(spec, args)
    print("\n== mergekit", flush=True)
    mk = setup_mergekit(
        args.mergekit_venv or args.workdir / "mergekit-venv", args.torch_pin, args.reinstall
    )
    report_mergekit(mk)

    out_root = args.workdir / spec.name / "extract-out"
    out_root.mkdir(parents=True, exist_ok=True)
    tools = make_tools(args, base, tuned, out_root, mk)
    print(f"\n== timing (cold page cache, {spec.name}, rank {args.rank})", flush=True)
    results = run_tools(tools, [base, tuned], library_dirs(mk), args)
    summary = summarize_runs(results)

    errors, rows, agreement = {}, [], None
    done = {t.key: t.out for t in tools if summary.get(t.key, {}).get("wall_s") and t.out.exists()}
    if args.error_layers != "none" and done:
        print(f"\n== error against the optimum (layers: {args.error_layers})", flush=True)
        start = time.perf_counter()
        rows = measure_errors(spec, base, tuned, done, args.error_layers, args.rank)
        errors = {k: s for k in done if (s := error_summary(rows, k)) is not None}
        if "lorasurgeon" in done:
            agreement = report_agreement(rows, "lorasurgeon", out_root / "lorasurgeon-report.json")
        print(f"   {len(rows)} modules in {time.perf_counter() - start:.0f} s", flush=True)

    flat = []
    shapes = parse_shapes(args.flat_shapes)
    if shapes:
        print(f"\n== flat spectra (Gaussian matrices, rank {args.rank})", flush=True)
        flat = flat_spectrum(shapes, args.flat_seeds, args.rank)

    disk["outputs"] = {k: dir_size(p) for k, p in done.items()}
    disk["mergekit_venv_bytes"] = dir_size(mk.venv) if mk.venv.exists() else 0
    print_table(spec, tools, summary, errors, mk, args.rank)
    h = headline(summary, errors, flat)
    print_headline(h)
    print_errors(errors, agreement, tools, rows)
    sizes = ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in disk["outputs"].items())
    print(
        f"\nDisk: base {disk['base_bytes'] / 1e9:.2f} GB, tuned {disk['tuned_bytes'] / 1e9:.2f} GB,"
        f" mergekit venv {disk['mergekit_venv_bytes'] / 1e9:.2f} GB; outputs: {sizes or 'none'}"
    )

    if not args.keep_outputs:
        for tool in tools:
            remove_output(tool.out)
            (out_root / f"{tool.key}-report.json").unlink(missing_ok=True)
    if args.json:
        report = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "spec": spec.name,
            "parameters": parameter_count(spec),
            "disk": disk,
            "mergekit": {k: v for k, v in vars(mk).items()},
            "summary": summary,
            "errors": errors,
            "error_rows": rows,
            "report_agreement": agreement,
            "flat_spectrum": flat,
            "headline": h,
        }
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"numbers written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

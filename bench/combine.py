"""Benchmark ``lorasurgeon combine --svd`` against PEFT's ``add_weighted_adapter``.

Run from the repository root with the project's virtualenv:

    .venv/bin/python bench/combine.py                       # 1b model, three rank-16 adapters
    .venv/bin/python bench/combine.py --repeat 5 --json /tmp/combine-bench.json
    .venv/bin/python bench/combine.py --size tiny --repeat 1   # a smoke test, seconds

What it does
------------
1. Generates (once, cached under ``--workdir``, default /tmp/lorasurgeon-bench)
   the Llama-shaped bf16 base of ``bench/merge.py`` (``1b``: TinyLlama-shaped,
   1.1e9 parameters, 2.2 GB in ~1 GB shards; reused when another benchmark
   made it already) and, beside it in ``WORKDIR/SIZE/adapters/a0..``, one
   rank-16 PEFT LoRA adapter per weight (default three), each from its own
   seed: bf16 factors like real adapters, non-zero A and B on all seven
   projections of every layer, lora_alpha 32.
2. Times, each as its own process under ``/usr/bin/time -v`` (whole-process
   wall time, CPU time and peak RSS), every command ending with ``sync``:

   lorasurgeon  ``python -m lorasurgeon combine A0 A1 A2 -o OUT --svd --rank 16
                --weight 0.5 --weight 0.3 --weight 0.2 --device cpu --quiet
                --report REPORT``, ``--repeat`` times
   peft         transformers ``from_pretrained`` (bf16, CPU) + ``PeftModel``
                with the three adapters (``load_adapter``) +
                ``add_weighted_adapter(..., combination_type="svd",
                svd_rank=16)`` + ``save_pretrained(selected_adapters=["mix"])``,
                ``--peft-repeat`` times (default 1: it takes minutes, a full
                SVD of every module's dense update)

   Before each run the inputs (base and adapters) are fsynced and evicted
   from the page cache (``posix_fadvise(DONTNEED)``), the previous output is
   deleted, and the Python libraries are read once so that only checkpoint
   I/O starts cold. When PEFT cannot be imported or its run fails, its row
   says "unavailable" with the reason, and the rest still runs.
3. Checks the outputs (not timed), in float64, on every module of
   ``--check-layers`` (default: the first and the last layer): the exact
   weighted sum S = sum_i w_i * s_i * B_i @ A_i of the inputs (s_i =
   lora_alpha / r), its best rank-16 approximation from a dense SVD, and each
   tool's ``scaling * B @ A`` (scaling from its adapter_config, rank_pattern
   and alpha_pattern included; PEFT's output lies in ``OUT/mix/`` as its
   adapter is not named "default"). Prints, per tool, the relative error
   ||S - tool||_F / ||S||_F against the optimum's, the distance to the optimum
   itself, lorasurgeon against PEFT, and how far lorasurgeon's ``--report``
   rel_error is from the measured one.
4. Prints a table (wall median and min-max, CPU s, peak RSS, PEFT's time as a
   multiple of each tool's, error / optimum) and the issue's targets: PEFT /
   lorasurgeon wall >= 50x and lorasurgeon peak RSS < 600 MB. ``--json FILE``
   writes every number.

The machine should be otherwise idle: before each run the CPUs' load is
sampled and a note under the table says when something else was running.
Disk: the 1b base takes 2.2 GB, each adapter 25 MB (bf16); the outputs are
deleted at the end unless ``--keep-outputs``. PEFT's route loads the whole
model and takes minutes; the float64 check takes a few seconds per module of
the 1b model. Nothing asserts on the numbers: it is a benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    ModelSpec,
    dir_size,
    ensure_checkpoints,
    parameter_count,
    parse_size,
    print_busy_note,
    ratio,
    remove_output,
    stat,
    subprocess_env,
    target_line,
    write_adapter,
)
from extract import (  # noqa: E402
    BENCH_SPECS,
    Adapter,
    Tool,
    error_modules,
    error_summary,
    report_agreement,
    run_tools,
    summarize_runs,
)
from merge import python_lib_dirs  # noqa: E402

# Targets stated with the project's issue. Printed next to the measured
# values; the script never fails on them.
TARGET_SPEEDUP = 50.0  # PEFT wall / lorasurgeon wall: at least
TARGET_RSS_MB = 600.0  # lorasurgeon peak RSS: below

ADAPTER_SEED = 100  # adapter i is generated from seed ADAPTER_SEED + i

PEFT_SCRIPT = """
import sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

base, out, rank, *rest = sys.argv[1:]
paths, weights = rest[0::2], [float(w) for w in rest[1::2]]
names = [f"a{i}" for i in range(len(paths))]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, paths[0], adapter_name=names[0])
for name, path in zip(names[1:], paths[1:]):
    model.load_adapter(path, adapter_name=name)
model.add_weighted_adapter(names, weights, "mix", combination_type="svd", svd_rank=int(rank))
model.save_pretrained(out, selected_adapters=["mix"])
"""

PEFT_PROBE = (
    "import peft, transformers, torch; "
    "print(peft.__version__, transformers.__version__, torch.__version__)"
)


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------


def ensure_adapters(
    spec: ModelSpec, workdir: Path, base: Path, count: int
) -> tuple[list[Path], float | None]:
    """Return (adapter dirs, seconds spent generating or None if cached).

    The adapters sit beside the base (``WORKDIR/SIZE/adapters/aN``); a
    ``.complete`` marker holding the generation parameters makes the cache safe
    against interrupted runs and changed parameters.
    """
    root = workdir / spec.name / "adapters"
    dirs = [root / f"a{i}" for i in range(count)]
    marker = root / ".complete"
    wanted = {"spec": asdict(spec), "base": str(base), "count": count, "dtype": "bf16"}
    wanted.update(seed=ADAPTER_SEED, format=1)
    try:
        if json.loads(marker.read_text()) == wanted:
            return dirs, None
    except (OSError, ValueError):
        pass
    shutil.rmtree(root, ignore_errors=True)
    start = time.perf_counter()
    for i, d in enumerate(dirs):
        write_adapter(spec, d, base, "bf16", ADAPTER_SEED + i)
    os.sync()
    elapsed = time.perf_counter() - start
    marker.write_text(json.dumps(wanted, indent=2, sort_keys=True) + "\n")
    return dirs, elapsed


def prepare_inputs(spec: ModelSpec, args: argparse.Namespace) -> tuple[Path, list[Path], dict]:
    print(f"\n== {spec.name}: preparing checkpoints", flush=True)
    # adapter_dtype fp32 as bench/merge.py's default, so its cached base is reused.
    base, _, base_s = ensure_checkpoints(spec, args.workdir, parse_size(args.shard_size), "fp32")
    adapters, adapters_s = ensure_adapters(spec, args.workdir, base, len(args.weights))
    info = {
        "base_bytes": dir_size(base),
        "adapter_bytes": [dir_size(a) for a in adapters],
        "base_generation_s": base_s,
        "adapters_generation_s": adapters_s,
    }
    for label, size, seconds in (
        (f"base {base}", f"{info['base_bytes'] / 1e9:.2f} GB", base_s),
        (
            f"{len(adapters)} adapters in {adapters[0].parent}",
            f"{info['adapter_bytes'][0] / 1e6:.1f} MB each",
            adapters_s,
        ),
    ):
        made = f"generated in {seconds:.1f} s" if seconds is not None else "cached"
        print(f"   {label}: {size} ({made})", flush=True)
    return base, adapters, info


def probe_peft() -> tuple[str | None, str]:
    """(versions, "") when PEFT and transformers import, else (None, the reason)."""
    proc = subprocess.run(
        [sys.executable, "-c", PEFT_PROBE], capture_output=True, text=True, errors="replace"
    )
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return None, f"cannot import peft/transformers: {lines[-1] if lines else proc.returncode}"
    return proc.stdout.strip(), ""


def peft_env() -> dict:
    """Nothing is fetched from the Hub: every path is local."""
    env = subprocess_env()
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    return env


def make_tools(
    args: argparse.Namespace, adapters: list[Path], base: Path, out_root: Path, peft_ok: bool
) -> list[Tool]:
    weights = [str(w) for w in args.weights]
    ours = [sys.executable, "-m", "lorasurgeon", "combine", *map(str, adapters)]
    ours += ["-o", str(out_root / "lorasurgeon"), "--svd", "--rank", str(args.rank)]
    ours += [a for w in weights for a in ("--weight", w)]
    ours += ["--device", args.device, "--quiet"]
    ours += ["--report", str(out_root / "lorasurgeon-report.json")]
    tools = [
        Tool(
            "lorasurgeon",
            "lorasurgeon combine --svd",
            args.repeat,
            ours,
            out_root / "lorasurgeon",
            subprocess_env(),
        )
    ]
    if peft_ok and args.peft_repeat > 0:
        pairs = [x for a, w in zip(adapters, weights, strict=True) for x in (str(a), w)]
        out = out_root / "peft"
        argv = [sys.executable, "-c", PEFT_SCRIPT, str(base), str(out), str(args.rank), *pairs]
        tools.append(
            Tool("peft", "PEFT add_weighted_adapter svd", args.peft_repeat, argv, out, peft_env())
        )
    return tools


# --------------------------------------------------------------------------
# Output check against the float64 optimum
# --------------------------------------------------------------------------


def _rel(x, y, norm: float) -> float:
    import torch

    return float(torch.linalg.vector_norm(x - y)) / norm if norm else 0.0


def check_outputs(
    spec: ModelSpec,
    inputs: list[Path],
    weights: list[float],
    outputs: dict[str, Path],
    layers: str,
    rank: int,
) -> list[dict]:
    """Per module: the exact weighted sum, its best rank-``rank`` approximation and each
    tool's update, all in float64."""
    import torch

    sources = [Adapter(p) for p in inputs]
    results = {key: Adapter(p) for key, p in outputs.items()}
    rows = []
    for module in error_modules(spec, layers):
        exact = None
        for weight, adapter in zip(weights, sources, strict=True):
            if (found := adapter.factors(module)) is not None:
                a, b, scaling = found
                term = (b.double() @ a.double()).mul_(weight * scaling)
                exact = term if exact is None else exact.add_(term)
        if exact is None:
            continue
        # LAPACK's bidiagonalization is faster on a tall matrix than on its transpose.
        tall = exact.shape[0] >= exact.shape[1]
        u, s, vh = torch.linalg.svd(exact if tall else exact.t(), full_matrices=False)
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        best = best if tall else best.t()
        norm, best_norm = float(torch.linalg.vector_norm(exact)), float(s[:rank].norm())
        row = {
            "module": module,
            "shape": list(exact.shape),
            "optimum": float(s[rank:].norm()) / norm if norm else 0.0,
        }
        updates = {}
        for key, adapter in results.items():
            found = adapter.factors(module)
            row[key] = row[f"{key}_vs_best"] = None
            if found is None:
                continue
            a, b, scaling = found
            updates[key] = (b.double() @ a.double()).mul_(scaling)
            row[key] = _rel(exact, updates[key], norm)
            row[f"{key}_vs_best"] = _rel(updates[key], best, best_norm)
            row[f"{key}_dtype"] = str(a.dtype).removeprefix("torch.")
        if {"lorasurgeon", "peft"} <= updates.keys():
            peft_norm = float(torch.linalg.vector_norm(updates["peft"]))
            row["ours_vs_peft"] = _rel(updates["lorasurgeon"], updates["peft"], peft_norm)
        rows.append(row)
    return rows


def check_summary(rows: list[dict], keys: list[str]) -> dict:
    summary: dict = {key: error_summary(rows, key) for key in keys}
    for key in keys:
        found = [r for r in rows if r.get(f"{key}_vs_best") is not None]
        if summary[key] and found:
            vs_best = [r[f"{key}_vs_best"] for r in found]
            summary[key]["max_vs_best"] = max(vs_best)
            summary[key]["median_vs_best"] = statistics.median(vs_best)
            summary[key]["dtypes"] = sorted({r[f"{key}_dtype"] for r in found})
    diffs = [r["ours_vs_peft"] for r in rows if "ours_vs_peft" in r]
    if diffs:
        summary["ours_vs_peft"] = {"max": max(diffs), "median": statistics.median(diffs)}
    return summary


def print_check(rows: list[dict], check: dict, tools: list[Tool], agreement: dict | None) -> None:
    if not rows:
        return
    print(f"\nAgainst the exact weighted sum, float64 ({len(rows)} modules):")
    opt = [r["optimum"] for r in rows]
    print(
        f"  optimum rank error ||S - best||/||S||: median {statistics.median(opt):.4f}, "
        f"range {min(opt):.4f}-{max(opt):.4f}"
    )
    for tool in tools:
        e = check.get(tool.key)
        if not e:
            print(f"  {tool.label:30} no output to check")
            continue
        missing = f", {e['missing']} modules missing" if e["missing"] else ""
        print(
            f"  {tool.label:30} error/optimum median {e['median_ratio']:.6f}, worst "
            f"{e['worst_ratio']:.6f} ({e['worst_module']}){missing}"
        )
        print(
            f"  {'':30} ||update - best||/||best||: median {e['median_vs_best']:.2e}, max "
            f"{e['max_vs_best']:.2e}; factors stored as {', '.join(e['dtypes'])}"
        )
    if "ours_vs_peft" in check:
        d = check["ours_vs_peft"]
        print(
            f"  lorasurgeon vs PEFT ||ours - peft||/||peft||: median {d['median']:.2e}, "
            f"max {d['max']:.2e}"
        )
    if agreement:
        print(
            f"  lorasurgeon --report rel_error vs measured: max relative difference "
            f"{agreement['max_rel_diff']:.2e} (median {agreement['median_rel_diff']:.2e}) over "
            f"{agreement['modules']} modules"
        )


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def peft_failure(summary: dict, unavailable: str) -> str | None:
    """Why PEFT has no timing: not importable, or the last line of its failed run."""
    if unavailable:
        return unavailable
    entry = summary.get("peft")
    if entry is None or "wall_s" in entry:
        return None
    run = entry["runs"][-1]
    lines = (run["stderr_tail"] or "").strip().splitlines()
    return f"exit {run['returncode']}: {lines[-1] if lines else 'no stderr'}"


def print_table(
    spec: ModelSpec, args: argparse.Namespace, tools: list[Tool], summary: dict, check: dict,
    unavailable: str,
) -> None:  # fmt: skip
    peft_wall = stat(summary, "peft", "wall_s", "median")
    weights = ", ".join(f"{w:g}" for w in args.weights)
    print(
        f"\n{spec.name}: {parameter_count(spec) / 1e9:.2f}B parameters, bf16 base, "
        f"{len(args.weights)} rank-{spec.rank} bf16 adapters (weights {weights}) -> rank "
        f"{args.rank}, cold page cache"
    )
    header = (
        f"  {'tool':30} {'runs':>4} {'wall s':>8} {'(min-max)':>15} {'CPU s':>7} "
        f"{'peak RSS MB':>11} {'PEFT / tool':>11} {'err/opt worst':>13}"
    )
    print(header)
    print("  " + "-" * (len(header) - 2))
    labels = {t.key: t.label for t in tools}
    skipped = "peft" not in labels and not unavailable
    labels.setdefault("peft", "PEFT add_weighted_adapter svd")
    for key, label in labels.items():
        entry = summary.get(key, {})
        if "wall_s" not in entry:
            reason = peft_failure(summary, unavailable) if key == "peft" else None
            text = f"unavailable: {reason}" if reason else "FAILED"
            text = "not run (--peft-repeat 0)" if key == "peft" and skipped else text
            print(f"  {label:30} {len(entry.get('runs', [])):>4} {text}")
            continue
        w, r = entry["wall_s"], entry["rss_mb"]
        rng = f"({w['min']:.2f}-{w['max']:.2f})" if w["n"] > 1 else ""
        cpu = f"{entry['cpu_s']['median']:.1f}" if "cpu_s" in entry else "-"
        speed = ratio(peft_wall, w["median"])
        err = (check.get(key) or {}).get("worst_ratio")
        flag = " (some runs failed)" if entry["failed"] else ""
        print(
            f"  {label:30} {w['n']:>4} {w['median']:8.2f} {rng:>15} {cpu:>7} {r['max']:11.0f} "
            f"{f'{speed:.1f}x' if speed else '-':>11} {f'{err:.6f}' if err else '-':>13}{flag}"
        )
    print_busy_note(summary)


def headline(summary: dict) -> dict:
    ours_wall = stat(summary, "lorasurgeon", "wall_s", "median")
    ours_rss = stat(summary, "lorasurgeon", "rss_mb", "max")
    return {
        "speedup": ratio(stat(summary, "peft", "wall_s", "median"), ours_wall),
        "ours_wall_s": ours_wall,
        "ours_rss_mb": ours_rss,
        "peft_vs_ours_rss": ratio(stat(summary, "peft", "rss_mb", "max"), ours_rss),
    }


def print_headline(h: dict) -> None:
    v = h["speedup"]
    print(
        target_line(
            "PEFT / lorasurgeon (wall, cold):",
            v,
            f"{v or 0:.1f}x",
            f"target >= {TARGET_SPEEDUP:g}x",
            lambda x: x >= TARGET_SPEEDUP,
        )
    )
    v = h["ours_rss_mb"]
    print(
        target_line(
            "lorasurgeon peak RSS (cold):",
            v,
            f"{v or 0:.0f} MB",
            f"target < {TARGET_RSS_MB:g} MB",
            lambda x: x < TARGET_RSS_MB,
        )
    )
    v = h["peft_vs_ours_rss"]
    print(f"  {'PEFT / lorasurgeon (peak RSS):':34} " + ("n/a" if v is None else f"{v:.1f}x"))


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", default="1b", choices=sorted(BENCH_SPECS), help="model (default: 1b)")
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path("/tmp/lorasurgeon-bench"),
        help="where checkpoints are generated and cached, and outputs written",
    )
    p.add_argument(
        "--weights",
        default="0.5,0.3,0.2",
        type=lambda text: [float(w) for w in text.split(",") if w.strip()],
        help="one weight per adapter; their count is the number of adapters (default: 0.5,0.3,0.2)",
    )
    p.add_argument("--rank", type=int, default=16, help="rank of the result (default: 16)")
    p.add_argument("--repeat", type=int, default=3, help="lorasurgeon runs (default: 3)")
    p.add_argument(
        "--peft-repeat", type=int, default=1, help="PEFT runs (default: 1, it is slow; 0: skip it)"
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="lorasurgeon's --device (default: cpu, where PEFT's route runs too)",
    )
    p.add_argument(
        "--check-layers",
        help="layers whose modules are checked against the float64 optimum: 'all', 'none' or "
        "e.g. 0,21 (default: the first and the last)",
    )
    p.add_argument(
        "--no-warm-libs",
        action="store_true",
        help="do not read the Python libraries into the page cache before each run",
    )
    p.add_argument("--keep-outputs", action="store_true", help="leave the results in the workdir")
    p.add_argument("--shard-size", default="1GB", help="base checkpoint shard size (default: 1GB)")
    p.add_argument("--json", type=Path, help="also write all numbers to this JSON file")
    args = p.parse_args(argv)
    if not args.weights:
        p.error("--weights needs at least one weight")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = BENCH_SPECS[args.size]
    timer = "/usr/bin/time -v" if os.access("/usr/bin/time", os.X_OK) else "getrusage fallback"
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, timing with {timer}, "
        f"workdir {args.workdir}",
        flush=True,
    )
    base, adapters, disk = prepare_inputs(spec, args)
    versions, unavailable = probe_peft()
    print(f"   peft, transformers, torch: {versions or unavailable}", flush=True)

    out_root = args.workdir / spec.name / "combine-out"
    out_root.mkdir(parents=True, exist_ok=True)
    tools = make_tools(args, adapters, base, out_root, versions is not None)
    print(f"\n== timing (cold page cache, {spec.name}, rank {args.rank})", flush=True)
    results = run_tools(tools, [base, *adapters], python_lib_dirs(), args)
    summary = summarize_runs(results)

    done = {t.key: t.out for t in tools if summary.get(t.key, {}).get("wall_s") and t.out.exists()}
    if "peft" in done:
        done["peft"] = done["peft"] / "mix"  # an adapter not named "default" saves here
    layers = args.check_layers or f"0,{spec.layers - 1}"
    rows, check, agreement = [], {}, None
    if layers != "none" and done:
        print(f"\n== check against the float64 optimum (layers: {layers})", flush=True)
        start = time.perf_counter()
        rows = check_outputs(spec, adapters, args.weights, done, layers, args.rank)
        check = check_summary(rows, list(done))
        if "lorasurgeon" in done:
            agreement = report_agreement(rows, "lorasurgeon", out_root / "lorasurgeon-report.json")
        print(f"   {len(rows)} modules in {time.perf_counter() - start:.1f} s", flush=True)

    disk["outputs"] = {k: dir_size(p) for k, p in done.items()}
    print_table(spec, args, tools, summary, check, unavailable)
    h = headline(summary)
    print_headline(h)
    print_check(rows, check, tools, agreement)

    if not args.keep_outputs:
        for tool in tools:
            remove_output(tool.out)
        (out_root / "lorasurgeon-report.json").unlink(missing_ok=True)
    if args.json:
        report = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "spec": spec.name,
            "parameters": parameter_count(spec),
            "versions": versions,
            "peft_unavailable": peft_failure(summary, unavailable),
            "disk": disk,
            "summary": summary,
            "check": check,
            "check_rows": rows,
            "report_agreement": agreement,
            "headline": h,
        }
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"numbers written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

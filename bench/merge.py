"""Benchmark ``lorasurgeon merge`` against PEFT and a plain copy.

Run from the repository root with the project's virtualenv:

    .venv/bin/python bench/merge.py                      # 1b model, cold cache
    .venv/bin/python bench/merge.py --sizes 1b,3b        # also the ~3B model
    .venv/bin/python bench/merge.py --warm --extra --json /tmp/merge-bench.json

What it does
------------
1. Generates (once, cached under ``--workdir``, default /tmp/lorasurgeon-bench)
   a synthetic Llama-shaped bf16 base checkpoint per size -- ``1b`` is
   TinyLlama-shaped (1.1e9 parameters, 2.2 GB), ``3b`` is 2.8e9 parameters
   (5.6 GB) -- sharded into ~1 GB ``model-0000k-of-0000N.safetensors`` files
   with an index and a transformers-loadable ``config.json``, plus an r=16
   PEFT LoRA adapter with non-zero random A and B on all seven projections.
2. Times these commands, each as its own process under ``/usr/bin/time -v``
   (whole-process wall time and peak RSS, i.e. "Maximum resident set size"):

   lorasurgeon  ``python -m lorasurgeon merge BASE ADAPTER -o OUT --quiet``
   peft         transformers ``from_pretrained`` (bf16) + ``PeftModel`` +
                ``merge_and_unload()`` + ``save_pretrained``
   cp           ``cp -r BASE OUT && sync``: the floor for reading and writing
                the same bytes
   st           (``--extra``) ``safetensors.torch`` load_file/save_file per
                shard: a naive rewrite with no merging at all

   Every timed command ends with ``sync`` (``--no-sync`` drops it for all but
   cp), so the clock stops only once the output has reached the disk for
   every tool alike, whether or not the tool fsyncs by itself.
3. Before each cold run, every input file (base and adapter) is fsynced and
   evicted from the page cache with ``posix_fadvise(POSIX_FADV_DONTNEED)``,
   the tool's previous output is evicted and deleted, and the Python
   libraries are read once so that only checkpoint I/O starts cold. ``--warm``
   adds runs that read the inputs just before starting instead.
4. Prints a table (median and min-max wall time, median CPU time, peak RSS
   over the runs, ratio to the cold copy) and the headline ratios with their
   targets, then checks that the lorasurgeon and PEFT outputs of the first
   size agree, tensor by tensor, counting differing elements and the largest
   difference in bf16 ULPs. With several sizes it ends with peak RSS by size:
   flat for lorasurgeon, growing with the model for PEFT.

The machine should be otherwise idle: before each run the script samples how
busy the CPUs are and adds a note under the table when something else was
running. Disk: the cached inputs take 2.3 GB (1b) and 5.7 GB (3b); while a
size runs, up to three outputs of the same size sit next to them (deleted at
the end unless ``--keep-outputs``). Generation takes about 15 s (1b) and 30 s
(3b) on two cores; a full default run about 3 minutes, ``--sizes 1b,3b`` 7.

Nothing here asserts on timings; it is a benchmark, not a test. A failing
tool (e.g. ``lorasurgeon merge`` not implemented yet) gets a FAILED row and
the tail of its stderr, and the rest of the benchmark still runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    REPO_ROOT,
    SPECS,
    ModelSpec,
    RunResult,
    cpu_busy,
    dir_size,
    ensure_checkpoints,
    evict,
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
# ratios; the script never fails on them.
TARGET_VS_CP = 2.0  # lorasurgeon wall / cp wall, cold: at most
TARGET_VS_PEFT = 4.0  # PEFT wall / lorasurgeon wall, cold: at least
TARGET_RSS_MB = 600.0  # lorasurgeon peak RSS: below


PEFT_SCRIPT = """
import sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter)
model = model.merge_and_unload()
model.save_pretrained(out)
"""

ST_REWRITE_SCRIPT = """
import os, shutil, sys
from safetensors.torch import load_file, save_file

base, out = sys.argv[1:3]
os.makedirs(out)
for name in sorted(os.listdir(base)):
    src, dst = os.path.join(base, name), os.path.join(out, name)
    if name.endswith(".safetensors"):
        save_file(load_file(src), dst, metadata={"format": "pt"})
    else:
        shutil.copyfile(src, dst)
"""


# --------------------------------------------------------------------------
# Tools
# --------------------------------------------------------------------------


@dataclass
class Tool:
    key: str
    label: str
    repeat: int
    argv: list[str]  # arguments "{base}", "{adapter}", "{out}" are filled in
    append_sync: bool = True

    def command(self, base: Path, adapter: Path, out: Path) -> list[str]:
        fill = {"{base}": str(base), "{adapter}": str(adapter), "{out}": str(out)}
        argv = [fill.get(a, a) for a in self.argv]
        if not self.append_sync:
            return argv
        # "$@" keeps every argument intact; sh waits for the tool, so GNU
        # time's peak RSS still covers it.
        return ["sh", "-c", '"$@" && sync', "sh", *argv]


def make_tools(args: argparse.Namespace) -> list[Tool]:
    py = sys.executable
    sync = not args.no_sync
    tools = {
        "lorasurgeon": Tool(
            "lorasurgeon",
            "lorasurgeon merge",
            args.repeat,
            [py, "-m", "lorasurgeon", "merge", "{base}", "{adapter}", "-o", "{out}", "--quiet"],
            sync,
        ),
        "peft": Tool(
            "peft",
            "PEFT merge_and_unload",
            args.peft_repeat,
            [py, "-c", PEFT_SCRIPT, "{base}", "{adapter}", "{out}"],
            sync,
        ),
        # The baseline always includes its sync.
        "cp": Tool("cp", "cp -r && sync", args.repeat, ["cp", "-r", "{base}", "{out}"], True),
        "st": Tool(
            "st",
            "safetensors rewrite",
            args.repeat,
            [py, "-c", ST_REWRITE_SCRIPT, "{base}", "{out}"],
            sync,
        ),
    }
    keys = [k.strip() for k in args.tools.split(",") if k.strip()]
    if args.extra and "st" not in keys:
        keys.append("st")
    unknown = [k for k in keys if k not in tools]
    if unknown:
        raise SystemExit(f"unknown tool(s) {unknown}; choose from {sorted(tools)}")
    return [tools[k] for k in keys]


# --------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------


def python_lib_dirs() -> list[Path]:
    """Where the interpreter and its packages live (warmed before each run)."""
    dirs = {
        Path(sys.prefix) / "lib",
        Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}",
    }
    return sorted(d for d in dirs if d.is_dir())


def prepare(mode: str, base: Path, adapter: Path, out: Path, args: argparse.Namespace) -> None:
    """Put the page cache into the state ``mode`` asks for, then flush."""
    remove_output(out)
    if not args.no_warm_libs:
        warm(*python_lib_dirs())
    if mode == "cold":
        evict(base, adapter)
    else:
        warm(base, adapter)
    os.sync()  # nothing dirty left over to be written back during the run


def describe(result: RunResult) -> str:
    if not result.ok:
        return f"FAILED (exit {result.returncode}) after {result.wall_s:.1f} s"
    cpu = f"  CPU {result.cpu_s:6.1f} s" if result.cpu_s is not None else ""
    busy = result.extra.get("busy_before")
    others = f"  (CPUs {busy:.0%} busy before)" if busy is not None else ""
    return f"{result.wall_s:7.2f} s  {result.max_rss_mb:8.0f} MB{cpu}{others}"


def run_size(
    spec: ModelSpec,
    tools: list[Tool],
    modes: list[str],
    base: Path,
    adapter: Path,
    out_root: Path,
    args: argparse.Namespace,
) -> dict:
    """Run every tool in every mode; repeats are interleaved across tools."""
    env = subprocess_env()
    out_root.mkdir(parents=True, exist_ok=True)  # each tool creates only its own OUT
    results: dict[tuple[str, str], list[RunResult]] = {}
    for mode in modes:
        failed: set[str] = set()
        for rep in range(max(t.repeat for t in tools)):
            for tool in tools:
                if rep >= tool.repeat or tool.key in failed:
                    continue
                out = out_root / tool.key
                prepare(mode, base, adapter, out, args)
                busy = cpu_busy()  # we are idle now: this is everyone else
                result = timed_run(tool.command(base, adapter, out), env=env, cwd=REPO_ROOT)
                result.extra["busy_before"] = busy
                results.setdefault((mode, tool.key), []).append(result)
                print(
                    f"  [{spec.name} {mode:4}] {tool.key:12} #{rep + 1}: {describe(result)}",
                    flush=True,
                )
                if not result.ok:
                    failed.add(tool.key)
                    print(indent(result.stderr_tail or "(no stderr)", "      | "), flush=True)
    return results


def indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line for line in text.splitlines())


# --------------------------------------------------------------------------
# Output check: lorasurgeon vs PEFT
# --------------------------------------------------------------------------


# Tensors are read with plain positioned reads into numpy arrays rather than
# with safetensors' safe_open: safe_open maps the whole file, and every page
# touched stays in this process's RSS until the file is closed (2.2 GB for
# PEFT's single-file output of the 1b model). Reading one tensor at a time
# into its own buffer keeps the check at about two tensors' worth of memory.
# bf16 has no numpy dtype; it is kept as its uint16 bit patterns.
NUMPY_DTYPES = {
    "BF16": np.uint16,
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


@dataclass
class TensorRef:
    path: Path
    dtype: str  # safetensors' name: "BF16", "F32", ...
    shape: tuple[int, ...]
    start: int  # absolute file offsets
    end: int


def read_safetensors_header(path: Path) -> dict[str, TensorRef]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    base = 8 + length
    refs = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, stop = info["data_offsets"]
        refs[name] = TensorRef(path, info["dtype"], tuple(info["shape"]), base + begin, base + stop)
    return refs


def read_tensor(ref: TensorRef) -> np.ndarray:
    """The tensor's elements, flattened (bf16 as uint16 bit patterns)."""
    buf = bytearray(ref.end - ref.start)
    with open(ref.path, "rb", buffering=0) as f:
        f.seek(ref.start)
        view, done = memoryview(buf), 0
        while done < len(buf):
            n = f.readinto(view[done:])
            if not n:
                raise OSError(f"{ref.path}: file ends inside a tensor")
            done += n
    return np.frombuffer(buf, dtype=NUMPY_DTYPES[ref.dtype])


def tensor_index(directory: Path) -> dict[str, TensorRef]:
    """Tensor name -> where it lies, over every ``*.safetensors`` file in ``directory``."""
    index: dict[str, TensorRef] = {}
    for path in sorted(directory.glob("*.safetensors")):
        index.update(read_safetensors_header(path))
    return index


def _as_float(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float64 if dtype == "F64" else np.float32)


def _bf16_order(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns -> int32 in value order, so distances are ULPs.

    Negative values count down from zero; -0.0 and +0.0 both map to 0.
    """
    b = bits.astype(np.int32)
    magnitude = b & 0x7FFF
    return np.where(b & 0x8000, -magnitude, magnitude)


# Histogram of the ULP distances of differing elements: bucket lower bounds.
ULP_BUCKETS = (1, 2, 3, 16)


def _bucket_labels() -> list[str]:
    labels = []
    for lo, hi in zip(ULP_BUCKETS, ULP_BUCKETS[1:] + (None,), strict=True):
        if hi is None:
            labels.append(f">={lo}")
        elif hi == lo + 1:
            labels.append(str(lo))
        else:
            labels.append(f"{lo}-{hi - 1}")
    return labels


def compare_tensors(a: TensorRef, b: TensorRef, chunk: int = 1 << 22) -> dict:
    """Differing elements, max |a-b| and, when both are bf16, ULP distances.

    Only the elements that differ are converted, so agreeing outputs are
    checked at memory-comparison speed.
    """
    stats = {
        "elements": math.prod(a.shape),
        "differ": 0,
        "max_abs": 0.0,
        "max_ulp": 0,
        "ulp_hist": [0] * len(ULP_BUCKETS),
    }
    if a.shape != b.shape:
        stats["error"] = f"shape {a.shape} vs {b.shape}"
        stats["differ"] = stats["elements"]
        return stats
    va, vb = read_tensor(a), read_tensor(b)
    both_bf16 = a.dtype == b.dtype == "BF16"
    if a.dtype != b.dtype:
        stats["error"] = f"dtype {a.dtype} vs {b.dtype}"
        stats["max_ulp"] = None
    elif np.array_equal(va, vb):
        return stats
    elif not both_bf16:
        stats["max_ulp"] = None
    for start in range(0, va.size, chunk):
        ca, cb = va[start : start + chunk], vb[start : start + chunk]
        if a.dtype == b.dtype:  # compare bits first, convert only the differences
            idx = np.flatnonzero(ca != cb)
            ca, cb = ca[idx], cb[idx]
        diff = np.abs(_as_float(ca, a.dtype) - _as_float(cb, b.dtype))
        if diff.size:
            stats["max_abs"] = max(stats["max_abs"], float(diff.max()))
        if not both_bf16:
            stats["differ"] += int(np.count_nonzero(diff))
            continue
        ulp = np.abs(_bf16_order(ca) - _bf16_order(cb))
        ulp = ulp[ulp > 0]  # -0.0 vs +0.0 is no difference
        if ulp.size:
            stats["differ"] += ulp.size
            stats["max_ulp"] = max(stats["max_ulp"], int(ulp.max()))
            bucket = np.searchsorted(np.array(ULP_BUCKETS), ulp, side="right") - 1
            counts = np.bincount(bucket, minlength=len(ULP_BUCKETS))
            stats["ulp_hist"] = [h + int(c) for h, c in zip(stats["ulp_hist"], counts, strict=True)]
    return stats


def verify_outputs(ours: Path, peft: Path) -> dict:
    """Compare two merged checkpoints by tensor name, one tensor at a time."""
    ours_index, peft_index = tensor_index(ours), tensor_index(peft)
    summary = {
        "compared": 0,
        "missing_in_ours": sorted(set(peft_index) - set(ours_index)),
        "extra_in_ours": sorted(set(ours_index) - set(peft_index)),
        "tensors_differ": 0,
        "elements": 0,
        "elements_differ": 0,
        "max_abs": 0.0,
        "max_ulp": 0,
        "ulp_hist": dict.fromkeys(_bucket_labels(), 0),
        "errors": {},
    }
    for name in sorted(set(ours_index) & set(peft_index)):
        stats = compare_tensors(ours_index[name], peft_index[name])
        summary["compared"] += 1
        summary["elements"] += stats["elements"]
        summary["elements_differ"] += stats["differ"]
        summary["tensors_differ"] += stats["differ"] > 0
        summary["max_abs"] = max(summary["max_abs"], stats["max_abs"])
        if stats["max_ulp"] is None or summary["max_ulp"] is None:
            summary["max_ulp"] = None
        else:
            summary["max_ulp"] = max(summary["max_ulp"], stats["max_ulp"])
        for label, count in zip(_bucket_labels(), stats["ulp_hist"], strict=True):
            summary["ulp_hist"][label] += count
        if "error" in stats:
            summary["errors"][name] = stats["error"]
    return summary


def print_verification(size: str, v: dict) -> None:
    print(f"\nOutput check ({size}): lorasurgeon vs PEFT, matched by tensor name")
    print(
        f"  tensors compared: {v['compared']}, missing in ours: {len(v['missing_in_ours'])}, "
        f"extra in ours: {len(v['extra_in_ours'])}"
    )
    for label in ("missing_in_ours", "extra_in_ours"):
        if v[label]:
            print(f"    {label}: {', '.join(v[label][:5])}{' ...' if len(v[label]) > 5 else ''}")
    frac = v["elements_differ"] / v["elements"] if v["elements"] else 0.0
    ulp = "n/a (not both bf16)" if v["max_ulp"] is None else f"{v['max_ulp']} ULP"
    print(
        f"  tensors that differ: {v['tensors_differ']}; elements that differ: "
        f"{v['elements_differ']:,} of {v['elements']:,} ({frac:.4%})"
    )
    print(f"  largest difference: {ulp} (max abs {v['max_abs']:.3g})")
    if v["max_ulp"]:
        hist = ", ".join(f"{k} ULP: {c:,}" for k, c in v["ulp_hist"].items())
        print(f"  differing elements by distance: {hist}")
    for name, err in list(v["errors"].items())[:5]:
        print(f"    {name}: {err}")


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def summarize_results(results: dict[tuple[str, str], list[RunResult]]) -> dict:
    """Per (mode, tool): wall and RSS statistics, or the failure."""
    summary = {}
    for (mode, key), runs in results.items():
        ok = [r for r in runs if r.ok]
        entry = {"runs": [vars(r) for r in runs], "failed": len(ok) < len(runs)}
        if ok:
            entry["wall_s"] = summarize([r.wall_s for r in ok])
            entry["rss_mb"] = summarize([r.max_rss_mb for r in ok])
            if all(r.cpu_s is not None for r in ok):
                entry["cpu_s"] = summarize([r.cpu_s for r in ok])
        summary[f"{mode}/{key}"] = entry
    return summary


def print_table(
    size: str, spec: ModelSpec, tools: list[Tool], modes: list[str], summary: dict
) -> None:
    cp = summary.get("cold/cp", {}).get("wall_s", {}).get("median")
    print(f"\n{size}: {parameter_count(spec) / 1e9:.2f}B parameters, bf16")
    header = (
        f"  {'tool':24} {'cache':5} {'runs':>4} {'wall s':>8} {'(min-max)':>15} "
        f"{'CPU s':>7} {'peak RSS MB':>12} {'vs cold cp':>11}"
    )
    print(header)
    print("  " + "-" * (len(header) - 2))
    for mode in modes:
        for tool in tools:
            entry = summary.get(f"{mode}/{tool.key}")
            if entry is None:
                continue
            if "wall_s" not in entry:
                print(f"  {tool.label:24} {mode:5} {len(entry['runs']):>4} {'FAILED':>8}")
                continue
            w, r = entry["wall_s"], entry["rss_mb"]
            rng = f"({w['min']:.2f}-{w['max']:.2f})"
            vs_cp = ratio(w["median"], cp)
            vs = f"{vs_cp:.2f}x" if vs_cp else "-"
            cpu = f"{entry['cpu_s']['median']:.1f}" if "cpu_s" in entry else "-"
            flag = " (some runs failed)" if entry["failed"] else ""
            print(
                f"  {tool.label:24} {mode:5} {w['n']:>4} {w['median']:8.2f} {rng:>15} "
                f"{cpu:>7} {r['max']:12.0f} {vs:>11}{flag}"
            )
    print_busy_note(summary)


def headline(summary: dict) -> dict:
    """The issue's three numbers, cold cache; None where a run is missing."""

    def get(key: str, what: str, name: str):
        return stat(summary, key, what, name)

    ours_wall = get("cold/lorasurgeon", "wall_s", "median")
    ours_rss = get("cold/lorasurgeon", "rss_mb", "max")
    return {
        "ours_vs_cp": ratio(ours_wall, get("cold/cp", "wall_s", "median")),
        "peft_vs_ours": ratio(get("cold/peft", "wall_s", "median"), ours_wall),
        "peft_vs_ours_rss": ratio(get("cold/peft", "rss_mb", "max"), ours_rss),
        "ours_rss_mb": ours_rss,
    }


def print_headline(h: dict) -> None:
    v = h["ours_vs_cp"]
    print(
        target_line(
            "lorasurgeon / cp (wall, cold):",
            v,
            f"{v or 0:.2f}x",
            f"target <= {TARGET_VS_CP:g}x",
            lambda x: x <= TARGET_VS_CP,
        )
    )
    v = h["peft_vs_ours"]
    print(
        target_line(
            "PEFT / lorasurgeon (wall, cold):",
            v,
            f"{v or 0:.2f}x",
            f"target >= {TARGET_VS_PEFT:g}x",
            lambda x: x >= TARGET_VS_PEFT,
        )
    )
    v = h["peft_vs_ours_rss"]
    print(f"  {'PEFT / lorasurgeon (peak RSS):':34} " + ("n/a" if v is None else f"{v:.2f}x"))
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


def print_scaling(per_size: dict, tools: list[Tool]) -> None:
    """Peak RSS across sizes: ours should stay flat, PEFT grows with the model."""
    if len(per_size) < 2:
        return
    print("\nPeak RSS by model size (cold, MB):")
    for tool in tools:
        values = []
        for size, data in per_size.items():
            rss = data["summary"].get(f"cold/{tool.key}", {}).get("rss_mb", {}).get("max")
            values.append(f"{size} {rss:.0f}" if rss is not None else f"{size} n/a")
        print(f"  {tool.label:24} " + "  ->  ".join(values))


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--sizes", default="1b", help="comma-separated model sizes: 1b, 3b (default: 1b)"
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path("/tmp/lorasurgeon-bench"),
        help="where checkpoints are generated and cached, and outputs written",
    )
    p.add_argument(
        "--tools",
        default="lorasurgeon,peft,cp",
        help="comma-separated subset of lorasurgeon, peft, cp, st (default: lorasurgeon,peft,cp)",
    )
    p.add_argument(
        "--extra", action="store_true", help="also time a plain safetensors load/save rewrite"
    )
    p.add_argument(
        "--repeat", type=int, default=3, help="runs per tool and cache mode (default: 3)"
    )
    p.add_argument(
        "--peft-repeat", type=int, default=1, help="runs for PEFT (default: 1, it is slow)"
    )
    p.add_argument("--warm", action="store_true", help="also run with the inputs in the page cache")
    p.add_argument(
        "--no-sync",
        action="store_true",
        help="do not end each tool's command with sync (cp keeps its sync)",
    )
    p.add_argument(
        "--no-warm-libs",
        action="store_true",
        help="do not read the Python libraries into the page cache before each run",
    )
    p.add_argument(
        "--no-verify", action="store_true", help="skip the lorasurgeon-vs-PEFT output check"
    )
    p.add_argument(
        "--keep-outputs", action="store_true", help="leave the merged outputs in the workdir"
    )
    p.add_argument("--shard-size", default="1GB", help="base checkpoint shard size (default: 1GB)")
    p.add_argument(
        "--adapter-dtype",
        choices=["fp32", "bf16"],
        default="fp32",
        help="dtype of the generated LoRA weights (default: fp32, as PEFT saves them)",
    )
    p.add_argument("--json", type=Path, help="also write all numbers to this JSON file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SPECS]
    if unknown:
        raise SystemExit(f"unknown size(s) {unknown}; choose from {sorted(SPECS)}")
    tools = make_tools(args)
    keys = [t.key for t in tools]
    modes = ["cold"] + (["warm"] if args.warm else [])
    timer = "/usr/bin/time -v" if os.access("/usr/bin/time", os.X_OK) else "getrusage fallback"
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, timing with {timer}, "
        f"workdir {args.workdir}",
        flush=True,
    )

    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "sizes": {}}
    for n, size in enumerate(sizes):
        spec = SPECS[size]
        print(f"\n== {size}: preparing checkpoints", flush=True)
        base, adapter, gen_s = ensure_checkpoints(
            spec, args.workdir, parse_size(args.shard_size), args.adapter_dtype
        )
        disk = {"base_bytes": dir_size(base), "adapter_bytes": dir_size(adapter)}
        made = f"generated in {gen_s:.1f} s" if gen_s is not None else "cached"
        base_gb, adapter_mb = disk["base_bytes"] / 1e9, disk["adapter_bytes"] / 1e6
        print(f"   base {base_gb:.2f} GB, adapter {adapter_mb:.1f} MB ({made})", flush=True)

        out_root = args.workdir / size / "out"
        results = run_size(spec, tools, modes, base, adapter, out_root, args)
        summary = summarize_results(results)
        data = {
            "generation_s": gen_s,
            "disk": disk,
            "summary": summary,
            "headline": headline(summary),
        }

        print_table(size, spec, tools, modes, summary)
        if "lorasurgeon" in keys:
            print_headline(data["headline"])

        ours_ok = (
            summary.get(f"{modes[-1]}/lorasurgeon", {}).get("runs", [{}])[-1].get("returncode") == 0
        )
        peft_ok = summary.get(f"{modes[-1]}/peft", {}).get("runs", [{}])[-1].get("returncode") == 0
        if n == 0 and not args.no_verify and ours_ok and peft_ok:
            start = time.perf_counter()
            data["verify"] = verify_outputs(out_root / "lorasurgeon", out_root / "peft")
            print_verification(size, data["verify"])
            print(f"  (checked in {time.perf_counter() - start:.1f} s)")
        elif n == 0 and not args.no_verify and {"lorasurgeon", "peft"} <= set(keys):
            print("\nOutput check skipped: needs a successful lorasurgeon and PEFT run.")

        if not args.keep_outputs:
            for tool in tools:
                remove_output(out_root / tool.key)
        report["sizes"][size] = data

    print_scaling(report["sizes"], tools)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"\nnumbers written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark ``lorasurgeon diff`` on the 1.1B bench pair (base and planted "tuned").

Run from the repository root with the project's virtualenv:

    .venv/bin/python bench/diff.py              # 1b pair, warm page cache, once each
    .venv/bin/python bench/diff.py --size tiny  # not available: only 1b/3b shapes exist

What it does: generates (once, cached under ``--workdir``, default /tmp/lorasurgeon-bench)
the bf16 base of ``bench/merge.py`` and the tuned checkpoint of ``bench/extract.py`` (every
linear weight = base + a planted rank-8..32 update + noise), reads both once so that the page
cache holds them, then times, each as its own process (``/usr/bin/time -v``):

  read       every tensor of both checkpoints read with ``TensorFiles`` (pread), nothing else
  diff       ``lorasurgeon diff BASE TUNED --json``
  spectrum   ``lorasurgeon diff BASE TUNED --spectrum 64 --json``
  extract    ``lorasurgeon extract BASE TUNED -o OUT --rank 64``

and prints the issue's targets: diff within 1.3x of read, spectrum no slower than extract.
``--repeat N`` runs the four in turn N times and compares the medians (on a shared machine
one run says little). ``--json FILE`` writes every number. The CPU load sampled before each
run is printed with it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    SPECS,
    TuneSpec,
    cpu_busy,
    ensure_checkpoints,
    ensure_tuned,
    parse_size,
    subprocess_env,
    timed_run,
    warm,
)

_READ = """
import sys
from lorasurgeon.reader import open_checkpoint
for path in sys.argv[1:]:
    with open_checkpoint(path) as c:
        for info in c:
            c.files.read(info)
"""


def _commands(base: Path, tuned: Path, out: Path) -> dict[str, list[str]]:
    py = [sys.executable]
    cli = [*py, "-m", "lorasurgeon"]
    return {
        "read": [*py, "-c", _READ, str(base), str(tuned)],
        "diff": [*cli, "diff", str(base), str(tuned), "--json", "--quiet"],
        "spectrum": [*cli, "diff", str(base), str(tuned), "--spectrum", "64", "--json", "--quiet"],
        "extract": [
            *cli,
            "extract",
            str(base),
            str(tuned),
            "-o",
            str(out),
            "--rank",
            "64",
            "--quiet",
            "--overwrite",
        ],  # fmt: skip
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="1b", choices=sorted(SPECS))
    p.add_argument("--workdir", type=Path, default=Path("/tmp/lorasurgeon-bench"))
    p.add_argument("--shard-size", default="1GB")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--repeat", type=int, default=1, help="runs of each command (medians)")
    args = p.parse_args(argv)
    spec = SPECS[args.size]
    base, _, _ = ensure_checkpoints(spec, args.workdir, parse_size(args.shard_size), "fp32")
    tuned, _ = ensure_tuned(spec, args.workdir, base, TuneSpec())
    warm(base, tuned)
    runs: dict[str, list[dict[str, float | None]]] = {}
    with tempfile.TemporaryDirectory(prefix="diff-bench-", dir=args.workdir) as tmp:
        for _ in range(args.repeat):
            for name, cmd in _commands(base, tuned, Path(tmp) / "lora").items():
                busy = cpu_busy()
                run = timed_run(cmd, env=subprocess_env())
                if not run.ok:
                    print(f"{name}: failed\n{run.stderr_tail}", file=sys.stderr)
                    return 1
                runs.setdefault(name, []).append({"wall_s": run.wall_s, "cpu_s": run.cpu_s,
                                                  "max_rss_mb": run.max_rss_mb,
                                                  "cpu_busy_before": busy})  # fmt: skip
                print(f"{name:>9}: {run.wall_s:7.2f} s wall, {run.cpu_s or 0:7.2f} s CPU, "
                      f"{run.max_rss_mb:7.0f} MB peak RSS (CPU busy before: {busy})")  # fmt: skip
                shutil.rmtree(Path(tmp) / "lora", ignore_errors=True)
    wall = {name: statistics.median(r["wall_s"] or 0.0 for r in rs) for name, rs in runs.items()}
    cpu = {name: statistics.median(r["cpu_s"] or 0.0 for r in rs) for name, rs in runs.items()}
    results: dict[str, object] = {"runs": runs, "median_wall_s": wall, "median_cpu_s": cpu}
    if args.repeat > 1:
        print("medians: " + ", ".join(f"{n} {w:.2f} s ({cpu[n]:.2f} s CPU)"
                                      for n, w in wall.items()))  # fmt: skip
    diff_ratio = wall["diff"] / wall["read"]
    spec_ratio = wall["spectrum"] / wall["extract"]
    verdict = "met" if diff_ratio <= 1.3 else "NOT met"
    print(f"diff / read = {diff_ratio:.2f} (target <= 1.3): {verdict}")
    print(f"diff --spectrum 64 / extract --rank 64 = {spec_ratio:.2f} (target <= 1.0): "
          f"{'met' if spec_ratio <= 1.0 else 'NOT met'}")  # fmt: skip
    if args.json is not None:
        results["ratios"] = {"diff_over_read": diff_ratio, "spectrum_over_extract": spec_ratio}
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

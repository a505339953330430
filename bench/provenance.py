"""What provenance costs: a 1.1B merge without provenance, with a cold hash cache, a warm one.

    PYTHONPATH=. .venv/bin/python bench/provenance.py [--workdir /tmp/lorasurgeon-bench]

Reuses the 1b base and adapter that ``bench/merge.py`` generates (run it first). Each merge
runs in-process after a warm-up merge (so torch is imported once) with the page cache warm for
the inputs; the output is deleted between runs, and the three kinds of run alternate. Reports
the best merge wall time of each: without provenance (``provenance.start`` patched out, the
baseline), with no cached input hashes (inputs hashed on a background thread during the
merge), with cached ones (only the output is hashed, as it is written); and the time to
sha256 the inputs and the output on their own.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import lorasurgeon
from lorasurgeon import provenance


def sha256_seconds(paths: list[Path]) -> float:
    started = time.perf_counter()
    for path in paths:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(8 << 20):
                digest.update(chunk)
    return time.perf_counter() - started


def merge_seconds(base: Path, adapter: Path, out: Path, *, record: bool = True) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = provenance.start
    if not record:
        provenance.start = lambda *args, **kwargs: None  # type: ignore[assignment]
    try:
        started = time.perf_counter()
        lorasurgeon.merge(base, [adapter], out, device="cpu")
        return time.perf_counter() - started
    finally:
        provenance.start = start  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lorasurgeon-bench"))
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    base, adapter = args.workdir / "1b" / "base", args.workdir / "1b" / "adapter"
    out = args.workdir / "1b" / "provenance-out"
    inputs = provenance.weight_files(base) + provenance.weight_files(adapter)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["XDG_CACHE_HOME"] = cache
        merge_seconds(base, adapter, out)  # warm-up: torch imported, inputs in the page cache
        none, cold, warm = [], [], []
        for _ in range(args.runs):
            none.append(merge_seconds(base, adapter, out, record=False))
            shutil.rmtree(Path(cache) / "lorasurgeon", ignore_errors=True)
            cold.append(merge_seconds(base, adapter, out))
            warm.append(merge_seconds(base, adapter, out))
            print(f"run: none {none[-1]:.2f} s, cold {cold[-1]:.2f} s, warm {warm[-1]:.2f} s",
                  flush=True)  # fmt: skip
        hash_in = sha256_seconds(inputs)
        hash_out = sha256_seconds(provenance.weight_files(out))
    shutil.rmtree(out, ignore_errors=True)
    size = sum(p.stat().st_size for p in inputs) / 1e9
    print(f"inputs: {size:.2f} GB; runs: {args.runs}; CPUs: {os.cpu_count()}")
    print(f"merge without provenance:      {min(none):.2f} s (best)")
    for label, times in (("no cached input hashes", cold), ("cached input hashes   ", warm)):
        extra = min(times) / min(none) - 1
        print(f"merge, {label}: {min(times):.2f} s (best; {extra:+.1%})")
    print(f"sha256 of the inputs alone:    {hash_in:.2f} s")
    print(
        f"sha256 of the output alone:    {hash_out:.2f} s ({hash_out / min(warm):.1%} of a merge)"
    )


if __name__ == "__main__":
    main()

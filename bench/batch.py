"""Benchmark ``lorasurgeon batch`` against a shell loop of single commands, and Ray's overhead.

    PYTHONPATH=. .venv/bin/python bench/batch.py [--count 100] [--workdir DIR] [--ray]

1. Writes a manifest of ``--count`` small jobs over the tiny checkpoints in ``fixtures/``
   (half merges, half rank-2 extracts), each with its own output.
2. Times ``lorasurgeon batch MANIFEST --jobs 2`` (one process, two workers: torch is imported
   twice) against the same jobs as a shell loop of ``python -m lorasurgeon merge|extract``
   (torch imported once per job), and checks that both wrote the same tensors.
3. With ``--ray`` (needs ``pip install 'lorasurgeon[ray]'``): starts a local Ray cluster on
   127.0.0.1 only, times its start separately, runs the manifest with ``--ray``, and reports
   the per-job overhead over the local run; then stops the cluster.

Nothing here asserts on timings; it prints them.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "fixtures"


def jobs(count: int) -> list[dict[str, object]]:
    base, tuned, adapter = (str(FIXTURES / n) for n in ("base", "tuned", "adapter"))
    out: list[dict[str, object]] = []
    for i in range(count):
        if i % 2 == 0:
            out.append({"command": "merge", "inputs": [base, adapter], "output": f"out/m{i}",
                        "weight": [0.5 + i / count], "device": "cpu"})  # fmt: skip
        else:
            out.append({"command": "extract", "inputs": [base, tuned], "output": f"out/x{i}",
                        "rank": 2, "svd": "exact", "device": "cpu"})  # fmt: skip
    return out


def shell_line(job: dict[str, object], root: Path) -> str:
    inputs = [str(x) for x in job["inputs"]]  # type: ignore[attr-defined]
    args = [sys.executable, "-m", "lorasurgeon", str(job["command"]), *inputs,
            "-o", str(root / str(job["output"])), "--quiet", "--device", "cpu"]  # fmt: skip
    if job["command"] == "merge":
        args += ["--weight", str(job["weight"][0])]  # type: ignore[index]
    else:
        args += ["--rank", "2", "--svd", "exact"]
    return shlex.join(args)


def tensors(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.safetensors"))}  # fmt: skip


def timed(command: list[str] | str, env: dict[str, str], shell: bool = False) -> float:
    started = time.perf_counter()
    subprocess.run(command, env=env, shell=shell, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)  # fmt: skip
    return time.perf_counter() - started


def ray_run(manifest: Path, env: dict[str, str], local_seconds: float, count: int) -> None:
    env = {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # keeps Ray on 127.0.0.1
    ray = [sys.executable, "-m", "ray.scripts.scripts"]
    try:
        start = timed([*ray, "start", "--head", "--node-ip-address=127.0.0.1", "--port=6399",
                       "--dashboard-host=127.0.0.1", "--num-cpus=2"], env)  # fmt: skip
        print(f"ray start (local head on 127.0.0.1): {start:.1f} s")
        shutil.rmtree(manifest.parent / "out", ignore_errors=True)
        seconds = timed([sys.executable, "-m", "lorasurgeon", "batch", str(manifest),
                         "--ray", "127.0.0.1:6399", "--quiet"], env)  # fmt: skip
        per_job = (seconds - local_seconds) / count
        print(f"batch --ray:  {seconds:.1f} s ({per_job * 1000:+.0f} ms per job over --jobs 2)")
    finally:
        subprocess.run([*ray, "stop", "--force"], env=env, check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--ray", action="store_true")
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="lorasurgeon-batch-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    manifest = root / "jobs.yaml"
    manifest.write_text(yaml.safe_dump({"jobs": jobs(args.count)}))
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "XDG_CACHE_HOME": str(root / "cache")}
    shutil.rmtree(root / "out", ignore_errors=True)
    batch = timed([sys.executable, "-m", "lorasurgeon", "batch", str(manifest), "--jobs", "2",
                   "--quiet"], env)  # fmt: skip
    ours = tensors(root / "out")
    loop_root = root / "loop"
    shutil.rmtree(loop_root, ignore_errors=True)
    (loop_root / "out").mkdir(parents=True)
    script = "set -e\n" + "\n".join(shell_line(j, loop_root) for j in jobs(args.count))
    loop = timed(script, env, shell=True)
    same = tensors(loop_root / "out") == ours
    print(f"{args.count} jobs ({args.count // 2 + args.count % 2} merges, {args.count // 2} "
          f"extracts of tiny checkpoints), {os.cpu_count()} CPUs")  # fmt: skip
    print(f"batch --jobs 2: {batch:.1f} s")
    print(f"shell loop:     {loop:.1f} s ({loop / batch:.1f}x the batch)")
    print(f"same tensors written: {same}")
    if args.ray:
        ray_run(manifest, env, batch, args.count)
    if args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

"""lorasurgeon batch: manifests, validation, resume by provenance, shards, signals, push."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import lorasurgeon
from lorasurgeon import batch, provenance
from lorasurgeon.cli import main

from .test_cli import FIXTURES, REPO, _fill_hub_cache

BASE, TUNED, ADAPTER = (str(FIXTURES / n) for n in ("base", "tuned", "adapter"))
HUB_REV = "b" * 40

JOBS: list[dict[str, Any]] = [
    {"name": "m", "command": "merge", "inputs": [BASE, ADAPTER], "output": "out/m",
     "weight": [0.5], "device": "cpu"},
    {"name": "x", "command": "extract", "inputs": [BASE, TUNED], "output": "out/x", "rank": 2,
     "svd": "exact", "target_modules": "q_proj,v_proj"},
    {"name": "c", "command": "combine", "inputs": [ADAPTER, ADAPTER], "output": "out/c",
     "method": "cat", "weight": [0.3, 0.7]},
    {"name": "r", "command": "resize", "inputs": [ADAPTER], "output": "out/r", "rank": 2},
]  # fmt: skip


def write_manifest(root: Path, jobs: list[dict[str, Any]], **top: Any) -> Path:
    import yaml

    path = root / "jobs.yaml"
    path.write_text(yaml.safe_dump({**top, "jobs": jobs}))
    return path


@dataclass
class Ran:
    exit_code: int
    output: str  # stdout and stderr


def run_batch(*args: str) -> Ran:
    """``lorasurgeon batch ARGS`` through ``main``, which maps errors to exit codes."""
    with CliRunner().isolation() as (_, _, output):
        try:
            main(["batch", *args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        return Ran(code, output.getvalue().decode())


def weights(out: Path) -> dict[str, bytes]:
    """Every file an output holds but its provenance (which names its own options)."""
    files = [out] if out.is_file() else sorted(p for p in out.rglob("*") if p.is_file())
    return {p.name: p.read_bytes() for p in files if p.name != provenance.PROVENANCE_NAME}


def results(path: Path) -> dict[str, str]:
    return {j["name"]: j["status"] for j in json.loads(path.read_text())["jobs"]}


def test_a_manifest_of_mixed_jobs_writes_what_the_single_commands_write(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, JOBS, defaults={"dtype": "auto"})
    result = run_batch(str(manifest), "--results", str(tmp_path / "r.json"))
    assert result.exit_code == 0, result.output
    assert results(tmp_path / "r.json") == {"m": "done", "x": "done", "c": "done", "r": "done"}
    single = tmp_path / "single"
    single.mkdir()
    lorasurgeon.merge(BASE, [ADAPTER], single / "m", weights=[0.5], device="cpu", dtype="auto")
    lorasurgeon.extract(BASE, TUNED, single / "x", rank=2, svd="exact", dtype="auto",
                        target_modules=["q_proj", "v_proj"])  # fmt: skip
    lorasurgeon.combine([ADAPTER, ADAPTER], single / "c", method="cat", weights=[0.3, 0.7],
                        dtype="auto")  # fmt: skip
    lorasurgeon.resize(ADAPTER, single / "r", rank=2, dtype="auto")
    for name in "mxcr":
        ours, theirs = tmp_path / "out" / name, single / name
        assert weights(ours) == weights(theirs), name
        assert provenance.identity(provenance.read_provenance(ours) or {}) == (
            provenance.identity(provenance.read_provenance(theirs) or {}))  # fmt: skip


def test_rerun_skips_done_jobs_and_reruns_exactly_the_changed_ones(tmp_path: Path) -> None:
    jobs = [dict(job, overwrite=True) for job in JOBS]
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for f in Path(ADAPTER).iterdir():
        (adapter / f.name).write_bytes(f.read_bytes())
    jobs[3]["inputs"] = ["adapter"]  # relative to the manifest's directory
    manifest = write_manifest(tmp_path, jobs)
    assert run_batch(str(manifest)).exit_code == 0
    assert run_batch(str(manifest), "--results", str(tmp_path / "a.json")).exit_code == 0
    assert set(results(tmp_path / "a.json").values()) == {"skipped"}

    jobs[1]["rank"] = 3  # an option changes
    data = bytearray((adapter / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 1  # an input changes
    (adapter / "adapter_model.safetensors").write_bytes(bytes(data))
    manifest = write_manifest(tmp_path, jobs)
    assert run_batch(str(manifest), "--results", str(tmp_path / "b.json")).exit_code == 0
    assert results(tmp_path / "b.json") == {"m": "skipped", "x": "done", "c": "skipped",
                                            "r": "done"}  # fmt: skip


def test_an_existing_output_made_differently_fails_without_overwrite(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, [JOBS[3]])
    assert run_batch(str(manifest)).exit_code == 0
    manifest = write_manifest(tmp_path, [dict(JOBS[3], rank=3)])
    result = run_batch(str(manifest), "--results", str(tmp_path / "r.json"))
    assert result.exit_code == 1
    [job] = json.loads((tmp_path / "r.json").read_text())["jobs"]
    assert job["status"] == "failed" and job["error"].startswith("error: ")


def test_a_failing_job_leaves_the_others_done(tmp_path: Path) -> None:
    bad = {"name": "bad", "command": "merge", "inputs": [BASE, TUNED], "output": "out/bad"}
    # TUNED is a checkpoint, not an adapter: found when the job runs (exit 1), not before
    manifest = write_manifest(tmp_path, [bad, JOBS[3]])
    result = run_batch(str(manifest), "--results", str(tmp_path / "r.json"))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert results(tmp_path / "r.json") == {"bad": "failed", "r": "done"}
    assert not (tmp_path / "out" / "bad").exists()
    error = json.loads((tmp_path / "r.json").read_text())["jobs"][0]["error"]
    assert error.startswith("error: ") and "\n" not in error
    result = run_batch(str(manifest), "--fail-fast", "--results", str(tmp_path / "f.json"))
    assert result.exit_code == 1 and results(tmp_path / "f.json") == {"bad": "failed"}


def test_shards_cover_every_job_exactly_once(tmp_path: Path) -> None:
    jobs = [dict(JOBS[3], name=f"r{i}", output=f"out/r{i}") for i in range(7)]
    manifest = lorasurgeon.read_manifest(write_manifest(tmp_path, jobs))
    for n in range(1, 5):
        shares = [batch.shard_jobs(manifest.jobs, (i, n)) for i in range(1, n + 1)]
        names = [job.name for share in shares for job in share]
        assert sorted(names) == sorted(j["name"] for j in jobs)
        assert shares == [batch.shard_jobs(manifest.jobs, (i, n)) for i in range(1, n + 1)]
    result = run_batch(str(tmp_path / "jobs.yaml"), "--shard", "2/3", "--dry-run")
    assert result.exit_code == 0
    assert [line.split(":")[0] for line in result.output.splitlines()[:-1]] == ["r1", "r4"]
    assert run_batch(str(tmp_path / "jobs.yaml"), "--shard", "4/3").exit_code == 2


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, JOBS)
    result = run_batch(str(manifest), "--dry-run")
    assert result.exit_code == 0 and "4 jobs: 0 done, 4 to run" in result.output
    assert not (tmp_path / "out").exists()


BAD_MANIFESTS = [
    ("jobs: [command: merge", "not valid YAML"),
    ([{"command": "fold", "inputs": [ADAPTER], "output": "o"}], "job 1: unknown command 'fold'"),
    ([dict(JOBS[3], ranks=2)], "job 1 (r): unknown option 'ranks' for resize"),
    ([dict(JOBS[3], rank="two")], "job 1 (r): option 'rank': expected int"),
    ([dict(JOBS[3], rank_method="energy")], "job 1 (r): "),
    ([dict(JOBS[2], method="tie")], "job 1 (c): "),
    ([JOBS[3], dict(JOBS[2], output="out/r")], "out/r is also job 1's (r)"),
    ([dict(JOBS[3], inputs=["missing"])], "job 1 (r): input 'missing' does not exist"),
    ([dict(JOBS[3], output=ADAPTER + "/sub")], "lies inside input"),
    ([dict(JOBS[3], inputs=[BASE, ADAPTER])], "job 1 (r): resize takes 1 inputs, 2 given"),
    ([{k: v for k, v in JOBS[3].items() if k != "output"}], "job 1 (r): needs `output:`"),
]  # fmt: skip


@pytest.mark.parametrize(("content", "message"), BAD_MANIFESTS)
def test_bad_manifests_are_usage_errors_naming_the_job(
    tmp_path: Path, content: Any, message: str
) -> None:
    if isinstance(content, str):
        manifest = tmp_path / "jobs.yaml"
        manifest.write_text(content)
    else:
        manifest = write_manifest(tmp_path, content)
    result = run_batch(str(manifest))
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_jsonl_manifests_and_hub_jobs_with_pinned_revisions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants as constants

    hub = tmp_path / "hf" / "hub"
    _fill_hub_cache(hub, "acme/tiny-lora", FIXTURES / "adapter", HUB_REV)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    job = {"name": "hub", "command": "resize", "inputs": [f"acme/tiny-lora@{HUB_REV}"],
           "output": "out/hub", "rank": 2}  # fmt: skip
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text(json.dumps(job) + "\n")
    assert run_batch(str(manifest)).exit_code == 0
    record = provenance.read_provenance(tmp_path / "out" / "hub") or {}
    assert record["inputs"][0]["repo_id"] == "acme/tiny-lora"
    assert record["inputs"][0]["revision"] == HUB_REV
    lorasurgeon.resize(ADAPTER, tmp_path / "local", rank=2)
    assert weights(tmp_path / "out" / "hub") == weights(tmp_path / "local")
    result = run_batch(str(manifest), "--results", str(tmp_path / "r.json"))
    assert result.exit_code == 0 and results(tmp_path / "r.json") == {"hub": "skipped"}


def test_ray_without_ray_installed_is_a_usage_error(tmp_path: Path) -> None:
    if _has_ray():
        pytest.skip("Ray is installed")
    result = run_batch(str(write_manifest(tmp_path, [JOBS[3]])), "--ray", "auto")
    assert result.exit_code == 2 and "pip install 'lorasurgeon[ray]'" in result.output


def _has_ray() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def test_push_uploads_the_output_with_provenance_and_a_model_card(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    calls: list[tuple[str, dict[str, Any]]] = []

    class FakeApi:
        def __getattr__(self, name: str) -> Any:
            def call(*args: Any, **kwargs: Any) -> None:
                if name == "upload_folder":
                    kwargs["files"] = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
                calls.append((name, {"args": args, **kwargs}))

            return call

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    manifest = write_manifest(tmp_path, [dict(JOBS[3], push_to="me/small@v1")])
    assert run_batch(str(manifest)).exit_code == 0
    names = [name for name, _ in calls]
    assert names == ["create_repo", "create_branch", "upload_folder", "upload_file"]
    assert calls[0][1]["private"] is True and calls[0][1]["args"] == ("me/small",)
    assert "lorasurgeon.json" in calls[2][1]["files"] and calls[2][1]["revision"] == "v1"
    card = calls[3][1]["path_or_fileobj"].decode()
    assert f"adapter: {ADAPTER}" in card


def _slow_manifest(root: Path, count: int) -> Path:
    jobs = [dict(JOBS[0], name=f"m{i}", output=f"out/m{i}") for i in range(count)]
    return write_manifest(root, jobs)


@pytest.mark.parametrize(("sig", "workers"), [(signal.SIGTERM, "1"), (signal.SIGKILL, "2")])
def test_a_killed_batch_reruns_only_what_is_not_done(
    tmp_path: Path, sig: signal.Signals, workers: str
) -> None:
    manifest = _slow_manifest(tmp_path, 12)  # enough that the kill lands with jobs to do
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "lorasurgeon", "batch", str(manifest), "--jobs", workers]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (tmp_path / "out" / "m0").exists() and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1]
        time.sleep(0.05)
    process.send_signal(sig)
    stderr = process.communicate(timeout=120)[1]
    if sig == signal.SIGTERM:  # not "nothing was written": the finished jobs are kept
        assert stderr.splitlines()[-1] == (
            "error: interrupted by SIGTERM; jobs that had finished are kept, the others left "
            "nothing; rerun to finish"
        ), stderr
    time.sleep(2)  # workers die with the batch (PR_SET_PDEATHSIG) and clean up
    finished = {p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")}
    result = subprocess.run([*command, "--results", str(tmp_path / "r.json")], env=env,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr
    statuses = results(tmp_path / "r.json")
    assert statuses["m0"] == "skipped"
    assert statuses == {name: "skipped" if name in finished else "done" for name in statuses}
    leftovers = [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]
    assert leftovers == []
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        f"m{i}" for i in range(12)
    )


def _listeners(pids: set[int]) -> list[str]:
    """Local addresses that processes ``pids`` listen on (``ss -ltnp``)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        if any(f"pid={pid}," in line for pid in pids):
            found.append(line.split()[3])
    return found


def test_ray_backend_runs_the_manifest_on_a_local_cluster_like_local_workers(
    tmp_path: Path,
) -> None:
    if not _has_ray():
        pytest.skip("Ray is not installed (pip install 'lorasurgeon[ray]')")
    import ray

    extra = os.path.dirname(os.path.dirname(ray.__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), extra]),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # fmt: skip
    # Measured: --node-ip-address=127.0.0.1 alone still listened on the machine's address.
    cli_ray = [sys.executable, "-m", "ray.scripts.scripts"]
    port = "6391"
    subprocess.run([*cli_ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                    "--dashboard-host=127.0.0.1", "--include-dashboard=false", "--num-cpus=2",
                    "--disable-usage-stats"], env=env, check=True, capture_output=True,
                   timeout=300)  # fmt: skip
    try:
        pids = {int(p) for p in subprocess.run(["pgrep", "-f", "ray"], capture_output=True,
                                               text=True).stdout.split()}  # fmt: skip
        addresses = _listeners(pids)
        loopback = ("127.0.0.1:", "[::1]:", "[::ffff:127.0.0.1]:")
        assert addresses and all(a.startswith(loopback) for a in addresses), addresses
        manifest = write_manifest(tmp_path, [JOBS[0], JOBS[3]])
        result = subprocess.run(
            [sys.executable, "-m", "lorasurgeon", "batch", str(manifest), "--ray",
             f"127.0.0.1:{port}", "--results", str(tmp_path / "r.json")],
            env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert results(tmp_path / "r.json") == {"m": "done", "r": "done"}
    finally:
        subprocess.run([*cli_ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
    local = tmp_path / "local"
    local.mkdir()
    lorasurgeon.resize(ADAPTER, local / "r", rank=2)
    lorasurgeon.merge(BASE, [ADAPTER], local / "m", weights=[0.5], device="cpu")
    for name in "mr":
        assert weights(tmp_path / "out" / name) == weights(local / name)


class FakeLauncher:
    """Runs nothing: records when each job starts and stops on a simulated clock, each job
    taking ``seconds[name]``; ``wait`` finishes the running job that ends first."""

    def __init__(self, seconds: dict[str, float]) -> None:
        self.seconds = seconds
        self.now = 0.0
        self.running: dict[int, tuple[float, batch.Job]] = {}
        self.spans: dict[str, tuple[float, float]] = {}

    def start(self, key: int, job: batch.Job) -> None:
        self.running[key] = (self.now + self.seconds[job.name], job)
        self.spans[job.name] = (self.now, -1.0)

    def wait(self) -> tuple[int, batch.JobResult]:
        key = min(self.running, key=lambda k: self.running[k][0])
        self.now, job = self.running.pop(key)
        self.spans[job.name] = (self.spans[job.name][0], self.now)
        return key, batch.JobResult(job.name, job.command.value, str(job.output),
                                    batch.Status.DONE, self.seconds[job.name])  # fmt: skip


def _fake_jobs(tmp_path: Path, count: int) -> tuple[batch.Job, ...]:
    jobs = [dict(JOBS[3], name=f"j{i}", output=f"out/j{i}") for i in range(count)]
    return lorasurgeon.read_manifest(write_manifest(tmp_path, jobs)).jobs


def _peak_use(spans: dict[str, tuple[float, float]], needs: dict[str, int]) -> tuple[int, int]:
    """The most memory (sum of estimates) and the most jobs running at any instant."""
    memory = running = 0
    for t, _ in spans.values():  # the use only grows at a start
        live = [n for n, (a, b) in spans.items() if a <= t < b]
        memory, running = max(memory, sum(needs[n] for n in live)), max(running, len(live))
    return memory, running


def test_the_scheduler_never_exceeds_the_memory_budget_nor_the_workers(tmp_path: Path) -> None:
    from lorasurgeon.runners import run_scheduled

    jobs = _fake_jobs(tmp_path, 12)
    needs = [3, 5, 2, 7, 1, 4, 4, 6, 2, 3, 5, 1]
    seconds = {job.name: 1.0 + (i * 7 % 5) for i, job in enumerate(jobs)}
    launcher = FakeLauncher(seconds)
    results = run_scheduled(jobs, launcher, workers=3, estimates=needs, budget=10)
    names = [j.name for j in jobs]
    assert sorted(r.name for r in results) == sorted(names)
    memory, running = _peak_use(launcher.spans, dict(zip(names, needs, strict=True)))
    assert memory <= 10 and running <= 3
    assert running >= 2  # the budget is used, not one job at a time
    starts = [launcher.spans[j.name][0] for j in jobs]
    assert starts == sorted(starts)  # first come, first started: no job is passed over


def test_a_job_larger_than_the_budget_runs_alone_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from lorasurgeon.runners import run_scheduled

    jobs = _fake_jobs(tmp_path, 4)
    needs = [n * 10**6 for n in (4, 25, 4, 4)]
    launcher = FakeLauncher({job.name: 2.0 for job in jobs})
    with caplog.at_level("WARNING", logger="lorasurgeon"):
        results = run_scheduled(jobs, launcher, workers=4, estimates=needs, budget=10**7)
    assert len(results) == 4
    big = launcher.spans["j1"]
    others = [span for name, span in launcher.spans.items() if name != "j1"]
    assert all(b <= big[0] or a >= big[1] for a, b in others)  # nothing beside it
    assert launcher.spans["j0"][1] <= big[0] and launcher.spans["j2"][0] >= big[1]
    assert caplog.messages == ["j1: estimated 25 MB exceeds --memory 10 MB; it runs alone"]


@pytest.mark.parametrize("budget", ["700M", "330M", "100M"])
def test_local_workers_under_a_small_budget_run_every_job(tmp_path: Path, budget: str) -> None:
    """--jobs 2 with a budget that holds two fixture jobs (700M: two worker processes), one
    (330M: one at a time) or none (100M: each runs alone, with a warning): every job is done,
    nothing waits for ever."""
    jobs = [dict(JOBS[3], name=f"r{i}", output=f"out/r{i}") for i in range(3)]
    manifest = write_manifest(tmp_path, jobs)
    result = run_batch(str(manifest), "--jobs", "2", "--memory", budget, "--results",
                       str(tmp_path / "r.json"))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert set(results(tmp_path / "r.json").values()) == {"done"}
    warnings = [line for line in result.output.splitlines() if line.startswith("warning: r")]
    assert len(warnings) == (3 if budget == "100M" else 0), result.output


@pytest.mark.parametrize("value", ["lots", "16X", "0", "-2G", ""])
def test_bad_memory_budgets_are_usage_errors(tmp_path: Path, value: str) -> None:
    result = run_batch(str(write_manifest(tmp_path, [JOBS[3]])), "--memory", value)
    assert result.exit_code == 2 and "--memory" in result.output
    assert "Traceback" not in result.output


def test_memory_with_ray_is_a_usage_error(tmp_path: Path) -> None:
    result = run_batch(str(write_manifest(tmp_path, [JOBS[3]])), "--ray", "auto", "--memory",
                       "8G")  # fmt: skip
    assert result.exit_code == 2 and "--memory applies to local workers" in result.output


def test_dry_run_prints_each_jobs_memory_estimate(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, JOBS)
    result = run_batch(str(manifest), "--dry-run")
    assert result.exit_code == 0
    for job in lorasurgeon.read_manifest(manifest).jobs:
        estimate = lorasurgeon.estimate_memory(job)
        line = next(line for line in result.output.splitlines() if line.startswith(job.name))
        assert f"peak memory <= {estimate / 1e6:.0f} MB" in line


class FakeRay:
    """The few Ray calls ``run_ray`` makes, in this process: records each task's resource
    request and returns a finished result for it."""

    def __init__(self, nodes: list[dict[str, Any]]) -> None:
        self._nodes = nodes
        self.requests: list[dict[str, Any]] = []

    def init(self, **kwargs: Any) -> None:
        pass

    def nodes(self) -> list[dict[str, Any]]:
        return self._nodes

    def remote(self, **defaults: Any) -> Any:
        fake = self

        def wrap(function: Any) -> Any:
            class Task:
                def options(self, **request: Any) -> Any:
                    fake.requests.append({**defaults, **request})

                    class Submit:
                        def remote(self, job: batch.Job) -> batch.JobResult:
                            return batch.JobResult(job.name, job.command.value, str(job.output),
                                                   batch.Status.DONE, 0.0)  # fmt: skip

                    return Submit()

            return Task()

        return wrap

    def wait(self, refs: list[Any], num_returns: int) -> tuple[list[Any], list[Any]]:
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref: Any) -> Any:
        return ref

    def cancel(self, ref: Any) -> None:
        pass


RAY_JOBS = [JOBS[0], dict(JOBS[1], device="cuda"), JOBS[3]]


def test_ray_tasks_request_the_memory_estimate_and_a_gpu_for_cuda_jobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeRay([{"Alive": True, "Resources": {"CPU": 4.0, "memory": 8e9, "GPU": 1.0}}])
    monkeypatch.setitem(sys.modules, "ray", fake)
    jobs = lorasurgeon.read_manifest(write_manifest(tmp_path, RAY_JOBS)).jobs
    done = lorasurgeon.run_ray(jobs, "auto")
    assert [r.status.value for r in done] == ["done"] * 3
    assert fake.requests == [
        {"num_cpus": 1, "max_retries": 3, "memory": lorasurgeon.estimate_memory(job),
         "num_gpus": 1 if job.name == "x" else 0} for job in jobs
    ]  # fmt: skip


def test_ray_jobs_no_node_can_hold_fail_at_once_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = {"Alive": False, "Resources": {"CPU": 4.0, "memory": 1e12, "GPU": 8.0}}
    fake = FakeRay([{"Alive": True, "Resources": {"CPU": 4.0, "memory": 1e8}}, dead])
    monkeypatch.setitem(sys.modules, "ray", fake)
    jobs = lorasurgeon.read_manifest(write_manifest(tmp_path, RAY_JOBS)).jobs
    done = lorasurgeon.run_ray(jobs, "auto")
    assert fake.requests == []
    assert [r.status.value for r in done] == ["failed"] * 3
    errors = [r.error or "" for r in done]
    assert "no node of the Ray cluster has a GPU" in errors[1]
    for error, job in zip(errors[::2], jobs[::2], strict=True):
        estimate = lorasurgeon.estimate_memory(job) / 1e6
        assert error == (f"error: {job.output}: not schedulable on Ray: its estimated peak "
                         f"memory {estimate:.0f} MB exceeds every Ray node's memory (largest: "
                         "100 MB); give the cluster larger nodes, or run it with local "
                         "workers")  # fmt: skip


def test_ray_cluster_refuses_what_no_node_holds_instead_of_waiting(tmp_path: Path) -> None:
    """A real local cluster whose one node offers 200 MB of memory: the fixture jobs (estimated
    above it) fail at once, naming the reason, and the batch exits 1 instead of hanging."""
    if not _has_ray():
        pytest.skip("Ray is not installed (pip install 'lorasurgeon[ray]')")
    env, cli_ray = _ray_env()
    port = "6393"
    subprocess.run([*cli_ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                    "--dashboard-host=127.0.0.1", "--include-dashboard=false", "--num-cpus=2",
                    "--memory=200000000", "--disable-usage-stats"], env=env, check=True,
                   capture_output=True, timeout=300)  # fmt: skip
    try:
        pids = {int(p) for p in subprocess.run(["pgrep", "-f", "ray"], capture_output=True,
                                               text=True).stdout.split()}  # fmt: skip
        addresses = _listeners(pids)
        loopback = ("127.0.0.1:", "[::1]:", "[::ffff:127.0.0.1]:")
        assert addresses and all(a.startswith(loopback) for a in addresses), addresses
        manifest = write_manifest(tmp_path, RAY_JOBS)
        result = subprocess.run(
            [sys.executable, "-m", "lorasurgeon", "batch", str(manifest), "--ray",
             f"127.0.0.1:{port}", "--results", str(tmp_path / "r.json")],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        subprocess.run([*cli_ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
    assert result.returncode == 1, result.stderr
    jobs = json.loads((tmp_path / "r.json").read_text())["jobs"]
    assert [j["status"] for j in jobs] == ["failed"] * 3
    assert "exceeds every Ray node's memory (largest: 200 MB)" in jobs[0]["error"]
    assert "no node of the Ray cluster has a GPU" in jobs[1]["error"]
    assert not (tmp_path / "out").exists()


def _ray_env() -> tuple[dict[str, str], list[str]]:
    """The environment and ``ray`` command line of the Ray tests: Ray importable by the
    batch's subprocess, and kept on 127.0.0.1."""
    import ray

    extra = os.path.dirname(os.path.dirname(ray.__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), extra]),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # fmt: skip
    return env, [sys.executable, "-m", "ray.scripts.scripts"]


def test_a_resize_job_without_a_rank_keeps_the_ranks_as_the_command_does(tmp_path: Path) -> None:
    job = {"name": "keep", "command": "resize", "inputs": [ADAPTER], "output": "out/keep"}
    result = run_batch(str(write_manifest(tmp_path, [job])))
    assert result.exit_code == 0, result.output
    lorasurgeon.resize(ADAPTER, tmp_path / "single")
    assert weights(tmp_path / "out" / "keep") == weights(tmp_path / "single")

"""The engine under every command: signals, killed runs, full disks, what --overwrite replaces.

Each kill test runs the real command line in a child process on the shipped multi-shard
fixtures and stops it at a chosen point (the k-th tensor written or copied, the commit, between
the two renames of an overwrite) with SIGTERM, SIGHUP, SIGINT or SIGKILL. Afterwards OUT is
absent or complete, and after the next run nothing else is left beside it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

import lorasurgeon
from lorasurgeon.errors import OutputError
from lorasurgeon.writer import recover

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "fixtures"

# Stops the command line at the N-th call of writer.CheckpointWriter.<METHOD> (write, copy,
# flush) with signal SIG, sent from whichever thread makes the call, as `kill` would.
_DRIVER = """
import os, signal, sys
import lorasurgeon.writer as w
method, count, sig = sys.argv[1], int(sys.argv[2]), getattr(signal, sys.argv[3])
original, calls = getattr(w.CheckpointWriter, method), [0]
def hooked(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == count:
        os.kill(os.getpid(), sig)
    return original(self, *args, **kwargs)
setattr(w.CheckpointWriter, method, hooked)
from lorasurgeon.cli import main
main(sys.argv[4:])
"""


def _command(name: str, work: Path, out: Path) -> list[str]:
    base, tuned, adapter = work / "base", work / "tuned", work / "adapter"
    return {
        "merge": ["merge", str(base), str(adapter), "-o", str(out)],
        "extract": ["extract", str(base), str(tuned), "-o", str(out), "--rank", "4"],
        "combine": ["combine", str(adapter), str(adapter), "--svd", "-o", str(out)],
        "resize": ["resize", str(adapter), "-o", str(out), "--rank", "4"],
    }[name]


def _api(name: str, work: Path, out: Path, **options: object) -> None:
    base, tuned, adapter = work / "base", work / "tuned", work / "adapter"
    if name == "merge":
        lorasurgeon.merge(base, [adapter], out, **options)  # type: ignore[arg-type]
    elif name == "extract":
        lorasurgeon.extract(base, tuned, out, rank=4, **options)  # type: ignore[arg-type]
    elif name == "combine":
        lorasurgeon.combine([adapter, adapter], out, svd=True, **options)  # type: ignore[arg-type]
    else:
        lorasurgeon.resize(adapter, out, rank=4, **options)  # type: ignore[arg-type]


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".out"))


@pytest.fixture
def work(tmp_path: Path) -> Path:
    for name in ("base", "tuned", "adapter"):
        shutil.copytree(FIXTURES / name, tmp_path / name)
    return tmp_path


def _stop(
    work: Path, command: str, method: str, count: int, sig: str
) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-c", _DRIVER, method, str(count), sig,
            *_command(command, work, work / "out")]  # fmt: skip
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)


def _assert_complete(command: str, out: Path) -> None:
    weights = out / (
        "adapter_model.safetensors" if command != "merge" else "model.safetensors.index.json"
    )
    assert weights.is_file(), sorted(p.name for p in out.iterdir())
    if command != "merge":
        assert load_file(weights)  # the whole file parses


# (command, writer method, which call): points across each command's output
_POINTS = [
    ("merge", "copy", 1), ("merge", "write", 1), ("merge", "write", 9), ("merge", "flush", 1),
    ("extract", "write", 1), ("extract", "write", 20), ("extract", "flush", 1),
    ("combine", "write", 3), ("combine", "flush", 1),
    ("resize", "write", 2), ("resize", "flush", 1),
]  # fmt: skip


@pytest.mark.parametrize(("command", "method", "count"), _POINTS)
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_stopped_run_leaves_nothing_and_the_next_run_finishes(
    work: Path, command: str, method: str, count: int, sig: str,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    inputs = {name: digest(work / name) for name in ("base", "tuned", "adapter")}
    proc = _stop(work, command, method, count, sig)
    if sig == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        assert not (work / "out").exists()
        assert leftovers(work), "a killed run should leave its partial output for the next run"
    else:
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == (
            f"error: interrupted by {sig}; nothing was written"
        ), proc.stderr
        assert "Traceback" not in proc.stderr
        assert not (work / "out").exists() and leftovers(work) == []
    with caplog.at_level(logging.WARNING, logger="lorasurgeon"):
        _api(command, work, work / "out")
    _assert_complete(command, work / "out")
    assert leftovers(work) == []
    if sig == "SIGKILL":
        assert any("interrupted run" in r.getMessage() for r in caplog.records), caplog.text
    assert {name: digest(work / name) for name in inputs} == inputs


@pytest.mark.parametrize("command", ["merge", "extract", "combine", "resize"])
@pytest.mark.parametrize("sig", ["SIGHUP", "SIGINT"])
def test_sighup_and_sigint_stop_every_command_cleanly(work: Path, command: str, sig: str) -> None:
    method = "copy" if command == "merge" else "write"
    proc = _stop(work, command, method, 1, sig)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: interrupted") and "Traceback" not in proc.stderr, proc.stderr
    assert not (work / "out").exists() and leftovers(work) == []


_KILL_BETWEEN_RENAMES = """
import os, signal, sys
real = os.rename
def rename(src, dst, *a, **k):
    real(src, dst, *a, **k)
    if ".old-" in os.fspath(dst):
        os.kill(os.getpid(), signal.SIGKILL)
os.rename = rename
from lorasurgeon.cli import main
main(sys.argv[1:])
"""


def test_kill_between_the_renames_of_an_overwrite_puts_the_old_output_back(work: Path) -> None:
    out = work / "out"
    _api("resize", work, out)
    before = digest(out)
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_BETWEEN_RENAMES, *_command("resize", work, out), "--rank",
         "2", "--overwrite"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists()  # moved aside, the new one not yet in place
    done = recover(out)
    assert digest(out) == before and leftovers(work) == []
    assert any("put back" in line for line in done), done


def test_recover_leaves_a_live_run_alone(work: Path) -> None:
    out = work / "out"
    from lorasurgeon.writer import CheckpointWriter, OutputLayout, OutputShard, OutputTensor

    layout = OutputLayout((OutputShard("x.safetensors", None, (OutputTensor("a", "F32", (1,)),)),))
    with CheckpointWriter(out, layout) as writer:
        assert recover(out) == []
        assert writer.tmp.is_dir()
        writer.write("a", bytes(4))
        writer.commit()
    assert leftovers(work) == []


# ---------------------------------------------------------------- full disks


def _limit_file_size(limit: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.parametrize("command", ["merge", "extract", "combine", "resize"])
def test_a_write_failing_midway_names_the_output_and_leaves_nothing(
    work: Path, command: str
) -> None:
    out = work / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "lorasurgeon", *_command(command, work, out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        preexec_fn=lambda: _limit_file_size(16 * 1024),
    )  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr
    assert lines[-1].startswith(f"error: {out}: ") and "cannot write: file too large" in lines[-1]
    assert "partial" not in lines[-1] and "Traceback" not in proc.stderr
    assert not out.exists() and leftovers(work) == []


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):  # type: ignore[no-untyped-def]
    mount = tmp_path / "small-disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                          capture_output=True)  # fmt: skip
    if proc.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.parametrize("command", ["merge", "extract", "combine", "resize"])
def test_a_full_disk_is_refused_before_any_work(
    work: Path, tiny_tmpfs: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (tiny_tmpfs / "filler").write_bytes(bytes(250 * 1024))
    out = tiny_tmpfs / "out"
    from lorasurgeon.cli import main

    with pytest.raises(SystemExit) as exited:
        main(_command(command, work, out))
    err = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 1
    assert err[-1].startswith(f"error: {out}: needs ") and "MB are free there" in err[-1]
    assert sorted(p.name for p in tiny_tmpfs.iterdir()) == ["filler"]


def test_enospc_midway_is_a_clear_error(work: Path, tiny_tmpfs: Path) -> None:
    # Room for the tensor data, so the check before work passes, but not for the header too.
    out = tiny_tmpfs / "out"
    data = sum(info.nbytes for info in lorasurgeon.open_checkpoint(
        work / "adapter" / "adapter_model.safetensors"))  # fmt: skip
    page = os.statvfs(tiny_tmpfs).f_frsize
    free = os.statvfs(tiny_tmpfs).f_bavail * page
    (tiny_tmpfs / "filler").write_bytes(bytes(free - -(-data // page) * page))
    assert data <= os.statvfs(tiny_tmpfs).f_bavail * page < data + page
    with pytest.raises(OutputError) as e:
        lorasurgeon.resize(work / "adapter", out, rank=8)  # the input's rank: same sizes
    assert e.value.path == str(out) and "no space left on the device" in str(e.value)
    assert sorted(p.name for p in tiny_tmpfs.iterdir()) == ["filler"]


# ---------------------------------------------------------------- what --overwrite replaces


def test_overwrite_refuses_a_directory_that_is_no_output(work: Path) -> None:
    home = work / "models"
    (home / "llama").mkdir(parents=True)
    (home / "notes.txt").write_text("mine")
    before = digest(home)
    with pytest.raises(OutputError) as e:
        _api("resize", work, home, overwrite=True)
    assert "notes.txt" in str(e.value) and "llama/" in str(e.value)
    assert digest(home) == before


def test_overwrite_refuses_a_folder_of_checkpoints(work: Path) -> None:
    home = work / "models"
    shutil.copytree(work / "adapter", home / "adapter")
    (home / "model.safetensors").write_bytes(b"x")
    with pytest.raises(OutputError):
        _api("resize", work, home, overwrite=True)
    assert (home / "adapter" / "adapter_config.json").is_file()


def test_overwrite_refuses_a_file_that_is_not_safetensors(work: Path) -> None:
    from safetensors.torch import save_file

    single = work / "base.safetensors"
    shards = sorted((work / "base").glob("model-*"))
    save_file({k: v for p in shards for k, v in load_file(p).items()}, single)
    target = work / "notes.txt"
    target.write_text("mine")
    with pytest.raises(OutputError) as e:
        lorasurgeon.merge(single, [work / "adapter"], target, overwrite=True, fan_in_fan_out="none")
    assert "is a file, not a checkpoint" in str(e.value)
    assert target.read_text() == "mine"
    merged = work / "merged.safetensors"
    lorasurgeon.merge(single, [work / "adapter"], merged, fan_in_fan_out="none")
    lorasurgeon.merge(single, [work / "adapter"], merged, overwrite=True, fan_in_fan_out="none")


@pytest.mark.parametrize("out", [".", "..", "./"])
def test_current_directory_is_never_an_output(
    work: Path, out: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sub = work / "sub"
    sub.mkdir()
    monkeypatch.chdir(sub)
    with pytest.raises(OutputError) as e:
        _api("resize", work, Path(out), overwrite=True)
    assert "current directory" in str(e.value)
    assert sorted(os.listdir(work)) == ["adapter", "base", "sub", "tuned"]


def test_recover_removes_a_lock_killed_before_it_was_renamed(work: Path) -> None:
    """A run killed between creating its lock under the hidden name and renaming it leaves
    ``.lock.new``; the next run removes it, while a held one (a starting run) stays."""
    import fcntl

    dead = work / ".out.partial-0badf00d.lock.new"
    dead.write_text("")
    live = work / ".out.partial-0c0ffee0.lock.new"
    fd = os.open(live, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        recover(work / "out")
        assert not dead.exists() and live.exists()
    finally:
        os.close(fd)
    recover(work / "out")
    assert leftovers(work) == []


# SIGTERM (or Ctrl-C) arriving while the finished output is being renamed into place.
_SIGNAL_AT_RENAME = """
import os, signal, sys
import lorasurgeon.writer as w
sig = getattr(signal, sys.argv[1])
original = w.CheckpointWriter._move_into_place
def hooked(self):
    os.kill(os.getpid(), sig)
    original(self)
w.CheckpointWriter._move_into_place = hooked
from lorasurgeon.cli import main
main(sys.argv[2:])
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_during_the_final_rename_keeps_the_complete_output_and_says_so(
    work: Path, sig: str
) -> None:
    out = work / "out"
    args = [sys.executable, "-c", _SIGNAL_AT_RENAME, sig, *_command("merge", work, out)]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: interrupted by {sig}; {out} was complete and is kept"
    ), proc.stderr
    _assert_complete("merge", out)
    assert leftovers(work) == []
    reference = work / "reference"
    _api("merge", work, reference)
    assert digest(out) == digest(reference)

"""The command line: bad inputs, atomic output, the Hub cache, exit codes and the contract."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import lorasurgeon
import lorasurgeon.stream as stream_module  # the streaming half of merge
from lorasurgeon.cli import cli, main

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "fixtures"
SPEC = REPO.parent / "shared" / "spec" / "cli.md"
SHARD2 = "model-00002-of-00002.safetensors"


# ---------------------------------------------------------------- helpers


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    code = exited.value.code
    return (code if isinstance(code, int) else 1), out, err


def digest(*roots: Path) -> dict[str, str]:
    """Hash of every file under the given paths (to prove inputs are left alone)."""
    hashes = {}
    for root in roots:
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in paths:
            hashes[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return hashes


def leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if ".partial-" in p.name or ".old-" in p.name]


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """Fresh copies of the shipped fixtures: work/base, work/adapter."""
    shutil.copytree(FIXTURES / "base", tmp_path / "base")
    shutil.copytree(FIXTURES / "adapter", tmp_path / "adapter")
    return tmp_path


def rewrite_header(path: Path, edit: Callable[[dict], None]) -> None:
    """Re-encode a safetensors file's header after ``edit`` (data bytes unchanged)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + n :])


def save_adapter_tensors(adapter: Path, edit: Callable[[dict], None]) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(adapter / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})


# ---------------------------------------------------------------- bad inputs


def _truncate(w: Path) -> None:
    p = w / "base" / SHARD2
    p.write_bytes(p.read_bytes()[:-100])


def _garbage_header(w: Path) -> None:
    p = w / "base" / SHARD2
    raw = bytearray(p.read_bytes())
    raw[8:20] = b"\x00not json!!\xff"
    p.write_bytes(bytes(raw))


def _header_past_end(w: Path) -> None:
    p = w / "base" / SHARD2
    p.write_bytes(struct.pack("<Q", 10**9) + p.read_bytes()[8:])


def _overlap(w: Path) -> None:
    def edit(h: dict) -> None:
        q = h["model.layers.1.self_attn.q_proj.weight"]["data_offsets"]
        h["model.layers.1.self_attn.o_proj.weight"]["data_offsets"] = list(q)

    rewrite_header(w / "base" / SHARD2, edit)


def _unknown_dtype(w: Path) -> None:
    rewrite_header(w / "base" / SHARD2, lambda h: h["model.norm.weight"].update(dtype="Q4"))


def _missing_shard(w: Path) -> None:
    (w / "base" / SHARD2).unlink()


def _escaping_index(w: Path) -> None:
    p = w / "base" / "model.safetensors.index.json"
    index = json.loads(p.read_text())
    index["weight_map"]["lm_head.weight"] = "../" + SHARD2
    p.write_text(json.dumps(index))


def _no_config(w: Path) -> None:
    (w / "adapter" / "adapter_config.json").unlink()


def _bad_shape(w: Path) -> None:
    import torch

    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    save_adapter_tensors(w / "adapter", lambda t: t.update({key: torch.ones(32, 8)}))


def _absent_module(w: Path) -> None:
    import torch

    key = "base_model.model.model.layers.7.self_attn.q_proj"
    save_adapter_tensors(
        w / "adapter",
        lambda t: t.update(
            {key + ".lora_A.weight": torch.ones(8, 64), key + ".lora_B.weight": torch.ones(64, 8)}
        ),
    )


def _rank_mismatch(w: Path) -> None:
    p = w / "adapter" / "adapter_config.json"
    config = json.loads(p.read_text())
    config["r"] = 4
    p.write_text(json.dumps(config))


def _pickle_only(w: Path) -> None:
    shutil.rmtree(w / "base")
    (w / "base").mkdir()
    (w / "base" / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not loaded")


def _existing_output(w: Path) -> None:
    (w / "out").mkdir()
    (w / "out" / "keep.txt").write_text("mine")


BAD_INPUTS = [
    # (case, corrupt the copies, words the error must contain)
    ("truncated file", _truncate, [SHARD2, "truncated"]),
    ("bad header JSON", _garbage_header, [SHARD2, "JSON"]),
    ("header length past the end", _header_past_end, [SHARD2, "header length"]),
    ("overlapping offsets", _overlap, [SHARD2, "o_proj.weight", "overlaps"]),
    ("unknown dtype", _unknown_dtype, [SHARD2, "model.norm.weight", "Q4"]),
    ("index names a missing shard", _missing_shard, ["index.json", SHARD2, "does not exist"]),
    ("index path leaves the directory", _escaping_index, ["index.json", "lm_head.weight"]),
    ("adapter without config", _no_config, ["adapter", "adapter_config.json"]),
    ("shapes that don't fit", _bad_shape, ["adapter_model.safetensors", "q_proj", "fit"]),
    ("module absent from the base", _absent_module, ["layers.7.self_attn.q_proj", "no base"]),
    ("rank differs from config", _rank_mismatch, ["rank 8", "config"]),
    ("pickle-only base", _pickle_only, ["base", "pickle"]),
    ("existing output", _existing_output, ["out", "already exists", "--overwrite"]),
]


@pytest.mark.parametrize(("case", "corrupt", "words"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_exits_1_with_one_error_line(
    work: Path, capsys: pytest.CaptureFixture[str], case: str, corrupt: Callable, words: list[str]
) -> None:
    corrupt(work)
    before = digest(work)
    code, out, err = run_cli(
        capsys, "merge", work / "base", work / "adapter", "-o", work / "out", "--quiet"
    )
    lines = err.strip().splitlines()
    assert code == 1, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert digest(work) == before  # inputs (and a pre-existing output) untouched
    assert case == "existing output" or not (work / "out").exists()
    assert leftovers(work) == []


def test_output_inside_an_input_is_refused(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = digest(work)
    out = work / "base" / "merged"
    code, _, err = run_cli(capsys, "merge", work / "base", work / "adapter", "-o", out)
    assert code == 1 and err.startswith("error: ") and "inside" in err
    assert not out.exists() and digest(work) == before


def test_overwrite_never_deletes_an_input(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(
        capsys, "merge", work / "base", work / "adapter", "-o", work, "--overwrite"
    )
    assert code == 1 and "would delete" in err
    assert (work / "base" / SHARD2).exists()


def test_weight_count_mismatch_is_a_usage_error(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(
        capsys,
        "merge",
        work / "base",
        work / "adapter",
        "-o",
        work / "o",
        "--weight",
        "1",
        "--weight",
        "2",
    )
    assert code == 2 and "--weight" in err and not (work / "o").exists()


# ---------------------------------------------------------------- atomic output


def _fail_at(monkeypatch: pytest.MonkeyPatch, n: int, error: BaseException) -> None:
    original = stream_module._compute
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(stream_module, "_compute", failing)


@pytest.mark.parametrize("n", [1, 5, 14])
@pytest.mark.parametrize(
    "error", [RuntimeError("boom"), KeyboardInterrupt()], ids=["exception", "ctrl-c"]
)
def test_interrupted_run_leaves_no_output(
    work: Path, monkeypatch: pytest.MonkeyPatch, n: int, error: BaseException
) -> None:
    _fail_at(monkeypatch, n, error)
    before = digest(work)
    with pytest.raises(type(error)):
        lorasurgeon.merge(work / "base", [work / "adapter"], work / "out")
    assert not (work / "out").exists()
    assert leftovers(work) == []
    assert digest(work) == before


def test_interrupt_reports_one_error_line(
    work: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _fail_at(monkeypatch, 3, KeyboardInterrupt())
    code, _, err = run_cli(capsys, "merge", work / "base", work / "adapter", "-o", work / "out")
    assert code == 1 and err.strip().splitlines() == ["error: interrupted; nothing was written"]
    assert not (work / "out").exists() and leftovers(work) == []


def test_internal_error_hints_at_debug(
    work: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _fail_at(monkeypatch, 2, ZeroDivisionError("oops"))
    code, _, err = run_cli(capsys, "merge", work / "base", work / "adapter", "-o", work / "out")
    assert code == 1 and err.startswith("error: internal error") and "--debug" in err
    assert "Traceback" not in err and not (work / "out").exists()


def test_failed_overwrite_keeps_the_old_output(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _old_output(work / "out")
    _fail_at(monkeypatch, 4, RuntimeError("boom"))
    with pytest.raises(RuntimeError):
        lorasurgeon.merge(work / "base", [work / "adapter"], work / "out", overwrite=True)
    assert (work / "out" / "old.txt").read_text() == "old"
    assert leftovers(work) == []


def _old_output(out: Path) -> None:
    """An earlier output at ``out``: a checkpoint directory, which --overwrite may replace."""
    out.mkdir()
    (out / "old.txt").write_text("old")
    shutil.copyfile(REPO / "fixtures" / "adapter" / "adapter_model.safetensors",
                    out / "model.safetensors")  # fmt: skip


def test_overwrite_replaces_the_old_output(work: Path) -> None:
    _old_output(work / "out")
    lorasurgeon.merge(work / "base", [work / "adapter"], work / "out", overwrite=True)
    assert not (work / "out" / "old.txt").exists()
    assert (work / "out" / SHARD2).exists() and leftovers(work) == []


# ---------------------------------------------------------------- the Hub cache


def _fill_hub_cache(hub: Path, repo: str, source: Path, commit: str) -> None:
    """Lay out files as huggingface_hub's cache does: blobs, snapshots/<commit>, refs/main."""
    folder = hub / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (folder / "blobs").mkdir()
    for f in sorted(source.iterdir()):
        blob = folder / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import huggingface_hub.constants as constants

    hub = tmp_path / "hf" / "hub"
    _fill_hub_cache(hub, "acme/tiny-base", FIXTURES / "base", "a" * 40)
    _fill_hub_cache(hub, "acme/tiny-lora", FIXTURES / "adapter", "b" * 40)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub


def test_hub_repo_ids_merge_like_local_paths(hub_cache: Path, tmp_path: Path) -> None:
    lorasurgeon.merge("acme/tiny-base", ["acme/tiny-lora@" + "b" * 40], tmp_path / "hub-out")
    lorasurgeon.merge(FIXTURES / "base", [FIXTURES / "adapter"], tmp_path / "local-out")
    assert digest(tmp_path / "hub-out").keys() != set()
    hub = {Path(k).name: v for k, v in digest(tmp_path / "hub-out").items()}
    local = {Path(k).name: v for k, v in digest(tmp_path / "local-out").items()}
    assert hub.pop("lorasurgeon.json") != local.pop("lorasurgeon.json")  # the inputs differ
    assert hub == local


def test_hub_repo_ids_combine_and_resize_like_local_paths(hub_cache: Path, tmp_path: Path) -> None:
    hub_id = "acme/tiny-lora@" + "b" * 40
    for name, source in (("hub", hub_id), ("local", FIXTURES / "adapter")):
        lorasurgeon.combine([source, source], tmp_path / f"{name}-mix", method="cat")
        lorasurgeon.resize(source, tmp_path / f"{name}-small", rank=2)
    for kind in ("mix", "small"):
        hub = {Path(k).name: v for k, v in digest(tmp_path / f"hub-{kind}").items()}
        local = {Path(k).name: v for k, v in digest(tmp_path / f"local-{kind}").items()}
        assert hub and hub.keys() == local.keys()
        assert hub["adapter_model.safetensors"] == local["adapter_model.safetensors"]


def test_hub_inspect_reads_the_cached_adapter(hub_cache: Path) -> None:
    summary = lorasurgeon.summarize("acme/tiny-lora")
    assert summary.kind == "adapter" and summary.r == 8 and len(summary.modules) == 14


def test_uncached_repo_offline_names_the_remedy(
    hub_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(capsys, "inspect", "acme/not-cached")
    assert code == 1 and err.startswith("error: acme/not-cached") and "HF_HUB_OFFLINE" in err


def test_existing_local_path_wins_over_a_repo_id(
    hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    shutil.copytree(FIXTURES / "adapter", tmp_path / "acme" / "tiny-lora")
    (tmp_path / "acme" / "tiny-lora" / "adapter_config.json").write_text(
        json.dumps(
            {**json.loads((FIXTURES / "adapter" / "adapter_config.json").read_text()), "r": 4}
        )
    )
    with pytest.raises(lorasurgeon.AdapterError, match="rank 8 in the file but 4"):
        lorasurgeon.summarize("acme/tiny-lora")


# ---------------------------------------------------------------- behaviour and contract


def test_dry_run_lists_changes_and_writes_nothing(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(
        capsys, "merge", work / "base", work / "adapter", "-o", work / "o", "--dry-run"
    )
    assert code == 0 and not (work / "o").exists()
    changed = [line.split(":")[0].strip() for line in out.splitlines() if line.startswith("  ")]
    assert len(changed) == 14 and all(re.search(r"_proj\.weight$", n) for n in changed)


def test_inspect_json_counts_match_the_files(capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors import safe_open

    code, out, _ = run_cli(capsys, "inspect", FIXTURES / "base", "--json")
    data = json.loads(out)
    names = set()
    for shard in (FIXTURES / "base").glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            names |= set(f.keys())
    assert code == 0 and data["kind"] == "checkpoint" and data["tensors"] == len(names)
    assert data["files"] == 2 and data["model_type"] == "llama"


def test_merge_keeps_layout_and_side_files(work: Path) -> None:
    lorasurgeon.merge(work / "base", [work / "adapter"], work / "out")
    base_files = sorted([p.name for p in (work / "base").iterdir()] + ["lorasurgeon.json"])
    assert sorted(p.name for p in (work / "out").iterdir()) == base_files
    for name in ("config.json", "generation_config.json", "model.safetensors.index.json"):
        assert (work / "out" / name).read_bytes() == (work / "base" / name).read_bytes()


def test_max_shard_size_reshards_with_an_index(work: Path) -> None:
    from safetensors.torch import load_file

    lorasurgeon.merge(work / "base", [work / "adapter"], work / "one", max_shard_size="10MB")
    lorasurgeon.merge(work / "base", [work / "adapter"], work / "many", max_shard_size="50KB")
    assert (work / "one" / "model.safetensors").exists()
    assert not (work / "one" / "model.safetensors.index.json").exists()
    index = json.loads((work / "many" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0].endswith(f"-of-{len(shards):05d}.safetensors")
    one = load_file(work / "one" / "model.safetensors")
    many = {k: v for s in shards for k, v in load_file(work / "many" / s).items()}
    assert one.keys() == many.keys() and all((one[k] == many[k]).all() for k in one)


def test_commands_that_need_no_math_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from lorasurgeon.cli import main\n"
        "for args in (['--help'], ['merge', '--help'], ['inspect', sys.argv[1]]):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(FIXTURES / "adapter")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


def _spec_options(command: str) -> set[str]:
    text = SPEC.read_text()
    section = text.split(f"## `lorasurgeon {command}")[1].split("\n## ")[0]
    head = section.split("\n- ")[0]
    return set(re.findall(r"`(--[a-z-]+)", head))


@pytest.mark.skipif(not SPEC.exists(), reason="shared/spec/cli.md is not beside the checkout")
@pytest.mark.parametrize("command", ["merge", "extract", "combine", "resize", "inspect", "batch"])
def test_help_offers_every_option_of_the_contract(command: str) -> None:
    params = cli.commands[command].params
    offered = {opt for p in params for opt in p.opts if opt.startswith("--")}
    assert _spec_options(command) <= offered, _spec_options(command) - offered


def test_readme_extract_runs_on_the_fixtures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "lora.json"
    code, _, err = run_cli(
        capsys, "extract", FIXTURES / "base", FIXTURES / "tuned", "-o", tmp_path / "lora",
        "--rank", "4", "--report", report,
    )  # fmt: skip
    assert code == 0, err
    assert "14 modules, rank 4" in err and "model.norm.weight" in err
    data = json.loads(report.read_text())
    assert len(data["modules"]) == 14 and data["worst_rel_error"] < 0.1


def test_console_script_runs_the_readme_merge(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lorasurgeon", "merge", FIXTURES / "base", FIXTURES / "adapter",
         "-o", tmp_path / "merged"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "14 tensors merged, 7 copied" in proc.stderr


# ---------------------------------------------------------------- combine and resize


def test_readme_combine_and_resize_run_on_the_fixtures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = FIXTURES / "adapter"
    code, _, err = run_cli(capsys, "extract", FIXTURES / "base", FIXTURES / "tuned", "-o",
                           tmp_path / "lora", "--rank", "4")  # fmt: skip
    assert code == 0, err
    code, _, err = run_cli(
        capsys, "combine", adapter, tmp_path / "lora", "--weight", "0.7", "--weight", "0.4",
        "--svd", "--rank", "8", "-o", tmp_path / "mixed", "--report", tmp_path / "mixed.json",
    )  # fmt: skip
    assert code == 0, err
    assert "svd of 2 adapters, 14 modules (14 shared), rank 8" in err
    mixed = json.loads((tmp_path / "mixed.json").read_text())
    assert 0 < mixed["worst_rel_error"] < 1  # ranks 8 + 4 kept at 8
    report = tmp_path / "small.json"
    code, _, err = run_cli(capsys, "resize", adapter, "-o", tmp_path / "small", "--rank", "4",
                           "--report", report)  # fmt: skip
    assert code == 0, err
    assert "14 modules, rank 4" in err
    data = json.loads(report.read_text())
    assert len(data["modules"]) == 14 and 0 < data["worst_rel_error"] < 1
    assert {"module", "shape", "rank", "alpha", "rel_error", "energy_kept"} <= data["modules"][
        0
    ].keys()


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["combine", "{a}", "{a}", "--weight", "1"], 2, "--weight"),
        (["combine", "{a}", "{a}", "--method", "ties"], 2, "--density"),
        (["combine", "{a}", "{a}", "--rank", "4"], 2, "--svd"),
        (["combine", "{a}", "{a}", "--method", "mean"], 2, "--method"),
        (["combine", "{a}", "{t}"], 1, "adapter_config.json"),
        (["resize", "{a}", "--max-rank", "4"], 2, "--max-rank"),
        (["resize", "{a}", "--rank-method", "energy"], 2, "--energy"),
        (["resize", "{t}", "--rank", "2"], 1, "adapter_config.json"),
    ],
)
def test_combine_and_resize_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], code: int, words: str
) -> None:
    paths = {"a": str(FIXTURES / "adapter"), "t": str(FIXTURES / "tuned")}
    filled = [a.format(**paths) for a in args] + ["-o", str(tmp_path / "out")]
    got, _, err = run_cli(capsys, *filled)
    assert got == code and words in err, err
    if code == 1:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []

"""Provenance: every output records the tool version, command, options and each input's files."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import lorasurgeon
from lorasurgeon import provenance
from lorasurgeon.cli import cli

from .test_cli import FIXTURES, _fill_hub_cache

BASE_FILES = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def record_of(out: Path) -> dict[str, Any]:
    record = provenance.read_provenance(out)
    assert record is not None, f"{out}: no provenance"
    return record


def files_of(record: dict[str, Any], role: str) -> dict[str, str]:
    [item] = [i for i in record["inputs"] if i["role"] == role]
    return {f["name"]: f["sha256"] for f in item["files"]}


@pytest.fixture
def work(tmp_path: Path) -> Path:
    for name in ("base", "tuned", "adapter"):
        shutil.copytree(FIXTURES / name, tmp_path / name)
    return tmp_path


def check_inputs(record: dict[str, Any], role: str, root: Path, names: list[str]) -> None:
    assert files_of(record, role) == {n: sha256(root / n) for n in names}
    [item] = [i for i in record["inputs"] if i["role"] == role]
    assert item["location"] == str(root)
    assert [f["size"] for f in item["files"]] == [(root / n).stat().st_size for n in names]


def check_outputs(record: dict[str, Any], out: Path) -> None:
    written = sorted(p.name for p in out.glob("*.safetensors"))
    assert sorted(f["name"] for f in record["outputs"]) == written
    for f in record["outputs"]:
        assert (
            f["sha256"] == sha256(out / f["name"]) and f["size"] == (out / f["name"]).stat().st_size
        )


def test_merge_records_version_options_with_defaults_inputs_and_outputs(work: Path) -> None:
    out = work / "out"
    lorasurgeon.merge(work / "base", [work / "adapter"], out, weights=[0.5])
    record = record_of(out)
    assert record["version"] == lorasurgeon.__version__ and record["command"] == "merge"
    assert record["options"] == {
        "weights": [0.5], "unmerge": False, "dtype": "auto", "max-shard-size": None,
        "fan-in-fan-out": None, "te-weights": None, "skip-text-encoder": False, "device": "auto",
    }  # fmt: skip
    check_inputs(record, "base", work / "base", BASE_FILES)
    check_inputs(record, "adapter", work / "adapter", ["adapter_model.safetensors"])
    check_outputs(record, out)


def test_extract_combine_resize_record_their_inputs(work: Path) -> None:
    lorasurgeon.extract(work / "base", work / "tuned", work / "x", rank=2, svd="exact")
    record = record_of(work / "x")
    assert record["command"] == "extract" and record["options"]["rank"] == 2
    assert record["options"]["rank-method"] == "fixed" and record["options"]["min-rank"] == 1
    check_inputs(record, "base", work / "base", BASE_FILES)
    check_inputs(record, "tuned", work / "tuned", BASE_FILES)
    check_outputs(record, work / "x")

    lorasurgeon.combine([work / "adapter", work / "x"], work / "c", method="cat")
    record = record_of(work / "c")
    assert record["command"] == "combine" and record["options"]["method"] == "cat"
    assert [i["location"] for i in record["inputs"]] == [str(work / "adapter"), str(work / "x")]
    check_outputs(record, work / "c")

    lorasurgeon.resize(work / "adapter", work / "r", rank=2)
    record = record_of(work / "r")
    assert record["command"] == "resize" and record["options"]["rank"] == 2
    check_inputs(record, "adapter", work / "adapter", ["adapter_model.safetensors"])
    check_outputs(record, work / "r")


def tamper(path: Path) -> None:
    """Change one byte of tensor data (the file stays a valid checkpoint, same size)."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_tampering_with_an_input_changes_its_recorded_hash(work: Path) -> None:
    lorasurgeon.resize(work / "adapter", work / "before", rank=2)
    tamper(work / "adapter" / "adapter_model.safetensors")
    lorasurgeon.resize(work / "adapter", work / "after", rank=2)
    before = files_of(record_of(work / "before"), "adapter")
    after = files_of(record_of(work / "after"), "adapter")
    assert before != after
    assert after["adapter_model.safetensors"] == sha256(work / "adapter/adapter_model.safetensors")


def test_single_file_output_holds_its_provenance_in_the_metadata(work: Path) -> None:
    from safetensors import safe_open

    single = work / "one.safetensors"
    lorasurgeon.merge(work / "base", [work / "adapter"], work / "merged", max_shard_size="1GB")
    shutil.copyfile(work / "merged" / "model.safetensors", single)
    out = work / "out.safetensors"
    lorasurgeon.merge(single, [work / "adapter"], out, fan_in_fan_out="none")
    with safe_open(out, "pt") as f:
        text = f.metadata()["lorasurgeon"]
    record = json.loads(text)
    assert record == record_of(out)
    assert record["outputs"] is None  # a file cannot hold its own hash
    assert files_of(record, "base") == {"one.safetensors": sha256(single)}


def test_hub_inputs_record_repo_resolved_commit_and_blob_hashes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants as constants

    hub = tmp_path / "hf" / "hub"
    _fill_hub_cache(hub, "acme/tiny-base", FIXTURES / "base", "a" * 40)
    _fill_hub_cache(hub, "acme/tiny-lora", FIXTURES / "adapter", "b" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    out = tmp_path / "out"
    lorasurgeon.merge("acme/tiny-base", ["acme/tiny-lora@" + "b" * 40], out)
    record = record_of(out)
    base, adapter = record["inputs"]
    assert (base["repo_id"], base["revision"], base["location"]) == (
        "acme/tiny-base", "a" * 40, "acme/tiny-base")  # fmt: skip
    assert (adapter["repo_id"], adapter["revision"]) == ("acme/tiny-lora", "b" * 40)
    assert files_of(record, "base") == {n: sha256(FIXTURES / "base" / n) for n in BASE_FILES}
    cache = Path(os.environ["XDG_CACHE_HOME"]) / "lorasurgeon" / "sha256.json"
    cached = json.loads(cache.read_text()).values() if cache.exists() else []
    assert sha256(FIXTURES / "adapter/adapter_model.safetensors") not in cached  # not hashed


def test_hash_cache_is_used_and_a_corrupt_one_ignored(work: Path) -> None:
    path = work / "adapter" / "adapter_model.safetensors"
    cache = Path(os.environ["XDG_CACHE_HOME"]) / "lorasurgeon" / "sha256.json"
    assert provenance.file_sha256(path) == sha256(path)
    entries = json.loads(cache.read_text())
    assert sha256(path) in entries.values()
    cache.write_text("{not json")
    assert provenance.file_sha256(path) == sha256(path)
    assert sha256(path) in json.loads(cache.read_text()).values()  # rewritten


def test_inspect_shows_the_provenance(work: Path) -> None:
    lorasurgeon.resize(work / "adapter", work / "r", rank=2)
    result = CliRunner().invoke(cli, ["inspect", str(work / "r")])
    assert result.exit_code == 0, result.output
    digest = sha256(work / "adapter/adapter_model.safetensors")
    assert "resize" in result.output and digest in result.output
    result = CliRunner().invoke(cli, ["inspect", "--json", str(work / "r")])
    assert json.loads(result.output)["provenance"] == record_of(work / "r")


def test_the_writer_hashes_shards_written_out_of_order(tmp_path: Path) -> None:
    import torch

    from lorasurgeon.writer import CheckpointWriter, OutputLayout, OutputShard, OutputTensor

    tensors = {f"t{i}": torch.arange(i * 1000, dtype=torch.float32) for i in range(1, 6)}
    planned = tuple(OutputTensor(k, "F32", tuple(v.shape)) for k, v in tensors.items())
    layout = OutputLayout((OutputShard("model.safetensors", {"format": "pt"}, planned),))
    out = tmp_path / "out"
    with CheckpointWriter(out, layout, hash_shards=True) as writer:
        for name in ["t3", "t5", "t1", "t4"]:
            writer.write(name, tensors[name].numpy().tobytes())
            assert writer.shard_sha256(0) is None  # t2 not written: no hash yet
        writer.write("t2", tensors["t2"].numpy().tobytes())
        digest = writer.shard_sha256(0)
        writer.commit()
    assert digest == sha256(out / "model.safetensors")

"""The streaming safetensors writer (``lorasurgeon.writer``): sizes, shard packing, output that
the safetensors library reads back, atomic commit and the output-path rules."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from safetensors import safe_open
from safetensors.torch import save_file

from lorasurgeon.errors import OutputError
from lorasurgeon.writer import (
    SHARD_NAME_FORMAT,
    CheckpointWriter,
    OutputLayout,
    OutputShard,
    OutputTensor,
    check_output_path,
    parse_size,
    reshard,
)

PROPERTY = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

CODES = {
    torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Helpers


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def sample_tensors() -> dict[str, torch.Tensor]:
    """One tensor per dtype, with values that survive only an exact byte copy."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, generator=g) * 7
    return {
        "model.f32": base,
        "model.bf16": base.to(torch.bfloat16),
        "model.f16": base.to(torch.float16),
        "model.f64": base.double() / 3,
        "model.i64": torch.tensor([-(2**62), 5, 2**40]),
        "model.i32": torch.arange(-3, 4, dtype=torch.int32),
        "model.i8": torch.tensor([[-128, 0, 127]], dtype=torch.int8),
        "model.u8": torch.arange(0, 255, 17, dtype=torch.uint8),
        "model.bool": torch.tensor([True, False, True]),
        "model.fp8": base[0].to(torch.float8_e4m3fn),
        "model.scalar": torch.tensor(2.5),
        "model.empty": torch.zeros(0, 4),
    }


def planned(tensors: dict[str, torch.Tensor]) -> tuple[OutputTensor, ...]:
    return tuple(OutputTensor(n, CODES[t.dtype], tuple(t.shape)) for n, t in tensors.items())


def one_shard(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> OutputLayout:
    return OutputLayout((OutputShard("model.safetensors", metadata, planned(tensors)),))


def leftovers(directory: Path, name: str) -> list[str]:
    """Temporary siblings the writer may leave: ``.<name>.partial-*`` and ``.<name>.old-*``."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(f".{name}."))


def read_back(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118


def assert_same_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        assert raw_bytes(got[name]) == raw_bytes(tensor), name


def header_of(path: Path) -> tuple[int, dict]:
    blob = path.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    return length, json.loads(blob[8 : 8 + length])


def tree(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


# ---------------------------------------------------------------------------------------------
# parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5GB", 5 * 10**9),
        ("5gb", 5 * 10**9),
        (" 5 GB ", 5 * 10**9),
        ("2GiB", 2 * 2**30),
        ("500MB", 500 * 10**6),
        ("1.5GB", 1_500_000_000),
        ("40KB", 40_000),
        ("3KiB", 3 * 1024),
        ("7MiB", 7 * 2**20),
        ("1TB", 10**12),
        ("10B", 10),
        ("123", 123),
        (123, 123),
        (5 * 10**9, 5 * 10**9),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "GB", "abc", "5XB", "5 G", "-1GB", "0", "0.5", "0MB", "1.2.3GB", "inf", "nan", "1e400"]
    + [pytest.param(0, id="int_zero"), pytest.param(-1, id="int_negative")],
)
def test_parse_size_refuses_non_sizes(text: str | int) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


# ---------------------------------------------------------------------------------------------
# reshard


def _t(name: str, nbytes: int) -> OutputTensor:
    return OutputTensor(name, "U8", (nbytes,))


@pytest.mark.parametrize(
    ("sizes", "max_size", "groups"),
    [
        ([4, 4, 4], 12, [["t0", "t1", "t2"]]),
        ([4, 4, 4], 8, [["t0", "t1"], ["t2"]]),
        ([4, 4, 4], 4, [["t0"], ["t1"], ["t2"]]),
        ([4, 4, 4], 3, [["t0"], ["t1"], ["t2"]]),  # oversized tensors get a shard each
        ([10, 2, 2], 8, [["t0"], ["t1", "t2"]]),
        ([2, 10, 2], 8, [["t0"], ["t1"], ["t2"]]),
        ([2, 2, 10, 1], 4, [["t0", "t1"], ["t2"], ["t3"]]),
        ([0, 8, 0, 0], 8, [["t0", "t1", "t2", "t3"]]),
        ([], 8, [[]]),
    ],
)
def test_reshard_packs_in_order(sizes: list[int], max_size: int, groups: list[list[str]]) -> None:
    tensors = [_t(f"t{i}", n) for i, n in enumerate(sizes)]
    shards = reshard(tensors, max_size, stem="model", metadata={"format": "pt"})
    assert [[t.name for t in s.tensors] for s in shards] == groups
    assert all(s.metadata == {"format": "pt"} for s in shards)
    if len(groups) == 1:
        assert [s.filename for s in shards] == ["model.safetensors"]
    else:
        n = len(groups)
        assert [s.filename for s in shards] == [
            f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)
        ]


def test_shard_name_format_is_transformers_style() -> None:
    name = SHARD_NAME_FORMAT.format(stem="diffusion_pytorch_model", index=2, count=11)
    assert name == "diffusion_pytorch_model-00002-of-00011.safetensors"


@PROPERTY
@given(sizes=st.lists(st.integers(0, 50), max_size=20), max_size=st.integers(1, 60))
def test_reshard_is_greedy_and_keeps_order(sizes: list[int], max_size: int) -> None:
    tensors = [_t(f"t{i}", n) for i, n in enumerate(sizes)]
    shards = reshard(tensors, max_size, stem="m", metadata=None)
    assert [t for s in shards for t in s.tensors] == tensors
    for shard in shards:
        assert shard.data_size <= max_size or len(shard.tensors) == 1
    for shard, following in zip(shards, shards[1:], strict=False):
        assert shard.data_size + following.tensors[0].nbytes > max_size  # it did not fit
    assert len({s.filename for s in shards}) == len(shards)


# ---------------------------------------------------------------------------------------------
# CheckpointWriter: what it writes


def test_written_tensors_read_back_with_safetensors(tmp_path: Path) -> None:
    tensors = sample_tensors()
    out = tmp_path / "out"
    with CheckpointWriter(out, one_shard(tensors, {"format": "pt"})) as writer:
        for name, tensor in reversed(tensors.items()):  # any order
            writer.write(name, raw_bytes(tensor))
        writer.commit()
    assert_same_tensors(read_back(out / "model.safetensors"), tensors)
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    length, header = header_of(out / "model.safetensors")
    assert length % 8 == 0
    # planned order is data order, packed without gaps
    offsets = [header[name]["data_offsets"] for name in tensors]
    assert offsets[0][0] == 0
    assert all(a[1] == b[0] for a, b in zip(offsets, offsets[1:], strict=False))
    assert (out / "model.safetensors").stat().st_size == 8 + length + offsets[-1][1]
    assert leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("names", [["a"], ["a", "bb"], ["a", "bb", "ccc"], ["x" * 13]])
def test_headers_are_padded_to_8_bytes(tmp_path: Path, names: list[str]) -> None:
    tensors = {name: torch.ones(1, dtype=torch.uint8) for name in names}
    out = tmp_path / "out"
    with CheckpointWriter(out, one_shard(tensors)) as writer:
        for name, tensor in tensors.items():
            writer.write(name, raw_bytes(tensor))
        writer.commit()
    length, _ = header_of(out / "model.safetensors")
    assert length % 8 == 0
    assert_same_tensors(read_back(out / "model.safetensors"), tensors)


@pytest.mark.parametrize("kernel_copy", [True, False], ids=["copy_file_range", "pread_fallback"])
def test_copy_from_open_input_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel_copy: bool
) -> None:
    tensors = sample_tensors()
    source = tmp_path / "in.safetensors"
    save_file(tensors, source)
    length, header = header_of(source)
    if not kernel_copy:

        def unsupported(*args: object) -> int:
            raise OSError(95, "Operation not supported")

        monkeypatch.setattr(os, "copy_file_range", unsupported)
    out = tmp_path / "out"
    fd = os.open(source, os.O_RDONLY)
    try:
        with CheckpointWriter(out, one_shard(tensors)) as writer:
            for name in tensors:
                begin, end = header[name]["data_offsets"]
                writer.copy(name, fd, 8 + length + begin, end - begin)
            writer.commit()
    finally:
        os.close(fd)
    assert_same_tensors(read_back(out / "model.safetensors"), tensors)


def test_sharded_layout_writes_index(tmp_path: Path) -> None:
    tensors = sample_tensors()
    shards = reshard(planned(tensors), 64, stem="model", metadata={"format": "pt"})
    assert len(shards) > 1
    layout = OutputLayout(
        shards, "model.safetensors.index.json", {"metadata": {"origin": "test"}, "extra": 1}
    )
    out = tmp_path / "out"
    with CheckpointWriter(out, layout) as writer:
        for name, tensor in tensors.items():
            writer.write(name, raw_bytes(tensor))
        writer.commit()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["extra"] == 1
    assert index["metadata"] == {
        "origin": "test",
        "total_size": sum(t.element_size() * t.numel() for t in tensors.values()),
    }
    assert index["weight_map"] == {t.name: s.filename for s in shards for t in s.tensors}
    got: dict[str, torch.Tensor] = {}
    for shard in shards:
        assert header_of(out / shard.filename)[0] % 8 == 0
        got.update(read_back(out / shard.filename))
    assert_same_tensors(got, tensors)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [s.filename for s in shards] + ["model.safetensors.index.json"]
    )


def test_no_index_without_planned_index(tmp_path: Path) -> None:
    tensors = {"a": torch.ones(2)}
    out = tmp_path / "out"
    with CheckpointWriter(out, one_shard(tensors)) as writer:
        writer.write("a", raw_bytes(tensors["a"]))
        writer.commit()
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]


def test_single_file_layout_writes_the_file_itself(tmp_path: Path) -> None:
    tensors = {"a": torch.arange(4.0), "b": torch.ones(2, dtype=torch.bfloat16)}
    layout = OutputLayout(
        (OutputShard("merged.safetensors", None, planned(tensors)),), single_file=True
    )
    out = tmp_path / "merged.safetensors"
    with CheckpointWriter(out, layout) as writer:
        for name, tensor in tensors.items():
            writer.write(name, raw_bytes(tensor))
        writer.commit()
    assert out.is_file()
    assert_same_tensors(read_back(out), tensors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.safetensors"]


def test_side_files_and_text_are_added(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text('{"model_type": "llama"}')
    out = tmp_path / "out"
    with CheckpointWriter(out, one_shard({"a": torch.ones(1)})) as writer:
        writer.write("a", raw_bytes(torch.ones(1)))
        writer.add_file("config.json", config)
        writer.add_file("tokenizer/vocab.txt", config)
        writer.add_text("README.md", "merged\n")
        writer.commit()
    assert (out / "config.json").read_bytes() == config.read_bytes()
    assert (out / "tokenizer" / "vocab.txt").read_bytes() == config.read_bytes()
    assert (out / "README.md").read_text() == "merged\n"


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("nope", bytes(4)),  # not planned
        ("a", bytes(3)),  # wrong size
        ("a", bytes(5)),
    ],
)
def test_write_refuses_what_was_not_planned(tmp_path: Path, name: str, data: bytes) -> None:
    with CheckpointWriter(tmp_path / "out", one_shard({"a": torch.ones(1)})) as writer:
        with pytest.raises(OutputError) as e:
            writer.write(name, data)
    assert e.value.tensor == name
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path, "out") == []


def test_writing_a_tensor_twice_is_refused(tmp_path: Path) -> None:
    with CheckpointWriter(tmp_path / "out", one_shard({"a": torch.ones(1)})) as writer:
        writer.write("a", bytes(4))
        with pytest.raises(OutputError) as e:
            writer.write("a", bytes(4))
        with pytest.raises(OutputError):
            writer.copy("a", 0, 0, 4)
    assert e.value.tensor == "a"


# ---------------------------------------------------------------------------------------------
# CheckpointWriter: atomicity


def test_missing_tensor_at_commit_raises_and_leaves_nothing(tmp_path: Path) -> None:
    tensors = {"a": torch.ones(2), "b": torch.zeros(3)}
    out = tmp_path / "out"
    with pytest.raises(OutputError) as e:
        with CheckpointWriter(out, one_shard(tensors)) as writer:
            writer.write("a", raw_bytes(tensors["a"]))
            writer.commit()
    assert e.value.tensor == "b"
    assert e.value.path == str(out)  # errors name the file (STYLE.md, Errors)
    assert not out.exists()
    assert leftovers(tmp_path, "out") == []


class Boom(Exception):
    pass


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt, SystemExit])
@pytest.mark.parametrize("written", [0, 1, 2])
def test_exception_inside_with_leaves_neither_output_nor_partial(
    tmp_path: Path, error: type[BaseException], written: int
) -> None:
    tensors = {"a": torch.ones(2), "b": torch.zeros(3), "c": torch.arange(4.0)}
    out = tmp_path / "out"
    with pytest.raises(error):
        with CheckpointWriter(out, one_shard(tensors)) as writer:
            assert any(p.name.startswith(".out.partial-") for p in tmp_path.iterdir())
            for name in list(tensors)[:written]:
                writer.write(name, raw_bytes(tensors[name]))
            raise error()
    assert not out.exists()
    assert leftovers(tmp_path, "out") == []
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_existing_output_after_success(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"old")
    (out / "stale.json").write_text("{}")
    tensors = {"a": torch.ones(2)}
    with CheckpointWriter(out, one_shard(tensors), overwrite=True) as writer:
        writer.write("a", raw_bytes(tensors["a"]))
        assert (out / "stale.json").exists()  # untouched until commit
        writer.commit()
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert_same_tensors(read_back(out / "model.safetensors"), tensors)
    assert leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_failed_overwrite_keeps_existing_output(tmp_path: Path, error: type[BaseException]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"old")
    (out / "config.json").write_text("{}")
    before = tree(out)
    with pytest.raises(error):
        with CheckpointWriter(out, one_shard({"a": torch.ones(2)}), overwrite=True) as writer:
            writer.write("a", raw_bytes(torch.ones(2)))
            raise error()
    assert tree(out) == before
    assert leftovers(tmp_path, "out") == []


def test_failed_commit_keeps_existing_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"old")
    before = tree(out)
    with pytest.raises(OutputError):
        with CheckpointWriter(out, one_shard({"a": torch.ones(2)}), overwrite=True) as writer:
            writer.commit()  # "a" never written
    assert tree(out) == before
    assert leftovers(tmp_path, "out") == []


def test_overwrite_of_single_file_output(tmp_path: Path) -> None:
    out = tmp_path / "merged.safetensors"
    out.write_bytes(b"old")
    tensors = {"a": torch.ones(2)}
    layout = OutputLayout((OutputShard(out.name, None, planned(tensors)),), single_file=True)
    with CheckpointWriter(out, layout, overwrite=True) as writer:
        writer.write("a", raw_bytes(tensors["a"]))
        writer.commit()
    assert_same_tensors(read_back(out), tensors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.safetensors"]


def test_commit_without_overwrite_does_not_replace_output_created_meanwhile(
    tmp_path: Path,
) -> None:
    """The output appeared after check_output_path (another run, a user): without overwrite the
    writer must not move it aside and delete it."""
    out = tmp_path / "out"
    with CheckpointWriter(out, one_shard({"a": torch.ones(2)}), overwrite=False) as writer:
        writer.write("a", raw_bytes(torch.ones(2)))
        out.mkdir()
        (out / "precious.txt").write_text("keep me")
        with pytest.raises(OutputError):
            writer.commit()
    assert (out / "precious.txt").read_text() == "keep me"


def test_unwritable_parent_raises_output_error(tmp_path: Path) -> None:
    out = tmp_path / "missing" / "out"
    with pytest.raises(OutputError):
        with CheckpointWriter(out, one_shard({"a": torch.ones(1)})):
            pass
    assert not (tmp_path / "missing").exists()


# ---------------------------------------------------------------------------------------------
# check_output_path


@pytest.mark.parametrize(
    ("out", "inputs", "overwrite", "existing", "refused"),
    [
        ("out", ["base", "adapter"], False, [], False),
        ("out", ["base"], False, ["out"], True),  # exists, no overwrite
        ("out", ["base"], True, ["out"], False),  # exists, overwrite
        ("base", ["base"], False, [], True),  # the input itself
        ("base", ["base"], True, [], True),
        ("base/merged", ["base"], False, [], True),  # inside an input
        ("adapter/sub/merged", ["base", "adapter"], False, ["adapter/sub"], True),
        ("base/model.safetensors", ["base/model.safetensors"], True, [], True),
        ("work", ["work/base"], True, ["work"], True),  # overwrite would delete an input
        ("merged.safetensors", ["base/model.safetensors"], False, [], False),
        ("base2", ["base"], False, [], False),  # a prefix of the name is not "inside"
        ("missing_parent/out", ["base"], False, [], True),
    ],
)
def test_check_output_path(
    tmp_path: Path,
    out: str,
    inputs: list[str],
    overwrite: bool,
    existing: list[str],
    refused: bool,
) -> None:
    for name in [*inputs, *existing]:
        path = tmp_path / name
        if name.endswith(".safetensors"):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
        else:
            path.mkdir(parents=True, exist_ok=True)
    if refused:
        with pytest.raises(OutputError) as e:
            check_output_path(tmp_path / out, [tmp_path / i for i in inputs], overwrite=overwrite)
        assert e.value.path == str(tmp_path / out)
    else:
        check_output_path(tmp_path / out, [tmp_path / i for i in inputs], overwrite=overwrite)


def test_check_output_path_sees_through_symlinks(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "base")
    with pytest.raises(OutputError):
        check_output_path(tmp_path / "link", [tmp_path / "base"], overwrite=True)
    with pytest.raises(OutputError):
        check_output_path(tmp_path / "link" / "merged", [tmp_path / "base"], overwrite=False)

"""The one dtype table: every safetensors dtype is read and copied; computing on one that torch
cannot decode is refused naming the tensor."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import lorasurgeon
from lorasurgeon.dtypes import COMPUTE_DTYPES, DTYPES, DType, tensor_nbytes, torch_dtype
from lorasurgeon.errors import CheckpointError
from lorasurgeon.reader import open_checkpoint, read_header

REPO = Path(__file__).resolve().parents[1]
SHARD2 = "model-00002-of-00002.safetensors"


def write_raw(path: Path, tensors: list[tuple[str, str, list[int], bytes]]) -> Path:
    """A safetensors file from raw (name, dtype code, shape, data) entries, by hand."""
    header: dict[str, object] = {}
    offset = 0
    for name, code, shape, data in tensors:
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(t[3] for t in tensors))
    return path


def append_raw(path: Path, tensors: list[tuple[str, str, list[int], bytes]]) -> None:
    """Add raw tensors at the end of an existing safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    for name, code, shape, payload in tensors:
        header[name] = {"dtype": code, "shape": shape,
                        "data_offsets": [len(data), len(data) + len(payload)]}  # fmt: skip
        data += payload
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def _payload(code: str, numel: int, seed: int = 1) -> bytes:
    """Arbitrary bytes; small finite values for the dtypes merge converts."""
    if code in COMPUTE_DTYPES:
        values = (torch.arange(numel, dtype=torch.float64) + seed) / 10
        return values.to(torch_dtype(code)).numpy().tobytes() if code != "BF16" else (
            values.to(torch.bfloat16).view(torch.int16).numpy().tobytes())  # fmt: skip
    size = tensor_nbytes(code, numel)
    assert size is not None
    return bytes((seed * 37 + 11 * i) % 251 for i in range(size))


# Shape (8,) is a whole number of bytes for every dtype, sub-byte ones included.
EVERY_DTYPE = [(f"t.{code}", code, [2, 4], _payload(code, 8)) for code in DTYPES]


def test_table_sizes_agree_with_the_safetensors_library(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "all.safetensors", EVERY_DTYPE)
    with safe_open(path, framework="np") as f:  # the Rust core validates codes and byte sizes
        assert sorted(f.keys()) == sorted(name for name, *_ in EVERY_DTYPE)
    infos = {t.name: t for t in read_header(path).tensors}
    for name, code, shape, data in EVERY_DTYPE:
        assert infos[name].dtype == code and infos[name].nbytes == len(data)
        assert len(data) * 8 == math.prod(shape) * DTYPES[code].bits


@pytest.mark.parametrize(("code", "numel", "expected"), [
    ("F4", 4, 2), ("F4", 3, None), ("F6_E2M3", 4, 3), ("F6_E3M2", 5, None),
    ("F8_E8M0", 3, 3), ("C64", 2, 16), ("BF16", 3, 6), ("BOOL", 5, 5), ("U64", 1, 8),
])  # fmt: skip
def test_tensor_nbytes_is_numel_times_bits_over_8(
    code: str, numel: int, expected: int | None
) -> None:
    assert tensor_nbytes(code, numel) == expected


def test_sub_byte_tensor_that_is_not_whole_bytes_is_refused(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "odd.safetensors", [("w", "F4", [3], b"\x00\x00")])
    with pytest.raises(CheckpointError, match="not a whole number of bytes") as e:
        read_header(path)
    assert e.value.tensor == "w"


def test_compute_dtypes_and_choices_come_from_the_table() -> None:
    assert COMPUTE_DTYPES <= set(DTYPES)
    assert {d.code for d in DType if d is not DType.AUTO} == COMPUTE_DTYPES - {"F64"}
    for code in COMPUTE_DTYPES:
        assert str(torch_dtype(code)).removeprefix("torch.") == DTYPES[code].torch_name


def test_computing_on_a_dtype_torch_cannot_decode_names_the_tensor(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "f4.safetensors", [("blocks", "F4", [4], b"\x12\x34")])
    with open_checkpoint(path) as c, pytest.raises(CheckpointError) as e:
        c.load("blocks")
    assert (e.value.tensor, Path(e.value.path or "")) == ("blocks", path)
    assert "F4" in str(e.value)


@pytest.fixture
def exotic_base(tmp_path: Path) -> Path:
    """The shipped base with a tensor of every safetensors dtype added to its second shard."""
    base = tmp_path / "base"
    shutil.copytree(REPO / "fixtures" / "base", base)
    append_raw(base / SHARD2, EVERY_DTYPE)
    index = base / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"].update({name: SHARD2 for name, *_ in EVERY_DTYPE})
    index.write_text(json.dumps(data))
    return base


def test_merge_copies_tensors_of_every_dtype_byte_for_byte(
    exotic_base: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    lorasurgeon.merge(exotic_base, [REPO / "fixtures" / "adapter"], out, device="cpu")
    infos = {t.name: t for t in read_header(out / SHARD2).tensors}
    raw = (out / SHARD2).read_bytes()
    for name, code, shape, data in EVERY_DTYPE:
        info = infos[name]
        assert (info.dtype, list(info.shape)) == (code, shape)
        assert raw[info.offset : info.offset + info.nbytes] == data


def test_merge_with_dtype_converts_only_float_tensors(exotic_base: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    lorasurgeon.merge(exotic_base, [REPO / "fixtures" / "adapter"], out, dtype="bfloat16",
                      device="cpu")  # fmt: skip
    infos = {t.name: t for t in read_header(out / SHARD2).tensors}
    for name, code, _, _ in EVERY_DTYPE:
        assert infos[name].dtype == ("BF16" if code in COMPUTE_DTYPES else code)


def test_extract_leaves_exotic_tensors_and_reports_an_unmeasurable_change(
    exotic_base: Path, tmp_path: Path
) -> None:
    tuned = tmp_path / "tuned"
    lorasurgeon.merge(REPO / "fixtures" / "base", [REPO / "fixtures" / "adapter"], tuned,
                      device="cpu")  # fmt: skip
    changed = [(n, c, s, _payload(c, 8, seed=2) if c == "F4" else d) for n, c, s, d in EVERY_DTYPE]
    append_raw(tuned / SHARD2, changed)
    index = tuned / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"].update({name: SHARD2 for name, *_ in EVERY_DTYPE})
    index.write_text(json.dumps(data))
    report = lorasurgeon.extract(exotic_base, tuned, tmp_path / "lora", rank=4, device="cpu")
    rows = {row["tensor"]: row["share"] for row in report.not_in_adapter}
    assert rows == {"t.F4": None}
    assert any("t.F4" in note for note in report.notes)

"""Reading safetensors checkpoints by header (``lorasurgeon.reader``), checked against the
safetensors library's own reader, and every way a file or index can be malformed.

Contract under test: opening never raises anything but ``CheckpointError`` (malformed input)
or ``LocationError`` (nothing there), and every ``CheckpointError`` names the file at fault and,
where one tensor is at fault, that tensor.
"""

from __future__ import annotations

import json
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from safetensors import safe_open
from safetensors.torch import save_file

from lorasurgeon.dtypes import DTYPES
from lorasurgeon.errors import CheckpointError, LocationError
from lorasurgeon.reader import (
    find_checkpoint_file,
    open_checkpoint,
    read_header,
    side_files,
)

PROPERTY = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

TORCH_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Helpers


def raw_bytes(t: torch.Tensor) -> bytes:
    """A tensor's bytes as stored (row-major, little-endian)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def tensor_from_bytes(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if not data:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if dtype == torch.bool:  # any nonzero byte would be an invalid bool: keep 0/1
        flat = flat & 1
    return flat.view(dtype).reshape(shape).clone()


def write_raw(
    path: Path, header: dict | bytes, data: bytes = b"", *, length: int | None = None
) -> Path:
    path.write_bytes(safetensors_bytes(header, data, length=length))
    return path


def entry(dtype: object = "F32", shape: object = (2,), offsets: object = (0, 8)) -> dict:
    def listed(v: object) -> object:
        return list(v) if isinstance(v, tuple) else v

    return {"dtype": dtype, "shape": listed(shape), "data_offsets": listed(offsets)}


def parsed_header(path: Path) -> tuple[dict, int]:
    """The raw header JSON and where the data starts, read independently of lorasurgeon."""
    blob = path.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + length]), 8 + length


def write_sharded(directory: Path, shards: dict[str, dict[str, torch.Tensor]]) -> Path:
    """Shards plus a transformers-style index mapping every tensor to its shard."""
    directory.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for filename, tensors in shards.items():
        save_file(tensors, directory / filename, metadata={"format": "pt"})
        weight_map.update({name: filename for name in tensors})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


def assert_opens_or_refuses(path: Path) -> None:
    """Opening either succeeds with a self-consistent index or raises CheckpointError."""
    try:
        with open_checkpoint(path) as checkpoint:
            size = path.stat().st_size
            spans = sorted((i.offset, i.offset + i.nbytes) for i in checkpoint if i.nbytes)
            for info in checkpoint:
                assert info.nbytes * 8 == info.numel * DTYPES[info.dtype].bits
                assert 8 <= info.offset and info.offset + info.nbytes <= size
            for (_, end), (begin, _) in zip(spans, spans[1:], strict=False):
                assert end <= begin, "accepted overlapping tensors"
    except CheckpointError as e:
        assert e.path is not None


# ---------------------------------------------------------------------------------------------
# Valid files agree with the safetensors library


@st.composite
def tensor_dicts(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    names = draw(
        st.lists(
            st.text(st.sampled_from("abc.xyz_0123é"), min_size=1, max_size=12),
            min_size=1,
            max_size=6,
            unique=True,
        )
    )
    tensors = {}
    for name in names:
        dtype = TORCH_DTYPES[draw(st.sampled_from(sorted(TORCH_DTYPES)))]
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        numel = 1
        for d in shape:
            numel *= d
        size = numel * torch.empty((), dtype=dtype).element_size()
        tensors[name] = tensor_from_bytes(
            draw(st.binary(min_size=size, max_size=size)), dtype, shape
        )
    return tensors


@PROPERTY
@given(
    tensors=tensor_dicts(),
    metadata=st.none() | st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
)
def test_read_header_agrees_with_safetensors(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        save_file(tensors, path, metadata=metadata)
        header = read_header(path)
        raw, data_start = parsed_header(path)
        blob = path.read_bytes()
        assert header.size == len(blob)
        assert header.metadata == raw.get("__metadata__")
        assert {i.name for i in header.tensors} == set(tensors)
        assert [i.offset for i in header.tensors] == sorted(i.offset for i in header.tensors)
        with safe_open(path, "pt") as f:
            for info in header.tensors:
                assert info.path == path
                assert info.dtype == f.get_slice(info.name).get_dtype()
                assert list(info.shape) == f.get_slice(info.name).get_shape()
                assert info.offset == data_start + raw[info.name]["data_offsets"][0]
                stored = f.get_tensor(info.name)
                assert blob[info.offset : info.offset + info.nbytes] == raw_bytes(stored)
                assert raw_bytes(stored) == raw_bytes(tensors[info.name])


@PROPERTY
@given(tensors=tensor_dicts())
def test_checkpoint_load_equals_safe_open_get_tensor(tensors: dict[str, torch.Tensor]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        save_file(tensors, path)
        with open_checkpoint(path) as checkpoint, safe_open(path, "pt") as f:
            assert set(checkpoint.tensors) == set(tensors)
            for name in tensors:
                ours, theirs = checkpoint.load(name), f.get_tensor(name)
                assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
                assert raw_bytes(ours) == raw_bytes(theirs)
                assert raw_bytes(checkpoint.load(checkpoint.info(name))) == raw_bytes(theirs)


def test_open_sharded_directory_with_index(tmp_path: Path) -> None:
    shards = {
        "model-00001-of-00002.safetensors": {
            "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
            "b": torch.tensor([1, 2], dtype=torch.int64),
        },
        "model-00002-of-00002.safetensors": {"c": torch.ones(4, dtype=torch.bfloat16)},
    }
    directory = write_sharded(tmp_path / "base", shards)
    (directory / "config.json").write_text("{}")
    with open_checkpoint(directory) as checkpoint:
        assert checkpoint.path == directory
        assert checkpoint.index_path == directory / "model.safetensors.index.json"
        assert checkpoint.index is not None and "weight_map" in checkpoint.index
        assert [s.path.name for s in checkpoint.shards] == list(shards)
        assert set(checkpoint.tensors) == {"a", "b", "c"}
        for filename, tensors in shards.items():
            for name, tensor in tensors.items():
                assert checkpoint.info(name).path == directory / filename
                assert raw_bytes(checkpoint.load(name)) == raw_bytes(tensor)
                assert checkpoint.load(name).dtype == tensor.dtype


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (["model.safetensors", "config.json"], "model.safetensors"),
        (["diffusion_pytorch_model.safetensors"], "diffusion_pytorch_model.safetensors"),
        (["adapter_model.safetensors"], "adapter_model.safetensors"),  # the only one
        (["model.safetensors", "other.safetensors"], "model.safetensors"),
        (["model.safetensors", "pytorch_model.bin"], "model.safetensors"),
    ],
)
def test_find_checkpoint_file(tmp_path: Path, files: list[str], expected: str) -> None:
    for name in files:
        if name.endswith(".safetensors"):
            save_file({"x": torch.zeros(1)}, tmp_path / name)
        else:
            (tmp_path / name).write_bytes(b"{}")
    assert find_checkpoint_file(tmp_path) == tmp_path / expected
    with open_checkpoint(tmp_path) as checkpoint:
        assert checkpoint.shards[0].path == tmp_path / expected


def test_load_of_unknown_tensor_names_it(tmp_path: Path) -> None:
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    with open_checkpoint(tmp_path) as checkpoint, pytest.raises(CheckpointError) as e:
        checkpoint.load("nope")
    assert e.value.tensor == "nope" and e.value.path is not None


# ---------------------------------------------------------------------------------------------
# Malformed files: always CheckpointError, naming the file and (where relevant) the tensor


def safetensors_bytes(
    header: dict | bytes, data: bytes = b"", *, length: int | None = None
) -> bytes:
    """An 8-byte little-endian header length, the header, then ``data``."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _one(e: dict, data: bytes = bytes(8)) -> bytes:
    return safetensors_bytes({"x": e}, data)


def _two(a: dict, b: dict, data: bytes) -> bytes:
    return safetensors_bytes({"a": a, "b": b}, data)


HUGE_INT = b"1" * 5000
# (id, file content, the tensor the error must name: a name, one of a set, or None)
MALFORMED_FILES: list[tuple[str, bytes, str | set[str] | None]] = [
    ("empty", b"", None),
    ("shorter_than_8_bytes", b"\x02\x00\x00", None),
    ("header_length_past_eof", safetensors_bytes(b"{}", length=1000), None),
    ("header_length_2**63", safetensors_bytes(b"{}", length=2**63), None),
    ("non_json_header", safetensors_bytes(b"{not json"), None),
    ("non_utf8_header", safetensors_bytes(b'{"\xff\xfe": 1}'), None),
    ("header_is_a_list", safetensors_bytes(b"[1, 2]"), None),
    ("header_is_a_string", safetensors_bytes(b'"x"'), None),
    ("metadata_values_not_strings", safetensors_bytes({"__metadata__": {"a": 1}}), None),
    ("metadata_is_a_list", safetensors_bytes({"__metadata__": ["a"]}), None),
    ("entry_not_an_object", safetensors_bytes({"x": [1, 2]}, bytes(8)), "x"),
    ("unknown_dtype", _one(entry("F128", (1,), (0, 16)), bytes(16)), "x"),
    ("missing_dtype", _one({"shape": [2], "data_offsets": [0, 8]}), "x"),
    ("dtype_is_a_list", _one(entry(["F32"])), "x"),
    ("dtype_is_an_object", _one(entry({"F32": 1})), "x"),
    ("negative_shape", _one(entry(shape=(-2,))), "x"),
    ("float_shape", _one(entry(shape=(2.0,))), "x"),
    ("bool_shape", _one(entry(shape=(True, 2))), "x"),
    ("shape_not_a_list", _one(entry(shape="2")), "x"),
    ("offsets_reversed", _one(entry(offsets=(8, 0))), "x"),
    ("offsets_one_number", _one(entry(offsets=(8,))), "x"),
    ("offsets_strings", _one(entry(offsets=("0", "8"))), "x"),
    ("offsets_negative", _one(entry(offsets=(-8, 0))), "x"),
    ("offsets_span_not_dtype_times_shape", _one(entry(offsets=(0, 4))), "x"),
    ("data_past_eof", _one(entry(), bytes(4)), "x"),
    ("truncated_second_tensor", _two(entry(), entry(offsets=(8, 16)), bytes(12)), "b"),
    ("overlapping_offsets", _two(entry(), entry(offsets=(4, 12)), bytes(12)), {"a", "b"}),
    ("same_offsets", _two(entry(), entry(), bytes(8)), {"a", "b"}),
    ("deeply_nested_json", safetensors_bytes(b"[" * 100_000), None),
    (
        "integer_with_5000_digits",
        safetensors_bytes(
            b'{"x": {"dtype": "F32", "shape": [' + HUGE_INT + b'], "data_offsets": [0, 4]}}',
            bytes(4),
        ),
        "x",
    ),
]


@pytest.mark.parametrize(
    ("content", "tensor"),
    [pytest.param(content, tensor, id=name) for name, content, tensor in MALFORMED_FILES],
)
@pytest.mark.parametrize("opener", [read_header, open_checkpoint], ids=["read_header", "open"])
def test_malformed_file_raises_checkpoint_error(
    tmp_path: Path,
    content: bytes,
    tensor: str | set[str] | None,
    opener: Callable[[Path], object],
) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        opener(path)
    assert e.value.path == str(path)
    if isinstance(tensor, set):
        assert e.value.tensor in tensor
    else:
        assert e.value.tensor == tensor


def test_zero_size_tensors_may_share_an_offset(tmp_path: Path) -> None:
    header = {
        "a": entry(shape=(0,), offsets=(0, 0)),
        "b": entry(),
        "c": entry(shape=(0, 3), offsets=(8, 8)),
    }
    path = write_raw(tmp_path / "model.safetensors", header, bytes(8))
    infos = {i.name: i for i in read_header(path).tensors}
    assert {n: (i.shape, i.nbytes) for n, i in infos.items()} == {
        "a": ((0,), 0), "b": ((2,), 8), "c": ((0, 3), 0),
    }  # fmt: skip


# Sharded checkpoints whose index is wrong.


def _index_missing_shard(d: Path) -> None:
    write_sharded(d, {"model-00001-of-00002.safetensors": {"a": torch.zeros(2)}})
    _rewrite_index(
        d, {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    )


def _index_parent_path(d: Path) -> None:
    write_sharded(d, {"model.safetensors": {"a": torch.zeros(2)}})
    save_file({"b": torch.zeros(2)}, d.parent / "outside.safetensors")
    _rewrite_index(d, {"a": "model.safetensors", "b": "../outside.safetensors"})


def _index_absolute_path(d: Path) -> None:
    write_sharded(d, {"model.safetensors": {"a": torch.zeros(2)}})
    save_file({"b": torch.zeros(2)}, d.parent / "outside.safetensors")
    _rewrite_index(d, {"a": "model.safetensors", "b": str(d.parent / "outside.safetensors")})


def _index_tensor_absent_from_shard(d: Path) -> None:
    write_sharded(d, {"model.safetensors": {"a": torch.zeros(2)}})
    _rewrite_index(d, {"a": "model.safetensors", "b": "model.safetensors"})


def _index_tensor_in_other_shard(d: Path) -> None:
    write_sharded(
        d, {"s1.safetensors": {"a": torch.zeros(2)}, "s2.safetensors": {"b": torch.zeros(2)}}
    )
    _rewrite_index(d, {"a": "s2.safetensors", "b": "s2.safetensors"})


def _index_duplicate_tensor(d: Path) -> None:
    s1 = {"a": torch.zeros(2), "c": torch.zeros(1)}
    write_sharded(
        d, {"s1.safetensors": s1, "s2.safetensors": {"a": torch.ones(2), "b": torch.zeros(1)}}
    )
    _rewrite_index(d, {"a": "s1.safetensors", "c": "s1.safetensors", "b": "s2.safetensors"})


def _index_malformed_shard(d: Path) -> None:
    write_sharded(
        d, {"s1.safetensors": {"a": torch.zeros(2)}, "s2.safetensors": {"b": torch.zeros(2)}}
    )
    blob = (d / "s2.safetensors").read_bytes()
    (d / "s2.safetensors").write_bytes(blob[:-1])


def _rewrite_index(d: Path, weight_map: dict[str, str] | object) -> None:
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _index_text(text: str) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        write_sharded(d, {"model.safetensors": {"a": torch.zeros(2)}})
        (d / "model.safetensors.index.json").write_text(text)

    return make


INDEX = "model.safetensors.index.json"
# (id, builder of the directory, the file the error must name, the tensor it must name)
MALFORMED_INDEXES: list[tuple[str, Callable[[Path], None], str, str | None]] = [
    ("missing_shard", _index_missing_shard, INDEX, "b"),
    ("parent_dir_path", _index_parent_path, INDEX, "b"),
    ("absolute_path", _index_absolute_path, INDEX, "b"),
    ("tensor_absent_from_its_shard", _index_tensor_absent_from_shard, INDEX, "b"),
    ("tensor_in_another_shard", _index_tensor_in_other_shard, INDEX, "a"),
    ("duplicate_tensor_in_two_shards", _index_duplicate_tensor, INDEX, "a"),
    ("truncated_shard", _index_malformed_shard, "s2.safetensors", "b"),
    ("index_not_json", _index_text("{weight_map"), INDEX, None),
    ("index_without_weight_map", _index_text('{"metadata": {}}'), INDEX, None),
    ("index_is_a_list", _index_text("[]"), INDEX, None),
    ("weight_map_values_not_strings", _index_text('{"weight_map": {"a": 1}}'), INDEX, None),
    ("index_deeply_nested", _index_text("[" * 100_000), INDEX, None),
    (
        "index_integer_with_5000_digits",
        _index_text('{"metadata": {"total_size": ' + "1" * 5000 + '}, "weight_map": {}}'),
        INDEX,
        None,
    ),
]


@pytest.mark.parametrize(
    ("make", "culprit", "tensor"),
    [pytest.param(m, c, t, id=name) for name, m, c, t in MALFORMED_INDEXES],
)
def test_malformed_sharded_checkpoint_raises_checkpoint_error(
    tmp_path: Path, make: Callable[[Path], None], culprit: str, tensor: str | None
) -> None:
    directory = tmp_path / "base"
    directory.mkdir()
    make(directory)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(directory)
    assert e.value.path == str(directory / culprit)
    assert e.value.tensor == tensor


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "model.ckpt"])
def test_pickle_only_directory_is_refused(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"\x80\x04not really a pickle")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(tmp_path)
    assert e.value.path == str(tmp_path)


def test_pickle_file_is_never_opened(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(path)
    assert e.value.path == str(path)


def test_several_competing_checkpoints_are_refused(tmp_path: Path) -> None:
    save_file({"x": torch.zeros(1)}, tmp_path / "a.safetensors")
    save_file({"x": torch.zeros(1)}, tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(tmp_path)
    assert e.value.path == str(tmp_path)


@pytest.mark.parametrize("kind", ["empty_dir", "missing_path", "dir_with_config_only"])
def test_nothing_to_open_raises_location_error(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "base"
    if kind != "missing_path":
        target.mkdir()
    if kind == "dir_with_config_only":
        (target / "config.json").write_text("{}")
    with pytest.raises(LocationError) as e:
        open_checkpoint(target)
    assert e.value.path == str(target)
    assert not isinstance(e.value, CheckpointError)


# ---------------------------------------------------------------------------------------------
# Fuzz: any bytes either parse (consistently) or raise CheckpointError


@FUZZ
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_parse_or_raise_checkpoint_error(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.safetensors"
        path.write_bytes(data)
        assert_opens_or_refuses(path)


@FUZZ
@given(header=st.binary(max_size=200), data=st.binary(max_size=64), extra=st.integers(-8, 8))
def test_arbitrary_header_bytes_parse_or_raise_checkpoint_error(
    header: bytes, data: bytes, extra: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = write_raw(
            Path(tmp) / "x.safetensors", header, data, length=max(0, len(header) + extra)
        )
        assert_opens_or_refuses(path)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=8,
)
near_valid_entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(sorted(DTYPES)) | json_values,
        "shape": st.lists(st.integers(-2, 5), max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(-4, 70), min_size=2, max_size=2) | json_values,
    },
)


@FUZZ
@given(
    entries=st.dictionaries(
        st.sampled_from(["a", "b", "c", "__metadata__"]),
        near_valid_entries | json_values,
        max_size=3,
    ),
    data=st.binary(max_size=64),
)
def test_structured_headers_parse_or_raise_checkpoint_error(entries: dict, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = write_raw(Path(tmp) / "x.safetensors", json.dumps(entries).encode(), data)
        assert_opens_or_refuses(path)


mutations = st.lists(
    st.tuples(
        st.sampled_from(["flip", "truncate", "insert"]), st.integers(0, 10**6), st.integers(1, 255)
    ),
    min_size=1,
    max_size=4,
)


@pytest.fixture(scope="module")
def valid_file_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("valid") / "model.safetensors"
    save_file(
        {
            "model.embed_tokens.weight": torch.arange(12, dtype=torch.bfloat16).reshape(3, 4),
            "model.norm.weight": torch.ones(4),
            "lm_head.bias": torch.zeros(0),
            "step": torch.tensor(7, dtype=torch.int64),
        },
        path,
        metadata={"format": "pt"},
    )
    return path.read_bytes()


@FUZZ
@given(edits=mutations)
def test_mutated_valid_file_parses_or_raises_checkpoint_error(
    valid_file_bytes: bytes, edits: list[tuple[str, int, int]]
) -> None:
    blob = bytearray(valid_file_bytes)
    for kind, position, value in edits:
        at = position % (len(blob) + 1)
        if kind == "flip" and blob:
            blob[at % len(blob)] ^= value
        elif kind == "truncate":
            del blob[at:]
        else:
            blob[at:at] = bytes([value]) * (value % 9)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        path.write_bytes(bytes(blob))
        assert_opens_or_refuses(path)


# ---------------------------------------------------------------------------------------------
# side_files


def test_side_files_lists_config_and_tokenizer_and_skips_weights_and_hidden(tmp_path: Path) -> None:
    directory = tmp_path / "base"
    write_sharded(
        directory,
        {
            "model-00001-of-00002.safetensors": {"a": torch.zeros(2)},
            "model-00002-of-00002.safetensors": {"b": torch.zeros(2)},
        },
    )
    side = {
        "config.json": "{}",
        "generation_config.json": "{}",
        "tokenizer.json": "{}",
        "tokenizer_config.json": "{}",
        "special_tokens_map.json": "{}",
        "README.md": "# base",
        "tokenizer/vocab.txt": "a\nb\n",
    }
    weights = [
        "pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack",
        "model.gguf", "onnx/model.onnx", "stale.safetensors", "consolidated.pth",
    ]  # fmt: skip
    hidden = [".gitattributes", ".cache/huggingface/download/x.json", "tokenizer/.hidden"]
    for name in [*side, *weights, *hidden]:
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(side.get(name, "x"))
    with open_checkpoint(directory) as checkpoint:
        files, skipped = side_files(checkpoint)
    assert sorted(files) == sorted((name, directory / name) for name in side)
    assert sorted(skipped) == sorted(weights)


def test_side_files_of_single_file_directory(tmp_path: Path) -> None:
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "other.safetensors").write_bytes(b"")
    with open_checkpoint(tmp_path) as checkpoint:
        assert side_files(checkpoint) == (
            [("config.json", tmp_path / "config.json")],
            ["other.safetensors"],
        )


def test_side_files_of_a_file_checkpoint_is_empty(tmp_path: Path) -> None:
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    with open_checkpoint(tmp_path / "model.safetensors") as checkpoint:
        assert side_files(checkpoint) == ([], [])

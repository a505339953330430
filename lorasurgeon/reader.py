"""Safetensors checkpoints read by header: a validated index of every tensor, lazy per-tensor loads.

Knows nothing about LoRA. Opening a checkpoint reads headers only; tensor data is read by
``Checkpoint.load`` / ``read_into`` one tensor at a time, with ``pread`` so that threads can share
a file and nothing is memory-mapped (mapped pages would count towards the process's memory).
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from .dtypes import DTYPES, tensor_nbytes, torch_dtype
from .errors import CheckpointError, LocationError, OptionError

if TYPE_CHECKING:
    import torch

__all__ = [
    "INDEX_NAMES",
    "SINGLE_NAMES",
    "Checkpoint",
    "ShardHeader",
    "TensorFiles",
    "TensorInfo",
    "as_tensor",
    "check_finite_inputs",
    "find_checkpoint_file",
    "open_checkpoint",
    "read_config",
    "read_header",
    "side_files",
]

#: Index file names, in order of preference (transformers, then diffusers).
INDEX_NAMES = ("model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json")
#: Single-file checkpoint names, in order of preference.
SINGLE_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Weight files that a copy of a checkpoint directory must not carry along stale.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".msgpack",
                    ".gguf", ".onnx", ".safetensors.index.json", ".bin.index.json")  # fmt: skip
_MAX_HEADER = 100 * 1024 * 1024  # the limit the safetensors library enforces
_READ_BLOCK = 64 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its shard, dtype code, shape and absolute byte range."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ShardHeader:
    """One safetensors file's parsed header: metadata and tensors in data order."""

    path: Path
    metadata: dict[str, str] | None
    tensors: tuple[TensorInfo, ...]
    size: int


def _fail(path: Path, message: str, tensor: str | None = None, hint: str | None = None) -> None:
    raise CheckpointError(message, path=path, tensor=tensor, hint=hint)


def _read_raw_header(path: Path) -> tuple[dict[str, Any], int, int]:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                _fail(path, f"file is too short to be safetensors ({size} bytes)")
            (length,) = struct.unpack("<Q", prefix)
            if length > size - 8 or length > _MAX_HEADER:
                if prefix.lstrip()[:1] in (b"{", b"["):
                    hint = "give the checkpoint directory or its .safetensors file"
                    _fail(path, "is a JSON file, not a safetensors file", hint=hint)
                _fail(
                    path,
                    f"header length {length} runs past the end of the file ({size} bytes)",
                    hint="the file is truncated or not a safetensors file",
                )
            raw = f.read(length)
    except OSError as e:
        raise CheckpointError(f"cannot read: {e.strerror}", path=path) from e
    try:
        header = json.loads(raw.decode("utf-8"), parse_int=_parse_int)
    except (ValueError, RecursionError) as e:  # bad UTF-8, bad JSON, absurd nesting
        raise CheckpointError(
            f"header is not valid JSON ({e})", path=path, hint="the file is corrupt"
        ) from e
    if not isinstance(header, dict):
        _fail(path, "header is not a JSON object")
    return header, 8 + length, size


def _parse_int(digits: str) -> int | str:
    # Absurdly long integers stay text, so that the entry holding them is named as invalid
    # (int() refuses over 4300 digits and would fail the whole header anonymously).
    return int(digits) if len(digits) <= 32 else digits


def _parse_metadata(path: Path, value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        _fail(path, "__metadata__ must map strings to strings")
    return dict(value)


def _parse_entry(path: Path, name: str, entry: Any, data_start: int, size: int) -> TensorInfo:
    if not isinstance(entry, dict):
        _fail(path, "header entry is not an object", name)
    dtype = entry.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        _fail(path, f"unknown dtype {dtype!r}", name, "expected one of " + ", ".join(DTYPES))
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        _fail(path, f"invalid shape {shape!r}", name)
    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        _fail(path, f"invalid data_offsets {offsets!r}", name)
    begin, end = offsets
    needed = tensor_nbytes(dtype, math.prod(shape))
    if needed is None:
        _fail(path, f"{dtype} {tuple(shape)} is not a whole number of bytes", name)
    if end - begin != needed:
        _fail(path, f"data_offsets span {end - begin} bytes but {dtype} {tuple(shape)} needs "
              f"{needed}", name)  # fmt: skip
    if data_start + end > size:
        _fail(
            path,
            f"tensor data ends at byte {data_start + end}, past the end of the file ({size} bytes)",
            name,
            "the file is truncated",
        )
    return TensorInfo(name, path, dtype, tuple(shape), data_start + begin, end - begin)


def read_header(path: str | os.PathLike[str]) -> ShardHeader:
    """Parse and validate one safetensors file's header without reading tensor data.

    Checks the header length against the file size, the JSON, every dtype and shape, that every
    tensor's bytes lie inside the file and that no two tensors overlap.

    Raises:
        CheckpointError: the file is not a valid safetensors file.
    """
    p = Path(path)
    header, data_start, size = _read_raw_header(p)
    metadata = _parse_metadata(p, header.pop("__metadata__", None))
    infos = [_parse_entry(p, name, entry, data_start, size) for name, entry in header.items()]
    infos.sort(key=lambda t: (t.offset, t.nbytes))
    previous: TensorInfo | None = None
    for info in infos:
        if previous is not None and info.offset < previous.offset + previous.nbytes:
            _fail(p, f"data overlaps tensor {previous.name}", info.name, "the file is corrupt")
        if info.nbytes:
            previous = info
    return ShardHeader(p, metadata, tuple(infos), size)


def _shards_from_index(index_path: Path) -> tuple[list[Path], dict[str, Any]]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"cannot read index: {e}", path=index_path) from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError("index has no weight_map of tensor names to files", path=index_path)
    shards: list[Path] = []
    for name, shard in weight_map.items():
        relative = PurePosixPath(shard)
        if relative.is_absolute() or ".." in relative.parts or "\\" in shard:
            raise CheckpointError(
                f"index places it in {shard!r}, outside the checkpoint directory",
                path=index_path,
                tensor=name,
            )
        path = index_path.parent / shard
        if path not in shards:
            if not path.is_file():
                raise CheckpointError(
                    f"index names shard {shard!r}, which does not exist",
                    path=index_path,
                    tensor=name,
                    hint="download or copy the missing shard",
                )
            shards.append(path)
    return shards, index


def find_checkpoint_file(directory: Path) -> Path:
    """The index file, or the single ``.safetensors`` file, of a checkpoint directory.

    Raises:
        CheckpointError: only pickle weights are present, or several files compete.
        LocationError: the directory holds no safetensors checkpoint.
    """
    for name in INDEX_NAMES + SINGLE_NAMES:
        if (directory / name).is_file():
            return directory / name
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    singles = sorted(directory.glob("*.safetensors"))
    if len(indexes) == 1:
        return indexes[0]
    if not indexes and len(singles) == 1:
        return singles[0]
    if indexes or singles:
        raise CheckpointError(
            "several safetensors checkpoints and no model.safetensors[.index.json]",
            path=directory,
            hint="pass the .safetensors file you mean",
        )
    if any(p.suffix in _PICKLE_SUFFIXES for p in directory.iterdir()):
        raise CheckpointError(
            "only pickle weights (.bin/.pt/.ckpt) here; lorasurgeon never unpickles files",
            path=directory,
            hint="convert the checkpoint to safetensors first "
            "(e.g. save_pretrained(..., safe_serialization=True))",
        )
    raise LocationError("no safetensors checkpoint in this directory", path=directory)


class TensorFiles:
    """Open read-only descriptors of tensor files, shared by threads; reads with ``pread``.

    Use as a context manager; descriptors are opened on first use and closed by ``close()``.
    """

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> TensorFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def fd(self, path: Path) -> int:
        """The shared descriptor of ``path`` (use ``os.pread`` on it, never ``read``)."""
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError as e:
                    raise CheckpointError(f"cannot open: {e.strerror}", path=path) from e
                self._fds[path] = fd
            return fd

    def read_into(
        self, info: TensorInfo, buffer: bytearray | memoryview, *, start: int | None = None
    ) -> None:
        """Fill ``buffer`` with the tensor's stored bytes: all of them (``buffer`` exactly
        ``info.nbytes`` long), or with ``start`` the ``len(buffer)`` bytes from that byte of
        the tensor on."""
        fd = self.fd(info.path)
        view = memoryview(buffer).cast("B")
        size = info.nbytes if start is None else len(view)
        first = 0 if start is None else start
        if first < 0 or first + size > info.nbytes:
            raise ValueError(f"bytes {first}..{first + size} are outside the tensor {info.name}")
        done = 0
        while done < size:
            n = os.preadv(
                fd, [view[done : min(done + _READ_BLOCK, size)]], info.offset + first + done
            )
            if n <= 0:
                raise CheckpointError("file ended early", path=info.path, tensor=info.name)
            done += n

    def advise(self, info: TensorInfo) -> None:
        """Ask the kernel to start reading the tensor's bytes into the page cache now
        (asynchronously), so that a later ``read_into`` finds them there."""
        if hasattr(os, "posix_fadvise") and info.nbytes:
            os.posix_fadvise(self.fd(info.path), info.offset, info.nbytes, os.POSIX_FADV_WILLNEED)

    def read(self, info: TensorInfo) -> bytearray:
        buffer = bytearray(info.nbytes)
        self.read_into(info, buffer)
        return buffer

    def load(self, info: TensorInfo) -> torch.Tensor:
        """Read one tensor into a new CPU ``torch.Tensor`` in its stored dtype."""
        return as_tensor(info, self.read(info))


def as_tensor(info: TensorInfo, buffer: bytearray, dtype: str | None = None) -> torch.Tensor:
    """View the first bytes of ``buffer`` as a CPU tensor of ``info``'s shape and dtype (or
    ``dtype``, a safetensors code), without copying. The buffer may be longer."""
    import torch

    code = dtype or info.dtype
    try:
        torch_type = torch_dtype(code)
    except OptionError as e:
        raise CheckpointError(e.message, path=info.path, tensor=info.name,
                              hint="only copying is possible for this dtype") from None  # fmt: skip
    if info.numel == 0:
        return torch.empty(info.shape, dtype=torch_type)
    return torch.frombuffer(buffer, dtype=torch_type, count=info.numel).reshape(info.shape)


def check_finite_inputs(inputs: Iterable[tuple[TensorInfo, torch.Tensor]], hint: str) -> None:
    """Refuse the first floating point input that holds NaN or infinite values, naming its file
    and tensor. Cheap on adapter factors; for large tensors, call it only once a computed
    result is found not finite, so that a good result costs one ``isfinite`` pass.

    Raises:
        CheckpointError: an input holds NaN or inf.
    """
    import torch

    for info, tensor in inputs:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError("holds NaN or infinite values", path=info.path,
                                  tensor=info.name, hint=hint)  # fmt: skip


@dataclass
class Checkpoint:
    """A safetensors checkpoint (one file or an index with shards), opened by header only.

    Use as a context manager; ``tensors`` maps every tensor name to its ``TensorInfo`` in shard
    and data order. ``files`` reads tensor data lazily, one tensor at a time.
    """

    path: Path
    shards: tuple[ShardHeader, ...]
    tensors: Mapping[str, TensorInfo]
    index_path: Path | None = None
    index: dict[str, Any] | None = None
    files: TensorFiles = field(default_factory=TensorFiles, repr=False)

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors.values())

    def close(self) -> None:
        self.files.close()

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError("no such tensor", path=self.path, tensor=name) from None

    def load(self, name: str | TensorInfo) -> torch.Tensor:
        """Read one tensor into a new CPU ``torch.Tensor`` in its stored dtype."""
        return self.files.load(name if isinstance(name, TensorInfo) else self.info(name))


def _index_tensors(shards: list[ShardHeader], where: Path) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        for info in shard.tensors:
            if info.name in tensors:
                raise CheckpointError(
                    f"tensor appears in both {tensors[info.name].path.name} and {shard.path.name}",
                    path=where,
                    tensor=info.name,
                )
            tensors[info.name] = info
    return tensors


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a checkpoint directory (single file or sharded index) or one ``.safetensors`` file.

    Only headers are read. Everything that can be wrong with the files is checked here: header
    length, JSON, dtypes, offsets, overlaps, index entries naming missing shards or paths that
    leave the directory, tensors listed in the index but absent from their shard.

    Raises:
        LocationError: nothing to open at ``path``.
        CheckpointError: a file or the index is malformed, or the checkpoint is pickle-only.
    """
    p = Path(path)
    if p.is_dir():
        p = find_checkpoint_file(p)
    elif not p.is_file():
        raise LocationError("no such file or directory", path=p)
    elif p.suffix in _PICKLE_SUFFIXES:
        raise CheckpointError(
            "pickle files are never loaded", path=p, hint="convert it to safetensors first"
        )
    index_path: Path | None = None
    index: dict[str, Any] | None = None
    # diffusers names a variant's index diffusion_pytorch_model.safetensors.index.fp16.json
    if p.name.endswith(".index.json") or ".safetensors.index." in p.name and p.suffix == ".json":
        index_path = p
        files, index = _shards_from_index(p)
    else:
        files = [p]
    shards = [read_header(f) for f in files]
    tensors = _index_tensors(shards, index_path or p)
    if index is not None and index_path is not None:
        for name, shard in index["weight_map"].items():
            info = tensors.get(name)
            if info is None or info.path.name != Path(shard).name:
                raise CheckpointError(
                    f"index places it in {shard}, but that shard does not hold it",
                    path=index_path,
                    tensor=name,
                )
    return Checkpoint(Path(path), tuple(shards), tensors, index_path, index)


def side_files(
    checkpoint: Checkpoint, root: Path | None = None
) -> tuple[list[tuple[str, Path]], list[str]]:
    """The other files of a checkpoint directory (config, tokenizer, ...) as (relative name,
    path), and the weight files among them that are not part of this checkpoint.

    ``root`` is the directory (default: the checkpoint's own path; a diffusers component
    opened by its weight file names its folder). Hidden files and directories are left out.
    A single-file checkpoint has none.
    """
    root = checkpoint.path if root is None else root
    if not root.is_dir():
        return [], []
    own = {s.path.resolve() for s in checkpoint.shards}
    if checkpoint.index_path is not None:
        own.add(checkpoint.index_path.resolve())
    files: list[tuple[str, Path]] = []
    skipped: list[str] = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        if path.resolve() in own:
            continue
        if path.name.endswith(_WEIGHT_SUFFIXES):
            skipped.append(str(relative))
        else:
            files.append((str(relative), path))
    return files, skipped


def config_text(directory: Path, dtype: str | None) -> str | None:
    """``directory``'s config.json with its dtype set to ``dtype`` (a safetensors code), when
    a --dtype changes it; else None (the file, if any, is copied as it is)."""
    config = read_config(directory)
    if dtype is None or not config:
        return None
    name = DTYPES[dtype].torch_name
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = name
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def read_config(directory: Path) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint directory as a dict; empty when there is none or it
    is not a JSON object (it only refines behaviour, so it is never an error)."""
    path = directory / "config.json"
    if not directory.is_dir() or not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return config if isinstance(config, dict) else {}

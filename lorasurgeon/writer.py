"""Streaming safetensors writer: planned headers, tensors written in any order, atomic commit.

Knows nothing about LoRA. The whole layout (every shard's header) is fixed before the first
byte is written, so tensors can be written or copied from an input file by several threads at
their planned offsets, and memory never holds more than the tensor being written.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .dtypes import DTYPES, DType, tensor_nbytes
from .errors import OutputError
from .reader import Checkpoint

__all__ = [
    "SHARD_NAME_FORMAT",
    "CheckpointWriter",
    "DType",
    "OutputLayout",
    "OutputShard",
    "OutputTensor",
    "check_output_path",
    "parse_size",
    "plan_layout",
    "reshard",
]

#: Shard file names of a re-sharded checkpoint, as transformers writes them.
SHARD_NAME_FORMAT = "{stem}-{index:05d}-of-{count:05d}.safetensors"
_COPY_BLOCK = 64 * 1024 * 1024


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the output: name, safetensors dtype code and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        nbytes = tensor_nbytes(self.dtype, math.prod(self.shape))
        if nbytes is None:
            raise OutputError(f"{self.dtype} {self.shape} is not a whole number of bytes",
                              tensor=self.name)  # fmt: skip
        return nbytes


@dataclass(frozen=True)
class OutputShard:
    """One output file: its name, ``__metadata__`` and tensors in data order."""

    filename: str
    metadata: dict[str, str] | None
    tensors: tuple[OutputTensor, ...]

    def header(self) -> tuple[bytes, dict[str, int]]:
        """The encoded header (padded to 8 bytes) and each tensor's offset from the file start."""
        entries: dict[str, Any] = {}
        if self.metadata is not None:
            entries["__metadata__"] = self.metadata
        position = 0
        relative: dict[str, int] = {}
        for t in self.tensors:
            entries[t.name] = {
                "dtype": t.dtype,
                "shape": list(t.shape),
                "data_offsets": [position, position + t.nbytes],
            }
            relative[t.name] = position
            position += t.nbytes
        raw = json.dumps(entries, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        start = 8 + len(raw)
        encoded = len(raw).to_bytes(8, "little") + raw
        return encoded, {name: start + off for name, off in relative.items()}

    @property
    def data_size(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass(frozen=True)
class OutputLayout:
    """The planned output: shards, and the index file to write beside them (if any).

    ``index`` is the index JSON without ``weight_map`` (that is rebuilt from the shards).
    When ``single_file`` is true the output path is the one shard file itself.
    """

    shards: tuple[OutputShard, ...]
    index_name: str | None = None
    index: dict[str, Any] = field(default_factory=dict)
    single_file: bool = False
    original_index: str | None = None

    @property
    def total_size(self) -> int:
        return sum(s.data_size for s in self.shards)

    def index_json(self) -> str:
        """The index file: the original text when nothing in it changed, else rewritten the way
        transformers writes it (sorted keys, indent 2)."""
        content = dict(self.index)
        metadata = dict(content.get("metadata") or {})
        metadata["total_size"] = self.total_size
        content["metadata"] = metadata
        content["weight_map"] = {t.name: s.filename for s in self.shards for t in s.tensors}
        if self.original_index is not None:
            try:
                if json.loads(self.original_index) == content:
                    return self.original_index
            except ValueError:
                pass
        return json.dumps(content, indent=2, sort_keys=True) + "\n"


def parse_size(text: str | int) -> int:
    """Parse ``5GB``, ``500MB``, ``2GiB`` or a plain byte count (KB/MB/GB are powers of 1000).

    Raises:
        ValueError: the text is not a size.
    """
    if isinstance(text, int):
        if text < 1:
            raise ValueError(f"size must be positive: {text}")
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip
    s = text.strip().upper().replace(" ", "")
    number = s.rstrip("KMGTIB")
    unit = s[len(number) :]
    if not number or unit not in units:
        raise ValueError(f"not a size: {text!r} (examples: 5GB, 500MB, 2GiB)")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise ValueError(f"not a size: {text!r} (examples: 5GB, 500MB, 2GiB)") from None
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"size must be positive: {text!r}")
    return int(value)


def reshard(
    tensors: Sequence[OutputTensor], max_size: int, *, stem: str, metadata: dict[str, str] | None
) -> tuple[OutputShard, ...]:
    """Pack tensors, in order, into shards of at most ``max_size`` bytes (a larger tensor gets a
    shard of its own), named with ``SHARD_NAME_FORMAT``; one shard is named ``{stem}.safetensors``.
    """
    groups: list[list[OutputTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > max_size:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    if len(groups) == 1:
        return (OutputShard(f"{stem}.safetensors", metadata, tuple(groups[0])),)
    count = len(groups)
    return tuple(
        OutputShard(
            SHARD_NAME_FORMAT.format(stem=stem, index=i + 1, count=count), metadata, tuple(g)
        )
        for i, g in enumerate(groups)
    )


def plan_layout(
    checkpoint: Checkpoint,
    tensors: Sequence[OutputTensor],
    *,
    max_shard_size: int | None = None,
    file_name: str | None = None,
) -> OutputLayout:
    """The output layout of a rewritten checkpoint: the same shard files, tensor order, index
    and metadata as ``checkpoint``; or re-sharded to ``max_shard_size``; or, with ``file_name``,
    one file. ``tensors`` has one entry per tensor of ``checkpoint`` (dtypes may differ).
    """
    by_name = {t.name: t for t in tensors}
    first_meta = checkpoint.shards[0].metadata if checkpoint.shards else None
    if file_name is not None:
        return OutputLayout((OutputShard(file_name, first_meta, tuple(tensors)),), single_file=True)
    index_name = checkpoint.index_path.name if checkpoint.index_path else None
    index = {k: v for k, v in (checkpoint.index or {}).items() if k != "weight_map"}
    if max_shard_size is not None:
        name = index_name or checkpoint.shards[0].path.name
        stem = name.split(".safetensors")[0]
        packed = reshard(tensors, max_shard_size, stem=stem, metadata=first_meta)
        if len(packed) == 1:
            return OutputLayout(packed)
        return OutputLayout(packed, f"{stem}.safetensors.index.json", index)
    shards = []
    for header in checkpoint.shards:
        items = [by_name[t.name] for t in header.tensors]
        if any(by_name[t.name].dtype != t.dtype for t in header.tensors):
            items.sort(key=lambda t: -DTYPES[t.dtype].bits)  # keeps every tensor aligned
        shards.append(OutputShard(header.path.name, header.metadata, tuple(items)))
    original = checkpoint.index_path.read_text(encoding="utf-8") if checkpoint.index_path else None
    return OutputLayout(tuple(shards), index_name, index, original_index=original)


def _is_within(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def check_output_path(out: Path, inputs: Iterable[Path], *, overwrite: bool) -> None:
    """Refuse an output that exists (without ``overwrite``), is an input, lies inside an input,
    or would, when overwritten, delete an input.

    Raises:
        OutputError: the output path cannot be used.
    """
    target = out.resolve()
    for source in inputs:
        src = source.resolve()
        if _is_within(target, src):
            raise OutputError(
                "output path is an input or lies inside one", path=out, hint="choose another -o"
            )
        if overwrite and _is_within(src, target):
            raise OutputError(
                f"output contains the input {source}; --overwrite would delete it",
                path=out,
                hint="choose another -o",
            )
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise OutputError("output already exists", path=out, hint="pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise OutputError(
            "the output's parent directory does not exist", path=out, hint="create it first"
        )


class CheckpointWriter:
    """Write a planned layout into a temporary sibling of ``out``; rename it into place on commit.

    The temporary directory is ``.<name>.partial-<random>`` beside ``out``: a killed run leaves
    only that. Leaving the ``with`` block without ``commit()`` (an exception, Ctrl-C) removes it.
    ``write`` and ``copy`` may be called from several threads, for different tensors.
    """

    def __init__(
        self, out: str | os.PathLike[str], layout: OutputLayout, *, overwrite: bool = False
    ):
        self.out = Path(out)
        self.layout = layout
        self.overwrite = overwrite
        self.tmp = self.out.parent / f".{self.out.name}.partial-{secrets.token_hex(4)}"
        self._slots: dict[str, tuple[int, int, int]] = {}  # name -> (fd, offset, nbytes)
        self._fds: list[int] = []
        self._done: set[str] = set()
        self._lock = threading.Lock()
        self._committed = False

    def __enter__(self) -> CheckpointWriter:
        try:
            self.tmp.mkdir()
            for shard in self.layout.shards:
                self._open_shard(shard)
        except OSError as e:
            self._cleanup()
            raise OutputError(f"cannot write: {e.strerror}", path=e.filename or self.out) from e
        except BaseException:
            self._cleanup()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._committed:
            self._cleanup()

    def _open_shard(self, shard: OutputShard) -> None:
        header, offsets = shard.header()
        fd = os.open(self.tmp / shard.filename, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._fds.append(fd)
        os.pwrite(fd, header, 0)
        os.ftruncate(fd, len(header) + shard.data_size)
        for t in shard.tensors:
            self._slots[t.name] = (fd, offsets[t.name], t.nbytes)

    def _slot(self, name: str, nbytes: int) -> tuple[int, int]:
        slot = self._slots.get(name)
        if slot is None:
            raise OutputError("tensor is not in the planned output", path=self.out, tensor=name)
        fd, offset, planned = slot
        if nbytes != planned:
            raise OutputError(
                f"{nbytes} bytes given, {planned} planned", path=self.out, tensor=name
            )
        return fd, offset

    def _mark(self, name: str) -> None:
        with self._lock:
            if name in self._done:
                raise OutputError("tensor written twice", path=self.out, tensor=name)
            self._done.add(name)

    def write(self, name: str, data: bytes | bytearray | memoryview) -> None:
        """Write one tensor's bytes at its planned place."""
        view = memoryview(data).cast("B")
        fd, offset = self._slot(name, view.nbytes)
        self._mark(name)
        done = 0
        while done < view.nbytes:
            done += os.pwrite(fd, view[done:], offset + done)
        _start_writeback(fd, offset, view.nbytes)

    def copy(self, name: str, src_fd: int, src_offset: int, nbytes: int) -> None:
        """Copy one tensor's bytes from an open input file, in the kernel when it can."""
        fd, offset = self._slot(name, nbytes)
        self._mark(name)
        done = 0
        while done < nbytes:
            count = min(_COPY_BLOCK, nbytes - done)
            try:
                n = os.copy_file_range(src_fd, fd, count, src_offset + done, offset + done)
            except OSError:
                n = 0
            if n <= 0:  # not supported across these filesystems: plain read and write
                chunk = os.pread(src_fd, count, src_offset + done)
                if not chunk:
                    raise OutputError("input ended early", path=self.out, tensor=name)
                n = os.pwrite(fd, chunk, offset + done)
            done += n
        _start_writeback(fd, offset, nbytes)

    def add_file(self, relative: str, source: Path) -> None:
        """Copy a side file (config, tokenizer, ...) into the output directory."""
        target = self.tmp / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)

    def add_text(self, relative: str, text: str) -> None:
        target = self.tmp / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")

    def commit(self) -> None:
        """Check that every planned tensor was written, flush to disk and move into place.

        With ``overwrite`` an existing output is moved aside first and deleted only after the
        new one is in place.
        """
        missing = [name for name in self._slots if name not in self._done]
        if missing:
            raise OutputError(
                f"{len(missing)} planned tensors never written", path=self.out, tensor=missing[0]
            )
        for fd in self._fds:
            os.fsync(fd)
        if self.layout.index_name and not self.layout.single_file:
            self.add_text(self.layout.index_name, self.layout.index_json())
        self._close_fds()
        source = self.tmp / self.layout.shards[0].filename if self.layout.single_file else self.tmp
        old = self.out.parent / f".{self.out.name}.old-{secrets.token_hex(4)}"
        moved_old = False
        if self.out.exists() or self.out.is_symlink():
            if not self.overwrite:
                raise OutputError(
                    "output appeared while this run was writing", path=self.out,
                    hint="pass --overwrite to replace it",
                )  # fmt: skip
            os.rename(self.out, old)
            moved_old = True
        try:
            os.rename(source, self.out)
        except OSError:
            if moved_old:
                os.rename(old, self.out)
            raise
        self._committed = True
        _fsync_dir(self.out.parent)
        if self.layout.single_file:
            shutil.rmtree(self.tmp, ignore_errors=True)
        if moved_old:
            _remove(old)

    def _close_fds(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    def _cleanup(self) -> None:
        self._close_fds()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    # Linux starts writing dirty pages back when told they are not needed, so the disk works
    # during the run instead of all at the final fsync, and the page cache does not fill up
    # with output (a 70B checkpoint is larger than most page caches).
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""Streaming safetensors writer: planned headers, tensors written in any order, atomic commit.

Knows nothing about LoRA. The whole layout (every shard's header) is fixed before the first
byte is written, so tensors can be written or copied from an input file by several threads at
their planned offsets, and memory never holds more than the tensor being written.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
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
from .reader import INDEX_NAMES, SINGLE_NAMES, Checkpoint

__all__ = [
    "SHARD_NAME_FORMAT",
    "CheckpointWriter",
    "Staging",
    "DType",
    "OutputLayout",
    "OutputShard",
    "OutputTensor",
    "check_free_space",
    "check_output_path",
    "parse_size",
    "plan_layout",
    "recover",
    "reshard",
]

logger = logging.getLogger(__name__)

#: Shard file names of a re-sharded checkpoint, as transformers writes them.
SHARD_NAME_FORMAT = "{stem}-{index:05d}-of-{count:05d}.safetensors"
_COPY_BLOCK = 64 * 1024 * 1024
_HASH_BLOCK = 8 * 1024 * 1024


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the output: name, safetensors dtype code and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        nbytes = tensor_nbytes(self.dtype, self.numel)
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


# Names of what a run keeps beside ``out`` while it works: ``.<name>.partial-<token>`` (the
# output being written), ``.<name>.partial-<token>.lock`` (held with flock for the whole run)
# and ``.<name>.old-<token>`` (a replaced output, between the two renames of an overwrite).
_PARTIAL = ".{name}.partial-{token}"
_LOCK_SUFFIX = ".lock"
_OLD = ".{name}.old-{token}"
# Files that mark a directory as a checkpoint or adapter lorasurgeon could have written.
_OUTPUT_MARKERS = (
    *INDEX_NAMES, *SINGLE_NAMES, "adapter_config.json", "adapter_model.safetensors",
    "lorasurgeon.json", "model_index.json",
)  # fmt: skip


def _describe(path: Path, limit: int = 6) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    if not names:
        return "nothing"
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _replaceable(out: Path) -> bool:
    """Whether ``out`` is something lorasurgeon could have written: a ``.safetensors`` file, an
    empty directory, or a directory holding a checkpoint or adapter (and no other checkpoint
    directories)."""
    if out.is_symlink() or not out.exists():
        return out.is_symlink()  # a dangling or any link: replacing it touches no data
    if out.is_file():
        return out.name.endswith(".safetensors")
    if not any(out.iterdir()):
        return True  # an empty directory holds nothing to lose
    if not any((out / marker).is_file() for marker in _OUTPUT_MARKERS):
        return False
    return not any(
        (child / marker).is_file()
        for child in out.iterdir()
        if child.is_dir() and not (out / "model_index.json").is_file()
        for marker in ("adapter_config.json", *INDEX_NAMES, *SINGLE_NAMES)
    )  # a folder of models (not a diffusers pipeline) is never replaced whole


def check_output_path(out: Path, inputs: Iterable[Path], *, overwrite: bool) -> None:
    """Refuse an output that exists (without ``overwrite``), is an input, lies inside an input,
    would delete an input when overwritten, is not something lorasurgeon could have written
    (with ``overwrite``), or lies in a directory that does not exist or cannot be written.

    What a killed run left beside ``out`` is cleaned up first (``recover``).

    Raises:
        OutputError: the output path cannot be used.
    """
    target = out.resolve()
    if not out.name or out.name in (".", "..") or _is_within(Path.cwd().resolve(), target):
        raise OutputError(
            "output is the current directory or one above it", path=out,
            hint="name a new directory or file, e.g. -o merged",
        )  # fmt: skip
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
    if not out.parent.is_dir():
        raise OutputError(
            "the output's parent directory does not exist", path=out, hint="create it first"
        )
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise OutputError(
            f"cannot write in {out.parent} (permission denied)", path=out,
            hint="choose a directory you can write to",
        )  # fmt: skip
    for line in recover(out):
        logger.warning(line)
    _check_existing(out, overwrite)


def _check_existing(out: Path, overwrite: bool) -> None:
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise OutputError("output already exists", path=out, hint="pass --overwrite to replace it")
    if not _replaceable(out):
        what = f"a directory holding {_describe(out)}" if out.is_dir() else "a file"
        raise OutputError(
            f"is {what}, not a checkpoint or adapter lorasurgeon could have written",
            path=out,
            hint="--overwrite replaces only those; remove it yourself or choose another -o",
        )


def check_free_space(out: Path, nbytes: int) -> None:
    """Refuse to start when the output's file system has less than ``nbytes`` free.

    Raises:
        OutputError: naming the output, what it needs and what is free.
    """
    try:
        stat = os.statvfs(out.parent)
    except OSError:
        return  # unknown: the writes will say
    free = stat.f_bavail * stat.f_frsize
    if nbytes > free:
        raise OutputError(
            f"needs {nbytes / 1e6:,.1f} MB but only {free / 1e6:,.1f} MB are free there",
            path=out,
            hint="free some space or choose another -o",
        )


def _flock(path: Path) -> int | None:
    """An exclusive lock on ``path`` if no live process holds one, else None."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def recover(out: Path) -> list[str]:
    """Remove what runs killed outright (SIGKILL, power loss) left beside ``out``: partial
    outputs and their locks, and a replaced output between the two renames of an overwrite,
    which is put back when nothing took its place. Runs still alive (their lock is held) are
    left alone. Returns one line per thing done.
    """
    parent, name = out.parent, out.name
    if not parent.is_dir():
        return []
    prefixes = (f".{name}.partial-", f".{name}.old-")
    tokens = {
        p.name.removesuffix(".new").removesuffix(_LOCK_SUFFIX).split("-")[-1]
        for p in parent.iterdir()
        if p.name.startswith(prefixes)
    }
    done = []
    for token in sorted(tokens):
        partial = parent / _PARTIAL.format(name=name, token=token)
        lock = partial.with_name(partial.name + _LOCK_SUFFIX)
        staging = lock.with_name(lock.name + ".new")  # a lock not yet renamed into place
        old = parent / _OLD.format(name=name, token=token)
        held = lock if lock.exists() else staging if staging.exists() else None
        fd = _flock(held) if held is not None else None
        if held is not None and fd is None:
            continue  # a live run
        try:
            if old.exists() or old.is_symlink():
                if out.exists() or out.is_symlink():
                    _remove(old)
                    done.append(f"removed {old.name}, an output an interrupted run replaced")
                else:
                    os.rename(old, out)
                    done.append(f"put back {out}, which an interrupted --overwrite had moved aside")
            if partial.exists():
                _remove(partial)
                done.append(f"removed {partial.name}, left by an interrupted run")
            lock.unlink(missing_ok=True)
            staging.unlink(missing_ok=True)
        finally:
            if fd is not None:
                os.close(fd)
    return done


def _hold_lock(path: Path) -> int:
    """Create and lock ``path`` (held until ``_drop_lock``). Locked under a hidden name first,
    then renamed: a lock file visible under its final name is always held, so ``recover``
    never mistakes a starting run for a dead one."""
    staging = path.with_name(path.name + ".new")
    fd = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(staging, path)
    except BaseException:
        os.close(fd)
        staging.unlink(missing_ok=True)
        raise
    return fd


def _drop_lock(path: Path, fd: int | None) -> None:
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".new").unlink(missing_ok=True)
    if fd is not None:
        os.close(fd)


@dataclass
class Staging:
    """The names one run uses beside ``out`` (see ``recover``): ``tmp`` for the output being
    built, ``old`` for a replaced output between the renames of an overwrite, both guarded by
    a lock held while the ``with`` block runs. For outputs the engine does not write in one
    piece (a diffusers folder built component by component)."""

    out: Path
    token: str = field(default_factory=lambda: secrets.token_hex(4))
    _fd: int | None = None

    @property
    def tmp(self) -> Path:
        return self.out.parent / _PARTIAL.format(name=self.out.name, token=self.token)

    @property
    def old(self) -> Path:
        return self.out.parent / _OLD.format(name=self.out.name, token=self.token)

    @property
    def lock(self) -> Path:
        return self.tmp.with_name(self.tmp.name + _LOCK_SUFFIX)

    def __enter__(self) -> Staging:
        try:
            self._fd = _hold_lock(self.lock)
        except OSError as e:
            raise _os_error(e, self.out) from e
        return self

    def __exit__(self, *exc: object) -> None:
        _drop_lock(self.lock, self._fd)
        self._fd = None


def _os_error(e: OSError, out: Path, tensor: str | None = None) -> OutputError:
    """An ``OSError`` met while writing ``out``, as an error naming ``out`` (not a temp path)."""
    reason = e.strerror or str(e)
    hint = None
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        reason, hint = "no space left on the device", "free some space or choose another -o"
    elif e.errno == errno.EFBIG:
        reason, hint = "file too large for this file system or limit", "choose another -o"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "choose a location you can write to"
    return OutputError(f"cannot write: {reason}", path=out, tensor=tensor, hint=hint)


class _ShardHasher:
    """The sha256 of a shard as it is written: follows the contiguous written prefix, reading
    it back while its pages are still in the page cache (then drops them), so that hashing an
    output costs CPU but no second read from the disk."""

    def __init__(self, fd: int, header: bytes, size: int) -> None:
        self._fd = fd
        self._digest = hashlib.sha256(header)
        self._position = len(header)
        self._size = size
        self._pending: dict[int, int] = {}  # start -> end of written ranges beyond the prefix
        self._lock = threading.Lock()
        self._buffer = bytearray(_HASH_BLOCK)

    def written(self, offset: int, nbytes: int) -> None:
        with self._lock:
            self._pending[offset] = offset + nbytes
            while self._position in self._pending:
                end = self._pending.pop(self._position)
                self._hash(self._position, end)
                self._position = end

    def _hash(self, start: int, end: int) -> None:
        view = memoryview(self._buffer)
        position = start
        while position < end:
            n = os.preadv(self._fd, [view[: min(_HASH_BLOCK, end - position)]], position)
            if n <= 0:
                raise OSError(errno.EIO, "short read while hashing the output")
            self._digest.update(view[:n])
            position += n
        _start_writeback(self._fd, start, end - start)

    def hexdigest(self) -> str | None:
        """The shard's sha256 once every byte is written, else None."""
        with self._lock:
            return self._digest.hexdigest() if self._position == self._size else None


class CheckpointWriter:
    """Write a planned layout into a temporary sibling of ``out``; rename it into place on commit.

    The temporary directory is ``.<name>.partial-<token>`` beside ``out``, guarded by a lock
    file held for the whole run; a run killed outright leaves only those, which ``recover``
    (run by ``check_output_path``) removes. Leaving the ``with`` block without ``commit()``
    (an exception, Ctrl-C, a signal) removes them. ``write`` and ``copy`` may be called from
    several threads, for different tensors. Every ``OSError`` is raised as an ``OutputError``
    naming ``out``.
    """

    def __init__(
        self, out: str | os.PathLike[str], layout: OutputLayout, *, overwrite: bool = False,
        hash_shards: bool = False,
    ):  # fmt: skip
        self.out = Path(out)
        self._hashers: dict[int, _ShardHasher] | None = {} if hash_shards else None
        self.layout = layout
        self.overwrite = overwrite
        token = secrets.token_hex(4)
        self.tmp = self.out.parent / _PARTIAL.format(name=self.out.name, token=token)
        self._lock_path = self.tmp.with_name(self.tmp.name + _LOCK_SUFFIX)
        self._old = self.out.parent / _OLD.format(name=self.out.name, token=token)
        self._lock_fd: int | None = None
        self._slots: dict[str, tuple[int, int, int]] = {}  # name -> (fd, offset, nbytes)
        self._fds: list[int] = []
        self._done: set[str] = set()
        self._lock = threading.Lock()
        self._committed = False

    def __enter__(self) -> CheckpointWriter:
        try:
            self._take_lock()
            self.tmp.mkdir()
            for shard in self.layout.shards:
                self._open_shard(shard)
        except OSError as e:
            self._cleanup()
            raise _os_error(e, self.out) from e
        except BaseException:
            self._cleanup()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._committed:
            self._finish()  # again, if a signal cut it short: nothing but leftovers remain
        else:
            self._cleanup()

    def _take_lock(self) -> None:
        self._lock_fd = _hold_lock(self._lock_path)

    def _open_shard(self, shard: OutputShard) -> None:
        header, offsets = shard.header()
        mode = os.O_WRONLY if self._hashers is None else os.O_RDWR  # hashing reads it back
        fd = os.open(self.tmp / shard.filename, mode | os.O_CREAT | os.O_EXCL, 0o644)
        self._fds.append(fd)
        _pwrite_all(fd, header, 0)
        os.ftruncate(fd, len(header) + shard.data_size)
        if self._hashers is not None:
            self._hashers[fd] = _ShardHasher(fd, header, len(header) + shard.data_size)
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
        try:
            _pwrite_all(fd, view, offset)
            self._written(fd, offset, view.nbytes)
        except OSError as e:
            raise _os_error(e, self.out, name) from e

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
                n = 0  # unsupported here, or a failure the plain path below attributes
            if n <= 0:
                n = self._copy_plain(name, src_fd, fd, count, src_offset + done, offset + done)
            done += n
        try:
            self._written(fd, offset, nbytes)
        except OSError as e:
            raise _os_error(e, self.out, name) from e

    def _written(self, fd: int, offset: int, nbytes: int) -> None:
        _start_writeback(fd, offset, nbytes)
        if self._hashers is not None:
            self._hashers[fd].written(offset, nbytes)

    def shard_sha256(self, index: int) -> str | None:
        """The sha256 of shard ``index`` once fully written, when the writer hashes shards."""
        if self._hashers is None:
            return None
        return self._hashers[self._fds[index]].hexdigest()

    def _copy_plain(
        self, name: str, src_fd: int, fd: int, count: int, src_offset: int, offset: int
    ) -> int:
        try:
            chunk = os.pread(src_fd, count, src_offset)
        except OSError as e:
            raise OutputError(f"cannot read the input: {e.strerror}", path=self.out,
                              tensor=name) from e  # fmt: skip
        if not chunk:
            raise OutputError("input ended early", path=self.out, tensor=name)
        try:
            _pwrite_all(fd, chunk, offset)
        except OSError as e:
            raise _os_error(e, self.out, name) from e
        return len(chunk)

    def rewrite_header(self, index: int, metadata: dict[str, str]) -> None:
        """Replace shard ``index``'s ``__metadata__`` by one whose header has the same length
        (e.g. a placeholder filled in once known)."""
        shard = self.layout.shards[index]
        old, _ = shard.header()
        new, _ = dataclasses.replace(shard, metadata=metadata).header()
        if len(new) != len(old):
            raise OutputError("metadata changed length after the header was written",
                              path=self.out)  # fmt: skip
        try:
            _pwrite_all(self._fds[index], new, 0)
        except OSError as e:
            raise _os_error(e, self.out) from e

    def shard_path(self, index: int) -> Path:
        """Where shard ``index`` is being written (inside the temporary directory)."""
        return self.tmp / self.layout.shards[index].filename

    def add_file(self, relative: str, source: Path) -> None:
        """Copy a side file (config, tokenizer, ...) into the output directory."""
        target = self.tmp / relative
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        except OSError as e:
            raise _os_error(e, self.out, relative) from e

    def add_text(self, relative: str, text: str) -> None:
        """Write a side file (config, provenance, ...) into the output directory."""
        target = self.tmp / relative
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
        except OSError as e:
            raise _os_error(e, self.out, relative) from e

    def commit(self) -> None:
        """Check that every planned tensor was written, flush to disk and move into place.

        With ``overwrite`` an existing output is moved aside first and deleted only after the
        new one is in place.
        """
        self.flush()
        self.publish()

    def flush(self) -> None:
        """The first half of ``commit``: check that every planned tensor was written, write
        the index and flush everything to disk."""
        missing = [name for name in self._slots if name not in self._done]
        if missing:
            raise OutputError(
                f"{len(missing)} planned tensors never written", path=self.out, tensor=missing[0]
            )
        if self.layout.index_name and not self.layout.single_file:
            self.add_text(self.layout.index_name, self.layout.index_json())
        try:
            for fd in self._fds:
                os.fsync(fd)
            self._close_fds()
        except OSError as e:
            raise _os_error(e, self.out) from e

    def publish(self) -> None:
        """The second half of ``commit``, after ``flush``: move the output into place (and
        an overwritten one aside, then away)."""
        try:
            self._move_into_place()
        except OSError as e:
            raise _os_error(e, self.out) from e
        self._finish()

    def _move_into_place(self) -> None:
        source = self.tmp / self.layout.shards[0].filename if self.layout.single_file else self.tmp
        moved_old = False
        if self.out.exists() or self.out.is_symlink():
            if not self.overwrite:
                raise OutputError(
                    "output appeared while this run was writing", path=self.out,
                    hint="pass --overwrite to replace it",
                )  # fmt: skip
            _check_existing(self.out, self.overwrite)
            os.rename(self.out, self._old)
            moved_old = True
        try:
            os.rename(source, self.out)
        except OSError:
            if moved_old:
                os.rename(self._old, self.out)
            raise
        self._committed = True
        _fsync_dir(self.out.parent)

    def _finish(self) -> None:
        """After the output is in place: remove the replaced output, the temporary directory
        (empty unless the output is one file) and the lock. Failures here lose nothing."""
        for path in (self._old, self.tmp):
            if path.exists() or path.is_symlink():
                _remove(path)
        self._release_lock()

    def _close_fds(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    def _release_lock(self) -> None:
        _drop_lock(self._lock_path, self._lock_fd)
        self._lock_fd = None

    def _cleanup(self) -> None:
        self._close_fds()
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._release_lock()


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < view.nbytes:
        done += os.pwrite(fd, view[done:], offset + done)


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

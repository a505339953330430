"""What every output records about how it was made: tool version, command, options, inputs.

Input files are identified by sha256: a Hub input's weight files by the name of their cache
blob (the Hub stores LFS files under their sha256, so that costs nothing), a local file by a
hash taken on a background thread while the command runs, kept in a small cache keyed by
(device, inode, size, mtime) so that a file is hashed once. No tensor math here.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from .errors import LocationError
from .locations import Location

__all__ = [
    "PROVENANCE_KEY",
    "PROVENANCE_NAME",
    "Provenance",
    "file_sha256",
    "identity",
    "input_record",
    "options_of",
    "read_provenance",
    "start",
    "weight_files",
]

#: The provenance file of a directory output, and the metadata key of a single-file output.
PROVENANCE_NAME = "lorasurgeon.json"
PROVENANCE_KEY = "lorasurgeon"
#: Options that change where or how loudly a command runs, not what it writes.
_NOT_RECORDED = frozenset({"overwrite", "progress", "masks"})
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 8 * 1024 * 1024
_PLACEHOLDER = "0" * 64
_CACHE_ENTRIES = 4096
_cache_lock = threading.Lock()


def options_of(function: Callable[..., Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword-only options of a public ``function`` as it was called (``values``: its
    arguments), as JSON values; what does not change the output is left out."""
    options = {}
    for name, param in inspect.signature(function).parameters.items():
        if param.kind is inspect.Parameter.KEYWORD_ONLY and name not in _NOT_RECORDED:
            options[name.replace("_", "-")] = _json_value(values.get(name, param.default))
    return options


def _json_value(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


def weight_files(path: Path) -> list[Path]:
    """The weight files of a location: the file itself, an index's shards, an adapter's
    ``adapter_model.safetensors``, or a directory's ``*.safetensors``."""
    if path.is_file():
        return [path]
    for index in sorted(path.glob("*.safetensors.index.json")):
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            return [path / name for name in sorted(set(weight_map.values()))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return sorted(path.glob("*.safetensors"))


def _cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "lorasurgeon" / "sha256.json"


def _cache_key(stat: os.stat_result) -> str:
    return f"{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}"


def _read_cache() -> dict[str, str]:
    try:
        data = json.loads(_cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # missing or corrupt: hash again
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, str) and _SHA256.match(v)}


def _remember(key: str, digest: str) -> None:
    """Add one hash to the cache (written whole to a temp file and renamed; failures ignored:
    the cache only saves time)."""
    path = _cache_path()
    with _cache_lock, contextlib.suppress(OSError):
        entries = _read_cache()
        entries[key] = digest
        for old in list(entries)[:-_CACHE_ENTRIES]:  # the oldest first
            del entries[old]
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        temp.write_text(json.dumps(entries), encoding="utf-8")
        os.replace(temp, path)


def _hub_blob_sha256(path: Path) -> str | None:
    """The sha256 of a Hub cache file, from its blob's name: huggingface_hub stores LFS files
    as ``blobs/<sha256>`` (other files as ``blobs/<git sha1>``, 40 digits, not used)."""
    if not path.is_symlink():
        return None
    blob = Path(os.readlink(path)).name
    return blob if _SHA256.match(blob) and path.resolve().parent.name == "blobs" else None


def file_sha256(path: Path) -> str:
    """The sha256 of a file: from its Hub blob name, from the cache, or read and hashed
    (then cached). ``hashlib`` releases the GIL, so this runs beside the command's work."""
    blob = _hub_blob_sha256(path)
    if blob is not None:
        return blob
    stat = path.stat()
    key = _cache_key(stat)
    cached = _read_cache().get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buffer = bytearray(_CHUNK)
        view = memoryview(buffer)
        while n := f.readinto(buffer):
            digest.update(view[:n])
    value = digest.hexdigest()
    if _cache_key(path.stat()) == key:  # unchanged while it was read
        _remember(key, value)
    return value


@dataclass(frozen=True)
class _Input:
    role: str
    location: Location
    files: tuple[tuple[str, Path], ...]  # (name relative to the location, path)


def _input(role: str, location: Location) -> _Input:
    root = location.path if location.path.is_dir() else location.path.parent
    files = tuple((os.path.relpath(p, root), p) for p in weight_files(location.path))
    return _Input(role, location, files)


def _record(item: _Input, digests: Mapping[Path, str]) -> dict[str, Any]:
    record: dict[str, Any] = {"role": item.role, "location": item.location.text}
    if item.location.repo_id is not None:
        record["repo_id"] = item.location.repo_id
        record["revision"] = _resolved_revision(item.location)
    record["files"] = [
        {"name": name, "size": path.stat().st_size, "sha256": digests[path]}
        for name, path in item.files
    ]
    return record


def _resolved_revision(location: Location) -> str | None:
    """The commit a Hub snapshot directory is named after (``.../snapshots/<commit>``)."""
    for part in (location.path, *location.path.parents):
        if part.parent.name == "snapshots":
            return part.name
    return location.revision


def input_record(role: str, location: Location) -> dict[str, Any]:
    """One input as provenance records it (hashing its files now, or taking cached hashes)."""
    item = _input(role, location)
    return _record(item, {path: file_sha256(path) for _, path in item.files})


def _hash_all(digests: Mapping[Path, Future[str]]) -> None:
    for path, future in digests.items():
        try:
            future.set_result(file_sha256(path))
        except OSError as e:  # handed to whoever waits for the hash
            future.set_exception(LocationError(f"cannot read it to hash it: {e.strerror}",
                                               path=path))  # fmt: skip
        except BaseException as e:
            future.set_exception(e)


class Provenance:
    """The provenance of one run: started before the work, so that local inputs are hashed on
    a background thread meanwhile; ``record`` waits for them and adds the outputs."""

    def __init__(
        self, command: str, options: Mapping[str, Any], inputs: Sequence[tuple[str, Location]]
    ) -> None:
        from . import __version__

        self.version = __version__
        self.command = command
        self.options = dict(options)
        self._inputs = [_input(role, loc) for role, loc in inputs]
        paths = sorted({p for item in self._inputs for _, p in item.files})
        self._digests: dict[Path, Future[str]] = {p: Future() for p in paths}
        # A daemon thread: a run that fails or is interrupted exits without waiting for it.
        threading.Thread(target=_hash_all, args=(self._digests,), daemon=True,
                         name="lorasurgeon-hash").start()  # fmt: skip

    def identity(self, *, placeholder: bool = False) -> dict[str, Any]:
        """What the run is (version, command, options, inputs): all but its outputs. Waits for
        the input hashes; with ``placeholder`` every sha256 is 64 zeros instead (same length)."""
        digests = {path: _PLACEHOLDER if placeholder else future.result()
                   for path, future in self._digests.items()}  # fmt: skip
        return {
            "version": self.version,
            "command": self.command,
            "options": self.options,
            "inputs": [_record(item, digests) for item in self._inputs],
        }

    def record(self, outputs: Sequence[Mapping[str, Any]] | None) -> dict[str, Any]:
        """The whole record: ``outputs`` lists the weight files written with their sha256;
        None for a single-file output, which cannot hold its own hash."""
        return {**self.identity(), "outputs": None if outputs is None else list(outputs)}

    def metadata_text(self, *, placeholder: bool = False) -> str:
        """The record of a single-file output, as its ``lorasurgeon`` metadata value. The
        placeholder (written first, before the inputs are hashed) has the final length."""
        return _dumps({**self.identity(placeholder=placeholder), "outputs": None})


def _dumps(record: Mapping[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


def start(
    command: str, options: Mapping[str, Any], inputs: Sequence[tuple[str, Location]]
) -> Provenance:
    """Begin the provenance of a run of ``command``: hashing of the inputs starts now."""
    return Provenance(command, options, inputs)


def identity(record: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a provenance record that says what the run was (everything but outputs)."""
    return {key: record.get(key) for key in ("version", "command", "options", "inputs")}


def output_record(path: Path, name: str) -> dict[str, Any]:
    """One written weight file as provenance records it."""
    return {"name": name, "size": path.stat().st_size, "sha256": file_sha256(path)}


def read_provenance(path: Path) -> dict[str, Any] | None:
    """The provenance of an output: ``lorasurgeon.json`` in a directory, the ``lorasurgeon``
    metadata key of a ``.safetensors`` file; None when there is none or it is unreadable."""
    try:
        if path.is_dir():
            text = (path / PROVENANCE_NAME).read_text(encoding="utf-8")
        else:
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                if size > 100_000_000:
                    return None
                header = json.loads(f.read(size))
            text = header.get("__metadata__", {}).get(PROVENANCE_KEY)
            if not isinstance(text, str):
                return None
        data = json.loads(text)
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    return data if isinstance(data, dict) else None

"""The one executor under every command: a planned output plus a stream of work items.

A command plans an ``Output`` (the layout, the tensors copied unchanged from an input, the side
files) and produces its computed tensors as a stream of ``Computed`` items; ``run`` writes them.
It owns the threads (a copier streams unchanged tensors in the kernel while the command
computes, a writer thread stores computed tensors while the next one is computed), the
progress, signals (SIGTERM and SIGHUP stop the run like Ctrl-C), cleanup (nothing at the
output unless the whole run succeeded) and the translation of ``OSError`` into errors naming
the output. No tensor math here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from .errors import Interrupted
from .pipeline import Drain, Worker
from .provenance import PROVENANCE_KEY, PROVENANCE_NAME, Provenance, output_record
from .reader import TensorFiles, TensorInfo
from .writer import CheckpointWriter, OutputLayout, check_free_space, check_output_path

__all__ = [
    "Computed",
    "Copy",
    "Output",
    "ProgressCallback",
    "check_output",
    "handle_signals",
    "run",
    "tensor_bytes",
]

#: ``progress(done, total)``: how much of a command's work is done (bytes unless the command
#: says otherwise), called from worker threads.
ProgressCallback = Callable[[int, int], None]

_SIGNALS = ("SIGTERM", "SIGHUP")


@dataclass(frozen=True)
class Copy:
    """An output tensor whose bytes are an input tensor's, copied unchanged."""

    name: str
    source: TensorInfo


@dataclass(frozen=True)
class Computed:
    """An output tensor's computed bytes (bytes-like, or a CPU ``torch.Tensor`` in its planned
    dtype). ``release`` is called once they are written (e.g. to return a pooled buffer)."""

    name: str
    data: Any
    release: Callable[[], None] | None = None


@dataclass(frozen=True)
class Output:
    """What a command writes: the layout, the tensors copied from inputs, and side files
    copied (``files``: relative name, source) or written from text (``texts``) into a
    directory output. Every tensor of the layout is either copied or computed. With
    ``provenance``, a directory output gets ``lorasurgeon.json``, a single file the same
    JSON as its ``lorasurgeon`` metadata key."""

    path: Path
    layout: OutputLayout
    copies: tuple[Copy, ...] = ()
    files: tuple[tuple[str, Path], ...] = ()
    texts: Mapping[str, str] = field(default_factory=dict)
    provenance: Provenance | None = None


def check_output(
    out: str | os.PathLike[str], inputs: Iterable[Path], *, overwrite: bool
) -> Path:  # fmt: skip
    """Check, before any work, that ``out`` may be written (see ``check_output_path``); what
    a killed run left there is removed first. Returns ``out`` as a path.

    Raises:
        OutputError: the output path cannot be used.
    """
    path = Path(out)
    check_output_path(path, inputs, overwrite=overwrite)
    return path


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise ``Interrupted`` (a ``KeyboardInterrupt``)
    in the main thread, so that a run stops and cleans up as on Ctrl-C. Signals set to be
    ignored (``nohup``) stay ignored; outside the main thread this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Any] = {}
    for name in _SIGNALS:
        number = getattr(signal, name, None)
        if number is None:
            continue
        current = signal.getsignal(number)
        if current in (signal.SIG_DFL, _raise_interrupted):
            previous[number] = signal.signal(number, _raise_interrupted)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@contextlib.contextmanager
def _signals_held(out: Path) -> Iterator[None]:
    """Within the block (an output's final renames) SIGINT, SIGTERM and SIGHUP wait:
    a run that got that far finishes, and the signal is raised afterwards as ``Interrupted``
    naming the output as kept, rather than reporting an output that exists as unwritten.
    Handlers other than the default ones and ours are left alone."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[str] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        caught.append(signal.Signals(signum).name)

    ours = (signal.SIG_DFL, signal.default_int_handler, _raise_interrupted)
    previous: dict[int, Any] = {}
    for name in ("SIGINT", *_SIGNALS):
        number = getattr(signal, name, None)
        if number is not None and signal.getsignal(number) in ours:
            previous[number] = signal.signal(number, hold)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if caught:
        raise Interrupted(caught[0], kept=out)


def tensor_bytes(data: Any) -> memoryview:
    """The bytes of a buffer, or of a CPU tensor (made contiguous), without a copy."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return memoryview(data).cast("B")
    import torch

    raw = data.detach().contiguous().reshape(-1).view(torch.uint8)
    return memoryview(raw.numpy()).cast("B")


class _Meter:
    """Adds up bytes written by several threads and reports them to ``progress``."""

    def __init__(self, progress: ProgressCallback | None, total: int) -> None:
        self._progress = progress
        self._total = total
        self._done = 0
        self._lock = threading.Lock()

    def add(self, nbytes: int) -> None:
        with self._lock:
            self._done += nbytes
            if self._progress is not None:
                self._progress(self._done, self._total)


def _copy_all(
    copies: Sequence[Copy], files: TensorFiles, writer: CheckpointWriter, meter: _Meter,
    stop: threading.Event,
) -> None:  # fmt: skip
    for item in copies:
        if stop.is_set():
            return
        source = item.source
        writer.copy(item.name, files.fd(source.path), source.offset, source.nbytes)
        meter.add(source.nbytes)


def _store(writer: CheckpointWriter, meter: _Meter, item: Computed) -> None:
    try:
        data = tensor_bytes(item.data)
        writer.write(item.name, data)
        meter.add(data.nbytes)
    finally:
        if item.release is not None:
            item.release()


def _write_stream(
    items: Iterable[Computed], writer: CheckpointWriter, meter: _Meter, stop: threading.Event
) -> None:
    """Write computed items on a writer thread while the next ones are computed."""
    drain = Drain(depth=1, stop=stop, name="lorasurgeon-write")
    try:
        for item in items:
            drain.submit(lambda item=item: _store(writer, meter, item))  # type: ignore[misc]
    except BaseException:
        stop.set()
        with contextlib.suppress(BaseException):
            drain.close()
        raise
    drain.close()


def run(
    output: Output,
    produce: Callable[[TensorFiles], Iterable[Computed]] | None = None,
    *,
    overwrite: bool,
    progress: ProgressCallback | None = None,
) -> int:
    """Write ``output``: its copies on a copier thread, the items ``produce(files)`` yields
    (computed on this thread, written on another), its side files; then move it into place.

    Nothing exists at ``output.path`` unless this returns; SIGTERM and SIGHUP raise
    ``Interrupted`` and clean up like Ctrl-C. Returns the bytes of tensor data written.

    Raises:
        OutputError: the output cannot be written (no space, permissions, ...), named by
            its real path; errors raised by ``produce`` pass through unchanged.
    """
    layout = _with_placeholder(output.layout, output.provenance)
    check_free_space(output.path, layout.total_size)
    meter = _Meter(progress, layout.total_size)
    stop = threading.Event()
    hash_shards = output.provenance is not None and not layout.single_file
    with (
        handle_signals(),
        TensorFiles() as files,
        CheckpointWriter(
            output.path, layout, overwrite=overwrite, hash_shards=hash_shards
        ) as writer,
    ):
        copier = Worker(lambda: _copy_all(output.copies, files, writer, meter, stop),
                        "lorasurgeon-copy").start()  # fmt: skip
        try:
            items = produce(files) if produce is not None else ()
            with contextlib.closing(iter(items)) as stream:  # type: ignore[type-var]
                _write_stream(stream, writer, meter, stop)
            copier.join()
        except BaseException:
            stop.set()
            with contextlib.suppress(BaseException):
                copier.join()
            raise
        for relative, source in output.files:
            writer.add_file(relative, source)
        for relative, text in output.texts.items():
            writer.add_text(relative, text)
        if output.provenance is not None:
            _write_provenance(writer, output.provenance)
        writer.flush()
        with _signals_held(output.path):
            writer.publish()
    return layout.total_size


def _with_placeholder(layout: OutputLayout, provenance: Provenance | None) -> OutputLayout:
    """A single-file output's header holds its provenance: planned with placeholder hashes of
    the same length, filled in by ``_write_provenance`` once the inputs are hashed."""
    if provenance is None or not layout.single_file:
        return layout
    shard = layout.shards[0]
    metadata = {
        **(shard.metadata or {}),
        PROVENANCE_KEY: provenance.metadata_text(placeholder=True),
    }
    return dataclasses.replace(layout, shards=(dataclasses.replace(shard, metadata=metadata),))


def _write_provenance(writer: CheckpointWriter, provenance: Provenance) -> None:
    """Record the provenance: in the header of a single file (which cannot hold its own hash:
    ``outputs`` is null), else as ``lorasurgeon.json`` listing every shard with its sha256
    (taken by the writer as the shards were written)."""
    layout = writer.layout
    if layout.single_file:
        shard = layout.shards[0]
        metadata = {**(shard.metadata or {}), PROVENANCE_KEY: provenance.metadata_text()}
        writer.rewrite_header(0, metadata)
        return
    outputs = []
    for i, shard in enumerate(layout.shards):
        path = writer.shard_path(i)
        digest = writer.shard_sha256(i) or output_record(path, shard.filename)["sha256"]
        outputs.append({"name": shard.filename, "size": path.stat().st_size, "sha256": digest})
    text = json.dumps(provenance.record(outputs), indent=2, sort_keys=True) + "\n"
    writer.add_text(PROVENANCE_NAME, text)

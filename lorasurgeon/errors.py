"""The exception hierarchy of lorasurgeon. Imports nothing from the package.

Every error carries optional ``path``, ``tensor`` and ``hint`` attributes so that callers never
parse message text. ``str(error)`` renders ``<file>: <tensor>: <what is wrong>; <what to do>``.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "AdapterError",
    "CheckpointError",
    "IncompatibleError",
    "Interrupted",
    "LocationError",
    "LorasurgeonError",
    "ManifestError",
    "OptionError",
    "OutputError",
]


def _printable(text: str) -> str:
    """Escape control characters of names that come from files before they are shown."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


class LorasurgeonError(Exception):
    """Base class of every error lorasurgeon raises on bad input or a failed run."""

    def __init__(
        self,
        message: str,
        *,
        path: str | os.PathLike[str] | None = None,
        tensor: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.path = os.fspath(path) if path is not None else None
        self.tensor = tensor
        self.hint = hint
        super().__init__(self._render())

    def _render(self) -> str:
        parts = []
        if self.path is not None:
            parts.append(_printable(self.path))
        if self.tensor is not None:
            parts.append(_printable(self.tensor))
        parts.append(self.message)
        text = ": ".join(parts)
        if self.hint:
            text += f"; {self.hint}"
        return text

    def __str__(self) -> str:
        return self._render()


class LocationError(LorasurgeonError, FileNotFoundError):
    """A location is not found, is not a checkpoint or adapter, or the Hub refused it."""


class CheckpointError(LorasurgeonError):
    """A malformed safetensors file or index, or a pickle-only checkpoint."""


class AdapterError(LorasurgeonError):
    """A bad adapter_config.json, an adapter module matching nothing, a rank mismatch."""


class IncompatibleError(LorasurgeonError):
    """An adapter or tuned checkpoint does not fit the base: missing tensor, shape mismatch."""


class OptionError(LorasurgeonError, ValueError):
    """Invalid option values or combinations."""


class ManifestError(OptionError):
    """A batch manifest that cannot run as written (a usage error naming the job and key)."""


class OutputError(LorasurgeonError):
    """The output exists, lies inside an input, or cannot be written."""


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal (SIGTERM, SIGHUP) and cleaned up as on Ctrl-C;
    ``kept`` is the output when the signal came while it was being moved into place, so that
    it was finished and is complete."""

    def __init__(self, signal_name: str, kept: Path | None = None) -> None:
        self.signal_name = signal_name
        self.kept = kept
        super().__init__(signal_name)

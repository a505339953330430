"""LOCATION -> local files: an existing path, or a Hub repo id ``owner/name[@revision]``.

The only module that imports huggingface_hub. Only the files a command needs are fetched; the
Hub's cache, ``HF_HUB_OFFLINE``, ``HF_TOKEN`` and ``HF_HOME`` are honoured by huggingface_hub.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from .errors import LocationError

__all__ = ["Location", "Role", "resolve", "upload"]

_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")
# Small files that travel with a checkpoint: configs, tokenizers, chat templates.
_SIDE_PATTERNS = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "tokenizer*"]


class Role(str, Enum):
    """What a location must hold, which decides the files fetched from the Hub."""

    CHECKPOINT = "checkpoint"
    ADAPTER = "adapter"
    ANY = "any"


@dataclass(frozen=True)
class Location:
    """A resolved location: the local ``path``, and where it came from."""

    text: str
    path: Path
    repo_id: str | None = None
    revision: str | None = None

    @property
    def is_hub(self) -> bool:
        return self.repo_id is not None

    def __str__(self) -> str:
        return self.text


def resolve(location: str | os.PathLike[str], *, role: Role = Role.ANY) -> Location:
    """Turn what the user typed into local files.

    An existing local path wins. Otherwise ``owner/name[@revision]`` is fetched into the Hub
    cache (only what ``role`` needs: an adapter's two files, a checkpoint's shards, index and
    side files) and the snapshot directory is returned.

    Raises:
        LocationError: the path does not exist and is no repo id, or the Hub refused it.
    """
    text = os.fspath(location)
    path = Path(text).expanduser()
    if path.exists():
        _check_kind(path, role)
        return Location(text, path)
    match = _REPO_ID.match(text)
    if match is None or _looks_local(text, path):
        raise LocationError("no such file or directory", path=text)
    repo, revision = match.group("repo"), match.group("rev")
    snapshot = _fetch(repo, revision, role)
    return Location(text, snapshot, repo, revision)


def _looks_local(text: str, path: Path) -> bool:
    """Whether a missing location was meant as a local path: it starts with ./, ../, / or ~,
    uses the OS's own separator, or its first component or parent directory exists here."""
    if text.startswith((".", "/", "~")) or (os.sep != "/" and os.sep in text):
        return True
    first = Path(text).parts[0] if Path(text).parts else ""
    return bool(first) and (Path(first).exists() or path.parent.exists())


def _check_kind(path: Path, role: Role) -> None:
    """Refuse a PEFT adapter directory where a model checkpoint is expected."""
    if role is Role.CHECKPOINT and (path / "adapter_config.json").is_file():
        raise LocationError(
            "is a PEFT adapter directory, not a model checkpoint", path=path,
            hint="give a model checkpoint here; adapters are the ADAPTER arguments of merge, "
            "combine and resize",
        )  # fmt: skip


def _fetch(repo: str, revision: str | None, role: Role) -> Path:
    if role is Role.ADAPTER:
        return _download(repo, revision, ["adapter_config.json", "adapter_model.safetensors"])
    root = _download(repo, revision, _SIDE_PATTERNS)
    if role is Role.ANY and (root / "adapter_config.json").is_file():
        return _download(repo, revision, ["adapter_model.safetensors"])
    names = _weight_files(root)
    if names is None:
        for candidate in ("model.safetensors", "diffusion_pytorch_model.safetensors"):
            try:
                return _download(repo, revision, [candidate], must_have=candidate)
            except LocationError:
                continue
        raise LocationError(
            f"Hub repo {repo} has no safetensors checkpoint (model.safetensors or an index)",
            path=repo,
        )
    return _download(repo, revision, names)


def _weight_files(root: Path) -> list[str] | None:
    for index in root.glob("*.safetensors.index.json"):
        try:
            weight_map: dict[str, Any] = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        return sorted(set(weight_map.values()))
    return None


def _download(
    repo: str, revision: str | None, patterns: list[str], *, must_have: str | None = None
) -> Path:
    import huggingface_hub
    from huggingface_hub import errors as hub_errors

    where = repo + (f"@{revision}" if revision else "")
    try:
        folder = huggingface_hub.snapshot_download(repo, revision=revision, allow_patterns=patterns)
    except hub_errors.GatedRepoError as e:
        raise LocationError(
            "Hub repo is gated", path=where, hint="accept its terms and set HF_TOKEN"
        ) from e
    except hub_errors.RepositoryNotFoundError as e:
        raise LocationError(
            "no such Hub repo (or it is private)", path=where, hint="check the id or set HF_TOKEN"
        ) from e
    except hub_errors.RevisionNotFoundError as e:
        raise LocationError("no such revision", path=where, hint="check the @revision") from e
    except hub_errors.LocalEntryNotFoundError as e:
        raise LocationError(
            "not in the local Hub cache and the Hub cannot be reached",
            path=where,
            hint="unset HF_HUB_OFFLINE or download it first",
        ) from e
    except (hub_errors.HfHubHTTPError, OSError) as e:
        raise LocationError(f"Hub download failed: {e}", path=where) from e
    path = Path(folder)
    if must_have is not None and not (path / must_have).is_file():
        raise LocationError(f"Hub repo has no {must_have}", path=where)
    return path


def upload(folder: Path, repo: str, branch: str | None, *, readme: str) -> None:
    """Upload an output (a directory, or one file) to a Hub model repo, created private if
    new, with ``readme`` as its README.md.

    Raises:
        LocationError: the Hub refused it (the hint says what to set).
    """
    import huggingface_hub
    from huggingface_hub import errors as hub_errors

    api = huggingface_hub.HfApi()
    where = repo + (f"@{branch}" if branch else "")
    try:
        api.create_repo(repo, private=True, exist_ok=True)
        if branch:
            api.create_branch(repo, branch=branch, exist_ok=True)
        if folder.is_dir():
            api.upload_folder(repo_id=repo, folder_path=folder, revision=branch,
                              commit_message="lorasurgeon output")  # fmt: skip
        else:
            api.upload_file(path_or_fileobj=folder, path_in_repo=folder.name, repo_id=repo,
                            revision=branch)  # fmt: skip
        api.upload_file(path_or_fileobj=readme.encode("utf-8"), path_in_repo="README.md",
                        repo_id=repo, revision=branch)  # fmt: skip
    except (hub_errors.HfHubHTTPError, OSError, ValueError) as e:
        raise LocationError(f"Hub upload failed: {e}", path=where,
                            hint="set HF_TOKEN with write access and unset HF_HUB_OFFLINE",
                            ) from e  # fmt: skip

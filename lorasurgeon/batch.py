"""Batch manifests: parsed and validated into typed jobs, each one public API call.

``read_manifest`` validates everything before anything runs; ``plan_batch`` says which jobs are
done already (their output carries provenance matching the job); ``run_jobs`` runs the others
on local worker processes (``runners``). No command logic here: a job is ``merge(...)``,
``extract(...)``, ``combine(...)``, ``resize(...)`` or ``convert(...)`` with the options the
manifest spells.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from .errors import LorasurgeonError, ManifestError, OptionError, OutputError
from .locations import Location, Role, resolve

__all__ = [
    "Command",
    "Job",
    "JobResult",
    "Manifest",
    "Status",
    "job_api_call",
    "read_manifest",
    "shard_jobs",
    "is_done",
]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
_JOB_KEYS = frozenset({"command", "inputs", "output", "name", "overwrite", "push_to"})


class Command(str, Enum):
    """The commands a manifest job may run."""

    MERGE = "merge"
    EXTRACT = "extract"
    COMBINE = "combine"
    RESIZE = "resize"
    CONVERT = "convert"


class Status(str, Enum):
    """What became of a job."""

    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"


def _floats(value: Any) -> list[float]:
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
        raise ValueError("expected a number or a list of numbers")
    return [float(v) for v in items]


def _names(value: Any) -> list[str]:
    """A comma-separated string or a list of names, as the CLI's LIST options."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise ValueError("expected comma-separated names or a list of names")
    return [v.strip() for v in items if v.strip()]


def _ints(value: Any) -> list[int]:
    items = value.split(",") if isinstance(value, str) else value
    if isinstance(items, int):
        items = [items]
    try:
        return [int(v) for v in items]
    except (TypeError, ValueError):
        raise ValueError("expected comma-separated integers or a list of integers") from None


def _typed(kind: type) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"expected {'true/false' if kind is bool else kind.__name__}")
        return value

    return convert


def _targets(value: Any) -> list[str] | str:
    if isinstance(value, str) and value.strip().lower() == "all-linear":
        return "all-linear"
    return _names(value)


def _fan_in_fan_out(value: Any) -> list[str] | str:
    if isinstance(value, str) and value.strip().lower() in ("all", "none"):
        return value.strip().lower()
    return _names(value)


def _size(value: Any) -> int | str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError("expected a size such as 5GB or a number of bytes")
    return value


_STR, _INT, _FLOAT, _BOOL = _typed(str), _typed(int), _typed(float), _typed(bool)
_RANKS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "rank-method": ("rank_method", _STR), "energy": ("energy", _FLOAT),
    "param-budget": ("param_budget", _INT), "min-rank": ("min_rank", _INT),
    "max-rank": ("max_rank", _INT), "sv-ratio": ("sv_ratio", _FLOAT),
    "sv-cumulative": ("sv_cumulative", _FLOAT),
}  # fmt: skip
_COMMON: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "device": ("device", _STR), "dtype": ("dtype", _STR),
}  # fmt: skip
#: Each command's options as the CLI spells them -> (API keyword, converter).
OPTIONS: dict[Command, dict[str, tuple[str, Callable[[Any], Any]]]] = {
    Command.MERGE: {
        **_COMMON, "weight": ("weights", _floats), "unmerge": ("unmerge", _BOOL),
        "max-shard-size": ("max_shard_size", _size),
        "fan-in-fan-out": ("fan_in_fan_out", _fan_in_fan_out),
    },
    Command.EXTRACT: {
        **_COMMON, **_RANKS, "rank": ("rank", _INT), "alpha": ("alpha", _FLOAT),
        "target-modules": ("target_modules", _targets),
        "exclude-modules": ("exclude_modules", _names),
        "layers-to-transform": ("layers_to_transform", _ints),
        "layers-pattern": ("layers_pattern", _names), "svd": ("svd", _STR),
        "save-modules": ("save_modules", _names),
        "fan-in-fan-out": ("fan_in_fan_out", _fan_in_fan_out),
        "format": ("output_format", _STR), "conv-rank": ("conv_rank", _INT),
        "min-te-diff": ("min_te_diff", _FLOAT),
    },
    Command.COMBINE: {
        **_COMMON, "weight": ("weights", _floats), "method": ("method", _STR),
        "svd": ("svd", _BOOL), "rank": ("rank", _INT), "clamp": ("clamp", _FLOAT),
        "density": ("density", _FLOAT), "majority-sign": ("majority_sign", _STR),
        "seed": ("seed", _INT), "format": ("output_format", _STR),
    },
    Command.RESIZE: {
        **_COMMON, **_RANKS, "rank": ("rank", _INT), "format": ("output_format", _STR),
        "keep-lycoris": ("keep_lycoris", _BOOL),
    },
    Command.CONVERT: {"to": ("to", _STR), "base": ("base", _STR)},
}  # fmt: skip
_REPORTS = frozenset({Command.EXTRACT, Command.COMBINE, Command.RESIZE})
_ROLES: dict[Command, tuple[str, ...]] = {
    Command.MERGE: ("base", "adapter"), Command.EXTRACT: ("base", "tuned"),
    Command.COMBINE: ("adapter",), Command.RESIZE: ("adapter",), Command.CONVERT: ("adapter",),
}  # fmt: skip
_ARITY: dict[Command, tuple[int, int | None]] = {
    Command.MERGE: (2, None), Command.EXTRACT: (2, 2), Command.COMBINE: (1, None),
    Command.RESIZE: (1, 1), Command.CONVERT: (1, 1),
}  # fmt: skip


@dataclass(frozen=True)
class Job:
    """One validated job: ``command`` over ``inputs`` (paths made relative to the manifest's
    directory, or Hub ids) into ``output``, with API keyword ``options``."""

    index: int
    name: str
    command: Command
    inputs: tuple[str, ...]
    output: Path
    options: Mapping[str, Any] = field(default_factory=dict)
    overwrite: bool = False
    report: Path | None = None
    push_to: str | None = None


@dataclass(frozen=True)
class Manifest:
    """A validated manifest: where it is and its jobs, in order."""

    path: Path
    jobs: tuple[Job, ...]


@dataclass(frozen=True)
class JobResult:
    """What became of one job; ``figure`` is its figure of merit (a short text)."""

    name: str
    command: str
    output: str
    status: Status
    seconds: float
    error: str | None = None
    figure: str = ""

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name, "command": self.command, "output": self.output,
            "status": self.status.value, "seconds": round(self.seconds, 3),
        }  # fmt: skip
        if self.error is not None:
            data["error"] = self.error
        return data


def _load(path: Path) -> tuple[dict[str, Any], list[Any]]:
    """The manifest's defaults and raw jobs (YAML or JSON Lines)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ManifestError(f"cannot read the manifest: {e.strerror}", path=path) from e
    if path.suffix == ".jsonl":
        jobs = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    jobs.append(json.loads(line))
                except ValueError as e:
                    raise ManifestError(f"line {number}: not JSON: {e}", path=path) from e
        return {}, jobs
    if path.suffix not in (".yaml", ".yml"):
        raise ManifestError("a manifest is a .yaml, .yml or .jsonl file", path=path)
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ManifestError(f"not valid YAML: {' '.join(str(e).split())}", path=path) from e
    if not isinstance(data, dict) or not isinstance(data.get("jobs"), list):
        raise ManifestError("needs a `jobs:` list", path=path, hint="see `lorasurgeon batch -h`")
    unknown = sorted(set(data) - {"defaults", "jobs"})
    if unknown:
        raise ManifestError(f"unknown top-level key {unknown[0]!r}", path=path,
                            hint="a manifest has `defaults:` and `jobs:`")  # fmt: skip
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ManifestError("`defaults:` must be a mapping of options", path=path)
    return defaults, data["jobs"]


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Parse and validate a whole manifest: every job's command, inputs, output and options.

    Relative paths are relative to the manifest's directory; ``defaults`` apply to every job
    whose command takes them.

    Raises:
        ManifestError: anything wrong, naming the job and the key (a usage error).
    """
    where = Path(path)
    defaults, raw = _load(where)
    defaults = {_key(k): v for k, v in defaults.items()}
    jobs = tuple(_job(where, i, entry, defaults) for i, entry in enumerate(raw))
    _check_jobs(where, jobs)
    return Manifest(where, jobs)


def _key(key: Any) -> str:
    return str(key).replace("_", "-")


def _job(manifest: Path, index: int, entry: Any, defaults: Mapping[str, Any]) -> Job:
    label = f"job {index + 1}"
    if not isinstance(entry, dict):
        raise ManifestError(f"{label}: must be a mapping of keys", path=manifest)
    entry = {_key(k): v for k, v in entry.items()}
    if isinstance(entry.get("name"), str):
        label += f" ({entry['name']})"

    def fail(message: str, hint: str | None = None) -> ManifestError:
        return ManifestError(f"{label}: {message}", path=manifest, hint=hint)

    try:
        command = Command(entry.get("command"))
    except ValueError:
        raise fail(f"unknown command {entry.get('command')!r}",
                   hint="use one of " + ", ".join(c.value for c in Command)) from None  # fmt: skip
    table = OPTIONS[command]
    options: dict[str, Any] = {}
    for key, value in [*((k, v) for k, v in defaults.items() if k in table), *entry.items()]:
        if key in {_key(k) for k in _JOB_KEYS} or (key == "report" and command in _REPORTS):
            continue
        if key not in table:
            raise fail(f"unknown option {key!r} for {command.value}",
                       hint="options are: " + ", ".join(sorted(table)))  # fmt: skip
        api_name, convert = table[key]
        try:
            options[api_name] = convert(value)
        except ValueError as e:
            raise fail(f"option {key!r}: {e}") from None
    unknown_defaults = sorted(k for k in defaults if not any(k in t for t in OPTIONS.values()))
    if unknown_defaults:
        raise ManifestError(f"defaults: unknown option {unknown_defaults[0]!r}", path=manifest)
    inputs = _inputs(manifest, entry.get("inputs"), command, fail)
    if "base" in options:  # convert's --base is a location too
        options["base"] = _location(manifest, options["base"], fail)
    output = entry.get("output")
    if not isinstance(output, str) or not output:
        raise fail("needs `output:` (the -o path)")
    overwrite = entry.get("overwrite", False)
    if not isinstance(overwrite, bool):
        raise fail("`overwrite:` must be true or false")
    push_to = entry.get("push-to")
    if push_to is not None and (not isinstance(push_to, str) or not _REPO_ID.match(push_to)):
        raise fail("`push_to:` must be owner/name[@branch]")
    report = entry.get("report")
    if report is not None and not isinstance(report, str):
        raise fail("`report:` must be a path")
    name = entry.get("name", f"{command.value}-{index + 1}")
    if not isinstance(name, str) or not name:
        raise fail("`name:` must be a non-empty string")
    try:
        _check_values(command, options)
    except OptionError as e:
        raise fail(str(e)) from None
    return Job(
        index, name, command, inputs, _relative(manifest, output), options, overwrite,
        _relative(manifest, report) if report else None, push_to,
    )  # fmt: skip


def _check_values(command: Command, options: Mapping[str, Any]) -> None:
    """Check option values with the same records the API validates them into (choices,
    ranges, options that cannot apply), so that a bad value fails before any job runs."""
    from .dtypes import DType
    from .options import (
        CombineMethod,
        CombineOptions,
        MajoritySign,
        RankMethod,
        RankPolicy,
        SvdMethod,
        choice,
    )

    DType.code_of(options.get("dtype", "auto"))
    if command in (Command.EXTRACT, Command.RESIZE):
        method = choice(RankMethod, options.get("rank_method", "fixed"), "rank method")
        RankPolicy(method, options.get("rank"), options.get("energy"),
                   options.get("param_budget"), options.get("min_rank", 1),
                   options.get("max_rank"), options.get("sv_ratio"),
                   options.get("sv_cumulative"))  # fmt: skip
    if command is Command.EXTRACT:
        choice(SvdMethod, options.get("svd", "randomized"), "svd")
    if command is Command.CONVERT:
        from .formats.write import OutputFormat

        if "to" not in options:
            raise OptionError("give to: peft, kohya or diffusers")
        choice(OutputFormat, options["to"], "format")
    if command is Command.COMBINE:
        sign = options.get("majority_sign")
        CombineOptions(choice(CombineMethod, options.get("method", "linear"), "method"),
                       options.get("svd", False), options.get("rank"), options.get("clamp"),
                       options.get("density"),
                       None if sign is None else choice(MajoritySign, sign, "majority sign"),
                       options.get("seed"))  # fmt: skip


def _relative(manifest: Path, text: str) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() else manifest.parent / path


def _inputs(
    manifest: Path, raw: Any, command: Command, fail: Callable[..., ManifestError]
) -> tuple[str, ...]:
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not items or not all(isinstance(v, str) for v in items):
        raise fail("needs `inputs:`, a list of paths or Hub ids")
    low, high = _ARITY[command]
    if len(items) < low or (high is not None and len(items) > high):
        count = str(low) if low == high else f"at least {low}"
        raise fail(f"{command.value} takes {count} inputs, {len(items)} given")
    return tuple(_location(manifest, text, fail) for text in items)


def _location(manifest: Path, text: str, fail: Callable[..., ManifestError]) -> str:
    """A path made relative to the manifest's directory, or a Hub id."""
    local = _relative(manifest, text)
    if local.exists():
        return os.fspath(local)
    if _REPO_ID.match(text) and not text.startswith((".", "/", "~")):
        return text
    raise fail(f"input {text!r} does not exist", hint="paths are relative to the manifest")


def _check_jobs(manifest: Path, jobs: Sequence[Job]) -> None:
    """No two jobs with one output or one name, no output inside an input (or the reverse)."""
    seen: dict[Path, Job] = {}
    names: dict[str, Job] = {}
    for job in jobs:
        label = f"job {job.index + 1} ({job.name})"
        out = Path(os.path.abspath(job.output))
        other = seen.get(out)
        if other is not None:
            raise ManifestError(f"{label}: output {job.output} is also job {other.index + 1}'s "
                                f"({other.name})", path=manifest)  # fmt: skip
        seen[out] = job
        if job.name in names:
            raise ManifestError(f"{label}: name {job.name!r} is also job "
                                f"{names[job.name].index + 1}'s", path=manifest)  # fmt: skip
        names[job.name] = job
        for text in job.inputs:
            if not os.path.exists(text):
                continue  # a Hub id
            source = Path(os.path.abspath(text))
            if out == source or out.is_relative_to(source) or source.is_relative_to(out):
                raise ManifestError(f"{label}: output {job.output} lies inside input {text} "
                                    "(or holds it)", path=manifest)  # fmt: skip


def shard_jobs(jobs: Sequence[Job], shard: tuple[int, int] | None) -> list[Job]:
    """The I-th of N deterministic shares (jobs whose manifest index is I-1 modulo N)."""
    if shard is None:
        return list(jobs)
    i, n = shard
    return [job for job in jobs if job.index % n == i - 1]


def _locations(job: Job) -> list[tuple[str, Location]]:
    """Each input resolved, with its provenance role (as the command itself records it)."""
    first, *others = _ROLES[job.command]
    roles = [first, *(others[-1] if others else first for _ in job.inputs[1:])]
    kind = {"base": Role.CHECKPOINT, "tuned": Role.CHECKPOINT, "adapter": Role.ADAPTER}
    located = [
        (role, resolve(text, role=kind[role])) for role, text in zip(roles, job.inputs, strict=True)
    ]
    if job.command is Command.CONVERT and job.options.get("base") is not None:
        located.append(("base", resolve(job.options["base"], role=Role.CHECKPOINT)))
    return located


def _api_function(command: Command) -> Callable[..., Any]:
    from . import combine, convert, extract, merge, resize

    functions: dict[Command, Callable[..., Any]] = {
        Command.MERGE: merge, Command.EXTRACT: extract, Command.COMBINE: combine,
        Command.RESIZE: resize, Command.CONVERT: convert,
    }  # fmt: skip
    return functions[command]


def is_done(job: Job) -> bool:
    """Whether ``job.output`` exists, complete, with provenance matching the job: the same
    tool version, command, options, and inputs (Hub repo and resolved commit, file names,
    sizes and hashes; the location as typed may differ).

    Raises:
        LocationError: an input cannot be resolved.
    """
    from . import provenance

    record = provenance.read_provenance(job.output)
    if record is None or not _outputs_complete(job.output, record):
        return False
    function = _api_function(job.command)
    options = provenance.options_of(function, job.options)
    expected = provenance.Provenance(job.command.value, options, _locations(job)).identity()
    return bool(_comparable(provenance.identity(record)) == _comparable(expected))


def _comparable(identity: Mapping[str, Any]) -> Any:
    inputs = [{k: v for k, v in item.items() if k != "location"}
              for item in identity.get("inputs") or [] if isinstance(item, dict)]  # fmt: skip
    return json.dumps({**identity, "inputs": inputs}, sort_keys=True)


def _outputs_complete(out: Path, record: Mapping[str, Any]) -> bool:
    outputs = record.get("outputs")
    if outputs is None:
        return out.is_file()  # a single file: renamed into place only once complete
    try:
        return out.is_dir() and all(
            (out / f["name"]).stat().st_size == f["size"] for f in outputs
        )  # fmt: skip
    except (OSError, KeyError, TypeError):
        return False


def job_api_call(job: Job, *, overwrite: bool = False) -> Any:
    """Run the job: the one public API call it stands for. Returns the command's report."""
    function = _api_function(job.command)
    inputs: list[Any] = list(job.inputs)
    positional = [inputs[0], inputs[1:]] if job.command is Command.MERGE else (
        [inputs] if job.command is Command.COMBINE else inputs)  # fmt: skip
    return function(*positional, job.output, overwrite=overwrite, **job.options)


def figure_of_merit(report: Any) -> str:
    """A job's figure of merit, from its report: tensors changed, or the worst module error."""
    if hasattr(report, "changed"):
        return f"{report.changed} tensors changed"
    if hasattr(report, "converted"):
        return f"{report.total} modules converted"
    modules = getattr(report, "modules", None)
    if modules:
        return f"worst rel_error {max(m.rel_error for m in modules):.4f}"
    return ""


def run_job(job: Job) -> JobResult:
    """Run one job to a result: skipped when done already, else its API call; a
    ``LorasurgeonError`` is recorded as its ``error:`` line. Interrupts pass through."""
    import time

    started = time.monotonic()

    def result(status: Status, error: str | None = None, figure: str = "") -> JobResult:
        return JobResult(job.name, job.command.value, os.fspath(job.output), status,
                         time.monotonic() - started, error, figure)  # fmt: skip

    try:
        exists = job.output.exists() or job.output.is_symlink()
        if exists and is_done(job):
            return result(Status.SKIPPED)
        try:
            job.output.parent.mkdir(parents=True, exist_ok=True)  # manifests name out/... paths
        except OSError as e:
            raise OutputError(f"cannot create its parent directory: {e.strerror}",
                              path=job.output) from e  # fmt: skip
        report = job_api_call(job, overwrite=job.overwrite)
        if job.report is not None:
            _write_report(job.report, report.to_dict())
        if job.push_to is not None:
            push(job)
    except LorasurgeonError as e:
        return result(Status.FAILED, f"error: {e}")
    except Exception as e:  # one job's bug must not stop the others
        return result(Status.FAILED, f"error: internal error: {type(e).__name__}: {e}")
    return result(Status.DONE, figure=figure_of_merit(report))


def model_card(job: Job, record: Mapping[str, Any] | None) -> str:
    """The README.md pushed with an output: what it is and what it was made from."""
    inputs = (record or {}).get("inputs") or []
    lines = ["---", "library_name: peft" if job.command is not Command.MERGE else "tags: [merge]",
             "---", "", f"# {job.push_to}", "",
             f"Made by `lorasurgeon {job.command.value}` from:", ""]  # fmt: skip
    for item in inputs:
        where = item.get("location")
        if item.get("repo_id"):
            where = f"[{item['repo_id']}](https://huggingface.co/{item['repo_id']}) at "
            where += f"`{item.get('revision')}`"
        lines.append(f"- {item.get('role')}: {where}")
    lines += ["", "Options and file hashes: `lorasurgeon.json`.", ""]
    return "\n".join(lines)


def push(job: Job) -> None:
    """Upload a finished output to ``job.push_to`` (``owner/name[@branch]``, created private),
    with its provenance file and a model card naming the inputs.

    Raises:
        LocationError: the Hub refused it.
    """
    from . import provenance
    from .locations import upload

    record = provenance.read_provenance(job.output)
    repo, _, branch = (job.push_to or "").partition("@")
    upload(job.output, repo, branch or None, readme=model_card(job, record))


def _write_report(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")

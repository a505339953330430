"""Fold PEFT LoRA adapters into a base checkpoint, tensor by tensor: ``plan_merge`` and ``merge``.

Planning reads headers only and surfaces every error visible in metadata. Execution streams:
untouched tensors are copied by the kernel, changed ones are read, merged in float32 and
written at their planned offsets, while the next ones are being read.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import engine, provenance
from .adapters import Adapter, open_adapter
from .diffusion import diffusion_changes, is_lora_file, refuse_float8
from .dtypes import DTYPES, DType
from .errors import OptionError, OutputError
from .formats import read_lora
from .layouts import open_layout
from .locations import Location, Role, resolve
from .options import check_finite
from .peft_plan import BaseTensors, output_dtype, plan_tensors
from .plans import Change, ChangeKind, MergePlan, TensorPlan
from .provenance import PROVENANCE_NAME
from .reader import (
    Checkpoint,
    open_checkpoint,
    read_config,
    side_files,
)
from .targets import LayoutRules
from .writer import (
    OutputLayout,
    OutputTensor,
    Staging,
    parse_size,
    plan_layout,
)

__all__ = [
    "Change", "ChangeKind", "DType", "MergePlan", "MergeReport", "TensorPlan", "merge",
    "plan_merge",
]  # fmt: skip

logger = logging.getLogger(__name__)

ProgressCallback = engine.ProgressCallback


@dataclass(frozen=True)
class MergeReport:
    """What ``merge`` wrote."""

    out: Path
    tensors: int
    changed: int
    copied: int
    bytes_written: int
    seconds: float
    notes: tuple[str, ...] = field(default=())


def _config_text(base: Location, dtype: str | None) -> str | None:
    """config.json with its dtype updated, when --dtype changes it."""
    config = read_config(base.path)
    if dtype is None or not config:
        return None
    name = DTYPES[dtype].torch_name
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = name
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def _normalize(
    adapters: Sequence[str | os.PathLike[str]], weights: Sequence[float] | None, dtype: str
) -> tuple[tuple[float, ...], str | None]:
    if not adapters:
        raise OptionError("at least one adapter is needed")
    if weights is None:
        weights = [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise OptionError(f"{len(weights)} weights given for {len(adapters)} adapters")
    for w in weights:
        check_finite("--weight", w)
    code = DType.code_of(dtype)
    return tuple(float(w) for w in weights), code


def plan_merge(
    base: str | os.PathLike[str],
    adapters: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str] | None = None,
    *,
    weights: Sequence[float] | None = None,
    unmerge: bool = False,
    dtype: str = "auto",
    max_shard_size: int | str | None = None,
    fan_in_fan_out: Sequence[str] | str | None = None,
    te_weights: Sequence[float] | None = None,
    skip_text_encoder: bool = False,
) -> MergePlan:
    """Work out a merge from headers alone; nothing is computed or written.

    Every error visible in metadata surfaces here: adapters that don't fit the base, unsupported
    adapter kinds, what cannot be unmerged. ``plan.changes`` says which base tensors change and
    by which adapter (what ``--dry-run`` prints). ``fan_in_fan_out`` states which 2-D modules
    are GPT-2 ``Conv1D`` (see ``merge``).

    Raises:
        LocationError, CheckpointError, AdapterError, IncompatibleError, OptionError.
    """
    weights_t, dtype_code = _normalize(adapters, weights, dtype)
    shard_limit = _shard_limit(max_shard_size)
    base_loc = resolve(base, role=Role.CHECKPOINT)
    adapter_locs = tuple(resolve(a, role=Role.ADAPTER) for a in adapters)
    output_is_file = base_loc.path.is_file()
    if output_is_file and shard_limit is not None:
        raise OptionError("--max-shard-size needs a base directory (the output is one file)")
    lora_files = [is_lora_file(loc.path) for loc in adapter_locs]
    if any(lora_files):
        if not all(lora_files) or fan_in_fan_out is not None:
            raise OptionError(
                "diffusion LoRA files (.safetensors) cannot be merged together with PEFT "
                "adapter directories or --fan-in-fan-out; merge them in separate runs"
            )
        text = _normalize_text_weights(te_weights, weights_t)
        return _plan_diffusion(
            base_loc, adapter_locs, weights_t, text, out, unmerge=unmerge, dtype=dtype_code,
            shard_limit=shard_limit, skip_text_encoder=skip_text_encoder,
        )  # fmt: skip
    if te_weights is not None or skip_text_encoder:
        raise OptionError(
            "--te-weight and --skip-text-encoder apply to diffusion LoRA files only",
            hint="PEFT adapters have one --weight each",
        )
    config = read_config(base_loc.path)
    model_type = config.get("model_type")
    layouts = LayoutRules.from_config(config, fan_in_fan_out)
    with open_checkpoint(base_loc.path) as checkpoint:
        opened: list[Adapter] = []
        try:
            for loc in adapter_locs:
                opened.append(open_adapter(loc.path, model_type=model_type))
            _check_stated(layouts, checkpoint)
            tensors = plan_tensors(
                BaseTensors(checkpoint, model_type, layouts), opened, weights_t, unmerge, dtype_code
            )
            notes = _notes(opened, adapter_locs)
        finally:
            for adapter in opened:
                adapter.close()
        out_name = Path(out).name if out is not None and output_is_file else None
        planned = [OutputTensor(t.name, t.dtype, t.base.shape) for t in tensors]
        layout = plan_layout(checkpoint, planned, max_shard_size=shard_limit, file_name=out_name)
        files, skipped = side_files(checkpoint)
    if skipped:
        notes += (f"not copied (weights that the merge does not cover): {', '.join(skipped)}",)
    return MergePlan(
        base_loc, adapter_locs, weights_t, unmerge, tensors, layout, output_is_file,
        tuple(files), _config_text(base_loc, dtype_code), notes,
    )  # fmt: skip


def _normalize_text_weights(
    te_weights: Sequence[float] | None, weights: tuple[float, ...]
) -> tuple[float, ...]:
    if te_weights is None:
        return weights  # the WebUI's <lora:name:W>: one strength for both
    if len(te_weights) != len(weights):
        raise OptionError(f"{len(te_weights)} text-encoder weights given for {len(weights)} LoRAs")
    for w in te_weights:
        check_finite("--te-weight", w)
    return tuple(float(w) for w in te_weights)


def _plan_diffusion(
    base: Location,
    loras: tuple[Location, ...],
    weights: tuple[float, ...],
    text_weights: tuple[float, ...],
    out: str | os.PathLike[str] | None,
    *,
    unmerge: bool,
    dtype: str | None,
    shard_limit: int | None,
    skip_text_encoder: bool,
) -> MergePlan:
    """The merge of diffusion LoRA files: the layouts and formats modules match each update
    to its base tensor(s); each checkpoint (the base file, or each component of a diffusers
    folder) is then planned as for adapters."""
    layout = open_layout(base.path)
    read = [read_lora(loc.path) for loc in loras]
    found = diffusion_changes(layout, read, weights, text_weights, unmerge=unmerge,
                              skip_text_encoder=skip_text_encoder)  # fmt: skip
    notes = tuple(
        f"{loc}: {n} text-encoder module(s) left out (--skip-text-encoder)"
        for loc, n in zip(loras, found.skipped_text, strict=True)
        if n
    )
    plan = dict(loras=loras, weights=weights, unmerge=unmerge, found=found.per_tensor,
                dtype=dtype, shard_limit=shard_limit)  # fmt: skip
    if "" in layout.checkpoints:
        single = _checkpoint_plan(base, layout.checkpoints[""], out, **plan)  # type: ignore[arg-type]
        return dataclasses.replace(single, notes=notes + single.notes)
    components = []
    for name, file in layout.checkpoints.items():
        sub = _checkpoint_plan(Location(str(file.parent), file.parent), file, None, **plan)  # type: ignore[arg-type]
        if not all(t.copied for t in sub.tensors):
            components.append((name, sub))
    return _folder_plan(base, loras, weights, unmerge, tuple(components), notes)


def _checkpoint_plan(
    base: Location,
    file: Path,
    out: str | os.PathLike[str] | None,
    *,
    loras: tuple[Location, ...],
    weights: tuple[float, ...],
    unmerge: bool,
    found: Mapping[tuple[Path, str], list[Change]],
    dtype: str | None,
    shard_limit: int | None,
) -> MergePlan:
    """One checkpoint of a diffusion merge: every tensor with its changes, its output layout,
    and its directory's other files (other weight files are left out, with a note)."""
    with open_checkpoint(file) as checkpoint:
        refuse_float8(file, checkpoint.tensors)
        tensors = []
        for info in checkpoint.tensors.values():
            changes = tuple(found.get((file, info.name), ()))
            out_dtype = output_dtype(info, dtype, bool(changes), file)
            tensors.append(TensorPlan(info.name, info, out_dtype, changes))
        output_is_file = base.path.is_file()
        out_name = Path(out).name if out is not None and output_is_file else None
        planned = [OutputTensor(t.name, t.dtype, t.base.shape) for t in tensors]
        layout = plan_layout(checkpoint, planned, max_shard_size=shard_limit, file_name=out_name)
        own = {s.path.name for s in checkpoint.shards} | (
            {checkpoint.index_path.name} if checkpoint.index_path else set()
        )
    files, skipped = _directory_files(base.path, own) if not output_is_file else ([], [])
    notes: tuple[str, ...] = ()
    if skipped:
        notes = (f"not copied (weights that the merge does not cover): {', '.join(skipped)}",)
    return MergePlan(
        base, loras, weights, unmerge, tuple(tensors), layout, output_is_file, tuple(files),
        _config_text(base, dtype), notes,
    )  # fmt: skip


def _directory_files(directory: Path, own: set[str]) -> tuple[list[tuple[str, Path]], list[str]]:
    """The files of a checkpoint directory besides its weights ``own``; other weight files
    (another variant, pickles) are listed apart: copied unchanged they would be stale."""
    files: list[tuple[str, Path]] = []
    skipped: list[str] = []
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        if path.name in own:
            continue
        if path.name.endswith((".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".index.json")) or (
            ".safetensors.index." in path.name
        ):
            skipped.append(str(directory.name / relative))
        else:
            files.append((str(relative), path))
    return files, skipped


def _folder_plan(
    base: Location,
    loras: tuple[Location, ...],
    weights: tuple[float, ...],
    unmerge: bool,
    components: tuple[tuple[str, MergePlan], ...],
    notes: tuple[str, ...],
) -> MergePlan:
    """A diffusers folder: the merged components, and every other entry copied unchanged.
    ``tensors`` and ``layout`` name the components' tensors and files as ``component/…``."""
    merged = {name for name, _ in components}
    entries = tuple(
        (p.name, p)
        for p in sorted(base.path.iterdir())
        if not p.name.startswith(".") and p.name not in merged
    )
    tensors = tuple(
        dataclasses.replace(t, name=f"{name}/{t.name}")
        for name, sub in components
        for t in sub.tensors
    )
    shards = tuple(
        dataclasses.replace(s, filename=f"{name}/{s.filename}")
        for name, sub in components
        for s in sub.layout.shards
    )
    notes += tuple(n for _, sub in components for n in sub.notes)
    return MergePlan(
        base, loras, weights, unmerge, tensors, OutputLayout(shards), False, (), None, notes,
        components, entries,
    )  # fmt: skip


def _check_stated(layouts: LayoutRules, checkpoint: Checkpoint) -> None:
    """Names in --fan-in-fan-out must each match a 2-D weight of the base (a typo would
    otherwise leave a Conv1D module taken for a Linear one)."""
    modules = [name.removesuffix(".weight") for name, info in checkpoint.tensors.items()
               if name.endswith(".weight") and len(info.shape) == 2]  # fmt: skip
    unused = layouts.unused_names(modules)
    if unused:
        raise OptionError(
            f"--fan-in-fan-out names {', '.join(unused)}, which matches no 2-D weight of the "
            "base", hint="name the base's Conv1D modules",
        )  # fmt: skip


def _shard_limit(max_shard_size: int | str | None) -> int | None:
    if max_shard_size is None:
        return None
    try:
        return parse_size(max_shard_size)
    except ValueError as e:
        raise OptionError(str(e)) from e


def _notes(adapters: Sequence[Adapter], locations: Sequence[Location]) -> tuple[str, ...]:
    notes = []
    for adapter, loc in zip(adapters, locations, strict=True):
        if adapter.ignored:
            notes.append(
                f"{loc}: {len(adapter.ignored)} module(s) with LoRA tensors are not selected by "
                f"its adapter_config.json and are ignored, as PEFT does (e.g. {adapter.ignored[0]})"
            )
        if adapter.unloaded:
            notes.append(
                f"{loc}: {len(adapter.unloaded)} stored tensor(s) name no parameter once PEFT "
                f"wraps the model and are ignored, as PEFT does (e.g. {adapter.unloaded[0]})"
            )
        if not adapter.modules and not adapter.replacements and not adapter.token_rows:
            notes.append(f"{loc}: the adapter changes nothing")
    return tuple(notes)


def _output(plan: MergePlan, out: Path) -> engine.Output:
    """The engine's view of the merge: unchanged tensors copied, side files (config.json with
    its dtype updated) beside a directory output."""
    copies = tuple(engine.Copy(t.name, t.start) for t in plan.tensors if t.copied)
    files = () if plan.output_is_file else plan.side_files
    texts: dict[str, str] = {}
    if plan.config_text is not None and not plan.output_is_file:
        texts["config.json"] = plan.config_text
        files = tuple((rel, path) for rel, path in files if rel != "config.json")
    return engine.Output(out, plan.layout, copies, files, texts)


def _write_folder(
    plan: MergePlan,
    out: Path,
    device: str,
    record: provenance.Provenance,
    *,
    overwrite: bool,
    progress: ProgressCallback | None,
) -> int:
    """A diffusers folder: each merged component written by the engine into a staging
    directory beside ``out``, every other entry copied byte for byte, then the staging
    directory renamed to ``out`` (the old ``out`` removed only after that). Nothing is left
    behind on failure."""
    from .stream import computed_tensors

    written, outputs = 0, []
    with Staging(out) as names:
        staging, old = names.tmp, names.old
        try:
            staging.mkdir()
            for name, sub in plan.components:
                output = dataclasses.replace(_output(sub, staging / name), provenance=record)
                written += engine.run(output, computed_tensors(sub, device), overwrite=False,
                                      progress=progress)  # fmt: skip
                outputs += _component_outputs(staging / name, name)
            for name, source in plan.copied_entries:
                _copy_entry(source, staging / name, out)
            (staging / PROVENANCE_NAME).write_text(
                json.dumps(record.record(outputs), indent=2, sort_keys=True) + "\n",
                encoding="utf-8",
            )
            moved = out.exists() and overwrite
            if moved:
                out.rename(old)
            try:
                staging.rename(out)
            except BaseException:
                if moved:
                    old.rename(out)  # the old output stays in place
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
    return written


def _component_outputs(component: Path, name: str) -> list[dict[str, Any]]:
    """The weight files one component's run recorded (hashed as written), named from the
    folder's top; its own record is folded into the folder's one."""
    path = component / PROVENANCE_NAME
    own = json.loads(path.read_text(encoding="utf-8"))
    path.unlink()
    return [{**entry, "name": f"{name}/{entry['name']}"} for entry in own["outputs"] or ()]


def _copy_entry(source: Path, target: Path, out: Path) -> None:
    try:
        if source.is_dir():
            shutil.copytree(source, target, copy_function=shutil.copyfile)
        else:
            shutil.copyfile(source, target)
    except OSError as e:
        raise OutputError(f"cannot write ({e.strerror})", path=out, tensor=source.name) from e


def merge(
    base: str | os.PathLike[str],
    adapters: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    weights: Sequence[float] | None = None,
    unmerge: bool = False,
    dtype: str = "auto",
    max_shard_size: int | str | None = None,
    fan_in_fan_out: Sequence[str] | str | None = None,
    te_weights: Sequence[float] | None = None,
    skip_text_encoder: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    progress: ProgressCallback | None = None,
) -> MergeReport:
    """Fold PEFT LoRA adapters into a base checkpoint, as PEFT's ``merge_and_unload()`` does.

    Each adapter's delta (``scaling · B @ A``, per layer type as in PEFT, times its weight) is
    added in float32 and the result rounded once to the output dtype. Tensors the adapters do
    not touch are copied byte for byte; names, shapes, dtypes, shard files, the index and the
    metadata are kept, and the base directory's other files are copied. Nothing exists at
    ``out`` unless this returns: the output is built in a temporary sibling and renamed.

    Args:
        base: a checkpoint directory, a ``.safetensors`` file, or a Hub repo id.
        adapters: PEFT adapter directories or Hub repo ids, merged in order; or diffusion
            LoRA files (kohya/A1111, LyCORIS, diffusers ``.safetensors``) merged into an SD
            1.x/2.x, SDXL or FLUX base (LDM/SGM single file, diffusers folder, UNet/DiT-only
            file or component directory, FLUX BFL file) as sd-scripts' ``merge_lora.py`` does:
            ``W + Σ m·(α/r)·Δ`` in float32, rounded once.
        out: the output directory (a file when ``base`` is a file).
        weights: one factor per adapter (default 1.0 each).
        unmerge: subtract the deltas instead (undo a merge); refused for DoRA and for
            tensors an adapter saved whole.
        dtype: ``auto`` keeps each tensor's dtype; ``float32``/``float16``/``bfloat16`` converts
            every floating-point tensor.
        max_shard_size: re-shard the output (bytes, or text like ``"5GB"``).
        fan_in_fan_out: which 2-D modules are GPT-2 ``Conv1D`` (stored (in, out)): ``"all"``,
            ``"none"``, or module names (PEFT's suffix rule; the others are ``nn.Linear``).
            Needed only where the base has no config.json and a weight is square; a
            config.json's ``model_type`` decides otherwise, and a contradiction is an error.
        te_weights: diffusion LoRA files only: each LoRA's text-encoder strength (the
            WebUI's ``<lora:name:TE:UNET>``); ``weights`` is then the UNet/transformer
            strength. Default: the same as ``weights``.
        skip_text_encoder: diffusion LoRA files only: leave out text-encoder modules whose
            text encoder the base does not have (counted in the notes) instead of refusing.
        overwrite: replace an existing ``out`` (the old one is removed only after success).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        progress: called with (bytes done, bytes total) as the output is written.

    Raises:
        LocationError, CheckpointError, AdapterError, IncompatibleError, OptionError, OutputError.
    """
    options = provenance.options_of(merge, locals())  # first: the arguments only
    started = time.monotonic()
    plan = plan_merge(
        base, adapters, out, weights=weights, unmerge=unmerge, dtype=dtype,
        max_shard_size=max_shard_size, fan_in_fan_out=fan_in_fan_out, te_weights=te_weights,
        skip_text_encoder=skip_text_encoder,
    )  # fmt: skip
    inputs = [plan.base.path, *(a.path for a in plan.adapters)]
    out_path = engine.check_output(out, inputs, overwrite=overwrite)
    if device != "auto" and device != "cpu":
        from .ops import resolve_device  # a GPU needs torch anyway: check it before writing

        resolve_device(device)
    for note in plan.notes:
        logger.warning(note)
    record = provenance.start(
        "merge", options, [("base", plan.base), *(("adapter", a) for a in plan.adapters)]
    )
    from .stream import computed_tensors  # imports torch lazily: kept out of planning

    if plan.components:
        written = _write_folder(plan, out_path, device, record, overwrite=overwrite,
                                progress=progress)  # fmt: skip
    else:
        written = engine.run(
            dataclasses.replace(_output(plan, out_path), provenance=record),
            computed_tensors(plan, device), overwrite=overwrite, progress=progress,
        )  # fmt: skip
    changed = sum(1 for t in plan.tensors if not t.copied)
    return MergeReport(
        out_path, len(plan.tensors), changed, len(plan.tensors) - changed, written,
        time.monotonic() - started, plan.notes,
    )  # fmt: skip

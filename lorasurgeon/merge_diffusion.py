"""``merge`` of diffusion LoRA files: the plan of each checkpoint the layouts and formats
match the updates to (one file, or each component of a diffusers folder), and the writing of a
diffusers folder through the engine, component by component, published in one rename."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import engine, provenance
from .diffusion import diffusion_changes, refuse_float8
from .errors import OptionError, OutputError
from .formats import read_lora
from .layouts import open_layout
from .locations import Location
from .options import check_finite
from .peft_plan import output_dtype
from .plans import Change, MergePlan, TensorPlan, merge_output
from .provenance import PROVENANCE_NAME
from .reader import config_text, open_checkpoint, side_files
from .writer import OutputLayout, OutputTensor, Staging, plan_layout

__all__ = ["normalize_text_weights", "plan_diffusion", "write_folder"]


def normalize_text_weights(
    te_weights: Sequence[float] | None, weights: tuple[float, ...]
) -> tuple[float, ...]:
    if te_weights is None:
        return weights  # the WebUI's <lora:name:W>: one strength for both
    if len(te_weights) != len(weights):
        raise OptionError(f"{len(te_weights)} text-encoder weights given for {len(weights)} LoRAs")
    for w in te_weights:
        check_finite("--te-weight", w)
    return tuple(float(w) for w in te_weights)


def plan_diffusion(
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
    files, skipped = side_files(checkpoint, base.path) if not output_is_file else ([], [])
    notes: tuple[str, ...] = ()
    if skipped:
        names = ", ".join(f"{base.path.name}/{name}" for name in skipped)
        notes = (f"not copied (weights that the merge does not cover): {names}",)
    return MergePlan(
        base, loras, weights, unmerge, tuple(tensors), layout, output_is_file, tuple(files),
        config_text(base.path, dtype), notes,
    )  # fmt: skip


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


def write_folder(
    plan: MergePlan,
    out: Path,
    device: str,
    record: provenance.Provenance,
    *,
    overwrite: bool,
    progress: engine.ProgressCallback | None,
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
                output = dataclasses.replace(merge_output(sub, staging / name), provenance=record)
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

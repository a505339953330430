"""Fold PEFT LoRA adapters into a base checkpoint, tensor by tensor: ``plan_merge`` and ``merge``.

Planning reads headers only and surfaces every error visible in metadata. Execution streams:
untouched tensors are copied by the kernel, changed ones are read, merged in float32 and
written at their planned offsets, while the next ones are being read.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import engine, provenance
from .adapters import Adapter, open_adapter
from .diffusion import is_lora_file
from .dtypes import DType
from .errors import OptionError
from .locations import Location, Role, resolve
from .merge_diffusion import normalize_text_weights, plan_diffusion, write_folder
from .options import check_finite
from .peft_plan import BaseTensors, plan_tensors
from .plans import Change, ChangeKind, MergePlan, TensorPlan, merge_output
from .reader import (
    Checkpoint,
    config_text,
    open_checkpoint,
    read_config,
    side_files,
)
from .targets import LayoutRules
from .writer import (
    OutputTensor,
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
        text = normalize_text_weights(te_weights, weights_t)
        return plan_diffusion(
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
        tuple(files), config_text(base_loc.path, dtype_code), notes,
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
        written = write_folder(plan, out_path, device, record, overwrite=overwrite,
                                progress=progress)  # fmt: skip
    else:
        written = engine.run(
            dataclasses.replace(merge_output(plan, out_path), provenance=record),
            computed_tensors(plan, device), overwrite=overwrite, progress=progress,
        )  # fmt: skip
    changed = sum(1 for t in plan.tensors if not t.copied)
    return MergeReport(
        out_path, len(plan.tensors), changed, len(plan.tensors) - changed, written,
        time.monotonic() - started, plan.notes,
    )  # fmt: skip

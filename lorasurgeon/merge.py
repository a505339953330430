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
from .adapters import Adapter, LoraModule, open_adapter
from .diffusion import diffusion_changes, is_lora_file, refuse_float8
from .dtypes import COMPUTE_DTYPES, DTYPES, DType
from .errors import AdapterError, IncompatibleError, OptionError, OutputError
from .formats import read_lora
from .layouts import open_layout
from .locations import Location, Role, resolve
from .options import check_finite
from .plans import STARTING_KINDS, Change, ChangeKind, MergePlan, TensorPlan
from .provenance import PROVENANCE_NAME
from .reader import (
    Checkpoint,
    TensorInfo,
    open_checkpoint,
    read_config,
    side_files,
)
from .targets import INPUT_EMBEDDING_NAMES, OUTPUT_EMBEDDING_NAMES, Layout, LayoutRules
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


@dataclass
class _Base:
    """The base checkpoint as planning sees it."""

    checkpoint: Checkpoint
    model_type: str | None
    layouts: LayoutRules = field(default_factory=LayoutRules)
    tensors: Mapping[str, TensorInfo] = field(init=False)

    def __post_init__(self) -> None:
        self.tensors = self.checkpoint.tensors

    def find(self, name: str, *, adapter: Adapter, tensor: str) -> TensorInfo:
        """The base tensor ``name``; a tied output embedding resolves to the input embedding."""
        info = self.tensors.get(name)
        if info is not None:
            return info
        module = name.rsplit(".", 1)[0]
        if module.rsplit(".", 1)[-1] in OUTPUT_EMBEDDING_NAMES and name.endswith(".weight"):
            for candidate in self.tensors:
                if candidate.endswith(INPUT_EMBEDDING_NAMES):
                    return self.tensors[candidate]  # tied: one tensor serves both
        raise IncompatibleError(
            f"matches no base tensor (looked for {name})",
            path=adapter.checkpoint.path,
            tensor=tensor,
            hint="was this adapter trained on a different base model?",
        )


def _lora_change(
    index: int, adapter: Adapter, lm: LoraModule, base: _Base, scaling: float
) -> list[tuple[str, Change]]:
    """The changes ``lm`` makes: one, or two for nn.MultiheadAttention's out_proj (PEFT adds
    that delta twice: once itself, once through the wrapped out_proj's own merge)."""
    if lm.parameters:
        return [_parameter_change(index, adapter, lm, base, scaling)]
    where = adapter.checkpoint.path
    name = lm.module + ".weight"
    if name not in base.tensors and lm.module + ".in_proj_weight" in base.tensors:
        name = lm.module + ".in_proj_weight"  # nn.MultiheadAttention: q, k, v stacked
    w = base.find(name, adapter=adapter, tensor=lm.lora_a.name)
    a, b = lm.a_shape, lm.b_shape
    expected: list[tuple[int, ...]]
    if lm.embedding:
        expected, transposed = [(a[1], b[0])], True
    elif len(a) > 2:
        if len(w.shape) != len(a) or w.shape[1] != a[1]:
            raise IncompatibleError(
                f"conv LoRA {a} does not fit base {w.shape} (grouped convolutions cannot be "
                "merged)",
                path=where,
                tensor=lm.lora_a.name,
            )
        expected, transposed = [(b[0], *a[1:])], False
    else:
        expected, transposed = _matrix_shapes(adapter, lm, base, w)
    if w.shape not in expected or any(d != 1 for d in b[2:]):
        raise IncompatibleError(
            f"delta shape {expected[0]} does not fit base tensor {w.name} {w.shape}",
            path=where,
            tensor=lm.lora_b.name,
            hint="was this adapter trained on a different base model?",
        )
    if lm.diag is not None and (transposed or len(w.shape) != 2):
        raise AdapterError("KaSA on a layer other than nn.Linear", path=where, tensor=lm.module)
    if lm.magnitude is not None:
        units = w.shape[1] if transposed else w.shape[0]
        if lm.magnitude.numel != units:
            raise AdapterError(
                f"DoRA magnitude has {lm.magnitude.numel} values for {units} output units",
                path=where,
                tensor=lm.magnitude.name,
            )
    kind = ChangeKind.DORA if lm.magnitude is not None else ChangeKind.LORA
    change = Change(index, kind, lm.module, lora=lm, transposed=transposed, scaling=scaling)
    changes = [(w.name, change)] * (2 if lm.owner is not None else 1)
    if lm.diag is not None:
        changes.insert(0, (w.name, Change(index, ChangeKind.TRUNCATE, lm.module, lora=lm)))
    return changes


# transformers' MoE experts whose stacks are stored (E, in, out) (``is_transposed``); the
# others (Mixtral, Qwen-MoE, ...) store (E, out, in).
_TRANSPOSED_EXPERTS = frozenset({"gpt_oss", "aria", "aria_text", "openai_privacy_filter"})


def _parameter_change(
    index: int, adapter: Adapter, lm: LoraModule, base: _Base, scaling: float
) -> tuple[str, Change]:
    """LoRA on a raw parameter ``module.<p>`` (target_parameters): a 2-D parameter takes
    ``scaling · B @ A`` as it is stored; a 3-D stack of E experts one delta per expert."""
    where = adapter.checkpoint.path
    a, b = lm.a_shape, lm.b_shape
    experts = a[0] // lm.rank
    fits: list[tuple[TensorInfo, bool]] = []
    for param in lm.parameters:
        info = base.tensors.get(f"{lm.module}.{param}")
        if info is None:
            continue
        if experts == 1 and info.shape == (b[0], a[1]):
            fits.append((info, False))
        elif len(info.shape) == 3 and info.shape[0] == experts:
            fits += [(info, False)] if info.shape[1:] == (b[0], a[1]) else []
            fits += [(info, True)] if info.shape[1:] == (a[1], b[0]) else []
    names = ", ".join(f"{lm.module}.{p}" for p in lm.parameters)
    if not fits:
        raise IncompatibleError(
            f"LoRA of shape A {a}, B {b} on {experts} expert(s) fits no base tensor among {names}",
            path=where,
            tensor=lm.lora_a.name,
            hint="was this adapter trained on a different base model? (fused expert stacks "
            "that the checkpoint stores per expert are not supported yet)",
        )
    if len({info.name for info, _ in fits}) > 1:
        raise AdapterError(
            f"these factors fit several targeted parameters ({names}); which one they belong "
            "to depends on the module's parameter order, which the checkpoint does not record",
            path=where, tensor=lm.lora_a.name,
        )  # fmt: skip
    if len(fits) > 1:  # a square expert stack: only the architecture knows its layout
        if base.model_type is None:
            raise IncompatibleError(
                "the expert stack is square, so whether it is stored (E, in, out) or "
                "(E, out, in) cannot be told from shapes", path=where, tensor=lm.lora_a.name,
                hint="give the base a config.json with its model_type",
            )  # fmt: skip
        fits = [f for f in fits if f[1] == (base.model_type in _TRANSPOSED_EXPERTS)]
    info, transposed = fits[0]
    kind = ChangeKind.EXPERTS if len(info.shape) == 3 else ChangeKind.LORA
    return info.name, Change(
        index, kind, lm.module, lora=lm, transposed=transposed, scaling=scaling
    )


def _matrix_shapes(
    adapter: Adapter, lm: LoraModule, base: _Base, w: TensorInfo
) -> tuple[list[tuple[int, ...]], bool]:
    """The base shapes a 2-D LoRA fits, and whether the delta is transposed: nn.Linear stores
    (out, in), GPT-2 ``Conv1D`` (in, out) (fan_in_fan_out). Without a known layout only a
    non-square shape tells them apart; a square one is refused, never guessed."""
    a, b = lm.a_shape, lm.b_shape
    linear, conv1d = (b[0], a[1]), (a[1], b[0])
    layout = base.layouts.layout(lm.module)
    if layout is Layout.CONV1D:
        return [conv1d], True
    if layout is Layout.LINEAR or w.shape != conv1d:
        return [linear], False
    if w.shape == linear:  # square, and nothing says which
        raise IncompatibleError(
            f"base tensor {w.name} is square {w.shape}, so whether it is an nn.Linear (stored "
            "(out, in)) or a GPT-2 Conv1D (stored (in, out), transposed) cannot be told from "
            "shapes, and the base has no config.json with a model_type",
            path=adapter.checkpoint.path, tensor=lm.lora_b.name,
            hint="state it with --fan-in-fan-out MODULES|all|none (the Conv1D modules), or "
            "give the base as a directory holding its config.json",
        )  # fmt: skip
    return [conv1d], True


def _bias_change(
    index: int, adapter: Adapter, lm: LoraModule, base: _Base, scaling: float
) -> tuple[str, Change]:
    assert lm.lora_b_bias is not None
    bias = base.tensors.get(lm.module + ".bias")
    if bias is None or bias.shape != lm.lora_b_bias.shape:
        raise IncompatibleError(
            "lora_bias needs a base bias of the same shape, and the base has none",
            path=adapter.checkpoint.path,
            tensor=lm.lora_b_bias.name,
        )
    change = Change(index, ChangeKind.LORA_BIAS, lm.module, source=lm.lora_b_bias, scaling=scaling)
    return bias.name, change


def _replacements(
    index: int, adapter: Adapter, base: _Base, unmerge: bool
) -> list[tuple[str, Change]]:
    found = []
    for name, info in adapter.replacements.items():
        copy = name in adapter.embedding_copies
        if name not in base.tensors and not copy:
            module = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
            hint = (
                "saving a tied output embedding whole unties it, which lorasurgeon does not do yet"
                if module in OUTPUT_EMBEDDING_NAMES
                else "was this adapter trained on a different base model?"
            )
            raise IncompatibleError(
                f"saved whole, but the base has no tensor {name}",
                path=adapter.checkpoint.path,
                tensor=info.name,
                hint=hint,
            )
        target = base.find(name, adapter=adapter, tensor=info.name)
        if target.shape != info.shape:
            raise IncompatibleError(
                f"saved whole with shape {info.shape}, base {target.name} is {target.shape}",
                path=adapter.checkpoint.path,
                tensor=info.name,
                hint="a resized vocabulary? resize the base first",
            )
        if unmerge:
            if copy:
                continue  # a copy of the base weight: nothing to undo
            raise OptionError(
                "was saved whole by the adapter, so the base value is lost; cannot unmerge",
                path=adapter.checkpoint.path,
                tensor=info.name,
            )
        kind = ChangeKind.COPY if copy else ChangeKind.REPLACE
        found.append((target.name, Change(index, kind, name, source=info)))
    return found


def _token_changes(
    index: int, adapter: Adapter, base: _Base, unmerge: bool
) -> list[tuple[str, Change]]:
    found = []
    for module, (indices, info) in adapter.token_rows.items():
        if unmerge:
            raise OptionError(
                "trainable token rows replace base rows; the originals are lost; cannot unmerge",
                path=adapter.checkpoint.path,
                tensor=info.name,
            )
        w = base.find(module + ".weight", adapter=adapter, tensor=info.name)
        if (
            len(w.shape) != 2
            or info.shape != (len(indices), w.shape[1])
            or max(indices) >= w.shape[0]
        ):
            raise IncompatibleError(
                f"{len(indices)} token rows {info.shape} do not fit {w.name} {w.shape}",
                path=adapter.checkpoint.path,
                tensor=info.name,
            )
        found.append((w.name, Change(index, ChangeKind.ROWS, module, source=info, indices=indices)))
    return found


def _adapter_changes(
    index: int, adapter: Adapter, weight: float, base: _Base, unmerge: bool
) -> list[tuple[str, Change]]:
    sign = -1.0 if unmerge else 1.0
    changes = _replacements(index, adapter, base, unmerge)
    for lm in adapter.modules.values():
        if unmerge and lm.magnitude is not None:
            raise OptionError(
                "DoRA merges cannot be undone offline (the original weight norms are lost)",
                path=adapter.checkpoint.path,
                tensor=lm.module,
            )
        if unmerge and lm.diag is not None:
            raise OptionError(
                "KaSA truncates the base weight by SVD before merging; the dropped singular "
                "components are lost, so this merge cannot be undone",
                path=adapter.checkpoint.path, tensor=lm.module,
            )  # fmt: skip
        scaling = lm.scaling * weight * sign
        changes += _lora_change(index, adapter, lm, base, scaling)
        if lm.lora_b_bias is not None:
            changes.append(_bias_change(index, adapter, lm, base, scaling))
    changes += _token_changes(index, adapter, base, unmerge)
    return changes


def _order(changes: list[Change], where: Path, name: str) -> tuple[Change, ...]:
    """Order one tensor's changes: the replacement it starts from, deltas, then token rows."""
    starts = [c for c in changes if c.kind in STARTING_KINDS]
    if sum(c.kind is ChangeKind.REPLACE for c in starts) > 1:
        raise AdapterError(
            "saved whole by more than one adapter; merge them one at a time",
            path=where,
            tensor=name,
        )
    starts.sort(
        key=lambda c: c.kind is not ChangeKind.REPLACE
    )  # a trained tensor wins over a base copy
    rows = [c for c in changes if c.kind is ChangeKind.ROWS]
    seen: set[int] = set()
    for c in rows:
        if seen & set(c.indices):
            raise AdapterError("two adapters replace the same token rows", path=where, tensor=name)
        seen |= set(c.indices)
    deltas = [c for c in changes if c.kind not in STARTING_KINDS and c.kind is not ChangeKind.ROWS]
    return tuple(starts[:1] + deltas + rows)


def _output_dtype(info: TensorInfo, dtype: str | None, changed: bool, where: Path) -> str:
    if changed and info.dtype not in COMPUTE_DTYPES:
        raise IncompatibleError(
            f"cannot merge into a {info.dtype} tensor (quantized base?)",
            path=where,
            tensor=info.name,
        )
    return dtype if dtype is not None and info.dtype in COMPUTE_DTYPES else info.dtype


def _plan_tensors(
    base: _Base,
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    unmerge: bool,
    dtype: str | None,
) -> tuple[TensorPlan, ...]:
    kasa = [a for a in adapters if a.config.kasa]
    if kasa and len(adapters) > 1:
        raise AdapterError(
            "is a KaSA adapter, which truncates the base weights it targets; PEFT refuses to "
            "mix it with other adapters", path=kasa[0].config.path, hint="merge it alone",
        )  # fmt: skip
    per_tensor: dict[str, list[Change]] = {}
    order = range(len(adapters) - 1, -1, -1) if unmerge else range(len(adapters))
    for i in order:
        for name, change in _adapter_changes(i, adapters[i], weights[i], base, unmerge):
            per_tensor.setdefault(name, []).append(change)
    plans = []
    where = base.checkpoint.path
    for info in base.tensors.values():
        changes = _order(per_tensor.get(info.name, []), where, info.name)
        has_deltas = any(c.kind not in STARTING_KINDS for c in changes)
        out_dtype = _output_dtype(info, dtype, has_deltas, where)
        plans.append(TensorPlan(info.name, info, out_dtype, changes))
    return tuple(plans)


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
            tensors = _plan_tensors(
                _Base(checkpoint, model_type, layouts), opened, weights_t, unmerge, dtype_code
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
            out_dtype = _output_dtype(info, dtype, bool(changes), file)
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

"""Pull a LoRA out of a fine-tune: ``plan_extraction`` and ``extract``.

For each selected weight, ``delta = tuned - base`` (float32) is approximated by a truncated SVD
and written as a PEFT adapter that ``PeftModel.from_pretrained(base, OUT)`` loads. Tensor pairs
stream from both checkpoints, read ahead on a thread while the device computes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import engine, provenance
from .adapters import (
    KEY_PREFIX,
    ModuleReport,
    RankLayout,
    adapter_output,
    lora_keys,
    report_dict,
)
from .dtypes import COMPUTE_DTYPES, DTYPES, DType, torch_dtype
from .engine import Computed, Copy, Output
from .errors import IncompatibleError, OptionError
from .extract_diffusion import (
    DEFAULT_TEXT_THRESHOLD,
    DiffusionPlan,
    Spelling,
    extract_diffusion,
    plan_diffusion_extraction,
)
from .layouts import is_diffusion_checkpoint
from .locations import Location, Role, resolve
from .options import (
    DEFAULT_FIXED_RANK,
    DEFAULT_MAX_RANK,
    RankMethod,
    RankPolicy,
    SvdMethod,
    check_finite,
    choice,
)
from .pipeline import BufferPool, prefetch
from .reader import (
    Checkpoint,
    TensorFiles,
    TensorInfo,
    as_tensor,
    check_finite_inputs,
    open_checkpoint,
    read_config,
)
from .targets import (
    INPUT_EMBEDDING_NAMES,
    OUTPUT_EMBEDDING_NAMES,
    Layout,
    LayoutRules,
    TargetRules,
)
from .writer import OutputTensor

__all__ = ["ExtractPlan", "ExtractReport", "ModuleReport", "extract", "plan_extraction"]

logger = logging.getLogger(__name__)

ProgressCallback = engine.ProgressCallback
# Elements per block of the CPU delta computation (1 MiB of float32: stays in cache).
_DELTA_BLOCK = 1 << 18
# Bytes of the first modules read ahead while torch is imported.
_READ_AHEAD_BYTES = 1 << 30
# Elements per chunk when tensors outside the adapter are compared (16 MiB as float64).
_COMPARE_CHUNK = 1 << 21
_EMBEDDING_MODULES = tuple(n.removesuffix(".weight") for n in INPUT_EMBEDDING_NAMES) + (
    "wpe", "embed_positions", "position_embeddings",
)  # fmt: skip


@dataclass(frozen=True)
class ExtractModule:
    """One weight to extract: its base and tuned tensors and how its delta is laid out.

    ``layout`` is ``linear`` (W stored (out, in)), ``conv1d`` (GPT-2 Conv1D, stored (in, out)),
    ``embedding`` (stored (vocab, dim); PEFT's lora_embedding_A/B) or ``conv`` (out, in, k...).
    """

    module: str
    base: TensorInfo
    tuned: TensorInfo
    layout: str

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """(out, in) of the 2-D matrix that is decomposed (B @ A orientation)."""
        shape = self.base.shape
        if self.layout in ("conv1d", "embedding"):
            return shape[1], shape[0]
        return shape[0], math.prod(shape[1:])


@dataclass(frozen=True)
class ExtractPlan:
    """What ``extract`` will do, from headers alone."""

    base: Location
    tuned: Location
    modules: tuple[ExtractModule, ...]
    saved: tuple[tuple[TensorInfo, TensorInfo], ...]  # (base, tuned) stored whole
    others: tuple[tuple[TensorInfo, TensorInfo], ...]  # (base, tuned) pairs not in the adapter
    model_type: str | None
    task_type: str | None


@dataclass(frozen=True)
class ExtractReport:
    """The extraction's figures; ``to_dict()`` is the ``--report`` JSON."""

    out: Path
    modules: list[ModuleReport]
    total_params: int
    saved_modules: list[str]
    not_in_adapter: list[dict[str, Any]]
    skipped_equal: int
    svd: str
    rank_method: str
    seconds: float
    notes: list[str] = field(default_factory=list)
    # diffusion checkpoints: text encoders left out as unchanged ({component, modules, max_abs})
    unchanged_text: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return report_dict(self)


def _kind(module: str, info: TensorInfo) -> str | None:
    """``conv``, ``embedding``, ``matrix`` (a 2-D weight: Linear or Conv1D) or None."""
    if len(info.shape) in (3, 4, 5):
        return "conv"
    if len(info.shape) != 2:
        return None
    return "embedding" if module.rsplit(".", 1)[-1] in _EMBEDDING_MODULES else "matrix"


def _layout(module: str, info: TensorInfo, layouts: LayoutRules, where: Path) -> str:
    """``linear`` or ``conv1d`` for a selected 2-D weight; refused where nothing tells."""
    layout = layouts.layout(module)
    if layout is Layout.UNKNOWN:
        raise IncompatibleError(
            f"neither checkpoint has a config.json with a model_type, so whether this {info.shape} "
            "weight is an nn.Linear (stored (out, in)) or a GPT-2 Conv1D (stored (in, out)) "
            "cannot be known", path=where, tensor=info.name,
            hint="state it with --fan-in-fan-out MODULES|all|none (the Conv1D modules), or give "
            "the base as a directory holding its config.json",
        )  # fmt: skip
    return str(layout.value)


def _rules(
    target_modules: Sequence[str] | str, exclude_modules: Sequence[str] | None,
    layers_to_transform: Sequence[int] | None, layers_pattern: Sequence[str] | None,
    save_modules: Sequence[str], model_type: str | None,
) -> TargetRules:  # fmt: skip
    targets = target_modules if isinstance(target_modules, str) else tuple(target_modules)
    if layers_pattern and not layers_to_transform:
        raise OptionError("--layers-pattern names the layers that --layers-to-transform counts",
                          hint="give --layers-to-transform too")  # fmt: skip
    if layers_to_transform and isinstance(targets, str) and targets.lower() != "all-linear":
        raise OptionError("--layers-to-transform cannot filter a regex --target-modules (as in "
                          "PEFT)", hint="put the layer numbers in the regex")  # fmt: skip
    return TargetRules(
        target_modules=targets,
        exclude_modules=tuple(exclude_modules) if exclude_modules else None,
        layers_to_transform=tuple(layers_to_transform) if layers_to_transform else None,
        layers_pattern=tuple(layers_pattern) if layers_pattern else None,
        modules_to_save=tuple(re.escape(m) for m in save_modules),
        model_type=model_type,
    )


def _vocabulary_hint(module: str, base: TensorInfo, tuned: TensorInfo) -> str | None:
    last = module.rsplit(".", 1)[-1]
    embeddings = (*_EMBEDDING_MODULES, *OUTPUT_EMBEDDING_NAMES)
    if last not in embeddings or len(base.shape) != 2 or base.shape[1:] != tuned.shape[1:]:
        return None
    rows = tuned.shape[0]
    return (
        f"the vocabulary was resized from {base.shape[0]} to {rows} tokens: store the resized "
        f"modules whole with --save-modules (e.g. embed_tokens,lm_head), and resize the base to "
        f"{rows} tokens (model.resize_token_embeddings({rows})) before PEFT loads the adapter; "
        "or leave them out with --exclude-modules"
    )


def _mismatch(where: Path, module: str, base: TensorInfo | None,
              tuned: TensorInfo | None) -> IncompatibleError:  # fmt: skip
    """The error for a tensor missing from one checkpoint or with another shape there."""
    last = module.rsplit(".", 1)[-1] or module
    hint = f"leave its module out with --exclude-modules {last}"
    if tuned is None or base is None:
        name = base.name if base is not None else tuned.name if tuned is not None else module
        side = "the base but not in the tuned" if tuned is None else "the tuned but not the base"
        return IncompatibleError(f"is in {side} checkpoint", path=where, tensor=name, hint=hint)
    return IncompatibleError(
        f"shape {tuned.shape} in the tuned checkpoint, {base.shape} in the base", path=where,
        tensor=base.name, hint=_vocabulary_hint(module, base, tuned) or hint,
    )  # fmt: skip


def _pair(base: Checkpoint, tuned: Checkpoint, name: str, *, resized: bool = False) -> TensorInfo:
    """The tuned tensor of base tensor ``name``; ``resized`` allows more or fewer rows (a
    module stored whole after a vocabulary resize)."""
    info, mine = tuned.tensors.get(name), base.tensors[name]
    module = name.rpartition(".")[0]
    if info is None:
        raise _mismatch(tuned.path, module, mine, None)
    if info.shape != mine.shape and not (resized and _vocabulary_hint(module, mine, info)):
        raise _mismatch(tuned.path, module, mine, info)
    return info


def _selected(rules: TargetRules, module: str, kind: str | None, save: bool) -> bool:
    if kind is None or save:
        return False
    linear = kind == "matrix"
    if rules.all_linear:
        return linear and rules.selects(module)
    return rules.selects(module, linear=linear)


def plan_extraction(
    base: str | os.PathLike[str],
    tuned: str | os.PathLike[str],
    *,
    target_modules: Sequence[str] | str = "all-linear",
    exclude_modules: Sequence[str] | None = None,
    layers_to_transform: Sequence[int] | None = None,
    layers_pattern: Sequence[str] | None = None,
    save_modules: Sequence[str] = (),
    fan_in_fan_out: Sequence[str] | str | None = None,
) -> ExtractPlan:
    """Select the weights to extract with PEFT's targeting rules, from headers alone.

    Every tensor must be in both checkpoints with one shape, unless its module is in
    ``exclude_modules``; modules in ``save_modules`` may have more or fewer rows (a resized
    vocabulary). ``fan_in_fan_out`` states which 2-D weights are GPT-2 ``Conv1D`` (see
    ``extract``).

    Raises:
        LocationError, CheckpointError, IncompatibleError: a tensor is missing from one
            checkpoint or has another shape there; a 2-D weight's layout cannot be known.
        OptionError: nothing to extract; ``fan_in_fan_out`` contradicts config.json.
    """
    base_loc = resolve(base, role=Role.CHECKPOINT)
    tuned_loc = resolve(tuned, role=Role.CHECKPOINT)
    config = _model_config(base_loc.path, tuned_loc.path)
    model_type = config.get("model_type")
    rules = _rules(target_modules, exclude_modules, layers_to_transform, layers_pattern,
                   save_modules, model_type)  # fmt: skip
    layouts = LayoutRules.from_config(config, fan_in_fan_out)
    with open_checkpoint(base_loc.path) as b, open_checkpoint(tuned_loc.path) as t:
        modules, saved, others = _plan_tensors(b, t, rules, layouts, save_modules)
    unused = layouts.unused_names([m.module for m in modules if m.layout != "embedding"])
    if unused:
        raise OptionError(f"--fan-in-fan-out names {', '.join(unused)}, which matches no "
                          "extracted 2-D weight")  # fmt: skip
    if not modules:
        raise OptionError("no weight matches the target modules", hint="check --target-modules")
    _check_listed(b.tensors, "--save-modules", save_modules)
    _check_listed({**t.tensors, **b.tensors}, "--exclude-modules",
                  () if isinstance(exclude_modules, str) else exclude_modules or ())  # fmt: skip
    architectures = config.get("architectures") or []
    task = "CAUSAL_LM" if any(str(a).endswith("ForCausalLM") for a in architectures) else None
    return ExtractPlan(base_loc, tuned_loc, tuple(modules), tuple(saved), tuple(others),
                       model_type, task)  # fmt: skip


def _model_config(base: Path, tuned: Path) -> dict[str, Any]:
    """The base's config.json, else the tuned checkpoint's (the same architecture)."""
    config = read_config(base)
    return config if config.get("model_type") else read_config(tuned) or config


def _plan_tensors(
    b: Checkpoint, t: Checkpoint, rules: TargetRules, layouts: LayoutRules,
    save_modules: Sequence[str],
) -> tuple[list[ExtractModule], list[tuple[TensorInfo, TensorInfo]],
           list[tuple[TensorInfo, TensorInfo]]]:  # fmt: skip
    """Every base tensor: extracted, stored whole, or compared only (``others``). A tensor on
    one side only, or with another shape, is an error unless its module is excluded."""
    modules, saved, others = [], [], []
    for name, info in b.tensors.items():
        module, _, param = name.rpartition(".")
        save = _is_saved(module, save_modules)
        kind = _kind(module, info) if param == "weight" else None
        if _selected(rules, module, kind, save) and kind is not None:
            if info.dtype not in COMPUTE_DTYPES:
                raise IncompatibleError(f"cannot extract from a {info.dtype} tensor",
                                        path=b.path, tensor=name)  # fmt: skip
            layout = _layout(module, info, layouts, b.path) if kind == "matrix" else kind
            modules.append(ExtractModule(module, info, _pair(b, t, name), layout))
        elif save:
            saved.append((info, _pair(b, t, name, resized=True)))
        elif name in t.tensors and t.tensors[name].shape == info.shape:
            others.append((info, t.tensors[name]))
        elif not rules.excludes(module):
            raise _mismatch(t.path, module, info, t.tensors.get(name))
    for name, info in t.tensors.items():
        module = name.rpartition(".")[0]
        if name not in b.tensors and not rules.excludes(module):
            raise _mismatch(t.path, module, None, info)
    return modules, saved, others


def _check_listed(tensors: Mapping[str, TensorInfo], option: str, names: Sequence[str]) -> None:
    """Refuse a listed module that names no module of the checkpoints: a typo would be a
    no-op."""
    modules = {name.rpartition(".")[0] for name in tensors}
    for entry in names:
        if not any(m == entry or m.endswith("." + entry) for m in modules):
            raise OptionError(f"{option} {entry} matches no module of the checkpoints",
                              hint="check the name (a module suffix such as lm_head)")  # fmt: skip


def _is_saved(module: str, save_modules: Sequence[str]) -> bool:
    return any(module == s or module.endswith("." + s) for s in save_modules)


@dataclass(frozen=True)
class _Options:
    policy: RankPolicy
    alpha: float | None
    svd: SvdMethod
    dtype: str | None
    seed: int = 0

    @property
    def rank(self) -> int:
        """The rank of ``fixed``."""
        return self.policy.rank or DEFAULT_FIXED_RANK

    @property
    def compute_rank(self) -> int:
        """How many singular triplets to compute per module before ranks are chosen."""
        if self.policy.method is RankMethod.FIXED:
            return self.rank
        if self.policy.method is RankMethod.SV_CUMULATIVE:
            return sys.maxsize  # its fraction is of the sum of every singular value
        return self.policy.max_rank or DEFAULT_MAX_RANK


def _options(policy: RankPolicy, alpha: float | None, svd: str, dtype: str) -> _Options:
    check_finite("--alpha", alpha)
    if alpha is not None and alpha <= 0:
        raise OptionError(f"--alpha must be positive, not {alpha}")
    code = DType.code_of(dtype)
    method = choice(SvdMethod, svd, "svd method")
    if policy.method is RankMethod.SV_CUMULATIVE and method is not SvdMethod.EXACT:
        raise OptionError(
            "--rank-method sv_cumulative needs every singular value, which only --svd exact "
            "computes", hint="add --svd exact",
        )  # fmt: skip
    return _Options(policy, alpha, method, code)


@dataclass
class _Result:
    module: ExtractModule
    svd: Any  # lowrank.TruncatedSVD, on the CPU


def _delta_matrix(m: ExtractModule, base: Any, tuned: Any, work: Any) -> Any:
    """tuned - base in float32, in the reused ``work`` buffer (on the compute device), as the
    (out, in) matrix that B @ A approximates."""
    delta = work[: m.base.numel].view(m.base.shape)
    if work.device.type == "cpu" and delta.dim() > 0 and delta.numel() > _DELTA_BLOCK:
        _blocked_difference(delta.reshape(delta.shape[0], -1), tuned.reshape(delta.shape[0], -1),
                            base.reshape(delta.shape[0], -1))  # fmt: skip
    else:  # moved in the stored dtype (half the bytes for bf16), upcast on the device
        delta.copy_(tuned.to(work.device))
        delta.sub_(base.to(work.device))
    if m.layout in ("conv1d", "embedding"):
        return delta.t()  # stored (in, out) / (vocab, dim); PEFT's delta is (B @ A)ᵀ
    return delta.reshape(delta.shape[0], -1)


def _blocked_difference(delta: Any, tuned: Any, base: Any) -> None:
    """delta = tuned - base in float32, by blocks of rows that stay in cache: a subtraction
    with a bfloat16 operand converts on the fly and is ~3x slower than upcasting a block into
    a float32 scratch buffer first."""
    import torch

    rows = max(1, _DELTA_BLOCK // max(delta.shape[1], 1))
    scratch = torch.empty(rows, delta.shape[1], dtype=delta.dtype)
    for start in range(0, delta.shape[0], rows):
        block = delta[start : start + rows]
        block.copy_(tuned[start : start + rows])
        upcast = scratch[: block.shape[0]]
        upcast.copy_(base[start : start + rows])
        block.sub_(upcast)


def _to_cpu(svd: Any) -> Any:
    import dataclasses

    return dataclasses.replace(svd, u=svd.u.cpu(), s=svd.s.cpu(), vh=svd.vh.cpu())


def _decompose(
    plan: ExtractPlan, options: _Options, device: Any, progress: ProgressCallback | None
) -> tuple[list[_Result], int]:
    """Truncated SVD of every selected module's delta, streamed pair by pair."""
    import torch

    from . import lowrank, ops

    total = sum(m.base.nbytes + m.tuned.nbytes for m in plan.modules)
    done, skipped, results = 0, 0, []
    stop = threading.Event()
    generator = torch.Generator(device=device).manual_seed(options.seed)
    method = options.svd
    largest = max(max(m.base.nbytes, m.tuned.nbytes) for m in plan.modules)
    buffers = BufferPool(largest, 2 * 3)  # prefetch depth 2: three pairs at most
    work = torch.empty(max(m.base.numel for m in plan.modules), device=device)
    with TensorFiles() as files:
        for pair in (*plan.others, *plan.saved):  # compared at the end: read ahead meanwhile
            for info in pair:
                files.advise(info)

        def load(m: ExtractModule) -> tuple[bytearray, bytearray]:
            pair = buffers.acquire(stop), buffers.acquire(stop)
            files.read_into(m.base, memoryview(pair[0])[: m.base.nbytes])
            files.read_into(m.tuned, memoryview(pair[1])[: m.tuned.nbytes])
            return pair

        for m, (b, t) in prefetch(plan.modules, load, depth=2, stop=stop):
            done += m.base.nbytes + m.tuned.nbytes
            try:
                if _same_bytes(m, b, t):
                    skipped += 1  # equal in both checkpoints: nothing to extract
                else:
                    tensors = as_tensor(m.base, b), as_tensor(m.tuned, t)
                    delta = _delta_matrix(m, *tensors, work)
                    if not ops.all_finite(delta):
                        _refuse_non_finite(m, tensors)
                    del tensors
                    rank = min(options.compute_rank, *delta.shape)
                    svd = lowrank.truncated_svd(delta, rank, method=method, generator=generator)
                    results.append(_Result(m, _to_cpu(svd)))
            finally:
                buffers.release(b)
                buffers.release(t)
            if progress is not None:
                progress(done, total)
    return results, skipped


def _refuse_non_finite(m: ExtractModule, tensors: tuple[Any, Any]) -> None:
    check_finite_inputs(zip((m.base, m.tuned), tensors, strict=True),
                 hint="extract cannot decompose it; exclude it with --exclude-modules")  # fmt: skip
    raise IncompatibleError(
        "tuned - base overflows float32", path=m.tuned.path, tensor=m.tuned.name,
        hint="exclude it with --exclude-modules",
    )  # fmt: skip


def _read_ahead(plan: ExtractPlan) -> None:
    """Ask the kernel to read the first modules' tensors into the page cache, asynchronously
    (``posix_fadvise(WILLNEED)``, at most ``_READ_AHEAD_BYTES``)."""
    started = 0
    with TensorFiles() as files:
        for m in plan.modules:
            if started >= _READ_AHEAD_BYTES:
                break
            files.advise(m.base)
            files.advise(m.tuned)
            started += m.base.nbytes + m.tuned.nbytes


def _same_bytes(m: ExtractModule, b: bytearray, t: bytearray) -> bool:
    if m.base.dtype != m.tuned.dtype:
        return False
    with memoryview(b) as left, memoryview(t) as right:
        return left[: m.base.nbytes] == right[: m.tuned.nbytes]


def _module_factors(
    r: _Result, rank: int, layout: RankLayout, dtype: Any
) -> tuple[Any, Any, ModuleReport]:
    """The stored lora_A / lora_B (PEFT's layout for the module's type) and its report: the
    module's scaling under ``layout``'s one alpha folded into the factors before rounding,
    zero-padded to the stored rank."""
    from .lowrank import stored_rel_error
    from .ops import pad_rank

    m = r.module
    scaling = layout.scaling(m.module)
    a, b = r.svd.factors(rank, scaling)
    a, b = a.to(dtype), b.to(dtype)
    error = stored_rel_error(r.svd, rank, a, b, scaling)
    stored = layout.stored_rank(m.module)
    a, b = pad_rank(a, b, stored)
    if m.layout == "conv":
        shape = m.base.shape
        a = a.reshape(stored, *shape[1:])
        b = b.reshape(shape[0], stored, *([1] * (len(shape) - 2)))
    report = ModuleReport(m.module, list(m.matrix_shape), rank, layout.lora_alpha, error,
                          1 - error * error)  # fmt: skip
    return a.contiguous(), b.contiguous(), report


def _config(
    plan: ExtractPlan, names: list[str], layout: RankLayout, saved: list[str]
) -> dict[str, Any]:
    """adapter_config.json: exact module names as targets, one lora_alpha, and the stored
    ranks that differ from ``r`` as escaped full names, which cannot overlap."""
    return {
        "base_model_name_or_path": str(plan.base),
        "bias": "none",
        "fan_in_fan_out": any(m.layout == "conv1d" for m in plan.modules),
        "inference_mode": True,
        "init_lora_weights": True,
        "lora_dropout": 0.0,
        "modules_to_save": saved or None,
        "peft_type": "LORA",
        "target_modules": sorted(names),
        "task_type": plan.task_type,
        "use_dora": False,
        **layout.config(),
    }


def _squared_difference(base: TensorInfo, tuned: TensorInfo, files: TensorFiles) -> float | None:
    """||tuned - base||_F² in float64, None when the stored bytes are equal; read by chunks,
    so that memory stays small even for embeddings. NaN when they differ in a dtype that torch
    cannot decode (F4, F6_*): changed, by an unknown amount."""
    import torch

    if not (_measurable(base.dtype) and _measurable(tuned.dtype)):
        return _differ_as_bytes(base, tuned, files)
    equal, energy = base.dtype == tuned.dtype, 0.0
    sizes = DTYPES[base.dtype].bits // 8, DTYPES[tuned.dtype].bits // 8
    buffers = [bytearray(min(_COMPARE_CHUNK, base.numel) * size) for size in sizes]
    for start in range(0, base.numel, _COMPARE_CHUNK):
        count = min(_COMPARE_CHUNK, base.numel - start)
        views = [memoryview(buf)[: count * size] for buf, size in zip(buffers, sizes, strict=True)]
        for info, view, size in zip((base, tuned), views, sizes, strict=True):
            files.read_into(info, view, start=start * size)
        if equal and views[0] == views[1]:
            continue
        equal = False
        chunks = [torch.frombuffer(view, dtype=torch_dtype(info.dtype)).to(torch.float64)
                  for view, info in zip(views, (base, tuned), strict=True)]  # fmt: skip
        energy += float(torch.linalg.vecdot(chunks[1] - chunks[0], chunks[1] - chunks[0]))
    return None if equal else energy


def _measurable(code: str) -> bool:
    try:
        torch_dtype(code)
    except OptionError:
        return False
    return DTYPES[code].bits % 8 == 0


def _differ_as_bytes(base: TensorInfo, tuned: TensorInfo, files: TensorFiles) -> float | None:
    """None when the stored bytes are equal, NaN (an unknown difference) otherwise."""
    if base.dtype != tuned.dtype:
        return math.nan
    left, right = (
        bytearray(min(_COMPARE_CHUNK, base.nbytes)),
        bytearray(min(_COMPARE_CHUNK, base.nbytes)),
    )
    for start in range(0, base.nbytes, _COMPARE_CHUNK):
        count = min(_COMPARE_CHUNK, base.nbytes - start)
        files.read_into(base, memoryview(left)[:count], start=start)
        files.read_into(tuned, memoryview(right)[:count], start=start)
        if left[:count] != right[:count]:
            return math.nan
    return None


def _not_in_adapter(
    plan: ExtractPlan | DiffusionPlan, files: TensorFiles, module_energy: float
) -> list[dict[str, Any]]:
    """Tensors that differ between the checkpoints but are not in the adapter, with their share
    of the whole update's squared norm."""
    changed: list[tuple[str, float]] = []
    for b, t in plan.others:
        energy = _squared_difference(b, t, files)
        if energy is not None:
            changed.append((b.name, energy))
    pairs = plan.saved if isinstance(plan, ExtractPlan) else ()
    saved = [_squared_difference(b, t, files) or 0.0 for b, t in pairs if b.shape == t.shape]
    total = module_energy + math.fsum(e for e in (*saved, *(e for _, e in changed)) if e == e)
    # share None: the tensor changed in a dtype whose difference cannot be measured
    rows = [
        {"tensor": name, "share": None if e != e else (e / total if total else 0.0)}
        for name, e in sorted(changed, key=lambda x: -x[1] if x[1] == x[1] else 1.0)
    ]
    return rows


def _share(share: float | None) -> str:
    return "by an amount its dtype does not let us measure" if share is None else (
        f"{share:.2%} of the update")  # fmt: skip


def _output(
    out: Path, plan: ExtractPlan, tensors: list[tuple[str, Any]], config: dict[str, Any]
) -> Output:
    from .dtypes import code_of

    planned = [OutputTensor(k, code_of(v.dtype), tuple(v.shape)) for k, v in tensors]
    copies = [Copy(KEY_PREFIX + t.name, t) for _, t in plan.saved]
    return adapter_output(out, planned, copies, config)


@dataclass(frozen=True)
class _DiffusionJob:
    base: Location
    tuned: Location
    out: str | os.PathLike[str]
    output_format: str
    conv_rank: int | None
    min_te_diff: float


def _check_diffusion_options(
    target_modules: Sequence[str] | str, layers_to_transform: Sequence[int] | None,
    layers_pattern: Sequence[str] | None, save_modules: Sequence[str],
    fan_in_fan_out: Sequence[str] | str | None, uniform_rank: bool, conv_rank: int | None,
    policy: RankPolicy,
) -> None:  # fmt: skip
    """Options that cannot apply to diffusion checkpoints are refused, never ignored."""
    given = [name for name, value in (
        ("--layers-to-transform", layers_to_transform), ("--layers-pattern", layers_pattern),
        ("--save-modules", save_modules), ("--fan-in-fan-out", fan_in_fan_out),
        ("--uniform-rank", uniform_rank),
    ) if value]  # fmt: skip
    if isinstance(target_modules, str) and target_modules.lower() != "all-linear":
        given.append("--target-modules REGEX")
    if given:
        raise OptionError(f"{', '.join(given)} cannot apply to diffusion checkpoints",
                          hint="leave it out (--target-modules takes module names)")  # fmt: skip
    if conv_rank is not None and policy.method is not RankMethod.FIXED:
        raise OptionError("--conv-rank is the conv modules' rank of --rank-method fixed",
                          hint="energy and budget choose every module's rank")  # fmt: skip
    if conv_rank is not None and conv_rank < 1:
        raise OptionError(f"--conv-rank must be >= 1, not {conv_rank}")


def _check_transformers_options(
    output_format: str | None, conv_rank: int | None, min_te_diff: float | None
) -> None:
    if output_format not in (None, "peft"):
        raise OptionError(f"--format {output_format} is for diffusion checkpoints",
                          hint="a transformers checkpoint gives a PEFT adapter")  # fmt: skip
    if conv_rank is not None or min_te_diff is not None:
        option = "--conv-rank" if conv_rank is not None else "--min-te-diff"
        raise OptionError(f"{option} applies to diffusion checkpoints only")


def _extract_diffusion(
    job: _DiffusionJob, policy: RankPolicy, options: _Options,
    target_modules: Sequence[str] | str, exclude_modules: Sequence[str] | None,
    recorded: dict[str, Any], device: str, overwrite: bool,
    progress: ProgressCallback | None, started: float,
) -> ExtractReport:  # fmt: skip
    """``extract`` of two diffusion checkpoints: see ``extract_diffusion``."""
    from . import ops

    check_finite("--min-te-diff", job.min_te_diff)
    spelling = Spelling.KOHYA if job.output_format == "kohya" else Spelling.DIFFUSERS
    targets = None if isinstance(target_modules, str) else list(target_modules)
    plan, unpaired = plan_diffusion_extraction(
        job.base.path, job.tuned.path, spelling=spelling, target_modules=targets,
        exclude_modules=list(exclude_modules or ()),
    )  # fmt: skip
    out_path = engine.check_output(job.out, [job.base.path, job.tuned.path], overwrite=overwrite)
    record = provenance.start("extract", recorded, [("base", job.base), ("tuned", job.tuned)])
    outcome = extract_diffusion(
        plan, out_path, fmt=job.output_format, policy=policy, conv_rank=job.conv_rank,
        alpha=options.alpha, svd=options.svd, dtype=options.dtype,
        text_threshold=job.min_te_diff, device=ops.resolve_device(device), overwrite=overwrite,
        provenance=record, progress=progress, unpaired=unpaired,
    )  # fmt: skip
    with TensorFiles() as files:
        others = _not_in_adapter(plan, files, outcome.energy)
    notes = outcome.notes + [
        f"{row['tensor']} differs ({_share(row['share'])}) but is not in the LoRA"
        for row in others if row["share"] is None or row["share"] >= 0.01
    ]  # fmt: skip
    for note in notes:
        logger.warning(note)
    unchanged = [{"component": c.component.value, "modules": c.modules, "max_abs": c.max_abs}
                 for c in outcome.unchanged_text]  # fmt: skip
    return ExtractReport(
        out_path, outcome.modules, outcome.total_params, [], others, outcome.skipped_equal,
        options.svd.value, policy.method.value, time.monotonic() - started, notes, unchanged,
    )  # fmt: skip


def extract(
    base: str | os.PathLike[str],
    tuned: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    rank: int | None = None,
    alpha: float | None = None,
    target_modules: Sequence[str] | str = "all-linear",
    exclude_modules: Sequence[str] | None = None,
    layers_to_transform: Sequence[int] | None = None,
    layers_pattern: Sequence[str] | None = None,
    rank_method: str = "fixed",
    energy: float | None = None,
    param_budget: int | None = None,
    min_rank: int = 1,
    max_rank: int | None = None,
    sv_ratio: float | None = None,
    sv_cumulative: float | None = None,
    svd: str = "randomized",
    save_modules: Sequence[str] = (),
    dtype: str = "auto",
    fan_in_fan_out: Sequence[str] | str | None = None,
    uniform_rank: bool = False,
    output_format: str | None = None,
    conv_rank: int | None = None,
    min_te_diff: float | None = None,
    device: str = "auto",
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
) -> ExtractReport:
    """Extract a LoRA adapter from ``tuned - base`` by truncated SVD.

    For each selected weight, ``scaling · B @ A`` is a truncated SVD of ``delta = tuned - base``
    (float32): the best rank-r approximation with ``svd="exact"``, within 1% of its error with
    the default ``randomized``. Singular values are split evenly between A and B. Weights equal
    in both checkpoints are skipped. The output is a PEFT adapter directory that
    ``PeftModel.from_pretrained(base_model, out)`` loads, written atomically.

    Args:
        base, tuned: checkpoint directories, ``.safetensors`` files or Hub repo ids.
        out: the adapter directory to write.
        rank: the rank of ``fixed``; alpha: the one ``lora_alpha`` (default: the config's
            ``r``). Each module's scaling is folded into its factors, so there is never an
            alpha_pattern: PEFT, llama.cpp and vLLM all apply ``lora_alpha / rank``.
        target_modules: names, a regex, or ``all-linear`` (PEFT's rules).
        rank_method: ``fixed``; ``energy`` (smallest rank keeping fraction ``energy`` of each
            delta's squared norm; kohya's sv_fro P is energy P²); ``budget`` (``param_budget``
            LoRA parameters in total, spent where they remove the most squared error);
            ``sv_ratio`` (kohya's: singular values >= the largest / ``sv_ratio``);
            ``sv_cumulative`` (kohya's: the smallest rank whose singular values sum to
            fraction ``sv_cumulative`` of them all; needs ``svd="exact"``).
        min_rank, max_rank: bounds of every rank (max defaults to 128 for the methods other
            than fixed, sv_cumulative excepted).
        svd: ``randomized`` (default) or ``exact``.
        exclude_modules: modules never extracted; their tensors may also be missing from one
            checkpoint or differ in shape (any other such tensor is an error).
        save_modules: modules stored whole (e.g. ``["embed_tokens", "lm_head"]``); after a
            vocabulary resize they keep the tuned rows (the base must be resized to load them).
        dtype: factor dtype; ``auto`` is each weight's dtype in the base.
        fan_in_fan_out: which 2-D weights are GPT-2 ``Conv1D`` (stored (in, out)): ``"all"``,
            ``"none"``, or module names (the others are ``nn.Linear``). Needed only when
            neither checkpoint has a config.json; a contradiction with it is an error.
        uniform_rank: store every module at the largest rank, zero-padded, with no
            rank_pattern (vLLM ignores rank_pattern).
        output_format: ``peft``, ``kohya`` or ``diffusers`` (None: ``peft`` for transformers
            checkpoints, ``kohya`` for diffusion checkpoints, see below).
        conv_rank: diffusion checkpoints: the rank of k×k convs under ``fixed`` (None: ``rank``).
        min_te_diff: diffusion checkpoints: a text encoder whose max |tuned - base| is at most
            this is left out as unchanged (None: 0.01, sd-scripts' ``--min_diff``).

    Two diffusion checkpoints of one layout (LDM/SGM single files, diffusers folders,
    UNet-only or FLUX files) give a diffusion LoRA instead: the modules sd-scripts' extractor
    covers (attention, feed-forward, proj, resnet and sampler convs, text-encoder projections;
    FLUX block attention and MLP), stored as it stores them (``lora_up = U·S``, ``lora_down =
    Vh``, ``alpha = r``, unless ``alpha`` is given). ``target_modules`` (a list) narrows them
    by name; ``exclude_modules`` leaves modules out. ``layers_to_transform``,
    ``layers_pattern``, ``save_modules``, ``fan_in_fan_out`` and ``uniform_rank`` do not
    apply there.

    Raises:
        LocationError, CheckpointError, IncompatibleError, OptionError, OutputError.
    """
    recorded = provenance.options_of(extract, locals())  # first: the arguments only
    started = time.monotonic()
    policy = RankPolicy(choice(RankMethod, rank_method, "rank method"), rank, energy,
                        param_budget, min_rank, max_rank, sv_ratio, sv_cumulative)  # fmt: skip
    options = _options(policy, alpha, svd, dtype)
    base_loc = resolve(base, role=Role.CHECKPOINT)
    tuned_loc = resolve(tuned, role=Role.CHECKPOINT)
    if is_diffusion_checkpoint(base_loc.path) or is_diffusion_checkpoint(tuned_loc.path):
        _check_diffusion_options(
            target_modules, layers_to_transform, layers_pattern, save_modules, fan_in_fan_out,
            uniform_rank, conv_rank, policy,
        )  # fmt: skip
        threshold = DEFAULT_TEXT_THRESHOLD if min_te_diff is None else min_te_diff
        job = _DiffusionJob(base_loc, tuned_loc, out, output_format or "kohya", conv_rank,
                            threshold)  # fmt: skip
        return _extract_diffusion(job, policy, options, target_modules, exclude_modules,
                                  recorded, device, overwrite, progress, started)  # fmt: skip
    _check_transformers_options(output_format, conv_rank, min_te_diff)
    plan = plan_extraction(
        base, tuned, target_modules=target_modules, exclude_modules=exclude_modules,
        layers_to_transform=layers_to_transform, layers_pattern=layers_pattern,
        save_modules=save_modules, fan_in_fan_out=fan_in_fan_out,
    )  # fmt: skip
    out_path = engine.check_output(out, [plan.base.path, plan.tuned.path], overwrite=overwrite)
    record = provenance.start("extract", recorded, [("base", plan.base), ("tuned", plan.tuned)])
    _read_ahead(plan)  # the disk starts on the first modules while torch is imported
    from . import lowrank, ops

    results, skipped = _decompose(plan, options, ops.resolve_device(device), progress)
    if not results:
        raise IncompatibleError(  # the inputs, not the options, are at fault: exit 1
            "the selected weights are equal in both checkpoints; nothing to extract",
            path=plan.tuned.path, hint="is TUNED a fine-tune of BASE?",
        )  # fmt: skip
    ranks = lowrank.select_by_policy(
        [r.svd for r in results], [r.module.matrix_shape for r in results], policy, options.rank
    )
    names = [r.module.module for r in results]
    layout = RankLayout.of(dict(zip(names, ranks, strict=True)), alpha=options.alpha,
                           uniform=uniform_rank)  # fmt: skip
    tensors, modules = [], []
    for r, k in zip(results, ranks, strict=True):
        stored = torch_dtype(options.dtype or r.module.base.dtype)
        a, b, report = _module_factors(r, k, layout, stored)
        key_a, key_b = lora_keys(r.module.module, embedding=r.module.layout == "embedding")
        tensors += [(key_a, a), (key_b, b)]
        modules.append(report)
    saved_names = sorted({t.name.rpartition(".")[0] for _, t in plan.saved})
    config = _config(plan, names, layout, saved_names)
    with TensorFiles() as files:
        others = _not_in_adapter(plan, files, sum(r.svd.total_energy for r in results))
    output = dataclasses.replace(_output(out_path, plan, tensors, config), provenance=record)
    engine.run(output,
               lambda _: (Computed(k, v) for k, v in tensors), overwrite=overwrite)  # fmt: skip
    total_params = sum(int(t.numel()) for _, t in tensors)
    notes = layout.notes({r.module.module: sum(r.module.matrix_shape) for r in results})
    notes += [f"{row['tensor']} differs ({_share(row['share'])}) but is not in the adapter"
             for row in others if row["share"] is None or row["share"] >= 0.01]  # fmt: skip
    notes += [f"{t.name} is stored whole with {t.shape[0]} rows (the base has {b.shape[0]}): "
              f"resize the base to {t.shape[0]} tokens before loading the adapter"
              for b, t in plan.saved if b.shape != t.shape]  # fmt: skip
    for note in notes:
        logger.warning(note)
    return ExtractReport(
        out_path, modules, total_params, saved_names, others, skipped, options.svd.value,
        policy.method.value, time.monotonic() - started, notes,
    )  # fmt: skip

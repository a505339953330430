"""Adapter arithmetic without a model: ``plan_combine`` and ``combine``.

PEFT's ``add_weighted_adapter`` on the adapter files alone (shared/spec/peft-lora.md §6): the
factor-wise methods (linear, ties, dare_linear, dare_ties, magnitude_prune) merge lora_A and
lora_B separately, ``cat`` stacks them, and ``svd=True`` takes each method's ``_svd`` variant,
a truncated SVD of the combined delta. A weighted sum of LoRA deltas is decomposed from its
factors (``lowrank.product_svd``), without forming the full matrix; only the pruning methods
need it. Modules stream one at a time: memory holds one module's factors, not the adapters.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import engine, provenance
from .adapters import (
    Adapter,
    LoraModule,
    RankLayout,
    adapter_output,
    lora_keys,
    open_adapter,
    report_dict,
)
from .dtypes import DType
from .engine import Computed, Output
from .errors import AdapterError, IncompatibleError, OptionError
from .locations import Location, Role, resolve
from .options import CombineMethod, CombineOptions, MajoritySign, choice
from .reader import TensorFiles, TensorInfo, check_finite_inputs
from .writer import OutputTensor

if TYPE_CHECKING:
    import torch

__all__ = [
    "CombinePlan",
    "CombineReport",
    "CombinedModule",
    "combine",
    "plan_combine",
]

logger = logging.getLogger(__name__)

ProgressCallback = engine.ProgressCallback
#: ``masks(module, part, source)``: the 0/1 DARE mask of one source tensor (part "lora_A",
#: "lora_B" or "delta"), to replay another tool's random draws; None draws from ``seed``.
MaskSource = Callable[[str, str, int], "torch.Tensor"]


@dataclass(frozen=True)
class Source:
    """One adapter's LoRA on a module: its position among the inputs, the user's weight."""

    adapter: int
    weight: float
    lora: LoraModule

    @property
    def coefficient(self) -> float:
        """c = weight · scaling: the source contributes c · B @ A to the exact sum."""
        return self.weight * self.lora.scaling


@dataclass(frozen=True)
class PlannedModule:
    """One module of the combined adapter: its sources in input order, the output rank, the
    (out, in) shape of B @ A (in flattened for convs) and the output dtype code."""

    module: str
    sources: tuple[Source, ...]
    rank: int
    shape: tuple[int, int]
    dtype: str

    @property
    def embedding(self) -> bool:
        return self.sources[0].lora.embedding

    def output_tensors(self, rank: int) -> tuple[OutputTensor, OutputTensor]:
        """lora_A and lora_B as stored at ``rank`` (the module's own, or padded to it)."""
        a, b = self.sources[0].lora.lora_a.shape, self.sources[0].lora.lora_b.shape
        key_a, key_b = lora_keys(self.module, embedding=self.embedding)
        return (
            OutputTensor(key_a, self.dtype, (rank, *a[1:])),
            OutputTensor(key_b, self.dtype, (b[0], rank, *b[2:])),
        )


@dataclass(frozen=True)
class CombinePlan:
    """What ``combine`` will do, from headers alone."""

    adapters: tuple[Location, ...]
    weights: tuple[float, ...]
    method: CombineMethod
    svd: bool
    clamp: float | None
    density: float
    majority_sign: MajoritySign
    modules: tuple[PlannedModule, ...]
    copies: tuple[TensorInfo, ...]  # stored whole, unchanged (modules_to_save, biases, tokens)
    config: dict[str, Any]
    notes: tuple[str, ...]
    layout: RankLayout


@dataclass(frozen=True)
class CombinedModule:
    """One module of the combined adapter, as in the report: ``rel_error`` is how far its
    ``scaling · B @ A`` (as stored) lies from the exact weighted sum Σ_i w_i·s_i·B_i @ A_i,
    relative to that sum."""

    module: str
    shape: list[int]
    rank: int
    adapters: int
    rel_error: float


@dataclass(frozen=True)
class CombineReport:
    """The combination's figures; ``to_dict()`` is its JSON form."""

    out: Path
    method: str
    modules: list[CombinedModule]
    total_params: int
    copied: list[str]
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return report_dict(self)


# ---------------------------------------------------------------------------------------------
# Planning


@dataclass(frozen=True)
class CombineSettings:
    """The checked values of a combine: method, SVD, weights, rank, clamp, density, sign
    method and output dtype code."""

    method: CombineMethod
    svd: bool
    weights: tuple[float, ...]
    rank: int | None
    clamp: float | None
    density: float
    majority_sign: MajoritySign
    dtype: str | None


def _options(
    count: int, weights: Sequence[float] | None, spec: CombineOptions, dtype: str
) -> CombineSettings:
    if count < 1:
        raise OptionError("give at least one adapter")
    values = tuple(float(w) for w in weights) if weights else (1.0,) * count
    if len(values) != count or not all(math.isfinite(w) for w in values):
        raise OptionError(
            f"give one finite --weight per adapter: {count} adapters, {len(values)} weights"
        )
    if count == 1 and (spec.method is not CombineMethod.LINEAR or spec.svd):
        raise OptionError(  # PEFT silently uses linear for a single adapter
            "one adapter can only be scaled by its weight (linear); --method and --svd need two "
            "or more", hint="use `lorasurgeon resize` to change its rank",
        )  # fmt: skip
    code = DType.code_of(dtype)
    return CombineSettings(spec.method, spec.svd, values, spec.rank, spec.clamp,
                           spec.density or 1.0, spec.sign, code)  # fmt: skip


def _natural_key(module: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", module)]


def _check_shapes(module: str, sources: Sequence[Source], adapters: Sequence[Adapter]) -> None:
    first = sources[0].lora
    for s in sources[1:]:
        lora = s.lora
        if (lora.embedding != first.embedding or lora.lora_a.shape[1:] != first.lora_a.shape[1:]
                or lora.lora_b.shape[:1] + lora.lora_b.shape[2:]
                != first.lora_b.shape[:1] + first.lora_b.shape[2:]):  # fmt: skip
            where = adapters[sources[0].adapter].path
            raise IncompatibleError(
                f"lora_A {lora.lora_a.shape} / lora_B {lora.lora_b.shape} here but "
                f"{first.lora_a.shape} / {first.lora_b.shape} in {where}",
                path=adapters[s.adapter].path, tensor=module,
                hint="the adapters were trained on different base models",
            )  # fmt: skip


def output_rank(
    options: CombineSettings, ranks: Sequence[int], shape: tuple[int, int], svd_rank: int,
    module: str, inputs: Sequence[str],
) -> int:  # fmt: skip
    """The rank of one combined module: the --svd rank (at most what the sum or the matrix
    holds), the summed ranks for cat, the one shared rank for the factor-wise methods.

    Raises:
        OptionError: a factor-wise method over modules of different ranks (``module`` in
            ``inputs``).
    """
    if options.svd:
        available = sum(ranks) if options.method is CombineMethod.LINEAR else min(shape)
        return min(svd_rank, available, *shape)
    if options.method is CombineMethod.CAT:
        return sum(ranks)
    if len(set(ranks)) > 1:
        raise OptionError(
            f"{options.method.value} merges the down (A) and up (B) factors element by element "
            f"and needs equal ranks, but {module} has ranks {list(ranks)} in "
            + ", ".join(inputs),
            hint="--method cat or --svd combine any ranks",
        )  # fmt: skip
    return ranks[0]


def _plan_modules(adapters: Sequence[Adapter], options: CombineSettings) -> list[PlannedModule]:
    names = sorted({m for a in adapters for m in a.modules}, key=_natural_key)
    # PEFT's default svd rank: the largest rank any input may hold (r and rank_pattern values)
    svd_rank = options.rank or max(
        max([a.config.r, *(int(v) for v in a.config.rank_pattern.values())]) for a in adapters
    )
    planned = []
    for name in names:
        sources = [Source(i, options.weights[i], a.modules[name])
                   for i, a in enumerate(adapters) if name in a.modules]  # fmt: skip
        _check_shapes(name, sources, adapters)
        first = sources[0].lora
        shape = (first.lora_b.shape[0], math.prod(first.lora_a.shape[1:]))
        ranks = [s.lora.rank for s in sources]
        inputs = [str(adapters[s.adapter].path) for s in sources]
        rank = output_rank(options, ranks, shape, svd_rank, name, inputs)
        dtype = options.dtype or "F32"  # PEFT's: it computes on float32 copies
        planned.append(PlannedModule(name, tuple(sources), rank, shape, dtype))
    if not planned:
        raise AdapterError("the adapters hold no LoRA modules to combine",
                           path=adapters[0].path)  # fmt: skip
    return planned


def _same_bytes(left: TensorInfo, right: TensorInfo, files: TensorFiles) -> bool:
    return (
        left.dtype == right.dtype
        and left.shape == right.shape
        and (files.read(left) == files.read(right))
    )


def _plan_copies(adapters: Sequence[Adapter]) -> list[TensorInfo]:
    """Tensors stored whole, from whichever adapter has them; a name two adapters store with
    different values cannot be combined."""
    chosen: dict[str, tuple[int, TensorInfo]] = {}
    with TensorFiles() as files:
        for i, adapter in enumerate(adapters):
            base_copies = {adapter.replacements[n].name for n in adapter.embedding_copies}
            infos = [*adapter.replacements.values(), *(t for _, t in adapter.token_rows.values())]
            for info in infos:
                if info.name not in chosen:
                    chosen[info.name] = (i, info)
                    continue
                other = adapters[chosen[info.name][0]]
                if _same_bytes(chosen[info.name][1], info, files):
                    continue
                base_copy = info.name in base_copies
                raise IncompatibleError(
                    f"also stored whole, with other values, in {other.path}"
                    + ("; the adapters were trained on different base embeddings" if base_copy
                       else " (modules_to_save, biases or tokens); PEFT refuses this too"),
                    path=adapter.checkpoint.path, tensor=info.name,
                    hint="combine adapters that store different modules whole",
                )  # fmt: skip
    return [info for _, info in chosen.values()]


def _merged_field(adapters: Sequence[Adapter], key: str) -> Any:
    """The one non-empty value of a config field among the adapters (an error if two differ)."""
    values = [(a, a.config.raw.get(key)) for a in adapters if a.config.raw.get(key)]
    for adapter, value in values[1:]:
        if value != values[0][1]:
            raise AdapterError(f"{key} differs from {values[0][0].config.path}'s",
                               path=adapter.config.path)  # fmt: skip
    return values[0][1] if values else None


def _config(
    adapters: Sequence[Adapter], modules: Sequence[PlannedModule], layout: RankLayout
) -> dict[str, Any]:
    """adapters[0]'s config (as PEFT), with exact module names as targets, each module's own
    rank (or the largest, ``uniform``), one lora_alpha (the config's r: scaling 1 there;
    other modules' scalings folded into their factors; rslora off, which PEFT would keep and
    so scale the result by sqrt(rank)), and the union of what the adapters store whole."""
    config = dict(adapters[0].config.raw)
    config.update(layout.config())
    saved = sorted({str(n) for a in adapters for n in a.config.raw.get("modules_to_save") or ()})
    biases = {str(a.config.raw.get("bias", "none")) for a in adapters}
    config.update(
        target_modules=[m.module for m in modules], layers_to_transform=None,
        layers_pattern=None, exclude_modules=None, use_rslora=False, use_dora=False,
        lora_bias=False, inference_mode=True, modules_to_save=saved or None,
        bias=next((b for b in ("all", "lora_only") if b in biases), "none"),
        fan_in_fan_out=any(a.config.raw.get("fan_in_fan_out") for a in adapters),
        trainable_token_indices=_merged_field(adapters, "trainable_token_indices"),
    )  # fmt: skip
    return config


def _notes(adapters: Sequence[Adapter], options: CombineSettings, count: int) -> list[str]:
    notes = []
    if count == 1:
        notes.append("one adapter: it is scaled by its weight (PEFT's linear); to change its "
                     "rank use `lorasurgeon resize`")  # fmt: skip
    bases = {str(a.config.raw.get("base_model_name_or_path")) for a in adapters}
    if len(bases) > 1:
        notes.append(f"the adapters name different bases ({', '.join(sorted(bases))}); their "
                     "shapes agree, so they were combined")  # fmt: skip
    for a in adapters:
        if a.ignored:
            notes.append(f"{a.path}: {len(a.ignored)} LoRA modules its config does not select "
                         "were left out, as PEFT ignores them")  # fmt: skip
    return notes


def plan_combine(
    adapters: Sequence[str | os.PathLike[str]],
    *,
    weights: Sequence[float] | None = None,
    method: str = "linear",
    svd: bool = False,
    rank: int | None = None,
    clamp: float | None = None,
    density: float | None = None,
    majority_sign: str | None = None,
    dtype: str = "auto",
    seed: int | None = None,
    uniform_rank: bool = False,
) -> CombinePlan:
    """Plan ``combine`` from the adapters' headers; every error visible there surfaces here.

    Raises:
        LocationError, AdapterError, IncompatibleError, OptionError.
    """
    sign = None if majority_sign is None else choice(MajoritySign, majority_sign, "majority sign")
    spec = CombineOptions(choice(CombineMethod, method, "method"), svd, rank, clamp, density,
                          sign, seed)  # fmt: skip
    options = _options(len(adapters), weights, spec, dtype)
    locations = tuple(resolve(a, role=Role.ADAPTER) for a in adapters)
    opened: list[Adapter] = []
    try:
        for loc in locations:
            opened.append(open_adapter(loc.path, file_targets=True))
            opened[-1].require_plain_lora("combine")
        modules = _plan_modules(opened, options)
        copies = _plan_copies(opened)
        layout = RankLayout.of({m.module: m.rank for m in modules}, uniform=uniform_rank)
        config = _config(opened, modules, layout)
        notes = _notes(opened, options, len(adapters))
        notes += layout.notes({m.module: sum(m.shape) for m in modules})
    finally:
        for a in opened:
            a.close()
    return CombinePlan(
        locations, options.weights, options.method, options.svd, options.clamp,
        options.density, options.majority_sign, tuple(modules), tuple(copies), config,
        tuple(notes), layout,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Execution


@dataclass
class ModuleFactors:
    """A source's factors on the device, float32, as stored (conv shapes kept)."""

    a: torch.Tensor
    b: torch.Tensor

    @property
    def a2(self) -> torch.Tensor:
        return self.a.reshape(self.a.shape[0], -1)

    @property
    def b2(self) -> torch.Tensor:
        return self.b.reshape(self.b.shape[0], -1)


def _masks(
    plan: CombinePlan, m: PlannedModule, part: str, shapes: Sequence[torch.Size],
    masks: MaskSource | None, generator: torch.Generator,
) -> list[torch.Tensor] | None:  # fmt: skip
    import torch

    from . import ops

    if not plan.method.random or plan.density >= 1:
        return None
    if masks is not None:
        return [masks(m.module, part, s.adapter).to(generator.device, torch.float32)
                for s in m.sources]  # fmt: skip
    return [ops.random_mask(shape, plan.density, generator=generator, device=generator.device)
            for shape in shapes]  # fmt: skip


def _factor_wise(
    plan: CombinePlan, m: PlannedModule, factors: Sequence[ModuleFactors], masks: MaskSource | None,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """PEFT's factor-wise methods: A and B merged separately with weights ±sqrt(|c_i|)."""
    from . import ops

    roots = [math.sqrt(abs(s.coefficient)) for s in m.sources]
    weights_a = [r if s.coefficient >= 0 else -r for r, s in zip(roots, m.sources, strict=True)]
    combination = plan.method
    kwargs: dict[str, Any] = {"density": plan.density, "sign_method": plan.majority_sign}
    masks_a = _masks(plan, m, "lora_A", [f.a.shape for f in factors], masks, generator)
    masks_b = _masks(plan, m, "lora_B", [f.b.shape for f in factors], masks, generator)
    a = ops.combine_tensors([f.a for f in factors], weights_a, combination, masks=masks_a,
                            **kwargs)  # fmt: skip
    b = ops.combine_tensors([f.b for f in factors], roots, combination, masks=masks_b, **kwargs)
    return a, b


def _svd_factors(
    plan: CombinePlan, m: PlannedModule, factors: Sequence[ModuleFactors], masks: MaskSource | None,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """PEFT's ``_svd`` variants: the rank-k truncated SVD of the combined delta, all singular
    values in B. A weighted sum is decomposed from its factors, the rest densely."""

    from . import lowrank, ops

    if plan.method is CombineMethod.LINEAR:
        left, right = _exact_sum(m, factors)
        svd = lowrank.product_svd(left, right, m.rank)
    else:
        deltas = [(f.b2 @ f.a2) * s.lora.scaling for f, s in zip(factors, m.sources, strict=True)]
        shapes = [d.shape for d in deltas]
        combined = ops.combine_tensors(
            deltas, [s.weight for s in m.sources], plan.method,
            density=plan.density, sign_method=plan.majority_sign,
            masks=_masks(plan, m, "delta", shapes, masks, generator),
        )  # fmt: skip
        del deltas
        svd = lowrank.truncated_svd(combined, m.rank, method=lowrank.SvdMethod.EXACT)
    a, b = svd.factors(m.rank, 1.0, balanced=False)
    if plan.clamp is not None:
        a, b = lowrank.clamp_factors(a, b, plan.clamp)
    first = factors[0]
    return a.reshape(m.rank, *first.a.shape[1:]), b.reshape(first.b.shape[0], m.rank,
                                                            *first.b.shape[2:])  # fmt: skip


def combine_module(
    plan: CombinePlan, m: PlannedModule, factors: Sequence[ModuleFactors], masks: MaskSource | None,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    import torch

    if plan.svd:
        return _svd_factors(plan, m, factors, masks, generator)
    if plan.method is CombineMethod.CAT:
        # PEFT's order of roundings: (A · weight) · scaling
        a = torch.cat([f.a * s.weight * s.lora.scaling
                       for f, s in zip(factors, m.sources, strict=True)], dim=0)  # fmt: skip
        return a, torch.cat([f.b for f in factors], dim=1)
    return _factor_wise(plan, m, factors, masks, generator)


def _exact_sum(m: PlannedModule, factors: Sequence[ModuleFactors]) -> tuple[Any, Any]:
    """Σ c_i B_i A_i as one product left @ right of stacked float64 factors."""
    import torch

    left = torch.cat([f.b2.double() * s.coefficient
                      for f, s in zip(factors, m.sources, strict=True)], dim=1)  # fmt: skip
    return left, torch.cat([f.a2.double() for f in factors], dim=0)


def departure_note(
    m: PlannedModule, factors: Sequence[ModuleFactors], a: Any, b: Any, scaling: float
) -> float:
    """||Σ c_i B_i A_i - scaling·B @ A||_F / ||Σ c_i B_i A_i||_F from Gram matrices (float64)."""
    from .lowrank import relative_distance

    left, right = _exact_sum(m, factors)
    return relative_distance(left, right, b.reshape(b.shape[0], -1).double() * scaling,
                             a.reshape(a.shape[0], -1).double())  # fmt: skip


def fold_scaling(a: Any, b: Any, scaling: float) -> tuple[Any, Any]:
    """Factors with B @ A = delta rescaled so that scaling · B @ A = delta: each by
    1 / sqrt(scaling), in float64, unchanged where scaling is 1."""
    import torch

    if scaling == 1:
        return a, b
    root = 1 / math.sqrt(scaling)
    return ((a.to(torch.float64) * root).to(torch.float32),
            (b.to(torch.float64) * root).to(torch.float32))  # fmt: skip


def _load(files: TensorFiles, m: PlannedModule, device: torch.device) -> list[ModuleFactors]:
    import torch

    factors = []
    for s in m.sources:
        a, b = files.load(s.lora.lora_a), files.load(s.lora.lora_b)
        check_finite_inputs([(s.lora.lora_a, a), (s.lora.lora_b, b)],
                            hint="combining it would write NaN/inf into the result")  # fmt: skip
        factors.append(
            ModuleFactors(a.to(device).to(torch.float32), b.to(device).to(torch.float32))
        )
    return factors


def _computed(
    plan: CombinePlan, device: torch.device, seed: int, masks: MaskSource | None,
    rows: list[CombinedModule],
) -> Callable[[TensorFiles], Iterator[Computed]]:  # fmt: skip
    """Each module's combined factors as the engine's stream, one module in memory at a time;
    its report row is appended to ``rows``."""

    def produce(files: TensorFiles) -> Iterator[Computed]:
        import torch

        from .dtypes import torch_dtype
        from .ops import pad_rank

        generator = torch.Generator(device=device).manual_seed(seed)
        for m in plan.modules:
            factors = _load(files, m, device)
            scaling = plan.layout.scaling(m.module)
            a, b = fold_scaling(*combine_module(plan, m, factors, masks, generator), scaling)
            a, b = a.to(torch_dtype(m.dtype)), b.to(torch_dtype(m.dtype))
            error = departure_note(m, factors, a, b, scaling)
            a, b = pad_rank(a, b, plan.layout.stored_rank(m.module))
            rows.append(CombinedModule(m.module, list(m.shape), m.rank, len(m.sources), error))
            key_a, key_b = lora_keys(m.module, embedding=m.embedding)
            yield Computed(key_a, a.cpu())
            yield Computed(key_b, b.cpu())

    return produce


def _output(plan: CombinePlan, out: Path) -> Output:
    planned = [t for m in plan.modules
               for t in m.output_tensors(plan.layout.stored_rank(m.module))]  # fmt: skip
    return adapter_output(out, planned, plan.copies, plan.config)


def linear_note(plan: CombinePlan, rows: Sequence[CombinedModule]) -> list[str]:
    shared = [r.rel_error for r in rows if r.adapters > 1]
    if plan.method is not CombineMethod.LINEAR or plan.svd or not shared:
        return []
    return [
        f"linear combines lora_A and lora_B separately, as PEFT does: {len(shared)} modules "
        "that several adapters share gain cross terms B_i @ A_j and lie up to "
        f"{max(shared):.0%} from the exact weighted sum; --method cat or --svd give that sum"
    ]


def _lora_files(adapters: Sequence[str | os.PathLike[str]]) -> list[Location] | None:
    """The inputs resolved, when they are diffusion LoRA files; None for PEFT adapters.

    Raises:
        OptionError: LoRA files mixed with PEFT adapter directories.
    """
    from .diffusion import is_lora_file

    if not adapters:
        return None
    locations = [resolve(a, role=Role.ADAPTER) for a in adapters]
    found = [is_lora_file(loc.path) for loc in locations]
    if not any(found):
        return None
    if not all(found):
        raise OptionError(
            "diffusion LoRA files (.safetensors) cannot be combined with PEFT "
            "adapter directories; convert one side first (`lorasurgeon convert`)"
        )
    return locations


def _combine_files(
    locations: list[Location], out: str | os.PathLike[str], recorded: dict[str, Any], *,
    weights: Sequence[float] | None, spec: CombineOptions, dtype: str,
    output_format: str | None, uniform_rank: bool, device: str, overwrite: bool,
    progress: ProgressCallback | None, masks: MaskSource | None,
) -> CombineReport:  # fmt: skip
    """``combine`` of diffusion LoRA files (``sdlora.combine_files``)."""
    from .ops import resolve_device
    from .sdlora import combine_files

    options = _options(len(locations), weights, spec, dtype)
    if uniform_rank:
        raise OptionError("--uniform-rank applies to PEFT adapters: kohya and diffusers files "
                          "store each module's rank in its tensors")  # fmt: skip
    out_path = engine.check_output(out, [loc.path for loc in locations], overwrite=overwrite)
    record = provenance.start("combine", recorded, [("adapter", loc) for loc in locations])
    report = combine_files(
        locations, out_path, options=options, fmt=output_format, seed=spec.seed or 0,
        device=resolve_device(device), overwrite=overwrite, record=record, progress=progress,
        masks=masks,
    )  # fmt: skip
    for note in report.notes:
        logger.warning(note)
    return report


def combine(
    adapters: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    weights: Sequence[float] | None = None,
    method: str = "linear",
    svd: bool = False,
    rank: int | None = None,
    clamp: float | None = None,
    density: float | None = None,
    majority_sign: str | None = None,
    seed: int | None = None,
    uniform_rank: bool = False,
    dtype: str = "auto",
    output_format: str | None = None,
    device: str = "auto",
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    masks: MaskSource | None = None,
) -> CombineReport:
    """Combine LoRA adapters into one, as PEFT's ``add_weighted_adapter`` would.

    The result matches ``add_weighted_adapter(adapters, weights, combination_type)`` where the
    type is ``method``, or with ``svd`` its ``_svd`` variant (``linear`` + ``svd`` is PEFT's
    ``svd``), ``svd_rank=rank``, ``svd_clamp=clamp``, ``density``, ``majority_sign_method``.
    Differences from PEFT, all deliberate: adapters with different targets combine over the
    union of their modules (PEFT applies adapters[0]'s layer filter to all); each module is
    written at its true rank, with rank_pattern (PEFT pads with zeros, or writes factors its
    config contradicts), under one lora_alpha (the config's r) with each module's scaling
    folded into its factors, so there is no alpha_pattern and the tensors of a module whose
    rank is not r are PEFT's times sqrt(r_m / r); rslora inputs give the exact sum (PEFT's
    result is sqrt(rank) too large);
    whole tensors one adapter stores (modules_to_save, biases, trainable tokens) are kept
    (PEFT replaces them with the base's); DoRA and lora_bias adapters are refused. DARE masks
    come from ``seed`` (PEFT draws from the global RNG). Nothing is at ``out`` unless it
    returns.

    Args:
        adapters: adapter directories or Hub repo ids; weights: one per adapter (default 1).
        method: linear, cat, ties, dare_linear, dare_ties or magnitude_prune.
        svd: the ``_svd`` variant; rank: its rank (default: the largest input rank).
        clamp: quantile Q to clamp the SVD factors at; density: the fraction pruning keeps.
        majority_sign: ``total`` or ``frequency`` (ties, dare_ties).
        uniform_rank: store every module at the largest rank, zero-padded, with no
            rank_pattern (vLLM ignores rank_pattern).
        dtype: factor dtype; ``auto`` is float32, as PEFT saves combinations.
        masks: replays DARE masks instead of drawing them (see ``MaskSource``).
        output_format: for diffusion LoRA files, ``kohya``, ``diffusers`` or ``peft``
            (default: the inputs' one format).

    Diffusion LoRA files (kohya/LyCORIS LoRA and LoCon, Tucker included, or diffusers) are
    combined with the same methods over the modules matched by (component, mangled module
    path) across files of one family, and written in their format or ``output_format``
    through ``formats.write``, every module under one alpha (the largest output rank) with
    its scaling folded in; ``dtype`` auto is the inputs' factor dtype there. Mixed formats
    without ``output_format``, mixed families or UNet spellings, LoHa/LoKr/full and DoRA
    modules are refused by name.

    Raises:
        LocationError, AdapterError, IncompatibleError, OptionError, OutputError.
    """
    options = provenance.options_of(combine, locals())  # first: the arguments only
    started = time.monotonic()
    files = _lora_files(adapters)
    if files is not None:
        return _combine_files(
            files, out, options, weights=weights, spec=CombineOptions(
                choice(CombineMethod, method, "method"), svd, rank, clamp, density,
                None if majority_sign is None else choice(MajoritySign, majority_sign,
                                                          "majority sign"), seed,
            ), dtype=dtype, output_format=output_format, uniform_rank=uniform_rank,
            device=device, overwrite=overwrite, progress=progress, masks=masks,
        )  # fmt: skip
    if output_format not in (None, "peft"):
        raise OptionError("--format kohya|diffusers applies to diffusion LoRA files; PEFT "
                          "adapters are combined into a PEFT adapter")  # fmt: skip
    plan = plan_combine(
        adapters, weights=weights, method=method, svd=svd, rank=rank, clamp=clamp,
        density=density, majority_sign=majority_sign, dtype=dtype, seed=seed,
        uniform_rank=uniform_rank,
    )  # fmt: skip
    out_path = engine.check_output(out, [loc.path for loc in plan.adapters],
                                   overwrite=overwrite)  # fmt: skip
    from .ops import resolve_device

    rows: list[CombinedModule] = []
    record = provenance.start("combine", options, [("adapter", a) for a in plan.adapters])
    output = dataclasses.replace(_output(plan, out_path), provenance=record)
    engine.run(output, _computed(plan, resolve_device(device), seed or 0, masks, rows),
               overwrite=overwrite, progress=progress)  # fmt: skip
    params = sum(t.numel for t in output.layout.shards[0].tensors[: 2 * len(plan.modules)])
    notes = [*plan.notes, *linear_note(plan, rows)]
    for note in notes:
        logger.warning(note)
    return CombineReport(
        out_path, plan.method.peft_name(plan.svd), rows, params,
        [info.name for info in plan.copies], time.monotonic() - started, notes,
    )  # fmt: skip

"""``resize`` and ``combine`` of diffusion LoRA files (kohya/LyCORIS, diffusers): the plans and
compute streams behind ``resize.resize`` and ``combine.combine`` when their inputs are LoRA files,
written through the one LoRA-file writer (``formats.write``).

Every module is written under one alpha (the largest output rank), each module's scaling folded
into its factors: the update is kept exactly, and diffusers, which applies the most common alpha
to kohya modules whose alpha differs (spec §3.3, V03b), loads the result right.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import engine, lowrank
from .adapters import LoraModule, ModuleReport, RankLayout
from .combine import (
    CombinedModule,
    CombinePlan,
    CombineReport,
    CombineSettings,
    MaskSource,
    ModuleFactors,
    PlannedModule,
    Source,
    combine_module,
    departure_note,
    fold_scaling,
    linear_note,
    output_rank,
)
from .engine import Computed
from .formats import Kind, LoraFile
from .formats.write import LoraPlan, OutModule, plan_lora
from .lorafiles import (
    FileModule,
    check_together,
    is_lora_kind,
    kept_module,
    lora_factors,
    match_modules,
    module_name,
    output_format,
    refuse_kind,
    resized_module,
)
from .options import RankPolicy
from .reader import TensorFiles, check_finite_inputs
from .resize import KEEP, ResizeReport

if TYPE_CHECKING:
    import torch

    from .engine import Output
    from .locations import Location
    from .provenance import Provenance

__all__ = ["combine_files", "resize_file"]

#: Kinds ``resize --keep-lycoris`` copies unchanged.
_KEPT_KINDS = (Kind.LOHA, Kind.LOHA_TUCKER, Kind.LOKR, Kind.FULL, Kind.NORM)

ProgressCallback = engine.ProgressCallback


def is_dit(read: LoraFile) -> bool:
    from .convert import is_dit

    return is_dit(read, read.family)


def _load(
    files: TensorFiles, module: FileModule, device: torch.device, hint: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's ``(up, right)`` float64 factors on ``device`` (``lora_factors``)."""
    infos = module.update.factors
    loaded = {part: files.load(info) for part, info in infos.items()}
    check_finite_inputs([(infos[p], t) for p, t in loaded.items()], hint=hint)
    return lora_factors(module, {p: t.to(device) for p, t in loaded.items()})


def _product(
    files: TensorFiles, module: FileModule, device: torch.device, rank: int | None = None
) -> lowrank.TruncatedSVD:
    """The exact SVD of the module's update ``scaling · up @ right``, from its factors."""
    up, right = _load(files, module, device, "resizing cannot decompose it")
    return lowrank.product_svd(up * module.update.scaling, right, rank)


# ---------------------------------------------------------------------------------------------
# resize


@dataclass(frozen=True)
class _Resized:
    """One output module: the input module, its output index, rank and alpha."""

    module: FileModule
    index: int
    rank: int
    alpha: float


def _modules(read: LoraFile, keep_lycoris: bool) -> list[FileModule]:
    """The file's modules in order: LoRA ones, and with ``keep_lycoris`` the kinds copied
    unchanged; any other refused by name."""
    modules = []
    for update in read.updates:
        module = FileModule(0, read.path, update)
        if not is_lora_kind(update) and not (keep_lycoris and update.kind in _KEPT_KINDS):
            raise refuse_kind(module, "resize", keep_flag=not keep_lycoris)
        modules.append(module)
    return modules


def _ranks(
    modules: Sequence[FileModule], policy: RankPolicy | None, device: torch.device,
    files: TensorFiles,
) -> list[int]:  # fmt: skip
    if policy is None:
        return [min(m.rank, *m.shape) for m in modules]
    spectra = []
    for m in modules:
        svd = _product(files, m, device)
        spectra.append(dataclasses.replace(svd, u=svd.u[:, :0].cpu(), vh=svd.vh[:0].cpu(),
                                           s=svd.s.cpu()))  # fmt: skip
    return lowrank.select_ranks(
        spectra, [m.shape for m in modules], method=policy.method, rank=policy.rank or 1,
        energy=policy.energy, param_budget=policy.param_budget, min_rank=policy.min_rank,
        max_rank=policy.max_rank, sv_ratio=policy.sv_ratio, sv_cumulative=policy.sv_cumulative,
    )  # fmt: skip


def _resize_stream(
    plan: LoraPlan, resized: Sequence[_Resized], device: torch.device, rows: list[ModuleReport]
) -> Callable[[TensorFiles], Iterator[Computed]]:
    """Each resized module's truncated factors, its scaling α/k folded in, rounded once to
    the planned dtype; report rows go to ``rows``."""
    planned = {t.name: t for t in plan.output.layout.shards[0].tensors}

    def produce(files: TensorFiles) -> Iterator[Computed]:
        from .dtypes import torch_dtype

        for r in resized:
            m, k = r.module, r.rank
            down, up = planned[plan.name(r.index, "down")], planned[plan.name(r.index, "up")]
            svd = _product(files, m, device, k)
            scaling = r.alpha / k
            a, b = svd.factors(k, scaling)
            a, b = a.to(torch_dtype(down.dtype)), b.to(torch_dtype(up.dtype))
            error = lowrank.stored_rel_error(svd, k, a, b, scaling)
            rows.append(ModuleReport(m.update.source, list(m.shape), k, r.alpha, error,
                                     1 - error * error))  # fmt: skip
            yield Computed(down.name, a.reshape(down.shape).cpu())
            yield Computed(up.name, b.reshape(up.shape).cpu())

    return produce


def resize_file(
    location: Location,
    out: Path,
    *,
    policy: RankPolicy | None,
    fmt: str | None,
    keep_lycoris: bool,
    dtype: str | None,
    device: torch.device,
    overwrite: bool,
    record: Provenance,
    progress: ProgressCallback | None,
) -> ResizeReport:
    """``resize`` of one diffusion LoRA file (see ``resize.resize``)."""
    from .formats import read_lora

    started = time.monotonic()
    read = read_lora(location.path)
    target = output_format([read], fmt)
    modules = _modules(read, keep_lycoris)
    lora = [m for m in modules if is_lora_kind(m.update)]
    with TensorFiles() as files:
        ranks = _ranks(lora, policy, device, files)
    alpha = float(max(ranks, default=1))
    chosen = {m.update.source: k for m, k in zip(lora, ranks, strict=True)}
    outs: list[OutModule] = []
    resized: list[_Resized] = []
    for m in modules:
        name = module_name(m, read, target)
        k = chosen.get(m.update.source)
        if k is None:
            outs.append(kept_module(m, name))
            continue
        resized.append(_Resized(m, len(outs), k, alpha))
        outs.append(resized_module(m, name, k, alpha, dtype or m.update.factors["up"].dtype))
    kept = len(modules) - len(lora)
    plan = plan_lora(out, outs, target, family=read.family, metadata=read.metadata,
                     source=read.path, dit=is_dit(read))  # fmt: skip
    rows: list[ModuleReport] = []
    output: Output = dataclasses.replace(plan.output, provenance=record)
    engine.run(output, plan.stream(_resize_stream(plan, resized, device, rows)),
               overwrite=overwrite, progress=progress)  # fmt: skip
    notes = []
    if kept:
        notes.append(f"{kept} LoHa/LoKr/full module(s) copied unchanged (--keep-lycoris)")
    return ResizeReport(
        out, rows, sum(r.rank * sum(r.module.shape) for r in resized),
        sum(m.rank * sum(m.shape) for m in lora),
        policy.method.value if policy else KEEP, time.monotonic() - started, notes,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# combine


def _planned(group: Sequence[FileModule], options: CombineSettings, rank: int) -> PlannedModule:
    """The group as combine's planned module (its sources' factors are loaded here, not by
    combine), for combine's own math."""
    sources = []
    for m in group:
        u = m.update
        lora = LoraModule(u.source, u.factors["down"], u.factors["up"], False, m.rank,
                          u.alpha if u.alpha is not None else float(m.rank), u.scaling)  # fmt: skip
        sources.append(Source(m.index, options.weights[m.index], lora))
    return PlannedModule(group[0].update.source, tuple(sources), rank, group[0].shape, "F32")


def _factors(
    files: TensorFiles, group: Sequence[FileModule], device: torch.device
) -> list[ModuleFactors]:
    """Each source as combine's float32 (a, b): a (r, in[, kh, kw]) with a Tucker mid folded
    in, b = up (out, r[, 1, 1]); the scaling stays with the source (``Source.coefficient``)."""
    import torch

    factors = []
    for m in group:
        up, right = _load(files, m, device, "combining it would write NaN/inf into the result")
        factors.append(ModuleFactors(right.reshape(m.rank, *m.down_tail).to(torch.float32),
                                up.reshape(-1, m.rank, *m.up_tail).to(torch.float32)))  # fmt: skip
    return factors


def _combine_stream(
    plan: CombinePlan, lora: LoraPlan, groups: Sequence[Sequence[FileModule]], alpha: float,
    device: torch.device, seed: int, masks: MaskSource | None, rows: list[CombinedModule],
) -> Callable[[TensorFiles], Iterator[Computed]]:  # fmt: skip
    def produce(files: TensorFiles) -> Iterator[Computed]:
        import torch

        from .dtypes import torch_dtype

        generator = torch.Generator(device=device).manual_seed(seed)
        shapes = {t.name: t.shape for t in lora.output.layout.shards[0].tensors}
        for i, (m, group) in enumerate(zip(plan.modules, groups, strict=True)):
            factors = _factors(files, group, device)
            scaling = alpha / m.rank
            a, b = fold_scaling(*combine_module(plan, m, factors, masks, generator), scaling)
            down, up = lora.name(i, "down"), lora.name(i, "up")
            stored = torch_dtype(next(t.dtype for t in lora.output.layout.shards[0].tensors
                                      if t.name == down))  # fmt: skip
            a, b = a.to(stored), b.to(stored)
            rows.append(CombinedModule(m.module, list(m.shape), m.rank, len(m.sources),
                                       departure_note(m, factors, a, b, scaling)))  # fmt: skip
            yield Computed(down, a.reshape(shapes[down]).cpu())
            yield Computed(up, b.reshape(shapes[up]).cpu())

    return produce


def combine_files(
    locations: Sequence[Location],
    out: Path,
    *,
    options: CombineSettings,
    fmt: str | None,
    seed: int,
    device: torch.device,
    overwrite: bool,
    record: Provenance,
    progress: ProgressCallback | None,
    masks: MaskSource | None,
) -> CombineReport:
    """``combine`` of diffusion LoRA files (see ``combine.combine``): PEFT's
    add_weighted_adapter methods over the modules matched by (component, mangled path)."""
    from .formats import read_lora

    started = time.monotonic()
    reads = [read_lora(loc.path) for loc in locations]
    family = check_together(reads)
    target = output_format(reads, fmt)
    groups = match_modules(reads)
    svd_rank = options.rank or max(m.rank for g in groups for m in g)
    ranks = [
        output_rank(options, [m.rank for m in g], g[0].shape, svd_rank, g[0].update.source,
                    [str(m.path) for m in g])
        for g in groups
    ]  # fmt: skip
    alpha = float(max(ranks))
    outs = [
        resized_module(g[0], module_name(g[0], reads[g[0].index], target), k, alpha,
                       options.dtype or g[0].update.factors["up"].dtype)
        for g, k in zip(groups, ranks, strict=True)
    ]  # fmt: skip
    lora = plan_lora(out, outs, target, family=family, source=reads[0].path,
                     dit=is_dit(reads[0]))  # fmt: skip
    planned = tuple(_planned(g, options, k) for g, k in zip(groups, ranks, strict=True))
    plan = CombinePlan(
        tuple(locations), options.weights, options.method, options.svd, options.clamp,
        options.density, options.majority_sign, planned, (), {}, (),
        RankLayout.of({m.module: m.rank for m in planned}),
    )  # fmt: skip
    rows: list[CombinedModule] = []
    output: Output = dataclasses.replace(lora.output, provenance=record)
    engine.run(output, lora.stream(_combine_stream(plan, lora, groups, alpha, device, seed,
                                                   masks, rows)),
               overwrite=overwrite, progress=progress)  # fmt: skip
    params = sum(r * sum(g[0].shape) for g, r in zip(groups, ranks, strict=True))
    notes = linear_note(plan, rows)
    return CombineReport(out, plan.method.peft_name(plan.svd), rows, params, [],
                         time.monotonic() - started, notes)  # fmt: skip

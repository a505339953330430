"""Change an adapter's ranks: ``resize``.

Each module's ``delta = scaling · B @ A`` is decomposed exactly from its factors
(``lowrank.product_svd``: QR of both factors and an SVD of the r x r core, never the full
matrix), ranks are chosen with extract's rank selection (fixed, energy or budget), and each
module is written as the exact truncated SVD at its rank: the best approximation of the input
delta there, lossless at or above the input rank.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import engine, provenance
from .adapters import (
    Adapter,
    LoraModule,
    ModuleReport,
    RankLayout,
    adapter_output,
    lora_keys,
    open_adapter,
    report_dict,
)
from .diffusion import is_lora_file
from .dtypes import DType
from .engine import Computed
from .errors import AdapterError, OptionError
from .locations import Location, Role, resolve
from .options import RankMethod, RankPolicy, choice
from .reader import TensorFiles, check_finite_inputs
from .writer import OutputTensor

if TYPE_CHECKING:
    import torch

    from .lowrank import TruncatedSVD
    from .provenance import Provenance

__all__ = ["KEEP", "ResizeReport", "resize"]

#: The ``rank_method`` of a resize that keeps every module's rank (no rank option given).
KEEP = "keep"

logger = logging.getLogger(__name__)

ProgressCallback = engine.ProgressCallback


@dataclass(frozen=True)
class ResizeReport:
    """The resize's figures, in extract's report format; ``to_dict()`` is the ``--report``
    JSON. ``rel_error`` of a module is against the input adapter's delta."""

    out: Path
    modules: list[ModuleReport]
    total_params: int
    input_params: int
    rank_method: str
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return report_dict(self)


def _shape(lora: LoraModule) -> tuple[int, int]:
    return lora.lora_b.shape[0], math.prod(lora.lora_a.shape[1:])


def _decompose(
    files: TensorFiles, lora: LoraModule, device: torch.device, rank: int | None = None
) -> TruncatedSVD:
    """The exact SVD of the module's delta ``scaling · B @ A`` from its factors."""
    import torch

    from .lowrank import product_svd

    a, b = files.load(lora.lora_a), files.load(lora.lora_b)
    check_finite_inputs([(lora.lora_a, a), (lora.lora_b, b)],
                        hint="resizing cannot decompose it")  # fmt: skip
    a, b = a.to(device).to(torch.float64), b.to(device).to(torch.float64)
    return product_svd(b.reshape(b.shape[0], -1) * lora.scaling, a.reshape(a.shape[0], -1), rank)


def _spectra(
    adapter: Adapter, files: TensorFiles, device: torch.device, progress: ProgressCallback | None
) -> list[TruncatedSVD]:
    """Every module's singular values (the vectors are dropped: recomputed when writing)."""
    import torch

    spectra, count = [], len(adapter.modules)
    for i, lora in enumerate(adapter.modules.values()):
        svd = _decompose(files, lora, device)
        m, n = _shape(lora)
        spectra.append(dataclasses.replace(
            svd, u=torch.empty(m, 0, dtype=torch.float64), s=svd.s.cpu(),
            vh=torch.empty(0, n, dtype=torch.float64),
        ))  # fmt: skip
        if progress is not None:
            progress(i + 1, 2 * count)
    return spectra


def _planned(adapter: Adapter, layout: RankLayout, dtype: str | None) -> list[OutputTensor]:
    planned = []
    for lora in adapter.modules.values():
        k = layout.stored_rank(lora.module)
        key_a, key_b = lora_keys(lora.module, embedding=lora.embedding)
        code = dtype or lora.lora_a.dtype
        a_shape, b_shape = lora.lora_a.shape, lora.lora_b.shape
        planned += [OutputTensor(key_a, code, (k, *a_shape[1:])),
                    OutputTensor(key_b, code, (b_shape[0], k, *b_shape[2:]))]  # fmt: skip
    return planned


def _computed(
    adapter: Adapter, layout: RankLayout, dtype: str | None, device: torch.device,
    rows: list[ModuleReport], progress: ProgressCallback | None,
) -> Callable[[TensorFiles], Iterator[Computed]]:  # fmt: skip
    """Each module's truncated factors as the engine's stream, its scaling under ``layout``'s
    one alpha folded in before rounding and zero-padded to the stored rank; report rows go to
    ``rows``, steps to ``progress`` (the second half of resize's 2 steps per module)."""

    def produce(files: TensorFiles) -> Iterator[Computed]:
        from .dtypes import torch_dtype
        from .lowrank import stored_rel_error
        from .ops import pad_rank

        count = len(adapter.modules)
        for i, lora in enumerate(adapter.modules.values()):
            k, scaling = layout.ranks[lora.module], layout.scaling(lora.module)
            svd = _decompose(files, lora, device, k)
            a, b = svd.factors(k, scaling)
            stored = torch_dtype(dtype or lora.lora_a.dtype)
            a, b = a.to(stored), b.to(stored)
            error = stored_rel_error(svd, k, a, b, scaling)
            rows.append(ModuleReport(lora.module, list(_shape(lora)), k, layout.lora_alpha,
                                     error, 1 - error * error))  # fmt: skip
            n = layout.stored_rank(lora.module)
            a, b = pad_rank(a, b, n)
            key_a, key_b = lora_keys(lora.module, embedding=lora.embedding)
            yield Computed(key_a, a.reshape(n, *lora.lora_a.shape[1:]).cpu())
            yield Computed(key_b, b.reshape(lora.lora_b.shape[0], n, *lora.lora_b.shape[2:]).cpu())
            if progress is not None:
                progress(count + i + 1, 2 * count)

    return produce


def _config(adapter: Adapter, layout: RankLayout) -> dict[str, Any]:
    config = dict(adapter.config.raw)
    config.update(layout.config(), inference_mode=True)
    return config


def _ranks(
    opened: Adapter, policy: RankPolicy | None, files: TensorFiles, device: torch.device,
    progress: ProgressCallback | None,
) -> list[int]:  # fmt: skip
    """Each module's new rank: without a ``policy`` its own (at most its matrix's smaller
    side), else chosen from its spectrum as extract chooses."""
    from . import lowrank

    modules = list(opened.modules.values())
    if policy is None:
        if progress is not None:
            progress(len(modules), 2 * len(modules))
        return [min(m.rank, *_shape(m)) for m in modules]
    spectra = _spectra(opened, files, device, progress)
    return lowrank.select_by_policy(spectra, [_shape(m) for m in modules], policy, policy.rank or 1)


def resize(
    adapter: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    rank: int | None = None,
    rank_method: str = "fixed",
    energy: float | None = None,
    param_budget: int | None = None,
    min_rank: int = 1,
    max_rank: int | None = None,
    sv_ratio: float | None = None,
    sv_cumulative: float | None = None,
    uniform_rank: bool = False,
    dtype: str = "auto",
    output_format: str | None = None,
    keep_lycoris: bool = False,
    device: str = "auto",
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
) -> ResizeReport:
    """Write ``adapter`` with new per-module ranks, each module the best approximation of its
    delta ``scaling · B @ A`` at its rank (the exact truncated SVD of the product).

    Ranks as in ``extract``: ``fixed`` (``rank``), ``energy`` (the smallest rank keeping
    fraction ``energy`` of each delta's squared norm; kohya's sv_fro P is energy P²),
    ``budget`` (``param_budget`` LoRA parameters in total, spent where they remove the most
    squared error), or kohya's ``sv_ratio`` (singular values >= the largest / ``sv_ratio``)
    and ``sv_cumulative`` (the smallest rank whose singular values sum to fraction
    ``sv_cumulative`` of them all), within
    ``min_rank``..``max_rank`` and never above a module's input rank (lossless there). With
    no rank option (``rank_method="fixed"``, ``rank=None``) every module keeps its own rank:
    the same update, losslessly rewritten for every client. Each module's update is kept: the
    output has one ``lora_alpha`` (the config's ``r``, scaling 1 there), no alpha_pattern and
    no rslora, each module's scaling folded into its factors before rounding;
    ``uniform_rank`` stores every module at the largest rank, zero-padded, with no
    rank_pattern. Singular values are split evenly between A and B, whole tensors are copied
    unchanged. Nothing is at ``out`` unless it returns.

    A diffusion LoRA file (kohya/LyCORIS LoRA and LoCon, Tucker included, or diffusers) is
    resized the same way, module by module, and written in its own format or
    ``output_format`` (``kohya``, ``diffusers``, ``peft``) through ``formats.write``: every
    module under one alpha, the largest new rank, its scaling folded into its factors (spec
    §3.3: diffusers misapplies differing alphas). LoHa, LoKr and full modules cannot be
    resized: refused by name, or copied unchanged with ``keep_lycoris``; DoRA modules and
    lora_B biases are refused. ``dtype`` auto: the input factors' dtype.

    Raises:
        LocationError, AdapterError, OptionError, OutputError; IncompatibleError (LoRA files).
    """
    options = provenance.options_of(resize, locals())  # first: the arguments only
    from .ops import resolve_device

    started = time.monotonic()
    policy = _policy(rank, rank_method, energy, param_budget, min_rank, max_rank, sv_ratio,
                     sv_cumulative)  # fmt: skip
    code = DType.code_of(dtype)
    location = resolve(adapter, role=Role.ADAPTER)
    out_path = engine.check_output(out, [location.path], overwrite=overwrite)
    record = provenance.start("resize", options, [("adapter", location)])
    compute = resolve_device(device)
    if is_lora_file(location.path):
        return _resize_file(location, out_path, policy, output_format, keep_lycoris, code,
                            compute, overwrite, record, uniform_rank, progress)  # fmt: skip
    if output_format not in (None, "peft") or keep_lycoris:
        raise OptionError(
            "--format kohya|diffusers and --keep-lycoris apply to diffusion LoRA files; a PEFT "
            "adapter is resized into a PEFT adapter", path=location.path,
        )  # fmt: skip
    with open_adapter(location.path, file_targets=True) as opened, TensorFiles() as files:
        opened.require_plain_lora("resize")
        if not opened.modules:
            raise AdapterError("holds no LoRA modules to resize", path=opened.config.path)
        ranks = _ranks(opened, policy, files, compute, progress)
        layout = RankLayout.of(dict(zip(opened.modules, ranks, strict=True)),
                               uniform=uniform_rank)  # fmt: skip
        copies = [*opened.replacements.values(), *(t for _, t in opened.token_rows.values())]
        output = adapter_output(out_path, _planned(opened, layout, code), copies,
                                _config(opened, layout))  # fmt: skip
        output = dataclasses.replace(output, provenance=record)
        rows: list[ModuleReport] = []
        engine.run(output, _computed(opened, layout, code, compute, rows, progress),
                   overwrite=overwrite)  # fmt: skip
        sizes = {m.module: sum(_shape(m)) for m in opened.modules.values()}
        before = sum(m.rank * sizes[m.module] for m in opened.modules.values())
    notes = layout.notes(sizes)
    if opened.ignored:
        notes.append(f"{len(opened.ignored)} LoRA modules the config does not select were left "
                     "out, as PEFT ignores them")  # fmt: skip
    for note in notes:
        logger.warning(note)
    return ResizeReport(
        out_path, rows, sum(layout.stored_rank(m) * sizes[m] for m in sizes), before,
        policy.method.value if policy else KEEP, time.monotonic() - started, notes,
    )  # fmt: skip


def _resize_file(
    location: Location, out: Path, policy: RankPolicy | None, output_format: str | None,
    keep_lycoris: bool, dtype: str | None, device: torch.device, overwrite: bool,
    record: Provenance, uniform_rank: bool, progress: ProgressCallback | None,
) -> ResizeReport:  # fmt: skip
    """``resize`` of a diffusion LoRA file (``sdlora.resize_file``)."""
    from .sdlora import resize_file

    if uniform_rank:
        raise OptionError(
            "--uniform-rank applies to PEFT adapters: kohya and diffusers files store each "
            "module's rank in its tensors", path=location.path,
        )  # fmt: skip
    report = resize_file(
        location, out, policy=policy, fmt=output_format, keep_lycoris=keep_lycoris, dtype=dtype,
        device=device, overwrite=overwrite, record=record, progress=progress,
    )  # fmt: skip
    for note in report.notes:
        logger.warning(note)
    return report


def _policy(
    rank: int | None, rank_method: str, energy: float | None, param_budget: int | None,
    min_rank: int, max_rank: int | None, sv_ratio: float | None = None,
    sv_cumulative: float | None = None,
) -> RankPolicy | None:  # fmt: skip
    """The rank policy, None (``keep``: every module's own rank) when no rank option is given.

    Raises:
        OptionError: as ``RankPolicy``.
    """
    given = (rank, energy, param_budget, max_rank, sv_ratio, sv_cumulative)
    if rank_method == "fixed" and all(v is None for v in given) and min_rank == 1:
        return None
    return RankPolicy(choice(RankMethod, rank_method, "rank method"), rank, energy,
                      param_budget, min_rank, max_rank, sv_ratio, sv_cumulative)  # fmt: skip

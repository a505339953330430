"""Rewrite a diffusion LoRA in another format: ``convert``.

The same update, exactly: every factor tensor copied byte for byte (a Linear/1×1-conv kernel
dimension added or dropped where the base says so), each module's own rank and alpha kept, every
module written or the run refused by name. No tensor math here.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import engine, provenance
from .errors import OptionError
from .formats import Component, Family, Kind, LoraFile, LoraFormat, ModuleUpdate, read_lora
from .formats.write import Factor, OutModule, OutputFormat, check_modules, plan_lora
from .layouts import Layout, open_layout
from .layouts.resolve import resolve_updates
from .layouts.spelling import Spellings, kohya_text_path
from .locations import Role, resolve
from .options import choice

__all__ = ["ConvertReport", "convert"]

ProgressCallback = engine.ProgressCallback


@dataclass(frozen=True)
class ConvertReport:
    """What was converted: ``converted`` modules per component (``unet``, ``te``, ``te1``, ``te2``,
    ``te3``), how many carry their own alpha, the formats and the family."""

    out: Path
    source_format: str
    format: str
    family: str
    converted: dict[str, int]
    alphas: int
    seconds: float

    @property
    def total(self) -> int:
        return sum(self.converted.values())

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["out"] = str(self.out)
        data["total"] = self.total
        return data


def _alpha(update: ModuleUpdate) -> float | None:
    """The α to write: the module's own; with rsLoRA (diffusers metadata) the plain α that
    gives the same scaling, α/r; None (α = r, scaling 1) where the file stores none."""
    if update.alpha is None or update.rank is None or update.kind in (Kind.FULL, Kind.NORM):
        return update.alpha
    if update.alpha / update.rank == update.scaling:
        return update.alpha
    return update.scaling * update.rank


def _fitted(update: ModuleUpdate, shape: tuple[int, ...] | None) -> dict[str, Factor]:
    """The factors copied, reshaped to the base module's kind where a base is known: a
    Linear's LoRA is 2-D, a conv's ``down`` has its kernel and ``up`` is (out, r, 1, 1)."""
    factors = {name: Factor.copy_of(info) for name, info in update.factors.items()}
    if shape is None or update.kind is not Kind.LORA:
        return factors
    down, up = update.factors["down"], update.factors["up"]
    rank = down.shape[0]
    if len(shape) == 2 and len(down.shape) == 4 and down.shape[2:] == (1, 1):
        factors["down"] = Factor.copy_of(down, (rank, down.shape[1]))
        factors["up"] = Factor.copy_of(up, (up.shape[0], rank))
    elif len(shape) == 4 and shape[2:] == (1, 1) and len(down.shape) == 2:
        factors["down"] = Factor.copy_of(down, (rank, down.shape[1], 1, 1))
        factors["up"] = Factor.copy_of(up, (up.shape[0], rank, 1, 1))
    return factors


def output_module_name(
    update: ModuleUpdate, lora: LoraFile, fmt: OutputFormat, spellings: Spellings | None
) -> str:
    """The module's name in the output: kohya names are kept, or given by the base (sd-scripts'
    spelling for its family), else the diffusers path mangled; diffusers paths are kept, or
    read from the base for kohya names (never un-mangled).

    Raises:
        OptionError: kohya names to diffusers/PEFT without a base.
        IncompatibleError: a module with no diffusers counterpart in the base.
    """
    text = update.component.is_text_encoder
    if fmt is OutputFormat.KOHYA:
        if lora.format is LoraFormat.KOHYA:
            return update.module
        if spellings is not None:
            return spellings.kohya(update.component, update.key, where=update.source)
        return kohya_text_path(update.module) if text else update.module
    if lora.format is not LoraFormat.KOHYA:
        return update.module
    if spellings is None:
        raise OptionError(
            f"kohya names cannot be turned into {fmt.value} module paths without the base "
            "(the '_' in them is ambiguous)",
            path=lora.path,
            tensor=update.source,
            hint="pass --base BASE: the checkpoint (LDM file or diffusers folder) it was "
            "trained for",
        )
    return spellings.diffusers(update.component, update.key, where=update.source)


def _out_modules(
    lora: LoraFile, fmt: OutputFormat, layout: Layout | None
) -> list[OutModule]:  # fmt: skip
    shapes: dict[str, tuple[int, ...]] = {}
    spellings = None
    if layout is not None:
        resolution = resolve_updates(layout, lora)
        shapes = {u.source: t.shape for u, t in resolution.matched}
        spellings = Spellings.of(layout)
    modules = []
    for update in lora.updates:
        fitted = fmt is not OutputFormat.KOHYA and update.source in shapes
        factors = _fitted(update, shapes.get(update.source) if fitted else None)
        dora = Factor.copy_of(update.dora_scale) if update.dora_scale is not None else None
        modules.append(OutModule(update.component, update.module, update.kind, factors,
                                 _alpha(update), update.rank, dora, update.source))  # fmt: skip
    check_modules(modules, fmt, lora.path)  # what cannot be written, before any name lookup
    return [
        dataclasses.replace(m, module=output_module_name(u, lora, fmt, spellings))
        for m, u in zip(modules, lora.updates, strict=True)
    ]


def is_dit(lora: LoraFile, family: Family) -> bool:
    """Whether the file's UNet is a DiT (diffusers ``transformer.``): by family or by the
    input's own prefix."""
    return family in (Family.FLUX, Family.SD3) or any(
        u.source.startswith("transformer.") for u in lora.updates
    )


def convert(
    lora: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    to: str,
    base: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
) -> ConvertReport:
    """Write the diffusion LoRA file ``lora`` in format ``to`` (``kohya``, ``diffusers``,
    ``peft``): the same update, exactly.

    Every factor is copied byte for byte, each module keeps its rank and its α (kohya: an
    ``alpha`` tensor per module; diffusers and PEFT: ``lora_alpha``/``alpha_pattern``), LyCORIS
    kinds and DoRA are kept in kohya output and refused by name elsewhere. kohya names become
    diffusers paths only through ``base`` (its own module table, spec §2.5); with ``base`` the
    LoRA is also checked against it (family, names, shapes) and kohya output uses sd-scripts'
    spelling for the base's family. Nothing is at ``out`` unless it returns.

    Raises:
        OptionError: an unknown format, kohya to diffusers/PEFT without ``base``, several
            components to PEFT.
        LocationError, CheckpointError, AdapterError: unreadable or unsupported input.
        IncompatibleError: the LoRA does not fit ``base``.
        OutputError: ``out`` cannot be written.
    """
    options = provenance.options_of(convert, locals())
    started = time.monotonic()
    fmt = choice(OutputFormat, to, "format")
    location = resolve(lora, role=Role.ADAPTER)
    inputs = [("adapter", location)]
    base_location = resolve(base, role=Role.CHECKPOINT) if base is not None else None
    if base_location is not None:
        inputs.append(("base", base_location))
    out_path = engine.check_output(out, [loc.path for _, loc in inputs], overwrite=overwrite)
    read = read_lora(location.path)
    layout = open_layout(base_location.path) if base_location is not None else None
    family = layout.family if layout is not None else read.family
    modules = _out_modules(read, fmt, layout)
    plan = plan_lora(out_path, modules, fmt, family=family, metadata=read.metadata,
                     source=read.path, dit=is_dit(read, family))  # fmt: skip
    record = provenance.start("convert", options, inputs)
    output = dataclasses.replace(plan.output, provenance=record)
    engine.run(output, plan.stream(), overwrite=overwrite, progress=progress)
    counts = collections.Counter(m.component for m in modules)
    return ConvertReport(
        out_path, read.format.value, fmt.value, family.value,
        {c.value: counts[c] for c in Component if counts[c]},
        sum(1 for m in modules if m.alpha is not None), time.monotonic() - started,
    )  # fmt: skip

"""The one LoRA-file writer: canonical output modules -> the tensors and header of a kohya,
diffusers or PEFT output, planned for the engine (shared/spec/sd-lora.md §1, §3, §5.6).

API (``plan_lora`` then ``engine.run``; nothing is written here):

- ``OutModule(component, module, kind, factors, alpha, rank)``: one module. ``module`` is its
  dotted path in the spelling the output should carry (``module_spelling`` picks it from a base
  layout; kohya names are that path mangled); ``factors`` maps canonical part names (``down``,
  ``up``, ``mid``, ``up_bias``, LyCORIS ``w1a``… as in ``ModuleUpdate``) to ``Factor``s: copied
  unchanged from an input tensor (``Factor.copy_of``) or computed by the caller
  (``Factor(dtype, shape)``). ``alpha`` None means α = r (scaling 1).
- ``plan_lora(out, modules, fmt, family=...) -> LoraPlan``: refuses what ``fmt`` cannot hold.
  ``plan.name(i, part)`` is the tensor name the caller yields the computed ``part`` of
  ``modules[i]`` under; ``plan.stream(produce)`` adds the writer's own tensors (kohya alphas)
  to the caller's; ``plan.output`` is the engine's ``Output`` (add provenance with
  ``dataclasses.replace``).

Example::

    plan = plan_lora(out, modules, OutputFormat.KOHYA, family=Family.SDXL)
    output = dataclasses.replace(plan.output, provenance=record)
    engine.run(output, plan.stream(produce), overwrite=overwrite)
"""

from __future__ import annotations

import collections
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from ..engine import Computed, Copy, Output
from ..errors import AdapterError, OptionError
from ..reader import TensorFiles, TensorInfo
from ..writer import OutputLayout, OutputShard, OutputTensor
from .diffusers import METADATA_KEY
from .model import Component, Family, Kind, mangle

__all__ = [
    "Factor",
    "LoraPlan",
    "OutModule",
    "OutputFormat",
    "diffusers_component",
    "kohya_prefix_of",
    "plan_lora",
]


class OutputFormat(str, Enum):
    """The format a LoRA is written in."""

    PEFT = "peft"  # an adapter directory: adapter_config.json + adapter_model.safetensors
    KOHYA = "kohya"  # one .safetensors file: lora_unet_…/lora_te…_ names, alpha tensors, ss_*
    DIFFUSERS = "diffusers"  # one .safetensors file: PEFT keys under unet./text_encoder./…


#: Canonical part -> kohya/LyCORIS part, by algorithm (the inverse of formats.kohya's table).
_KOHYA_LORA = {"down": "lora_down.weight", "up": "lora_up.weight", "mid": "lora_mid.weight"}
_KOHYA_LOHA = {"w1a": "hada_w1_a", "w1b": "hada_w1_b", "w2a": "hada_w2_a", "w2b": "hada_w2_b",
               "t1": "hada_t1", "t2": "hada_t2"}  # fmt: skip
_KOHYA_LOKR = {"w1": "lokr_w1", "w1a": "lokr_w1_a", "w1b": "lokr_w1_b", "w2": "lokr_w2",
               "w2a": "lokr_w2_a", "w2b": "lokr_w2_b", "t2": "lokr_t2"}  # fmt: skip
_KOHYA_PARTS: dict[Kind, dict[str, str]] = {
    Kind.LORA: _KOHYA_LORA, Kind.LOCON_TUCKER: _KOHYA_LORA,
    Kind.LOHA: _KOHYA_LOHA, Kind.LOHA_TUCKER: _KOHYA_LOHA, Kind.LOKR: _KOHYA_LOKR,
    Kind.FULL: {"diff": "diff", "diff_b": "diff_b"},
    Kind.NORM: {"w_norm": "w_norm", "b_norm": "b_norm"},
}  # fmt: skip
#: Canonical part -> PEFT part (diffusers and PEFT outputs hold plain LoRA only).
_PEFT_PARTS = {"down": "lora_A.weight", "up": "lora_B.weight", "up_bias": "lora_B.bias"}
_PEFT_PREFIX = "base_model.model."
_ADAPTER_CONFIG = "adapter_config.json"
_ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: Header entries never carried over: hashes of other bytes, our provenance, format keys.
_DROPPED_METADATA = ("sshs_model_hash", "sshs_legacy_hash", "lorasurgeon", METADATA_KEY, "format")
#: ``ss_base_model_version`` as sd-scripts writes it, by family.
_BASE_VERSION = {Family.SD1: "sd_v1", Family.SD2: "sd_v2", Family.SDXL: "sdxl_base_v1-0",
                 Family.FLUX: "flux1"}  # fmt: skip


@dataclass(frozen=True)
class Factor:
    """One factor tensor of an output module: ``dtype`` (safetensors code) and ``shape`` as
    written; ``source`` is the input tensor copied unchanged (same element count, so a 1×1
    kernel may be added or dropped), None when the caller computes it."""

    dtype: str
    shape: tuple[int, ...]
    source: TensorInfo | None = None

    @classmethod
    def copy_of(cls, info: TensorInfo, shape: tuple[int, ...] | None = None) -> Factor:
        """The input tensor ``info`` copied byte for byte, optionally under another ``shape``
        of the same element count."""
        new = info.shape if shape is None else tuple(shape)
        if math.prod(new) != math.prod(info.shape):
            raise ValueError(f"{info.name}: shape {new} does not hold {info.shape}")
        return cls(info.dtype, new, info)


@dataclass(frozen=True)
class OutModule:
    """One module of an output LoRA, in canonical terms (see the module docstring).

    ``source`` names the module in errors (the input's name for it; default ``module``).
    ``dora_scale`` (LyCORIS DoRA) is kept by kohya output only.
    """

    component: Component
    module: str
    kind: Kind
    factors: Mapping[str, Factor]
    alpha: float | None
    rank: int | None
    dora_scale: Factor | None = None
    source: str = ""

    @property
    def label(self) -> str:
        return self.source or self.module

    @property
    def alpha_or_rank(self) -> float:
        """α, with the α = r of a module stored without one."""
        if self.alpha is not None:
            return self.alpha
        return float(self.rank) if self.rank is not None else 1.0


@dataclass(frozen=True)
class LoraPlan:
    """A planned LoRA output: the engine's ``output``, every tensor name by (module index,
    canonical part), and the tensors the writer computes itself (kohya ``alpha`` scalars)."""

    output: Output
    names: Mapping[tuple[int, str], str]
    own: tuple[tuple[str, float, str], ...] = ()  # (tensor name, value, dtype code)
    counts: Mapping[Component, int] = field(default_factory=dict)

    def name(self, index: int, part: str) -> str:
        """The tensor name of canonical ``part`` (or ``dora_scale``) of ``modules[index]``."""
        return self.names[(index, part)]

    def stream(
        self, produce: Callable[[TensorFiles], Iterable[Computed]] | None = None
    ) -> Callable[[TensorFiles], Iterator[Computed]]:
        """The ``produce`` for ``engine.run``: the writer's scalars, then the caller's items."""

        def items(files: TensorFiles) -> Iterator[Computed]:
            import torch

            from ..dtypes import torch_dtype

            for name, value, code in self.own:
                yield Computed(name, torch.tensor(value, dtype=torch_dtype(code)))
            if produce is not None:
                yield from produce(files)

        return items


def kohya_prefix_of(component: Component, components: Iterable[Component], family: Family) -> str:
    """The kohya prefix a component is written under. One text encoder is ``lora_te_`` (spec
    §3.4: SD1 consumers prefer it), beside a second one ``lora_te1_``."""
    if component is Component.UNET:
        return "lora_unet_"
    if component is Component.TE1:
        two = Component.TE2 in components or family in (Family.SDXL, Family.FLUX, Family.SD3)
        return "lora_te1_" if two else "lora_te_"
    return {Component.TE: "lora_te_", Component.TE2: "lora_te2_", Component.TE3: "lora_te3_"}[
        component
    ]


def diffusers_component(component: Component, *, dit: bool) -> str | None:
    """The diffusers key prefix of a component (``transformer`` for a DiT); None for kohya's
    ``lora_te3_`` (T5), which this writer does not place in a diffusers file."""
    if component is Component.UNET:
        return "transformer" if dit else "unet"
    if component in (Component.TE, Component.TE1):
        return "text_encoder"
    if component is Component.TE2:
        return "text_encoder_2"
    return None


def _refuse(module: OutModule, source: Path | None, what: str, hint: str) -> AdapterError:
    return AdapterError(what, path=source, tensor=module.label, hint=hint)


def _check_module(module: OutModule, fmt: OutputFormat, source: Path | None) -> None:
    """Refuse what ``fmt`` cannot hold, by name and reason: never drop a part."""
    if fmt is OutputFormat.KOHYA:
        extra = set(module.factors) - set(_KOHYA_PARTS[module.kind])
        if extra:
            raise _refuse(
                module, source,
                f"{module.kind.value} part(s) {sorted(extra)} cannot be written as kohya "
                "(sd-scripts LoRA has no lora_up bias)",
                "convert it --to diffusers or --to peft, which keep a lora_B bias",
            )  # fmt: skip
        return
    if module.kind is not Kind.LORA:
        raise _refuse(
            module, source,
            f"a {module.kind.value} module cannot be written as {fmt.value}: that format holds "
            "only plain LoRA (lora_A/lora_B) modules",
            "convert it --to kohya, which keeps LyCORIS modules as they are",
        )  # fmt: skip
    if module.dora_scale is not None:
        raise _refuse(
            module, source,
            f"a DoRA (dora_scale) module cannot be written as {fmt.value}",
            "convert it --to kohya, which keeps dora_scale",
        )  # fmt: skip
    if set(module.factors) - set(_PEFT_PARTS):
        raise _refuse(module, source, f"unexpected parts {sorted(module.factors)}",
                      "a plain LoRA module has down, up and optionally up_bias")  # fmt: skip


def _alpha_dtype(alpha: float) -> str:
    """fp32 as sd-scripts stores alphas; F64 where fp32 would change the value (lossless)."""
    import struct

    exact = struct.unpack("f", struct.pack("f", alpha))[0] == alpha
    return "F32" if exact else "F64"


def _kohya_names(
    modules: Sequence[OutModule], family: Family
) -> tuple[dict[tuple[int, str], str], list[tuple[str, float, str]]]:
    components = {m.component for m in modules}
    names: dict[tuple[int, str], str] = {}
    own: list[tuple[str, float, str]] = []
    for i, m in enumerate(modules):
        stem = kohya_prefix_of(m.component, components, family) + mangle(m.module)
        for part in m.factors:
            names[(i, part)] = f"{stem}.{_KOHYA_PARTS[m.kind][part]}"
        if m.dora_scale is not None:
            names[(i, "dora_scale")] = f"{stem}.dora_scale"
        if m.alpha is not None:
            own.append((f"{stem}.alpha", float(m.alpha), _alpha_dtype(float(m.alpha))))
    return names, own


def _peft_names(
    modules: Sequence[OutModule], fmt: OutputFormat, dit: bool, source: Path | None
) -> dict[tuple[int, str], str]:
    names: dict[tuple[int, str], str] = {}
    for i, m in enumerate(modules):
        if fmt is OutputFormat.PEFT:
            prefix = _PEFT_PREFIX
        else:
            component = diffusers_component(m.component, dit=dit)
            if component is None:
                raise _refuse(m, source, f"no diffusers component holds {m.component.value} "
                              "modules (a T5 text encoder)", "convert it --to kohya")  # fmt: skip
            prefix = component + "."
        for part in m.factors:
            names[(i, part)] = f"{prefix}{m.module}.{_PEFT_PARTS[part]}"
    return names


def _config_name(module: OutModule) -> str:
    """The module's name in a LoraConfig. Text encoders without ``text_model.``: PEFT matches
    names as suffixes, so this fits transformers 4's CLIP (which has that level) and 5's (which
    drops it and maps ``text_model.`` keys when loading)."""
    if module.component.is_text_encoder:
        return module.module.removeprefix("text_model.")
    return module.module


def _rank_config(modules: Sequence[OutModule]) -> dict[str, Any]:
    """One component's LoraConfig fields: the most common (r, α) as defaults, every other
    module's own in ``rank_pattern``/``alpha_pattern`` by its escaped full name (spec §3.1), so
    per-module alphas survive (never diffusers' α = r, spec §3.4)."""
    from ..adapters import rank_config

    ranks = {_config_name(m): int(m.rank or 0) for m in modules}
    alphas = {_config_name(m): m.alpha_or_rank for m in modules}
    config = rank_config(ranks, alphas)
    config.update(
        target_modules=sorted(ranks),
        use_rslora=False,
        use_dora=False,
        lora_bias=any("up_bias" in m.factors for m in modules),
    )
    return config


def _diffusers_metadata(modules: Sequence[OutModule], dit: bool) -> str:
    by_component: dict[str, list[OutModule]] = {}
    for m in modules:
        by_component.setdefault(str(diffusers_component(m.component, dit=dit)), []).append(m)
    packed: dict[str, Any] = {}
    for prefix, group in by_component.items():
        for key, value in _rank_config(group).items():
            packed[f"{prefix}.{key}"] = value
    return json.dumps(packed, indent=2, sort_keys=True)


def _most_common(values: Iterable[float]) -> float | None:
    counts = collections.Counter(values)
    return max(counts, key=lambda v: (counts[v], v)) if counts else None


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _kohya_metadata(
    modules: Sequence[OutModule], family: Family, given: Mapping[str, str]
) -> dict[str, str]:
    """sd-scripts' ``ss_*`` keys (spec §1.4): ``ss_network_dim``/``ss_network_alpha`` are the
    most common rank and alpha of the linear modules (informational; the tensors decide), conv
    (k×k) modules' in ``ss_network_args``; the caller's ``ss_network_module``, base version and
    other keys are kept."""
    lycoris = any(m.kind is not Kind.LORA or m.dora_scale is not None for m in modules)
    convs = [
        m for m in modules if "down" in m.factors and math.prod(m.factors["down"].shape[2:]) > 1
    ]
    linear = [m for m in modules if m not in convs] or list(modules)
    computed: dict[str, str] = {
        "ss_network_module": "lycoris.kohya" if lycoris else (
            "networks.lora_flux" if family is Family.FLUX else "networks.lora"),
    }  # fmt: skip
    if family in _BASE_VERSION:
        computed["ss_base_model_version"] = _BASE_VERSION[family]
        computed["ss_v2"] = str(family is Family.SD2)
    out = {**computed, **given}
    dim = _most_common(float(m.rank) for m in linear if m.rank is not None)
    alpha = _most_common(m.alpha_or_rank for m in linear)
    if dim is not None and alpha is not None:
        out["ss_network_dim"], out["ss_network_alpha"] = _number(dim), _number(alpha)
    if convs:
        args = _network_args(given)
        args["conv_dim"] = _number(_most_common(float(m.rank or 0) for m in convs) or 0)
        args["conv_alpha"] = _number(_most_common(m.alpha_or_rank for m in convs) or 0)
        out["ss_network_args"] = json.dumps(args)
    return out


def _network_args(given: Mapping[str, str]) -> dict[str, Any]:
    try:
        args = json.loads(given.get("ss_network_args", "{}"))
    except ValueError:
        return {}
    return dict(args) if isinstance(args, dict) else {}


def _tensors(
    modules: Sequence[OutModule], names: Mapping[tuple[int, str], str],
    own: Sequence[tuple[str, float, str]],
) -> tuple[list[OutputTensor], list[Copy]]:  # fmt: skip
    tensors = [OutputTensor(name, code, ()) for name, _, code in own]
    copies: list[Copy] = []
    for i, m in enumerate(modules):
        parts = dict(m.factors)
        if m.dora_scale is not None:
            parts["dora_scale"] = m.dora_scale
        for part, factor in parts.items():
            name = names[(i, part)]
            tensors.append(OutputTensor(name, factor.dtype, factor.shape))
            if factor.source is not None:
                copies.append(Copy(name, factor.source))
    return tensors, copies


def _check_unique(
    modules: Sequence[OutModule], names: Mapping[tuple[int, str], str], source: Path | None
) -> None:
    seen: dict[str, int] = {}
    for (i, _), name in names.items():
        if seen.setdefault(name, i) != i:
            raise _refuse(
                modules[i], source,
                f"is written as {name}, like {modules[seen[name]].label}",
                "two modules of the input have the same name in the output format",
            )  # fmt: skip


def _peft_config(modules: Sequence[OutModule]) -> dict[str, Any]:
    config = _rank_config(modules)
    config.update(peft_type="LORA", task_type=None, base_model_name_or_path=None, bias="none",
                  fan_in_fan_out=False, inference_mode=True, lora_dropout=0.0)  # fmt: skip
    return config


def _check_components(modules: Sequence[OutModule], fmt: OutputFormat) -> None:
    components = sorted({m.component.value for m in modules})
    if fmt is OutputFormat.PEFT and len(components) > 1:
        raise OptionError(
            f"a PEFT adapter holds the modules of one model, this LoRA has {len(components)} "
            f"components ({', '.join(components)})",
            hint="write it as diffusers (--format diffusers; convert: --to diffusers), one file "
            "with a section per component",
        )


def plan_lora(
    out: Path,
    modules: Sequence[OutModule],
    fmt: OutputFormat,
    *,
    family: Family = Family.UNKNOWN,
    metadata: Mapping[str, str] | None = None,
    source: Path | None = None,
    dit: bool | None = None,
) -> LoraPlan:
    """Plan writing ``modules`` to ``out`` in ``fmt``.

    kohya: one file, ``<prefix><mangled module>.<part>`` with sd-scripts' part names (LyCORIS
    kinds and ``dora_scale`` kept as they are), each module's α as a scalar ``alpha`` tensor
    (fp32, F64 where fp32 would round it; none where the module has none: α = r), and
    ``ss_*`` metadata. diffusers: one file, ``<component>.<module>.lora_A.weight``/
    ``lora_B.weight``[/``lora_B.bias``], ``lora_adapter_metadata`` holding each component's
    ``r``/``lora_alpha``/``rank_pattern``/``alpha_pattern``/``target_modules``. PEFT: an
    adapter directory of one component, ``base_model.model.<module>.…`` and the same config.
    ``metadata`` (e.g. the input's ``ss_*`` keys) is carried into kohya and diffusers files,
    less hashes of other bytes. ``source`` names the input file in errors. ``dit``: the UNet
    component is a DiT (diffusers ``transformer.`` keys; default: FLUX and SD3 families).

    Raises:
        AdapterError: a module ``fmt`` cannot hold (LyCORIS kinds and DoRA outside kohya, a
            lora_B bias in kohya, a T5 module in diffusers), or two modules with one name.
        OptionError: ``fmt`` is PEFT and the modules belong to several components.
    """
    for m in modules:
        _check_module(m, fmt, source)
    _check_components(modules, fmt)
    given = {k: v for k, v in (metadata or {}).items() if k not in _DROPPED_METADATA}
    own: list[tuple[str, float, str]] = []
    if fmt is OutputFormat.KOHYA:
        names, own = _kohya_names(modules, family)
        header = _kohya_metadata(modules, family, given)
    else:
        is_dit = family in (Family.FLUX, Family.SD3) if dit is None else dit
        names = _peft_names(modules, fmt, is_dit, source)
        header = {**given, METADATA_KEY: _diffusers_metadata(modules, is_dit)}
    _check_unique(modules, names, source)
    tensors, copies = _tensors(modules, names, own)
    counts = collections.Counter(m.component for m in modules)
    if fmt is OutputFormat.PEFT:
        shard = OutputShard(_ADAPTER_WEIGHTS, {"format": "pt"}, tuple(tensors))
        text = json.dumps(_peft_config(modules), indent=2, sort_keys=True) + "\n"
        output = Output(out, OutputLayout((shard,)), tuple(copies), texts={_ADAPTER_CONFIG: text})
    else:
        shard = OutputShard(out.name, {"format": "pt", **header}, tuple(tensors))
        output = Output(out, OutputLayout((shard,), single_file=True), tuple(copies))
    return LoraPlan(output, names, tuple(own), dict(counts))

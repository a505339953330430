"""diffusers LoRA files (spec §3): PEFT keys under component prefixes with the LoraConfig in
``lora_adapter_metadata``, and the older attention-processor spellings. Headers only."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AdapterError
from ..reader import TensorInfo
from ..targets import pattern_value
from .model import Component, Kind, ModuleUpdate

__all__ = [
    "DIFFUSERS_COMPONENTS",
    "METADATA_KEY",
    "is_diffusers_key",
    "is_old_diffusers_key",
    "read_diffusers_modules",
    "read_old_diffusers_modules",
]

#: The header entry where diffusers stores each component's LoraConfig.
METADATA_KEY = "lora_adapter_metadata"
#: Component prefixes of diffusers LoRA keys; ``transformer`` is the DiT, which kohya names
#: ``lora_unet_`` too.
DIFFUSERS_COMPONENTS: dict[str, Component] = {
    "unet": Component.UNET,
    "transformer": Component.UNET,
    "text_encoder": Component.TE1,
    "text_encoder_2": Component.TE2,
}
_PEFT_PARTS = {"lora_A.weight": "down", "lora_B.weight": "up", "lora_B.bias": "up_bias",
               "lora_magnitude_vector": "magnitude"}  # fmt: skip
_OLD_SUFFIXES = (
    ".lora.down.weight", ".lora.up.weight", ".lora_linear_layer.down.weight",
    ".lora_linear_layer.up.weight", "_lora.down.weight", "_lora.up.weight",
)  # fmt: skip
# Attention-processor spellings: to_x_lora -> module name under the UNet / a text encoder.
_UNET_PROCESSORS = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v",
                    "to_out_lora": "to_out.0"}  # fmt: skip
_TEXT_PROCESSORS = {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj",
                    "to_out_lora": "out_proj"}  # fmt: skip


def _component(key: str) -> tuple[str, Component] | None:
    first = key.split(".", 1)[0]
    component = DIFFUSERS_COMPONENTS.get(first)
    return (first, component) if component is not None else None


def is_diffusers_key(key: str) -> bool:
    """A PEFT-style diffusers key: ``<component>.<module>.lora_A.weight`` etc."""
    return _component(key) is not None and (
        any(key.endswith("." + part) for part in _PEFT_PARTS)
        or key.endswith(".lora_magnitude_vector")
    )


def is_old_diffusers_key(key: str) -> bool:
    """A key of the older attention-processor format (spec §3.2)."""
    return key.endswith(_OLD_SUFFIXES) or (
        key.endswith(".alpha") and any(s in key for s in ("_lora.", ".lora.", ".lora_linear_layer"))
    )


@dataclass(frozen=True)
class _Config:
    """The scaling part of one component's LoraConfig."""

    lora_alpha: float
    rank_pattern: Mapping[str, float]
    alpha_pattern: Mapping[str, float]
    use_rslora: bool

    def scaling(self, module: str, rank: int) -> tuple[float, float]:
        """(alpha, scaling) of ``module`` with ``rank`` as stored, as PEFT computes them."""
        alpha = pattern_value(self.alpha_pattern, module)
        alpha = self.lora_alpha if alpha is None else alpha
        return alpha, alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _configs(path: Path, metadata: Mapping[str, str]) -> dict[str, _Config] | None:
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        return None
    try:
        packed = json.loads(raw)
    except ValueError as e:
        raise AdapterError(
            f"{METADATA_KEY} is not valid JSON ({e})", path=path, hint="the file is corrupt"
        ) from e
    if not isinstance(packed, dict):
        raise AdapterError(f"{METADATA_KEY} is not a JSON object", path=path)
    configs: dict[str, _Config] = {}
    for prefix in DIFFUSERS_COMPONENTS:
        fields = {k[len(prefix) + 1 :]: v for k, v in packed.items() if k.startswith(prefix + ".")}
        if fields:
            configs[prefix] = _config(path, prefix, fields)
    return configs


def _config(path: Path, prefix: str, fields: Mapping[str, Any]) -> _Config:
    alpha = fields.get("lora_alpha", fields.get("r"))
    rank_pattern = fields.get("rank_pattern") or {}
    alpha_pattern = fields.get("alpha_pattern") or {}
    if (
        not isinstance(alpha, (int, float))
        or not isinstance(rank_pattern, dict)
        or not isinstance(alpha_pattern, dict)
    ):
        raise AdapterError(
            f"{METADATA_KEY} for {prefix} has no numeric lora_alpha/r",
            path=path,
            hint="the file's metadata is malformed",
        )
    return _Config(float(alpha), rank_pattern, alpha_pattern, bool(fields.get("use_rslora")))


def _group(
    path: Path, tensors: Mapping[str, TensorInfo]
) -> dict[tuple[str, str], dict[str, TensorInfo]]:
    modules: dict[tuple[str, str], dict[str, TensorInfo]] = {}
    for key, info in tensors.items():
        found = _component(key)
        part = next((p for p in _PEFT_PARTS if key.endswith("." + p)), None)
        if key.endswith(".alpha"):
            part = "alpha"
        if found is None or part is None:
            raise AdapterError(
                "unsupported key in a diffusers LoRA",
                path=path,
                tensor=key,
                hint="only lora_A/lora_B weights, lora_B biases, DoRA magnitudes "
                "(lora_magnitude_vector) and alphas can be read",
            )
        prefix = found[0]
        module = key[len(prefix) + 1 : -len(part) - 1]
        modules.setdefault((prefix, module), {})[_PEFT_PARTS.get(part, part)] = info
    return modules


def read_diffusers_modules(
    path: Path,
    tensors: Mapping[str, TensorInfo],
    metadata: Mapping[str, str],
    scalar: Callable[[TensorInfo], float],
) -> tuple[ModuleUpdate, ...]:
    """Every module of a PEFT-style diffusers file. Scaling per spec §3.1: the component's
    LoraConfig from ``lora_adapter_metadata`` (alpha/rank patterns, rsLoRA) when present, else
    a module's own ``.alpha`` key, else s = 1 as diffusers loads such files. A DoRA module's
    ``lora_magnitude_vector`` is its ``magnitude`` factor (PEFT's DoRA, one norm per output
    unit).

    Raises:
        AdapterError: an unknown key, a module missing lora_A or lora_B, bad metadata.
    """
    configs = _configs(path, metadata)
    updates = []
    for (prefix, module), parts in _group(path, tensors).items():
        source = f"{prefix}.{module}"
        _require(path, source, parts, ("down", "up"))
        rank = parts["down"].shape[0]
        config = (configs or {}).get(prefix)
        alpha: float | None = None
        if config is not None:
            alpha, scaling = config.scaling(module, rank)
        elif "alpha" in parts:
            alpha = scalar(parts["alpha"])
            scaling = alpha / rank
        else:
            scaling = 1.0
        factors = {k: v for k, v in parts.items() if k != "alpha"}
        updates.append(
            ModuleUpdate(
                DIFFUSERS_COMPONENTS[prefix],
                module,
                source,
                Kind.LORA,
                factors,
                alpha,
                rank,
                scaling,
            )  # fmt: skip
        )
    return tuple(updates)


def _require(
    path: Path, source: str, parts: Mapping[str, TensorInfo], names: tuple[str, str]
) -> None:
    missing = [n for n in names if n not in parts]
    if missing:
        spelled = {"down": "down (lora_A)", "up": "up (lora_B)"}
        raise AdapterError(
            f"module has no {' or '.join(spelled[m] for m in missing)} weight",
            path=path,
            tensor=source,
            hint="the file is incomplete",
        )


def _old_module(key: str) -> tuple[str, Component, str, str]:
    """(component prefix, component, module path, part) of an old-format key; keys without a
    component prefix are UNet keys (the oldest files)."""
    found = _component(key)
    prefix, component = found if found is not None else ("", Component.UNET)
    rest = key[len(prefix) + 1 :] if prefix else key
    part = "alpha" if rest.endswith(".alpha") else ("up" if ".up." in rest else "down")
    stem = rest.removesuffix(".alpha").removesuffix(".weight")
    stem = stem.removesuffix(".down").removesuffix(".up")
    parent, _, last = stem.rpartition(".")
    if last in ("lora", "lora_linear_layer"):
        return prefix, component, parent, part
    names = _TEXT_PROCESSORS if component.is_text_encoder else _UNET_PROCESSORS
    parent = parent.removesuffix(".processor")
    mapped = names.get(last, last.removesuffix("_lora"))
    return prefix, component, f"{parent}.{mapped}" if parent else mapped, part


def read_old_diffusers_modules(
    path: Path, tensors: Mapping[str, TensorInfo], scalar: Callable[[TensorInfo], float]
) -> tuple[ModuleUpdate, ...]:
    """Every module of an old attention-processor diffusers file (spec §3.2): ``down`` = A,
    ``up`` = B, ``.processor.`` dropped, ``to_out_lora`` → ``to_out.0`` (text encoders:
    ``to_q_lora`` → ``q_proj`` …). s = 1 unless a ``.alpha`` entry exists (then α/r).

    Raises:
        AdapterError: a module missing its down or up weight.
    """
    modules: dict[tuple[str, str], dict[str, TensorInfo]] = {}
    components: dict[str, Component] = {}
    for key, info in tensors.items():
        prefix, component, module, part = _old_module(key)
        source = f"{prefix}.{module}" if prefix else module
        components[source] = component
        modules.setdefault((source, module), {})[part] = info
    updates = []
    for (source, module), parts in modules.items():
        _require(path, source, parts, ("down", "up"))
        rank = parts["down"].shape[0]
        alpha = scalar(parts["alpha"]) if "alpha" in parts else None
        factors = {k: v for k, v in parts.items() if k != "alpha"}
        updates.append(
            ModuleUpdate(
                components[source],
                module,
                source,
                Kind.LORA,
                factors,
                alpha,
                rank,
                1.0 if alpha is None else alpha / rank,
            )  # fmt: skip
        )
    return tuple(updates)

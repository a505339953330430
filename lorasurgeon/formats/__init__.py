"""Diffusion LoRA file formats (kohya/LyCORIS, diffusers, old diffusers) detected from their
keys and read into one canonical list of updates (shared/spec/sd-lora.md §5.1).

Only headers and alpha scalars are read; no tensor math here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ..errors import AdapterError
from ..reader import TensorInfo, open_checkpoint
from .diffusers import (
    is_diffusers_key,
    is_old_diffusers_key,
    read_diffusers_modules,
    read_old_diffusers_modules,
)
from .kohya import kohya_prefix, read_kohya_modules
from .model import Component, Family, Kind, LoraFile, LoraFormat, ModuleUpdate, mangle

__all__ = [
    "Component",
    "Family",
    "Kind",
    "LoraFile",
    "LoraFormat",
    "ModuleUpdate",
    "detect_format",
    "mangle",
    "read_lora",
]


def _key_format(key: str) -> LoraFormat | None:
    """The family one key belongs to; None for a bare ``.alpha`` that any diffusers file may
    carry."""
    if kohya_prefix(key.split(".", 1)[0]) is not None:
        return LoraFormat.KOHYA
    if is_diffusers_key(key):
        return LoraFormat.DIFFUSERS
    if is_old_diffusers_key(key):
        return LoraFormat.DIFFUSERS_OLD
    if key.endswith(".alpha"):
        return None
    raise AdapterError(
        "key belongs to no known LoRA format (kohya/LyCORIS, diffusers, old diffusers)",
        tensor=key,
        hint="a PEFT adapter directory (base_model.model.… keys with adapter_config.json) is "
        "read as an adapter, not as a diffusion LoRA"
        if key.startswith("base_model.model.")
        else "is this a LoRA file?",
    )


def detect_format(path: str | os.PathLike[str], names: list[str]) -> LoraFormat:
    """The format of a LoRA file from its tensor names (spec §5.1).

    Raises:
        AdapterError: a key of no known format, keys of several formats, or no keys.
    """
    seen: dict[LoraFormat, str] = {}
    for key in names:
        try:
            found = _key_format(key)
        except AdapterError as e:
            raise AdapterError(e.message, path=path, tensor=key, hint=e.hint) from None
        if found is not None:
            seen.setdefault(found, key)
    if len(seen) > 1:
        first, second = list(seen.items())[:2]
        raise AdapterError(
            f"the file mixes formats: {first[0].value} ({first[1]}) and {second[0].value}",
            path=path,
            tensor=second[1],
            hint="split it into one file per format",
        )
    if not seen:
        raise AdapterError("holds no LoRA tensors", path=path, hint="is this a LoRA file?")
    return next(iter(seen))


def _family_from_metadata(metadata: Mapping[str, str]) -> Family | None:
    version = metadata.get("ss_base_model_version", "")
    arch = metadata.get("modelspec.architecture", "")
    for text in (version, arch):
        if text.startswith(("sd_v1", "stable-diffusion-v1")):
            return Family.SD1
        if text.startswith(("sd_v2", "stable-diffusion-v2")):
            return Family.SD2
        if text.startswith(("sdxl", "stable-diffusion-xl")):
            return Family.SDXL
        if text.startswith(("flux", "chroma")):
            return Family.FLUX
        if text.startswith(("sd3", "stable-diffusion-3")):
            return Family.SD3
    return None


def _family_from_names(fmt: LoraFormat, updates: tuple[ModuleUpdate, ...]) -> Family:
    """The family the names imply (spec §5.1). diffusers UNet names are the same in SD1, SD2
    and SDXL, so a diffusers file without a second text encoder has no family by name."""
    keys = {u.key for u in updates if u.component is Component.UNET}
    components = {u.component for u in updates}
    if any(
        k.startswith(("double_blocks", "single_blocks", "single_transformer_blocks")) for k in keys
    ):
        return Family.FLUX
    if any(k.startswith("joint_blocks") for k in keys):
        return Family.SD3
    if any(k.startswith(("input_blocks", "output_blocks", "middle_block")) for k in keys):
        return Family.SDXL
    if Component.TE2 in components:
        return Family.SDXL
    if fmt is not LoraFormat.KOHYA:
        return Family.UNKNOWN
    if any(k.startswith(("down_blocks", "up_blocks", "mid_block")) for k in keys) or (
        Component.TE in components
    ):
        return Family.SD1_SD2
    return Family.UNKNOWN


def read_lora(path: str | os.PathLike[str]) -> LoraFile:
    """Read a diffusion LoRA file into canonical updates.

    Every module is checked to be complete and of a known algorithm; the family comes from
    the ``ss_base_model_version``/``modelspec.architecture`` metadata when present, else from
    the names (spec §5.1). Whether each module fits a base is the layout's question.

    Raises:
        LocationError: no file at ``path``.
        CheckpointError: the file is not valid safetensors.
        AdapterError: an unknown format, a mix of formats, an unknown part, an incomplete module.
    """
    p = Path(path)
    with open_checkpoint(p) as checkpoint:
        metadata: dict[str, str] = {}
        for shard in checkpoint.shards:
            metadata.update(shard.metadata or {})
        tensors = dict(checkpoint.tensors)
        fmt = detect_format(p, list(tensors))

        def scalar(info: TensorInfo) -> float:
            # float64: an alpha stored in F64 (exactly as written) keeps its value
            return float(checkpoint.load(info).double().reshape(()).item())

        if fmt is LoraFormat.KOHYA:
            updates = read_kohya_modules(p, tensors, scalar)
        elif fmt is LoraFormat.DIFFUSERS:
            updates = read_diffusers_modules(p, tensors, metadata, scalar)
        else:
            updates = read_old_diffusers_modules(p, tensors, scalar)
    family = _family_from_metadata(metadata) or _family_from_names(fmt, updates)
    return LoraFile(p, fmt, family, updates, metadata)

"""Base checkpoint layouts (LDM/SGM single file, diffusers folder, UNet/DiT-only, FLUX BFL)
detected from the keys, and every module a diffusion LoRA may target, by every spelling
(shared/spec/sd-lora.md §2, §5.2). Headers only."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..errors import CheckpointError, LorasurgeonError, OptionError
from ..formats.model import Component, Family
from ..reader import TensorInfo, open_checkpoint
from .clip import hf_clip_aliases, open_clip_aliases
from .flux import bfl_aliases, diffusers_flux_aliases
from .model import Layout, LayoutKind, Piece, Target
from .resolve import Resolution, delta_shape, resolve_updates
from .table import Alias, build_targets
from .unet import diffusers_structure, ldm_structure, other_spelling

__all__ = [
    "Layout",
    "LayoutKind",
    "Piece",
    "Resolution",
    "Target",
    "delta_shape",
    "has_diffusion_tensors",
    "is_diffusion_checkpoint",
    "open_layout",
    "resolve_updates",
]

_LDM_UNET = "model.diffusion_model."
# Roots that only a diffusion model's UNet/DiT tensors have (LDM, diffusers UNet, BFL, diffusers
# FLUX): a checkpoint with any of them is read by a layout.
_DIFFUSION_ROOTS = (_LDM_UNET, "input_blocks.", "down_blocks.", "double_blocks.", "single_blocks.",
                    "single_transformer_blocks.")  # fmt: skip
# LDM text-encoder roots: prefix -> (components, OpenCLIP?)
_LDM_TEXT: dict[str, tuple[tuple[Component, ...], bool]] = {
    "cond_stage_model.transformer.": ((Component.TE, Component.TE1), False),
    "cond_stage_model.model.": ((Component.TE, Component.TE1), True),
    "conditioner.embedders.0.transformer.": ((Component.TE1,), False),
    "conditioner.embedders.1.model.": ((Component.TE2,), True),
}
_REFINER_TEXT = "conditioner.embedders.0.model."
_DIFFUSERS_PARTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def _relative(tensors: Mapping[str, TensorInfo], prefix: str) -> dict[str, TensorInfo]:
    return {n[len(prefix) :]: i for n, i in tensors.items() if n.startswith(prefix)}


def _unet_aliases(paths: list[str]) -> list[Alias]:
    """Each UNet module also under the other spelling (LDM <-> diffusers)."""
    ldm = ldm_structure(paths)
    structure = ldm or diffusers_structure(paths)
    if structure is None:
        return []
    rows = structure.prefixes()
    aliases = []
    for path in paths:
        if path.endswith(".weight"):
            module = path.removesuffix(".weight")
            other = other_spelling(module + ".", rows, from_ldm=ldm is not None)
            if other is not None:
                aliases.append(Alias(other.rstrip("."), module))
    return aliases


def _is_bfl(paths: Mapping[str, TensorInfo]) -> bool:
    return any(p.startswith(("double_blocks.", "single_blocks.")) for p in paths)


def _is_diffusers_flux(paths: Mapping[str, TensorInfo]) -> bool:
    return any(p.startswith("single_transformer_blocks.") for p in paths)


def _dit_aliases(relative: Mapping[str, TensorInfo]) -> list[Alias]:
    if _is_bfl(relative):
        shapes = {
            p.removesuffix(".weight"): i.shape for p, i in relative.items() if p.endswith(".weight")
        }
        return bfl_aliases(shapes)
    if _is_diffusers_flux(relative):
        return diffusers_flux_aliases(relative)
    return _unet_aliases(list(relative))


def _text_components(
    relative: Mapping[str, TensorInfo], components: tuple[Component, ...]
) -> tuple[Component, ...]:
    """A T5 encoder (``encoder.block.``) is kohya's ``lora_te3_`` whatever folder it is in."""
    if any(p.startswith("encoder.block.") for p in relative):
        return (Component.TE3,)
    return components


def _unet_family(relative: Mapping[str, TensorInfo]) -> Family:
    """SDXL by its added embedding; SD1 by conv proj_in (SD2 and SDXL use linear ones)."""
    if _is_bfl(relative) or _is_diffusers_flux(relative):
        return Family.FLUX
    if any(p.startswith(("label_emb.", "add_embedding.")) for p in relative):
        return Family.SDXL
    proj = next((i for p, i in relative.items() if p.endswith(".proj_in.weight")), None)
    if proj is not None:
        return Family.SD1 if len(proj.shape) == 4 else Family.SD2
    return Family.UNKNOWN


def _inpainting(relative: Mapping[str, TensorInfo]) -> bool:
    conv_in = relative.get("input_blocks.0.0.weight") or relative.get("conv_in.weight")
    return conv_in is not None and len(conv_in.shape) == 4 and conv_in.shape[1] == 9


def _single_file(path: Path, checkpoint_path: Path, tensors: Mapping[str, TensorInfo]) -> Layout:
    has_prefix = any(n.startswith(_LDM_UNET) for n in tensors)
    unet_prefix = _LDM_UNET if has_prefix else ""
    unet = _relative(tensors, unet_prefix)
    if not (
        ldm_structure(list(unet))
        or diffusers_structure(list(unet))
        or _is_bfl(unet)
        or _is_diffusers_flux(unet)
    ):
        raise CheckpointError(
            "no UNet or FLUX transformer found (no input_blocks., down_blocks., double_blocks. "
            "or single_transformer_blocks. tensors)",
            path=path,
            hint="pass an SD1/SD2/SDXL or FLUX checkpoint",
        )
    targets = build_targets(
        checkpoint_path, unet_prefix, tensors, (Component.UNET,), _dit_aliases(unet)
    )
    components = [Component.UNET]
    for prefix, (names, open_clip) in _text_roots(tensors).items():
        relative = _relative(tensors, prefix)
        aliases = open_clip_aliases(relative) if open_clip else hf_clip_aliases(list(relative))
        targets.update(build_targets(checkpoint_path, prefix, tensors, names, aliases))
        components += names
    family = _unet_family(unet)
    if any(n.startswith("conditioner.embedders.1.") for n in tensors):
        family = Family.SDXL
    elif any(n.startswith(_REFINER_TEXT) for n in tensors):
        family = Family.SDXL_REFINER
    elif any(n.startswith("cond_stage_model.model.") for n in tensors):
        family = Family.SD2
    elif any(n.startswith("cond_stage_model.transformer.") for n in tensors):
        family = Family.SD1
    if _is_bfl(unet):
        kind = LayoutKind.BFL
    elif _is_diffusers_flux(unet):
        kind = LayoutKind.DIT
    else:
        kind = LayoutKind.LDM if has_prefix else LayoutKind.UNET
    return Layout(
        path,
        kind,
        family,
        _inpainting(unet),
        {"": checkpoint_path},
        tuple(dict.fromkeys(components)),
        targets,
    )


def _text_roots(tensors: Mapping[str, TensorInfo]) -> dict[str, tuple[tuple[Component, ...], bool]]:
    roots = {p: v for p, v in _LDM_TEXT.items() if any(n.startswith(p) for n in tensors)}
    if (
        any(n.startswith(_REFINER_TEXT) for n in tensors)
        and "conditioner.embedders.1.model." not in roots
    ):
        roots[_REFINER_TEXT] = ((Component.TE, Component.TE2), True)
    return roots


def _component_file(directory: Path, variant: str | None) -> Path:
    """The weight file (or index) of one diffusers component: of ``variant`` (``fp16``…) when
    it has one, else the plain files, else the only variant there is.

    Raises:
        OptionError: several variants and none chosen; CheckpointError: none found.
    """
    names = sorted(p.name for p in directory.iterdir() if p.is_file())
    indexes = [n for n in names if re.fullmatch(r".+\.safetensors\.index(\.[\w-]+)?\.json", n)]
    singles = [
        n for n in names if n.endswith(".safetensors") and not re.search(r"-\d{5}-of-\d{5}", n)
    ]

    def variant_of(name: str) -> str | None:
        m = re.fullmatch(r".+\.safetensors\.index\.([\w-]+)\.json", name) or re.fullmatch(
            r"[^.]+\.([\w-]+)\.safetensors", name
        )
        return m.group(1) if m else None

    files = indexes + singles  # an index before a single file of the same variant
    if not files:
        raise CheckpointError("no safetensors weights in this component", path=directory)
    found = sorted({variant_of(n) or "" for n in files})
    # A component without the asked variant falls back to its plain files, as diffusers does.
    if variant in found or (variant and "" in found):
        wanted: str | None = variant if variant in found else ""
    else:
        wanted = "" if "" in found else (found[0] if len(found) == 1 else None)
    if wanted is None or wanted not in found:
        raise OptionError(
            f"component has the variants {', '.join(v or '(plain)' for v in found)}",
            path=directory,
            hint="choose one with --variant" if wanted is None else f"it has no {variant} variant",
        )
    chosen = [n for n in files if (variant_of(n) or "") == wanted]
    return directory / chosen[0]


def _diffusers_folder(path: Path, variant: str | None) -> Layout:
    index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    class_name = str(index.get("_class_name", "")) if isinstance(index, dict) else ""
    checkpoints: dict[str, Path] = {}
    targets: dict[tuple[Component, str], Target] = {}
    components: list[Component] = []
    family = Family.UNKNOWN
    inpainting = False
    parts = [p for p in _DIFFUSERS_PARTS if (path / p).is_dir()]
    for part in parts:
        file = _component_file(path / part, variant)
        checkpoints[part] = file
        with open_checkpoint(file) as checkpoint:
            tensors = dict(checkpoint.tensors)
        if part in ("unet", "transformer"):
            names: tuple[Component, ...] = (Component.UNET,)
            aliases = _dit_aliases(tensors)
            family = _unet_family(tensors)
            inpainting = _inpainting(tensors)
        else:
            # kohya's lora_te_ names the only text encoder there is
            only = not ({"text_encoder", "text_encoder_2"} - {part} & set(parts))
            own = Component.TE1 if part == "text_encoder" else Component.TE2
            names = (Component.TE, own) if only else (own,)
            names = _text_components(tensors, names)
            aliases = hf_clip_aliases(list(tensors))
        targets.update(build_targets(file, "", tensors, names, aliases))
        components += names
    if "XL" in class_name:
        family = Family.SDXL if "text_encoder" in parts else Family.SDXL_REFINER
    return Layout(
        path,
        LayoutKind.DIFFUSERS,
        family,
        inpainting,
        checkpoints,
        tuple(dict.fromkeys(components)),
        targets,
    )


def open_layout(path: str | os.PathLike[str], *, variant: str | None = None) -> Layout:
    """Detect a base checkpoint's layout and family and build its module table.

    A directory with ``model_index.json`` is a diffusers folder (each of ``unet``,
    ``transformer``, ``text_encoder``, ``text_encoder_2``, ``text_encoder_3`` that exists);
    anything else is one checkpoint: an LDM/SGM single file (``model.diffusion_model.``), a
    UNet-only file (LDM or diffusers paths) or a FLUX transformer (BFL paths, optionally under
    ``model.diffusion_model.``, or diffusers paths). The family comes from the key structure.

    Raises:
        LocationError: nothing at ``path``.
        CheckpointError: malformed files, or no UNet/transformer found.
        OptionError: a diffusers component has several variants and ``variant`` is None.
    """
    p = Path(path)
    if p.is_dir() and (p / "model_index.json").is_file():
        return _diffusers_folder(p, variant)
    with open_checkpoint(p) as checkpoint:
        tensors = dict(checkpoint.tensors)
        file = checkpoint.index_path or checkpoint.shards[0].path
    return _single_file(p, file, tensors)


def has_diffusion_tensors(names: Iterable[str]) -> bool:
    """Whether tensor ``names`` include a diffusion UNet's or DiT's (spec §5.2)."""
    return any(name.startswith(_DIFFUSION_ROOTS) for name in names)


def is_diffusion_checkpoint(path: Path) -> bool:
    """A diffusers pipeline folder, or a checkpoint with UNet/DiT tensors (spec §5.2); False
    for anything else, including what cannot be read (its own command reports that)."""
    if path.is_dir() and (path / "model_index.json").is_file():
        return True
    try:
        with open_checkpoint(path) as checkpoint:
            return has_diffusion_tensors(checkpoint.tensors)
    except LorasurgeonError:
        return False

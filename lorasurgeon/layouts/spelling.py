"""Which spelling of a base module a written LoRA uses (spec §2.1, §3.1): kohya names as
sd-scripts writes them per family, diffusers module paths for diffusers files. Forward maps from
the base's own paths only; the inverse of ``_`` mangling is never computed. Strings only."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import IncompatibleError
from ..formats.model import Component, Family
from .model import Layout, Piece, Target
from .unet import UnetStructure, diffusers_structure, ldm_structure, other_spelling

__all__ = ["Spellings", "kohya_text_path"]

_LDM_UNET = ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out_")
_BFL = ("double_blocks", "single_blocks", "img_in", "txt_in", "time_in", "vector_in",
        "guidance_in", "final_layer")  # fmt: skip
# OpenCLIP resblock module -> transformers CLIP layer module (spec §2.3)
_OPEN_CLIP = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1",
              "mlp.c_proj": "mlp.fc2"}  # fmt: skip
_QKV = ("q_proj", "k_proj", "v_proj")


def kohya_text_path(path: str) -> str:
    """A transformers CLIP module path with the ``text_model.`` level that kohya names and
    published checkpoints have (transformers 5 saves ``CLIPTextModel`` without it)."""
    if path.startswith(("text_model.", "text_projection")):
        return path
    return "text_model." + path


@dataclass(frozen=True)
class Spellings:
    """The spellings of every module of a base layout: ``kohya`` and ``diffusers`` give the
    name a written LoRA uses for the module a LoRA name (mangled, any spelling) finds."""

    layout: Layout
    keys: Mapping[tuple[Component, tuple[Piece, ...]], tuple[str, ...]]
    structure: UnetStructure | None  # the LDM UNet's, when the base is spelled LDM

    @classmethod
    def of(cls, layout: Layout) -> Spellings:
        keys: dict[tuple[Component, tuple[Piece, ...]], list[str]] = {}
        for (component, key), target in layout.targets.items():
            keys.setdefault((component, target.pieces), []).append(key)
        unet = [t.module + "." for (c, _), t in layout.targets.items() if c is Component.UNET]
        structure = None if diffusers_structure(unet) else ldm_structure(unet)
        return cls(layout, {k: tuple(v) for k, v in keys.items()}, structure)

    def target(self, component: Component, key: str, *, where: str) -> Target:
        """The target a LoRA's mangled ``key`` names.

        Raises:
            IncompatibleError: no such module in the base (``where`` names it in the error).
        """
        target = self.layout.targets.get((component, key))
        if target is None:
            raise IncompatibleError(
                f"no such module in the base ({self.layout.kind.value} "
                f"{self.layout.family.value} at {self.layout.path})",
                tensor=where,
                hint="was this LoRA trained for another model?",
            )
        return target

    def kohya(self, component: Component, key: str, *, where: str) -> str:
        """The kohya name (without prefix) sd-scripts gives the module: mangled diffusers paths
        for SD1/SD2 UNets, LDM paths for SDXL, BFL paths for FLUX, ``text_model_…`` for text
        encoders (spec §2.1)."""
        target = self.target(component, key, where=where)
        names = self.keys[(component, target.pieces)]
        if component.is_text_encoder:
            wanted: tuple[str, ...] = ("text_model_", "text_projection")
        elif self.layout.family in (Family.SDXL, Family.SDXL_REFINER):
            wanted = _LDM_UNET
        elif self.layout.family is Family.FLUX:
            wanted = _BFL
        else:
            return next((n for n in names if not n.startswith(_LDM_UNET)), key)
        return next((n for n in names if n.startswith(wanted)), key)

    def diffusers(self, component: Component, key: str, *, where: str) -> str:
        """The dotted diffusers/transformers path of the module (``text_model.`` included).

        Raises:
            IncompatibleError: no such module, or one without a single diffusers counterpart
                (a fused FLUX module of a BFL base, which diffusers splits).
        """
        target = self.target(component, key, where=where)
        piece = target.pieces[0]
        path = None
        if component.is_text_encoder:
            path = _text_path(target.module, piece)
        elif len(target.pieces) == 1 and piece.weight_rows is None:
            if self.structure is not None:
                other = other_spelling(target.module + ".", self.structure.prefixes(),
                                       from_ldm=True)  # fmt: skip
                path = other.removesuffix(".") if other else None
            elif not target.module.startswith(_BFL):
                path = target.module
        if path is None:
            raise IncompatibleError(
                f"base module {target.module} has no single diffusers module to write it to",
                tensor=where,
                hint="convert it --to kohya, or pass a diffusers base",
            )
        return path


def _text_path(native: str, piece: Piece) -> str | None:
    """The transformers path of a text-encoder module: its own, or OpenCLIP's mapped (spec
    §2.3: q/k/v are row slices of ``in_proj``)."""
    m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", native)
    if m is None:
        return kohya_text_path(native)
    layer, rest = m.group(1), m.group(2)
    if rest == "attn.in_proj" and piece.weight_rows is not None:
        h = piece.weight_rows[1] - piece.weight_rows[0]
        part = _QKV[piece.weight_rows[0] // h]
        return f"text_model.encoder.layers.{layer}.self_attn.{part}"
    if rest in _OPEN_CLIP:
        return f"text_model.encoder.layers.{layer}.{_OPEN_CLIP[rest]}"
    return None

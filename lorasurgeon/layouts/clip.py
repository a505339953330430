"""Text-encoder spellings (spec §2.3): transformers CLIP with and without the ``text_model.``
level, and OpenCLIP (``transformer.resblocks.N.``, fused ``attn.in_proj_weight``) under the
transformers names kohya and diffusers LoRAs use. Strings and shapes only."""

from __future__ import annotations

import re
from collections.abc import Mapping

from ..reader import TensorInfo
from .table import Alias

__all__ = ["hf_clip_aliases", "open_clip_aliases"]

_LAYER = "text_model.encoder.layers.{n}."
# OpenCLIP resblock module -> transformers CLIP layer module
_OPEN_CLIP = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1",
              "mlp.c_proj": "mlp.fc2", "ln_1": "layer_norm1", "ln_2": "layer_norm2"}  # fmt: skip


def hf_clip_aliases(paths: list[str]) -> list[Alias]:
    """Each transformers CLIP module also under the spelling with (or without) ``text_model.``:
    transformers 5 saves ``CLIPTextModel`` without that level, published repositories and
    kohya names have it."""
    aliases = []
    for path in paths:
        if not path.endswith(".weight"):
            continue
        module = path.removesuffix(".weight")
        if module.startswith("text_model."):
            aliases.append(Alias(module.removeprefix("text_model."), module))
        elif not module.startswith("text_projection"):
            aliases.append(Alias("text_model." + module, module))
    return aliases


def open_clip_aliases(tensors: Mapping[str, TensorInfo]) -> list[Alias]:
    """OpenCLIP modules under their transformers names (``paths`` relative to the encoder):
    q/k/v are row slices ``[0:h]``, ``[h:2h]``, ``[2h:3h]`` of ``attn.in_proj_weight`` (h, h),
    ``text_projection`` is stored transposed, ``ln_final`` is ``final_layer_norm``. Each name
    is entered with and without ``text_model.``."""
    aliases: list[Alias] = []
    for path, info in tensors.items():
        m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.weight", path)
        fused = re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_weight", path)
        if fused:
            h = info.shape[0] // 3
            native = path.removesuffix("_weight")
            for i, part in enumerate(("q_proj", "k_proj", "v_proj")):
                name = _LAYER.format(n=fused.group(1)) + "self_attn." + part
                rows = (i * h, (i + 1) * h)
                aliases.append(Alias(name, native, rows, suffix="_weight"))
        elif m and m.group(2) in _OPEN_CLIP:
            name = _LAYER.format(n=m.group(1)) + _OPEN_CLIP[m.group(2)]
            aliases.append(Alias(name, path.removesuffix(".weight")))
        elif path == "ln_final.weight":
            aliases.append(Alias("text_model.final_layer_norm", "ln_final"))
        elif path == "text_projection":
            aliases.append(Alias("text_projection", "text_projection", transposed=True, suffix=""))
    doubled = [
        Alias(a.name.removeprefix("text_model."), a.native, a.weight_rows, a.delta_rows,
              a.transposed, a.suffix)
        for a in aliases
        if a.name.startswith("text_model.")
    ]  # fmt: skip
    return aliases + doubled

"""The UNet's two spellings, LDM (``input_blocks.4.1.``) and diffusers
(``down_blocks.1.attentions.0.``), as a prefix table built from the block structure found in
the checkpoint (spec §2.2). Strings only."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["UnetStructure", "ldm_structure", "diffusers_structure", "other_spelling"]

# Inside a resnet the two spellings differ too (diffusers -> LDM).
_RESNET = (("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("norm2.", "out_layers.0."),
           ("conv2.", "out_layers.3."), ("time_emb_proj.", "emb_layers.1."),
           ("conv_shortcut.", "skip_connection."))  # fmt: skip


@dataclass(frozen=True)
class UnetStructure:
    """``layers``: resnets per down block (L); ``levels``: resolution levels (nb);
    ``up_attention``: which up blocks have attentions (moves their upsampler to slot 2)."""

    layers: int
    levels: int
    up_attention: frozenset[int]

    def prefixes(self) -> list[tuple[str, str, bool]]:
        """(diffusers prefix, LDM prefix, is a resnet) for every block of the UNet."""
        n = self.layers + 1
        rows: list[tuple[str, str, bool]] = [
            ("conv_in.", "input_blocks.0.0.", False),
            ("time_embedding.linear_1.", "time_embed.0.", False),
            ("time_embedding.linear_2.", "time_embed.2.", False),
            ("add_embedding.linear_1.", "label_emb.0.0.", False),
            ("add_embedding.linear_2.", "label_emb.0.2.", False),
            ("mid_block.resnets.0.", "middle_block.0.", True),
            ("mid_block.attentions.0.", "middle_block.1.", False),
            ("mid_block.resnets.1.", "middle_block.2.", True),
            ("conv_norm_out.", "out.0.", False),
            ("conv_out.", "out.2.", False),
        ]
        for i in range(self.levels):
            for j in range(self.layers):
                block = n * i + j + 1
                rows.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{block}.0.", True))
                rows.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{block}.1.", False))
            for j in range(self.layers + 1):
                block = n * i + j
                rows.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{block}.0.", True))
                if i in self.up_attention:  # else slot 1 of the last block is the upsampler
                    rows.append(
                        (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{block}.1.", False)
                    )
            if i < self.levels - 1:
                rows.append((f"down_blocks.{i}.downsamplers.0.conv.",
                             f"input_blocks.{n * (i + 1)}.0.op.", False))  # fmt: skip
                slot = 2 if i in self.up_attention else 1
                rows.append((f"up_blocks.{i}.upsamplers.0.",
                             f"output_blocks.{n * i + self.layers}.{slot}.", False))  # fmt: skip
        return rows


def _indices(paths: Iterable[str], pattern: str) -> set[int]:
    found = set()
    for path in paths:
        m = re.match(pattern, path)
        if m:
            found.add(int(m.group(1)))
    return found


def ldm_structure(paths: list[str]) -> UnetStructure | None:
    """The structure of an LDM UNet from its module paths (without ``model.diffusion_model.``);
    None when the paths are not an LDM UNet."""
    blocks = _indices(paths, r"input_blocks\.(\d+)\.")
    if not blocks:
        return None
    ops = _indices(paths, r"input_blocks\.(\d+)\.0\.op\.")
    n = min(ops) if ops else max(blocks) + 1
    levels = (max(blocks) + n) // n
    attention = {
        i
        for i in range(levels)
        if any(p.startswith(f"output_blocks.{n * i}.1.transformer_blocks.") for p in paths)
    }
    return UnetStructure(n - 1, levels, frozenset(attention))


def diffusers_structure(paths: list[str]) -> UnetStructure | None:
    """The structure of a diffusers UNet from its module paths; None when it is not one."""
    levels = _indices(paths, r"down_blocks\.(\d+)\.")
    if not levels:
        return None
    layers = _indices(paths, r"down_blocks\.0\.resnets\.(\d+)\.")
    attention = _indices(paths, r"up_blocks\.(\d+)\.attentions\.")
    return UnetStructure(len(layers), len(levels), frozenset(attention))


def other_spelling(path: str, rows: list[tuple[str, str, bool]], *, from_ldm: bool) -> str | None:
    """``path`` (a dotted tensor or module path) in the other UNet spelling; None for paths
    outside every block of the table."""
    for diffusers, ldm, resnet in rows:
        source, target = (ldm, diffusers) if from_ldm else (diffusers, ldm)
        if not path.startswith(source):
            continue
        rest = path[len(source) :]
        if resnet:
            for inner_diffusers, inner_ldm in _RESNET:
                inner_from, inner_to = (
                    (inner_ldm, inner_diffusers) if from_ldm else (inner_diffusers, inner_ldm)
                )
                if rest.startswith(inner_from):
                    rest = inner_to + rest[len(inner_from) :]
                    break
        return target + rest
    return None

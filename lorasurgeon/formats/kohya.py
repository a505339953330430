"""kohya sd-scripts and LyCORIS files (spec §1, §4): ``<prefix><mangled path>.<part>`` keys read
into canonical updates. Headers and alpha scalars only."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from ..errors import AdapterError
from ..reader import TensorInfo
from .model import Component, Kind, ModuleUpdate

__all__ = ["KOHYA_PREFIXES", "kohya_prefix", "read_kohya_modules"]

#: Name prefixes of the kohya family and the component each names, longest first.
KOHYA_PREFIXES: tuple[tuple[str, Component], ...] = (
    ("lora_transformer_", Component.UNET),
    ("lora_unet_", Component.UNET),
    ("lycoris_", Component.UNET),
    ("lora_te1_", Component.TE1),
    ("lora_te2_", Component.TE2),
    ("lora_te3_", Component.TE3),
    ("lora_te_", Component.TE),
)

#: Every part a kohya/LyCORIS module may have, mapped to its canonical factor name.
_PARTS: dict[str, str] = {
    "lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid",
    "hada_w1_a": "w1a", "hada_w1_b": "w1b", "hada_w2_a": "w2a", "hada_w2_b": "w2b",
    "hada_t1": "t1", "hada_t2": "t2",
    "lokr_w1": "w1", "lokr_w1_a": "w1a", "lokr_w1_b": "w1b", "lokr_w2": "w2",
    "lokr_w2_a": "w2a", "lokr_w2_b": "w2b", "lokr_t2": "t2",
    "diff": "diff", "diff_b": "diff_b", "w_norm": "w_norm", "b_norm": "b_norm",
}  # fmt: skip
#: Parts of LyCORIS algorithms this version recognizes and refuses.
_REFUSED: dict[str, str] = {
    "a1.weight": "GLoRA", "a2.weight": "GLoRA", "b1.weight": "GLoRA", "b2.weight": "GLoRA",
    "oft_blocks": "OFT", "oft_diag": "OFT", "oft_R": "BOFT", "on_input": "IA3",
    "weight": "IA3", "set_weight": "set_weight",
}  # fmt: skip


def kohya_prefix(name: str) -> tuple[str, Component] | None:
    """The kohya prefix of a module name and its component, or None."""
    for prefix, component in KOHYA_PREFIXES:
        if name.startswith(prefix):
            return prefix, component
    return None


def _kind(path: Path, source: str, parts: Mapping[str, TensorInfo]) -> Kind:
    """The module's algorithm, from the set of its factor parts."""
    names = set(parts)
    if names <= {"diff", "diff_b"}:
        return Kind.FULL
    if names <= {"w_norm", "b_norm"}:
        return Kind.NORM
    if names & {"down", "up", "mid"}:
        if names == {"down", "up"}:
            return Kind.LORA
        if names == {"down", "up", "mid"}:
            return Kind.LOCON_TUCKER
    elif any(k.startswith("hada") for k in _raw_parts(parts)):
        if names == {"w1a", "w1b", "w2a", "w2b"}:
            return Kind.LOHA
        if names == {"w1a", "w1b", "w2a", "w2b", "t1", "t2"}:
            return Kind.LOHA_TUCKER
    elif _lokr_complete(names):
        return Kind.LOKR
    raise AdapterError(
        f"parts {sorted(_raw_parts(parts))} do not form one complete LoRA, LoCon, LoHa, "
        "LoKr, full or norm module",
        path=path,
        tensor=source,
        hint="the file is incomplete or mixes algorithms in one module",
    )


def _raw_parts(parts: Mapping[str, TensorInfo]) -> set[str]:
    return {info.name.split(".", 1)[1] for info in parts.values()}


def _lokr_complete(names: set[str]) -> bool:
    first = names & {"w1", "w1a", "w1b"}
    second = names & {"w2", "w2a", "w2b", "t2"}
    if not names <= {"w1", "w1a", "w1b", "w2", "w2a", "w2b", "t2"}:
        return False
    return first in ({"w1"}, {"w1a", "w1b"}) and second in (
        {"w2"},
        {"w2a", "w2b"},
        {"w2a", "w2b", "t2"},
    )


def _rank(kind: Kind, parts: Mapping[str, TensorInfo]) -> int | None:
    """The rank α is divided by: ``lora_down``'s rows, ``hada_w1_b``'s rows, or for LoKr the
    decomposed half's rank (none when both halves are full)."""
    if kind in (Kind.LORA, Kind.LOCON_TUCKER):
        return parts["down"].shape[0]
    if kind in (Kind.LOHA, Kind.LOHA_TUCKER):
        return parts["w1b"].shape[0]
    if kind is Kind.LOKR:
        for name in ("w1b", "w2b"):
            if name in parts:
                return parts[name].shape[0]
    return None


def _scaling(kind: Kind, alpha: float | None, rank: int | None) -> float:
    """α/r; no alpha means α = r (sd-scripts, ComfyUI), full LoKr and diff/norm have none."""
    if alpha is None or rank is None or kind in (Kind.FULL, Kind.NORM):
        return 1.0
    return alpha / rank


def _split_parts(path: Path, tensors: Mapping[str, TensorInfo]) -> dict[str, dict[str, TensorInfo]]:
    """Group the keys by module name (the part before the first ``.``)."""
    modules: dict[str, dict[str, TensorInfo]] = {}
    for key, info in tensors.items():
        name, _, part = key.partition(".")
        if part in _REFUSED:
            raise AdapterError(
                f"{_REFUSED[part]} modules are not supported",
                path=path,
                tensor=key,
                hint="only LoRA, LoCon, LoHa, LoKr, DoRA, full and norm updates can be read",
            )
        if part not in _PARTS and part not in ("alpha", "dora_scale"):
            raise AdapterError(
                f"unknown part {part!r} of a kohya/LyCORIS module",
                path=path,
                tensor=key,
                hint="this file is not a kohya/LyCORIS LoRA lorasurgeon can read",
            )
        modules.setdefault(name, {})[part] = info
    return modules


def read_kohya_modules(
    path: Path, tensors: Mapping[str, TensorInfo], scalar: Callable[[TensorInfo], float]
) -> tuple[ModuleUpdate, ...]:
    """Every module of a kohya/LyCORIS file as a canonical update, in file order.

    ``scalar`` reads a 0-dim tensor's value (alphas).

    Raises:
        AdapterError: an unknown or unsupported part, an incomplete module, a bad alpha.
    """
    updates = []
    for name, raw in _split_parts(path, tensors).items():
        found = kohya_prefix(name)
        if found is None:
            raise AdapterError(
                "module name has no kohya prefix (lora_unet_, lora_te_, lora_te1_, …)",
                path=path,
                tensor=name,
                hint="the file mixes kohya modules with other names",
            )
        prefix, component = found
        parts = {_PARTS[p]: info for p, info in raw.items() if p in _PARTS}
        kind = _kind(path, name, parts)
        alpha = _alpha(path, raw.get("alpha"), scalar)
        rank = _rank(kind, parts)
        updates.append(
            ModuleUpdate(
                component=component,
                module=name[len(prefix) :],
                source=name,
                kind=kind,
                factors=parts,
                alpha=alpha,
                rank=rank,
                scaling=_scaling(kind, alpha, rank),
                dora_scale=raw.get("dora_scale"),
            )
        )
    return tuple(updates)


def _alpha(
    path: Path, info: TensorInfo | None, scalar: Callable[[TensorInfo], float]
) -> float | None:
    if info is None:
        return None
    if info.shape not in ((), (1,)):
        raise AdapterError(
            f"alpha has shape {info.shape}, expected a scalar",
            path=path,
            tensor=info.name,
            hint="the file is malformed",
        )
    return scalar(info)

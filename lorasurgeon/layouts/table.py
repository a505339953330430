"""The module table of one component: every spelling a LoRA may use for a module, built from
the component's own tensor names (spec §2.5). Strings and shapes only."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError
from ..formats.model import Component, mangle
from ..reader import TensorInfo
from .model import Piece, Target

__all__ = ["Alias", "build_targets"]


@dataclass(frozen=True)
class Alias:
    """Another spelling ``name`` of (rows of) the base module ``native``: ``delta_rows`` of a
    delta for ``name`` land in ``weight_rows`` of ``native``'s tensor (``native`` + ``suffix``)."""

    name: str
    native: str
    weight_rows: tuple[int, int] | None = None
    delta_rows: tuple[int, int] | None = None
    transposed: bool = False
    suffix: str = ".weight"


def _piece(checkpoint: Path, info: TensorInfo, alias: Alias) -> Piece:
    return Piece(
        checkpoint, info.name, info.shape, alias.weight_rows, alias.delta_rows, alias.transposed
    )


def _alias_shape(alias_pieces: list[tuple[Alias, TensorInfo]]) -> tuple[int, ...]:
    alias, info = alias_pieces[0]
    shape = info.shape[::-1] if alias.transposed else info.shape
    if all(a.delta_rows is None and a.weight_rows is None for a, _ in alias_pieces):
        return shape
    rows = 0
    for a, i in alias_pieces:
        if a.delta_rows is not None:
            rows = max(rows, a.delta_rows[1])
        elif a.weight_rows is not None:
            rows = max(rows, a.weight_rows[1] - a.weight_rows[0])
        else:
            rows = max(rows, i.shape[0])
    return (rows, *shape[1:])


def build_targets(
    checkpoint: Path,
    prefix: str,
    tensors: Mapping[str, TensorInfo],
    components: Iterable[Component],
    aliases: Iterable[Alias] = (),
) -> dict[tuple[Component, str], Target]:
    """Targets of one component: every ``<module>.weight`` under ``prefix`` by its own mangled
    path, plus ``aliases``, entered under each of ``components``.

    Raises:
        CheckpointError: two different modules mangle to the same name (never overwritten).
    """
    own: dict[str, Target] = {}
    by_module: dict[str, TensorInfo] = {}
    for name, info in tensors.items():
        if not name.startswith(prefix):
            continue
        path = name[len(prefix) :]
        by_module[path] = info
        if path.endswith(".weight"):
            module = path.removesuffix(".weight")
            bias = tensors.get(prefix + module + ".bias")
            piece = Piece(checkpoint, name, info.shape, bias=bias.name if bias else None)
            _enter(
                own, mangle(module), Target(Component.UNET, module, info.shape, (piece,), module)
            )
    grouped: dict[str, list[tuple[Alias, TensorInfo]]] = {}
    for alias in aliases:
        native = by_module.get(alias.native + alias.suffix)
        if native is not None:
            grouped.setdefault(alias.name, []).append((alias, native))
    for name, found in grouped.items():
        pieces = tuple(_piece(checkpoint, i, a) for a, i in found)
        whole = own.get(mangle(found[0][0].native))
        plain = pieces[0].weight_rows is None and not pieces[0].transposed
        if len(pieces) == 1 and plain and whole is not None:
            pieces = whole.pieces  # a plain rename: the same tensor, with its bias
        target = Target(Component.UNET, found[0][0].native, _alias_shape(found), pieces, name)
        _enter(own, mangle(name), target)
    table: dict[tuple[Component, str], Target] = {}
    for component in components:
        for key, target in own.items():
            table[(component, key)] = dataclasses.replace(target, component=component)
    return table


def _enter(table: dict[str, Target], key: str, target: Target) -> None:
    existing = table.get(key)
    if existing is not None and existing.pieces != target.pieces:
        raise CheckpointError(
            f"modules {existing.module} and {target.module} have the same kohya name",
            path=target.pieces[0].checkpoint,
            tensor=key,
            hint="this checkpoint's names are ambiguous for kohya LoRAs; please report it",
        )
    table[key] = target

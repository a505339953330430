"""What changed between two checkpoints: ``diff`` (per tensor, grouped, and with ``spectrum``
the singular values of each changed weight and the rank it takes to extract).

Streams both checkpoints in chunks on two threads (``diffstats``); writes nothing.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from functools import partial
from typing import Any

from .diffstats import Measure, measure_pairs
from .engine import ProgressCallback
from .errors import OptionError
from .locations import Location, Role, resolve
from .reader import Checkpoint, TensorFiles, TensorInfo, open_checkpoint

__all__ = [
    "DEFAULT_SPECTRUM",
    "ENERGY_LEVELS",
    "DiffReport",
    "Group",
    "Spectrum",
    "Status",
    "TensorDiff",
    "diff",
    "group_of",
    "layer_of",
    "module_kind",
]

#: Singular values ``--spectrum`` computes per changed weight when no K is given.
DEFAULT_SPECTRUM = 64
#: Shares of a change's energy (squared Frobenius norm) whose ranks ``--spectrum`` reports.
ENERGY_LEVELS = (0.5, 0.9, 0.99)


class Status(str, Enum):
    """How a tensor compares between A and B."""

    EQUAL = "equal"  # bit for bit
    CHANGED = "changed"
    ONLY_A = "only_a"
    ONLY_B = "only_b"
    SHAPE = "shape"  # same name, different shape
    DTYPE = "dtype"  # same name and shape, different dtype (values compared)

    def __str__(self) -> str:
        return self.value


class Group(str, Enum):
    """Where a tensor sits in a transformer, from its name."""

    ATTENTION = "attention"
    MLP = "mlp"
    EMBEDDING = "embedding"  # token/position embeddings and the LM head
    NORM = "norm"
    OTHER = "other"

    def __str__(self) -> str:
        return self.value


# Checked in this order: a layer norm inside attention is a norm, an MLP's "fc" is not a head.
_GROUP_PATTERNS = (
    (Group.NORM, re.compile(r"norm|(^|[._])ln(_?\w*)?([._]|$)")),
    (Group.EMBEDDING, re.compile(r"embed|(^|\.)(wte|wpe|lm_head|embed_out|shared)(\.|$)")),
    (Group.ATTENTION, re.compile(r"attn|attention|(^|\.)(q|k|v|o|qkv)_?proj|query|key|value")),
    (Group.MLP, re.compile(r"mlp|ffn|feed_forward|expert|(^|\.)(gate|up|down)_proj|fc\d|c_fc")),
)
_LAYER = re.compile(r"\.(\d+)(\.|$)")
_SUFFIXES = ("weight", "bias")


def group_of(name: str) -> Group:
    """The part of the model a tensor name belongs to (attention, MLP, embedding, norm)."""
    lowered = name.lower()
    for group, pattern in _GROUP_PATTERNS:
        if pattern.search(lowered):
            return group
    return Group.OTHER


def layer_of(name: str) -> int | None:
    """The first number among a tensor name's parts: ``model.layers.3.mlp...`` -> 3."""
    found = _LAYER.search(name)
    return int(found.group(1)) if found else None


def module_kind(name: str) -> str:
    """The module's own name without layer indices: ``...layers.3.mlp.up_proj.weight`` ->
    ``up_proj`` (``up_proj.bias`` for a bias)."""
    parts = [p for p in name.split(".") if not p.isdigit()]
    if len(parts) > 1 and parts[-1] in _SUFFIXES:
        return parts[-2] if parts[-1] == "weight" else f"{parts[-2]}.{parts[-1]}"
    return parts[-1] if parts else name


@dataclass(frozen=True)
class Spectrum:
    """The leading singular values of one change ``B - A`` (m, n).

    ``values``: the top K (randomized SVD with a float64 Rayleigh-Ritz step, so that they are
    singular values of a projection of the change); ``total_energy`` = ‖B - A‖_F², exact;
    ``kept``: Σ values² / total_energy, the exact share of the energy they hold;
    ``ranks``: for each level of ``ENERGY_LEVELS``, the smallest rank holding that share, or
    None when the top K do not ("> K").
    """

    shape: tuple[int, int]
    values: list[float]
    total_energy: float
    kept: float
    ranks: dict[str, int | None]

    def params(self, rank: int) -> int:
        """LoRA parameters of this change at ``rank``: rank · (m + n)."""
        return rank * (self.shape[0] + self.shape[1])


@dataclass(frozen=True)
class TensorDiff:
    """One tensor name's comparison. ``rel_change`` = ‖B - A‖_F / ‖A‖_F (inf when A is zero
    and B is not), ``max_abs`` = max |B - A|, both None unless values were compared."""

    name: str
    status: Status
    group: Group
    layer: int | None
    kind: str
    shape_a: tuple[int, ...] | None
    shape_b: tuple[int, ...] | None
    dtype_a: str | None
    dtype_b: str | None
    rel_change: float | None = None
    max_abs: float | None = None
    change_energy: float | None = None
    spectrum: Spectrum | None = None

    @property
    def numel(self) -> int:
        shape = self.shape_a if self.shape_a is not None else self.shape_b
        return math.prod(shape or ())


@dataclass(frozen=True)
class DiffReport:
    """Everything ``diff`` found. ``to_dict()`` is the ``--json`` object."""

    a: Location
    b: Location
    tensors: list[TensorDiff]
    spectrum: int | None
    seconds: float
    bytes_read: int = 0
    groups: dict[str, dict[str, float]] = field(default_factory=dict)
    rank_costs: dict[str, dict[str, int]] = field(default_factory=dict)

    def count(self, status: Status) -> int:
        return sum(1 for t in self.tensors if t.status is status)

    @property
    def identical(self) -> bool:
        """True when every tensor is equal bit for bit and both have the same names."""
        return all(t.status is Status.EQUAL for t in self.tensors)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["a"], data["b"] = str(self.a), str(self.b)
        data["counts"] = {str(s): self.count(s) for s in Status}
        return data


def _shape2(info: TensorInfo) -> tuple[int, int] | None:
    """The (rows, columns) a change is decomposed as: 2-D weights, convolutions flattened."""
    if len(info.shape) < 2 or info.numel == 0:
        return None
    return info.shape[0], math.prod(info.shape[1:])


def _spectrum(change: Any, shape: tuple[int, int], k: int) -> Spectrum:
    from .lowrank import truncated_svd

    svd = truncated_svd(change.reshape(shape), k)
    ranks: dict[str, int | None] = {}
    for level in ENERGY_LEVELS:
        found = None
        for r in range(svd.max_rank + 1):
            if svd.kept_energy(r) >= level * svd.total_energy:
                found = r
                break
        ranks[f"{level:g}"] = found
    total = svd.total_energy
    kept = svd.kept_energy(svd.max_rank) / total if total else 1.0
    return Spectrum(shape, svd.s.tolist(), total, min(kept, 1.0), ranks)


def _values(pair: tuple[TensorInfo, TensorInfo], m: Measure) -> dict[str, Any]:
    """Status, relative change, max abs change and spectrum of B against A."""
    if m.equal:
        return {"status": Status.EQUAL}
    status = Status.CHANGED if pair[0].dtype == pair[1].dtype else Status.DTYPE
    if m.energy is None or m.base is None:
        return {"status": status}
    energy, base = m.energy, m.base
    result: dict[str, Any] = {
        "status": status,
        "change_energy": energy,
        "rel_change": math.sqrt(energy / base) if base else (0.0 if energy == 0 else math.inf),
        "max_abs": m.max_abs,
    }
    if m.decomposed is not None:
        result["spectrum"] = m.decomposed
    return result


def _decodable(code: str) -> bool:
    from .dtypes import torch_dtype

    try:
        torch_dtype(code)
    except OptionError:
        return False
    return True


def _entry(name: str, a: TensorInfo | None, b: TensorInfo | None, **values: Any) -> TensorDiff:
    return TensorDiff(
        name, values.pop("status"), group_of(name), layer_of(name), module_kind(name),
        a.shape if a else None, b.shape if b else None, a.dtype if a else None,
        b.dtype if b else None, **values,
    )  # fmt: skip


def _pairs(ca: Checkpoint, cb: Checkpoint) -> tuple[list[tuple[TensorInfo, TensorInfo]],
                                                    list[TensorDiff]]:  # fmt: skip
    """Tensors to compare by value, and the entries that headers alone decide."""
    pairs, decided = [], []
    for name, a in ca.tensors.items():
        b = cb.tensors.get(name)
        if b is None:
            decided.append(_entry(name, a, None, status=Status.ONLY_A))
        elif a.shape != b.shape:
            decided.append(_entry(name, a, b, status=Status.SHAPE))
        else:
            pairs.append((a, b))
    decided += [_entry(n, None, b, status=Status.ONLY_B) for n, b in cb.tensors.items()
                if n not in ca.tensors]  # fmt: skip
    return pairs, decided


def _groups(tensors: Sequence[TensorDiff]) -> dict[str, dict[str, float]]:
    """Per group: tensors, changed tensors, and the share of the whole change's energy."""
    total = math.fsum(t.change_energy or 0.0 for t in tensors)
    out: dict[str, dict[str, float]] = {}
    for g in Group:
        members = [t for t in tensors if t.group is g]
        if not members:
            continue
        energy = math.fsum(t.change_energy or 0.0 for t in members)
        out[str(g)] = {
            "tensors": len(members),
            "changed": sum(1 for t in members if t.status is not Status.EQUAL),
            "parameters": sum(t.numel for t in members),
            "share": energy / total if total else 0.0,
        }
    return out


def _rank_costs(tensors: Sequence[TensorDiff]) -> dict[str, dict[str, int]]:
    """Per energy level: LoRA parameters of extracting every changed weight at the rank that
    level needs, and how many weights need more than K (their cost counted at K: a floor)."""
    costs: dict[str, dict[str, int]] = {}
    spectra = [t.spectrum for t in tensors if t.spectrum is not None]
    for level in ENERGY_LEVELS:
        key = f"{level:g}"
        params, over = 0, 0
        for s in spectra:
            rank = s.ranks[key]
            if rank is None:
                over += 1
                rank = len(s.values)
            params += s.params(rank)
        costs[key] = {"params": params, "over_k": over, "modules": len(spectra)}
    return costs


def diff(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    *,
    spectrum: int | None = None,
    device: str = "auto",
    progress: ProgressCallback | None = None,
) -> DiffReport:
    """Compare two checkpoints tensor by tensor, streaming; nothing is written.

    Each tensor name is equal (bit for bit), changed (``rel_change`` = ‖B - A‖_F / ‖A‖_F and
    ``max_abs`` = max |B - A|, within 1e-6 and 2^-24 of their float64 values: see
    ``diffstats.measure_pairs``), only in A or B, or differs in shape or dtype (a dtype change
    is compared by value).
    ``groups`` sums the change's energy by model part. With ``spectrum`` = K, each changed
    tensor of two or more dimensions also gets its top K singular values (randomized SVD)
    with the exact share of the energy they hold and the ranks for 50/90/99% of it;
    ``rank_costs`` adds up the LoRA parameters extracting every change at those ranks takes.

    Args:
        a, b: checkpoints (directory, ``.safetensors`` file or Hub id); B - A is the change.
        spectrum: K, singular values per changed weight; None: no spectra.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``: where the SVDs of ``spectrum`` run
            (values are compared on the CPU, next to the reads; without ``spectrum``, torch
            is not even imported unless ``device`` is not ``auto``, to check it).
        progress: called with (bytes read, bytes to read).

    Raises:
        LocationError, CheckpointError, OptionError (``spectrum`` < 1).
    """
    started = time.monotonic()
    if spectrum is not None and spectrum < 1:
        raise OptionError(f"--spectrum must be at least 1, not {spectrum}")
    loc_a, loc_b = resolve(a, role=Role.CHECKPOINT), resolve(b, role=Role.CHECKPOINT)
    with open_checkpoint(loc_a.path) as ca, open_checkpoint(loc_b.path) as cb:
        pairs, decided = _pairs(ca, cb)
        compared = _compare_all(pairs, spectrum, device, progress)
    order = {
        n: i for i, n in enumerate([*ca.tensors, *(n for n in cb.tensors if n not in ca.tensors)])
    }
    tensors = sorted([*compared, *decided], key=lambda t: order[t.name])
    read = sum(x.nbytes + y.nbytes for x, y in pairs)
    return DiffReport(loc_a, loc_b, tensors, spectrum, time.monotonic() - started, read,
                      _groups(tensors), _rank_costs(tensors) if spectrum else {})  # fmt: skip


def _compare_all(pairs: Sequence[tuple[TensorInfo, TensorInfo]], k: int | None, device: str,
                 progress: ProgressCallback | None) -> list[TensorDiff]:  # fmt: skip
    decompose = None
    if k is not None or device != "auto":  # plain diff compares on the CPU without torch
        from .ops import resolve_device

        dev = resolve_device(device)
        if k is not None:
            decompose = partial(_decompose, k=k, device=dev)
    total, done = sum(x.nbytes + y.nbytes for x, y in pairs), 0
    results = []
    with TensorFiles() as files:
        for i, measured in measure_pairs(pairs, files, keep=_kept if k is not None else _none,
                                         decompose=decompose, stop=threading.Event()):  # fmt: skip
            pair = pairs[i]
            results.append(_entry(pair[0].name, *pair, **_values(pair, measured)))
            done += pair[0].nbytes + pair[1].nbytes
            if progress is not None:
                progress(done, total)
    return results


def _kept(pair: tuple[TensorInfo, TensorInfo]) -> bool:
    """B - A is wanted in float32: a weight whose spectrum ``--spectrum`` computes."""
    return _shape2(pair[0]) is not None and all(_decodable(info.dtype) for info in pair)


def _none(pair: tuple[TensorInfo, TensorInfo]) -> bool:
    return False


def _decompose(pair: tuple[TensorInfo, TensorInfo], change: Any, *, k: int,
               device: Any) -> Spectrum:  # fmt: skip
    """The spectrum of one change (flat float32 numpy), on ``device``: called on a worker."""
    import torch

    shape = _shape2(pair[0])
    assert shape is not None  # _kept
    return _spectrum(torch.from_numpy(change).to(device), shape, k)

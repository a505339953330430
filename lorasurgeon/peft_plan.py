"""Which base tensors PEFT adapters change, and how: the per-tensor ``Change``s of a merge,
worked out from headers alone. No I/O beyond the headers already read, no tensor math."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .adapters import Adapter, LoraModule
from .dtypes import COMPUTE_DTYPES
from .errors import AdapterError, IncompatibleError, OptionError
from .plans import STARTING_KINDS, Change, ChangeKind, TensorPlan
from .reader import Checkpoint, TensorInfo
from .targets import INPUT_EMBEDDING_NAMES, OUTPUT_EMBEDDING_NAMES, Layout, LayoutRules

__all__ = ["BaseTensors", "output_dtype", "plan_tensors"]


@dataclass
class BaseTensors:
    """The base checkpoint as planning sees it: its tensors, model type and stated layouts."""

    checkpoint: Checkpoint
    model_type: str | None
    layouts: LayoutRules = field(default_factory=LayoutRules)
    tensors: Mapping[str, TensorInfo] = field(init=False)

    def __post_init__(self) -> None:
        self.tensors = self.checkpoint.tensors

    def find(self, name: str, *, adapter: Adapter, tensor: str) -> TensorInfo:
        """The base tensor ``name``; a tied output embedding resolves to the input embedding."""
        info = self.tensors.get(name)
        if info is not None:
            return info
        module = name.rsplit(".", 1)[0]
        if module.rsplit(".", 1)[-1] in OUTPUT_EMBEDDING_NAMES and name.endswith(".weight"):
            for candidate in self.tensors:
                if candidate.endswith(INPUT_EMBEDDING_NAMES):
                    return self.tensors[candidate]  # tied: one tensor serves both
        raise IncompatibleError(
            f"matches no base tensor (looked for {name})",
            path=adapter.checkpoint.path,
            tensor=tensor,
            hint="was this adapter trained on a different base model?",
        )


def _lora_change(
    index: int, adapter: Adapter, lm: LoraModule, base: BaseTensors, scaling: float
) -> list[tuple[str, Change]]:
    """The changes ``lm`` makes: one, or two for nn.MultiheadAttention's out_proj (PEFT adds
    that delta twice: once itself, once through the wrapped out_proj's own merge)."""
    if lm.parameters:
        return [_parameter_change(index, adapter, lm, base, scaling)]
    where = adapter.checkpoint.path
    name = lm.module + ".weight"
    if name not in base.tensors and lm.module + ".in_proj_weight" in base.tensors:
        name = lm.module + ".in_proj_weight"  # nn.MultiheadAttention: q, k, v stacked
    w = base.find(name, adapter=adapter, tensor=lm.lora_a.name)
    a, b = lm.a_shape, lm.b_shape
    expected: list[tuple[int, ...]]
    if lm.embedding:
        expected, transposed = [(a[1], b[0])], True
    elif len(a) > 2:
        if len(w.shape) != len(a) or w.shape[1] != a[1]:
            raise IncompatibleError(
                f"conv LoRA {a} does not fit base {w.shape} (grouped convolutions cannot be "
                "merged)",
                path=where,
                tensor=lm.lora_a.name,
            )
        expected, transposed = [(b[0], *a[1:])], False
    else:
        expected, transposed = _matrix_shapes(adapter, lm, base, w)
    if w.shape not in expected or any(d != 1 for d in b[2:]):
        raise IncompatibleError(
            f"delta shape {expected[0]} does not fit base tensor {w.name} {w.shape}",
            path=where,
            tensor=lm.lora_b.name,
            hint="was this adapter trained on a different base model?",
        )
    if lm.diag is not None and (transposed or len(w.shape) != 2):
        raise AdapterError("KaSA on a layer other than nn.Linear", path=where, tensor=lm.module)
    if lm.magnitude is not None:
        units = w.shape[1] if transposed else w.shape[0]
        if lm.magnitude.numel != units:
            raise AdapterError(
                f"DoRA magnitude has {lm.magnitude.numel} values for {units} output units",
                path=where,
                tensor=lm.magnitude.name,
            )
    kind = ChangeKind.DORA if lm.magnitude is not None else ChangeKind.LORA
    change = Change(index, kind, lm.module, lora=lm, transposed=transposed, scaling=scaling)
    changes = [(w.name, change)] * (2 if lm.owner is not None else 1)
    if lm.diag is not None:
        changes.insert(0, (w.name, Change(index, ChangeKind.TRUNCATE, lm.module, lora=lm)))
    return changes


# transformers' MoE experts whose stacks are stored (E, in, out) (``is_transposed``); the
# others (Mixtral, Qwen-MoE, ...) store (E, out, in).
_TRANSPOSED_EXPERTS = frozenset({"gpt_oss", "aria", "aria_text", "openai_privacy_filter"})


def _parameter_change(
    index: int, adapter: Adapter, lm: LoraModule, base: BaseTensors, scaling: float
) -> tuple[str, Change]:
    """LoRA on a raw parameter ``module.<p>`` (target_parameters): a 2-D parameter takes
    ``scaling · B @ A`` as it is stored; a 3-D stack of E experts one delta per expert."""
    where = adapter.checkpoint.path
    a, b = lm.a_shape, lm.b_shape
    experts = a[0] // lm.rank
    fits: list[tuple[TensorInfo, bool]] = []
    for param in lm.parameters:
        info = base.tensors.get(f"{lm.module}.{param}")
        if info is None:
            continue
        if experts == 1 and info.shape == (b[0], a[1]):
            fits.append((info, False))
        elif len(info.shape) == 3 and info.shape[0] == experts:
            fits += [(info, False)] if info.shape[1:] == (b[0], a[1]) else []
            fits += [(info, True)] if info.shape[1:] == (a[1], b[0]) else []
    names = ", ".join(f"{lm.module}.{p}" for p in lm.parameters)
    if not fits:
        raise IncompatibleError(
            f"LoRA of shape A {a}, B {b} on {experts} expert(s) fits no base tensor among {names}",
            path=where,
            tensor=lm.lora_a.name,
            hint="was this adapter trained on a different base model? (fused expert stacks "
            "that the checkpoint stores per expert are not supported yet)",
        )
    if len({info.name for info, _ in fits}) > 1:
        raise AdapterError(
            f"these factors fit several targeted parameters ({names}); which one they belong "
            "to depends on the module's parameter order, which the checkpoint does not record",
            path=where, tensor=lm.lora_a.name,
        )  # fmt: skip
    if len(fits) > 1:  # a square expert stack: only the architecture knows its layout
        if base.model_type is None:
            raise IncompatibleError(
                "the expert stack is square, so whether it is stored (E, in, out) or "
                "(E, out, in) cannot be told from shapes", path=where, tensor=lm.lora_a.name,
                hint="give the base a config.json with its model_type",
            )  # fmt: skip
        fits = [f for f in fits if f[1] == (base.model_type in _TRANSPOSED_EXPERTS)]
    info, transposed = fits[0]
    kind = ChangeKind.EXPERTS if len(info.shape) == 3 else ChangeKind.LORA
    return info.name, Change(
        index, kind, lm.module, lora=lm, transposed=transposed, scaling=scaling
    )


def _matrix_shapes(
    adapter: Adapter, lm: LoraModule, base: BaseTensors, w: TensorInfo
) -> tuple[list[tuple[int, ...]], bool]:
    """The base shapes a 2-D LoRA fits, and whether the delta is transposed: nn.Linear stores
    (out, in), GPT-2 ``Conv1D`` (in, out) (fan_in_fan_out). Without a known layout only a
    non-square shape tells them apart; a square one is refused, never guessed."""
    a, b = lm.a_shape, lm.b_shape
    linear, conv1d = (b[0], a[1]), (a[1], b[0])
    layout = base.layouts.layout(lm.module)
    if layout is Layout.CONV1D:
        return [conv1d], True
    if layout is Layout.LINEAR or w.shape != conv1d:
        return [linear], False
    if w.shape == linear:  # square, and nothing says which
        raise IncompatibleError(
            f"base tensor {w.name} is square {w.shape}, so whether it is an nn.Linear (stored "
            "(out, in)) or a GPT-2 Conv1D (stored (in, out), transposed) cannot be told from "
            "shapes, and the base has no config.json with a model_type",
            path=adapter.checkpoint.path, tensor=lm.lora_b.name,
            hint="state it with --fan-in-fan-out MODULES|all|none (the Conv1D modules), or "
            "give the base as a directory holding its config.json",
        )  # fmt: skip
    return [conv1d], True


def _bias_change(
    index: int, adapter: Adapter, lm: LoraModule, base: BaseTensors, scaling: float
) -> tuple[str, Change]:
    assert lm.lora_b_bias is not None
    bias = base.tensors.get(lm.module + ".bias")
    if bias is None or bias.shape != lm.lora_b_bias.shape:
        raise IncompatibleError(
            "lora_bias needs a base bias of the same shape, and the base has none",
            path=adapter.checkpoint.path,
            tensor=lm.lora_b_bias.name,
        )
    change = Change(index, ChangeKind.LORA_BIAS, lm.module, source=lm.lora_b_bias, scaling=scaling)
    return bias.name, change


def _replacements(
    index: int, adapter: Adapter, base: BaseTensors, unmerge: bool
) -> list[tuple[str, Change]]:
    found = []
    for name, info in adapter.replacements.items():
        copy = name in adapter.embedding_copies
        if name not in base.tensors and not copy:
            module = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
            hint = (
                "saving a tied output embedding whole unties it, which lorasurgeon does not do yet"
                if module in OUTPUT_EMBEDDING_NAMES
                else "was this adapter trained on a different base model?"
            )
            raise IncompatibleError(
                f"saved whole, but the base has no tensor {name}",
                path=adapter.checkpoint.path,
                tensor=info.name,
                hint=hint,
            )
        target = base.find(name, adapter=adapter, tensor=info.name)
        if target.shape != info.shape:
            raise IncompatibleError(
                f"saved whole with shape {info.shape}, base {target.name} is {target.shape}",
                path=adapter.checkpoint.path,
                tensor=info.name,
                hint="a resized vocabulary? resize the base first",
            )
        if unmerge:
            if copy:
                continue  # a copy of the base weight: nothing to undo
            raise OptionError(
                "was saved whole by the adapter, so the base value is lost; cannot unmerge",
                path=adapter.checkpoint.path,
                tensor=info.name,
            )
        kind = ChangeKind.COPY if copy else ChangeKind.REPLACE
        found.append((target.name, Change(index, kind, name, source=info)))
    return found


def _token_changes(
    index: int, adapter: Adapter, base: BaseTensors, unmerge: bool
) -> list[tuple[str, Change]]:
    found = []
    for module, (indices, info) in adapter.token_rows.items():
        if unmerge:
            raise OptionError(
                "trainable token rows replace base rows; the originals are lost; cannot unmerge",
                path=adapter.checkpoint.path,
                tensor=info.name,
            )
        w = base.find(module + ".weight", adapter=adapter, tensor=info.name)
        if (
            len(w.shape) != 2
            or info.shape != (len(indices), w.shape[1])
            or max(indices) >= w.shape[0]
        ):
            raise IncompatibleError(
                f"{len(indices)} token rows {info.shape} do not fit {w.name} {w.shape}",
                path=adapter.checkpoint.path,
                tensor=info.name,
            )
        found.append((w.name, Change(index, ChangeKind.ROWS, module, source=info, indices=indices)))
    return found


def _adapter_changes(
    index: int, adapter: Adapter, weight: float, base: BaseTensors, unmerge: bool
) -> list[tuple[str, Change]]:
    sign = -1.0 if unmerge else 1.0
    changes = _replacements(index, adapter, base, unmerge)
    for lm in adapter.modules.values():
        if unmerge and lm.magnitude is not None:
            raise OptionError(
                "DoRA merges cannot be undone offline (the original weight norms are lost)",
                path=adapter.checkpoint.path,
                tensor=lm.module,
            )
        if unmerge and lm.diag is not None:
            raise OptionError(
                "KaSA truncates the base weight by SVD before merging; the dropped singular "
                "components are lost, so this merge cannot be undone",
                path=adapter.checkpoint.path, tensor=lm.module,
            )  # fmt: skip
        scaling = lm.scaling * weight * sign
        changes += _lora_change(index, adapter, lm, base, scaling)
        if lm.lora_b_bias is not None:
            changes.append(_bias_change(index, adapter, lm, base, scaling))
    changes += _token_changes(index, adapter, base, unmerge)
    return changes


def _order(changes: list[Change], where: Path, name: str) -> tuple[Change, ...]:
    """Order one tensor's changes: the replacement it starts from, deltas, then token rows."""
    starts = [c for c in changes if c.kind in STARTING_KINDS]
    if sum(c.kind is ChangeKind.REPLACE for c in starts) > 1:
        raise AdapterError(
            "saved whole by more than one adapter; merge them one at a time",
            path=where,
            tensor=name,
        )
    starts.sort(
        key=lambda c: c.kind is not ChangeKind.REPLACE
    )  # a trained tensor wins over a base copy
    rows = [c for c in changes if c.kind is ChangeKind.ROWS]
    seen: set[int] = set()
    for c in rows:
        if seen & set(c.indices):
            raise AdapterError("two adapters replace the same token rows", path=where, tensor=name)
        seen |= set(c.indices)
    deltas = [c for c in changes if c.kind not in STARTING_KINDS and c.kind is not ChangeKind.ROWS]
    return tuple(starts[:1] + deltas + rows)


def output_dtype(info: TensorInfo, dtype: str | None, changed: bool, where: Path) -> str:
    if changed and info.dtype not in COMPUTE_DTYPES:
        raise IncompatibleError(
            f"cannot merge into a {info.dtype} tensor (quantized base?)",
            path=where,
            tensor=info.name,
        )
    return dtype if dtype is not None and info.dtype in COMPUTE_DTYPES else info.dtype


def plan_tensors(
    base: BaseTensors,
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    unmerge: bool,
    dtype: str | None,
) -> tuple[TensorPlan, ...]:
    kasa = [a for a in adapters if a.config.kasa]
    if kasa and len(adapters) > 1:
        raise AdapterError(
            "is a KaSA adapter, which truncates the base weights it targets; PEFT refuses to "
            "mix it with other adapters", path=kasa[0].config.path, hint="merge it alone",
        )  # fmt: skip
    per_tensor: dict[str, list[Change]] = {}
    order = range(len(adapters) - 1, -1, -1) if unmerge else range(len(adapters))
    for i in order:
        for name, change in _adapter_changes(i, adapters[i], weights[i], base, unmerge):
            per_tensor.setdefault(name, []).append(change)
    plans = []
    where = base.checkpoint.path
    for info in base.tensors.values():
        changes = _order(per_tensor.get(info.name, []), where, info.name)
        has_deltas = any(c.kind not in STARTING_KINDS for c in changes)
        out_dtype = output_dtype(info, dtype, has_deltas, where)
        plans.append(TensorPlan(info.name, info, out_dtype, changes))
    return tuple(plans)

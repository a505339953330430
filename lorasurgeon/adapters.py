"""PEFT LoRA adapters read from disk: config, per-module factors, whole-tensor replacements.

Follows PEFT 0.21.2's file layout (shared/spec/peft-lora.md, sections 1-3): keys
``base_model.model.<module>.lora_A.weight`` etc., scaling ``alpha / r`` (``alpha / sqrt(r)``
with rslora) with rank_pattern/alpha_pattern overrides. Reads headers only; no tensor math.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .engine import Copy, Output
from .errors import AdapterError, LocationError
from .reader import Checkpoint, TensorInfo, open_checkpoint
from .targets import TargetRules, pattern_value
from .writer import OutputLayout, OutputShard, OutputTensor

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "KEY_PREFIX",
    "Adapter",
    "AdapterConfig",
    "LoraModule",
    "ModuleReport",
    "adapter_output",
    "error_summary",
    "lora_keys",
    "open_adapter",
    "rank_config",
    "report_dict",
]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
#: Every key of a PEFT adapter file starts with this (PEFT's wrapper prefix).
KEY_PREFIX = "base_model.model."
# Segments inside a modules_to_save wrapper (ModulesToSaveWrapper's copy and original module).
_WRAPPER_SEGMENTS = frozenset({"modules_to_save", "original_module"})
_LORA_PARTS = {
    "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
    "lora_diag",  # KaSA: the learned singular values between A and B
}  # fmt: skip
# Training-only state of VeLoRA and MonteCLoRA: PEFT's merge reads only lora_A and lora_B.
_TRAINING_PARTS = {"lora_velora_embed", "lora_monteclora_sampler"}
# init_lora_weights values whose adapters only make sense on a base PEFT modified at load time.
_BASE_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# Config fields of the LoRA variants merge handles and combine/resize refuse.
_VARIANT_FIELDS = {
    "kasa_config": "KaSA", "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA",
    "use_bdlora": "BD-LoRA", "target_parameters": "target_parameters",
}  # fmt: skip
# Config fields of LoRA variants lorasurgeon cannot merge (PEFT refuses some of them too).
_UNSUPPORTED_FIELDS = (
    "layer_replication", "alora_invocation_tokens", "arrow_config", "use_qalora",
    "megatron_config",
)  # fmt: skip


def _tuple_or_str(value: Any) -> tuple[Any, ...] | str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set)):
        return tuple(value)
    return (value,)


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of ``adapter_config.json`` that change the math or the key set."""

    path: Path
    raw: Mapping[str, Any]
    r: int
    lora_alpha: float
    use_rslora: bool
    use_dora: bool
    lora_bias: bool
    rank_pattern: Mapping[str, float]
    alpha_pattern: Mapping[str, float]
    trainable_token_indices: Any
    rules: TargetRules
    target_parameters: tuple[str, ...] = ()
    kasa: bool = False
    blocks: BlockDiagonal | None = None

    @classmethod
    def read(cls, path: Path, *, model_type: str | None = None) -> AdapterConfig:
        """Read and check ``adapter_config.json``.

        Raises:
            AdapterError: not JSON, not a LoRA adapter, or a variant lorasurgeon cannot merge.
        """
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise AdapterError(f"cannot read adapter config: {e}", path=path) from e
        if not isinstance(raw, dict):
            raise AdapterError("adapter config is not a JSON object", path=path)
        _check_supported(path, raw)
        try:
            r = int(raw.get("r", 8))
            alpha = float(raw.get("lora_alpha", 8))
            rank_pattern = {str(k): float(v) for k, v in (raw.get("rank_pattern") or {}).items()}
            alpha_pattern = {str(k): float(v) for k, v in (raw.get("alpha_pattern") or {}).items()}
        except (TypeError, ValueError, AttributeError) as e:
            raise AdapterError(f"invalid r, lora_alpha or pattern: {e}", path=path) from e
        if r <= 0:
            raise AdapterError(f"r must be positive, got {r}", path=path)
        task = raw.get("task_type")
        modules_to_save = tuple(raw.get("modules_to_save") or ())
        if task in ("SEQ_CLS", "TOKEN_CLS"):
            modules_to_save += ("classifier", "score")
        elif task == "QUESTION_ANS":
            modules_to_save += ("qa_outputs",)
        layers = raw.get("layers_to_transform")
        rules = TargetRules(
            target_modules=_tuple_or_str(raw.get("target_modules")),
            exclude_modules=_tuple_or_str(raw.get("exclude_modules")),
            layers_to_transform=(layers,) if isinstance(layers, int) else _tuple_list(layers),
            layers_pattern=_tuple_list(raw.get("layers_pattern")),
            modules_to_save=modules_to_save,
            model_type=model_type,
            seq_cls=task == "SEQ_CLS",
        )
        return cls(
            path, raw, r, alpha, bool(raw.get("use_rslora")), bool(raw.get("use_dora")),
            bool(raw.get("lora_bias")), rank_pattern, alpha_pattern,
            raw.get("trainable_token_indices"), rules, _target_parameters(path, raw),
            raw.get("kasa_config") is not None, BlockDiagonal.read(path, raw.get("use_bdlora")),
        )  # fmt: skip

    def parameters_of(self, module: str) -> tuple[str, ...]:
        """The names of ``module``'s parameters that target_parameters selects: an entry
        ``[prefix.]param`` matches ``module.param`` when it equals it or is a dotted suffix."""
        found = []
        for entry in self.target_parameters:
            prefix, _, param = entry.rpartition(".")
            if not prefix or module == prefix or module.endswith("." + prefix):
                found.append(param)
        return tuple(dict.fromkeys(found))

    def rank_of(self, module: str) -> int:
        value = pattern_value(self.rank_pattern, module)
        return int(value) if value is not None else self.r

    def alpha_of(self, module: str) -> float:
        value = pattern_value(self.alpha_pattern, module)
        return value if value is not None else self.lora_alpha

    def scaling_of(self, module: str) -> float:
        """alpha / r for this module (alpha / sqrt(r) with use_rslora), patterns applied."""
        rank = self.rank_of(module)
        alpha = self.alpha_of(module)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def token_indices(self, module: str) -> tuple[int, ...] | None:
        """The trainable token rows of an embedding module, from trainable_token_indices."""
        spec = self.trainable_token_indices
        if isinstance(spec, list):
            return tuple(int(i) for i in spec)
        if isinstance(spec, dict):
            for key, rows in spec.items():
                if module == key or module.endswith("." + key):
                    return tuple(int(i) for i in rows)
        return None


@dataclass(frozen=True)
class BlockDiagonal:
    """BD-LoRA (``use_bdlora``): modules whose name contains a ``bd_a`` pattern store lora_A
    as ``nblocks`` diagonal blocks (r, in / nblocks), a ``bd_b`` pattern lora_B (out, r / nblocks);
    PEFT's ``BlockDiagonalLinear.weight_as_blockdiagonal_matrix`` rebuilds the full factor."""

    nblocks: int
    bd_a: tuple[str, ...]
    bd_b: tuple[str, ...]

    @classmethod
    def read(cls, path: Path, value: Any) -> BlockDiagonal | None:
        if not value:
            return None
        try:
            nblocks = int(value.get("nblocks", 1))
            bd_a = tuple(str(p) for p in value.get("target_modules_bd_a") or ())
            bd_b = tuple(str(p) for p in value.get("target_modules_bd_b") or ())
        except (AttributeError, TypeError, ValueError) as e:
            raise AdapterError(f"invalid use_bdlora: {e}", path=path) from e
        if nblocks <= 0:
            raise AdapterError(f"use_bdlora.nblocks must be positive, got {nblocks}", path=path)
        return cls(nblocks, bd_a, bd_b)

    def of(self, module: str) -> tuple[int, int]:
        """(blocks of lora_A, blocks of lora_B) for ``module``: PEFT tests the patterns as
        substrings of the full module name."""
        in_a = any(p in module for p in self.bd_a)
        in_b = any(p in module for p in self.bd_b)
        if in_a and in_b:
            raise AdapterError(f"{module} matches both target_modules_bd_a and _bd_b")
        return (self.nblocks if in_a else 1), (self.nblocks if in_b else 1)


def _target_parameters(path: Path, raw: Mapping[str, Any]) -> tuple[str, ...]:
    value = raw.get("target_parameters")
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise AdapterError("target_parameters must be a list of parameter names", path=path)
    return tuple(str(v) for v in value)


def _tuple_list(value: Any) -> tuple[Any, ...] | None:
    if value is None or value == [] or value == "":
        return None
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def _check_supported(path: Path, raw: Mapping[str, Any]) -> None:
    peft_type = raw.get("peft_type")
    if peft_type is None:
        raise AdapterError(
            "adapter config has no peft_type", path=path, hint="is this a PEFT adapter?"
        )
    if str(peft_type).upper() != "LORA":
        raise AdapterError(
            f"peft_type {peft_type} is not supported; only LoRA adapters can be merged", path=path
        )
    for key in _UNSUPPORTED_FIELDS:
        if raw.get(key):
            raise AdapterError(
                f"{key} is set; lorasurgeon cannot merge this LoRA variant offline", path=path
            )
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_MUTATING_INITS):
        raise AdapterError(
            f"init_lora_weights={init!r}: this adapter belongs to a base that PEFT modifies "
            "at load time, so merging it into the plain base would be wrong",
            path=path,
            hint="merge it with PEFT itself",
        )


@dataclass(frozen=True)
class LoraModule:
    """One module's LoRA tensors as stored. ``embedding`` modules use lora_embedding_A/B:
    A (r, vocab), B (dim, r); the others A (r, in[, k...]), B (out, r[, 1...])."""

    module: str
    lora_a: TensorInfo
    lora_b: TensorInfo
    embedding: bool
    rank: int
    alpha: float
    scaling: float
    lora_b_bias: TensorInfo | None = None
    magnitude: TensorInfo | None = None
    diag: TensorInfo | None = None
    blocks_a: int = 1
    blocks_b: int = 1
    parameters: tuple[str, ...] = ()
    depth: int = 0
    owner: str | None = None

    # The variants above, each as PEFT stores it:
    #  diag      KaSA: delta = scaling · (B · diag) @ A, the base truncated by SVD first.
    #  blocks_*  BD-LoRA: A (r, in / n) or B (out, r / n) holds n diagonal blocks.
    #  parameters / depth   target_parameters: LoRA on the raw parameter ``module.<p>``, p one
    #            of ``parameters``; ``depth`` counts the ``.base_layer`` of nested wrappers.
    #  owner     nn.MultiheadAttention: these are the out_proj factors of module ``owner``.

    @property
    def variant(self) -> str | None:
        """The name of the LoRA variant these tensors belong to, None for plain LoRA."""
        if self.diag is not None:
            return "KaSA"
        if self.blocks_a > 1 or self.blocks_b > 1:
            return "BD-LoRA"
        if self.parameters:
            return "target_parameters"
        if self.owner is not None:
            return "nn.MultiheadAttention"
        return None

    @property
    def a_shape(self) -> tuple[int, ...]:
        """lora_A's shape with its diagonal blocks laid out (BD-LoRA), else as stored."""
        a = self.lora_a.shape
        return (a[0], a[1] * self.blocks_a, *a[2:]) if len(a) >= 2 else a

    @property
    def b_shape(self) -> tuple[int, ...]:
        b = self.lora_b.shape
        return (b[0], b[1] * self.blocks_b, *b[2:]) if len(b) >= 2 else b


@dataclass
class Adapter:
    """An opened adapter: config, tensor file, its LoRA modules and whole-tensor entries.

    ``replacements`` maps a module-relative tensor name (``.base_layer`` removed, e.g.
    ``score.weight``) to the stored tensor that replaces the base's. ``token_rows`` maps an
    embedding module to (row indices, stored rows). ``ignored`` lists modules with LoRA tensors
    that the config does not select (PEFT ignores them silently); ``unloaded`` lists stored
    tensors that name no parameter once PEFT wraps the model (``<m>.weight`` of a LoRA module,
    whose parameter is ``<m>.base_layer.weight``), which PEFT's loader ignores too. The copies
    that ``bias="all"`` saves from inside a modules_to_save wrapper are dropped, as PEFT
    does. Close it after use.
    """

    path: Path
    config: AdapterConfig
    checkpoint: Checkpoint
    modules: dict[str, LoraModule] = field(default_factory=dict)
    replacements: dict[str, TensorInfo] = field(default_factory=dict)
    embedding_copies: frozenset[str] = frozenset()
    token_rows: dict[str, tuple[tuple[int, ...], TensorInfo]] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)

    def __enter__(self) -> Adapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.checkpoint.close()

    def require_plain_lora(self, command: str) -> None:
        """Refuse DoRA and lora_bias adapters, which ``command`` (combine, resize) cannot
        change: DoRA magnitudes are trained for their own full delta and base weights.

        Raises:
            AdapterError: naming the adapter config.
        """
        config = self.config
        if config.use_dora or any(m.magnitude is not None for m in self.modules.values()):
            raise AdapterError(
                f"is a DoRA adapter; its trained magnitudes depend on its own delta and the "
                f"base weights, so {command} cannot keep them", path=config.path,
            )  # fmt: skip
        if config.lora_bias or any(m.lora_b_bias is not None for m in self.modules.values()):
            raise AdapterError(f"has lora_B biases (lora_bias), which {command} does not support",
                               path=config.path)  # fmt: skip
        variant = next((m.variant for m in self.modules.values() if m.variant), None)
        for key, name in _VARIANT_FIELDS.items():
            if variant is None and config.raw.get(key):
                variant = name
        if variant is not None:
            raise AdapterError(
                f"is a {variant} adapter; {command} writes plain LoRA factors, which cannot "
                "express it", path=config.path, hint="merge it into its base instead",
            )  # fmt: skip


def _split_lora_key(path: Path, name: str, rest: str) -> tuple[str, str] | None:
    """Split ``<path>.lora_A[.<adapter>].weight`` into (module path, part); None if not LoRA.

    The module path keeps PEFT's ``.base_layer`` segments (nested target_parameters wrappers,
    nn.MultiheadAttention's out_proj); part is ``""`` for training-only variant state."""
    segments = rest.split(".")
    at = next((i for i, s in enumerate(segments) if s in _LORA_PARTS | _TRAINING_PARTS), None)
    if at is None:
        return None
    module, attr = ".".join(segments[:at]), segments[at]
    if attr in _TRAINING_PARTS:
        return module, ""
    tail = segments[at + 1 :]
    suffix = tail[-1] if tail and tail[-1] in ("weight", "bias") else None
    named = tail[:-1] if suffix else tail
    if len(named) > 1 or not module or module.split(".")[0] == "base_layer":
        raise AdapterError("cannot parse this LoRA tensor name", path=path, tensor=name)
    return module, attr + (f".{suffix}" if suffix == "bias" else "")


def _unwrap(path: str) -> tuple[str, int, str | None]:
    """A module path as stored -> (module, nesting depth, owner). ``M.base_layer.base_layer``
    is M with depth 2 (nested target_parameters wrappers); ``M.base_layer.out_proj`` is the
    out_proj that PEFT's nn.MultiheadAttention wrapper M holds (owner M)."""
    segments = path.split(".")
    depth = 0
    while segments and segments[-1] == "base_layer":
        segments.pop()
        depth += 1
    owner = None
    if "base_layer" in segments:
        owner = ".".join(segments[: segments.index("base_layer")])
        segments = [s for s in segments if s != "base_layer"]
    return ".".join(segments), depth, owner


def _collect(
    path: Path, checkpoint: Checkpoint
) -> tuple[dict[str, dict[str, TensorInfo]], dict[str, TensorInfo]]:
    lora: dict[str, dict[str, TensorInfo]] = {}
    plain: dict[str, TensorInfo] = {}
    for info in checkpoint:
        if not info.name.startswith(KEY_PREFIX):
            raise AdapterError(
                f"tensor name lacks the {KEY_PREFIX!r} prefix PEFT writes; PEFT would ignore it",
                path=path,
                tensor=info.name,
                hint="save the adapter with PEFT's save_pretrained",
            )
        rest = info.name[len(KEY_PREFIX) :]
        split = _split_lora_key(path, info.name, rest)
        if split is None:
            plain[rest] = info
        elif split[1]:  # "": VeLoRA / MonteCLoRA training state, not part of the merge
            lora.setdefault(split[0], {})[split[1]] = info
    return lora, plain


def _lora_module(config: AdapterConfig, path: str, t: dict[str, TensorInfo]) -> LoraModule:
    module, depth, owner = _unwrap(path)
    embedding = "lora_embedding_A" in t or "lora_embedding_B" in t
    a = t.get("lora_embedding_A" if embedding else "lora_A")
    b = t.get("lora_embedding_B" if embedding else "lora_B")
    where = config.path.parent / ADAPTER_WEIGHTS_NAME
    if a is None or b is None:
        raise AdapterError(
            "has only one of the two LoRA factors", path=where, tensor=path,
            hint="the adapter file is incomplete",
        )  # fmt: skip
    parameters = () if owner is not None else config.parameters_of(module)
    if depth and not parameters:
        raise AdapterError(
            "nested LoRA factors, but target_parameters names no parameter of this module",
            path=where, tensor=a.name,
        )  # fmt: skip
    named = owner if owner is not None else (f"{module}.{parameters[0]}" if parameters else module)
    blocks_a, blocks_b = config.blocks.of(module) if config.blocks else (1, 1)
    lm = LoraModule(
        module, a, b, embedding, a.shape[0] if a.shape else 0, config.alpha_of(named),
        config.scaling_of(named), t.get("lora_B.bias"), t.get("lora_magnitude_vector"),
        t.get("lora_diag"), blocks_a, blocks_b, parameters, depth, owner,
    )  # fmt: skip
    _check_rank(config, lm, named, where)
    return dataclasses.replace(lm, rank=lm.rank // max(1, _experts(config, lm, named)))


def _experts(config: AdapterConfig, lm: LoraModule, named: str) -> int:
    """Experts of a target_parameters stack (A holds r rows per expert); 1 otherwise."""
    rank = config.rank_of(named)
    return lm.rank // rank if lm.parameters and lm.rank % rank == 0 else 1


def _check_rank(config: AdapterConfig, lm: LoraModule, named: str, where: Path) -> None:
    a, b = lm.a_shape, lm.b_shape
    if len(a) < 2 or len(b) < 2 or b[1] != lm.rank:
        conv = len(a) > 2 and len(b) > 2 and b[1] > 0 and lm.rank % b[1] == 0
        groups = lm.rank // b[1] if conv else 0
        if groups > 1:
            raise AdapterError(
                f"LoRA on a grouped convolution (lora_B {b} holds rank {lm.rank} in {groups} "
                "groups); PEFT cannot merge LoRA into grouped convolutions either",
                path=where, tensor=lm.module, hint="keep this adapter unmerged",
            )  # fmt: skip
        raise AdapterError(
            f"lora_A {a} and lora_B {b} do not share a rank", path=where, tensor=lm.module
        )
    if lm.diag is not None and lm.diag.shape != (lm.rank,):
        raise AdapterError(f"lora_diag {lm.diag.shape} does not fit rank {lm.rank}",
                           path=where, tensor=lm.diag.name)  # fmt: skip
    if config.kasa and lm.diag is None:
        raise AdapterError("kasa_config is set but the module has no lora_diag",
                           path=where, tensor=lm.module)  # fmt: skip
    expected = config.rank_of(named)
    experts = _experts(config, lm, named)
    if expected * experts != lm.rank:
        raise AdapterError(
            f"rank {lm.rank} in the file but {expected} in the config",
            path=where,
            tensor=lm.module,
            hint="PEFT would refuse to load it; fix r/rank_pattern in adapter_config.json",
        )


def open_adapter(
    path: str | os.PathLike[str], *, model_type: str | None = None, file_targets: bool = False
) -> Adapter:
    """Open a PEFT LoRA adapter directory by header only.

    ``model_type`` (the base's) resolves a null target_modules to PEFT's default; without it,
    ``file_targets`` selects every LoRA module in the file (PEFT wrote them with its default,
    so they are the selected ones), else a null target_modules is an error. LoRA modules the
    config does not select are listed in ``ignored``, as PEFT ignores them.

    Raises:
        LocationError: no adapter at ``path``.
        AdapterError: bad config, unsupported variant, malformed or inconsistent tensors.
        CheckpointError: the tensor file is not valid safetensors.
    """
    root = Path(path)
    config_path = root / ADAPTER_CONFIG_NAME
    weights = root / ADAPTER_WEIGHTS_NAME
    if not config_path.is_file():
        if root.is_dir() and any(root.glob("*.safetensors")):
            raise AdapterError(
                f"is a model checkpoint, not a PEFT adapter (no {ADAPTER_CONFIG_NAME})",
                path=root, hint="give a PEFT adapter directory (adapter_config.json and "
                "adapter_model.safetensors) here",
            )  # fmt: skip
        raise AdapterError(
            f"no {ADAPTER_CONFIG_NAME} here", path=root, hint="is this a PEFT adapter directory?"
        )
    if not weights.is_file():
        if (root / "adapter_model.bin").is_file():
            raise AdapterError(
                "only adapter_model.bin (pickle) here; lorasurgeon never unpickles files",
                path=root,
                hint="re-save the adapter with safe_serialization=True",
            )
        raise LocationError(f"no {ADAPTER_WEIGHTS_NAME} here", path=root)
    config = AdapterConfig.read(config_path, model_type=model_type)
    checkpoint = open_checkpoint(weights)
    try:
        return _build(root, config, checkpoint, file_targets)
    except BaseException:
        checkpoint.close()
        raise


def _build(
    root: Path, config: AdapterConfig, checkpoint: Checkpoint, file_targets: bool
) -> Adapter:
    lora, plain = _collect(checkpoint.path, checkpoint)
    adapter = Adapter(root, config, checkpoint)
    resolvable = config.rules.resolvable
    modules = [_lora_module(config, path, parts) for path, parts in lora.items()]
    if any(not m.parameters for m in modules) and not resolvable and not file_targets:
        raise AdapterError(
            "target_modules is null and the base's model type has no PEFT default",
            path=config.path,
            hint="list target_modules in adapter_config.json",
        )
    for path, lm in zip(lora, modules, strict=True):
        linear = not lm.embedding and len(lm.lora_a.shape) == 2
        selected = lm.owner if lm.owner is not None else lm.module
        if lm.parameters or not resolvable or config.rules.selects(selected, linear=linear):
            adapter.modules[path] = lm
        else:
            adapter.ignored.append(path)
    copies = set()
    for rest, info in plain.items():
        segments = rest.split(".")
        if "token_adapter" in segments:
            module = ".".join(segments[: segments.index("token_adapter")])
            indices = config.token_indices(module)
            if indices is None:
                raise AdapterError(
                    f"trainable token rows, but trainable_token_indices names no rows for {module}",
                    path=config.path,
                    tensor=info.name,
                )
            adapter.token_rows[module] = (indices, info)
            continue
        if _WRAPPER_SEGMENTS & set(segments):
            continue  # bias="all" saves a modules_to_save wrapper's inner biases too: PEFT's
            # loader ignores <m>.modules_to_save.bias and drops <m>.original_module.bias
        base_name = ".".join(s for s in segments if s != "base_layer")
        owner = base_name.rpartition(".")[0]
        if "base_layer" not in segments and owner in adapter.modules:
            adapter.unloaded.append(info.name)  # names nothing: the parameter is base_layer.*
            continue
        if "base_layer" in segments and base_name.removesuffix(".weight") in adapter.modules:
            copies.add(base_name)  # PEFT saves targeted embeddings' base weights whole
        adapter.replacements[base_name] = info
    adapter.embedding_copies = frozenset(copies)
    return adapter


# ---------------------------------------------------------------------------------------------
# Writing adapters: extract, combine and resize all end here.


def lora_keys(module: str, *, embedding: bool) -> tuple[str, str]:
    """The lora_A and lora_B tensor names PEFT gives ``module`` (embeddings: lora_embedding_A/B,
    which have no ``.weight``)."""
    prefix = KEY_PREFIX + module
    if embedding:
        return prefix + ".lora_embedding_A", prefix + ".lora_embedding_B"
    return prefix + ".lora_A.weight", prefix + ".lora_B.weight"


def rank_config(ranks: Mapping[str, int], alphas: Mapping[str, float]) -> dict[str, Any]:
    """``r``, ``lora_alpha``, ``rank_pattern`` and ``alpha_pattern`` for per-module ranks and
    alphas: the most common (rank, alpha) pair is the default (ties: the larger), the other
    modules are listed by their escaped full names, which cannot overlap."""
    pairs = collections.Counter((ranks[m], alphas[m]) for m in ranks)
    rank, alpha = max(pairs, key=lambda pair: (pairs[pair], pair)) if pairs else (8, 8.0)
    return {
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": {re.escape(m): r for m, r in ranks.items() if r != rank},
        "alpha_pattern": {re.escape(m): alphas[m] for m in ranks if alphas[m] != alpha},
    }


@dataclass(frozen=True)
class ModuleReport:
    """One module of a written adapter, as in a report's ``modules`` list: ``rel_error`` is
    ||delta - scaling·B@A||_F / ||delta||_F against the delta it approximates and
    ``energy_kept`` = 1 - rel_error²."""

    module: str
    shape: list[int]
    rank: int
    alpha: float
    rel_error: float
    energy_kept: float


def report_dict(report: Any) -> dict[str, Any]:
    """A report dataclass with ``out`` and per-module ``rel_error`` as its JSON object: every
    field, ``out`` as a string, plus ``worst_rel_error`` and ``median_rel_error``."""
    data: dict[str, Any] = dataclasses.asdict(report)
    data["out"] = str(report.out)
    data.update(error_summary([m.rel_error for m in report.modules]))
    return data


def error_summary(errors: Sequence[float]) -> dict[str, float]:
    """``worst_rel_error`` and ``median_rel_error`` of the modules' errors (0 without any)."""
    return {
        "worst_rel_error": max(errors, default=0.0),
        "median_rel_error": statistics.median(errors) if errors else 0.0,
    }


def adapter_output(
    out: Path, planned: Sequence[OutputTensor], copies: Sequence[Copy | TensorInfo],
    config: Mapping[str, Any],
) -> Output:  # fmt: skip
    """The engine's output of an adapter directory: ``adapter_model.safetensors`` holding the
    ``planned`` tensors (computed, in that order) then ``copies`` (stored whole, copied
    unchanged; a ``TensorInfo`` under its own name), and ``adapter_config.json``."""
    items = tuple(c if isinstance(c, Copy) else Copy(c.name, c) for c in copies)
    tensors = (*planned, *(OutputTensor(c.name, c.source.dtype, c.source.shape) for c in items))
    shard = OutputShard(ADAPTER_WEIGHTS_NAME, {"format": "pt"}, tensors)
    text = json.dumps(dict(config), indent=2, sort_keys=True) + "\n"
    return Output(out, OutputLayout((shard,)), items, texts={ADAPTER_CONFIG_NAME: text})

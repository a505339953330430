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
from typing import TYPE_CHECKING, Any

from .errors import AdapterError, LocationError
from .reader import Checkpoint, TensorFiles, TensorInfo, open_checkpoint
from .targets import TargetRules, pattern_value
from .writer import CheckpointWriter, OutputLayout, OutputShard, OutputTensor

if TYPE_CHECKING:
    import torch

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "KEY_PREFIX",
    "Adapter",
    "AdapterConfig",
    "AdapterWriter",
    "LoraModule",
    "ModuleReport",
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
_LORA_PARTS = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"}
# init_lora_weights values whose adapters only make sense on a base PEFT modified at load time.
_BASE_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# Config fields of LoRA variants lorasurgeon cannot merge (PEFT refuses some of them too).
_UNSUPPORTED_FIELDS = (
    "layer_replication", "alora_invocation_tokens", "arrow_config", "use_bdlora",
    "kasa_config", "velora_config", "monteclora_config", "use_qalora", "megatron_config",
    "target_parameters",
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
            raw.get("trainable_token_indices"), rules,
        )  # fmt: skip

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


@dataclass
class Adapter:
    """An opened adapter: config, tensor file, its LoRA modules and whole-tensor entries.

    ``replacements`` maps a module-relative tensor name (``.base_layer`` removed, e.g.
    ``score.weight``) to the stored tensor that replaces the base's. ``token_rows`` maps an
    embedding module to (row indices, stored rows). ``ignored`` lists modules with LoRA tensors
    that the config does not select (PEFT ignores them silently). Close it after use.
    """

    path: Path
    config: AdapterConfig
    checkpoint: Checkpoint
    modules: dict[str, LoraModule] = field(default_factory=dict)
    replacements: dict[str, TensorInfo] = field(default_factory=dict)
    embedding_copies: frozenset[str] = frozenset()
    token_rows: dict[str, tuple[tuple[int, ...], TensorInfo]] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)

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


def _split_lora_key(path: Path, name: str, rest: str) -> tuple[str, str] | None:
    """Split ``<module>.lora_A[.<adapter>].weight`` into (module, part); None if not LoRA."""
    segments = rest.split(".")
    at = next((i for i, s in enumerate(segments) if s in _LORA_PARTS), None)
    if at is None:
        return None
    module, attr = ".".join(segments[:at]), segments[at]
    tail = segments[at + 1 :]
    suffix = tail[-1] if tail and tail[-1] in ("weight", "bias") else None
    named = tail[:-1] if suffix else tail
    if len(named) > 1 or not module:
        raise AdapterError("cannot parse this LoRA tensor name", path=path, tensor=name)
    if ".base_layer" in f".{module}" or module.endswith("base_layer"):
        raise AdapterError(
            "LoRA on raw parameters (target_parameters) or nn.MultiheadAttention is not supported",
            path=path,
            tensor=name,
        )
    return module, attr + (f".{suffix}" if suffix == "bias" else "")


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
        else:
            lora.setdefault(split[0], {})[split[1]] = info
    return lora, plain


def _lora_module(config: AdapterConfig, module: str, t: dict[str, TensorInfo]) -> LoraModule:
    embedding = "lora_embedding_A" in t or "lora_embedding_B" in t
    a = t.get("lora_embedding_A" if embedding else "lora_A")
    b = t.get("lora_embedding_B" if embedding else "lora_B")
    where = config.path.parent / ADAPTER_WEIGHTS_NAME
    if a is None or b is None:
        raise AdapterError(
            "has only one of the two LoRA factors", path=where, tensor=module,
            hint="the adapter file is incomplete",
        )  # fmt: skip
    rank = a.shape[0] if a.shape else 0
    if len(a.shape) < 2 or len(b.shape) < 2 or b.shape[1] != rank:
        raise AdapterError(
            f"lora_A {a.shape} and lora_B {b.shape} do not share a rank", path=where, tensor=module
        )
    if config.rank_of(module) != rank:
        raise AdapterError(
            f"rank {rank} in the file but {config.rank_of(module)} in the config",
            path=where,
            tensor=module,
            hint="PEFT would refuse to load it; fix r/rank_pattern in adapter_config.json",
        )
    return LoraModule(
        module, a, b, embedding, rank, config.alpha_of(module), config.scaling_of(module),
        t.get("lora_B.bias"), t.get("lora_magnitude_vector"),
    )  # fmt: skip


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
    if lora and not resolvable and not file_targets:
        raise AdapterError(
            "target_modules is null and the base's model type has no PEFT default",
            path=config.path,
            hint="list target_modules in adapter_config.json",
        )
    for module, parts in lora.items():
        lm = _lora_module(config, module, parts)
        linear = not lm.embedding and len(lm.lora_a.shape) == 2
        if not resolvable or config.rules.selects(module, linear=linear):
            adapter.modules[module] = lm
        else:
            adapter.ignored.append(module)
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
        base_name = ".".join(s for s in segments if s != "base_layer")
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


class AdapterWriter:
    """An adapter directory written atomically: the tensors planned up front (in the order they
    will come), then ``adapter_config.json`` at ``commit``. Nothing is at ``out`` before that;
    on an exception the temporary directory is removed."""

    def __init__(self, out: Path, planned: Sequence[OutputTensor], *, overwrite: bool) -> None:
        shard = OutputShard(ADAPTER_WEIGHTS_NAME, {"format": "pt"}, tuple(planned))
        self._writer = CheckpointWriter(out, OutputLayout((shard,)), overwrite=overwrite)

    def __enter__(self) -> AdapterWriter:
        self._writer.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._writer.__exit__(*exc)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Store a CPU tensor under ``name`` (its planned dtype and shape)."""
        import torch

        raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        self._writer.write(name, raw.numpy().data)

    def copy(self, name: str, info: TensorInfo, files: TensorFiles) -> None:
        """Store the bytes of an input tensor unchanged under ``name``."""
        self._writer.copy(name, files.fd(info.path), info.offset, info.nbytes)

    def commit(self, config: Mapping[str, Any]) -> None:
        text = json.dumps(dict(config), indent=2, sort_keys=True) + "\n"
        self._writer.add_text(ADAPTER_CONFIG_NAME, text)
        self._writer.commit()

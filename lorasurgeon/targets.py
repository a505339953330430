"""PEFT's module selection rules and module-name facts, on strings only (no tensors, no files).

Matches PEFT 0.21.2: ``check_target_module_exists`` (target_modules, exclude_modules,
layers_to_transform, layers_pattern), the modules_to_save exclusion, and the rank/alpha pattern
lookup of ``get_pattern_key``. See shared/spec/peft-lora.md, sections 3 and 4.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "CONV1D_MODEL_TYPES",
    "DEFAULT_TARGET_MODULES",
    "INPUT_EMBEDDING_NAMES",
    "OUTPUT_EMBEDDING_NAMES",
    "TargetRules",
    "is_conv1d_module",
    "layer_index",
    "pattern_value",
]

#: PEFT's default target_modules when the config has none, by model_type.
DEFAULT_TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "v_proj"), "mistral": ("q_proj", "v_proj"),
    "mixtral": ("q_proj", "v_proj"), "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"), "gemma": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"), "gpt2": ("c_attn",),
    "gpt_neox": ("query_key_value",), "falcon": ("query_key_value",),
    "bloom": ("query_key_value",), "t5": ("q", "v"), "mt5": ("q", "v"),
    "bert": ("query", "value"), "roberta": ("query", "value"), "opt": ("q_proj", "v_proj"),
}  # fmt: skip
#: Model types whose transformers classes use ``Conv1D`` (weights stored (in, out)).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "decision_transformer", "imagegpt", "clvp"})
# GPT-2 family Conv1D module names (clvp: only its MLP uses Conv1D).
_CONV1D_NAMES = {"c_attn", "c_proj", "c_fc", "q_attn"}
_CLVP_CONV1D_NAMES = {"c_fc", "c_proj"}
#: Module names of output embeddings (LM heads), which "all-linear" never targets.
OUTPUT_EMBEDDING_NAMES = ("lm_head", "embed_out")
#: Tensor name endings of input embeddings, for tied output embeddings.
INPUT_EMBEDDING_NAMES = (
    "embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight",
    "tok_embeddings.weight", "shared.weight",
)  # fmt: skip
_LAYER_INDEX = re.compile(r".*?\.[^.]*\.(\d+)\.")


def is_conv1d_module(model_type: str | None, module: str) -> bool:
    """Whether a module of this architecture is a transformers ``Conv1D`` (fan-in/fan-out)."""
    last = module.rsplit(".", 1)[-1]
    if model_type == "clvp":
        return last in _CLVP_CONV1D_NAMES and ".mlp." in f".{module}."
    return model_type in CONV1D_MODEL_TYPES and last in _CONV1D_NAMES


def layer_index(module: str, layers_pattern: Sequence[str] | None) -> int | None:
    """The layer number PEFT's layers_to_transform filter reads from a module name."""
    patterns = [p for p in layers_pattern or () if p]  # PEFT: empty means any pattern
    if not patterns:
        m = _LAYER_INDEX.match(module)
        return int(m.group(1)) if m else None
    for pattern in patterns:
        m = re.match(r"(?:^|.*?\.)" + pattern + r"\.(\d+)\.", module)
        if m:
            return int(m.group(1))
    return None


def pattern_value(patterns: Mapping[str, float], module: str) -> float | None:
    """The value of the first rank_pattern/alpha_pattern key that matches ``module``.

    A key ``k`` matches iff ``re.match("(.*\\.)?(" + k + ")$", module)``: a regex anchored at the
    end that starts at the beginning of the name or right after a dot; dict order decides.
    """
    for key, value in patterns.items():
        if re.match(r"(.*\.)?(" + key + r")$", module):
            return value
    return None


def _listed(name: str, entries: Sequence[str]) -> bool:
    return any(name == e or name.endswith("." + e) for e in entries)


@dataclass(frozen=True)
class TargetRules:
    """Which modules an adapter config selects for LoRA.

    ``target_modules`` is a list of names, a regex string (full match), ``"all-linear"``, or
    None (PEFT's default for ``model_type``).
    """

    target_modules: tuple[str, ...] | str | None
    exclude_modules: tuple[str, ...] | str | None = None
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None
    modules_to_save: tuple[str, ...] = ()
    model_type: str | None = None
    seq_cls: bool = False

    def _targets(self) -> tuple[str, ...] | str | None:
        if self.target_modules is None and self.model_type in DEFAULT_TARGET_MODULES:
            return DEFAULT_TARGET_MODULES[self.model_type]
        return self.target_modules

    @property
    def resolvable(self) -> bool:
        """False when target_modules is None and the model type has no PEFT default."""
        return self._targets() is not None

    @property
    def all_linear(self) -> bool:
        t = self.target_modules
        return isinstance(t, str) and t.lower() == "all-linear"

    def _excluded(self, module: str) -> bool:
        excl = self.exclude_modules
        if isinstance(excl, str):
            if re.fullmatch(excl, module):
                return True
        elif excl and _listed(module, excl):
            return True
        return any(re.match(r"(^|.*\.)" + m + r"($|\..*)", module) for m in self.modules_to_save)

    def _in_layers(self, module: str) -> bool:
        if not self.layers_to_transform:
            return True
        index = layer_index(module, self.layers_pattern)
        return index is not None and index in self.layers_to_transform

    def selects(self, module: str, *, linear: bool = True) -> bool:
        """Whether PEFT puts LoRA on ``module``; ``linear`` is false for embeddings and convs."""
        if self._excluded(module):
            return False
        targets = self._targets()
        if self.all_linear:
            # PEFT refuses layers_to_transform with a string target_modules; lorasurgeon applies
            # it to all-linear, whose meaning (every linear module) has layers to filter
            last = module.rsplit(".", 1)[-1]
            if not linear or last in OUTPUT_EMBEDDING_NAMES or not self._in_layers(module):
                return False
            return not (self.seq_cls and module in ("score", "classifier"))
        if isinstance(targets, str):
            return re.fullmatch(targets, module) is not None
        if not targets:
            return False
        if module in targets:
            return True  # exact names bypass layers_to_transform
        return _listed(module, targets) and self._in_layers(module)

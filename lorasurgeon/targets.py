"""PEFT's module selection rules and module-name facts, on strings only (no tensors, no files).

Matches PEFT 0.21.2: ``check_target_module_exists`` (target_modules, exclude_modules,
layers_to_transform, layers_pattern), the modules_to_save exclusion, and the rank/alpha pattern
lookup of ``get_pattern_key``. See shared/spec/peft-lora.md, sections 3 and 4.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .errors import OptionError

__all__ = [
    "CONV1D_MODEL_TYPES",
    "DEFAULT_TARGET_MODULES",
    "INPUT_EMBEDDING_NAMES",
    "OUTPUT_EMBEDDING_NAMES",
    "Layout",
    "LayoutRules",
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


class Layout(str, Enum):
    """How a 2-D weight that LoRA targets is stored."""

    LINEAR = "linear"  # nn.Linear: (out, in)
    CONV1D = "conv1d"  # transformers Conv1D (GPT-2 family, fan_in_fan_out): (in, out)
    UNKNOWN = "unknown"  # no config.json and nothing stated: only a non-square shape can tell

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class LayoutRules:
    """What is known about the storage layout of a checkpoint's 2-D weights.

    ``model_type`` comes from the checkpoint's ``config.json``; ``known`` says that a config
    was found that fixes every layout (a transformers ``model_type``, or a diffusers config,
    which never uses ``Conv1D``). ``stated`` is what the user said (``--fan-in-fan-out``):
    ``"all"``, ``"none"``, or the modules that are ``Conv1D`` (PEFT's suffix rule), all others
    being ``nn.Linear``. A stated layout that contradicts a known one is an error.
    """

    model_type: str | None = None
    known: bool = False
    stated: tuple[str, ...] | str | None = None

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], stated: Sequence[str] | str | None = None
    ) -> LayoutRules:
        """Rules from a checkpoint's config.json (empty when there is none) and the user's
        statement.

        Raises:
            OptionError: ``stated`` is empty or names an empty module.
        """
        model_type = config.get("model_type")
        known = isinstance(model_type, str) or "_diffusers_version" in config
        return cls(model_type if isinstance(model_type, str) else None, known,
                   _stated(stated))  # fmt: skip

    def _stated_layout(self, module: str) -> Layout | None:
        if self.stated is None:
            return None
        if isinstance(self.stated, str):
            return Layout.CONV1D if self.stated == "all" else Layout.LINEAR
        return Layout.CONV1D if _listed(module, self.stated) else Layout.LINEAR

    def _known_layout(self, module: str) -> Layout:
        if not self.known:
            return Layout.UNKNOWN
        conv1d = is_conv1d_module(self.model_type, module)
        return Layout.CONV1D if conv1d else Layout.LINEAR

    def layout(self, module: str) -> Layout:
        """The layout of the 2-D weight of ``module`` (not an embedding or a convolution).

        Raises:
            OptionError: the stated layout contradicts the one config.json implies.
        """
        known, stated = self._known_layout(module), self._stated_layout(module)
        if stated is None:
            return known
        if known is not Layout.UNKNOWN and stated is not known:
            raise OptionError(
                f"--fan-in-fan-out makes it {stated}, but the base's config.json (model_type "
                f"{self.model_type}) makes it {known}", tensor=module,
                hint="drop --fan-in-fan-out, or correct it",
            )  # fmt: skip
        return stated

    def unused_names(self, modules: Sequence[str]) -> list[str]:
        """The module names of ``stated`` that match none of ``modules``."""
        if self.stated is None or isinstance(self.stated, str):
            return []
        return [s for s in self.stated if not any(_listed(m, (s,)) for m in modules)]


def _stated(value: Sequence[str] | str | None) -> tuple[str, ...] | str | None:
    if value is None:
        return None
    if isinstance(value, str):
        if value.lower() in ("all", "none"):
            return value.lower()
        value = value.split(",")
    names = tuple(str(v).strip() for v in value)
    if not names or not all(names):
        raise OptionError(
            "--fan-in-fan-out needs all, none, or comma-separated module names",
            hint="e.g. --fan-in-fan-out c_attn,c_proj,c_fc",
        )
    return names


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

    def excludes(self, module: str) -> bool:
        """Whether ``exclude_modules`` names ``module`` (PEFT's exclusion rule)."""
        excl = self.exclude_modules
        if isinstance(excl, str):
            return re.fullmatch(excl, module) is not None
        return bool(excl) and _listed(module, excl or ())

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

"""Module selection and rank/alpha patterns (``lorasurgeon.targets``) against peft-lora.md
sections 3 and 4, and against PEFT 0.21.2 itself: ``check_target_module_exists``,
``get_pattern_key``, its default target table and, on tiny models, ``get_peft_model``.
"""

from __future__ import annotations

import copy
import re

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from lorasurgeon.targets import DEFAULT_TARGET_MODULES, TargetRules, layer_index, pattern_value

PROPERTY = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

Q = "model.layers.0.self_attn.q_proj"
K = "model.layers.0.self_attn.k_proj"
Q1 = "model.layers.1.self_attn.q_proj"
DOWN1 = "model.layers.1.mlp.down_proj"


def rules(targets: tuple[str, ...] | str | None, **kwargs: object) -> TargetRules:
    return TargetRules(target_modules=targets, **kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# The decision for one module name (peft-lora.md 4.1, 4.2)


@pytest.mark.parametrize(
    ("rule", "module", "expected"),
    [
        # list entries: exact name or suffix after a dot, never part of a word
        (rules(("q_proj", "v_proj")), Q, True),
        (rules(("q_proj", "v_proj")), K, False),
        (rules(("q_proj",)), "q_proj", True),
        (rules(("q_proj",)), "model.layers.0.self_attn.xq_proj", False),
        (rules(("q",)), Q, False),
        (rules(("q",)), "encoder.block.0.layer.0.SelfAttention.q", True),
        (rules(("proj",)), "model.layers.0.self_attn.o_proj", False),
        (rules(("self_attn.q_proj",)), Q, True),
        (rules(("layers.0.self_attn.q_proj",)), Q, True),
        (rules(("layers.0.self_attn.q_proj",)), Q1, False),
        (rules((Q,)), Q, True),
        (rules((Q,)), Q1, False),
        # list entries are not regexes
        (rules((".*q_proj",)), Q, False),
        # a string is a regex that must match the whole name
        (rules("q_proj"), Q, False),
        (rules("q_proj"), "q_proj", True),
        (rules(r".*\.q_proj"), Q, True),
        (rules(r".*\.(q|v)_proj"), K, False),
        (rules(r".*self_attn\.q"), Q, False),
        (rules(r"model\.layers\.1\..*"), DOWN1, True),
        (rules(r"model\.layers\.1\..*"), Q, False),
        (rules(r".*layers\.1\..*proj"), Q1, True),
        # exclude_modules: list as exact/suffix, string as full-match regex
        (rules(r".*proj", exclude_modules=("k_proj",)), K, False),
        (rules(r".*proj", exclude_modules=("k_proj",)), Q, True),
        (rules(("q_proj",), exclude_modules=("layers.0.self_attn.q_proj",)), Q, False),
        (rules(("q_proj",), exclude_modules=("layers.0.self_attn.q_proj",)), Q1, True),
        (rules(("q_proj",), exclude_modules=("proj",)), Q, True),
        (rules(("q_proj",), exclude_modules=(Q,)), Q, False),
        (rules(("q_proj",), exclude_modules=r".*layers\.0\..*"), Q, False),
        (rules(("q_proj",), exclude_modules=r".*layers\.0\..*"), Q1, True),
        (rules(("q_proj",), exclude_modules="q_proj"), Q, True),  # full match only
        # modules_to_save: the module and everything inside it, matched per dotted segment
        (rules(("lm_head", "q_proj"), modules_to_save=("lm_head",)), "lm_head", False),
        (rules(("lm_head", "q_proj"), modules_to_save=("lm_head",)), Q, True),
        (rules(("q_proj",), modules_to_save=("self_attn",)), Q, False),
        (rules(("q_proj",), modules_to_save=("attn",)), Q, True),
        (rules(("norm",), modules_to_save=("norm",)), "model.norm", False),
        (
            rules(("input_layernorm",), modules_to_save=("norm",)),
            "model.layers.0.input_layernorm",
            True,
        ),
        (rules(r".*", modules_to_save=("layers.0",)), Q, False),
        (rules(r".*", modules_to_save=("layers.0",)), Q1, True),
    ],
)
def test_selects(rule: TargetRules, module: str, expected: bool) -> None:
    assert rule.selects(module) is expected


@pytest.mark.parametrize(
    ("layers", "pattern", "module", "expected"),
    [
        ((1,), None, Q1, True),
        ((1,), None, Q, False),
        ((0, 1), None, Q, True),
        ((3,), None, "transformer.h.3.attn.q_proj", True),
        ((1,), None, "model.layers.1.mlp.experts.0.q_proj", True),
        ((0,), None, "model.layers.1.mlp.experts.0.q_proj", False),  # the first index counts
        ((1,), None, "blocks.1.q_proj", False),  # no segment before the index: no layer
        ((1,), None, "x.q_proj", False),
        ((1,), ("layers",), Q1, True),
        ((1,), ("layer",), Q1, False),  # `layer` must be a whole segment before `.1.`
        ((1,), ("layer",), "encoder.layer.1.attention.self.q_proj", True),
        ((1,), ("blocks",), "blocks.1.q_proj", True),
        ((0,), ("experts",), "model.layers.1.mlp.experts.0.q_proj", True),
        ((2,), ("h", "layers"), "model.layers.2.self_attn.q_proj", True),
        ((2,), ("h", "layers"), "transformer.h.2.self_attn.q_proj", True),
    ],
)
def test_layers_to_transform_filters_suffix_matches(
    layers: tuple[int, ...], pattern: tuple[str, ...] | None, module: str, expected: bool
) -> None:
    rule = rules(("q_proj",), layers_to_transform=layers, layers_pattern=pattern)
    assert rule.selects(module) is expected


@pytest.mark.parametrize("module", [Q, "q_proj", "blocks.1.q_proj"])
def test_exact_name_bypasses_layers_to_transform(module: str) -> None:
    rule = rules((module, "v_proj"), layers_to_transform=(5,), layers_pattern=("layers",))
    assert rule.selects(module)
    assert not rule.selects("model.layers.0.self_attn.v_proj")
    assert rule.selects("model.layers.5.self_attn.v_proj")


@pytest.mark.parametrize(
    ("module", "pattern", "expected"),
    [
        ("model.layers.3.x", None, 3),
        ("transformer.h.3.x", None, 3),
        ("model.layers.12.self_attn.q_proj", None, 12),
        ("model.layers.1.mlp.experts.0.w", None, 1),
        ("a.b.3.c.4.d", None, 3),
        ("blocks.1.w", None, None),
        ("model.layers.3", None, None),  # the index needs a segment after it
        ("q_proj", None, None),
        ("encoder.layer.1.attention.self.query", ("layer",), 1),
        ("model.layers.1.self_attn.q_proj", ("layer",), None),
        ("model.layers.1.self_attn.q_proj", ("layers",), 1),
        ("blocks.1.w", ("blocks",), 1),
        ("model.layers.1.mlp.experts.0.w", ("experts",), 0),
        ("model.decoder.layers.2.x", ("h", "layers"), 2),
        ("transformer.h.4.layers.2.x", ("layers", "h"), 2),  # first pattern that hits wins
        ("model.layers.1.x", ("lay.rs",), 1),  # the pattern is a regex
    ],
)
def test_layer_index(module: str, pattern: tuple[str, ...] | None, expected: int | None) -> None:
    assert layer_index(module, pattern) == expected


# ---------------------------------------------------------------------------------------------
# all-linear and defaults (peft-lora.md 1.2, 4.3)


@pytest.mark.parametrize(
    ("rule", "module", "linear", "expected"),
    [
        (rules("all-linear"), DOWN1, True, True),
        (rules("ALL-LINEAR"), DOWN1, True, True),
        (rules("all-linear"), "lm_head", True, False),
        (rules("all-linear"), "embed_out", True, False),
        (rules("all-linear"), "model.embed_tokens", False, False),
        (rules("all-linear"), "score", True, True),
        (rules("all-linear", seq_cls=True), "score", True, False),
        (rules("all-linear", seq_cls=True), "classifier", True, False),
        (rules("all-linear", seq_cls=True), DOWN1, True, True),
        (rules("all-linear", exclude_modules=("down_proj",)), DOWN1, True, False),
        (rules("all-linear", modules_to_save=("mlp",)), DOWN1, True, False),
    ],
)
def test_all_linear(rule: TargetRules, module: str, linear: bool, expected: bool) -> None:
    assert rule.all_linear
    assert rule.selects(module, linear=linear) is expected


@pytest.mark.parametrize(
    ("model_type", "module", "expected"),
    [
        ("llama", Q, True),
        ("llama", "model.layers.0.self_attn.v_proj", True),
        ("llama", K, False),
        ("mistral", Q, True),
        ("gpt2", "transformer.h.0.attn.c_attn", True),
        ("gpt2", "transformer.h.0.attn.c_proj", False),
        ("gpt_neox", "gpt_neox.layers.0.attention.query_key_value", True),
        ("falcon", "transformer.h.0.self_attention.query_key_value", True),
        ("t5", "encoder.block.0.layer.0.SelfAttention.q", True),
        ("t5", "encoder.block.0.layer.0.SelfAttention.k", False),
        ("bert", "bert.encoder.layer.0.attention.self.value", True),
        ("bert", "bert.encoder.layer.0.attention.self.key", False),
    ],
)
def test_default_targets_per_model_type(model_type: str, module: str, expected: bool) -> None:
    rule = rules(None, model_type=model_type)
    assert rule.resolvable
    assert rule.selects(module) is expected


@pytest.mark.parametrize("model_type", [None, "no_such_model"])
def test_no_targets_and_no_default_selects_nothing(model_type: str | None) -> None:
    rule = rules(None, model_type=model_type)
    assert not rule.resolvable
    assert not rule.selects(Q)


# ---------------------------------------------------------------------------------------------
# rank_pattern / alpha_pattern (peft-lora.md 3)


@pytest.mark.parametrize(
    ("patterns", "module", "expected"),
    [
        ({"q_proj": 4}, Q, 4),
        ({"q_proj": 4}, "q_proj", 4),
        ({"v_proj": 4}, Q, None),
        ({"proj": 4}, "model.layers.0.self_attn.o_proj", None),
        ({"q": 4}, Q, None),
        ({"layers.0.self_attn.q_proj": 8}, Q, 8),
        ({"^model.layers.0.self_attn.q_proj": 8}, Q, 8),
        ({"model.layers.0.self_attn.q_proj": 8}, Q1, None),
        ({"layers\\.1\\..*": 2}, DOWN1, 2),
        ({"layers\\.1\\..*": 2}, Q1, 2),
        ({"layers\\.1\\..*": 2}, Q, None),
        ({"layers\\.1\\..*": 2}, "model.layers.10.mlp.down_proj", None),
        ({"self_attn\\.(q|v)_proj": 16}, Q, 16),
        # first match in dict order, not the most specific
        ({"q_proj": 4, "self_attn.q_proj": 8}, Q, 4),
        ({"self_attn.q_proj": 8, "q_proj": 4}, Q, 8),
        ({"k_proj": 2, ".*": 3}, Q, 3),
        ({}, Q, None),
    ],
)
def test_pattern_value(patterns: dict[str, float], module: str, expected: float | None) -> None:
    assert pattern_value(patterns, module) == expected


# ---------------------------------------------------------------------------------------------
# PEFT as the oracle

peft_tuners = pytest.importorskip("peft.tuners.tuners_utils")
from peft import LoraConfig  # noqa: E402
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING  # noqa: E402
from peft.utils.other import get_pattern_key  # noqa: E402

# Realistic names (Llama, GPT-2, T5, BERT, MoE, top-level heads) for every config.
MODULE_NAMES = (
    Q, K, Q1, DOWN1, "model.layers.1.self_attn.v_proj", "model.layers.10.self_attn.q_proj",
    "model.embed_tokens", "model.norm", "model.layers.0.input_layernorm", "lm_head", "score",
    "q_proj", "blocks.1.q_proj", "blocks.1.mlp.q_proj", "transformer.h.0.attn.c_attn",
    "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_fc",
    "encoder.block.0.layer.0.SelfAttention.q", "encoder.layer.1.attention.self.query",
    "model.layers.1.mlp.experts.0.w1", "model.layers.0.mlp.experts.1.w1",
    "model.layers.1.mlp.experts.0.q_proj",
)  # fmt: skip
SEGMENTS = (
    "model", "layers", "layer", "h", "blocks", "mlp", "self_attn", "experts", "q_proj",
    "k_proj", "o_proj", "q", "proj", "lm_head", "norm", "0", "1", "2", "10",
)  # fmt: skip
WORDS = SEGMENTS[5:] + (
    "self_attn.q_proj", "layers.1.self_attn.q_proj", Q, "mlp.experts.0.q_proj", "h.1.q",
)  # fmt: skip
REGEXES = (
    r".*\.q_proj", "q_proj", r"model\.layers\.\d+\.self_attn\..*", r".*(q|k)_proj",
    r".*layers\.1\..*", r"(.*\.)?h\.\d+\..*", r".*", "lm_head",
)  # fmt: skip
PATTERN_KEYS = WORDS + (
    r"layers\.1\..*", "^model.layers.0.self_attn.q_proj", r"self_attn\.(q|k)_proj", ".*proj",
    "lay.rs.0.*",
)  # fmt: skip
LAYER_PATTERNS = ("layers", "layer", "h", "blocks", "experts", "lay.rs")

module_names = st.sampled_from(MODULE_NAMES) | st.lists(
    st.sampled_from(SEGMENTS), min_size=1, max_size=7
).map(".".join)


@st.composite
def configs(draw: st.DrawFn) -> tuple[dict[str, object], TargetRules]:
    """A LoraConfig's targeting fields (only combinations LoraConfig accepts) and our rules."""
    kwargs: dict[str, object] = {}
    if draw(st.booleans()):
        kwargs["target_modules"] = draw(st.sampled_from(REGEXES))
    else:
        kwargs["target_modules"] = draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=4))
        layers = draw(st.none() | st.integers(0, 3) | st.lists(st.integers(0, 3), min_size=1))
        if layers is not None:
            kwargs["layers_to_transform"] = layers
            pattern = draw(
                st.none()
                | st.sampled_from(LAYER_PATTERNS)
                | st.lists(st.sampled_from(LAYER_PATTERNS), min_size=1, max_size=2)
            )
            if pattern is not None:
                kwargs["layers_pattern"] = pattern
    exclude = draw(
        st.none()
        | st.sampled_from(REGEXES)
        | st.lists(st.sampled_from(WORDS), min_size=1, max_size=2)
    )
    if exclude is not None:
        kwargs["exclude_modules"] = exclude
    save = draw(st.none() | st.lists(st.sampled_from(WORDS + ("lay.rs.1",)), max_size=2))
    if save:
        kwargs["modules_to_save"] = save
    return kwargs, _rules_from(kwargs)


def _as_tuple(value: object) -> tuple[object, ...] | None:
    if value is None:
        return None
    return tuple(value) if isinstance(value, list) else (value,)


def _rules_from(kwargs: dict[str, object]) -> TargetRules:
    """The TargetRules that describe the same config (as adapters.py reads a config file)."""
    targets = kwargs["target_modules"]
    exclude = kwargs.get("exclude_modules")
    return TargetRules(
        target_modules=targets if isinstance(targets, str) else tuple(targets),  # type: ignore[arg-type]
        exclude_modules=exclude if exclude is None or isinstance(exclude, str) else tuple(exclude),  # type: ignore[arg-type]
        layers_to_transform=_as_tuple(kwargs.get("layers_to_transform")),  # type: ignore[arg-type]
        layers_pattern=_as_tuple(kwargs.get("layers_pattern")),  # type: ignore[arg-type]
        modules_to_save=tuple(kwargs.get("modules_to_save") or ()),  # type: ignore[arg-type]
    )


def peft_selects(kwargs: dict[str, object], module: str) -> bool:
    config = LoraConfig(**copy.deepcopy(kwargs))  # type: ignore[arg-type]
    return bool(peft_tuners.check_target_module_exists(config, module))


@PROPERTY
@given(config=configs(), names=st.lists(module_names, min_size=1, max_size=8))
def test_selects_agrees_with_peft_check_target_module_exists(
    config: tuple[dict[str, object], TargetRules], names: list[str]
) -> None:
    kwargs, rule = config
    for name in MODULE_NAMES + tuple(names):
        assert rule.selects(name) is peft_selects(kwargs, name), (kwargs, name)


@pytest.mark.parametrize(
    ("kwargs", "module"),
    [
        # PEFT treats an empty layers_pattern like none ("empty layers_pattern means any layer
        # pattern is ok"); adapters.py passes "" through as ("",).
        ({"target_modules": ["q_proj"], "layers_to_transform": [1], "layers_pattern": ""}, Q1),
        ({"target_modules": ["q_proj"], "layers_to_transform": [1], "layers_pattern": []}, Q1),
        ({"target_modules": ["q_proj"], "layers_to_transform": [], "layers_pattern": None}, Q),
    ],
)
def test_empty_layer_settings_agree_with_peft(kwargs: dict[str, object], module: str) -> None:
    rule = TargetRules(
        target_modules=("q_proj",),
        layers_to_transform=tuple(kwargs["layers_to_transform"]) or None,  # type: ignore[arg-type]
        layers_pattern=_as_tuple(kwargs["layers_pattern"]) or None,  # type: ignore[arg-type]
    )
    assert rule.selects(module) is peft_selects(kwargs, module)


@PROPERTY
@given(
    keys=st.lists(st.sampled_from(PATTERN_KEYS), unique=True, max_size=4),
    names=st.lists(module_names, min_size=1, max_size=8),
)
def test_pattern_value_agrees_with_peft_get_pattern_key(keys: list[str], names: list[str]) -> None:
    patterns = {key: float(i + 1) for i, key in enumerate(keys)}
    for name in MODULE_NAMES + tuple(names):
        key = get_pattern_key(list(patterns), name)
        expected = patterns.get(key) if re.match(rf"(.*\.)?({key})$", name) else None
        assert pattern_value(patterns, name) == expected, (patterns, name)


@pytest.mark.parametrize("model_type", sorted(DEFAULT_TARGET_MODULES))
def test_default_targets_match_peft_table(model_type: str) -> None:
    peft_default = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    assert peft_default is not None, (
        f"PEFT has no default target_modules for {model_type!r} (it raises and asks for "
        "target_modules); lorasurgeon resolves it to "
        f"{DEFAULT_TARGET_MODULES[model_type]}"
    )
    assert set(DEFAULT_TARGET_MODULES[model_type]) == set(peft_default)


# On real (tiny) models: what get_peft_model wraps, including all-linear and the default table.

transformers = pytest.importorskip("transformers")


def _tiny_models() -> dict[str, object]:
    import torch
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
    )

    torch.manual_seed(0)
    llama = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
    )  # fmt: skip
    return {
        "llama": LlamaForCausalLM(LlamaConfig(**llama)),
        "llama_tied": LlamaForCausalLM(LlamaConfig(**llama, tie_word_embeddings=True)),
        "llama_seq_cls": LlamaForSequenceClassification(
            LlamaConfig(**llama, num_labels=3, pad_token_id=0)
        ),
        "gpt2": GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64)),
    }


@pytest.fixture(scope="module")
def tiny_models() -> dict[str, object]:
    return _tiny_models()


@pytest.mark.parametrize(
    ("model", "kwargs"),
    [
        ("llama", {"target_modules": "all-linear"}),
        ("llama_tied", {"target_modules": "all-linear"}),
        ("llama", {"target_modules": "all-linear", "exclude_modules": ["o_proj"]}),
        ("llama_seq_cls", {"target_modules": "all-linear", "task_type": "SEQ_CLS"}),
        ("gpt2", {"target_modules": "all-linear"}),
        ("llama", {"target_modules": None}),
        ("gpt2", {"target_modules": None}),
        ("llama", {"target_modules": ["q_proj", "embed_tokens", "lm_head"]}),
        ("llama", {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [1]}),
        ("llama", {"target_modules": ["lm_head", "q_proj"], "modules_to_save": ["lm_head"]}),
        ("llama", {"target_modules": [Q, "v_proj"], "layers_to_transform": 1}),
        ("gpt2", {"target_modules": ["c_attn", "c_fc"], "layers_to_transform": [0]}),
    ],
)
def test_selects_what_get_peft_model_wraps(
    tiny_models: dict[str, object], model: str, kwargs: dict[str, object]
) -> None:
    import torch
    from peft import get_peft_model
    from transformers.pytorch_utils import Conv1D

    base = copy.deepcopy(tiny_models[model])
    model_type = base.config.model_type  # type: ignore[attr-defined]
    task = kwargs.get("task_type")
    save = tuple(kwargs.get("modules_to_save") or ())  # type: ignore[arg-type]
    if task == "SEQ_CLS":
        save += ("classifier", "score")  # PEFT adds these for SEQ_CLS (peft-lora.md 1.2)
    targets = kwargs["target_modules"]
    layers = kwargs.get("layers_to_transform")
    rule = TargetRules(
        target_modules=targets if targets is None or isinstance(targets, str) else tuple(targets),  # type: ignore[arg-type]
        exclude_modules=_as_tuple(kwargs.get("exclude_modules")),  # type: ignore[arg-type]
        layers_to_transform=_as_tuple(layers),  # type: ignore[arg-type]
        modules_to_save=save,
        model_type=model_type,
        seq_cls=task == "SEQ_CLS",
    )
    names = {
        name: isinstance(module, (torch.nn.Linear, Conv1D))
        for name, module in base.named_modules()  # type: ignore[attr-defined]
        if isinstance(module, (torch.nn.Linear, Conv1D, torch.nn.Embedding))
    }
    peft_model = get_peft_model(base, LoraConfig(r=2, **kwargs))  # type: ignore[arg-type]
    wrapped = {
        name.removeprefix("base_model.model.").removesuffix(".lora_A")
        for name, _ in peft_model.named_modules()
        if name.endswith(".lora_A")
    }
    ours = {name for name, linear in names.items() if rule.selects(name, linear=linear)}
    assert ours == wrapped


@pytest.mark.parametrize(
    ("config", "stated", "module", "expected"),
    [
        ({"model_type": "gpt2"}, None, "transformer.h.0.attn.c_proj", "conv1d"),
        ({"model_type": "gpt2"}, None, "lm_head", "linear"),
        ({"model_type": "llama"}, None, "model.layers.0.self_attn.q_proj", "linear"),
        ({"model_type": "my-custom"}, None, "blocks.0.c_proj", "linear"),
        ({"_diffusers_version": "0.30.0"}, None, "down.0.attn.to_q", "linear"),
        ({}, None, "transformer.h.0.attn.c_proj", "unknown"),
        ({"architectures": ["X"]}, None, "h.0.c_proj", "unknown"),  # no model_type
        ({}, "all", "h.0.c_proj", "conv1d"),
        ({}, "none", "h.0.c_proj", "linear"),
        ({}, ["c_proj"], "h.0.attn.c_proj", "conv1d"),
        ({}, ["c_proj"], "h.0.attn.gate", "linear"),
        ({"model_type": "gpt2"}, "all", "transformer.h.0.attn.c_proj", "conv1d"),
    ],
)
def test_layout_is_known_from_config_stated_or_unknown(
    config: dict[str, object], stated: object, module: str, expected: str
) -> None:
    from lorasurgeon.targets import LayoutRules

    rules = LayoutRules.from_config(config, stated)  # type: ignore[arg-type]
    assert rules.layout(module).value == expected


def test_stated_layout_contradicting_config_is_an_option_error() -> None:
    from lorasurgeon.errors import OptionError
    from lorasurgeon.targets import LayoutRules

    rules = LayoutRules.from_config({"model_type": "llama"}, "all")
    with pytest.raises(OptionError, match="model_type llama"):
        rules.layout("model.layers.0.self_attn.q_proj")
    with pytest.raises(OptionError):
        LayoutRules.from_config({}, ["c_proj", ""])

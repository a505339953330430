# ruff: noqa: E402  (the environment is set before transformers is imported)
"""Shared test fixtures: an offline Hub, tiny seeded base models, PEFT adapters, the PEFT oracle.

Everything here is built locally from transformers configs with random init and fixed seeds;
nothing is ever downloaded. The pieces other test modules reuse:

- ``TinyBase``: a saved base checkpoint (``path``) plus ``load(dtype)``, which returns a fresh
  copy of the model read back from ``path``. Session fixtures: ``llama_fp32`` (sharded),
  ``llama_bf16`` (sharded), ``llama_tied``, ``gpt2`` (Conv1D, tied), ``llama_seq_cls``
  (biases, 3 labels), ``conv_net`` (a custom module saved as one ``model.safetensors`` file).
- ``make_adapter(base, lora_config, path, seed)``: a PEFT adapter dir with every trained tensor
  set to seeded random values, checked to change the base.
- ``peft_merge(base, adapters, weights=..., dtype=...)``: the oracle, PEFT's
  ``merge_and_unload()`` state dict.
- ``assert_matches_peft(ours, peft_state_dict, base, dtype_rule=...)``: the one comparison,
  with the tolerances below written once.
- ``load_checkpoint``, ``read_raw_tensor_bytes``, ``assert_same_layout``: checkpoint readers.

Import them with ``from tests.conftest import ...`` (``tests`` is a package).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import struct
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Offline before transformers/huggingface_hub are imported (they read these once);
# the autouse ``offline_hub`` fixture below also isolates the cache per test.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch
from huggingface_hub import constants as hf_constants
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

# ---------------------------------------------------------------------------------------------
# Tolerances (the only place they are written).
#
# float32 outputs: per tensor, max|ours - peft| / max|peft| <= FP32_REL_TOL. Normalising by the
# tensor's largest value (not elementwise) keeps entries near zero from dominating: both sides
# compute in float32 and differ only by summation order, i.e. a few float32 ulps of the largest
# term (~1e-7 relative), so 1e-5 leaves two orders of magnitude of headroom and still catches a
# wrong scaling (an rslora/alpha mix-up is >= 1e-1).
FP32_REL_TOL = 1e-5
# float16/bfloat16 outputs, where PEFT rounds once (Linear, Conv1D, ConvNd, DoRA; peft-lora.md
# 5.4): ulp distance to PEFT (counted on the ordered integer representation) <= 1. Both sides
# round the same float32 value once; the float32 deltas may differ in their last bit (summation
# order) and flip a round-to-nearest tie, hence 1 and not 0.
HALF_ULPS_SINGLE_ROUNDING = 1
# Where PEFT rounds more than once (Embedding: rd(W + rd(delta)); k adapters: one rounding per
# adapter; a float32 base loaded in half precision: rd(rd(W) + delta)), "1 ulp per extra
# rounding" is NOT a valid bound in ulps of the result: each intermediate rounding errs by half
# an ulp of the *intermediate* (e.g. of delta), which is many ulps of the result when W + delta
# cancels. Measured: embedding bf16, W = 0.03467, delta = -0.03423, exact 4.363e-4, PEFT
# 4.883e-4 (27 ulp away), rd(exact) 4.368e-4. So such tensors are checked against the exact
# value instead: PEFT's merge on the base upcast to float32 (no half-precision rounding at all)
# rounded once must be within HALF_ULPS_SINGLE_ROUNDING of ours, and ours must be elementwise
# no farther from that exact value than PEFT's own half-precision result (plus half an ulp for
# the float32 tie flip) -- spec/cli.md: "lorasurgeon's result is the closer one".

# Hyper-parameters of the tiny models (hidden 32, 2 layers, vocab 64).
TINY_LLAMA = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=64,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
TINY_GPT2 = dict(
    n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64, bos_token_id=0, eos_token_id=0
)
# Every linear module of a Llama block; the usual "train all linear layers" target list.
LLAMA_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# fp32 Llama is ~90 KB: 40KB gives 3 shards.
SHARD_SIZE = "40KB"

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


# ---------------------------------------------------------------------------------------------
# Hub isolation


@pytest.fixture(autouse=True)
def offline_hub(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point every Hugging Face cache at a fresh, empty temp dir and forbid network access.

    Sets ``HF_HOME``, ``HF_HUB_OFFLINE=1``, ``TRANSFORMERS_OFFLINE=1`` and also patches
    ``huggingface_hub.constants``, which reads the environment once at import. Returns HF_HOME
    (a test that needs a pre-filled cache writes it under ``HF_HOME/hub``).
    """
    home = tmp_path_factory.mktemp("hf_home")
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_XET_CACHE", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "xdg-cache"))  # lorasurgeon's hash cache
    patched = {
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HUGGINGFACE_HUB_CACHE": str(home / "hub"),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_HUB_OFFLINE": True,
    }
    for name, value in patched.items():
        if hasattr(hf_constants, name):
            monkeypatch.setattr(hf_constants, name, value)
    return home


# ---------------------------------------------------------------------------------------------
# Tiny base models


@dataclass(frozen=True)
class TinyBase:
    """A base checkpoint saved on disk and a way to load a fresh model from it.

    Attributes:
        name: short id used in test ids and messages.
        path: a checkpoint directory, or a single ``.safetensors`` file.
        dtype: the dtype the checkpoint is stored in.
        loader: ``loader(path, dtype)`` returns a new model holding the checkpoint's values.
    """

    name: str
    path: Path
    dtype: torch.dtype
    loader: Callable[[Path, torch.dtype], nn.Module] = field(repr=False)

    def load(self, dtype: torch.dtype | None = None) -> nn.Module:
        """A fresh model read back from ``path`` (in ``dtype``, default the stored dtype)."""
        return self.loader(self.path, dtype or self.dtype)

    @property
    def is_file(self) -> bool:
        return self.path.is_file()


def _hf_loader(auto_class: type) -> Callable[[Path, torch.dtype], nn.Module]:
    def load(path: Path, dtype: torch.dtype) -> nn.Module:
        return auto_class.from_pretrained(path, dtype=dtype)

    return load


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """Build a model under a fixed seed without disturbing the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _save_hf(model: nn.Module, path: Path, *, max_shard_size: str | None = None) -> Path:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    if max_shard_size:
        index = json.loads((path / INDEX_NAME).read_text())
        shards = set(index["weight_map"].values())
        assert len(shards) >= 2, f"{path}: expected a sharded checkpoint, got {shards}"
    return path


def _tiny_llama(seed: int = 0, **overrides: object) -> LlamaForCausalLM:
    cfg = LlamaConfig(**{**TINY_LLAMA, "tie_word_embeddings": False, **overrides})
    return _seeded(seed, lambda: LlamaForCausalLM(cfg))


@pytest.fixture(scope="session")
def llama_fp32(tmp_path_factory: pytest.TempPathFactory) -> TinyBase:
    """Untied Llama, float32, 3 shards with an index file."""
    path = _save_hf(_tiny_llama(), tmp_path_factory.mktemp("llama_fp32"), max_shard_size=SHARD_SIZE)
    return TinyBase("llama_fp32", path, torch.float32, _hf_loader(AutoModelForCausalLM))


@pytest.fixture(scope="session")
def llama_bf16(tmp_path_factory: pytest.TempPathFactory) -> TinyBase:
    """The same Llama weights rounded to bfloat16, sharded with an index file."""
    model = _tiny_llama().to(torch.bfloat16)
    path = _save_hf(model, tmp_path_factory.mktemp("llama_bf16"), max_shard_size="20KB")
    return TinyBase("llama_bf16", path, torch.bfloat16, _hf_loader(AutoModelForCausalLM))


@pytest.fixture(scope="session")
def llama_tied(tmp_path_factory: pytest.TempPathFactory) -> TinyBase:
    """Llama with tie_word_embeddings: only ``model.embed_tokens.weight`` is stored."""
    model = _tiny_llama(seed=1, tie_word_embeddings=True)
    path = _save_hf(model, tmp_path_factory.mktemp("llama_tied"))
    with safe_open(path / SINGLE_NAME, "pt") as f:
        assert "lm_head.weight" not in f.keys()
    return TinyBase("llama_tied", path, torch.float32, _hf_loader(AutoModelForCausalLM))


@pytest.fixture(scope="session")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> TinyBase:
    """GPT-2 (transformers Conv1D, weights stored (in, out)), tied head, float32."""
    model = _seeded(2, lambda: GPT2LMHeadModel(GPT2Config(**TINY_GPT2)))
    path = _save_hf(model, tmp_path_factory.mktemp("gpt2"))
    return TinyBase("gpt2", path, torch.float32, _hf_loader(AutoModelForCausalLM))


@pytest.fixture(scope="session")
def gpt2_bf16(tmp_path_factory: pytest.TempPathFactory) -> TinyBase:
    """The GPT-2 above in bfloat16."""
    model = _seeded(2, lambda: GPT2LMHeadModel(GPT2Config(**TINY_GPT2))).to(torch.bfloat16)
    path = _save_hf(model, tmp_path_factory.mktemp("gpt2_bf16"))
    return TinyBase("gpt2_bf16", path, torch.bfloat16, _hf_loader(AutoModelForCausalLM))


@pytest.fixture(scope="session")
def llama_seq_cls(tmp_path_factory: pytest.TempPathFactory) -> TinyBase:
    """LlamaForSequenceClassification, 3 labels, with attention and MLP biases, float32."""
    cfg = LlamaConfig(**TINY_LLAMA, num_labels=3, attention_bias=True, mlp_bias=True)

    def build() -> nn.Module:
        model = LlamaForSequenceClassification(cfg)
        # transformers initialises biases to zero; random ones make "replaced" visible.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(".bias"):
                    param.normal_(0.0, 0.02)
        return model

    path = _save_hf(_seeded(3, build), tmp_path_factory.mktemp("llama_seq_cls"))
    return TinyBase(
        "llama_seq_cls", path, torch.float32, _hf_loader(AutoModelForSequenceClassification)
    )


class ConvNet(nn.Module):
    """A non-transformers module PEFT can still wrap: Conv2d 3x3, Conv2d 1x1 and a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, kernel_size=3, padding=1)
        self.pointwise = nn.Conv2d(6, 4, kernel_size=1)
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pointwise(torch.relu(self.conv(x)))
        return self.head(x.mean(dim=(2, 3)))


def _load_conv_net(path: Path, dtype: torch.dtype) -> nn.Module:
    model = ConvNet()
    model.load_state_dict(load_file(path))
    return model.to(dtype)


def _save_conv_net(path: Path, dtype: torch.dtype) -> TinyBase:
    model = _seeded(4, ConvNet).to(dtype)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, path, metadata={"format": "pt"})
    return TinyBase(path.stem, path, dtype, _load_conv_net)


@pytest.fixture(scope="session")
def conv_net(tmp_path_factory: pytest.TempPathFactory) -> TinyBase:
    """``ConvNet`` saved as ONE safetensors file (a single-file base), float32."""
    return _save_conv_net(
        tmp_path_factory.mktemp("conv_net") / "conv_net.safetensors", torch.float32
    )


@pytest.fixture(scope="session")
def conv_net_bf16(tmp_path_factory: pytest.TempPathFactory) -> TinyBase:
    """``ConvNet`` as one bfloat16 safetensors file."""
    path = tmp_path_factory.mktemp("conv_net_bf16") / "conv_net_bf16.safetensors"
    return _save_conv_net(path, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Adapters

ModelSource = TinyBase | nn.Module | Callable[[], nn.Module]

# Std of the noise added to trained tensors. lora_A starts kaiming-uniform (|a| <= 1/sqrt(in))
# and lora_B at zero, so with B ~ N(0, 0.05) a rank-8 delta is comparable to the base weights
# (std 0.02): large enough that bf16 outputs differ from the base by many ulps.
TRAINED_NOISE_STD = 0.05


def _fresh_model(source: ModelSource) -> nn.Module:
    if isinstance(source, TinyBase):
        return source.load()
    if isinstance(source, nn.Module):
        return copy.deepcopy(source)
    return source()


def _randomize_trained(peft_model: nn.Module, seed: int) -> None:
    """Give every trained tensor seeded random values, as if training had moved it.

    lora_A/B, lora_embedding_A/B, lora_B bias, modules_to_save copies, trainable token rows and
    trained biases get N(0, TRAINED_NOISE_STD) noise added (PEFT starts lora_B and
    lora_embedding_A at zero); DoRA magnitudes are scaled by U(0.5, 1.5) to stay positive.
    """
    gen = torch.Generator().manual_seed(seed)
    trained = sorted((n, p) for n, p in peft_model.named_parameters() if p.requires_grad)
    assert trained, "the PEFT model has no trained parameters"
    with torch.no_grad():
        for name, param in trained:
            before = param.detach().clone()
            if "lora_magnitude_vector" in name:
                factor = 0.5 + torch.rand(param.shape, generator=gen)
                param.mul_(factor.to(param.dtype))
            else:
                noise = torch.randn(param.shape, generator=gen) * TRAINED_NOISE_STD
                param.add_(noise.to(param.dtype))
            assert not torch.equal(before, param), f"{name}: randomisation left it unchanged"


def _assert_adapter_changes_base(peft_model: PeftModel, base: nn.Module) -> None:
    """Every LoRA-wrapped module's weight must change when PEFT merges the adapter."""
    merged = copy.deepcopy(peft_model).merge_and_unload()
    merged_sd, base_sd = merged.state_dict(), base.state_dict()
    prefix = "base_model.model."
    targets = [
        name.removeprefix(prefix)
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer) and name.startswith(prefix)
    ]
    assert targets, "the adapter wraps no module"
    for module in targets:
        # nn.MultiheadAttention keeps q/k/v in in_proj_weight and wraps out_proj in base_layer;
        # target_parameters wrappers (nested by base_layer) change the module's own parameters
        module = module.replace(".base_layer", "")
        keys = [k for k in (f"{module}.weight", f"{module}.in_proj_weight") if k in base_sd][:1]
        keys = keys or [k for k in base_sd if k.rpartition(".")[0] == module]
        assert keys, f"{module}: no parameter in the base state dict"
        assert any(not torch.equal(merged_sd[k], base_sd[k]) for k in keys), (
            f"{keys}: merging the adapter leaves them unchanged (zero delta)"
        )


def make_adapter(
    source: ModelSource, lora_config: LoraConfig, path: Path, seed: int, *, check_merge: bool = True
) -> Path:
    """Train-free PEFT adapter: wrap a fresh base, randomise what training changes, save.

    Args:
        source: a ``TinyBase`` (a fresh model is loaded from its checkpoint), a model (deep-copied)
            or a zero-argument factory.
        lora_config: the ``LoraConfig``; it is deep-copied, so one config can serve several
            adapters.
        path: the adapter directory to write (``adapter_config.json`` +
            ``adapter_model.safetensors``).
        seed: seeds the random trained values.
        check_merge: assert that PEFT's merge changes every wrapped module (off for adapters
            PEFT cannot merge, such as LoRA on grouped convolutions).

    Returns:
        ``path``.
    """
    base = _fresh_model(source)
    pristine = copy.deepcopy(base)  # get_peft_model wraps `base` in place
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tied-weights and fan_in_fan_out notices
        peft_model = get_peft_model(base, copy.deepcopy(lora_config))
        _randomize_trained(peft_model, seed)
        if check_merge:
            _assert_adapter_changes_base(peft_model, pristine)
        peft_model.save_pretrained(path)
    return path


def edit_adapter_config(adapter: Path, **changes: object) -> Path:
    """Overwrite fields of an adapter's ``adapter_config.json`` (to fake what PEFT would write)."""
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(changes)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    return adapter


# ---------------------------------------------------------------------------------------------
# The PEFT oracle


def _load_peft(
    source: ModelSource, adapters: Sequence[Path], dtype: torch.dtype | None
) -> tuple[PeftModel, list[str]]:
    model = source.load(dtype) if isinstance(source, TinyBase) else _fresh_model(source)
    names = [f"adapter{i}" for i in range(len(adapters))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0])
        for name, adapter in zip(names[1:], adapters[1:], strict=True):
            peft_model.load_adapter(adapter, adapter_name=name)
    return peft_model, names


def _apply_weights(peft_model: PeftModel, names: Sequence[str], weights: Sequence[float]) -> None:
    """Scale adapter ``names[i]``'s update by ``weights[i]``.

    PEFT's deltas are ``(B @ A) * scaling[name]`` (lora_B bias: ``b_B * scaling[name]``), so
    multiplying the scaling is exactly "the adapter's delta times w".
    """
    assert len(weights) == len(names)
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            for name, weight in zip(names, weights, strict=True):
                if name in module.scaling:
                    module.scaling[name] *= weight


def peft_merge(
    source: ModelSource,
    adapters: Sequence[Path],
    *,
    weights: Sequence[float] | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """PEFT's merged state dict: the oracle for ``lorasurgeon.merge``.

    Loads the base with ``from_pretrained`` in ``dtype`` (default: the stored dtype), loads
    every adapter (``PeftModel.from_pretrained`` then ``load_adapter``), scales each adapter's
    scaling by its weight, and returns ``merge_and_unload(adapter_names=all, in order)``'s
    ``state_dict()``. With tied weights the dict also holds the alias (e.g. ``lm_head.weight``).
    """
    peft_model, names = _load_peft(source, adapters, dtype)
    if weights is not None:
        _apply_weights(peft_model, names, weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's "tied module in the adapter" notice
        merged = peft_model.merge_and_unload(adapter_names=names)
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# Reading checkpoints


def checkpoint_files(location: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (dir with index, dir, or single file)."""
    location = Path(location)
    if location.is_file():
        with safe_open(location, "pt") as f:
            return {name: location for name in f.keys()}
    index = location / INDEX_NAME
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: location / shard for name, shard in weight_map.items()}
    return checkpoint_files(location / SINGLE_NAME)


def load_checkpoint(location: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (all shards via the index), read with safetensors."""
    files = checkpoint_files(location)
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(files.values())):
        with safe_open(shard, "pt") as f:
            for name in f.keys():
                assert name not in tensors, f"{shard}: {name} stored twice"
                tensors[name] = f.get_tensor(name)
    assert set(tensors) == set(files), f"{location}: index and shards disagree"
    return tensors


def read_raw_tensor_bytes(location: Path, name: str) -> tuple[str, list[int], bytes]:
    """(dtype, shape, raw data bytes) of one tensor, straight from the file (no decoding)."""
    shard = checkpoint_files(location)[name]
    with open(shard, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        info = header[name]
        start, end = info["data_offsets"]
        f.seek(8 + header_len + start)
        return info["dtype"], info["shape"], f.read(end - start)


def assert_same_layout(ours: Path, base: Path, *, new_dtype: str | None = None) -> None:
    """Same files (shard names, index, side files; plus the output's lorasurgeon.json), weight
    map, metadata, side-file bytes.

    Args:
        new_dtype: the dtype the merge converted to (``dtype="float32"`` etc.), if any: then the
            index's ``total_size`` may change, and config.json must equal the base's with its
            ``dtype``/``torch_dtype`` set to ``new_dtype`` (so that OUT loads in that dtype).
    """
    ours, base = Path(ours), Path(base)
    base_files = sorted(p.name for p in base.iterdir())
    ours_files = sorted(p.name for p in ours.iterdir() if p.name != "lorasurgeon.json")
    assert (ours / "lorasurgeon.json").is_file(), "no provenance written"
    assert ours_files == base_files, f"files differ: ours {ours_files}, base {base_files}"
    for name in base_files:
        if name.endswith(".safetensors"):
            with safe_open(base / name, "pt") as fb, safe_open(ours / name, "pt") as fo:
                assert sorted(fo.keys()) == sorted(fb.keys()), f"{name}: tensor names differ"
                assert fo.metadata() == fb.metadata(), f"{name}: safetensors metadata differs"
        elif name == INDEX_NAME:
            index_b = json.loads((base / name).read_text())
            index_o = json.loads((ours / name).read_text())
            assert index_o["weight_map"] == index_b["weight_map"], "index weight_map differs"
            if new_dtype is None:
                assert index_o.get("metadata") == index_b.get("metadata"), "index metadata differs"
        elif name == "config.json" and new_dtype is not None:
            config_b = json.loads((base / name).read_text())
            config_o = json.loads((ours / name).read_text())
            expected = {
                k: (new_dtype if k in ("dtype", "torch_dtype") else v) for k, v in config_b.items()
            }
            assert config_o == expected, f"config.json: expected the base's with dtype {new_dtype}"
        else:
            assert (ours / name).read_bytes() == (base / name).read_bytes(), f"{name} not copied"


# ---------------------------------------------------------------------------------------------
# The comparison


@dataclass(frozen=True)
class DtypeRule:
    """What dtype our output has and how many roundings PEFT does per changed tensor.

    Attributes:
        out_dtype: dtype of every output tensor; None = each keeps the base checkpoint's dtype.
        roundings: roundings PEFT does on a changed half-precision tensor (peft-lora.md 5.4):
            1 for Linear/Conv1D/Conv/DoRA, 2 for Embedding, k for k adapters on one tensor,
            2 when PEFT loads a float32 base in half precision before merging.
        roundings_for: (regex searched in the tensor name, roundings) overrides, first hit wins,
            e.g. ``((r"embed_tokens", 2),)`` for an embedding LoRA.
    """

    out_dtype: torch.dtype | None = None
    roundings: int = 1
    roundings_for: tuple[tuple[str, int], ...] = ()

    def roundings_of(self, name: str) -> int:
        for pattern, count in self.roundings_for:
            if re.search(pattern, name):
                return count
        return self.roundings

    @property
    def needs_exact(self) -> bool:
        """Whether some tensor is rounded more than once by PEFT (see ``assert_matches_peft``)."""
        return self.roundings > 1 or any(count > 1 for _, count in self.roundings_for)


SAME_DTYPE = DtypeRule()


@dataclass(frozen=True)
class TensorError:
    """How far one output tensor is from its reference, and whether that is within tolerance."""

    name: str
    dtype: torch.dtype
    reference: str
    max_abs: float
    rel: float
    ulps: int | None
    tolerance: str
    ok: bool

    def describe(self) -> str:
        ulps = "" if self.ulps is None else f", {self.ulps} ulp"
        return (
            f"{self.name} ({self.dtype}) vs {self.reference}: max abs err {self.max_abs:.3e}, "
            f"rel err {self.rel:.3e}{ulps}; tolerance {self.tolerance}"
        )


@dataclass(frozen=True)
class MatchReport:
    """What ``assert_matches_peft`` saw: the tensors PEFT changed and every measured error."""

    changed: frozenset[str]
    unchanged: frozenset[str]
    errors: tuple[TensorError, ...]


def _ordered_int(t: torch.Tensor) -> torch.Tensor:
    """Map floats to integers whose difference counts ulps (sign-magnitude -> two's complement)."""
    int_dtype = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    bits = t.contiguous().view(int_dtype).to(torch.int64)
    magnitude = bits & ((1 << (8 * t.element_size() - 1)) - 1)
    return torch.where(bits < 0, -magnitude, magnitude)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise number of representable values between ``a`` and ``b`` (same dtype)."""
    assert a.dtype == b.dtype
    return (_ordered_int(a) - _ordered_int(b)).abs()


def ulp_of(t: torch.Tensor) -> torch.Tensor:
    """Elementwise spacing of ``t``'s dtype grid at |t| (distance to the next larger magnitude)."""
    mag = t.abs()
    up = torch.nextafter(mag, torch.full_like(mag, math.inf))
    return up.float() - mag.float()


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(
            a.contiguous().reshape(-1).view(torch.uint8),
            b.contiguous().reshape(-1).view(torch.uint8),
        )
    )


def _abs_rel(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    if not ours.numel():
        return 0.0, 0.0
    max_abs = (ours.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    return max_abs, (max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf))


def _bit_identity_error(name: str, ours: torch.Tensor, base: torch.Tensor) -> TensorError:
    max_abs, rel = _abs_rel(ours, base)
    same = _same_bits(ours, base)
    return TensorError(name, ours.dtype, "base", max_abs, rel, None, "bit-identical", same)


def _close_error(name: str, ours: torch.Tensor, ref: torch.Tensor, reference: str) -> TensorError:
    """float32: FP32_REL_TOL relative; half: HALF_ULPS_SINGLE_ROUNDING; others: exact."""
    max_abs, rel = _abs_rel(ours, ref)
    if ours.dtype in (torch.float16, torch.bfloat16):
        ulps = int(ulp_distance(ours, ref).max().item()) if ours.numel() else 0
        allowed = HALF_ULPS_SINGLE_ROUNDING
        return TensorError(
            name, ours.dtype, reference, max_abs, rel, ulps, f"{allowed} ulp", ulps <= allowed
        )
    if ours.dtype in (torch.float32, torch.float64):
        return TensorError(
            name,
            ours.dtype,
            reference,
            max_abs,
            rel,
            None,
            f"rel {FP32_REL_TOL:g}",
            rel <= FP32_REL_TOL,
        )
    return TensorError(name, ours.dtype, reference, max_abs, rel, None, "exact", max_abs == 0)


def _closer_than_peft_error(
    name: str, ours: torch.Tensor, peft: torch.Tensor, exact: torch.Tensor
) -> TensorError:
    """|ours - exact| <= |peft - exact| + ulp(ours)/2 elementwise (see HALF_ULPS_... above)."""
    ours_err = (ours.float() - exact).abs()
    peft_err = (peft.float() - exact).abs()
    excess = ours_err - peft_err - ulp_of(ours) / 2
    worst = int(excess.argmax()) if excess.numel() else 0
    ok = bool((excess <= 0).all())
    max_abs, rel = _abs_rel(ours, peft)
    tolerance = "no farther from exact than PEFT + ulp/2"
    if not ok:
        tolerance += (
            f" (element {worst}: ours off by {ours_err.flatten()[worst].item():.3e}, "
            f"PEFT by {peft_err.flatten()[worst].item():.3e})"
        )
    return TensorError(name, ours.dtype, "PEFT", max_abs, rel, None, tolerance, ok)


def _changed_tensor_errors(
    name: str,
    ours: torch.Tensor,
    peft: torch.Tensor,
    exact: torch.Tensor | None,
    roundings: int,
) -> list[TensorError]:
    if ours.dtype not in (torch.float16, torch.bfloat16) or roundings <= 1:
        return [_close_error(name, ours, peft, "PEFT")]
    assert exact is not None, f"{name}: PEFT rounds it {roundings}x; pass exact_state_dict"
    exact = exact.detach().cpu().float()
    return [
        _close_error(name, ours, exact.to(ours.dtype), "rd(PEFT in float32)"),
        _closer_than_peft_error(name, ours, peft, exact),
    ]


def assert_matches_peft(
    ours: Path,
    peft_state_dict: Mapping[str, torch.Tensor],
    base: Path | TinyBase,
    *,
    dtype_rule: DtypeRule = SAME_DTYPE,
    exact_state_dict: Mapping[str, torch.Tensor] | None = None,
) -> MatchReport:
    """Assert that our merged checkpoint equals PEFT's merge of the same base and adapters.

    - Our tensor names are exactly the base checkpoint's stored names (PEFT's aliases of tied
      weights, such as ``lm_head.weight``, are not stored and not compared).
    - Each output tensor has the base's shape and the dtype given by ``dtype_rule``.
    - Tensors PEFT leaves bit-identical to the base (cast to the output dtype) must be
      bit-identical in ours too.
    - Changed float32 tensors: within ``FP32_REL_TOL`` of PEFT (max abs error / max |peft|).
    - Changed half-precision tensors PEFT rounds once: within ``HALF_ULPS_SINGLE_ROUNDING``
      of PEFT.
    - Changed half-precision tensors PEFT rounds more than once (``dtype_rule``): within
      ``HALF_ULPS_SINGLE_ROUNDING`` of ``exact_state_dict`` rounded once (PEFT's merge of the
      same adapters on the base upcast to float32, ``peft_merge(..., dtype=torch.float32)``),
      and elementwise no farther from that exact value than PEFT's own result (+ ulp/2).
    - PEFT must have changed at least one tensor (else the test would be vacuous).

    On failure the message names the worst tensor, its max abs and relative error (and ulps)
    and the tolerance used.

    Returns:
        The changed/unchanged tensor names (for case-specific assertions) and every error.
    """
    base_path = base.path if isinstance(base, TinyBase) else Path(base)
    ours_sd, base_sd = load_checkpoint(Path(ours)), load_checkpoint(base_path)
    missing, extra = sorted(set(base_sd) - set(ours_sd)), sorted(set(ours_sd) - set(base_sd))
    assert not missing and not extra, f"tensor names differ: missing {missing}, extra {extra}"
    not_in_peft = sorted(set(base_sd) - set(peft_state_dict))
    assert not not_in_peft, f"oracle bug: PEFT state dict lacks {not_in_peft}"

    changed, unchanged, errors, layout = set(), set(), [], []
    for name, base_t in sorted(base_sd.items()):
        out_dtype = dtype_rule.out_dtype or base_t.dtype
        ours_t, peft_t = ours_sd[name], peft_state_dict[name].detach().cpu()
        if ours_t.dtype != out_dtype or ours_t.shape != base_t.shape:
            layout.append(
                f"{name}: ours {ours_t.dtype} {tuple(ours_t.shape)}, expected {out_dtype} "
                f"{tuple(base_t.shape)}"
            )
            continue
        assert peft_t.dtype == out_dtype, f"oracle bug: PEFT {name} is {peft_t.dtype}"
        expected_base = base_t.to(out_dtype)
        if _same_bits(peft_t, expected_base):
            unchanged.add(name)
            errors.append(_bit_identity_error(name, ours_t, expected_base))
            continue
        changed.add(name)
        exact = exact_state_dict[name] if exact_state_dict is not None else None
        errors.extend(
            _changed_tensor_errors(name, ours_t, peft_t, exact, dtype_rule.roundings_of(name))
        )

    assert not layout, "dtype/shape differ from the base:\n" + "\n".join(layout)
    failed = [e for e in errors if not e.ok]
    if failed:
        worst = max(failed, key=lambda e: (e.ulps or 0, e.rel))
        listing = "\n  ".join(e.describe() for e in failed)
        raise AssertionError(
            f"{len(failed)} check(s) failed; worst: {worst.describe()}\n  {listing}"
        )
    assert changed, "PEFT's merge changed no tensor: the adapters have a zero delta"
    return MatchReport(frozenset(changed), frozenset(unchanged), tuple(errors))

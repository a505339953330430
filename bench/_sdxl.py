"""Synthetic SDXL-shaped checkpoints for ``bench/diffusion.py``.

* the base: one fp16 single file in the SGM layout (``model.diffusion_model.``,
  ``conditioner.embedders.0.transformer.`` CLIP-L, ``conditioner.embedders.1.model.`` OpenCLIP
  bigG with fused ``in_proj``, ``first_stage_model.`` VAE), with the real SDXL shapes (3.47e9
  parameters, 6.9 GB) or tiny ones; the structure comes from diffusers/transformers configs
  instantiated on the meta device and renamed with the test suite's tables
  (``tests/sd_models.py``), the values from a small pool of seeded random numbers, written
  tensor by tensor (bounded memory);
* the same weights as a diffusers pipeline folder (configs written from the same config
  objects, tokenizers left out), converted once from the single file;
* a kohya LoRA (sd-scripts' names: every attention, feed-forward and LoCon conv module plus
  both text encoders, fp16, one alpha);
* a "tuned" single file: the base plus a planted low-rank change with noise on every module
  the LoRA targets (``_common.planted_update``).

Not part of the package; imported by the scripts next to it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from _common import MIB, REPO_ROOT, TuneSpec, planted_update

GENERATION_FORMAT = 1  # bump when the files below change
POOL_ELEMENTS = 1 << 24  # 32 MB of fp16 random numbers, reused cyclically


# --------------------------------------------------------------------------
# Shapes: configs on the meta device
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class SdxlSpec:
    """One model size: diffusers/transformers config arguments per component."""

    name: str
    unet: dict
    te1: dict
    te2: dict
    vae: dict
    rank: int = 32
    alpha: float = 16.0


# stabilityai/stable-diffusion-xl-base-1.0's configs (the values that differ from the
# classes' defaults), written here: nothing is downloaded.
_SDXL_UNET = dict(
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280],
    cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    projection_class_embeddings_input_dim=2816,
    sample_size=128,
    transformer_layers_per_block=[1, 2, 10],
    use_linear_projection=True,
)
_SDXL_VAE = dict(
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    latent_channels=4,
    layers_per_block=2,
    sample_size=1024,
    scaling_factor=0.13025,
)
_CLIP_COMMON = dict(vocab_size=49408, max_position_embeddings=77)

SPECS = {
    "sdxl": SdxlSpec(
        "sdxl",
        unet=_SDXL_UNET,
        te1=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            projection_dim=768,
            hidden_act="quick_gelu",
            **_CLIP_COMMON,
        ),
        te2=dict(
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=20,
            projection_dim=1280,
            hidden_act="gelu",
            **_CLIP_COMMON,
        ),
        vae=_SDXL_VAE,
    ),
    # The SDXL structure at test-suite widths: a smoke test of the whole bench in seconds.
    "tiny": SdxlSpec(
        "tiny",
        unet=dict(
            _SDXL_UNET,
            attention_head_dim=8,
            block_out_channels=[32, 64, 64],
            cross_attention_dim=64,
            transformer_layers_per_block=[1, 2, 2],
            addition_time_embed_dim=8,
            addition_embed_type_num_heads=2,
            projection_class_embeddings_input_dim=80,
            sample_size=8,
        ),
        te1=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=3,
            num_attention_heads=4,
            projection_dim=32,
            hidden_act="quick_gelu",
            vocab_size=99,
        ),
        te2=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=3,
            num_attention_heads=4,
            projection_dim=32,
            hidden_act="gelu",
            vocab_size=99,
        ),
        vae=dict(
            _SDXL_VAE,
            block_out_channels=[32],
            down_block_types=["DownEncoderBlock2D"],
            up_block_types=["UpDecoderBlock2D"],
        ),
        rank=4,
        alpha=2.0,
    ),
}


def _tests_sd_models():
    """The test suite's SD helpers (name tables, kohya module walk): one copy of each."""
    import sys

    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from tests import sd_models

    return sd_models


def meta_model(spec: SdxlSpec):
    """The model's modules on the meta device (shapes only), as the tests' ``TinySD``."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    sd = _tests_sd_models()
    with torch.device("meta"):
        unet = UNet2DConditionModel(**spec.unet)
        te1 = CLIPTextModel(CLIPTextConfig(**spec.te1))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**spec.te2))
        vae = AutoencoderKL(**spec.vae)
    return sd.TinySD("sdxl", unet, [te1, te2], vae)


@dataclass(frozen=True)
class Source:
    """Where a diffusers-folder tensor lives in the single file: rows of it, maybe transposed."""

    tensor: str
    rows: tuple[int, int] | None = None
    transposed: bool = False


_OPENCLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
}
_OPENCLIP_GLOBAL = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}


def _openclip_source(key: str, hidden: int, prefix: str) -> Source:
    """A transformers CLIP key (with ``text_model.``) in the OpenCLIP single-file layout: the
    inverse of ``tests.sd_models.open_clip``."""
    if key == "text_projection.weight":
        return Source(prefix + "text_projection", transposed=True)
    if key in _OPENCLIP_GLOBAL:
        return Source(prefix + _OPENCLIP_GLOBAL[key])
    layer, rest = key.removeprefix("text_model.encoder.layers.").split(".", 1)
    block = f"{prefix}transformer.resblocks.{layer}."
    module, kind = rest.rsplit(".", 1)
    for i, part in enumerate(("q", "k", "v")):
        if module == f"self_attn.{part}_proj":
            return Source(f"{block}attn.in_proj_{kind}", rows=(i * hidden, (i + 1) * hidden))
    return Source(f"{block}{_OPENCLIP_LAYER[module]}.{kind}")


UNET_PREFIX = "model.diffusion_model."
TE1_PREFIX = "conditioner.embedders.0.transformer."
TE2_PREFIX = "conditioner.embedders.1.model."
VAE_PREFIX = "first_stage_model."


def folder_sources(model) -> dict[str, dict[str, Source]]:
    """Every tensor of the diffusers folder, per component, with its place in the single file.

    The VAE keeps its diffusers names under ``first_stage_model.`` (as the tests' LDM files
    do): merge copies it byte for byte either way.
    """
    sd = _tests_sd_models()
    names = sd.ldm_names(list(unet_shapes(model)))
    unet = {n: Source(UNET_PREFIX + ldm) for n, ldm in names.items()}
    te1 = {k: Source(TE1_PREFIX + k) for k in model.text_state(0)}
    hidden = model.text_encoders[1].config.hidden_size
    te2 = {k: _openclip_source(k, hidden, TE2_PREFIX) for k in model.text_state(1)}
    vae = {k: Source(VAE_PREFIX + k) for k in model.vae.state_dict()}
    return {"unet": unet, "text_encoder": te1, "text_encoder_2": te2, "vae": vae}


def single_file_shapes(model) -> dict[str, tuple[int, ...]]:
    """The single file's tensors (name -> shape), from the tests' LDM conversion on meta."""
    sd = _tests_sd_models()
    return {k: tuple(v.shape) for k, v in sd.ldm_state(model).items()}


@dataclass(frozen=True)
class Target:
    """A LoRA module's weight in the single file: the tensor, maybe a row slice of it."""

    tensor: str
    rows: tuple[int, int] | None
    shape: tuple[int, ...]  # the module's weight shape (the slice's, for a slice)


def module_targets(model) -> dict[str, Target]:
    """kohya name -> target, under every spelling a LoRA may use (LDM and diffusers UNet
    names): the map from LoRA modules to single-file tensors."""
    sources = folder_sources(model)
    roots = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    states = {
        "unet": unet_shapes(model),
        "text_encoder": text_shapes(model, 0),
        "text_encoder_2": text_shapes(model, 1),
    }
    targets: dict[str, Target] = {}
    for component, prefix in roots.items():
        for name, shape in states[component].items():
            if not name.endswith(".weight") or len(shape) < 2:
                continue
            src = sources[component][name]
            target = Target(src.tensor, src.rows, shape)
            targets[prefix + name.removesuffix(".weight").replace(".", "_")] = target
            if component == "unet":
                ldm = src.tensor.removeprefix(UNET_PREFIX).removesuffix(".weight")
                targets[prefix + ldm.replace(".", "_")] = target
    return targets


def lora_modules(model) -> dict[str, Target]:
    """The LoRA's modules (sd-scripts' walk with LoCon convs, ``tests.sd_models``) -> target."""
    sd = _tests_sd_models()
    table = module_targets(model)
    return {name: table[name] for name in sd.sd_kohya_modules(model)}


def unet_shapes(model) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.unet.state_dict().items()}


def text_shapes(model, i: int) -> dict[str, tuple[int, ...]]:
    """The i-th text encoder's shapes under the ``text_model.`` names checkpoints use."""
    return {k: tuple(v.shape) for k, v in model.text_state(i).items()}


# --------------------------------------------------------------------------
# Streaming safetensors writing
# --------------------------------------------------------------------------

_DTYPES = {"F16": 2, "F32": 4, "BF16": 2}


def write_safetensors(
    path: Path,
    entries: Iterable[tuple[str, str, tuple[int, ...]]],
    data: Callable[[str], Iterator[memoryview | bytes]],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write a safetensors file tensor by tensor: the header from (name, dtype, shape), then
    each tensor's bytes from ``data(name)`` (chunks). Returns the file size."""
    entries = list(entries)
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, dtype, shape in entries:
        size = math.prod(shape) * _DTYPES[dtype]
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dtype, shape in entries:
            expected = math.prod(shape) * _DTYPES[dtype]
            written = 0
            for chunk in data(name):
                written += len(chunk)
                f.write(chunk)
            if written != expected:
                raise ValueError(f"{path}: {name}: wrote {written} bytes, expected {expected}")
    return path.stat().st_size


class Pool:
    """Seeded fp16 numbers, N(0, 0.02), reused cyclically from a per-name offset: random-looking
    tensors at disk speed."""

    def __init__(self, seed: int) -> None:
        import torch

        gen = torch.Generator().manual_seed(seed)
        values = torch.randn(POOL_ELEMENTS, generator=gen).mul_(0.02).half()
        self.bytes = memoryview(values.numpy().tobytes())

    def chunks(self, name: str, nbytes: int) -> Iterator[memoryview]:
        size = len(self.bytes)
        pos = (zlib.crc32(name.encode()) * 2) % size
        while nbytes > 0:
            take = min(nbytes, size - pos)
            yield self.bytes[pos : pos + take]
            nbytes -= take
            pos = 0


# --------------------------------------------------------------------------
# The four inputs
# --------------------------------------------------------------------------


def write_base(path: Path, shapes: dict[str, tuple[int, ...]], seed: int) -> None:
    pool = Pool(seed)
    entries = [(name, "F16", shape) for name, shape in shapes.items()]
    write_safetensors(path, entries, lambda n: pool.chunks(n, math.prod(shapes[n]) * 2))


def _tensor_bytes(t) -> memoryview:
    return memoryview(t.contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy())


def write_folder(folder: Path, base: Path, model, spec: SdxlSpec) -> None:
    """The base's weights as a diffusers StableDiffusionXLPipeline folder (fp16 files)."""
    from diffusers import EulerDiscreteScheduler
    from safetensors import safe_open

    files = {
        "unet": "diffusion_pytorch_model.safetensors",
        "text_encoder": "model.safetensors",
        "text_encoder_2": "model.safetensors",
        "vae": "diffusion_pytorch_model.safetensors",
    }
    sources = folder_sources(model)
    with safe_open(str(base), framework="pt") as f:

        def data(component: str, name: str) -> Iterator[memoryview]:
            src = sources[component][name]
            if src.rows is None and not src.transposed:
                yield _tensor_bytes(f.get_tensor(src.tensor))
                return
            t = (
                f.get_slice(src.tensor)[src.rows[0] : src.rows[1]]
                if src.rows
                else f.get_tensor(src.tensor)
            )
            yield _tensor_bytes(t.t() if src.transposed else t)

        for component, fname in files.items():
            shapes = (
                unet_shapes(model)
                if component == "unet"
                else text_shapes(model, 0)
                if component == "text_encoder"
                else text_shapes(model, 1)
                if component == "text_encoder_2"
                else {k: tuple(v.shape) for k, v in model.vae.state_dict().items()}
            )
            entries = [(n, "F16", s) for n, s in shapes.items()]
            write_safetensors(
                folder / component / fname, entries, lambda n, c=component: data(c, n)
            )
    model.unet.save_config(folder / "unet")
    model.vae.save_config(folder / "vae")
    model.text_encoders[0].config.save_pretrained(folder / "text_encoder")
    model.text_encoders[1].config.save_pretrained(folder / "text_encoder_2")
    EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    ).save_config(folder / "scheduler")
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": [None, None],
        "tokenizer_2": [None, None],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_lora(path: Path, modules: dict[str, Target], spec: SdxlSpec, seed: int) -> None:
    """A kohya LoRA/LoCon file: down like PEFT's kaiming init, up small and non-zero, fp16."""
    import torch

    entries: list[tuple[str, str, tuple[int, ...]]] = []
    for name, target in modules.items():
        out, rest = target.shape[0], target.shape[1:]
        down = (spec.rank, *rest)
        up = (out, spec.rank, 1, 1) if len(rest) == 3 else (out, spec.rank)
        entries += [
            (f"{name}.alpha", "F16", ()),
            (f"{name}.lora_down.weight", "F16", down),
            (f"{name}.lora_up.weight", "F16", up),
        ]

    def data(key: str) -> Iterator[memoryview]:
        name, part = key.split(".", 1)
        if part == "alpha":
            yield _tensor_bytes(torch.tensor(spec.alpha, dtype=torch.float16))
            return
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
        shape = shapes[key]
        t = torch.rand(shape, generator=gen).mul_(2).sub_(1)
        fan_in = math.prod(shape[1:])
        t = t.mul_(fan_in**-0.5) if part.startswith("lora_down") else t.mul_(0.01)
        yield _tensor_bytes(t.half())

    shapes = {n: s for n, _, s in entries}
    conv = {"conv_dim": str(spec.rank), "conv_alpha": str(spec.alpha)}
    metadata = {
        "format": "pt",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(spec.rank),
        "ss_network_alpha": str(spec.alpha),
        "ss_network_args": json.dumps(conv),
        "ss_base_model_version": "sdxl_base_v1-0",
    }
    write_safetensors(path, entries, data, metadata)


def planted(target: Target, name: str, tune: TuneSpec, seed: int):
    """The module's float32 planted update, (rows, in·kh·kw)."""
    shape = target.shape
    return planted_update(name, (shape[0], math.prod(shape[1:])), tune, seed)


def write_tuned(
    path: Path, base: Path, modules: dict[str, Target], tune: TuneSpec, seed: int
) -> None:
    """The base with each module's planted update added (float32, rounded once to fp16)."""
    from safetensors import safe_open

    by_tensor: dict[str, list[tuple[str, Target]]] = {}
    for name, target in modules.items():
        by_tensor.setdefault(target.tensor, []).append((name, target))
    with safe_open(str(base), framework="pt") as f:
        entries = []
        for key in f.keys():
            sl = f.get_slice(key)
            entries.append((key, sl.get_dtype(), tuple(sl.get_shape())))

        def data(key: str) -> Iterator[memoryview]:
            t = f.get_tensor(key)
            if key not in by_tensor:
                yield _tensor_bytes(t)
                return
            w = t.float().reshape(t.shape[0], -1)
            for name, target in by_tensor[key]:
                lo, hi = target.rows or (0, t.shape[0])
                w[lo:hi] += planted(target, name, tune, seed)
            yield _tensor_bytes(w.reshape(t.shape).half())

        write_safetensors(path, entries, data)


# --------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------

# The planted change: rank 8-32 with decaying singular values plus noise holding 10% of its
# energy, rms 3e-3 (15% of the weights' 0.02), so that every text-encoder module changes by more
# than 0.01 somewhere (sd-scripts treats a smaller change as none).
TUNE = TuneSpec(delta_rms=3e-3, norm_tensor="")


@dataclass(frozen=True)
class Inputs:
    spec: SdxlSpec
    base: Path
    folder: Path
    lora: Path
    tuned: Path
    modules: dict[str, Target]
    targets: dict[str, Target]
    generated_s: dict[str, float]


def _marker_ok(marker: Path, wanted: dict) -> bool:
    try:
        return json.loads(marker.read_text()) == wanted
    except (OSError, ValueError):
        return False


def ensure_inputs(spec: SdxlSpec, workdir: Path, *, tuned: bool, seed: int = 0) -> Inputs:
    """Generate what is missing (each input cached with a marker of its parameters)."""
    model = meta_model(spec)
    modules = lora_modules(model)
    root = workdir / spec.name
    root.mkdir(parents=True, exist_ok=True)
    base, folder = root / "base.safetensors", root / "diffusers"
    lora, tuned_path = root / f"lora-kohya-r{spec.rank}.safetensors", root / "tuned.safetensors"
    identity = {"spec": asdict(spec), "seed": seed, "format": GENERATION_FORMAT}
    steps: list[tuple[str, Path, Callable[[], None], dict]] = [
        ("base", base, lambda: write_base(base, single_file_shapes(model), seed), identity),
        ("diffusers folder", folder, lambda: write_folder(folder, base, model, spec), identity),
        ("lora", lora, lambda: write_lora(lora, modules, spec, seed + 1), identity),
    ]
    if tuned:
        tune = json.loads(json.dumps(asdict(TUNE)))
        steps.append(
            (
                "tuned",
                tuned_path,
                lambda: write_tuned(tuned_path, base, modules, TUNE, seed),
                identity | {"tune": tune},
            )
        )
    generated: dict[str, float] = {}
    for label, path, make, wanted in steps:
        marker = path.with_name(f".{path.name}.complete")
        if marker.exists() and path.exists() and _marker_ok(marker, wanted):
            continue
        marker.unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        start = time.perf_counter()
        print(f"   generating {label} at {path} ...", flush=True)
        make()
        os.sync()
        generated[label] = time.perf_counter() - start
        marker.write_text(json.dumps(wanted))
    return Inputs(spec, base, folder, lora, tuned_path, modules, module_targets(model), generated)


def sizes_mb(*paths: Path) -> float:
    total = 0
    for p in paths:
        if p.is_dir():
            total += sum(q.stat().st_size for q in p.rglob("*") if q.is_file())
        elif p.exists():
            total += p.stat().st_size
    return total / MIB

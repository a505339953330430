"""Shared helpers for the benchmarks in ``bench/``.

Three independent pieces live here:

* synthetic checkpoints: a Llama-shaped bf16 base model (sharded safetensors
  plus ``model.safetensors.index.json`` and a transformers-loadable
  ``config.json``) and an r=16 PEFT LoRA adapter on every linear layer, both
  generated from seeded random tensors and cached on disk;
* page-cache control: evict files from the page cache so that a run starts
  cold, or read them once so that it starts warm;
* measurement: run a command as its own process and report its wall time and
  peak resident set size.

This module is not part of the ``lorasurgeon`` package; it is only imported by
the scripts next to it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
GNU_TIME = "/usr/bin/time"
MIB = 1024 * 1024


# --------------------------------------------------------------------------
# Model shapes
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a synthetic Llama-style decoder (untied ``lm_head``)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 32000
    rank: int = 16
    lora_alpha: int = 32

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


SPECS = {
    # TinyLlama-1.1B: 1.10e9 parameters, 2.2 GB in bf16.
    "1b": ModelSpec("1b", hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4),
    # Llama-3.2-3B-like body with a 32k vocabulary: 2.81e9 parameters, 5.6 GB.
    "3b": ModelSpec("3b", hidden=3072, intermediate=8192, layers=26, heads=24, kv_heads=8),
}


# The seven projections a LoRA adapter usually targets, as (module, in, out).
def linear_modules(spec: ModelSpec, layer: int) -> list[tuple[str, int, int]]:
    h, i, kv = spec.hidden, spec.intermediate, spec.kv_dim
    prefix = f"model.layers.{layer}"
    return [
        (f"{prefix}.self_attn.q_proj", h, h),
        (f"{prefix}.self_attn.k_proj", h, kv),
        (f"{prefix}.self_attn.v_proj", h, kv),
        (f"{prefix}.self_attn.o_proj", h, h),
        (f"{prefix}.mlp.gate_proj", h, i),
        (f"{prefix}.mlp.up_proj", h, i),
        (f"{prefix}.mlp.down_proj", i, h),
    ]


TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base_tensor_shapes(spec: ModelSpec) -> list[tuple[str, tuple[int, ...]]]:
    """All base-model tensors in state-dict order, as (name, shape)."""
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("model.embed_tokens.weight", (spec.vocab, spec.hidden))
    ]
    for layer in range(spec.layers):
        for module, fan_in, fan_out in linear_modules(spec, layer):
            shapes.append((f"{module}.weight", (fan_out, fan_in)))
        shapes.append((f"model.layers.{layer}.input_layernorm.weight", (spec.hidden,)))
        shapes.append((f"model.layers.{layer}.post_attention_layernorm.weight", (spec.hidden,)))
    shapes.append(("model.norm.weight", (spec.hidden,)))
    shapes.append(("lm_head.weight", (spec.vocab, spec.hidden)))
    return shapes


def parameter_count(spec: ModelSpec) -> int:
    total = 0
    for _, shape in base_tensor_shapes(spec):
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def llama_config(spec: ModelSpec) -> dict:
    """A ``config.json`` that ``AutoModelForCausalLM`` can instantiate."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.head_dim,
        "vocab_size": spec.vocab,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "use_cache": True,
        "torch_dtype": "bfloat16",
    }


def adapter_config(spec: ModelSpec, base_dir: Path) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_dir),
        "r": spec.rank,
        "lora_alpha": spec.lora_alpha,
        "lora_dropout": 0.0,
        "target_modules": TARGET_MODULES,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
    }


# --------------------------------------------------------------------------
# Synthetic checkpoint generation
# --------------------------------------------------------------------------


def _generator(name: str, seed: int):
    """A torch generator seeded from the tensor name, so data is reproducible."""
    import torch

    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def _random_base_tensor(name: str, shape: tuple[int, ...], seed: int):
    import torch

    gen = _generator(name, seed)
    if len(shape) == 1:  # RMSNorm weights: around 1.
        t = torch.empty(shape, dtype=torch.float32).normal_(1.0, 0.05, generator=gen)
        return t.to(torch.bfloat16)
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=gen)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_base(spec: ModelSpec, out_dir: Path, shard_bytes: int, seed: int) -> None:
    """Write the base checkpoint one shard at a time (peak memory ~2 shards)."""
    from safetensors.torch import save_file

    shapes = base_tensor_shapes(spec)
    # Plan shards first so that file names can carry the shard count.
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = 2
        for d in shape:
            nbytes *= d
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes

    out_dir.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total = 0
    for index, members in enumerate(shards, start=1):
        fname = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: _random_base_tensor(name, shape, seed) for name, shape in members}
        save_file(tensors, str(out_dir / fname), metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
        del tensors
    _write_json(
        out_dir / "model.safetensors.index.json",
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
    )
    _write_json(out_dir / "config.json", llama_config(spec))


def write_adapter(spec: ModelSpec, out_dir: Path, base_dir: Path, dtype: str, seed: int) -> None:
    """Write an r-rank LoRA adapter with non-zero A and B on every projection."""
    import torch
    from safetensors.torch import save_file

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    tensors = {}
    for layer in range(spec.layers):
        for module, fan_in, fan_out in linear_modules(spec, layer):
            key = f"base_model.model.{module}"
            gen = _generator(key, seed + 1)
            # A like PEFT's kaiming-uniform init; B small but non-zero so the
            # merge really changes every targeted weight.
            bound = 1.0 / fan_in**0.5
            a = torch.empty(spec.rank, fan_in).uniform_(-bound, bound, generator=gen)
            b = torch.empty(fan_out, spec.rank).normal_(0.0, 0.01, generator=gen)
            tensors[f"{key}.lora_A.weight"] = a.to(torch_dtype)
            tensors[f"{key}.lora_B.weight"] = b.to(torch_dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    _write_json(out_dir / "adapter_config.json", adapter_config(spec, base_dir))


def ensure_checkpoints(
    spec: ModelSpec, workdir: Path, shard_bytes: int, adapter_dtype: str, seed: int = 0
) -> tuple[Path, Path, float | None]:
    """Return (base_dir, adapter_dir, seconds spent generating or None if cached).

    A ``.complete`` marker holding the generation parameters makes the cache
    safe against interrupted runs and against changed parameters.
    """
    root = workdir / spec.name
    base_dir, adapter_dir = root / "base", root / "adapter"
    marker = root / ".complete"
    wanted = {
        "spec": asdict(spec),
        "shard_bytes": shard_bytes,
        "adapter_dtype": adapter_dtype,
        "seed": seed,
        "format": 1,
    }
    if marker.exists():
        try:
            if json.loads(marker.read_text()) == wanted:
                return base_dir, adapter_dir, None
        except ValueError:
            pass
    for d in (base_dir, adapter_dir):
        shutil.rmtree(d, ignore_errors=True)
    marker.unlink(missing_ok=True)
    start = time.perf_counter()
    write_base(spec, base_dir, shard_bytes, seed)
    write_adapter(spec, adapter_dir, base_dir, adapter_dtype, seed)
    os.sync()
    elapsed = time.perf_counter() - start
    _write_json(marker, wanted)
    return base_dir, adapter_dir, elapsed


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in iter_files(path))


# --------------------------------------------------------------------------
# Page cache control
# --------------------------------------------------------------------------


def iter_files(*paths: Path):
    for path in paths:
        if path.is_file():
            yield path
        elif path.is_dir():
            for p in sorted(path.rglob("*")):
                if p.is_file() and not p.is_symlink():
                    yield p


def evict(*paths: Path) -> None:
    """Drop every file under ``paths`` from the page cache.

    ``fsync`` first: dirty pages cannot be dropped, clean ones can.
    ``POSIX_FADV_DONTNEED`` needs no privileges, unlike ``drop_caches``.
    """
    for p in iter_files(*paths):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(*paths: Path, chunk: int = 16 * MIB) -> None:
    """Read every file under ``paths`` once so it sits in the page cache."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    for p in iter_files(*paths):
        with open(p, "rb", buffering=0) as f:
            while f.readinto(view):
                pass


def remove_output(path: Path) -> None:
    """Evict and delete a previous output (file or directory)."""
    if not path.exists():
        return
    evict(path)
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


# --------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def cpu_busy(window: float = 0.5) -> float | None:
    """Fraction of all CPUs busy during ``window`` seconds (None off Linux).

    Called while this script waits, it measures everyone else's load.
    """
    try:
        busy0, total0 = _cpu_times()
        time.sleep(window)
        busy1, total1 = _cpu_times()
    except (OSError, ValueError, IndexError):
        return None
    return (busy1 - busy0) / max(total1 - total0, 1)


@dataclass
class RunResult:
    wall_s: float
    max_rss_mb: float
    returncode: int
    cpu_s: float | None = None  # user + system time of the command
    stderr_tail: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def _parse_elapsed(text: str) -> float:
    """GNU time's wall clock: ``m:ss.ss`` or ``h:mm:ss``."""
    seconds = 0.0
    for part in text.strip().split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def _parse_gnu_time(report: str) -> dict:
    """The fields we use from ``/usr/bin/time -v``'s report."""
    found: dict = {}
    for line in report.splitlines():
        key, _, value = line.strip().rpartition(": ")
        if key.startswith("Elapsed (wall clock) time"):
            found["wall"] = _parse_elapsed(value)
        elif key == "Maximum resident set size (kbytes)":
            found["rss_kb"] = int(value)
        elif key in ("User time (seconds)", "System time (seconds)"):
            found["cpu"] = found.get("cpu", 0.0) + float(value)
    return found


# Fallback when GNU time is missing. getrusage(RUSAGE_CHILDREN).ru_maxrss is
# the maximum over *all* children ever reaped by the calling process, so taken
# in this script it would never go down from one run to the next. Instead a
# fresh, tiny Python process runs the command and reports its own
# RUSAGE_CHILDREN, which then covers exactly that one command (and anything
# the command itself waited for). ru_maxrss is in KiB on Linux.
_RUSAGE_WRAPPER = r"""
import json, resource, subprocess, sys, time
start = time.perf_counter()
rc = subprocess.call(sys.argv[2:])
wall = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(sys.argv[1], "w") as f:
    json.dump({"wall": wall, "rss_kb": usage.ru_maxrss,
               "cpu": usage.ru_utime + usage.ru_stime}, f)
sys.exit(rc)
"""


def timed_run(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> RunResult:
    """Run ``cmd`` as a child process; return wall time and peak RSS.

    The command's stdout is discarded and its stderr kept (its last lines are
    shown when it fails).
    """
    with tempfile.TemporaryDirectory(prefix="lsbench-") as tmp:
        report = Path(tmp) / "report"
        if os.access(GNU_TIME, os.X_OK):
            wrapped = [GNU_TIME, "-v", "-o", str(report), *cmd]
        else:
            wrapped = [sys.executable, "-c", _RUSAGE_WRAPPER, str(report), *cmd]
        start = time.perf_counter()
        proc = subprocess.run(
            wrapped,
            env=env,
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )
        outer_wall = time.perf_counter() - start
        found: dict = {}
        if report.exists():
            text = report.read_text()
            if wrapped[0] == GNU_TIME:
                found = _parse_gnu_time(text)
            elif text:
                found = json.loads(text)
    # Progress bars and warnings of successful runs are noise; keep failures'.
    tail = "" if proc.returncode == 0 else "\n".join(proc.stderr.strip().splitlines()[-15:])
    return RunResult(
        wall_s=found.get("wall", outer_wall),
        max_rss_mb=found.get("rss_kb", 0) / 1024,
        returncode=proc.returncode,
        cpu_s=found.get("cpu"),
        stderr_tail=tail,
        extra={"outer_wall_s": outer_wall},
    )


def summarize(values: list[float]) -> dict:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def subprocess_env() -> dict:
    """Environment for children: the repo root importable, output unbuffered."""
    env = dict(os.environ)
    parts = [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


_SIZE_RE = re.compile(r"^\s*([\d.]+)\s*([kmgt]?)i?b?\s*$", re.I)


def parse_size(text: str) -> int:
    """'1GB', '500MB', '1e9' -> bytes (decimal units, like transformers)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"cannot parse size {text!r}")
    mult = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


# --------------------------------------------------------------------------
# Synthetic fine-tune of a base checkpoint (bench/extract.py)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TuneSpec:
    """How the synthetic "tuned" checkpoint differs from its base.

    Every linear weight W (the seven projections of every layer) becomes
    ``W + U diag(s) Vᵀ + N``, rounded to bf16: U and V have orthonormal
    columns, the planted rank is drawn per module from min_rank..max_rank, the
    singular values decay geometrically (``s_i ∝ d^i`` with ``d`` drawn from
    ``decay``), and N is Gaussian noise holding ``noise_share`` of the update's
    squared norm (a full-rank floor). The update's elements have an rms of
    ``delta_rms`` (5% of the base weights' 0.02). One norm (``norm_tensor``)
    gets a small change too; everything else is copied unchanged.
    """

    min_rank: int = 8
    max_rank: int = 32
    decay: tuple[float, float] = (0.85, 0.95)
    delta_rms: float = 1e-3
    noise_share: float = 0.1
    norm_tensor: str = "model.layers.0.input_layernorm.weight"
    norm_rms: float = 1e-3


def linear_weight_names(spec: ModelSpec) -> list[str]:
    """The ``.weight`` names of every projection, in layer order."""
    return [
        f"{module}.weight"
        for layer in range(spec.layers)
        for module, _, _ in linear_modules(spec, layer)
    ]


def planted_update(name: str, shape: tuple[int, int], tune: TuneSpec, seed: int):
    """The float32 (out, in) update of one linear weight, seeded from its name."""
    import torch

    gen = _generator(name, seed + 2)
    rows, cols = shape
    rank = int(torch.randint(tune.min_rank, tune.max_rank + 1, (1,), generator=gen))
    lo, hi = tune.decay
    decay = lo + (hi - lo) * float(torch.rand(1, generator=gen))
    u = torch.linalg.qr(torch.randn(rows, rank, generator=gen))[0]
    v = torch.linalg.qr(torch.randn(cols, rank, generator=gen))[0]
    s = decay ** torch.arange(rank, dtype=torch.float64)
    energy = tune.delta_rms**2 * rows * cols  # the whole update's squared norm
    s = (s * ((1 - tune.noise_share) * energy / float(s.square().sum())) ** 0.5).float()
    delta = torch.randn(rows, cols, generator=gen).mul_(tune.delta_rms * tune.noise_share**0.5)
    return delta.addmm_(u * s, v.t())


def write_tuned(spec: ModelSpec, base_dir: Path, out_dir: Path, tune: TuneSpec, seed: int) -> None:
    """Write the tuned checkpoint shard by shard: the base's files, names and index."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    linear = set(linear_weight_names(spec))
    out_dir.mkdir(parents=True, exist_ok=True)
    for src in sorted(base_dir.iterdir()):
        if not src.is_file():
            continue
        if src.suffix != ".safetensors":
            shutil.copyfile(src, out_dir / src.name)
            continue
        tensors = {}
        with safe_open(str(src), framework="pt") as f:
            metadata = f.metadata()
            for name in f.keys():
                t = f.get_tensor(name)
                if name in linear:
                    t = (t.float() + planted_update(name, tuple(t.shape), tune, seed)).to(t.dtype)
                elif name == tune.norm_tensor:
                    gen = _generator(name, seed + 2)
                    noise = torch.randn(t.shape, generator=gen) * tune.norm_rms
                    t = (t.float() + noise).to(t.dtype)
                tensors[name] = t
        save_file(tensors, str(out_dir / src.name), metadata=metadata)
        del tensors


def _base_identity(marker: Path) -> dict | None:
    """What the base's data depends on, from its marker (not the adapter's dtype)."""
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return {k: v for k, v in data.items() if k != "adapter_dtype"}


def ensure_tuned(
    spec: ModelSpec, workdir: Path, base_dir: Path, tune: TuneSpec, seed: int = 0
) -> tuple[Path, float | None]:
    """Return (tuned_dir, seconds spent generating or None if cached).

    The tuned checkpoint sits beside the base (``WORKDIR/SIZE/tuned``); its
    ``.tuned-complete`` marker records the base's marker and the parameters, so
    a regenerated base or changed parameters regenerate it.
    """
    root = workdir / spec.name
    tuned_dir, marker = root / "tuned", root / ".tuned-complete"
    base_marker = root / ".complete"
    wanted = {
        "base": _base_identity(base_marker),
        "tune": asdict(tune),
        "seed": seed,
        "format": 1,
    }
    wanted = json.loads(json.dumps(wanted))  # tuples -> lists, as read back
    if marker.exists():
        try:
            if json.loads(marker.read_text()) == wanted:
                return tuned_dir, None
        except ValueError:
            pass
    shutil.rmtree(tuned_dir, ignore_errors=True)
    marker.unlink(missing_ok=True)
    start = time.perf_counter()
    write_tuned(spec, base_dir, tuned_dir, tune, seed)
    os.sync()
    elapsed = time.perf_counter() - start
    _write_json(marker, wanted)
    return tuned_dir, elapsed


def target_line(label: str, value: float | None, text: str, target: str, ok) -> str:
    """One headline line of a benchmark; ``ok(value)`` decides "met" / "NOT met"."""
    if value is None:
        return f"  {label:34} n/a ({target})"
    return f"  {label:34} {text} ({target})  {'met' if ok(value) else 'NOT met'}"


BUSY_WARNING = 0.15  # warn when other processes kept the CPUs this busy before a run


def ratio(num: float | None, den: float | None) -> float | None:
    """num / den, None when either is missing or zero."""
    return num / den if num and den else None


def stat(summary: dict, key: str, what: str, name: str):
    """summary[key][what][name] of a summarized benchmark, None where missing."""
    return summary.get(key, {}).get(what, {}).get(name)


def print_busy_note(summary: dict) -> None:
    """A note under a table when other processes kept the CPUs busy before some run."""
    busy = [r["extra"].get("busy_before") for e in summary.values() for r in e["runs"]]
    busy = [b for b in busy if b is not None]
    if busy and max(busy) > BUSY_WARNING:
        print(
            f"  note: other processes kept the CPUs up to {max(busy):.0%} busy just before a "
            "run; wall times are noisy (CPU s is less affected)"
        )

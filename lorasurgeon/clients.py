"""Whether the programs that serve adapters apply one as PEFT does: ``client_checks``.

From the config and the tensor headers alone. The rules, read from each client's source:

- PEFT, and transformers' ``load_adapter`` (which is PEFT): the reference. Per module
  ``alpha_m / r_m`` (``alpha_m / sqrt(r_m)`` with rslora), rank_pattern and alpha_pattern
  applied.
- llama.cpp: ``convert_lora_to_gguf.py`` keeps only the config's ``lora_alpha`` (it never
  reads alpha_pattern, rank_pattern or use_rslora) and the runtime scales each module by
  ``lora_alpha / rank``, the rank of that module's tensors. The converter stops on any tensor
  that is not lora_A/lora_B or a norm: DoRA magnitudes, lora_B biases, modules stored whole.
- vLLM: ``PEFTHelper`` applies one factor to every module, ``lora_alpha / r`` with the
  config's ``r`` (``/ sqrt(r)`` with use_rslora), and ignores both patterns; it refuses
  DoRA, ``modules_to_save`` and a ``bias`` other than ``none``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .adapters import Adapter, LoraModule

__all__ = ["ClientCheck", "Verdict", "client_checks"]

#: How a client applies an adapter: as PEFT does, differently (wrong), refuses it, or a
#: feature whose handling lorasurgeon has not verified.
Verdict = str
RIGHT, WRONG, REFUSED, UNKNOWN = "right", "wrong", "refused", "unknown"

_REL_TOL = 1e-6


@dataclass(frozen=True)
class ClientCheck:
    """One client's verdict on an adapter and the reasons for it (empty when ``right``)."""

    client: str
    verdict: Verdict
    reasons: list[str] = field(default_factory=list)


def _names(modules: list[str]) -> str:
    shown = ", ".join(modules[:3])
    return shown + (f" and {len(modules) - 3} more" if len(modules) > 3 else "")


def _misscaled(adapter: Adapter, scaling_of: dict[str, float]) -> list[str]:
    return [m for m, lm in adapter.modules.items()
            if not math.isclose(scaling_of[m], lm.scaling, rel_tol=_REL_TOL)]  # fmt: skip


def _verdict(client: str, refusals: list[str], wrong: list[str], unknown: list[str]) -> ClientCheck:
    if refusals:
        return ClientCheck(client, REFUSED, refusals + wrong + unknown)
    if wrong:
        return ClientCheck(client, WRONG, wrong + unknown)
    return ClientCheck(client, UNKNOWN if unknown else RIGHT, unknown)


def _variants(modules: list[LoraModule]) -> list[str]:
    variants = sorted({m.variant for m in modules if m.variant})
    return [f"LoRA variant {v}: not verified" for v in variants]


def _llama_cpp(adapter: Adapter) -> ClientCheck:
    config, modules = adapter.config, list(adapter.modules.values())
    refusals = []
    if config.use_dora or any(m.magnitude is not None for m in modules):
        refusals.append("DoRA: convert_lora_to_gguf.py stops at lora_magnitude_vector")
    if any(m.lora_b_bias is not None for m in modules):
        refusals.append("lora_bias: convert_lora_to_gguf.py stops at lora_B.bias")
    whole = [n for n in adapter.replacements if "_layernorm" not in n and ".norm" not in f".{n}"]
    whole += list(adapter.token_rows)
    if whole:
        refusals.append(f"tensors stored whole ({_names(whole)}): convert_lora_to_gguf.py "
                        "keeps only norms")  # fmt: skip
    scaling = {m.module: config.lora_alpha / m.rank for m in modules}
    wrong = []
    if config.use_rslora:
        rslora = [m.module for m in modules if m.rank != 1]
        if rslora:
            wrong.append(f"use_rslora: lora_alpha / r applied instead of / sqrt(r) to "
                         f"{len(rslora)} modules")  # fmt: skip
    else:
        patterned = _misscaled(adapter, scaling)
        if patterned:
            wrong.append(f"alpha_pattern: only lora_alpha is read, so {len(patterned)} modules "
                         f"are mis-scaled ({_names(patterned)})")  # fmt: skip
    return _verdict("llama.cpp", refusals, wrong, _variants(modules))


def _vllm(adapter: Adapter) -> ClientCheck:
    config, modules = adapter.config, list(adapter.modules.values())
    refusals = []
    if config.use_dora or any(m.magnitude is not None for m in modules):
        refusals.append("DoRA: PEFTHelper refuses it")
    if config.raw.get("modules_to_save"):
        refusals.append("modules_to_save: PEFTHelper refuses it")
    if str(config.raw.get("bias", "none")) != "none":
        refusals.append(f"bias={config.raw.get('bias')}: vLLM refuses it")
    factor = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
    wrong_modules = _misscaled(adapter, {m.module: factor for m in modules})
    wrong = []
    if wrong_modules:
        cause = [p for p, v in (("rank_pattern", config.rank_pattern),
                                ("alpha_pattern", config.alpha_pattern)) if v]  # fmt: skip
        wrong.append(f"{' and '.join(cause) or 'module ranks'}: one factor lora_alpha / r is "
                     f"applied to every module, so {len(wrong_modules)} modules are mis-scaled "
                     f"({_names(wrong_modules)})")  # fmt: skip
    unknown = _variants(modules)
    if any(m.lora_b_bias is not None for m in modules):
        unknown.append("lora_bias: not verified")
    return _verdict("vLLM", refusals, wrong, unknown)


def client_checks(adapter: Adapter) -> list[ClientCheck]:
    """PEFT (and transformers), llama.cpp and vLLM: does each apply ``adapter`` as PEFT does?

    A ``wrong`` or ``refused`` verdict names the cause; ``lorasurgeon resize ADAPTER -o OUT``
    (with ``--uniform-rank`` for vLLM) writes the same update in a form each applies right,
    except what a client refuses outright (DoRA, modules stored whole).
    """
    return [ClientCheck("PEFT, transformers", RIGHT), _llama_cpp(adapter), _vllm(adapter)]

"""llama.cpp's own converter on our adapters: the GGUF's alpha and tensors give the intended
update per module.

Needs llama.cpp's ``convert_lora_to_gguf.py`` and ``gguf-py``, as shipped in the
``llama-cpp-python`` source distribution (about 77 MB, so never downloaded by the tests):

    pip download --no-deps --no-binary :all: llama-cpp-python -d /tmp/llamacpp
    tar xzf /tmp/llamacpp/llama_cpp_python-*.tar.gz -C /tmp/llamacpp
    LORASURGEON_LLAMA_CPP=/tmp/llamacpp/llama_cpp_python-0.3.36 pytest tests/test_llama_cpp.py

``LORASURGEON_LLAMA_CPP`` is the unpacked sdist or its ``vendor/llama.cpp``; without it these
tests are skipped. The rule-based checks in ``test_serving.py`` need nothing and always run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lorasurgeon
from tests.conftest import FP32_REL_TOL, TINY_LLAMA, TinyBase
from tests.test_combine import WEIGHTS, exact_sum, rel
from tests.test_serving import ALL, Updates, peft_rule

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# llama.cpp's tensor names for Llama's projections: blk.<layer>.<name>.weight.lora_a/b
_GGUF_NAMES = {
    "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
    "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
}  # fmt: skip


def _llama_cpp() -> Path:
    root = os.environ.get("LORASURGEON_LLAMA_CPP")
    if not root:
        pytest.skip("set LORASURGEON_LLAMA_CPP to the unpacked llama-cpp-python sdist")
    for candidate in (Path(root), Path(root) / "vendor" / "llama.cpp"):
        if (candidate / "convert_lora_to_gguf.py").is_file():
            return candidate
    pytest.skip(f"no convert_lora_to_gguf.py under {root}")


def convert(adapter: Path, base: Path, out: Path) -> tuple[float, dict[str, tuple]]:
    """Run llama.cpp's converter (float32 output); the GGUF's alpha and its lora_a/lora_b
    arrays by tensor name."""
    llama_cpp = _llama_cpp()
    env = {**os.environ, "PYTHONPATH": str(llama_cpp / "gguf-py"), "HF_HUB_OFFLINE": "1"}
    subprocess.run(
        [sys.executable, str(llama_cpp / "convert_lora_to_gguf.py"), "--base", str(base),
         "--outtype", "f32", "--outfile", str(out), str(adapter)],
        check=True, env=env, capture_output=True,
    )  # fmt: skip
    sys.path.insert(0, str(llama_cpp / "gguf-py"))
    try:
        import gguf

        reader = gguf.GGUFReader(out)
    finally:
        sys.path.remove(str(llama_cpp / "gguf-py"))
    field = reader.fields["adapter.lora.alpha"]
    alpha = float(field.parts[field.data[0]][0])
    return alpha, {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}


def _rope_rows(update: torch.Tensor, heads: int) -> torch.Tensor:
    """The row order llama.cpp's converter gives Llama's q/k projections (its rotary layout)."""
    out = update.shape[0]
    return update.reshape(heads, 2, out // heads // 2, -1).swapaxes(1, 2).reshape(update.shape)


def gguf_updates(alpha: float, tensors: dict[str, torch.Tensor]) -> Updates:
    """alpha / rank · B @ A per module (llama.cpp's rule), in the HF row order."""
    found = {}
    for name, a in tensors.items():
        if not name.endswith(".lora_a"):
            continue
        _, layer, kind, _, _ = name.split(".")
        b = tensors[name.removesuffix("_a") + "_b"]
        proj = next(p for p, g in _GGUF_NAMES.items() if g == kind)
        group = "self_attn" if kind.startswith("attn") else "mlp"
        update = alpha / a.shape[0] * (b.double() @ a.double())
        if proj in ("q_proj", "k_proj"):  # the converter permutes their rows (B's)
            heads = TINY_LLAMA["num_attention_heads" if proj == "q_proj" else "num_key_value_heads"]
            update = _undo_rope_rows(update, int(heads))  # type: ignore[arg-type]
        found[f"model.layers.{layer}.{group}.{proj}"] = update
    return found


def _undo_rope_rows(update: torch.Tensor, heads: int) -> torch.Tensor:
    out = update.shape[0]
    return update.reshape(heads, out // heads // 2, 2, -1).swapaxes(1, 2).reshape(update.shape)


def check_gguf(base: TinyBase, adapter: Path, intended: Updates, tmp_path: Path) -> None:
    alpha, tensors = convert(adapter, base.path, tmp_path / f"{adapter.name}.gguf")
    got = gguf_updates(alpha, tensors)
    assert got.keys() == intended.keys()
    for module, update in intended.items():
        assert rel(got[module], update) <= FP32_REL_TOL, module


@pytest.fixture(scope="module")
def tuned(llama_fp32: TinyBase, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.test_extract import _make_tuned

    return _make_tuned(llama_fp32, tmp_path_factory.mktemp("gguf_tuned"), noise=0.01)


def test_rope_rows_round_trip() -> None:
    x = torch.arange(32 * 3, dtype=torch.float64).reshape(32, 3)
    assert torch.equal(_undo_rope_rows(_rope_rows(x, 4), 4), x)


@pytest.mark.parametrize(
    "options",
    [
        {"rank": 4},
        {"rank_method": "energy", "energy": 0.5},
        {"rank_method": "budget", "param_budget": 6000},
    ],
)
def test_extract_converts_right(
    llama_fp32: TinyBase, tuned: Path, tmp_path: Path, options: dict
) -> None:
    out = tmp_path / "extract"
    lorasurgeon.extract(llama_fp32.path, tuned, out, svd="exact", dtype="float32", device="cpu",
                        **options)  # fmt: skip
    check_gguf(llama_fp32, out, peft_rule(llama_fp32, out), tmp_path)


@pytest.mark.parametrize("options", [{"method": "cat"}, {"svd": True}, {"svd": True, "rank": 3}])
def test_combine_of_mixed_ranks_converts_right(
    llama_fp32: TinyBase, tmp_path: Path, options: dict
) -> None:
    from tests.conftest import make_adapter
    from tests.test_combine import FIRST, lora

    adapters = [
        make_adapter(llama_fp32, FIRST, tmp_path / "a0", seed=1),
        make_adapter(llama_fp32, lora("q_proj", "k_proj", r=8, lora_alpha=8), tmp_path / "a1",
                     seed=2),
    ]  # fmt: skip
    out = tmp_path / "combined"
    lorasurgeon.combine(adapters, out, weights=WEIGHTS, device="cpu", **options)
    intended = exact_sum(llama_fp32, adapters, WEIGHTS) if "svd" not in options else None
    check_gguf(llama_fp32, out, intended or peft_rule(llama_fp32, out), tmp_path)


def test_resize_normalizes_a_patterned_adapter_for_llama_cpp(
    llama_fp32: TinyBase, tmp_path: Path
) -> None:
    """PEFT's adapter with alpha_pattern converts wrong; resize without a rank, right."""
    from tests.conftest import make_adapter
    from tests.test_combine import lora

    config = lora(*ALL, r=8, lora_alpha=16, rank_pattern={"q_proj": 4},
                  alpha_pattern={"v_proj": 64})  # fmt: skip
    theirs = make_adapter(llama_fp32, config, tmp_path / "theirs", seed=7)
    intended = peft_rule(llama_fp32, theirs)
    alpha, tensors = convert(theirs, llama_fp32.path, tmp_path / "theirs.gguf")
    wrong = {m for m, u in gguf_updates(alpha, tensors).items() if rel(u, intended[m]) > 1e-3}
    assert wrong == {m for m in intended if "v_proj" in m}  # the converter drops alpha_pattern
    lorasurgeon.resize(theirs, tmp_path / "ours", device="cpu")
    check_gguf(llama_fp32, tmp_path / "ours", intended, tmp_path)
    lorasurgeon.resize(theirs, tmp_path / "smaller", rank_method="energy", energy=0.8,
                       device="cpu")  # fmt: skip
    check_gguf(llama_fp32, tmp_path / "smaller", peft_rule(llama_fp32, tmp_path / "smaller"),
               tmp_path)  # fmt: skip

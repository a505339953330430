"""resize and combine of diffusion LoRA files (kohya LoRA/LoCon incl. Tucker, diffusers) on tiny
SD1 and SDXL models: lossless at or above the input rank (same merged weights via our merge),
the best rank-k approximation below it (dense float64 SVD of each update), outputs that diffusers'
load_lora_weights + fuse_lora reproduces, combinations equal to the weighted sum of the merged
updates, formats kept, and bad inputs refused by file and module with nothing written."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lorasurgeon
from lorasurgeon import ops
from lorasurgeon.formats import LoraFormat, read_lora
from tests.sd_models import TinySD, lora_factors, save_ldm, sd_kohya_modules, tiny_sd
from tests.test_merge_diffusion import _run, assert_merged, diffusers_fused_ldm

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

#: The input's per-module alphas cycle through these; module 5 has none (α = r).
ALPHAS = (1.0, 2.0, 3.0, 4.0, 5.0)
NO_ALPHA = 5


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Hundreds of tiny factor products: on shared, loaded cores each BLAS call of a
    multithreaded torch spins for ~10 ms (measured 140x a single thread), so this module runs
    single-threaded and restores the setting after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models() -> dict[str, TinySD]:
    return {family: tiny_sd(family) for family in ("sd1", "sdxl")}


def write_locon(
    model: TinySD, path: Path, *, seed: int, varying: bool = True, every: int = 1
) -> Path:
    """A kohya LoRA/LoCon file over sd-scripts' modules (every ``every``-th): Linear and 1×1
    rank 4, 3×3 LoCon rank 3, alphas varying per module (or 2 everywhere)."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for i, (name, module) in enumerate(list(sd_kohya_modules(model).items())[::every]):
        conv3 = isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1)
        down, up = lora_factors(module, 3 if conv3 else 4, gen)
        state[f"{name}.lora_down.weight"] = down.contiguous()
        state[f"{name}.lora_up.weight"] = up.contiguous()
        if not varying:
            state[f"{name}.alpha"] = torch.tensor(2.0)
        elif i != NO_ALPHA:
            state[f"{name}.alpha"] = torch.tensor(ALPHAS[i % len(ALPHAS)])
    save_file(state, str(path), metadata={"ss_network_module": "networks.lora"})
    return path


def deltas(path: Path) -> dict[str, torch.Tensor]:
    """Each kohya LoRA/LoCon module's update (α/r)·up@down, flattened, float64."""
    state = load_file(str(path))
    out = {}
    for key, down in state.items():
        if not key.endswith(".lora_down.weight"):
            continue
        name = key.split(".")[0]
        up, rank = state[f"{name}.lora_up.weight"], down.shape[0]
        alpha = float(state[f"{name}.alpha"]) if f"{name}.alpha" in state else float(rank)
        out[name] = alpha / rank * (up.double().reshape(up.shape[0], -1)
                                    @ down.double().reshape(rank, -1))  # fmt: skip
    return out


def merged(base: Path, loras: list[Path], out: Path, weights: list[float] | None = None) -> Path:
    lorasurgeon.merge(base, loras, out, weights=weights, device="cpu")
    return out


def assert_same_merge(got: Path, expected: Path, atol: float = 2e-6) -> None:
    a, b = load_file(str(got)), load_file(str(expected))
    assert a.keys() == b.keys()
    worst = max(((a[k].double() - b[k].double()).abs().max().item(), k) for k in a)
    assert worst[0] <= atol, f"worst tensor {worst[1]}: {worst[0]:.3g} > {atol}"


def alphas_of(path: Path) -> set[float]:
    return {float(v) for k, v in load_file(str(path)).items() if k.endswith(".alpha")}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("rank", [4, 8])
def test_resize_at_or_above_the_input_rank_is_lossless(
    models: dict[str, TinySD], tmp_path: Path, family: str, rank: int
) -> None:
    model = models[family]
    base = save_ldm(model, tmp_path / "base.safetensors")
    lora = write_locon(model, tmp_path / "lora.safetensors", seed=1)
    report = lorasurgeon.resize(lora, tmp_path / "r.safetensors", rank=rank, device="cpu")
    out = read_lora(tmp_path / "r.safetensors")
    assert out.format is LoraFormat.KOHYA  # the input's format
    assert len(out.updates) == len(read_lora(lora).updates) == len(report.modules)
    assert alphas_of(tmp_path / "r.safetensors") == {4.0}  # one alpha: the largest rank
    assert {u.rank for u in out.updates} == {3, 4}  # never padded above the input's rank
    assert max(m.rel_error for m in report.modules) < 1e-6
    assert_same_merge(merged(base, [tmp_path / "r.safetensors"], tmp_path / "a.safetensors"),
                      merged(base, [lora], tmp_path / "b.safetensors"))  # fmt: skip


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_lower_rank_is_the_best_approximation_of_each_update(
    models: dict[str, TinySD], tmp_path: Path, family: str
) -> None:
    lora = write_locon(models[family], tmp_path / "lora.safetensors", seed=2)
    report = lorasurgeon.resize(lora, tmp_path / "r.safetensors", rank=2, device="cpu")
    source, ours = deltas(lora), deltas(tmp_path / "r.safetensors")
    reported = {m.module: m for m in report.modules}
    assert ours.keys() == source.keys()
    for name, delta in source.items():
        s = torch.linalg.svdvals(delta)
        best = float(s[2:].square().sum().sqrt() / s.square().sum().sqrt())
        measured = float(torch.linalg.norm(ours[name] - delta) / torch.linalg.norm(delta))
        assert best > 0.05  # a real truncation
        assert measured == pytest.approx(best, rel=1e-4), name
        assert reported[name].rel_error == pytest.approx(measured, rel=1e-4)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_outputs_load_in_diffusers_and_reproduce_the_update(
    models: dict[str, TinySD], tmp_path: Path, family: str
) -> None:
    """diffusers applies the most common alpha to kohya modules whose alpha differs (spec V03b);
    the output has one alpha, so diffusers fuses the input's own update (lossless resize), and
    the update of dynamic ranks (sv_ratio: ranks differ by module)."""
    model = models[family]
    base = save_ldm(model, tmp_path / "base.safetensors")
    lora = write_locon(model, tmp_path / "lora.safetensors", seed=3)
    lorasurgeon.resize(lora, tmp_path / "same.safetensors", device="cpu")  # every rank kept
    merged(base, [lora], tmp_path / "m.safetensors", [0.7])
    expected = diffusers_fused_ldm(model, tmp_path / "same.safetensors", 0.7)
    assert_merged(tmp_path / "m.safetensors", base, expected, atol=1e-5)

    report = lorasurgeon.resize(lora, tmp_path / "dyn.safetensors", rank_method="sv_ratio",
                                sv_ratio=1.5, device="cpu")  # fmt: skip
    assert len({m.rank for m in report.modules}) > 1
    merged(base, [tmp_path / "dyn.safetensors"], tmp_path / "d.safetensors", [0.7])
    expected = diffusers_fused_ldm(model, tmp_path / "dyn.safetensors", 0.7)
    assert_merged(tmp_path / "d.safetensors", base, expected, atol=1e-5)


def tucker_and_loha(path: Path, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """An SD1 file: a LoCon Tucker 3×3 conv, a LoHa attention module and a plain LoRA."""

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.2

    conv, q = "lora_unet_down_blocks_2_resnets_0_conv2", "lora_unet_mid_block_attentions_0_proj_in"
    ff = "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_2"  # (64, 256)
    state = {
        f"{conv}.lora_down.weight": r(3, 64, 1, 1), f"{conv}.lora_mid.weight": r(3, 3, 3, 3),
        f"{conv}.lora_up.weight": r(64, 3, 1, 1), f"{conv}.alpha": torch.tensor(2.0),
        f"{q}.hada_w1_a": r(64, 2), f"{q}.hada_w1_b": r(2, 64), f"{q}.hada_w2_a": r(64, 2),
        f"{q}.hada_w2_b": r(2, 64), f"{q}.alpha": torch.tensor(1.0),
        f"{ff}.lora_down.weight": r(4, 256), f"{ff}.lora_up.weight": r(64, 4),
        f"{ff}.alpha": torch.tensor(3.0),
    }  # fmt: skip
    save_file(state, str(path))
    return state


def test_tucker_locon_is_resized_from_its_exact_product_and_loha_is_refused_or_kept(
    models: dict[str, TinySD], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lora = tmp_path / "lyco.safetensors"
    state = tucker_and_loha(lora, torch.Generator().manual_seed(4))
    code, err = _run(capsys, "resize", lora, "-o", tmp_path / "r.safetensors", "--rank", "3")
    assert code == 1 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert "lyco.safetensors" in err and "lora_unet_mid_block_attentions_0_proj_in" in err, err
    assert "loha" in err and "--keep-lycoris" in err, err
    assert not (tmp_path / "r.safetensors").exists()

    report = lorasurgeon.resize(lora, tmp_path / "r.safetensors", rank=2, keep_lycoris=True,
                                device="cpu")  # fmt: skip
    out = load_file(str(tmp_path / "r.safetensors"))
    q = "lora_unet_mid_block_attentions_0_proj_in"
    for key in [k for k in state if k.startswith(q)]:
        assert torch.equal(out[key], state[key]), key  # kept byte for byte, alpha too
    conv = "lora_unet_down_blocks_2_resnets_0_conv2"
    assert f"{conv}.lora_mid.weight" not in out and out[f"{conv}.lora_down.weight"].shape == (
        2, 64, 3, 3)  # fmt: skip
    parts = [state[f"{conv}.lora_{p}.weight"] for p in ("down", "mid", "up")]
    tucker = ops.tucker_delta(*parts, 2 / 3).double().reshape(64, -1)
    s = torch.linalg.svdvals(tucker)
    best = float(s[2:].square().sum().sqrt() / s.square().sum().sqrt())
    got = deltas(tmp_path / "r.safetensors")[conv]
    assert float(torch.linalg.norm(got - tucker) / torch.linalg.norm(tucker)) == pytest.approx(
        best, rel=1e-4)  # fmt: skip
    assert report.notes and "--keep-lycoris" in report.notes[0]

    base = save_ldm(models["sd1"], tmp_path / "base.safetensors")  # lossless at rank 4
    lorasurgeon.resize(lora, tmp_path / "r4.safetensors", rank=4, keep_lycoris=True, device="cpu")
    assert_same_merge(merged(base, [tmp_path / "r4.safetensors"], tmp_path / "a.safetensors"),
                      merged(base, [lora], tmp_path / "b.safetensors"))  # fmt: skip


def test_combine_cat_equals_the_weighted_sum_of_the_merged_updates(
    models: dict[str, TinySD], tmp_path: Path
) -> None:
    model = models["sd1"]
    base = save_ldm(model, tmp_path / "base.safetensors")
    first = write_locon(model, tmp_path / "a.safetensors", seed=5)
    second = write_locon(model, tmp_path / "b.safetensors", seed=6, every=2)  # a subset
    report = lorasurgeon.combine([first, second], tmp_path / "c.safetensors", method="cat",
                                 weights=[0.7, -0.4], device="cpu")  # fmt: skip
    assert read_lora(tmp_path / "c.safetensors").format is LoraFormat.KOHYA
    assert (
        len(report.modules) == len(deltas(first))
        and max(r.rel_error for r in report.modules) < 1e-6
    )
    assert_same_merge(
        merged(base, [tmp_path / "c.safetensors"], tmp_path / "m.safetensors"),
        merged(base, [first, second], tmp_path / "w.safetensors", [0.7, -0.4]),
    )
    lorasurgeon.combine([first, second], tmp_path / "s.safetensors", svd=True, rank=8,
                        weights=[0.7, -0.4], device="cpu")  # fmt: skip  # rank 4 + 4: exact
    assert_same_merge(merged(base, [tmp_path / "s.safetensors"], tmp_path / "n.safetensors"),
                      tmp_path / "w.safetensors")  # fmt: skip


def test_combine_linear_is_peft_factor_wise_sum(models: dict[str, TinySD], tmp_path: Path) -> None:
    """PEFT's linear: A = Σ sqrt(w_i s_i) A_i, B = Σ sqrt(w_i s_i) B_i (cross terms included)."""
    first = write_locon(models["sdxl"], tmp_path / "a.safetensors", seed=7)
    second = write_locon(models["sdxl"], tmp_path / "b.safetensors", seed=8)
    lorasurgeon.combine([first, second], tmp_path / "c.safetensors", weights=[0.5, 1.5],
                        device="cpu")  # fmt: skip
    a, b, out = load_file(str(first)), load_file(str(second)), deltas(tmp_path / "c.safetensors")
    for name, got in out.items():
        roots, downs, ups = [], [], []
        for state, w in ((a, 0.5), (b, 1.5)):
            down, up = state[f"{name}.lora_down.weight"].double(), state[f"{name}.lora_up.weight"]
            alpha = float(state[f"{name}.alpha"]) if f"{name}.alpha" in state else down.shape[0]
            roots.append((w * alpha / down.shape[0]) ** 0.5)
            downs.append(down.reshape(down.shape[0], -1))
            ups.append(up.double().reshape(up.shape[0], -1))
        b_sum = sum(r * u for r, u in zip(roots, ups, strict=True))
        expected = b_sum @ sum(r * d for r, d in zip(roots, downs, strict=True))
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7), name


def test_diffusers_files_keep_their_format_and_load_in_diffusers(
    models: dict[str, TinySD], tmp_path: Path
) -> None:
    from lorasurgeon.convert import convert

    model = models["sd1"]
    base = save_ldm(model, tmp_path / "base.safetensors")
    kohya = write_locon(model, tmp_path / "k.safetensors", seed=9, varying=False)
    convert(kohya, tmp_path / "d.safetensors", to="diffusers", base=base)
    lorasurgeon.resize(tmp_path / "d.safetensors", tmp_path / "r.safetensors", rank=2,
                       device="cpu")  # fmt: skip
    assert read_lora(tmp_path / "r.safetensors").format is LoraFormat.DIFFUSERS
    merged(base, [tmp_path / "r.safetensors"], tmp_path / "m.safetensors")
    expected = diffusers_fused_ldm(model, tmp_path / "r.safetensors", 1.0)
    assert_merged(tmp_path / "m.safetensors", base, expected, atol=1e-5)
    lorasurgeon.resize(tmp_path / "d.safetensors", tmp_path / "k2.safetensors", rank=4,
                       output_format="kohya", device="cpu")  # fmt: skip
    assert read_lora(tmp_path / "k2.safetensors").format is LoraFormat.KOHYA
    assert_same_merge(merged(base, [tmp_path / "k2.safetensors"], tmp_path / "x.safetensors"),
                      merged(base, [kohya], tmp_path / "y.safetensors"))  # fmt: skip


def test_bad_combinations_exit_1_naming_both_files_and_nothing_written(
    models: dict[str, TinySD], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lorasurgeon.convert import convert

    sd1 = write_locon(models["sd1"], tmp_path / "sd1.safetensors", seed=10)
    sdxl = write_locon(models["sdxl"], tmp_path / "sdxl.safetensors", seed=11)
    base = save_ldm(models["sd1"], tmp_path / "base.safetensors")
    convert(sd1, tmp_path / "diff.safetensors", to="diffusers", base=base)
    dora = load_file(str(sd1))
    name = next(k for k in dora if k.endswith(".lora_up.weight")).split(".")[0]
    dora[f"{name}.dora_scale"] = torch.ones(dora[f"{name}.lora_up.weight"].shape[0], 1)
    save_file(dora, str(tmp_path / "dora.safetensors"))
    cases = [
        ("combine", [sd1, sdxl], "sdxl LoRA", "sd1.safetensors"),
        ("combine", [sd1, tmp_path / "diff.safetensors"], "--format", "sd1.safetensors"),
        ("combine", [sd1, tmp_path / "dora.safetensors"], "DoRA", name),
        ("resize", [tmp_path / "dora.safetensors"], "DoRA", name),
    ]
    out = tmp_path / "out.safetensors"
    for command, inputs, words, named in cases:
        code, err = _run(capsys, command, *inputs, "-o", out)
        assert code == 1, err
        assert err.startswith("error: ") and len(err.splitlines()) == 1, err
        assert words in err and named in err and inputs[-1].name in err, err
        assert not out.exists() and not list(tmp_path.glob(".out*"))
    for args, words in (
        (["resize", sd1, "--uniform-rank"], "--uniform-rank"),
        (["resize", sdxl, "--format", "diffusers"], "lorasurgeon convert"),  # kohya names
        (["combine", sd1, sd1, "--format", "peft"], "lorasurgeon convert"),
    ):
        code, err = _run(capsys, *args, "-o", out)
        assert code == 2 and err.startswith("error: ") and words in err, err
        assert not out.exists()


def test_kohya_and_diffusers_files_combine_module_by_module_with_format(
    models: dict[str, TinySD], tmp_path: Path
) -> None:
    """A kohya file and its diffusers conversion name every module differently (``lora_te_`` vs
    ``text_encoder.``, mangled vs dotted paths): each module is matched, none doubled."""
    from lorasurgeon.convert import convert

    model = models["sd1"]
    base = save_ldm(model, tmp_path / "base.safetensors")
    kohya = write_locon(model, tmp_path / "k.safetensors", seed=12)
    convert(kohya, tmp_path / "d.safetensors", to="diffusers", base=base)
    report = lorasurgeon.combine([kohya, tmp_path / "d.safetensors"], tmp_path / "c.safetensors",
                                 method="cat", weights=[0.25, 0.75], output_format="kohya",
                                 device="cpu")  # fmt: skip
    assert len(report.modules) == len(deltas(kohya))
    assert all(m.adapters == 2 for m in report.modules)
    assert_same_merge(merged(base, [tmp_path / "c.safetensors"], tmp_path / "m.safetensors"),
                      merged(base, [kohya], tmp_path / "k-m.safetensors"))  # fmt: skip

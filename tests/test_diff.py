"""``diff`` and ``verify``: what changed between checkpoints, which rank it takes, and whether a
merged checkpoint is base + adapter. PEFT's merge is the oracle."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import save_file

import lorasurgeon
from lorasurgeon.diff import Group, Status, group_of, layer_of, module_kind
from lorasurgeon.diffstats import CHUNK
from tests.conftest import TinyBase, load_checkpoint, make_adapter, peft_merge
from tests.test_cli import run_cli

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _adapter(base: TinyBase, path: Path, seed: int = 1, targets: list[str] = TARGETS) -> Path:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    return make_adapter(base, config, path, seed=seed)


@pytest.fixture(scope="module")
def bf16_case(llama_bf16: TinyBase, tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[TinyBase, Path, Path]:  # fmt: skip
    root = tmp_path_factory.mktemp("diff_bf16")
    adapter = _adapter(llama_bf16, root / "adapter")
    merged = root / "merged"
    lorasurgeon.merge(llama_bf16.path, [adapter], merged, device="cpu")
    return llama_bf16, adapter, merged


def _save_state_dict(state: dict[str, torch.Tensor], path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    return path


def _replace(merged: Path, out: Path, name: str, value: torch.Tensor) -> Path:
    """A copy of ``merged`` (as one file) with tensor ``name`` set to ``value``."""
    state = load_checkpoint(merged)
    state[name] = value.to(state[name].dtype)
    return _save_state_dict(state, out)


# ------------------------------------------------------------------------------ names


@pytest.mark.parametrize(
    ("name", "group", "layer", "kind"),
    [
        ("model.layers.3.self_attn.q_proj.weight", Group.ATTENTION, 3, "q_proj"),
        ("model.layers.0.mlp.down_proj.weight", Group.MLP, 0, "down_proj"),
        ("model.layers.11.input_layernorm.weight", Group.NORM, 11, "input_layernorm"),
        ("model.embed_tokens.weight", Group.EMBEDDING, None, "embed_tokens"),
        ("lm_head.weight", Group.EMBEDDING, None, "lm_head"),
        ("transformer.h.2.attn.c_attn.bias", Group.ATTENTION, 2, "c_attn.bias"),
        ("transformer.h.2.ln_1.weight", Group.NORM, 2, "ln_1"),
        ("transformer.h.2.mlp.c_fc.weight", Group.MLP, 2, "c_fc"),
        ("model.norm.weight", Group.NORM, None, "norm"),
        ("score.weight", Group.OTHER, None, "score"),
    ],
)
def test_tensor_names_map_to_group_layer_and_module_kind(
    name: str, group: Group, layer: int | None, kind: str
) -> None:
    assert (group_of(name), layer_of(name), module_kind(name)) == (group, layer, kind)


# ------------------------------------------------------------------------------ diff


def test_diff_of_a_checkpoint_with_itself_is_all_equal(llama_fp32: TinyBase) -> None:
    report = lorasurgeon.diff(llama_fp32.path, llama_fp32.path, device="cpu")
    assert report.identical
    assert (
        report.count(Status.EQUAL) == len(report.tensors) == len(load_checkpoint(llama_fp32.path))
    )
    assert all(t.rel_change is None for t in report.tensors)


@pytest.mark.parametrize("ours", [True, False], ids=["our-merge", "peft-merge"])
def test_diff_of_base_and_merge_reports_exactly_the_targeted_tensors(
    llama_fp32: TinyBase, tmp_path: Path, ours: bool
) -> None:
    adapter = _adapter(llama_fp32, tmp_path / "adapter")
    expected = peft_merge(llama_fp32, [adapter])
    merged = tmp_path / "merged"
    if ours:
        lorasurgeon.merge(llama_fp32.path, [adapter], merged, device="cpu")
    else:
        _save_state_dict(expected, merged)
    base = load_checkpoint(llama_fp32.path)

    report = lorasurgeon.diff(llama_fp32.path, merged, device="cpu")

    changed = {t.name for t in report.tensors if t.status is Status.CHANGED}
    want = {k for k in base if not torch.equal(base[k], expected[k])}
    assert changed == want
    assert {k.split(".")[-2] for k in want} == set(TARGETS)
    for t in report.tensors:
        if t.name in want:
            d = expected[t.name].double() - base[t.name].double()
            rel = float(d.norm() / base[t.name].double().norm())
            assert t.rel_change == pytest.approx(rel, rel=1e-5), t.name
            assert t.max_abs == pytest.approx(float(d.abs().max()), rel=1e-5), t.name
    assert report.groups["norm"]["share"] == 0.0
    assert report.groups["attention"]["share"] + report.groups["mlp"]["share"] == pytest.approx(1)


def _planted_pair(root: Path, ranks: dict[str, int], shape: tuple[int, int]) -> tuple[Path, Path]:
    """A and B = A + a rank-k change of k equal singular values, for each weight."""
    gen = torch.Generator().manual_seed(0)
    a: dict[str, torch.Tensor] = {"model.norm.weight": torch.ones(shape[0])}
    b = dict(a)
    for name, k in ranks.items():
        weight = torch.randn(shape, generator=gen, dtype=torch.float64)
        u = torch.linalg.qr(torch.randn(shape[0], k, generator=gen, dtype=torch.float64))[0]
        v = torch.linalg.qr(torch.randn(shape[1], k, generator=gen, dtype=torch.float64))[0]
        a[name] = weight.float()
        b[name] = (weight + 0.5 * u @ v.T).float()
    save_file(a, str(root / "a.safetensors"))
    save_file(b, str(root / "b.safetensors"))
    return root / "a.safetensors", root / "b.safetensors"


def test_planted_rank_k_changes_give_rank_k_at_99_percent(tmp_path: Path) -> None:
    ranks = {f"model.layers.{i}.self_attn.q_proj.weight": k for i, k in enumerate([1, 3, 6, 10])}
    shape = (48, 40)
    a, b = _planted_pair(tmp_path, ranks, shape)

    report = lorasurgeon.diff(a, b, spectrum=16, device="cpu")

    by_name = {t.name: t for t in report.tensors}
    for name, k in ranks.items():
        s = by_name[name].spectrum
        assert s is not None
        # k equal singular values: r of them hold r/k of the energy
        assert s.ranks == {"0.5": math.ceil(k / 2), "0.9": math.ceil(0.9 * k - 1e-9), "0.99": k}
        assert s.kept == pytest.approx(1.0, abs=1e-6)
        assert s.values[k - 1] > 1e3 * max(s.values[k], 1e-30) or k == len(s.values)
    cost = sum(k * (shape[0] + shape[1]) for k in ranks.values())
    assert report.rank_costs["0.99"] == {"params": cost, "over_k": 0, "modules": len(ranks)}
    assert by_name["model.norm.weight"].status is Status.EQUAL


def test_spectrum_of_a_change_in_the_last_chunks_only(tmp_path: Path) -> None:
    """Chunks equal in A and B count as zeros of B - A, also in a reused (dirty) buffer: the
    fourth weight's buffer is one the first three used."""
    gen = torch.Generator().manual_seed(5)
    shape = (1100, 1000)  # three chunks; rows 700.. lie after the first
    a, b = {}, {}
    for layer in range(4):
        name = f"model.layers.{layer}.mlp.up_proj.weight"
        a[name] = torch.randn(shape, generator=gen)
        low_rank = torch.randn(shape[0], 2, generator=gen) @ torch.randn(2, shape[1], generator=gen)
        if layer == 3:
            low_rank[:700] = 0
        b[name] = a[name] + low_rank
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))

    report = lorasurgeon.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors",
                              spectrum=4, device="cpu")  # fmt: skip

    for t in report.tensors:
        want = torch.linalg.svdvals(b[t.name].double() - a[t.name].double())[:2]
        assert t.spectrum is not None and t.spectrum.ranks["0.99"] == 2, t.name
        assert t.spectrum.values[:2] == pytest.approx(want.tolist(), rel=1e-5), t.name


def test_spectrum_leaves_torch_thread_count_as_it_was(tmp_path: Path) -> None:
    """The workers decompose on one torch thread each and restore the count when they end."""
    import threading

    a, b = _planted_pair(tmp_path, {"model.layers.0.mlp.up_proj.weight": 2}, (48, 40))
    before = torch.get_num_threads()
    report = lorasurgeon.diff(a, b, spectrum=4, device="cpu")
    seen: list[int] = []
    fresh = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    fresh.start()
    fresh.join()
    assert report.rank_costs["0.99"]["modules"] == 1
    assert torch.get_num_threads() == before and seen == [before]


def test_spectrum_smaller_than_the_rank_says_more_than_k(tmp_path: Path) -> None:
    ranks = {"model.layers.0.mlp.up_proj.weight": 10}
    a, b = _planted_pair(tmp_path, ranks, (48, 40))
    report = lorasurgeon.diff(a, b, spectrum=4, device="cpu")
    s = {t.name: t for t in report.tensors}["model.layers.0.mlp.up_proj.weight"].spectrum
    assert s is not None and s.ranks["0.99"] is None and s.ranks["0.5"] is None
    assert s.kept == pytest.approx(0.4, abs=1e-6)  # 4 of 10 equal values: exactly 40%
    assert report.rank_costs["0.99"]["over_k"] == 1


def test_diff_reports_tensors_on_one_side_and_reshaped(tmp_path: Path) -> None:
    a = {"x.weight": torch.ones(4, 4), "only_a": torch.ones(2), "r.weight": torch.ones(3, 2)}
    b = {"x.weight": torch.ones(4, 4).bfloat16(), "only_b": torch.ones(2),
         "r.weight": torch.ones(2, 3)}  # fmt: skip
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    report = lorasurgeon.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", device="cpu")
    status = {t.name: t.status for t in report.tensors}
    assert status == {"x.weight": Status.DTYPE, "only_a": Status.ONLY_A,
                      "r.weight": Status.SHAPE, "only_b": Status.ONLY_B}  # fmt: skip
    assert {t.name: t.rel_change for t in report.tensors}["x.weight"] == 0.0


# Statistics against their float64 definitions: ‖B - A‖² and ‖A‖² within 1e-6 (float32 rows
# summed by cascade, rows added in float64), max |B - A| within 2^-24 (B - A rounded once).
_STAT_TOL = {"change_energy": 1e-6, "rel_change": 1e-6, "max_abs": 2.0**-23}
_N = CHUNK + 4099  # two chunks, the second partial (and not a multiple of a row)


def _stat_tensors(dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) in float64 before rounding to ``dtype``, one pair per kind of trouble."""
    gen, info = torch.Generator().manual_seed(7), torch.finfo(dtype)

    def randn(scale: float = 1.0) -> torch.Tensor:
        return torch.randn(_N, generator=gen, dtype=torch.float64) * scale

    heavy = randn() ** 5  # heavy tails: a float32 sum over a chunk loses ~1e-4 here
    last_chunk = randn()
    late = last_chunk.clone()
    late[CHUNK + 7] += 1.0  # equal bytes in the first chunk, which still counts in ‖A‖
    return {
        "model.layers.0.mlp.up_proj.weight": (randn(0.02), randn(0.02) * 1e-3 + 0.02),
        "model.layers.0.mlp.down_proj.weight": (heavy, heavy + randn(1e-2)),
        # float32 squares overflow (bf16, fp32) or underflow; B - A overflows float32
        "model.layers.0.self_attn.q_proj.weight": (randn(info.max / 1e8), randn(info.max / 1e8)),
        "model.layers.0.self_attn.k_proj.weight": (randn(info.tiny * 4), randn(info.tiny * 4)),
        "model.layers.0.self_attn.v_proj.weight": (last_chunk, late),
        "model.layers.0.self_attn.o_proj.weight": (randn(info.max / 8), -randn(info.max / 8)),
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_diff_statistics_match_their_float64_definitions(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    pairs = _stat_tensors(dtype)
    limit = torch.finfo(dtype).max
    stored = {name: tuple(x.clamp(-limit, limit).to(dtype) for x in pair)
              for name, pair in pairs.items()}  # fmt: skip
    up = pairs["model.layers.0.mlp.up_proj.weight"]
    stored["dtype.changed.weight"] = (up[0].to(dtype), up[1].float())
    save_file({n: p[0] for n, p in stored.items()}, str(tmp_path / "a.safetensors"))
    save_file({n: p[1] for n, p in stored.items()}, str(tmp_path / "b.safetensors"))

    report = lorasurgeon.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", device="cpu")

    for t in report.tensors:
        a, b = (x.double() for x in stored[t.name])
        d = b - a
        energy = float((d * d).sum())
        want = {
            "change_energy": energy,
            "rel_change": math.sqrt(energy / float((a * a).sum())),
            "max_abs": float(d.abs().max()),
        }
        for key, expected in want.items():
            assert energy > 0 and math.isfinite(energy), t.name
            assert getattr(t, key) == pytest.approx(expected, rel=_STAT_TOL[key]), (t.name, key)


def test_diff_decodes_every_dtype_and_empty_tensors(tmp_path: Path) -> None:
    """numpy decodes F32/F64/BF16 itself, torch the others; empty tensors are equal."""
    gen = torch.Generator().manual_seed(3)
    a = {"f64.weight": torch.randn(50, 3, generator=gen, dtype=torch.float64),
         "f16.weight": torch.randn(33, 2, generator=gen).half(),
         "f8.weight": torch.randn(100, generator=gen).to(torch.float8_e4m3fn),
         "i32.weight": torch.arange(10, dtype=torch.int32),
         "u8.weight": torch.arange(9, dtype=torch.uint8),
         "empty_bf16.weight": torch.zeros(0, 4, dtype=torch.bfloat16),
         "empty_f16.weight": torch.zeros(0, dtype=torch.float16)}  # fmt: skip
    b = {k: v.clone() for k, v in a.items()}
    b["f64.weight"][0, 0] += 1
    b["f16.weight"][5, 1] += 1
    b["f8.weight"] = (a["f8.weight"].float() + 0.5).to(torch.float8_e4m3fn)
    b["i32.weight"][3] = 100
    b["u8.weight"][1] = 7
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))

    report = lorasurgeon.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", device="cpu")

    by_name = {t.name: t for t in report.tensors}
    assert {n for n, t in by_name.items() if t.status is Status.EQUAL} == {
        "empty_bf16.weight", "empty_f16.weight"}  # fmt: skip
    for name in a:
        if name.startswith("empty"):
            continue
        x, y = a[name].double(), b[name].double()
        d = y - x
        t = by_name[name]
        assert t.change_energy == pytest.approx(float((d * d).sum()), rel=1e-12), name
        assert t.max_abs == float(d.abs().max()), name


# ------------------------------------------------------------------------------ verify


def test_verify_accepts_our_merge_and_peft_merge_in_bf16(
    bf16_case: tuple[TinyBase, Path, Path], tmp_path: Path
) -> None:
    base, adapter, merged = bf16_case
    assert lorasurgeon.verify(merged, base.path, [adapter], device="cpu").matches
    for state in (peft_merge(base, [adapter]), _peft_merge_in_bf16(base, adapter)):
        peft_dir = _save_state_dict(state, tmp_path / f"peft{len(list(tmp_path.iterdir()))}")
        report = lorasurgeon.verify(peft_dir, base.path, [adapter], device="cpu")
        assert report.matches, report.mismatches[:3]
        assert report.merged_count == 2 * 3 * 1  # 2 layers x 3 targets


def _peft_merge_in_bf16(base: TinyBase, adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's merge with the adapter kept in bf16 (autocast_adapter_dtype=False): the delta
    is rounded to bf16 before the sum, one rounding more than ours."""
    model = PeftModel.from_pretrained(base.load(), adapter, autocast_adapter_dtype=False)
    state = {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
    ours = load_checkpoint(lorasurgeon_merged(base, adapter))
    assert any(not torch.equal(state[k], ours[k]) for k in ours), "no rounding difference"
    return state


def lorasurgeon_merged(base: TinyBase, adapter: Path) -> Path:
    return adapter.parent / "merged"


def test_verify_accepts_peft_merge_of_fp32_base_with_weights(
    llama_fp32: TinyBase, tmp_path: Path
) -> None:
    first = _adapter(llama_fp32, tmp_path / "a1")
    second = _adapter(llama_fp32, tmp_path / "a2", seed=2, targets=["q_proj", "up_proj"])
    peft_dir = _save_state_dict(
        peft_merge(llama_fp32, [first, second], weights=[0.7, -0.3]), tmp_path / "peft"
    )
    assert lorasurgeon.verify(
        peft_dir, llama_fp32.path, [first, second], weights=[0.7, -0.3], device="cpu"
    ).matches
    wrong = lorasurgeon.verify(peft_dir, llama_fp32.path, [first, second], weights=[0.7, 0.3],
                               device="cpu")  # fmt: skip
    assert {m.tensor.split(".")[-2] for m in wrong.mismatches} == {"q_proj", "up_proj"}


def _delta(base: TinyBase, merged: Path, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    w = load_checkpoint(base.path)[name].float()
    return w, load_checkpoint(merged)[name].float() - w


@pytest.mark.parametrize("fault", ["missing-module", "transposed-delta", "wrong-weight"])
def test_verify_rejects_a_faulty_merge_naming_the_tensor(
    bf16_case: tuple[TinyBase, Path, Path], tmp_path: Path, fault: str
) -> None:
    base, adapter, merged = bf16_case
    name = "model.layers.1.self_attn.q_proj.weight"
    w, delta = _delta(base, merged, name)
    value = {"missing-module": w, "transposed-delta": w + delta.T, "wrong-weight": w + 0.5 * delta}
    faulty = _replace(merged, tmp_path / "faulty", name, value[fault])

    report = lorasurgeon.verify(faulty, base.path, [adapter], device="cpu")

    assert [m.tensor for m in report.mismatches] == [name]
    share = report.mismatches[0].share_of_delta
    assert share is not None
    want = {"missing-module": 1.0, "wrong-weight": 0.5}.get(fault)
    if want is not None:
        assert share == pytest.approx(want, abs=0.05)
    else:
        assert share > 0.5


def test_verify_rejects_a_missing_tensor_and_an_extra_one(
    bf16_case: tuple[TinyBase, Path, Path], tmp_path: Path
) -> None:
    base, adapter, merged = bf16_case
    state = load_checkpoint(merged)
    del state["model.layers.0.mlp.down_proj.weight"]
    state["extra.weight"] = torch.zeros(2)
    faulty = _save_state_dict(state, tmp_path / "faulty")
    report = lorasurgeon.verify(faulty, base.path, [adapter], device="cpu")
    assert {(m.tensor, m.what.split(";")[0]) for m in report.mismatches} == {
        ("model.layers.0.mlp.down_proj.weight", "missing from MERGED"),
        ("extra.weight", "only in MERGED"),
    }


# ------------------------------------------------------------------------------ CLI


def test_cli_verify_exit_codes_and_one_error_line(
    bf16_case: tuple[TinyBase, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, adapter, merged = bf16_case
    code, out, err = run_cli(capsys, "verify", merged, base.path, adapter, "--device", "cpu")
    assert (code, err) == (0, "") and "matches" in out
    code, out, err = run_cli(capsys, "verify", merged, base.path, adapter, "--weight", "2")
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: ")
    assert "model.layers.0.mlp.down_proj.weight" in lines[0] and "Traceback" not in err
    assert "does not match" in out


def test_cli_diff_text_json_and_plot(
    bf16_case: tuple[TinyBase, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, _, merged = bf16_case
    code, out, _ = run_cli(capsys, "diff", base.path, merged, "--spectrum", "--json")
    data = json.loads(out)
    assert code == 0 and data["counts"]["changed"] == 6 and data["spectrum"] == 64
    assert all(t["spectrum"]["ranks"]["0.99"] <= 4 for t in data["tensors"] if t["spectrum"])
    plot = tmp_path / "diff.html"
    code, out, _ = run_cli(capsys, "diff", base.path, merged, "--spectrum", "8", "--plot", plot)
    assert code == 0 and "q_proj" in out and "extracting 99%" in out
    page = plot.read_text()
    assert page.count("<svg") == 3 and "q_proj" in page and "<script" not in page
    code, out, _ = run_cli(capsys, "diff", base.path, base.path)
    assert code == 0 and "identical" in out


@pytest.mark.parametrize(
    "args",
    [
        ["--plot", "x.html"],  # no --spectrum
        ["--spectrum", "--plot", "x.png"],
        ["--spectrum", "0"],
    ],
)
def test_cli_diff_usage_errors(
    llama_fp32: TinyBase, capsys: pytest.CaptureFixture[str], args: list[str], tmp_path: Path
) -> None:
    args = [str(tmp_path / a) if a.startswith("x.") else a for a in args]
    code, _, err = run_cli(capsys, "diff", llama_fp32.path, llama_fp32.path, *args)
    assert code == 2 and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_cli_extract_plot_draws_the_error_per_layer(
    bf16_case: tuple[TinyBase, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, _, merged = bf16_case
    plot, out = tmp_path / "extract.svg", tmp_path / "lora"
    code, _, err = run_cli(capsys, "extract", base.path, merged, "-o", out, "--rank", "2",
                           "--plot", plot, "--device", "cpu")  # fmt: skip
    assert code == 0, err
    picture = plot.read_text()
    assert picture.startswith("<svg") and "q_proj" in picture and "down_proj" in picture
    code, _, err = run_cli(capsys, "extract", base.path, merged, "-o", tmp_path / "other",
                           "--plot", tmp_path / "e.png")  # fmt: skip
    assert code == 2 and "--plot" in err and not (tmp_path / "other").exists()


def test_plot_in_headless_chromium_shows_the_planted_structure(tmp_path: Path) -> None:
    """bench/diff_picture.py: attention changes everywhere, MLP only in layer 4 (the largest
    relative change: the top of the color scale), so the screenshot's heat map has exactly
    3 top-colored cells and 15 grey (unchanged) MLP cells."""
    image = pytest.importorskip("PIL.Image")
    import shutil
    import sys

    if shutil.which("chromium") is None:
        pytest.skip("needs chromium (apt-get install chromium)")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import diff_picture

    png = diff_picture.draw(tmp_path, tmp_path / "diff.png")
    colors = {c: n for n, c in image.open(png).convert("RGB").getcolors(1 << 20)}
    cell, slot = 63 * 17, 64 * 18  # heatmap_svg's cells for 6 layers, without and with gap
    top, grey = (253, 231, 37), (221, 221, 221)  # viridis at 1; zero change
    legend = 4 * 10  # the legend's last swatch has the top color too
    assert 0.9 * 3 * cell <= colors.get(top, 0) - legend <= 3 * slot
    assert 0.9 * 15 * cell <= colors.get(grey, 0) <= 15 * slot

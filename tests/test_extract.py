"""lorasurgeon.extract against the truth: planted updates, the merge round trip, PEFT loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel

import lorasurgeon
from lorasurgeon.cli import main
from tests.conftest import TinyBase, load_checkpoint

PLANTED_RANK = 3


def _make_tuned(base: TinyBase, path: Path, *, noise: float = 0.0, seed: int = 1) -> Path:
    """The base plus a planted rank-3 update (and optional noise) on every 2-D projection,
    and a changed final norm (not LoRA-able, so it must be reported)."""
    model = base.load(torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "proj" in name:
                out_f, in_f = p.shape
                u = torch.randn(out_f, PLANTED_RANK, generator=g)
                v = torch.randn(PLANTED_RANK, in_f, generator=g)
                p += 0.05 * (u @ v) + noise * torch.randn(out_f, in_f, generator=g)
        model.model.norm.weight += 0.5
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def planted(llama_fp32: TinyBase, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_tuned(llama_fp32, tmp_path_factory.mktemp("tuned_planted"))


@pytest.fixture(scope="module")
def noisy(llama_fp32: TinyBase, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_tuned(llama_fp32, tmp_path_factory.mktemp("tuned_noisy"), noise=0.01)


def _deltas(base: Path, tuned: Path) -> dict[str, torch.Tensor]:
    b, t = load_checkpoint(base), load_checkpoint(tuned)
    return {k: (t[k].double() - b[k].double()) for k in b if not torch.equal(b[k], t[k])}


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_planted_rank_is_recovered_to_float_precision(
    llama_fp32: TinyBase, planted: Path, tmp_path: Path, svd: str
) -> None:
    out = tmp_path / "lora"
    report = lorasurgeon.extract(
        llama_fp32.path, planted, out, rank=PLANTED_RANK, svd=svd, dtype="float32"
    )
    assert report.modules and all(m.rel_error < 1e-5 for m in report.modules), report.modules
    merged = tmp_path / "merged"
    lorasurgeon.merge(llama_fp32.path, [out], merged)
    ours, tuned = load_checkpoint(merged), load_checkpoint(planted)
    deltas = _deltas(llama_fp32.path, planted)
    for m in report.modules:
        name = m.module + ".weight"
        err = (ours[name].double() - tuned[name].double()).norm() / deltas[name].norm()
        assert err < 1e-5, (name, float(err))


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_merge_of_extract_reproduces_tuned_within_reported_error(
    llama_fp32: TinyBase, noisy: Path, tmp_path: Path, svd: str
) -> None:
    out = tmp_path / "lora"
    report = lorasurgeon.extract(llama_fp32.path, noisy, out, rank=4, svd=svd)
    merged = tmp_path / "merged"
    lorasurgeon.merge(llama_fp32.path, [out], merged)
    ours, tuned = load_checkpoint(merged), load_checkpoint(noisy)
    deltas = _deltas(llama_fp32.path, noisy)
    assert len(report.modules) == 14  # 7 projections x 2 layers
    for m in report.modules:
        name = m.module + ".weight"
        actual = float((ours[name].double() - tuned[name].double()).norm() / deltas[name].norm())
        # the merge rounds to float32 once more: allow that, nothing else
        assert actual == pytest.approx(m.rel_error, rel=1e-4, abs=1e-6), name
        assert 0 < m.rel_error < 1 and m.energy_kept == pytest.approx(1 - m.rel_error**2)


def test_exact_error_is_the_eckart_young_optimum(
    llama_fp32: TinyBase, noisy: Path, tmp_path: Path
) -> None:
    report = lorasurgeon.extract(llama_fp32.path, noisy, tmp_path / "l", rank=4, svd="exact")
    deltas = _deltas(llama_fp32.path, noisy)
    for m in report.modules:
        s = torch.linalg.svdvals(deltas[m.module + ".weight"])
        optimum = float((s[4:].square().sum() / s.square().sum()).sqrt())
        assert m.rel_error == pytest.approx(optimum, rel=1e-4), m.module


def test_randomized_error_is_within_one_percent_of_exact(
    llama_fp32: TinyBase, noisy: Path, tmp_path: Path
) -> None:
    exact = lorasurgeon.extract(llama_fp32.path, noisy, tmp_path / "e", rank=4, svd="exact")
    fast = lorasurgeon.extract(llama_fp32.path, noisy, tmp_path / "r", rank=4)
    for e, r in zip(exact.modules, fast.modules, strict=True):
        assert e.module == r.module and r.rel_error <= e.rel_error * 1.01 + 1e-7


def test_peft_loads_the_adapter_and_merges_to_our_result(
    llama_fp32: TinyBase, noisy: Path, tmp_path: Path
) -> None:
    out = tmp_path / "lora"
    lorasurgeon.extract(
        llama_fp32.path, noisy, out, rank_method="energy", energy=0.8, max_rank=6, min_rank=1
    )
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["rank_pattern"], "energy ranks should differ from the default rank"
    peft_model = PeftModel.from_pretrained(llama_fp32.load(torch.float32), out)
    theirs = dict(peft_model.merge_and_unload().state_dict())
    lorasurgeon.merge(llama_fp32.path, [out], tmp_path / "merged")
    ours = load_checkpoint(tmp_path / "merged")
    for name, value in ours.items():
        scale = float(value.abs().max()) or 1.0
        assert float((theirs[name] - value).abs().max()) <= 1e-5 * scale, name


def test_energy_ranks_keep_the_fraction_and_are_minimal(
    llama_fp32: TinyBase, noisy: Path, tmp_path: Path
) -> None:
    report = lorasurgeon.extract(
        llama_fp32.path, noisy, tmp_path / "l", rank_method="energy", energy=0.9, svd="exact",
        max_rank=16,
    )  # fmt: skip
    deltas = _deltas(llama_fp32.path, noisy)
    for m in report.modules:
        s2 = torch.linalg.svdvals(deltas[m.module + ".weight"]).square()
        kept = s2.cumsum(0) / s2.sum()
        assert m.energy_kept >= 0.9 - 1e-6
        if m.rank > 1:
            assert float(kept[m.rank - 2]) < 0.9, m.module


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [("sv_ratio", {"sv_ratio": 4.0}), ("sv_cumulative", {"sv_cumulative": 0.6})],
)
def test_kohya_dynamic_ranks_follow_their_definition(
    llama_fp32: TinyBase, noisy: Path, tmp_path: Path, method: str, kwargs: dict[str, float]
) -> None:
    report = lorasurgeon.extract(
        llama_fp32.path, noisy, tmp_path / "l", rank_method=method, svd="exact", max_rank=16,
        **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip
    deltas = _deltas(llama_fp32.path, noisy)
    for m in report.modules:
        s = torch.linalg.svdvals(deltas[m.module + ".weight"])
        if method == "sv_ratio":
            wanted = int((s >= s[0] / kwargs["sv_ratio"]).sum())
        else:  # the sum of every singular value, not only of the 16 the rank may reach
            wanted = int((s.cumsum(0) < kwargs["sv_cumulative"] * s.sum()).sum()) + 1
        assert m.rank == min(wanted, 16), m.module


def test_sv_cumulative_needs_the_exact_svd(
    llama_fp32: TinyBase, noisy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["extract", str(llama_fp32.path), str(noisy), "-o", str(tmp_path / "l"),
            "--rank-method", "sv_cumulative", "--sv-cumulative", "0.6"]  # fmt: skip
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--svd exact" in err and "Traceback" not in err
    assert not (tmp_path / "l").exists()


def test_budget_ranks_stay_within_the_budget(
    llama_fp32: TinyBase, noisy: Path, tmp_path: Path
) -> None:
    full = lorasurgeon.extract(llama_fp32.path, noisy, tmp_path / "full", rank=8)
    budget = full.total_params // 3  # room for a third of the parameters of rank 8 everywhere
    report = lorasurgeon.extract(
        llama_fp32.path, noisy, tmp_path / "l", rank_method="budget", param_budget=budget,
        min_rank=1, max_rank=8,
    )  # fmt: skip
    assert report.total_params <= budget
    assert all(1 <= m.rank <= 8 for m in report.modules)
    assert len({m.rank for m in report.modules}) > 1  # spread by error, not uniform


def test_unchanged_weights_are_skipped_and_other_changes_reported(
    llama_fp32: TinyBase, planted: Path, tmp_path: Path
) -> None:
    report = lorasurgeon.extract(
        llama_fp32.path, planted, tmp_path / "l", target_modules=["q_proj", "lm_head"]
    )
    assert {m.module.rsplit(".", 1)[-1] for m in report.modules} == {"q_proj"}
    assert report.skipped_equal == 1  # lm_head is targeted but unchanged
    reported = {row["tensor"]: row["share"] for row in report.not_in_adapter}
    assert "model.norm.weight" in reported and 0 < reported["model.norm.weight"] < 1
    assert "model.layers.0.mlp.down_proj.weight" in reported
    assert sum(reported.values()) < 1


def test_cli_writes_the_report_json(
    llama_fp32: TinyBase, planted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report_file = tmp_path / "report.json"
    with pytest.raises(SystemExit) as e:
        main(["extract", str(llama_fp32.path), str(planted), "-o", str(tmp_path / "l"),
              "--rank", "3", "--report", str(report_file), "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert e.value.code == 0, err
    data = json.loads(report_file.read_text())
    first = data["modules"][0]
    assert set(first) >= {"module", "shape", "rank", "alpha", "rel_error", "energy_kept"}
    assert data["total_params"] == sum(m["rank"] * sum(m["shape"]) for m in data["modules"])
    assert "relative error: worst" in err and "not in the adapter" in err


def test_missing_tensor_in_tuned_is_an_error(
    llama_fp32: TinyBase, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import save_file

    tensors = load_checkpoint(llama_fp32.path)
    del tensors["model.layers.1.self_attn.q_proj.weight"]
    (tmp_path / "tuned").mkdir()
    save_file(tensors, tmp_path / "tuned" / "model.safetensors")
    with pytest.raises(SystemExit) as e:
        main(["extract", str(llama_fp32.path), str(tmp_path / "tuned"), "-o", str(tmp_path / "l")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: ") and "q_proj" in err
    assert not (tmp_path / "l").exists()


def test_gpt2_conv1d_extract_loads_in_peft(gpt2: TinyBase, tmp_path: Path) -> None:
    _gpt2_tuned(gpt2, tmp_path / "tuned")
    report = lorasurgeon.extract(gpt2.path, tmp_path / "tuned", tmp_path / "lora", rank=2)
    assert len(report.modules) == 8 and all(m.rel_error < 1e-5 for m in report.modules)
    peft_model = PeftModel.from_pretrained(gpt2.load(torch.float32), tmp_path / "lora")
    theirs = dict(peft_model.merge_and_unload().state_dict())
    tuned = load_checkpoint(tmp_path / "tuned")
    for m in report.modules:
        name = m.module + ".weight"
        scale = float(tuned[name].abs().max())
        assert float((theirs[name] - tuned[name]).abs().max()) <= 1e-5 * scale, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_extract_matches_cpu(llama_fp32: TinyBase, noisy: Path, tmp_path: Path) -> None:
    cpu = lorasurgeon.extract(llama_fp32.path, noisy, tmp_path / "c", rank=4, device="cpu")
    gpu = lorasurgeon.extract(llama_fp32.path, noisy, tmp_path / "g", rank=4, device="cuda")
    for c, g in zip(cpu.modules, gpu.modules, strict=True):
        assert c.module == g.module and g.rel_error == pytest.approx(c.rel_error, rel=1e-3)


def test_cpu_delta_by_blocks_equals_the_plain_difference(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from lorasurgeon.reader import TensorInfo

    extract_module = importlib.import_module("lorasurgeon.extract")  # the package re-exports

    monkeypatch.setattr(extract_module, "_DELTA_BLOCK", 40)  # several blocks, a ragged last one
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(23, 9, generator=gen).bfloat16()
    tuned = (base.float() + 0.01 * torch.randn(23, 9, generator=gen)).bfloat16()
    info = TensorInfo("w.weight", Path("x"), "BF16", (23, 9), 0, 23 * 9 * 2)
    module = extract_module.ExtractModule("w", info, info, "linear")
    delta = extract_module._delta_matrix(module, base, tuned, torch.empty(23 * 9 + 5))
    assert torch.equal(delta, tuned.float() - base.float())


@pytest.mark.parametrize("chunk", [7, 1 << 21])
def test_differences_outside_the_adapter_are_summed_by_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    import importlib

    from safetensors.torch import save_file

    from lorasurgeon.reader import TensorFiles, open_checkpoint

    extract_module = importlib.import_module("lorasurgeon.extract")
    monkeypatch.setattr(extract_module, "_COMPARE_CHUNK", chunk)
    gen = torch.Generator().manual_seed(8)
    base = {"same": torch.randn(10, 5, generator=gen), "moved": torch.randn(10, 5, generator=gen)}
    tuned = {"same": base["same"].clone(), "moved": base["moved"].clone()}
    tuned["moved"][9, 4] += 0.5  # in the last chunk only
    base["cast"] = base["same"].clone()
    tuned["cast"] = base["cast"].bfloat16()  # nearly equal values, another dtype
    save_file(base, tmp_path / "b.safetensors")
    save_file(tuned, tmp_path / "t.safetensors")
    with (
        open_checkpoint(tmp_path / "b.safetensors") as b,
        open_checkpoint(tmp_path / "t.safetensors") as t,
        TensorFiles() as files,
    ):
        energy = {n: extract_module._squared_difference(b.tensors[n], t.tensors[n], files)
                  for n in base}  # fmt: skip
    assert energy["same"] is None
    assert energy["moved"] == pytest.approx(0.25, rel=1e-12)
    exact = float((base["same"].bfloat16().double() - base["same"].double()).square().sum())
    assert energy["cast"] == pytest.approx(exact, rel=1e-12)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    path.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, path / "model.safetensors")
    return path


@pytest.mark.parametrize(
    ("edit", "tensor", "module"),
    [
        ("drop", "model.norm.weight", "norm"),
        ("add", "extra.proj.weight", "extra.proj"),
        ("reshape", "model.layers.0.input_layernorm.weight", "input_layernorm"),
    ],
)
def test_tensor_on_one_side_or_reshaped_is_an_error_unless_excluded(
    llama_fp32: TinyBase, planted: Path, tmp_path: Path, edit: str, tensor: str, module: str
) -> None:
    from lorasurgeon import IncompatibleError

    tensors = load_checkpoint(planted)
    if edit == "drop":
        del tensors[tensor]
    elif edit == "add":
        tensors[tensor] = torch.ones(4, 4)
    else:
        tensors[tensor] = torch.ones(33)
    tuned = _save_tensors(tensors, tmp_path / "tuned")
    with pytest.raises(IncompatibleError, match="--exclude-modules") as e:
        lorasurgeon.extract(llama_fp32.path, tuned, tmp_path / "a", rank=3)
    assert e.value.tensor == tensor and not (tmp_path / "a").exists()
    report = lorasurgeon.extract(llama_fp32.path, tuned, tmp_path / "b", rank=3,
                                 exclude_modules=[module])  # fmt: skip
    assert len(report.modules) == 14


def test_resized_vocabulary_says_what_to_do_and_saved_modules_load_in_peft(
    llama_fp32: TinyBase, tmp_path: Path
) -> None:
    from lorasurgeon import IncompatibleError

    model = llama_fp32.load(torch.float32)
    model.resize_token_embeddings(72)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight += 0.05
        model.lm_head.weight[64:] += 0.1
    model.save_pretrained(tmp_path / "tuned")
    with pytest.raises(IncompatibleError, match="resized from 64 to 72 tokens") as e:
        lorasurgeon.extract(llama_fp32.path, tmp_path / "tuned", tmp_path / "a", rank=2)
    assert "--save-modules" in str(e.value) and e.value.tensor in (
        "model.embed_tokens.weight",
        "lm_head.weight",
    )
    report = lorasurgeon.extract(llama_fp32.path, tmp_path / "tuned", tmp_path / "lora", rank=2,
                                 save_modules=["embed_tokens", "lm_head"])  # fmt: skip
    assert any("72 tokens" in note for note in report.notes)
    base = llama_fp32.load(torch.float32)
    base.resize_token_embeddings(72)
    merged = PeftModel.from_pretrained(base, tmp_path / "lora").merge_and_unload().state_dict()
    tuned = load_checkpoint(tmp_path / "tuned")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(merged[name], tuned[name]), name
    name = "model.layers.0.self_attn.q_proj.weight"
    assert float((merged[name] - tuned[name]).abs().max()) <= 1e-5


def _gpt2_tuned(gpt2: TinyBase, path: Path) -> Path:
    """GPT-2 with a planted rank-2 change on every Conv1D weight, saved with its config."""
    model = gpt2.load(torch.float32)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and any(k in name for k in ("c_attn", "c_proj", "c_fc")):
                p += (
                    0.05
                    * torch.randn(p.shape[0], 2, generator=g)
                    @ torch.randn(2, p.shape[1], generator=g)
                )
    model.save_pretrained(path)
    return path


def test_conv1d_layout_without_config_must_be_stated(gpt2: TinyBase, tmp_path: Path) -> None:
    from lorasurgeon import IncompatibleError

    tuned_dir = _gpt2_tuned(gpt2, tmp_path / "tuned")
    base_file, tuned_file = tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"
    base_file.write_bytes((gpt2.path / "model.safetensors").read_bytes())
    tuned_file.write_bytes((tuned_dir / "model.safetensors").read_bytes())
    with pytest.raises(IncompatibleError, match="--fan-in-fan-out"):
        lorasurgeon.extract(base_file, tuned_file, tmp_path / "x", rank=2)
    runs = {"stated": (tuned_file, {"fan_in_fan_out": "all"}),
            "tuned_config": (tuned_dir, {})}  # fmt: skip
    for label, (tuned, options) in runs.items():
        out = tmp_path / label
        report = lorasurgeon.extract(base_file, tuned, out, rank=2, **options)  # type: ignore[arg-type]
        assert len(report.modules) == 8
        merged = PeftModel.from_pretrained(gpt2.load(torch.float32), out).merge_and_unload()
        ours, expected = merged.state_dict(), load_checkpoint(tuned_dir)
        for m in report.modules:
            name = m.module + ".weight"
            assert float((ours[name] - expected[name]).abs().max()) <= 1e-5, (label, name)

"""convert: diffusion LoRAs between kohya, diffusers and PEFT, exactly. Round trips give back
every tensor and every module's scaling; converted files loaded by diffusers' load_lora_weights
+ fuse_lora on tiny SD1/SDXL pipelines equal our merge of the original file."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lorasurgeon
from lorasurgeon.formats import Kind, read_lora
from tests.sd_models import (
    TinySD,
    save_diffusers,
    save_ldm,
    sd_kohya_modules,
    tiny_sd,
    write_kohya,
)
from tests.test_merge_diffusion import _run, assert_merged, diffusers_fused_ldm


@pytest.fixture(scope="module")
def models() -> dict[str, TinySD]:
    return {family: tiny_sd(family) for family in ("sd1", "sd2", "sdxl")}


def _varying_alphas(path: Path) -> Path:
    """Each module's alpha its own (1…5, fp16 as sd-scripts saves), the first without one
    (α = r): the case diffusers' kohya loader gets wrong (spec V03b)."""
    state = load_file(str(path))
    alphas = sorted(k for k in state if k.endswith(".alpha"))
    for i, key in enumerate(alphas):
        state[key] = torch.tensor(1.0 + i % 5 + 0.25 * (i % 3), dtype=torch.float16)
    del state[alphas[0]]
    save_file(state, str(path), metadata={"ss_network_module": "networks.lora"})
    return path


def _scalings(path: Path) -> list[tuple[str, Kind, int | None, float]]:
    return [(u.component.value, u.kind, u.rank, u.scaling) for u in read_lora(path).updates]


def _assert_same_tensors(a: Path, b: Path) -> None:
    """The same names, dtypes and values (alphas: the same value, dtype may differ). A module
    stored without alpha (α = r) may come back with an explicit ``alpha`` = r: the same
    scaling, and diffusers' kohya loader gives alpha-less modules another alpha (V03b)."""
    left, right = load_file(str(a)), load_file(str(b))
    for name in set(right) - set(left):
        rank = left[name.removesuffix(".alpha") + ".lora_down.weight"].shape[0]
        assert name.endswith(".alpha") and right.pop(name).item() == rank, name
    assert set(left) == set(right), sorted(set(left) ^ set(right))[:5]
    for name, tensor in left.items():
        if name.endswith(".alpha"):
            assert tensor.double().item() == right[name].double().item(), name
        else:
            assert tensor.dtype == right[name].dtype and torch.equal(tensor, right[name]), name


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("layout", ["ldm", "diffusers"])
def test_kohya_to_diffusers_to_kohya_is_exact(
    models: dict[str, TinySD], tmp_path: Path, family: str, layout: str
) -> None:
    """Per-module alphas (and one module without alpha) survive as alpha_pattern; the names
    come back as sd-scripts writes them (SDXL: LDM names) from either base layout (SD2's LDM
    file: OpenCLIP, q/k/v as row slices of in_proj)."""
    model = models[family]
    lora = _varying_alphas(write_kohya(tmp_path / "k.safetensors", sd_kohya_modules(model)))
    base = (save_ldm(model, tmp_path / "base.safetensors") if layout == "ldm"
            else save_diffusers(model, tmp_path / "base"))  # fmt: skip
    middle = tmp_path / "d.safetensors"
    report = lorasurgeon.convert(lora, middle, to="diffusers", base=base)
    assert report.total == len(sd_kohya_modules(model)) == len(read_lora(middle).updates)
    assert read_lora(middle).format.value == "diffusers"
    assert _scalings(middle) == [(c.replace("te", "te1") if c == "te" else c, *rest)
                                 for c, *rest in _scalings(lora)]  # fmt: skip
    back = tmp_path / "k2.safetensors"
    lorasurgeon.convert(middle, back, to="kohya", base=base)
    _assert_same_tensors(lora, back)
    assert _scalings(back) == _scalings(lora)


def _diffusers_lora(model: TinySD, path: Path, *, patterns: bool) -> Path:
    """A diffusers save_lora_weights file: UNet (attention, proj_in, 3×3 conv1, 1×1
    conv_shortcut) and first text encoder (r 2), lora_alpha 8 (r 4) everywhere, or with rank and
    alpha patterns and another text-encoder alpha when ``patterns``; text-encoder names with
    ``text_model.`` as transformers 4 writes them."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    extra = {"rank_pattern": {"conv1": 2}, "alpha_pattern": {"conv1": 3, "to_v": 5}}
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v", "proj_in", "conv1",
                        "conv_shortcut"], **(extra if patterns else {}))  # fmt: skip
    te_config = LoraConfig(
        r=2,
        lora_alpha=3 if patterns else 8,
        # diffusers reads a kohya text encoder's attention LoRAs only
        # when out_proj has one too (it detects the format by to_out_lora)
        target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1"],
    )
    unet, text = copy.deepcopy(model.unet), copy.deepcopy(model.text_encoders[0])
    unet.add_adapter(config)
    text = inject_adapter_in_model(te_config, text)  # transformers 5's add_adapter wants peft 0.22
    with torch.no_grad():
        for module in (unet, text):
            for name, p in module.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.1)
    text_layers = {
        (k if k.startswith("text_model.") else "text_model." + k).replace(".default", ""): v
        for k, v in text.state_dict().items()
        if "lora_" in k
    }
    StableDiffusionPipeline.save_lora_weights(
        path, unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=text_layers, unet_lora_adapter_metadata=config.to_dict(),
        text_encoder_lora_adapter_metadata=te_config.to_dict(),
    )  # fmt: skip
    return path / "pytorch_lora_weights.safetensors"


def test_diffusers_to_kohya_to_diffusers_is_exact(
    models: dict[str, TinySD], tmp_path: Path
) -> None:
    """diffusers -> kohya needs no base (lora_te_ for SD1's one text encoder, spec §3.4);
    the way back does, and gives every tensor and each module's scaling back."""
    model = models["sd1"]
    lora = _diffusers_lora(model, tmp_path, patterns=True)
    kohya = tmp_path / "k.safetensors"
    report = lorasurgeon.convert(lora, kohya, to="kohya")
    keys = [k for k in load_file(str(lora)) if k.endswith("lora_A.weight")]
    counted = {"unet": sum(k.startswith("unet.") for k in keys), "te1": 15}  # 3 layers × 5
    assert report.converted == counted and sum(counted.values()) == len(keys)
    with safe_open(str(kohya), "pt") as f:
        names = list(f.keys())
        metadata = f.metadata()
        alpha = f.get_slice(names[0].split(".")[0] + ".alpha").get_dtype()
    assert {n.split("_")[1] for n in names} == {"unet", "te"} and alpha == "F32"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "8")
    assert _scalings(kohya) == [(c.replace("te1", "te"), *r) for c, *r in _scalings(lora)]
    back = tmp_path / "d.safetensors"
    lorasurgeon.convert(kohya, back, to="diffusers", base=save_ldm(model, tmp_path / "b.sft"))
    _assert_same_tensors(lora, back)
    assert _scalings(back) == _scalings(lora)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_converted_diffusers_file_fuses_in_diffusers_like_our_merge_of_the_original(
    models: dict[str, TinySD], tmp_path: Path, family: str
) -> None:
    """Alphas vary per module: diffusers gets that wrong reading kohya files (spec V03b) but
    applies our lora_adapter_metadata (alpha_pattern) right, so its fuse of the converted file
    is the oracle for our merge of the original."""
    model = models[family]
    base = save_ldm(model, tmp_path / "base.safetensors")
    lora = _varying_alphas(write_kohya(tmp_path / "k.safetensors", sd_kohya_modules(model)))
    converted = tmp_path / "d.safetensors"
    lorasurgeon.convert(lora, converted, to="diffusers", base=base)
    lorasurgeon.merge(base, [lora], tmp_path / "out.safetensors", weights=[0.7])
    assert_merged(tmp_path / "out.safetensors", base, diffusers_fused_ldm(model, converted, 0.7))


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_kohya_output_of_a_diffusers_file_fuses_in_diffusers_like_our_merge(
    models: dict[str, TinySD], tmp_path: Path, family: str
) -> None:
    """One alpha for every module, where diffusers' kohya loader is right (spec V03); SDXL with
    --base gets sd-scripts' LDM names, which diffusers maps back through the UNet config."""
    model = models[family]
    base = save_ldm(model, tmp_path / "base.safetensors")
    lora = _diffusers_lora(model, tmp_path, patterns=False)
    kohya = tmp_path / "k.safetensors"
    lorasurgeon.convert(lora, kohya, to="kohya", base=base if family == "sdxl" else None)
    unet_names = [n for n in load_file(str(kohya)) if n.startswith("lora_unet_")]
    ldm = any(n.startswith("lora_unet_input_blocks") for n in unet_names)
    assert ldm == (family == "sdxl")
    lorasurgeon.merge(base, [lora], tmp_path / "out.safetensors", weights=[0.6])
    assert_merged(tmp_path / "out.safetensors", base, diffusers_fused_ldm(model, kohya, 0.6))


def _loha(model: TinySD, path: Path) -> tuple[Path, str]:
    """A kohya file with one plain module and one LoHa module on real SD1 targets."""
    linear = [(k, m) for k, m in sd_kohya_modules(model).items() if isinstance(m, torch.nn.Linear)]
    (plain, first), (name, module) = linear[:2]
    state = {f"{plain}.lora_down.weight": torch.randn(2, first.in_features),
             f"{plain}.lora_up.weight": torch.randn(first.out_features, 2),
             f"{name}.hada_w1_a": torch.randn(module.out_features, 2),
             f"{name}.hada_w1_b": torch.randn(2, module.in_features),
             f"{name}.hada_w2_a": torch.randn(module.out_features, 2),
             f"{name}.hada_w2_b": torch.randn(2, module.in_features),
             f"{name}.alpha": torch.tensor(1.0)}  # fmt: skip
    save_file(state, str(path))
    return path, name


def test_bad_conversions_exit_with_one_error_line_and_write_nothing(
    models: dict[str, TinySD], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = models["sd1"]
    base = save_ldm(model, tmp_path / "base.safetensors")
    loha, loha_module = _loha(model, tmp_path / "loha.safetensors")
    kohya = write_kohya(tmp_path / "k.safetensors", sd_kohya_modules(model))
    out = tmp_path / "out.safetensors"
    cases = [  # (args, exit code, words the one error line holds)
        ([loha, "--to", "diffusers", "--base", base], 1, [loha_module, "loha", "--to kohya"]),
        ([loha, "--to", "peft"], 1, [loha_module, "loha"]),
        ([kohya, "--to", "diffusers"], 2, ["k.safetensors", "pass --base"]),
        (
            [kohya, "--to", "peft", "--base", base],
            2,
            ["k.safetensors", "components", "--to diffusers"],
        ),
    ]
    for args, code, words in cases:
        got, err = _run(capsys, "convert", args[0], "-o", out, *args[1:])
        assert got == code, err
        assert err.lower().startswith("error:") and len(err.strip().splitlines()) == 1, err
        assert all(w in err for w in words), err
        assert not out.exists() and not list(tmp_path.glob(".out*"))
    assert lorasurgeon.convert(loha, out, to="kohya").converted == {"unet": 2}  # kept as is
    _assert_same_tensors(loha, out)


def test_unet_only_lora_to_peft_adapter_merges_like_the_original(
    models: dict[str, TinySD], tmp_path: Path
) -> None:
    """A PEFT adapter of one component: diffusers module paths and the same config rules,
    which PEFT's own merge of the UNet applies."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    model = models["sd1"]
    modules = {k: v for k, v in sd_kohya_modules(model).items() if k.startswith("lora_unet_")}
    lora = _varying_alphas(write_kohya(tmp_path / "k.safetensors", modules))
    folder = save_diffusers(model, tmp_path / "base")
    out = tmp_path / "adapter"
    lorasurgeon.convert(lora, out, to="peft", base=folder)
    config = LoraConfig.from_pretrained(str(out))  # every field of the config is PEFT's
    assert config.alpha_pattern and not config.rank_pattern
    unet = inject_adapter_in_model(config, copy.deepcopy(model.unet))
    state = {k.removeprefix("base_model.model."): v
             for k, v in load_file(str(out / "adapter_model.safetensors")).items()}  # fmt: skip
    assert not set_peft_model_state_dict(unet, state).unexpected_keys
    for module in unet.modules():
        if hasattr(module, "merge"):
            module.merge()
    expected = {k: v for k, v in unet.state_dict().items() if "lora_" not in k}
    expected = {k.replace(".base_layer", ""): v for k, v in expected.items()}
    merged = tmp_path / "merged"
    lorasurgeon.merge(folder, [lora], merged)
    got = load_file(str(merged / "unet" / "diffusion_pytorch_model.safetensors"))
    worst = max((got[k] - v).abs().max().item() for k, v in expected.items())
    assert worst <= 1e-6, worst


def test_batch_convert_job_with_a_relative_base(
    models: dict[str, TinySD], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = models["sd1"]
    save_ldm(model, tmp_path / "base.safetensors")
    write_kohya(tmp_path / "k.safetensors", sd_kohya_modules(model))
    manifest = tmp_path / "jobs.yaml"
    manifest.write_text("jobs:\n  - command: convert\n    inputs: [k.safetensors]\n"
                        "    output: out/d.safetensors\n    to: diffusers\n"
                        "    base: base.safetensors\n")  # fmt: skip
    code, err = _run(capsys, "batch", manifest)
    assert code == 0, err
    direct = tmp_path / "direct.safetensors"
    lorasurgeon.convert(tmp_path / "k.safetensors", direct, to="diffusers",
                        base=tmp_path / "base.safetensors")  # fmt: skip
    _assert_same_tensors(direct, tmp_path / "out" / "d.safetensors")
    code, err = _run(capsys, "batch", manifest, "--results", tmp_path / "r.json")
    assert code == 0 and json.loads((tmp_path / "r.json").read_text())["skipped"] == 1, err


def test_an_alpha_fp32_cannot_hold_is_stored_in_float64(tmp_path: Path) -> None:
    """lora_alpha 0.1 (a float64 in diffusers' JSON metadata) would change in an fp32 alpha
    tensor: stored as F64, read back exactly; 0.5 stays fp32 as sd-scripts stores it."""
    lora = tmp_path / "d.safetensors"
    state = {f"unet.{m}.lora_{p}.weight": torch.randn(s) for m in ("a.to_q", "a.to_k")
             for p, s in (("A", (2, 8)), ("B", (8, 2)))}  # fmt: skip
    meta = {"unet.r": 2, "unet.lora_alpha": 0.1, "unet.alpha_pattern": {"a\\.to_k": 0.5}}
    save_file(state, str(lora), metadata={"lora_adapter_metadata": json.dumps(meta)})
    out = tmp_path / "k.safetensors"
    lorasurgeon.convert(lora, out, to="kohya")
    with safe_open(str(out), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys() if k.endswith(".alpha")}
    assert dtypes == {"lora_unet_a_to_q.alpha": "F64", "lora_unet_a_to_k.alpha": "F32"}
    assert {u.module: u.alpha for u in read_lora(out).updates} == {"a_to_q": 0.1, "a_to_k": 0.5}
    assert _scalings(out) == _scalings(lora)

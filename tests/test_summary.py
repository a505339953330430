"""inspect on diffusion LoRA files and checkpoints: format, family, components, ranks and alphas
grouped, metadata in brief; a checkpoint's layout and family; the same in --json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorasurgeon
from lorasurgeon.cli import main
from tests.sd_models import TinySD, save_diffusers, save_ldm, sd_kohya_modules, tiny_sd, write_kohya


@pytest.fixture(scope="module")
def models() -> dict[str, TinySD]:
    return {family: tiny_sd(family) for family in ("sd1", "sdxl")}


def _kohya_with_varying_alphas(model: TinySD, path: Path) -> dict[str, float | None]:
    """A kohya file whose modules have alpha 1, 2 or 3 by turn, the first none; returns each
    module's alpha. The metadata has the keys sd-scripts writes, one long."""
    write_kohya(path, sd_kohya_modules(model))
    state = load_file(str(path))
    alphas: dict[str, float | None] = {}
    for i, key in enumerate(sorted(k for k in state if k.endswith(".alpha"))):
        name = key.removesuffix(".alpha")
        if i == 0:
            del state[key]
            alphas[name] = None
        else:
            state[key] = torch.tensor(float(1 + i % 3))
            alphas[name] = float(1 + i % 3)
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": "4",
                "ss_base_model_version": "sd_v1", "ss_tag_frequency": json.dumps(
                    {"dataset": {f"tag{i}": i for i in range(200)}})}  # fmt: skip
    save_file(state, str(path), metadata=metadata)
    return alphas


def test_inspect_shows_a_kohya_loras_format_family_groups_and_metadata(
    models: dict[str, TinySD], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lora = tmp_path / "lora.safetensors"
    alphas = _kohya_with_varying_alphas(models["sd1"], lora)
    summary = lorasurgeon.summarize(lora)
    d = summary.diffusion
    assert summary.kind == "lora" and d is not None
    assert (d.format, d.family) == ("kohya", "sd1")
    assert d.components == {"unet": len(alphas) - 18, "te": 18}
    assert {f"lora_{m.component}_{m.module}": m.alpha for m in d.modules} == alphas
    assert sum(g.modules for g in d.groups) == len(alphas)
    component = {"lora_te": "te", "lora_unet": "unet"}
    expected = {(component[k.split("_")[0] + "_" + k.split("_")[1]], a) for k, a in alphas.items()}
    assert {(g.component, g.alpha) for g in d.groups} == expected and (None in alphas.values())
    code, out = _run_out(capsys, "inspect", lora)
    assert code == 0 and "lora:       kohya, family sd1" in out
    assert "components: unet 277, te 18" in out
    assert "ss_network_module: networks.lora" in out and "tag199" not in out
    assert "1 more ss_*/modelspec.* keys" in out
    assert len(out.splitlines()) < 30  # grouped, not one line per module (295)
    code, out = _run_out(capsys, "inspect", lora, "--json")
    data = json.loads(out)
    assert data["kind"] == "lora" and data["diffusion"]["format"] == "kohya"
    assert len(data["diffusion"]["modules"]) == len(alphas)
    assert "tag199" in data["metadata"]["ss_tag_frequency"]


def _run_out(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    """Run the CLI; its exit code and stdout."""
    with pytest.raises(SystemExit) as exited:
        main([str(a) for a in args])
    return int(exited.value.code or 0), capsys.readouterr().out


def test_inspect_shows_a_diffusers_loras_components(
    models: dict[str, TinySD], tmp_path: Path
) -> None:
    lora = tmp_path / "k.safetensors"
    write_kohya(lora, sd_kohya_modules(models["sdxl"]))
    converted = tmp_path / "d.safetensors"
    lorasurgeon.convert(lora, converted, to="diffusers", base=save_ldm(models["sdxl"],
                        tmp_path / "base.safetensors"))  # fmt: skip
    d = lorasurgeon.summarize(converted).diffusion
    assert d is not None and (d.format, d.family) == ("diffusers", "sdxl")
    assert d.components == {"unet": 307, "te1": 18, "te2": 18}
    assert {(g.kind, g.rank, g.alpha) for g in d.groups} == {("lora", 4, 2.0)}


@pytest.mark.parametrize("layout", ["ldm", "diffusers"])
def test_inspect_shows_a_checkpoints_layout_family_and_components(
    models: dict[str, TinySD], tmp_path: Path, capsys: pytest.CaptureFixture[str], layout: str
) -> None:
    model = models["sdxl"]
    base = (save_ldm(model, tmp_path / "base.safetensors") if layout == "ldm"
            else save_diffusers(model, tmp_path / "base"))  # fmt: skip
    summary = lorasurgeon.summarize(base)
    d = summary.diffusion
    assert summary.kind == "checkpoint" and d is not None
    assert (d.format, d.layout, d.family) == (None, layout, "sdxl")
    assert set(d.components) == {"unet", "te1", "te2"}
    assert d.parts == ([] if layout == "ldm" else ["text_encoder", "text_encoder_2", "unet"])
    code, out = _run_out(capsys, "inspect", base)
    assert code == 0 and f"layout:     {layout}, family sdxl" in out
    code, out = _run_out(capsys, "inspect", base, "--json")
    assert json.loads(out)["diffusion"]["layout"] == layout

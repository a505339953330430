"""Draw ``lorasurgeon diff --spectrum --plot`` for a planted change and screenshot it.

    .venv/bin/python bench/diff_picture.py docs/diff-plot.png

Builds two small Llama-named checkpoints (6 layers, 64 wide) whose difference is planted:
attention projections change in every layer by a rank-(layer + 1) update whose size grows
with the layer, the MLP changes only in layer 4 (rank 2, the largest relative change),
norms and embeddings not at all. Runs ``diff --spectrum 16 --plot`` and opens the HTML in
headless Chromium (``chromium`` on PATH, e.g. ``apt-get install chromium``) for a PNG.
``tests/test_diff.py`` runs the same and checks the picture's cells.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
LAYERS, WIDTH, HIDDEN = 6, 64, 128
MLP_LAYER = 4


def _shape(kind: str) -> tuple[int, int]:
    return {"gate_proj": (HIDDEN, WIDTH), "up_proj": (HIDDEN, WIDTH)}.get(
        kind, (WIDTH, HIDDEN) if kind == "down_proj" else (WIDTH, WIDTH)
    )


def planted_pair(root: Path) -> tuple[Path, Path]:
    """Write ``a.safetensors`` and ``b.safetensors`` under ``root`` (see the module doc)."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    a: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": torch.randn(100, WIDTH, generator=gen)
    }
    b = dict(a)
    for layer in range(LAYERS):
        for kind in ATTENTION + MLP:
            group = "self_attn" if kind in ATTENTION else "mlp"
            name = f"model.layers.{layer}.{group}.{kind}.weight"
            w = torch.randn(_shape(kind), generator=gen) * 0.05
            a[name] = w
            rank, size = (layer + 1, 10.0 ** (-3 + layer / 3)) if kind in ATTENTION else (2, 1.0)
            if kind in MLP and layer != MLP_LAYER:
                b[name] = w
                continue
            left = torch.randn(w.shape[0], rank, generator=gen)
            right = torch.randn(rank, w.shape[1], generator=gen)
            change = left @ right
            b[name] = w + change * (size * float(w.norm() / change.norm()))
        norm = f"model.layers.{layer}.input_layernorm.weight"
        a[norm] = b[norm] = torch.ones(WIDTH)
    save_file(a, str(root / "a.safetensors"))
    save_file(b, str(root / "b.safetensors"))
    return root / "a.safetensors", root / "b.safetensors"


def screenshot(page: Path, png: Path, *, width: int = 640, height: int = 920) -> Path:
    """A PNG of ``page`` as headless Chromium draws it.

    Raises:
        FileNotFoundError: no ``chromium`` on PATH.
        subprocess.CalledProcessError: Chromium failed.
    """
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        raise FileNotFoundError("chromium is not installed (apt-get install chromium)")
    subprocess.run(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--window-size={width},{height}", f"--screenshot={png.resolve()}",
         page.resolve().as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return png


def draw(root: Path, png: Path) -> Path:
    """Planted pair -> diff --spectrum 16 --plot root/diff.html -> ``png``."""
    a, b = planted_pair(root)
    page = root / "diff.html"
    cmd = [sys.executable, "-m", "lorasurgeon", "diff", str(a), str(b), "--spectrum", "16",
           "--plot", str(page), "--device", "cpu"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    return screenshot(page, png)


def main(argv: list[str]) -> int:
    png = Path(argv[0] if argv else "diff-plot.png")
    with tempfile.TemporaryDirectory() as tmp:
        draw(Path(tmp), png)
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

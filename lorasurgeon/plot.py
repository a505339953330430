"""Pictures of ``diff --spectrum`` and ``extract`` reports: one self-contained HTML or SVG file.

Plain SVG written here, no plotting library: a heat map of the relative change per layer and
module kind, singular spectra on a log scale with a rank marked, and the error per module.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import OptionError, OutputError

if TYPE_CHECKING:
    from .diff import DiffReport
    from .extract import ExtractReport

__all__ = [
    "PLOT_SUFFIXES",
    "bars_svg",
    "check_plot_path",
    "heatmap_svg",
    "plot_diff",
    "plot_extract",
    "spectra_svg",
    "write_plot",
]

#: File name endings ``--plot`` writes.
PLOT_SUFFIXES = (".html", ".svg")

# viridis at 0, 0.25, 0.5, 0.75, 1
_STOPS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
_FONT = 'font-family="sans-serif" font-size="11"'


def _color(x: float) -> str:
    x = min(max(x, 0.0), 1.0) * (len(_STOPS) - 1)
    i = min(int(x), len(_STOPS) - 2)
    f = x - i
    rgb = (round(a + (b - a) * f) for a, b in zip(_STOPS[i], _STOPS[i + 1], strict=True))
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _text(x: float, y: float, s: str, anchor: str = "start", extra: str = "") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" {_FONT} {extra}>'
            f"{html.escape(s)}</text>")  # fmt: skip


def _svg(width: float, height: float, body: list[str], title: str) -> str:
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}">')  # fmt: skip
    heading = _text(8, 16, title, extra='font-weight="bold"')
    return "\n".join([head, '<rect width="100%" height="100%" fill="white"/>', heading, *body,
                      "</svg>"])  # fmt: skip


def heatmap_svg(rows: Sequence[int], columns: Sequence[str],
                values: Mapping[tuple[int, str], float], title: str) -> str:  # fmt: skip
    """Cells colored by log10 of their value (rows: layers, columns: module kinds); zero and
    missing cells are grey and white."""
    cell_w, cell_h, left, top = 64.0, max(8.0, min(18.0, 360.0 / max(len(rows), 1))), 48.0, 90.0
    logs = [math.log10(v) for v in values.values() if v > 0 and math.isfinite(v)]
    low, high = (min(logs), max(logs)) if logs else (0.0, 1.0)
    span = (high - low) or 1.0
    body = [_text(left + (j + 0.3) * cell_w, top - 6, c, "start",
                  f'transform="rotate(-30 {left + (j + 0.3) * cell_w:.1f} {top - 6:.1f})"')
            for j, c in enumerate(columns)]  # fmt: skip
    for i, r in enumerate(rows):
        y = top + i * cell_h
        body.append(_text(left - 6, y + cell_h * 0.75, str(r), "end"))
        for j, c in enumerate(columns):
            v = values.get((r, c))
            fill = "white" if v is None else "#dddddd" if v <= 0 else _color(
                (math.log10(v) - low) / span)  # fmt: skip
            tip = "" if v is None else f"<title>layer {r} {html.escape(c)}: {v:.3e}</title>"
            body.append(f'<rect x="{left + j * cell_w:.1f}" y="{y:.1f}" width="{cell_w - 1:.1f}" '
                        f'height="{cell_h - 1:.1f}" fill="{fill}">{tip}</rect>')  # fmt: skip
    legend_y = top + len(rows) * cell_h + 16
    for k in range(50):
        body.append(f'<rect x="{left + k * 4:.0f}" y="{legend_y:.0f}" width="4" height="10" '
                    f'fill="{_color(k / 49)}"/>')  # fmt: skip
    body += [_text(left, legend_y + 24, f"{10**low:.1e}"),
             _text(left + 200, legend_y + 24, f"{10**high:.1e} (log scale)", "end")]  # fmt: skip
    width = max(left + len(columns) * cell_w + 90, 320)
    return _svg(width, legend_y + 34, body, title)


def spectra_svg(series: Sequence[tuple[str, Sequence[float], int | None]], title: str) -> str:
    """Singular values (y, log scale) by index (x) for each series, its rank marked by a dot."""
    w, h, left, top, bottom = 560.0, 300.0, 56.0, 28.0, 36.0
    positive = [v for _, vals, _ in series for v in vals if v > 0]
    low = math.floor(math.log10(min(positive))) if positive else -1
    high = math.ceil(math.log10(max(positive))) if positive else 0
    high = high if high > low else low + 1
    k = max((len(vals) for _, vals, _ in series), default=1)

    def xy(i: int, v: float) -> tuple[float, float]:
        x = left + (w - left - 12) * (i / max(k - 1, 1))
        y = top + (h - top - bottom) * (high - math.log10(max(v, 10.0**low))) / (high - low)
        return x, y

    body = []
    for e in range(low, high + 1):
        _, y = xy(0, 10.0**e)
        body += [f'<line x1="{left}" x2="{w - 12}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>',
                 _text(left - 4, y + 4, f"1e{e}", "end")]  # fmt: skip
    body.append(_text((left + w) / 2, h - 6, "singular value index", "middle"))
    for n, (name, vals, rank) in enumerate(series):
        color = _color(n / max(len(series) - 1, 1) * 0.9)
        points = " ".join("{:.1f},{:.1f}".format(*xy(i, v)) for i, v in enumerate(vals))
        body.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="1">'
                    f"<title>{html.escape(name)}</title></polyline>")  # fmt: skip
        if rank is not None and 0 < rank <= len(vals):
            x, y = xy(rank - 1, vals[rank - 1])
            body.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="red">'
                        f"<title>{html.escape(name)}: rank {rank}</title></circle>")  # fmt: skip
    return _svg(w, h, body, title)


def bars_svg(items: Sequence[tuple[str, float]], title: str) -> str:
    """One bar per item (in order), heights on a linear scale from 0 to the largest."""
    w, h, left, top, bottom = 560.0, 220.0, 56.0, 28.0, 24.0
    top_value = max((v for _, v in items if math.isfinite(v)), default=0.0) or 1.0
    step = (w - left - 12) / max(len(items), 1)
    body = [_text(left - 4, top + 4, f"{top_value:.3g}", "end"), _text(left - 4, h - bottom, "0",
                                                                        "end")]  # fmt: skip
    for i, (name, v) in enumerate(items):
        height = (h - top - bottom) * min(max(v, 0.0) / top_value, 1.0)
        body.append(f'<rect x="{left + i * step:.1f}" y="{h - bottom - height:.1f}" '
                    f'width="{max(step - 1, 0.5):.1f}" height="{height:.1f}" fill="{_color(0.3)}">'
                    f"<title>{html.escape(name)}: {v:.4g}</title></rect>")  # fmt: skip
    body.append(_text((left + w) / 2, h - 6, "module (in checkpoint order)", "middle"))
    return _svg(w, h, body, title)


def diff_panels(report: DiffReport) -> list[str]:
    """The pictures of a diff: relative change heat map, spectra, share kept at rank 99%."""
    from .diff import ENERGY_LEVELS, Status

    # equal tensors are drawn as zero (grey); tensors on one side or reshaped are left out
    compared = (Status.EQUAL, Status.CHANGED, Status.DTYPE)
    layered = [t for t in report.tensors if t.layer is not None and t.status in compared]
    kinds = sorted({t.kind for t in layered if t.rel_change})
    layers = sorted({t.layer for t in layered if t.layer is not None})
    values = {(t.layer, t.kind): t.rel_change or 0.0 for t in layered if t.layer is not None}
    panels = [heatmap_svg(layers, kinds, values, "relative change ‖B−A‖/‖A‖ by layer and module")]
    spectra = [t for t in report.tensors if t.spectrum is not None]
    level = f"{ENERGY_LEVELS[-1]:g}"
    if spectra:
        series = [(t.name, t.spectrum.values, t.spectrum.ranks[level])
                  for t in spectra if t.spectrum is not None]  # fmt: skip
        panels.append(spectra_svg(series, "singular values of each change (dot: rank for 99%)"))
        ranks = [(t.name, float(t.spectrum.ranks[level] or len(t.spectrum.values) + 1))
                 for t in spectra if t.spectrum is not None]  # fmt: skip
        panels.append(bars_svg(ranks, "rank each change needs for 99% of its energy"))
    return panels


def extract_panels(report: ExtractReport) -> list[str]:
    """The pictures of an extraction: relative error per layer and module, and per module."""
    from .diff import layer_of, module_kind

    values = {}
    for m in report.modules:
        layer = layer_of(m.module + ".weight")
        if layer is not None:
            values[(layer, module_kind(m.module + ".weight"))] = m.rel_error
    rows = sorted({r for r, _ in values})
    columns = sorted({c for _, c in values})
    return [
        heatmap_svg(rows, columns, values, "relative error of the extracted LoRA by layer"),
        bars_svg([(m.module, m.rel_error) for m in report.modules],
                 "relative error per module (rank in the tooltip's name)"),
    ]  # fmt: skip


def check_plot_path(path: str | os.PathLike[str]) -> Path:
    """The ``--plot`` path, if its ending is one this module writes.

    Raises:
        OptionError: another ending (PNG needs a rasterizer, which this tool does not ship).
    """
    out = Path(path)
    if out.suffix.lower() not in PLOT_SUFFIXES:
        raise OptionError(
            f"--plot {out.name}: cannot write {out.suffix or 'a file without an ending'}",
            hint="name a .html or .svg file (open the .html in a browser, or screenshot it)",
        )
    return out


def write_plot(path: str | os.PathLike[str], title: str, panels: Sequence[str]) -> Path:
    """Write ``panels`` (SVG documents) as one HTML page or one SVG stacked top to bottom.

    Raises:
        OptionError: an ending other than .html or .svg.
        OutputError: the file cannot be written.
    """
    out = check_plot_path(path)
    if out.suffix.lower() == ".html":
        text = "\n".join([
            "<!DOCTYPE html>", '<html><head><meta charset="utf-8">',
            f"<title>{html.escape(title)}</title>",
            "<style>body{font-family:sans-serif;margin:16px}svg{display:block;margin:12px 0}"
            "</style></head><body>", f"<h2>{html.escape(title)}</h2>", *panels,
            "</body></html>",
        ])  # fmt: skip
    else:
        text = _stack(panels)
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as e:
        raise OutputError(f"cannot write: {e.strerror}", path=out) from e
    return out


def _stack(panels: Sequence[str]) -> str:
    """One SVG holding ``panels`` one below the other (each as a nested <svg>)."""
    y, parts, width = 0.0, [], 0.0
    for p in panels:
        head = p.split(">", 1)[0]
        w = float(head.split('width="', 1)[1].split('"', 1)[0])
        h = float(head.split('height="', 1)[1].split('"', 1)[0])
        parts.append(p.replace("<svg ", f'<svg y="{y:.0f}" ', 1))
        y, width = y + h, max(width, w)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{y:.0f}">\n'
            + "\n".join(parts) + "\n</svg>")  # fmt: skip


def plot_diff(report: DiffReport, path: str | os.PathLike[str]) -> Path:
    """Write the pictures of ``report`` (see ``diff_panels``) to ``path`` (.html or .svg).

    Raises:
        OptionError, OutputError: as ``write_plot``.
    """
    return write_plot(path, f"lorasurgeon diff {report.a} {report.b}", diff_panels(report))


def plot_extract(report: ExtractReport, path: str | os.PathLike[str]) -> Path:
    """Write the pictures of an extraction report to ``path`` (.html or .svg).

    Raises:
        OptionError, OutputError: as ``write_plot``.
    """
    return write_plot(path, f"lorasurgeon extract {report.out}", extract_panels(report))

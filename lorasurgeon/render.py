"""Text renderings of reports, plans and summaries for the command line.

Pure functions from the API's typed results to lines of text; ``cli`` prints them. Nothing
here prints, reads a file or touches a tensor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import (
        CombineReport,
        ConvertReport,
        ExtractReport,
        MergePlan,
        MergeReport,
        ResizeReport,
        Summary,
    )
    from .batch import Job, JobResult
    from .diff import DiffReport, Spectrum, TensorDiff
    from .summary import DiffusionSummary
    from .verify import VerifyReport

__all__ = [
    "batch_line",
    "batch_plan_lines",
    "batch_table",
    "combine_lines",
    "convert_lines",
    "count",
    "diff_lines",
    "diffusion_lines",
    "extract_lines",
    "merge_lines",
    "merge_plan_lines",
    "provenance_lines",
    "resize_lines",
    "size",
    "summary_lines",
    "verify_lines",
]


def size(n: float) -> str:
    """A byte count in decimal units: 512 B, 2.20 GB."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def count(n: int) -> str:
    """A count with separators and a short form: 16,384 (16.38K)."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n:,} ({n / scale:.2f}{unit})"
    return f"{n:,}"


def _ranks(ranks: Sequence[int]) -> str:
    low, high = min(ranks, default=0), max(ranks, default=0)
    return f"rank {low}" if low == high else f"ranks {low}-{high}"


def _errors(data: dict[str, float], kept: float | None = None) -> str:
    line = (f"relative error: worst {data['worst_rel_error']:.4f}, median "
            f"{data['median_rel_error']:.4f}")  # fmt: skip
    return line if kept is None else f"{line}; energy kept: worst {kept:.4f}"


def merge_lines(report: MergeReport) -> list[str]:
    return [
        f"wrote {report.out}: {report.changed} tensors merged, {report.copied} copied, "
        f"{size(report.bytes_written)} in {report.seconds:.1f} s"
    ]


def merge_plan_lines(plan: MergePlan) -> list[str]:
    """What ``merge --dry-run`` prints: every tensor that would change, and by what."""
    changes = plan.changes
    verb = "unmerge" if plan.unmerge else "merge"
    lines = [f"dry run: {verb} would change {len(changes)} of {len(plan.tensors)} tensors"]
    lines += [f"  {name}: {'; '.join(items)}" for name, items in changes.items()]
    shards = len(plan.layout.shards)
    lines.append(
        f"{len(plan.tensors) - len(changes)} tensors copied unchanged; output: "
        f"{'one file' if plan.output_is_file else f'{shards} shard(s)'}, "
        f"{size(plan.layout.total_size)}; nothing was written"
    )
    return lines


def extract_lines(report: ExtractReport) -> list[str]:
    """The summary that ends ``extract``: ranks, errors, what the adapter leaves out."""
    ranks = [m.rank for m in report.modules]
    kept = min((m.energy_kept for m in report.modules), default=1.0)
    lines = [
        f"wrote {report.out}: {len(report.modules)} modules, {_ranks(ranks)} (total {sum(ranks)}), "
        f"{count(report.total_params)} parameters, {report.seconds:.1f} s",
        _errors(report.to_dict(), kept),
    ]
    if report.skipped_equal:
        lines.append(f"{report.skipped_equal} selected weights are equal in both and were skipped")
    if report.saved_modules:
        lines.append(f"saved whole: {', '.join(report.saved_modules)}")
    for te in report.unchanged_text:
        lines.append(
            f"text encoder {te['component']} left out as unchanged: {te['modules']} modules, "
            f"max |tuned - base| {te['max_abs']:.3g} (--min-te-diff)"
        )
    if report.not_in_adapter:
        share = sum(row["share"] or 0.0 for row in report.not_in_adapter)
        lines.append(
            f"{len(report.not_in_adapter)} changed tensors are not in the adapter "
            f"({share:.2%} of the update; see --report); largest: "
            f"{report.not_in_adapter[0]['tensor']}"
        )
    return lines


def combine_lines(report: CombineReport, adapters: int) -> list[str]:
    shared = sum(1 for m in report.modules if m.adapters > 1)
    data = report.to_dict()
    return [
        f"wrote {report.out}: {report.method} of {adapters} adapters, "
        f"{len(report.modules)} modules ({shared} shared), "
        f"{_ranks([m.rank for m in report.modules])}, {count(report.total_params)} "
        f"parameters, {report.seconds:.1f} s",
        f"distance from the exact weighted sum: worst {data['worst_rel_error']:.4f}, "
        f"median {data['median_rel_error']:.4f}",
    ]


def resize_lines(report: ResizeReport) -> list[str]:
    kept = min((m.energy_kept for m in report.modules), default=1.0)
    return [
        f"wrote {report.out}: {len(report.modules)} modules, "
        f"{_ranks([m.rank for m in report.modules])}"
        f"{' (each kept)' if report.rank_method == 'keep' else ''}, "
        f"{count(report.total_params)} parameters (was {count(report.input_params)}), "
        f"{report.seconds:.1f} s",
        _errors(report.to_dict(), kept),
    ]


def convert_lines(report: ConvertReport) -> list[str]:
    parts = ", ".join(f"{name} {n}" for name, n in report.converted.items())
    return [
        f"wrote {report.out}: {report.total} modules converted from {report.source_format} to "
        f"{report.format} ({parts}), {report.alphas} with their own alpha, family "
        f"{report.family}, {report.seconds:.1f} s"
    ]


def batch_line(done: int, total: int, result: JobResult) -> str:
    """One finished job, as the batch reports it when it finishes."""
    detail = result.error or result.figure
    return (f"[{done}/{total}] {result.status.value:<7} {result.name}  "
            f"{result.seconds:.1f} s  {detail}").rstrip()  # fmt: skip


def batch_table(results: Sequence[JobResult], not_run: int = 0) -> list[str]:
    """The final table of a batch (job, status, time, output, figure of merit) and totals."""
    rows = [("job", "status", "time", "output", "figure of merit")]
    rows += [(r.name, r.status.value, f"{r.seconds:.1f} s", r.output,
              r.error or r.figure) for r in results]  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join([*(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)), row[4]])
             .rstrip() for row in rows]  # fmt: skip
    counts = {s: sum(1 for r in results if r.status.value == s) for s in
              ("done", "skipped", "failed")}  # fmt: skip
    total = ", ".join(f"{n} {s}" for s, n in counts.items())
    lines.append(total + (f", {not_run} not run (--fail-fast)" if not_run else ""))
    return lines


def batch_plan_lines(
    jobs: Sequence[Job], done: Sequence[bool], estimates: Sequence[int] | None = None
) -> list[str]:
    """What ``batch --dry-run`` prints: each job, its inputs and output, run or skip, and its
    estimated peak memory (bytes)."""
    from .footprint import describe

    lines = []
    for i, (job, finished) in enumerate(zip(jobs, done, strict=True)):
        action = "skip (done)" if finished else "run"
        if estimates is not None:
            action += f", peak memory <= {describe(estimates[i])}"
        lines.append(f"{job.name}: {job.command.value} {' '.join(job.inputs)} -> {job.output}"
                     f"  [{action}]")  # fmt: skip
    lines.append(f"{len(jobs)} jobs: {sum(done)} done, {len(jobs) - sum(done)} to run")
    return lines


def provenance_lines(record: dict[str, Any] | None) -> list[str]:
    """How an output was made (its lorasurgeon.json): command, options, inputs, outputs."""
    if record is None:
        return []
    options = " ".join(f"--{k}={v}" for k, v in sorted((record.get("options") or {}).items())
                       if v is not None and v is not False)  # fmt: skip
    lines = [f"made by:    lorasurgeon {record.get('version')} {record.get('command')} {options}"]
    for item in record.get("inputs") or []:
        where = item.get("location")
        if item.get("repo_id"):
            where = f"{item['repo_id']}@{item.get('revision')}"
        lines.append(f"  {item.get('role')}: {where}")
        for f in item.get("files") or []:
            lines.append(f"    {f.get('name')}  {f.get('size')} bytes  sha256 {f.get('sha256')}")
    for f in record.get("outputs") or []:
        lines.append(f"  output: {f.get('name')}  {f.get('size')} bytes  sha256 {f.get('sha256')}")
    # the record comes from a file: escape control characters before they reach a terminal
    return ["".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in line) for line in lines]


def summary_lines(s: Summary) -> list[str]:
    """What ``inspect`` prints for a checkpoint or an adapter."""
    dtypes = ", ".join(f"{k} {count(v)}" for k, v in s.dtypes.items())
    lines = [
        f"location:   {s.location}", f"kind:       {s.kind}", f"format:     {s.format}",
        f"tensors:    {s.tensors}", f"parameters: {count(s.parameters)}",
        f"size:       {size(s.size_bytes)}", f"dtypes:     {dtypes}",
    ]  # fmt: skip
    if s.model_type:
        lines.append(f"model_type: {s.model_type}")
    if s.diffusion is not None:
        lines += diffusion_lines(s.diffusion, s.metadata or {})
    lines += provenance_lines(s.provenance)
    if s.kind != "adapter":
        return lines
    lines += [
        f"peft_type:  {s.peft_type}", f"r:          {s.r}", f"lora_alpha: {s.lora_alpha:g}",
        f"rslora:     {s.use_rslora}", f"dora:       {s.use_dora}",
        f"targets:    {s.target_modules}", f"modules:    {len(s.modules)}",
    ]  # fmt: skip
    width = max((len(m.module) for m in s.modules), default=6)
    lines.append(f"  {'module':<{width}}  rank  alpha  scaling")
    for m in s.modules:
        dora = "  dora" if m.dora else ""
        lines.append(f"  {m.module:<{width}}  {m.rank:>4}  {m.alpha:>5g}  {m.scaling:>7.4g}{dora}")
    if s.saved_whole:
        lines.append(f"saved whole: {', '.join(s.saved_whole)}")
    if s.ignored_modules:
        lines.append(f"ignored (not selected by the config): {', '.join(s.ignored_modules)}")
    return lines + _client_lines(s)


#: The training metadata ``inspect`` shows of a kohya LoRA (the rest is counted).
_SHOWN_METADATA = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
                   "ss_base_model_version", "ss_sd_model_name", "ss_resolution",
                   "ss_clip_skip", "ss_mixed_precision", "modelspec.architecture",
                   "modelspec.title")  # fmt: skip


def _number(value: float | None) -> str:
    return "none" if value is None else f"{value:g}"


def diffusion_lines(d: DiffusionSummary, metadata: Mapping[str, str]) -> list[str]:
    """A diffusion LoRA's format, family, components and modules grouped by component, kind,
    rank and alpha, plus its training metadata in brief; a checkpoint's layout and family."""
    components = ", ".join(f"{c} {n}" for c, n in d.components.items())
    if d.format is None:
        lines = [f"layout:     {d.layout}, family {d.family}"
                 + (", inpainting" if d.inpainting else ""),
                 f"components: {components} (modules a LoRA may target)"]  # fmt: skip
        return lines + ([f"folders:    {', '.join(d.parts)}"] if d.parts else [])
    lines = [
        f"lora:       {d.format}, family {d.family}",
        f"components: {components}",
        "  component  kind          rank  alpha  modules",
    ]
    for g in sorted(d.groups, key=lambda g: (g.component, g.kind, g.rank or 0, g.alpha or 0)):
        lines.append(f"  {g.component:<9}  {g.kind:<12}  {g.rank if g.rank is not None else '-':>4}"
                     f"  {_number(g.alpha):>5}  {g.modules:>7}")  # fmt: skip
    dora = sum(m.dora for m in d.modules)
    if dora:
        lines.append(f"  DoRA (dora_scale): {dora} modules")
    shown = [k for k in _SHOWN_METADATA if k in metadata]
    for key in shown:
        value = metadata[key]
        lines.append(f"  {key}: {value if len(value) <= 60 else value[:57] + '...'}")
    others = [k for k in metadata if k.startswith(("ss_", "modelspec.")) and k not in shown]
    if others:
        lines.append(f"  ... {len(others)} more ss_*/modelspec.* keys (--json shows them)")
    return lines


def _client_lines(s: Summary) -> list[str]:
    """Whether each serving client applies the adapter as PEFT does, and why not."""
    lines = ["applied as PEFT does:"]
    width = max((len(c.client) for c in s.clients), default=0)
    verdicts = {"right": "yes", "wrong": "NO", "refused": "refused", "unknown": "unknown"}
    for c in s.clients:
        reasons = f" ({'; '.join(c.reasons)})" if c.reasons else ""
        lines.append(f"  {c.client:<{width}}  {verdicts.get(c.verdict, c.verdict)}{reasons}")
    if any(c.verdict == "wrong" for c in s.clients):
        lines.append("  fix: lorasurgeon resize ADAPTER -o OUT writes the same update with one "
                     "lora_alpha; add --uniform-rank for vLLM")  # fmt: skip
    return lines


def _cell(value: float | None) -> str:
    return "-" if value is None else ("0" if value == 0 else f"{value:.2e}")


def _table(tensors: Sequence[TensorDiff]) -> list[str]:
    """Relative change per layer (rows) and module kind (columns), changed kinds only."""
    kinds = sorted({t.kind for t in tensors if t.layer is not None and t.rel_change})
    layers = sorted({t.layer for t in tensors if t.layer is not None})
    if not kinds or not layers:
        return []
    cells = {(t.layer, t.kind): t.rel_change for t in tensors if t.layer is not None}
    width = max(9, *(len(k) for k in kinds))
    lines = ["relative change by layer:", "  layer " + " ".join(f"{k:>{width}}" for k in kinds)]
    for layer in layers:
        row = " ".join(f"{_cell(cells.get((layer, k))):>{width}}" for k in kinds)
        lines.append(f"  {layer:>5} {row}")
    return lines


def _ranks_text(s: Spectrum | None) -> str:
    if s is None:
        return ""
    k = len(s.values)
    ranks = "/".join(str(r) if r is not None else f">{k}" for r in s.ranks.values())
    return f"  rank 50/90/99%: {ranks} (top {k}: {s.kept:.1%})"


def diff_lines(report: DiffReport, *, limit: int = 20) -> list[str]:
    """What ``diff`` prints: counts, the change by model part, a layer table, the largest
    changes and, with ``--spectrum``, the ranks and what extracting at them costs."""
    from .diff import Status

    counts = ", ".join(f"{report.count(s)} {s.value.replace('_', ' in ')}" for s in Status
                       if report.count(s))  # fmt: skip
    lines = [f"{report.a} -> {report.b}: {len(report.tensors)} tensors: {counts}"]
    if report.identical:
        return [*lines, "the checkpoints are identical (every tensor bit for bit)"]
    parts = [f"{g} {v['share']:.1%} ({int(v['changed'])}/{int(v['tensors'])} changed)"
             for g, v in report.groups.items()]  # fmt: skip
    lines.append("share of the change: " + ", ".join(parts))
    lines += _table(report.tensors)
    changed = sorted((t for t in report.tensors if t.rel_change is not None and t.rel_change > 0),
                     key=lambda t: -(t.rel_change or 0.0))  # fmt: skip
    if changed:
        lines.append(f"largest relative changes ({min(limit, len(changed))} of {len(changed)}):")
    for t in changed[:limit]:
        lines.append(f"  {t.name}: {t.rel_change:.3e}, max abs {t.max_abs:.3e}"
                     f"{_ranks_text(t.spectrum)}")  # fmt: skip
    for t in report.tensors:
        if t.status in (Status.ONLY_A, Status.ONLY_B, Status.SHAPE) or (t.status is Status.DTYPE):
            lines.append(f"  {t.name}: {_status_text(t)}")
    for level, cost in report.rank_costs.items():
        floor = f" (at least: {cost['over_k']} need more than {report.spectrum})" if cost[
            "over_k"] else ""  # fmt: skip
        lines.append(f"extracting {float(level):.0%} of every change: {count(cost['params'])} "
                     f"LoRA parameters over {cost['modules']} weights{floor}")  # fmt: skip
    return lines


def _status_text(t: TensorDiff) -> str:
    from .diff import Status

    if t.status is Status.ONLY_A:
        return f"only in A {list(t.shape_a or ())} {t.dtype_a}"
    if t.status is Status.ONLY_B:
        return f"only in B {list(t.shape_b or ())} {t.dtype_b}"
    if t.status is Status.SHAPE:
        return f"shape {list(t.shape_a or ())} -> {list(t.shape_b or ())}"
    return f"dtype {t.dtype_a} -> {t.dtype_b}"


def verify_lines(report: VerifyReport, *, limit: int = 10) -> list[str]:
    """What ``verify`` prints: the verdict and the first tensors that do not match."""
    if report.matches:
        return [f"{report.merged} matches the merge of {', '.join(map(str, report.adapters))} "
                f"into {report.base}: {report.checked} tensors ({report.merged_count} merged) "
                f"within rounding, {report.seconds:.1f} s"]  # fmt: skip
    lines = [f"{report.merged} does not match: {len(report.mismatches)} of {report.checked} "
             f"tensors differ; first {min(limit, len(report.mismatches))}:"]  # fmt: skip
    for m in report.mismatches[:limit]:
        detail = ""
        if m.max_abs is not None:
            share = "" if m.share_of_delta is None else (
                f", {m.share_of_delta:.1%} of the merge's change")  # fmt: skip
            detail = f" (max abs {m.max_abs:.3e}{share}, {m.elements} elements)"
        lines.append(f"  {m.tensor}: {m.what}{detail}")
    return lines

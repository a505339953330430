"""The ``lorasurgeon`` command: click commands over the public API.

The only module that imports click or tqdm, prints, or exits. Errors are reported in one place,
``main``: a ``LorasurgeonError`` prints one ``error:`` line and exits 1; usage errors exit 2.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any, TypeVar

import click

import lorasurgeon as api

from . import render

F = TypeVar("F", bound=Callable[..., Any])
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class SizeParam(click.ParamType):  # type: ignore[type-arg]
    """A byte size: 5GB, 500MB, 2GiB or a plain number of bytes."""

    name = "SIZE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            return api.parse_size(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


class DeviceParam(click.ParamType):  # type: ignore[type-arg]
    """auto, cpu, cuda or cuda:N."""

    name = "auto|cpu|cuda|cuda:N"

    def get_metavar(self, param: click.Parameter, ctx: click.Context) -> str:
        return self.name  # click would upper-case it, but the values are lower case

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value).strip().lower()
        if not _DEVICE.match(text):
            self.fail(f"{value!r} is not auto, cpu, cuda or cuda:N", param, ctx)
        return text


_DEVICE_OPTION = click.option(
    "--device", type=DeviceParam(), default="auto", show_default=True,
    help="Where to compute: the first GPU when there is one, else the CPU.",
)  # fmt: skip


def _common(f: F) -> F:
    f = click.option("--quiet", "-q", is_flag=True, help="No progress bars.")(f)
    f = click.option("--debug", is_flag=True, help="Show a traceback on errors.")(f)
    return f


def _compute_options(f: F) -> F:
    """--overwrite, --device, --quiet and --debug: shared by the commands that write."""
    f = _common(f)
    f = _DEVICE_OPTION(f)
    f = click.option(
        "--overwrite", is_flag=True, help="Replace OUT if it exists (only once done)."
    )(f)
    return f


_ADAPTER_OUTPUT = click.option(
    "-o", "--output", "out", required=True, metavar="OUT",
    help="What to write: a PEFT adapter directory, or with --format kohya/diffusers (the "
    "default for diffusion inputs) one LoRA .safetensors file.",
)  # fmt: skip
_UNIFORM_RANK = click.option(
    "--uniform-rank", is_flag=True,
    help="Store every module at the largest rank, zero-padded, with no rank_pattern: right "
    "in every client, vLLM included; the summary states what it costs.",
)  # fmt: skip
_REPORT = click.option(
    "--report", "report_path", default=None, metavar="FILE.json",
    help="Write the per-module figures as JSON.",
)  # fmt: skip


_FAN_IN_FAN_OUT = click.option(
    "--fan-in-fan-out", default=None, metavar="MODULES|all|none",
    help="Which 2-D modules are GPT-2 Conv1D (stored in x out); needed when the base has no "
    "config.json [default: from config.json].",
)  # fmt: skip


def _choices(kind: type[Enum]) -> click.Choice:  # type: ignore[type-arg]
    """A click choice of an enum's values, so that the two cannot drift apart."""
    return click.Choice([str(member.value) for member in kind])


def _dtype_option(help_text: str) -> Callable[[F], F]:
    return click.option(
        "--dtype", type=_choices(api.DType), default="auto",
        show_default=True, help=help_text,
    )  # fmt: skip


def _check_weights(
    weights: Sequence[float], adapters: Sequence[str], option: str = "--weight"
) -> None:
    if weights and len(weights) != len(adapters):
        raise click.UsageError(
            f"{option} was given {len(weights)} times for {len(adapters)} adapters; "
            "give it once per adapter, in order"
        )


_LORA_FORMAT = click.option(
    "--format", "output_format", type=_choices(api.OutputFormat),
    default=None,
    help="Format of a diffusion LoRA output [default: the input's].",
)  # fmt: skip


def _rank_selection_options(max_default: str) -> Callable[[F], F]:
    """--rank-method, --energy, --param-budget, --min-rank, --max-rank and --report (listed in
    this order): shared by extract and resize."""

    def decorate(f: F) -> F:
        f = _REPORT(f)
        f = click.option(
            "--max-rank",
            type=click.IntRange(min=1),
            default=None,
            help=f"Largest rank of any module (all but fixed) [default: {max_default}].",
        )(f)
        f = click.option(
            "--min-rank",
            type=click.IntRange(min=1),
            default=1,
            show_default=True,
            help="Smallest rank of any module (all but fixed).",
        )(f)
        f = click.option(
            "--sv-cumulative",
            type=click.FloatRange(0, 1, min_open=True),
            default=None,
            metavar="F",
            help="Fraction of the sum of each update's singular values to keep "
            "(sv_cumulative only).",
        )(f)
        f = click.option(
            "--sv-ratio",
            type=click.FloatRange(min=1),
            default=None,
            metavar="R",
            help="Keep the singular values >= the largest / R (sv_ratio only).",
        )(f)
        f = click.option(
            "--param-budget",
            type=click.IntRange(min=1),
            default=None,
            metavar="N",
            help="Total LoRA parameters over the whole model (budget only).",
        )(f)
        f = click.option(
            "--energy",
            type=click.FloatRange(0, 1, min_open=True),
            default=None,
            metavar="F",
            help="Fraction of each update's squared norm to keep (energy only; kohya's "
            "sv_fro P is --energy P²).",
        )(f)
        f = click.option(
            "--rank-method",
            type=_choices(api.RankMethod),
            default="fixed",
            show_default=True,
            help="fixed rank; energy: smallest rank keeping --energy of each update; "
            "budget: --param-budget parameters spent where they remove the most error; "
            "sv_ratio, sv_cumulative: kohya resize_lora.py's dynamic methods.",
        )(f)
        return f

    return decorate


class _Bar:
    """A tqdm bar on stderr (by bytes, or by ``unit``), created on the first progress report."""

    def __init__(self, quiet: bool, desc: str, unit: str = "B") -> None:
        self.disabled = quiet or not sys.stderr.isatty()
        self.desc = desc
        self.unit = unit
        self.bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self.disabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, unit=self.unit, unit_scale=self.unit == "B", desc=self.desc,
                file=sys.stderr,
                dynamic_ncols=True,
            )  # fmt: skip
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _OptionalCount(click.ParamType):  # type: ignore[type-arg]
    """--spectrum [K]: a positive count."""

    name = "K"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            number = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a whole number", param, ctx)
        if number < 1:
            self.fail(f"{number} is not at least 1", param, ctx)
        return number


def _plot_path(plot: str | None) -> None:
    """--plot's ending, checked before any work (a usage error)."""
    if plot is not None:
        try:
            api.check_plot_path(plot)
        except api.OptionError as e:
            raise click.BadParameter(str(e), param_hint="--plot") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(api.__version__, prog_name="lorasurgeon")
@click.option("--debug", "_debug", is_flag=True, help="Show a traceback on errors.")
def cli(_debug: bool) -> None:
    """Operate on checkpoints without loading a model.

    Fold LoRA adapters into safetensors checkpoints (`merge`; PEFT adapters, and kohya,
    LyCORIS and diffusers LoRAs into SD/SDXL/FLUX checkpoints), pull a LoRA out of a
    fine-tune (`extract`), mix adapters (`combine`), change their ranks (`resize`), rewrite a
    diffusion LoRA in another format (`convert`: kohya, diffusers, peft), see what
    a checkpoint or adapter holds (`inspect`), what changed between two checkpoints (`diff`)
    and whether a merge is what it claims (`verify`), and run many jobs from a manifest
    (`batch`). Every LOCATION is a checkpoint directory, a .safetensors file, a PEFT adapter
    directory, a LoRA file, or a Hub repo id owner/name[@revision].

    \b
    Examples:
      lorasurgeon inspect fixtures/adapter
      lorasurgeon merge fixtures/base fixtures/adapter -o merged
      lorasurgeon merge meta-llama/Llama-3.1-8B me/my-lora -o llama-merged
      lorasurgeon combine me/style-lora me/subject-lora --svd --rank 16 -o mixed
      lorasurgeon diff base/ tuned/ --spectrum
      lorasurgeon batch jobs.yaml --jobs 2
    """


@cli.command()
@click.argument("base")
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER...")
@click.option(
    "-o",
    "--output",
    "out",
    required=True,
    metavar="OUT",
    help="Output directory (a file when BASE is a .safetensors file).",
)
@click.option(
    "--weight",
    "weights",
    multiple=True,
    type=float,
    metavar="W",
    help="Scale of each adapter's update, once per adapter, in order [default: 1.0].",
)
@click.option(
    "--te-weight",
    "te_weights",
    multiple=True,
    type=float,
    metavar="W",
    help="Diffusion LoRA files: text-encoder strength of each LoRA, in order [default: --weight].",
)
@click.option(
    "--skip-text-encoder",
    is_flag=True,
    help="Diffusion LoRA files: leave out text-encoder modules the base has no text encoder for.",
)
@click.option("--unmerge", is_flag=True, help="Subtract the updates instead (undo a merge).")
@_dtype_option("Output dtype of floating-point tensors; auto keeps each tensor's dtype.")
@click.option(
    "--max-shard-size",
    type=SizeParam(),
    default=None,
    help="Re-shard the output, e.g. 5GB [default: keep the base's shards].",
)
@_FAN_IN_FAN_OUT
@click.option("--dry-run", is_flag=True, help="Print which tensors would change; write nothing.")
@_compute_options
def merge(
    base: str, adapters: tuple[str, ...], out: str, weights: tuple[float, ...],
    te_weights: tuple[float, ...], skip_text_encoder: bool, unmerge: bool,
    dtype: str, max_shard_size: int | None, fan_in_fan_out: str | None, overwrite: bool,
    dry_run: bool, device: str, quiet: bool, debug: bool,
) -> None:  # fmt: skip
    """Fold LoRA ADAPTERs into BASE, as PEFT's merge_and_unload() does.

    Each changed tensor is computed in float32 and rounded once; every other tensor is copied
    byte for byte. Tensor names, shard files, the index, metadata and the base's other files
    (config, tokenizer) are kept, so OUT loads with from_pretrained like BASE. Nothing appears
    at OUT unless the whole run succeeds. Also merges target_parameters (MoE expert stacks),
    nn.MultiheadAttention (out_proj delta added twice, as PEFT does), KaSA (base SVD-truncated
    first), VeLoRA, MonteCLoRA and BD-LoRA adapters.

    ADAPTERs may also be diffusion LoRA files (kohya/A1111 LoRA, LoCon, LoHa, LoKr;
    diffusers) merged into an SD 1.x/2.x, SDXL or FLUX BASE (LDM single file, diffusers
    folder, UNet/DiT-only file, FLUX file) as sd-scripts' merge_lora.py does; --weight is then the
    UNet/transformer strength and --te-weight the text-encoder strength.

    \b
    Examples:
      lorasurgeon merge fixtures/base fixtures/adapter -o merged
      lorasurgeon merge base/ style/ subject/ --weight 0.7 --weight 0.4 -o mixed
      lorasurgeon merge merged/ fixtures/adapter --unmerge -o restored
      lorasurgeon merge sdxl.safetensors style.safetensors --weight 0.8 -o sdxl-style.safetensors
    """
    _check_weights(weights, adapters)
    if te_weights:
        _check_weights(te_weights, adapters, "--te-weight")
    options = dict(weights=list(weights) or None, unmerge=unmerge, dtype=dtype,
                   max_shard_size=max_shard_size,
                   fan_in_fan_out=_fan_in_fan_out(fan_in_fan_out),
                   te_weights=list(te_weights) or None,
                   skip_text_encoder=skip_text_encoder)  # fmt: skip
    if dry_run:
        plan = api.plan_merge(base, adapters, out, **options)  # type: ignore[arg-type]
        _echo(render.merge_plan_lines(plan), err=False)
        return
    bar = _Bar(quiet, "merge")
    try:
        report = api.merge(
            base, adapters, out, overwrite=overwrite, device=device, progress=bar,
            **options,  # type: ignore[arg-type]
        )  # fmt: skip
    finally:
        bar.close()
    _echo(render.merge_lines(report))


def _split(text: str | None) -> list[str] | None:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


def _fan_in_fan_out(text: str | None) -> list[str] | str | None:
    """--fan-in-fan-out as the API takes it: "all", "none" or module names."""
    if text is None:
        return None
    if text.strip().lower() in ("all", "none"):
        return text.strip().lower()
    names = _split(text)
    if not names:
        raise click.BadParameter("give all, none, or comma-separated module names",
                                 param_hint="--fan-in-fan-out")  # fmt: skip
    return names


@cli.command()
@click.argument("base")
@click.argument("tuned")
@_ADAPTER_OUTPUT
@click.option(
    "--rank",
    type=click.IntRange(min=1),
    default=None,
    help="LoRA rank of --rank-method fixed [default: 16].",
)
@click.option(
    "--alpha",
    type=float,
    default=None,
    help="The adapter's one lora_alpha (> 0) [default: its r, scaling 1 there]; each "
    "module's scaling is folded into its factors (no alpha_pattern).",
)
@click.option(
    "--target-modules",
    default="all-linear",
    show_default=True,
    metavar="LIST",
    help="Comma-separated module names (PEFT's suffix rules), or all-linear.",
)
@click.option(
    "--exclude-modules",
    default=None,
    metavar="LIST",
    help="Comma-separated module names never extracted; their tensors may also be missing "
    "from one checkpoint or differ in shape.",
)
@click.option(
    "--layers-to-transform",
    default=None,
    metavar="LIST",
    help="Comma-separated layer indices to extract from.",
)
@click.option(
    "--layers-pattern",
    default=None,
    metavar="NAME",
    help="Name of the layer list, e.g. layers or h (needs --layers-to-transform).",
)
@_rank_selection_options("128 for energy and budget")
@click.option(
    "--svd",
    type=_choices(api.SvdMethod),
    default="randomized",
    show_default=True,
    help="randomized: within 1% of the best error, fast; exact: the best error.",
)
@click.option(
    "--save-modules",
    default=None,
    metavar="LIST",
    help="Modules stored whole instead, e.g. embed_tokens,lm_head.",
)
@_dtype_option("dtype of the stored factors; auto: the base weight's.")
@_FAN_IN_FAN_OUT
@click.option(
    "--plot", default=None, metavar="OUT.html|OUT.svg",
    help="Draw the relative error per layer and module.",
)  # fmt: skip
@_UNIFORM_RANK
@click.option(
    "--format", "output_format", type=click.Choice(["peft", "kohya", "diffusers"]),
    default=None,
    help="Output format [default: peft; kohya for diffusion checkpoints].",
)  # fmt: skip
@click.option(
    "--conv-rank", type=click.IntRange(min=1), default=None, metavar="R",
    help="Diffusion: rank of kxk conv modules under fixed [default: --rank].",
)  # fmt: skip
@click.option(
    "--min-te-diff", type=click.FloatRange(min=0), default=None, metavar="D",
    help="Diffusion: a text encoder with max |tuned - base| <= D is left out as unchanged, "
    "as kohya does [default: 0.01]; 0 keeps any changed one.",
)  # fmt: skip
@_compute_options
def extract(
    base: str, tuned: str, out: str, rank: int | None, alpha: float | None, target_modules: str,
    exclude_modules: str | None, layers_to_transform: str | None, layers_pattern: str | None,
    rank_method: str, energy: float | None, param_budget: int | None, min_rank: int,
    max_rank: int | None, sv_ratio: float | None, sv_cumulative: float | None, svd: str,
    save_modules: str | None, dtype: str,
    fan_in_fan_out: str | None, plot: str | None, uniform_rank: bool,
    output_format: str | None, conv_rank: int | None, min_te_diff: float | None,
    report_path: str | None, overwrite: bool,
    device: str, quiet: bool, debug: bool,
) -> None:  # fmt: skip
    """Extract a LoRA adapter from TUNED - BASE by truncated SVD.

    Each selected weight's update becomes scaling * B @ A, its best (exact) or near-best
    (randomized) low-rank approximation; weights equal in both are skipped. OUT is a PEFT
    adapter directory that PeftModel.from_pretrained(base_model, OUT) loads, with one
    lora_alpha, so that llama.cpp applies it right too; mixed ranks get a note (vLLM ignores
    rank_pattern; --uniform-rank). A summary of the errors ends the run; tensors that changed
    but are not in the adapter are listed.

    From two diffusion checkpoints of one layout (LDM/SGM file, diffusers folder, UNet-only
    or FLUX file), OUT is a LoRA file (--format kohya, the default, or diffusers) of the
    modules kohya's extractor covers: attention, feed-forward, proj, resnet and sampler
    convs (--conv-rank), text-encoder projections. kohya: lora_up = U*S, lora_down = Vh,
    alpha = r, no clamping. A text encoder within --min-te-diff is left out and counted.

    \b
    Examples:
      lorasurgeon extract base/ tuned/ -o lora --rank 32
      lorasurgeon extract base/ tuned/ -o lora --rank-method energy --energy 0.9
      lorasurgeon extract base/ tuned/ -o lora --rank-method budget --param-budget 20000000
      lorasurgeon extract sdxl.safetensors tuned.safetensors -o lora.safetensors --rank 32
    """
    try:
        layers = [int(x) for x in _split(layers_to_transform) or []] or None
    except ValueError:
        raise click.BadParameter("must be comma-separated integers",
                                 param_hint="--layers-to-transform") from None  # fmt: skip
    _plot_path(plot)
    targets: list[str] | str = target_modules
    if target_modules.lower() != "all-linear":
        targets = _split(target_modules) or []
    bar = _Bar(quiet, "extract")
    try:
        report = api.extract(
            base, tuned, out, rank=rank, alpha=alpha, target_modules=targets,
            exclude_modules=_split(exclude_modules), layers_to_transform=layers,
            layers_pattern=_split(layers_pattern), rank_method=rank_method, energy=energy,
            param_budget=param_budget, min_rank=min_rank, max_rank=max_rank, sv_ratio=sv_ratio,
            sv_cumulative=sv_cumulative, svd=svd, save_modules=_split(save_modules) or (),
            dtype=dtype,
            fan_in_fan_out=_fan_in_fan_out(fan_in_fan_out), uniform_rank=uniform_rank,
            output_format=output_format, conv_rank=conv_rank, min_te_diff=min_te_diff,
            device=device, overwrite=overwrite, progress=bar,
        )  # fmt: skip
    finally:
        bar.close()
    _write_report(report_path, report.to_dict())
    if plot is not None:
        api.plot_extract(report, plot)
    _echo(render.extract_lines(report))


def _echo(lines: Sequence[str], *, err: bool = True) -> None:
    for line in lines:
        click.echo(line, err=err)


def _write_report(path: str | None, data: dict[str, Any]) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")


@cli.command()
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER...")
@_ADAPTER_OUTPUT
@click.option(
    "--weight",
    "weights",
    multiple=True,
    type=float,
    metavar="W",
    help="Weight of each adapter, once per adapter, in order [default: 1.0].",
)
@click.option(
    "--method",
    type=_choices(api.CombineMethod),
    default="linear",
    show_default=True,
    help="PEFT's combination type. linear merges A and B separately (cross terms); cat is "
    "the exact weighted sum; ties, dare_linear, dare_ties and magnitude_prune prune first.",
)
@click.option(
    "--svd",
    is_flag=True,
    help="The method's _svd variant: a truncated SVD of the combined update (linear --svd "
    "is PEFT's svd, the best rank-R approximation of the exact weighted sum).",
)
@click.option(
    "--rank",
    type=click.IntRange(min=1),
    default=None,
    help="Rank of the --svd result [default: the largest input rank].",
)
@click.option(
    "--clamp",
    type=click.FloatRange(0, 1),
    default=None,
    metavar="Q",
    help="Clamp the --svd factors to their Q quantile (PEFT's svd_clamp).",
)
@click.option(
    "--density",
    type=click.FloatRange(0, 1, min_open=True),
    default=None,
    metavar="D",
    help="Fraction of values kept by ties, dare_* and magnitude_prune (required there).",
)
@click.option(
    "--majority-sign",
    type=_choices(api.MajoritySign),
    default=None,
    help="How ties and dare_ties elect each value's sign [default: total].",
)
@click.option(
    "--seed", type=int, default=None, help="Seed of the dare_* random masks [default: 0]."
)
@_dtype_option(
    "dtype of the stored factors; auto: float32, as PEFT saves them (LoRA files: their own)."
)
@_LORA_FORMAT
@_UNIFORM_RANK
@_REPORT
@_compute_options
def combine(
    adapters: tuple[str, ...], out: str, weights: tuple[float, ...], method: str, svd: bool,
    rank: int | None, clamp: float | None, density: float | None, majority_sign: str | None,
    seed: int | None, dtype: str, output_format: str | None, uniform_rank: bool,
    report_path: str | None, overwrite: bool, device: str, quiet: bool, debug: bool,
) -> None:  # fmt: skip
    """Combine ADAPTERs into one, as PEFT's add_weighted_adapter does, without a model.

    The result matches add_weighted_adapter(ADAPTERs, weights, METHOD) (with --svd, METHOD's
    _svd variant); adapters with different targets combine over the union of their modules.
    A weighted sum is decomposed from its factors, never as a full matrix. Where PEFT is
    wrong, lorasurgeon differs: each module keeps its true rank (rank_pattern), one
    lora_alpha with each module's scaling folded into its factors (no alpha_pattern, so
    llama.cpp applies it right), rslora inputs give the exact sum (PEFT: sqrt(rank) too
    large), tensors an adapter stores whole are kept (PEFT: the base's); DoRA adapters are
    refused. DARE masks come from --seed. --uniform-rank: no rank_pattern (for vLLM).
    Diffusion LoRA files (kohya/LyCORIS LoRA and LoCon, diffusers) combine module by module
    across files of one family into their format (or --format), one alpha for all modules.

    \b
    Examples:
      lorasurgeon combine style/ subject/ --weight 0.7 --weight 0.4 --method cat -o mixed
      lorasurgeon combine a/ b/ c/ --svd --rank 16 -o abc
      lorasurgeon combine a/ b/ --method ties --density 0.5 --svd -o ab-ties
      lorasurgeon combine style.safetensors detail.safetensors --method cat -o both.safetensors
    """
    _check_weights(weights, adapters)
    bar = _Bar(quiet, "combine", unit="module")
    try:
        report = api.combine(
            adapters, out, weights=list(weights) or None, method=method, svd=svd, rank=rank,
            clamp=clamp, density=density, majority_sign=majority_sign, seed=seed, dtype=dtype,
            output_format=output_format, uniform_rank=uniform_rank, device=device,
            overwrite=overwrite, progress=bar,
        )  # fmt: skip
    finally:
        bar.close()
    _write_report(report_path, report.to_dict())
    _echo(render.combine_lines(report, len(adapters)))


@cli.command()
@click.argument("adapter")
@_ADAPTER_OUTPUT
@click.option(
    "--rank",
    type=click.IntRange(min=1),
    default=None,
    help="New rank of every module (fixed); modules already at or below it stay lossless "
    "[default: without any rank option, every module keeps its rank].",
)
@_rank_selection_options("the input rank")
@_dtype_option("dtype of the stored factors; auto: the input's.")
@_LORA_FORMAT
@click.option(
    "--keep-lycoris", is_flag=True,
    help="Copy LoHa, LoKr and full modules of a LoRA file unchanged (else refused).",
)  # fmt: skip
@_UNIFORM_RANK
@_compute_options
def resize(
    adapter: str, out: str, rank: int | None, rank_method: str, energy: float | None,
    param_budget: int | None, min_rank: int, max_rank: int | None, sv_ratio: float | None,
    sv_cumulative: float | None, report_path: str | None, dtype: str,
    output_format: str | None, keep_lycoris: bool, uniform_rank: bool, overwrite: bool,
    device: str, quiet: bool, debug: bool,
) -> None:  # fmt: skip
    """Change the ranks of ADAPTER's modules, each the best approximation at its rank.

    Each module's update scaling * B @ A is decomposed exactly from its factors (never as a
    full matrix) and truncated: --rank R everywhere, or ranks chosen as extract chooses them
    (energy, budget). A rank at or above a module's own is lossless. Without a rank option
    every module keeps its rank: anyone's adapter (alpha_pattern, rslora, mixed ranks)
    rewritten losslessly with one lora_alpha, which llama.cpp applies right; add
    --uniform-rank for vLLM. Each module's update and the whole tensors are kept. A summary
    of the errors ends the run. A diffusion LoRA file (kohya/LyCORIS LoRA and LoCon, Tucker
    included, diffusers) is resized the same way into its format (or --format), one alpha
    for all modules, each module's scaling folded in.

    \b
    Examples:
      lorasurgeon resize their-lora/ -o client-safe --uniform-rank
      lorasurgeon resize my-lora/ -o my-lora-r8 --rank 8
      lorasurgeon resize my-lora/ -o smaller --rank-method energy --energy 0.95
      lorasurgeon resize my-lora/ -o smaller --rank-method budget --param-budget 5000000
      lorasurgeon resize style.safetensors -o style-r8.safetensors --rank 8
      lorasurgeon resize style.safetensors -o s.safetensors --rank-method sv_ratio --sv-ratio 8
    """
    bar = _Bar(quiet, "resize", unit="step")
    try:
        report = api.resize(
            adapter, out, rank=rank, rank_method=rank_method, energy=energy,
            param_budget=param_budget, min_rank=min_rank, max_rank=max_rank, sv_ratio=sv_ratio,
            sv_cumulative=sv_cumulative, uniform_rank=uniform_rank, dtype=dtype,
            output_format=output_format, keep_lycoris=keep_lycoris, device=device,
            overwrite=overwrite, progress=bar,
        )  # fmt: skip
    finally:
        bar.close()
    _write_report(report_path, report.to_dict())
    _echo(render.resize_lines(report))


@cli.command()
@click.argument("lora")
@click.option(
    "-o", "--output", "out", required=True, metavar="OUT",
    help="The file to write (a directory for --to peft).",
)  # fmt: skip
@click.option(
    "--to", "to", type=_choices(api.OutputFormat), required=True,
    help="Output format: kohya (one file), diffusers (one file) or peft (adapter directory).",
)  # fmt: skip
@click.option(
    "--base", default=None, metavar="BASE",
    help="The checkpoint the LoRA is for (LDM file or diffusers folder): needed to turn kohya "
    "names into diffusers paths; checks the LoRA against it.",
)  # fmt: skip
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (only once done).")
@_common
def convert(
    lora: str, out: str, to: str, base: str | None, overwrite: bool, quiet: bool, debug: bool
) -> None:
    """Write the diffusion LoRA file LORA in another format: the same update, exactly.

    Every factor is copied unchanged and each module keeps its rank and alpha (kohya: one
    alpha tensor per module; diffusers: lora_alpha with rank_pattern/alpha_pattern in
    lora_adapter_metadata, never diffusers' alpha = rank). kohya names become diffusers
    paths only through --base (kohya to diffusers/peft without it is refused); diffusers to
    kohya needs none, and with --base follows sd-scripts' names for the base's family (LDM
    names for SDXL). LyCORIS (LoHa, LoKr, Tucker) and DoRA modules are kept in kohya output
    and refused by name elsewhere. A peft adapter holds one component: a LoRA with text
    encoders is refused there (use --to diffusers). The summary counts the modules converted
    per component.

    \b
    Examples:
      lorasurgeon convert my_lora.safetensors -o my_lora_diffusers.safetensors --to diffusers \\
          --base sd_xl_base_1.0.safetensors
      lorasurgeon convert pytorch_lora_weights.safetensors -o my_lora_kohya.safetensors --to kohya
    """
    report = api.convert(lora, out, to=to, base=base, overwrite=overwrite)
    _echo(render.convert_lines(report))


@cli.command(name="diff")
@click.argument("a")
@click.argument("b")
@click.option(
    "--spectrum", type=_OptionalCount(), default=None, is_flag=False,
    flag_value=64, metavar="[K]",
    help="Top K singular values of each changed weight, and the rank for 50/90/99% "
    "of its change [K default: 64].",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option(
    "--plot", default=None, metavar="OUT.html|OUT.svg",
    help="Draw the change per layer and module, and the spectra (needs --spectrum).",
)  # fmt: skip
@_DEVICE_OPTION
@_common
def diff_command(
    a: str, b: str, spectrum: int | None, as_json: bool, plot: str | None, device: str,
    quiet: bool, debug: bool,
) -> None:  # fmt: skip
    """Show what changed from checkpoint A to checkpoint B, tensor by tensor.

    Every tensor is equal (bit for bit), changed (relative Frobenius change ||B-A||/||A||,
    largest absolute change), only in A or B, or of another shape or dtype; totals say how
    much of the change sits in attention, MLP, embeddings and norms. With --spectrum, each
    changed weight's top K singular values give the rank that holds 50/90/99% of its change
    and what extracting every change at that rank costs. Writes nothing.

    \b
    Examples:
      lorasurgeon diff base/ merged/
      lorasurgeon diff base/ tuned/ --spectrum --plot change.html
      lorasurgeon diff base/ tuned/ --spectrum 128 --json > diff.json
    """
    _plot_path(plot)
    if plot is not None and spectrum is None:
        raise click.UsageError("--plot draws the spectra of --spectrum; add --spectrum")
    bar = _Bar(quiet, "diff")
    try:
        report = api.diff(a, b, spectrum=spectrum, device=device, progress=bar)
    finally:
        bar.close()
    if plot is not None:
        api.plot_diff(report, plot)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, default=str))
        return
    _echo(render.diff_lines(report), err=False)


@cli.command()
@click.argument("merged")
@click.argument("base")
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER...")
@click.option(
    "--weight", "weights", multiple=True, type=float, metavar="W",
    help="Scale of each adapter's update, once per adapter, in order [default: 1.0].",
)  # fmt: skip
@click.option("--unmerge", is_flag=True, help="MERGED should be BASE with the updates removed.")
@_FAN_IN_FAN_OUT
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_DEVICE_OPTION
@_common
def verify(
    merged: str, base: str, adapters: tuple[str, ...], weights: tuple[float, ...],
    unmerge: bool, fan_in_fan_out: str | None, as_json: bool, device: str, quiet: bool,
    debug: bool,
) -> None:  # fmt: skip
    """Check that MERGED is what `merge BASE ADAPTER...` would write.

    Computes each merged tensor as merge does and compares it with MERGED's, within the
    dtype's rounding (PEFT's extra rounding of half-precision merges included); copied
    tensors must be equal. MERGED may come from another tool (PEFT, mergekit, axolotl).
    Exit 0 when it matches; 1 when not, naming the first tensors that differ and by how much.

    \b
    Examples:
      lorasurgeon verify merged/ base/ adapter/
      lorasurgeon verify owner/merged owner/base owner/lora --weight 0.8
    """
    _check_weights(weights, adapters)
    bar = _Bar(quiet, "verify", unit="tensors")
    try:
        report = api.verify(
            merged, base, adapters, weights=list(weights) or None, unmerge=unmerge,
            fan_in_fan_out=_fan_in_fan_out(fan_in_fan_out), device=device, progress=bar,
        )  # fmt: skip
    finally:
        bar.close()
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        _echo(render.verify_lines(report), err=False)
    if not report.matches:
        first = report.mismatches[0]
        raise api.IncompatibleError(
            f"{first.what}" + (f" (max abs {first.max_abs:.3e})" if first.max_abs else "")
            + f"; {len(report.mismatches)} tensor(s) do not match the merge",
            path=first.path, tensor=first.tensor,
            hint="see the list above; check the adapters, --weight and --unmerge",
        )  # fmt: skip


@cli.command(name="inspect")
@click.argument("location")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_common
def inspect_command(location: str, as_json: bool, quiet: bool, debug: bool) -> None:
    """Show what a checkpoint or adapter at LOCATION holds.

    Format, tensor count, parameters, dtypes and size; for an adapter also its targets and
    each module's rank, alpha and scaling; for an output of lorasurgeon its provenance
    (command, options, input and output hashes). Reads headers only.

    \b
    Examples:
      lorasurgeon inspect fixtures/base
      lorasurgeon inspect fixtures/adapter --json
    """
    summary = api.summarize(location)
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2))
        return
    _echo(render.summary_lines(summary), err=False)


class MemoryParam(click.ParamType):  # type: ignore[type-arg]
    """--memory: a byte size (16G, 16GB, 500MiB, bytes) or auto."""

    name = "BYTES|auto"

    def get_metavar(self, param: click.Parameter, ctx: click.Context) -> str:
        return self.name

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return api.parse_memory(str(value))
        except ValueError as e:
            self.fail(f"{e}; or auto", param, ctx)


class ShardParam(click.ParamType):  # type: ignore[type-arg]
    """I/N: the I-th of N shares, 1 <= I <= N."""

    name = "I/N"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[int, int]:
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(value))
        if match is None or not 1 <= int(match.group(1)) <= int(match.group(2)):
            self.fail(f"{value!r} is not I/N with 1 <= I <= N (e.g. 2/8)", param, ctx)
        return int(match.group(1)), int(match.group(2))


@cli.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--jobs", "workers", type=click.IntRange(min=1), default=1, show_default=True,
              metavar="N", help="Parallel local worker processes (one GPU each where there "
              "are GPUs).")  # fmt: skip
@click.option("--memory", type=MemoryParam(), default=None,
              help="Start a local job only while its estimated peak memory and the running "
              "jobs' fit (auto: available less 10%); an extension of the spec.")  # fmt: skip
@click.option("--fail-fast", is_flag=True, help="Start no new job after one fails.")
@click.option("--dry-run", is_flag=True,
              help="Print the plan (run or skip, estimated peak memory); run nothing.")  # fmt: skip
@click.option("--shard", type=ShardParam(), default=None,
              help="Run only the I-th of N deterministic shares of the jobs.")  # fmt: skip
@click.option("--results", "results_path", default=None, metavar="FILE.json",
              help="Write every job's status, time and error as JSON.")  # fmt: skip
@click.option("--ray", "ray_address", default=None, metavar="auto|ADDRESS",
              help="Run the jobs as Ray tasks (pip install 'lorasurgeon[ray]').")  # fmt: skip
@_common
def batch(
    manifest: str, workers: int, memory: int | None, fail_fast: bool, dry_run: bool,
    shard: tuple[int, int] | None, results_path: str | None, ray_address: str | None,
    quiet: bool, debug: bool,
) -> None:  # fmt: skip
    """Run the merge, extract, combine, resize and convert jobs of MANIFEST (.yaml or .jsonl).

    The whole manifest is validated first (exit 2 naming the job). A job whose output exists
    with provenance matching it (inputs, resolved revisions, options, tool version) is
    skipped, so a rerun after a failure or a kill runs only what is not done. A failed job is
    recorded with its error: line and the others go on; exit 1 if any failed.

    Each job's peak memory is estimated from its inputs' headers: --memory (not in the spec)
    starts a local job only when it fits beside the running ones (one larger than the whole
    budget runs alone, with a warning); on Ray, each task requests its estimate as memory,
    and a GPU when its device is cuda.

    \b
    Examples:
      lorasurgeon batch jobs.yaml --jobs 4 --memory 16G --results results.json
      lorasurgeon batch jobs.yaml --shard $((SLURM_ARRAY_TASK_ID + 1))/$SLURM_ARRAY_TASK_COUNT
      lorasurgeon batch jobs.yaml --ray auto
    """
    if ray_address is not None and workers != 1:
        raise click.UsageError("--jobs applies to local workers; Ray schedules by itself")
    if ray_address is not None and memory is not None:
        raise click.UsageError("--memory applies to local workers; on Ray each task requests "
                               "its own estimate")  # fmt: skip
    plan = api.read_manifest(manifest)
    jobs = api.shard_jobs(plan.jobs, shard)
    if dry_run:
        done, estimates = [api.is_done(j) for j in jobs], [api.estimate_memory(j) for j in jobs]
        _echo(render.batch_plan_lines(jobs, done, estimates), err=False)
        return
    finished: list[int] = [0]
    bar = _Bar(quiet, "batch", unit="job")  # the overall bar, under the per-job lines

    def report(result: api.JobResult) -> None:
        finished[0] += 1
        if not quiet or result.error:
            line = render.batch_line(finished[0], len(jobs), result)
            if bar.bar is not None:
                bar.bar.write(line, file=sys.stderr)
            else:
                click.echo(line, err=True)
        bar(finished[0], len(jobs))

    try:
        if ray_address is not None:
            results = api.run_ray(jobs, ray_address, fail_fast=fail_fast, on_result=report)
        else:
            results = api.run_local(jobs, workers=workers, memory=memory, fail_fast=fail_fast,
                                    on_result=report)  # fmt: skip
    finally:
        bar.close()
    _echo(render.batch_table(results, len(jobs) - len(results)))
    counts = {s: sum(1 for r in results if r.status.value == s)
              for s in ("done", "skipped", "failed")}  # fmt: skip
    _write_report(results_path, {"jobs": [r.to_dict() for r in results], **counts})
    if counts["failed"]:
        raise api.LorasurgeonError(f"{counts['failed']} of {len(jobs)} jobs failed",
                                   path=manifest, hint="see their error: lines above")  # fmt: skip


class _WarningFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"warning: {record.getMessage()}"


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to the ``sys.stderr`` of the moment, not the one of the first call (which a
    test runner or an embedding program may have replaced since)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _setup_logging() -> None:
    logger = logging.getLogger("lorasurgeon")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_WarningFormatter())
        handler.setLevel(logging.WARNING)
        logger.addHandler(handler)
        logger.propagate = False


def _interrupted_outcome(args: Sequence[str]) -> str:
    """What an interrupted run left: nothing, or for ``batch`` the jobs finished before."""
    if "batch" in [a for a in args if not a.startswith("-")][:1]:
        return "jobs that had finished are kept, the others left nothing; rerun to finish"
    return "nothing was written"


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command line and exit: 0 on success, 1 on a failed run, 2 on a usage error.

    The exit status follows the error's class: click's usage errors and ``OptionError`` exit 2,
    every other ``LorasurgeonError`` 1.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    _setup_logging()
    try:
        with api.handle_signals():  # SIGTERM and SIGHUP stop the run as Ctrl-C does
            cli.main(args=args, prog_name="lorasurgeon", standalone_mode=False)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except api.OptionError as e:  # invalid option values or combinations: a usage error
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except (KeyboardInterrupt, click.Abort) as e:
        signalled = e if isinstance(e, api.Interrupted) else e.__cause__  # click wraps it
        cause = f" by {signalled.signal_name}" if isinstance(signalled, api.Interrupted) else ""
        kept = signalled.kept if isinstance(signalled, api.Interrupted) else None
        outcome = f"{kept} was complete and is kept" if kept else _interrupted_outcome(args)
        click.echo(f"error: interrupted{cause}; {outcome}", err=True)
        sys.exit(1)
    except api.LorasurgeonError as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except Exception as e:
        if debug:
            raise
        click.echo(f"error: internal error: {type(e).__name__}: {e} (rerun with --debug)", err=True)
        sys.exit(1)
    sys.exit(0)

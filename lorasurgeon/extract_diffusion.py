"""Extraction from two diffusion checkpoints of one layout (LDM/SGM single files, diffusers
folders, UNet-only and FLUX files): the modules kohya's extractor covers, each delta by
truncated SVD, stored as kohya does it (spec §5.6: ``lora_up = U·S``, ``lora_down = Vh``,
``alpha = r``). Knows no file format: modules are named in a spelling, the writer formats them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .adapters import ModuleReport
from .diffusion import refuse_float8
from .errors import IncompatibleError, OptionError
from .formats.model import Component, Family
from .layouts import Layout, Piece, Target, open_layout
from .options import DEFAULT_FIXED_RANK, DEFAULT_MAX_RANK, RankMethod, RankPolicy, SvdMethod
from .pipeline import prefetch
from .reader import TensorFiles, TensorInfo, open_checkpoint

if TYPE_CHECKING:
    import torch

    from .lowrank import TruncatedSVD

__all__ = [
    "DEFAULT_TEXT_THRESHOLD",
    "DiffusionModule",
    "DiffusionPlan",
    "ExtractedModule",
    "Spelling",
    "TextEncoderCheck",
    "DiffusionOutcome",
    "decompose_modules",
    "extract_diffusion",
    "drop_unchanged_text",
    "module_factors",
    "select_module_ranks",
    "plan_diffusion_extraction",
]

#: kohya's ``--min_diff``: a text encoder whose max |tuned - base| is at most this is unchanged.
DEFAULT_TEXT_THRESHOLD = 0.01

# Tensor-name roots only diffusion checkpoints have (spec §5.2).
_LDM_ROOTS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb.",
              "out.")  # fmt: skip
_BFL_ROOTS = ("double_blocks.", "single_blocks.", "img_in.", "txt_in.", "time_in.", "vector_in.",
              "guidance_in.", "final_layer.")  # fmt: skip

# The modules sd-scripts' extract_lora_from_models.py covers (networks/lora.py: Transformer2DModel
# with ResnetBlock2D, Downsample2D and Upsample2D for conv_dim; CLIPAttention and CLIPMLP),
# in diffusers spelling, and FLUX's (networks/lora_flux.py: the double and single blocks'
# attention and MLP) in BFL spelling for kohya files, in diffusers spelling for diffusers files.
_SD_UNET = re.compile(
    r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.(attentions\.\d+\.(proj_in|proj_out|"
    r"transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))|"
    r"resnets\.\d+\.(conv1|conv2|time_emb_proj|conv_shortcut)|(downsamplers|upsamplers)\.0\.conv)"
)
_CLIP = re.compile(r"text_model\.encoder\.layers\.\d+\.(self_attn\.[qkv]_proj|"
                   r"self_attn\.out_proj|mlp\.fc1|mlp\.fc2)")  # fmt: skip
_FLUX_BFL = re.compile(r"double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.[02])|"
                       r"single_blocks\.\d+\.(linear1|linear2)")  # fmt: skip
_FLUX_DIFFUSERS = re.compile(
    r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|"
    r"add_v_proj|to_add_out)|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2))|"
    r"single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out)"
)
# When two components name the same tensors (kohya's lora_te_ is SD1's te1), the first wins.
_COMPONENT_ORDER = (Component.UNET, Component.TE, Component.TE1, Component.TE2, Component.TE3)


class Spelling(str, Enum):
    """How the output names its modules: ``diffusers`` (diffusers/transformers in-memory
    paths, text encoders with ``text_model.``, FLUX's qkv split), or ``kohya`` (sd-scripts:
    SD1/SD2 UNets in diffusers paths, SDXL in LDM paths, FLUX in BFL paths with fused qkv)."""

    DIFFUSERS = "diffusers"
    KOHYA = "kohya"


@dataclass(frozen=True)
class DiffusionModule:
    """One module to extract. ``name`` is its dotted path in the output's spelling, ``shape``
    its weight shape as a LoRA sees it; ``base``/``tuned`` the pieces its delta is made of
    (a q/k/v row slice of OpenCLIP's fused ``in_proj``, FLUX's fused or split qkv), with the
    stored tensors' infos."""

    component: Component
    name: str
    names: tuple[str, ...]  # every spelling of the module, for --exclude-modules
    shape: tuple[int, ...]
    base: tuple[tuple[Piece, TensorInfo], ...]
    tuned: tuple[tuple[Piece, TensorInfo], ...]

    @property
    def conv(self) -> bool:
        """A k×k convolution (its rank is ``--conv-rank``); a 1×1 conv is a Linear to LoRA."""
        return len(self.shape) > 2 and math.prod(self.shape[2:]) > 1

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """(out, in·kh·kw) of the decomposed delta."""
        return self.shape[0], math.prod(self.shape[1:])

    @property
    def dtype(self) -> str:
        """The base weight's dtype (the factors' dtype under ``--dtype auto``)."""
        return self.base[0][1].dtype


@dataclass(frozen=True)
class DiffusionPlan:
    """What a diffusion extraction does, from headers alone."""

    base: Layout
    tuned: Layout
    spelling: str
    modules: tuple[DiffusionModule, ...]
    others: tuple[tuple[TensorInfo, TensorInfo], ...]  # (base, tuned) tensors not extracted


@dataclass(frozen=True)
class ExtractedModule:
    """A module's truncated SVD and its text-encoder test figure (max |delta|)."""

    module: DiffusionModule
    svd: TruncatedSVD
    max_abs: float


def _spelling_of(component: Component, name: str) -> str:
    """Which spelling a dotted module path is in: ``ldm``, ``bfl``, ``diffusers`` (UNet/DiT),
    ``hf`` (a text encoder with ``text_model.``) or ``other``."""
    if component.is_text_encoder:
        return "hf" if name.startswith("text_model.") else "other"
    if name.startswith(_LDM_ROOTS):
        return "ldm"
    return "bfl" if name.startswith(_BFL_ROOTS) else "diffusers"


def _output_spelling(spelling: str, family: Family, component: Component) -> str:
    """The spelling a module is named in: text encoders always ``hf``; a kohya UNet is LDM
    for SDXL, BFL for FLUX, diffusers for SD1/SD2 (spec §2.1, §1.6)."""
    if component.is_text_encoder:
        return "hf"
    if spelling == "kohya" and family in (Family.SDXL, Family.SDXL_REFINER):
        return "ldm"
    if spelling == "kohya" and family is Family.FLUX:
        return "bfl"
    return "diffusers"


def _covered(component: Component, family: Family, names: Mapping[str, str], out: str) -> bool:
    """Whether kohya's extractor covers the module (spelled ``names`` by spelling)."""
    if component.is_text_encoder:
        return bool(_CLIP.fullmatch(names.get("hf", "")))
    if family is Family.FLUX:
        pattern = _FLUX_BFL if out == "bfl" else _FLUX_DIFFUSERS
        return bool(pattern.fullmatch(names.get(out, "")))
    return bool(_SD_UNET.fullmatch(names.get("diffusers", "")))


def _units(layout: Layout) -> dict[tuple[Piece, ...], tuple[Component, dict[str, Target]]]:
    """The layout's modules, one per distinct set of pieces: the first component naming them
    and their targets by spelling."""
    units: dict[tuple[Piece, ...], tuple[Component, dict[str, Target]]] = {}
    for (component, _), target in sorted(
        layout.targets.items(), key=lambda kv: _COMPONENT_ORDER.index(kv[0][0])
    ):
        owner, spelled = units.setdefault(target.pieces, (component, {}))
        if owner is component:
            spelled.setdefault(_spelling_of(component, target.name), target)
    return units


def _excluded(names: Sequence[str], excludes: Sequence[str]) -> bool:
    return any(n == e or n.endswith("." + e) or n.replace(".", "_") == e
               for n in names for e in excludes)  # fmt: skip


def _check_same_layout(base: Layout, tuned: Layout) -> None:
    if (base.kind, base.family, base.inpainting) != (tuned.kind, tuned.family, tuned.inpainting):

        def what(layout: Layout) -> str:
            inpainting = " inpainting" if layout.inpainting else ""
            return f"{layout.kind.value} {layout.family.value}{inpainting} checkpoint"

        raise IncompatibleError(
            f"is a {what(tuned)}, but the base {base.path} is a {what(base)}",
            path=tuned.path,
            hint="extract from two checkpoints of the same model and layout (convert one first)",
        )


_Key = tuple[object, ...]


def _piece_key(layout: Layout, piece: Piece) -> _Key:
    """A piece by its component and tensor, comparable between two checkpoints."""
    roles = {path: name for name, path in layout.checkpoints.items()}
    return (roles.get(piece.checkpoint), piece.tensor, piece.weight_rows, piece.delta_rows,
            piece.transposed)  # fmt: skip


@dataclass(frozen=True)
class _Side:
    """One checkpoint's selectable modules, keyed by their pieces' keys."""

    layout: Layout
    modules: dict[tuple[_Key, ...], tuple[Component, str, tuple[str, ...], Target]]


def _selectable(layout: Layout, spelling: Spelling, targets: Sequence[str] | None) -> _Side:
    """The modules kohya's extractor covers (or, with ``targets``, those of them whose name in
    some spelling is or ends with an entry), named in the output's spelling."""
    modules = {}
    for pieces, (component, spelled) in _units(layout).items():
        out = _output_spelling(spelling, layout.family, component)
        names = {s: t.name for s, t in spelled.items()}
        if out not in spelled or not _covered(component, layout.family, names, out):
            continue
        all_names = tuple(dict.fromkeys((names[out], *names.values())))
        if targets is not None and not _excluded(all_names, targets):
            continue
        key = tuple(_piece_key(layout, p) for p in pieces)
        modules[key] = (component, names[out], all_names, spelled[out])
    return _Side(layout, modules)


def _infos(
    stack: contextlib.ExitStack[Any], layout: Layout
) -> dict[Path, Mapping[str, TensorInfo]]:
    """Every checkpoint's tensor infos, float8 refused (spec §5.5)."""
    found = {}
    for path in layout.checkpoints.values():
        checkpoint = stack.enter_context(open_checkpoint(path))
        refuse_float8(path, checkpoint.tensors)
        found[path] = checkpoint.tensors
    return found


def _one_side_only(module: str, where: Path, other: Path, side: str) -> IncompatibleError:
    return IncompatibleError(
        f"module is in the {side} checkpoint but not in {other}", path=where, tensor=module,
        hint=f"leave it out with --exclude-modules {module}",
    )  # fmt: skip


def _paired(
    key: tuple[_Key, ...], base: _Side, tuned: _Side,
    infos: Mapping[Path, Mapping[str, TensorInfo]],
) -> DiffusionModule:  # fmt: skip
    component, name, names, target = base.modules[key]
    if key not in tuned.modules:
        raise _one_side_only(name, base.layout.path, tuned.layout.path, "base")
    other = tuned.modules[key][3]
    if other.shape != target.shape or [p.shape for p in other.pieces] != [
        p.shape for p in target.pieces
    ]:
        raise IncompatibleError(
            f"shape {other.shape} in the tuned checkpoint, {target.shape} in the base",
            path=tuned.layout.path, tensor=name, hint=f"leave it out with --exclude-modules {name}",
        )  # fmt: skip
    pieces = tuple((p, infos[p.checkpoint][p.tensor]) for p in target.pieces)
    tuned_pieces = tuple((p, infos[p.checkpoint][p.tensor]) for p in other.pieces)
    return DiffusionModule(component, name, names, target.shape, pieces, tuned_pieces)


def _others(
    base: Layout, tuned: Layout, infos: Mapping[Path, Mapping[str, TensorInfo]],
    covered: set[tuple[str | None, str]],
) -> tuple[list[tuple[TensorInfo, TensorInfo]], int]:  # fmt: skip
    """Pairs of tensors not extracted (same component, name and shape), and how many tensors
    are in one checkpoint only or differ in shape."""
    pairs, unpaired = [], 0
    for role, path in base.checkpoints.items():
        mine, theirs = infos[path], infos.get(tuned.checkpoints.get(role, Path()), {})
        for name, info in mine.items():
            if (role, name) in covered:
                continue
            other = theirs.get(name)
            if other is not None and other.shape == info.shape:
                pairs.append((info, other))
            else:
                unpaired += 1
        unpaired += sum(1 for n in theirs if n not in mine and (role, n) not in covered)
    return pairs, unpaired


def plan_diffusion_extraction(
    base: Path,
    tuned: Path,
    *,
    spelling: Spelling,
    target_modules: Sequence[str] | None = None,
    exclude_modules: Sequence[str] = (),
) -> tuple[DiffusionPlan, int]:
    """The modules to extract from two diffusion checkpoints of one layout, from headers alone.

    Both checkpoints' layouts are built (``layouts.open_layout``); the modules sd-scripts'
    extractor covers are taken: attention, feed-forward and proj, resnet and sampler convs,
    CLIP q/k/v/out and MLP projections (q/k/v as row slices of OpenCLIP's fused ``in_proj``),
    FLUX's block attention and MLP (fused qkv for kohya names, split for diffusers'). Returns
    the plan and the number of tensors outside it found in one checkpoint only.

    Raises:
        LocationError, CheckpointError: unreadable checkpoints.
        IncompatibleError: different layouts or families; a module in one checkpoint only or
            with another shape there (unless excluded); a float8 tensor.
        OptionError: nothing selected, or an exclusion that names no module.
    """
    b, t = open_layout(base), open_layout(tuned)
    _check_same_layout(b, t)
    mine, theirs = (
        _selectable(b, spelling, target_modules),
        _selectable(t, spelling, target_modules),
    )
    with contextlib.ExitStack() as stack:
        infos = {**_infos(stack, b), **_infos(stack, t)}
    modules = []
    for key, (_, _, names, _) in mine.modules.items():
        if not _excluded(names, exclude_modules):
            modules.append(_paired(key, mine, theirs, infos))
    for key, (_, name, names, _) in theirs.modules.items():
        if key not in mine.modules and not _excluded(names, exclude_modules):
            raise _one_side_only(name, t.path, b.path, "tuned")
    _check_listed(exclude_modules, [*mine.modules.values(), *theirs.modules.values()])
    if not modules:
        raise OptionError("no module of the checkpoints is selected for extraction",
                          hint="check --target-modules and --exclude-modules")  # fmt: skip
    roles = {path: name for name, path in b.checkpoints.items()}
    covered = {(roles.get(p.checkpoint), p.tensor) for m in modules for p, _ in m.base}
    others, unpaired = _others(b, t, infos, covered)
    plan = DiffusionPlan(b, t, spelling.value, tuple(modules), tuple(others))
    return plan, unpaired


def _check_listed(excludes: Sequence[str], modules: Sequence[tuple[Any, ...]]) -> None:
    """An exclusion that names no selectable module is a typo, never a no-op."""
    for entry in excludes:
        if not any(_excluded(names, [entry]) for _, _, names, _ in modules):
            raise OptionError(
                f"--exclude-modules {entry} matches no module that is extracted",
                hint="check the name (a module path or suffix, e.g. attn2.to_k)",
            )


def _rows(piece: Piece, tensor: torch.Tensor, device: Any) -> torch.Tensor:
    """The piece's rows of its stored tensor in float32 on ``device``, as (rows, rest)."""
    if piece.weight_rows is not None:
        tensor = tensor[piece.weight_rows[0] : piece.weight_rows[1]]
    tensor = tensor.to(device).float().reshape(tensor.shape[0], -1)
    return tensor.t() if piece.transposed else tensor


def read_pieces(m: DiffusionModule, files: TensorFiles) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The stored (base, tuned) tensor of each of the module's pieces."""
    return [(files.load(bi), files.load(ti)) for (_, bi), (_, ti) in zip(m.base, m.tuned,
                                                                        strict=True)]  # fmt: skip


def module_delta(
    m: DiffusionModule, stored: Sequence[tuple[torch.Tensor, torch.Tensor]], device: Any
) -> torch.Tensor:
    """``tuned - base`` of the module in float32 on ``device``, as its (out, in·kh·kw) matrix:
    each piece's rows placed at its ``delta_rows`` (all rows when None). ``stored``: the
    pieces' tensors, from ``read_pieces``."""
    import torch

    if len(stored) == 1 and m.base[0][0].delta_rows is None:  # one piece: no zeroed matrix
        (piece, _), ((base, tuned),) = m.base[0], stored
        rows = _rows(piece, tuned, device).sub_(_rows(piece, base, device))
        return rows.reshape(m.matrix_shape).contiguous()
    delta = torch.zeros(m.matrix_shape, dtype=torch.float32, device=device)
    for ((piece, _), _), (base, tuned) in zip(zip(m.base, m.tuned, strict=True), stored,
                                              strict=True):  # fmt: skip
        rows = _rows(piece, tuned, device).sub_(_rows(piece, base, device))
        if piece.delta_rows is None:
            delta.copy_(rows.reshape(delta.shape))
        else:
            delta[piece.delta_rows[0] : piece.delta_rows[1]] = rows
    return delta


def compute_rank(policy: RankPolicy, conv_rank: int | None, m: DiffusionModule) -> int:
    """How many singular triplets to compute for ``m`` before ranks are chosen."""
    if policy.method is RankMethod.FIXED:
        rank = policy.rank or DEFAULT_FIXED_RANK
        return conv_rank or rank if m.conv else rank
    if policy.method is RankMethod.SV_CUMULATIVE:
        return sys.maxsize  # its fraction is of the sum of every singular value
    return policy.max_rank or DEFAULT_MAX_RANK


def decompose_modules(
    plan: DiffusionPlan,
    policy: RankPolicy,
    conv_rank: int | None,
    svd: SvdMethod,
    device: Any,
    progress: Any = None,
) -> Iterator[ExtractedModule | None]:
    """Each module's truncated SVD in plan order, None for a module equal in both checkpoints.
    Memory stays bounded by the largest modules: the stored tensors of at most three modules
    (two read ahead on a thread) and one float32 delta.

    Raises:
        IncompatibleError: a delta that is not finite.
    """
    import torch

    from . import lowrank

    generator = torch.Generator(device=device).manual_seed(0)
    total = sum(i.nbytes for m in plan.modules for _, i in (*m.base, *m.tuned))
    done = 0
    stop = threading.Event()
    with TensorFiles() as files:
        # the next modules are read on a thread while this one is decomposed
        for m, stored in prefetch(plan.modules, lambda m: read_pieces(m, files), depth=2,
                                  stop=stop):  # fmt: skip
            delta = module_delta(m, stored, device)
            del stored
            low, high = torch.aminmax(delta) if delta.numel() else (delta.new_zeros(()),) * 2
            if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):  # NaN propagates
                raise IncompatibleError(
                    "tuned - base is not finite (inf or NaN in a checkpoint)",
                    path=plan.tuned.path, tensor=m.name,
                    hint=f"leave it out with --exclude-modules {m.name}",
                )  # fmt: skip
            max_abs = max(-float(low), float(high))  # one pass: no |delta| copy
            if max_abs == 0:
                yield None
            else:
                rank = min(compute_rank(policy, conv_rank, m), *delta.shape)
                found = lowrank.truncated_svd(delta, rank, method=svd, generator=generator)
                cpu = dataclasses.replace(found, u=found.u.cpu(), s=found.s.cpu(),
                                          vh=found.vh.cpu())  # fmt: skip
                yield ExtractedModule(m, cpu, max_abs)
            del delta
            done += sum(i.nbytes for _, i in (*m.base, *m.tuned))
            if progress is not None:
                progress(done, total)


@dataclass(frozen=True)
class TextEncoderCheck:
    """A text encoder left out as unchanged: its component, extracted modules and max |delta|."""

    component: Component
    modules: int
    max_abs: float


def drop_unchanged_text(
    results: Sequence[ExtractedModule], threshold: float
) -> tuple[list[ExtractedModule], list[TextEncoderCheck]]:
    """Leave out each text encoder whose max |tuned - base| over its modules is at most
    ``threshold`` (sd-scripts' ``--min_diff``, 0.01: fine-tunes that did not train the text
    encoder still differ by rounding)."""
    largest: dict[Component, float] = {}
    counts: dict[Component, int] = {}
    for r in results:
        c = r.module.component
        if c.is_text_encoder:
            largest[c] = max(largest.get(c, 0.0), r.max_abs)
            counts[c] = counts.get(c, 0) + 1
    dropped = {c for c, v in largest.items() if v <= threshold}
    kept = [r for r in results if r.module.component not in dropped]
    checks = [
        TextEncoderCheck(c, counts[c], largest[c])
        for c in sorted(dropped, key=_COMPONENT_ORDER.index)
    ]
    return kept, checks


def select_module_ranks(
    results: Sequence[ExtractedModule], policy: RankPolicy, conv_rank: int | None
) -> list[int]:
    """Each module's rank by ``policy`` (``lowrank.select_ranks``); under ``fixed``, k×k convs
    take ``conv_rank`` (default: the rank)."""
    from . import lowrank

    def select(group: Sequence[ExtractedModule], rank: int) -> list[int]:
        shapes = [r.module.matrix_shape for r in group]
        return lowrank.select_by_policy([r.svd for r in group], shapes, policy, rank)

    rank = policy.rank or DEFAULT_FIXED_RANK
    if policy.method is not RankMethod.FIXED:
        return select(results, rank)
    convs = [i for i, r in enumerate(results) if r.module.conv]
    others = [i for i, r in enumerate(results) if not r.module.conv]
    ranks = [0] * len(results)
    for group, k in ((convs, conv_rank or rank), (others, rank)):
        for i, chosen in zip(group, select([results[i] for i in group], k), strict=True):
            ranks[i] = chosen
    return ranks


def module_factors(
    result: ExtractedModule, rank: int, *, alpha: float | None, dtype: str | None
) -> tuple[torch.Tensor, torch.Tensor, ModuleReport]:
    """One module's stored factors as a kohya LoCon keeps them (spec §5.6): ``down = Vh``
    (r, in[, kh, kw]) with the target's kernel, ``up = U·S·r/alpha`` (out, r[, 1, 1]) (sd-scripts
    keeps ``U·S`` with ``alpha = r``; no clamping), rounded once to ``dtype`` (None: the base
    weight's); the update is ``alpha / r · up.flatten(1) @ down.flatten(1)``. The report's
    error is that of the factors as stored."""
    from .dtypes import torch_dtype
    from .lowrank import stored_rel_error

    m = result.module
    stored_alpha = _alpha(alpha, rank)
    scaling = stored_alpha / rank
    a, b = result.svd.factors(rank, scaling, balanced=False)
    target = torch_dtype(dtype or m.dtype)
    a, b = a.to(target), b.to(target)
    error = stored_rel_error(result.svd, rank, a, b, scaling)
    down = a.reshape(rank, *m.shape[1:]).contiguous()
    up = b.reshape(m.shape[0], rank, *([1] * (len(m.shape) - 2))).contiguous()
    report = ModuleReport(m.name, list(m.matrix_shape), rank, stored_alpha, error,
                          1 - error * error)  # fmt: skip
    return down, up, report


def _alpha(alpha: float | None, rank: int) -> float:
    return float(alpha) if alpha is not None else float(rank)


def _out_module(
    result: ExtractedModule, rank: int, *, alpha: float | None, dtype: str | None
) -> Any:
    """The writer's record of a module (factor shapes and dtypes; computed later)."""
    from .formats.model import Kind
    from .formats.write import Factor, OutModule

    m = result.module
    code = dtype or m.dtype
    down = Factor(code, (rank, *m.shape[1:]))
    up = Factor(code, (m.shape[0], rank, *([1] * (len(m.shape) - 2))))
    return OutModule(m.component, m.name, Kind.LORA, {"down": down, "up": up},
                     _alpha(alpha, rank), rank)  # fmt: skip


@dataclass(frozen=True)
class DiffusionOutcome:
    """What ``extract_diffusion`` wrote: per-module reports, parameters, the modules equal in
    both checkpoints, the text encoders left out as unchanged, and notes."""

    modules: list[ModuleReport]
    total_params: int
    skipped_equal: int
    unchanged_text: list[TextEncoderCheck]
    notes: list[str]
    energy: float  # Σ ||delta||_F² of the modules in the LoRA


def extract_diffusion(
    plan: DiffusionPlan, out: Path, *, fmt: str, policy: RankPolicy, conv_rank: int | None,
    alpha: float | None, svd: SvdMethod, dtype: str | None, text_threshold: float,
    device: Any, overwrite: bool, provenance: Any, progress: Any = None, unpaired: int = 0,
) -> DiffusionOutcome:  # fmt: skip
    """Decompose the plan's modules, choose ranks, and write the LoRA in ``fmt`` through the
    shared writer (``formats.write``); nothing is at ``out`` unless this returns.

    Raises:
        IncompatibleError: every selected module is equal in both checkpoints; a delta that
            is not finite. AdapterError, OptionError: from the writer (``--format peft`` with
            several components).
    """
    import dataclasses

    from . import engine
    from .engine import Computed
    from .formats.write import OutputFormat, plan_lora

    found = list(decompose_modules(plan, policy, conv_rank, svd, device, progress))
    skipped = sum(1 for r in found if r is None)
    results = [r for r in found if r is not None]
    del found
    results, unchanged = drop_unchanged_text(results, text_threshold)
    if not results:
        raise IncompatibleError(
            "the selected modules are equal in both checkpoints (text encoders within "
            f"--min-te-diff {text_threshold:g}); nothing to extract",
            path=plan.tuned.path, hint="is TUNED a fine-tune of BASE?",
        )  # fmt: skip
    ranks = select_module_ranks(results, policy, conv_rank)
    planned = [
        _out_module(r, k, alpha=alpha, dtype=dtype) for r, k in zip(results, ranks, strict=True)
    ]
    lora = plan_lora(out, planned, OutputFormat(fmt), family=plan.base.family)
    output = dataclasses.replace(lora.output, provenance=provenance)
    reports: list[ModuleReport] = []
    energy = math.fsum(r.svd.total_energy for r in results)
    pending: list[ExtractedModule | None] = list(results)
    del results  # each module's SVD is freed as soon as its factors are written

    def produce(_: Any) -> Iterator[Computed]:
        for i, rank in enumerate(ranks):
            result, pending[i] = pending[i], None
            assert result is not None
            down, up, report = module_factors(result, rank, alpha=alpha, dtype=dtype)
            reports.append(report)
            yield Computed(lora.name(i, "down"), down)
            yield Computed(lora.name(i, "up"), up)

    engine.run(output, lora.stream(produce), overwrite=overwrite)
    params = sum(math.prod(f.shape) for m in planned for f in m.factors.values())
    notes = [f"{unpaired} tensors outside the LoRA are in one checkpoint only"] if unpaired else []
    return DiffusionOutcome(reports, params, skipped, unchanged, notes, energy)

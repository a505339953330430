"""lorasurgeon: offline checkpoint surgery for LoRA on safetensors files.

The public API: ``merge`` and ``plan_merge`` fold PEFT LoRA adapters into a base checkpoint
exactly as PEFT's ``merge_and_unload()`` does; ``extract`` pulls a LoRA adapter out of a
fine-tune by truncated SVD; ``combine`` mixes adapters as PEFT's ``add_weighted_adapter`` does
and ``resize`` changes their ranks, both from the adapter files alone; ``convert`` rewrites a
diffusion LoRA (kohya, diffusers) in another format, exactly; ``summarize`` describes
a checkpoint or adapter; ``diff`` compares two checkpoints and ``verify`` checks a merged
one; ``open_checkpoint`` reads a checkpoint by header. Importing this package does not import
torch.
"""

from .adapters import ModuleReport
from .batch import Job, JobResult, Manifest, is_done, read_manifest, shard_jobs
from .combine import CombinePlan, CombineReport, combine, plan_combine
from .convert import ConvertReport, convert
from .diff import DiffReport, TensorDiff, diff
from .dtypes import DType
from .engine import handle_signals
from .errors import (
    AdapterError,
    CheckpointError,
    IncompatibleError,
    Interrupted,
    LocationError,
    LorasurgeonError,
    ManifestError,
    OptionError,
    OutputError,
)
from .extract import ExtractPlan, ExtractReport, extract, plan_extraction
from .footprint import estimate_memory, parse_memory
from .formats.write import OutputFormat
from .merge import MergePlan, MergeReport, merge, plan_merge
from .options import (
    CombineMethod,
    CombineOptions,
    MajoritySign,
    RankMethod,
    RankPolicy,
    SvdMethod,
)
from .plot import check_plot_path, plot_diff, plot_extract
from .reader import Checkpoint, TensorInfo, open_checkpoint
from .resize import ResizeReport, resize
from .runners import ray_resources, run_local, run_ray
from .summary import Summary, summarize
from .verify import Mismatch, VerifyReport, verify
from .writer import parse_size

__version__ = "0.1.0"

__all__ = [
    "AdapterError",
    "Checkpoint",
    "CheckpointError",
    "CombineMethod",
    "CombineOptions",
    "CombinePlan",
    "CombineReport",
    "ConvertReport",
    "DType",
    "DiffReport",
    "ExtractPlan",
    "ExtractReport",
    "IncompatibleError",
    "Interrupted",
    "Job",
    "JobResult",
    "LocationError",
    "LorasurgeonError",
    "MajoritySign",
    "Manifest",
    "ManifestError",
    "MergePlan",
    "Mismatch",
    "ModuleReport",
    "MergeReport",
    "OptionError",
    "OutputError",
    "OutputFormat",
    "RankMethod",
    "RankPolicy",
    "ResizeReport",
    "Summary",
    "SvdMethod",
    "TensorDiff",
    "TensorInfo",
    "VerifyReport",
    "__version__",
    "check_plot_path",
    "combine",
    "convert",
    "diff",
    "estimate_memory",
    "extract",
    "handle_signals",
    "is_done",
    "merge",
    "open_checkpoint",
    "parse_memory",
    "parse_size",
    "plan_combine",
    "plan_extraction",
    "plan_merge",
    "plot_diff",
    "plot_extract",
    "read_manifest",
    "resize",
    "ray_resources",
    "run_local",
    "run_ray",
    "shard_jobs",
    "summarize",
    "verify",
]

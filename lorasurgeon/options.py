"""The choices and option records of the commands: one ``str`` Enum per choice (the CLI builds its
choices from them) and the options that travel together, validated when they are made.

Strings and numbers only: no torch, no files. Every refusal is an ``OptionError`` (exit 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

from .errors import OptionError

__all__ = [
    "DEFAULT_FIXED_RANK",
    "DEFAULT_MAX_RANK",
    "CombineMethod",
    "CombineOptions",
    "MajoritySign",
    "RankMethod",
    "RankPolicy",
    "SvdMethod",
    "choice",
    "check_finite",
]

_E = TypeVar("_E", bound=Enum)
#: The rank of ``extract``'s fixed method when no rank is given.
DEFAULT_FIXED_RANK = 16
#: Upper rank bound of the energy and budget methods when no max_rank is given (extract).
DEFAULT_MAX_RANK = 128


class SvdMethod(str, Enum):
    """How ``truncated_svd`` finds the leading singular vectors."""

    EXACT = "exact"
    RANDOMIZED = "randomized"


class RankMethod(str, Enum):
    """How the rank of each module is chosen (extract, resize)."""

    FIXED = "fixed"
    ENERGY = "energy"  # kohya's sv_fro P is energy P² (P: the Frobenius norm's fraction)
    BUDGET = "budget"
    SV_RATIO = "sv_ratio"  # kohya's: keep the singular values >= the largest / ratio
    SV_CUMULATIVE = "sv_cumulative"  # kohya's: keep fraction F of the singular values' sum


class MajoritySign(str, Enum):
    """How TIES elects each element's sign: from Σ_i X_i or from Σ_i sign(X_i)."""

    TOTAL = "total"
    FREQUENCY = "frequency"


class CombineMethod(str, Enum):
    """How ``combine`` merges the adapters (PEFT's combination types; ``svd`` selects the
    ``_svd`` variant, and ``linear`` with ``svd`` is PEFT's ``svd``)."""

    LINEAR = "linear"  # Σ w_i X_i (task arithmetic)
    CAT = "cat"  # the factors side by side: the exact weighted sum of the deltas
    TIES = "ties"  # magnitude-pruned, sign election, mean over the agreeing tensors
    DARE_LINEAR = "dare_linear"  # randomly pruned and rescaled, then Σ w_i X_i
    DARE_TIES = "dare_ties"  # randomly pruned and rescaled, then TIES' election and mean
    MAGNITUDE_PRUNE = "magnitude_prune"  # magnitude-pruned, then Σ w_i X_i

    @property
    def prunes(self) -> bool:
        return self not in (CombineMethod.LINEAR, CombineMethod.CAT)

    @property
    def random(self) -> bool:
        return self in (CombineMethod.DARE_LINEAR, CombineMethod.DARE_TIES)

    @property
    def elects_sign(self) -> bool:
        return self in (CombineMethod.TIES, CombineMethod.DARE_TIES)

    def peft_name(self, svd: bool) -> str:
        if svd:
            return "svd" if self is CombineMethod.LINEAR else f"{self.value}_svd"
        return self.value


def choice(kind: type[_E], value: object, what: str) -> _E:
    """``value`` as a member of the enum ``kind``.

    Raises:
        OptionError: ``value`` is none of its values.
    """
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(str(c.value) for c in kind)
        raise OptionError(f"{what} must be one of {choices}, not {value!r}") from None


def check_finite(what: str, value: float | None) -> None:
    """Refuse a NaN or infinite option value (None: not given).

    Raises:
        OptionError: ``value`` is NaN or infinite.
    """
    if value is not None and not math.isfinite(value):
        raise OptionError(f"{what} must be a finite number, not {value}")


@dataclass(frozen=True)
class RankPolicy:
    """How extract and resize choose each module's rank; refused when an option cannot apply.

    - ``fixed``: ``rank`` everywhere (None: the command's default); energy, param_budget,
      min_rank > 1 and max_rank do not apply to it.
    - ``energy``: the smallest rank keeping fraction ``energy`` of each delta's squared norm.
    - ``budget``: ``param_budget`` LoRA parameters in total, spent where they remove the most
      squared error.
    - ``sv_ratio``: the singular values at least the largest / ``sv_ratio`` (kohya's sv_ratio).
    - ``sv_cumulative``: the smallest rank whose singular values sum to fraction
      ``sv_cumulative`` of them all (kohya's sv_cumulative).
    All but ``fixed`` take ranks within ``min_rank``..``max_rank``; ``rank`` does not apply
    to them. kohya's sv_fro P is ``energy`` P².

    Raises:
        OptionError: from ``__post_init__``, an unknown method, a missing or out-of-range
            value, or an option that does not apply to the method.
    """

    method: RankMethod = RankMethod.FIXED
    rank: int | None = None
    energy: float | None = None
    param_budget: int | None = None
    min_rank: int = 1
    max_rank: int | None = None
    sv_ratio: float | None = None
    sv_cumulative: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", choice(RankMethod, self.method, "rank method"))
        check_finite("--energy", self.energy)
        check_finite("--sv-ratio", self.sv_ratio)
        check_finite("--sv-cumulative", self.sv_cumulative)
        if (
            (self.rank is not None and self.rank < 1)
            or self.min_rank < 1
            or (self.max_rank is not None and self.max_rank < self.min_rank)
        ):
            raise OptionError("ranks must be >= 1 and --min-rank <= --max-rank")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise OptionError(f"--energy must be in (0, 1], not {self.energy}")
        if self.param_budget is not None and self.param_budget < 1:
            raise OptionError(f"--param-budget must be >= 1, not {self.param_budget}")
        if self.sv_ratio is not None and self.sv_ratio < 1:
            raise OptionError(f"--sv-ratio must be >= 1, not {self.sv_ratio}")
        if self.sv_cumulative is not None and not 0 < self.sv_cumulative <= 1:
            raise OptionError(f"--sv-cumulative must be in (0, 1], not {self.sv_cumulative}")
        self._check_applies()
        self._check_kohya()

    def _check_kohya(self) -> None:
        for value, method, option, needs in (
            (self.sv_ratio, RankMethod.SV_RATIO, "--sv-ratio", "R >= 1"),
            (self.sv_cumulative, RankMethod.SV_CUMULATIVE, "--sv-cumulative", "0 < F <= 1"),
        ):
            if self.method is method and value is None:
                raise OptionError(f"--rank-method {method.value} needs {option} with {needs}")
            if value is not None and self.method is not method:
                raise OptionError(
                    f"{option} applies to --rank-method {method.value}, not {self.method.value}"
                )

    def _check_applies(self) -> None:
        method = self.method
        if method is RankMethod.ENERGY and self.energy is None:
            raise OptionError("--rank-method energy needs --energy F with 0 < F <= 1")
        if method is RankMethod.BUDGET and self.param_budget is None:
            raise OptionError("--rank-method budget needs --param-budget N (total LoRA parameters)")
        if self.energy is not None and method is not RankMethod.ENERGY:
            raise OptionError(f"--energy applies to --rank-method energy, not {method.value}")
        if self.param_budget is not None and method is not RankMethod.BUDGET:
            raise OptionError(f"--param-budget applies to --rank-method budget, not {method.value}")
        if method is RankMethod.FIXED:
            if self.min_rank != 1 or self.max_rank is not None:
                raise OptionError(
                    "--min-rank and --max-rank bound the ranks the methods other than fixed choose",
                    hint="with --rank-method fixed, --rank R is every module's rank",
                )
        elif self.rank is not None:
            raise OptionError(
                f"--rank is the rank of --rank-method fixed, not of {method.value}",
                hint="bound the ranks with --min-rank and --max-rank",
            )


@dataclass(frozen=True)
class CombineOptions:
    """How ``combine`` merges adapters: PEFT's combination type and its parameters; refused
    when an option cannot apply to the method.

    Raises:
        OptionError: from ``__post_init__``, an unknown method or majority sign, a missing or
            out-of-range value, or an option that does not apply to the method.
    """

    method: CombineMethod = CombineMethod.LINEAR
    svd: bool = False
    rank: int | None = None
    clamp: float | None = None
    density: float | None = None
    majority_sign: MajoritySign | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        kind = choice(CombineMethod, self.method, "method")
        object.__setattr__(self, "method", kind)
        if self.majority_sign is not None:
            sign = choice(MajoritySign, self.majority_sign, "majority sign")
            object.__setattr__(self, "majority_sign", sign)
        check_finite("--clamp", self.clamp)
        check_finite("--density", self.density)
        if kind is CombineMethod.CAT and self.svd:
            raise OptionError(
                "cat has no --svd variant", hint="linear --svd decomposes the same exact sum"
            )
        if self.rank is not None and (not self.svd or self.rank < 1):
            raise OptionError(
                "--rank R (R >= 1) sets the rank of the --svd methods only",
                hint="use --svd, or `lorasurgeon resize` to shrink an adapter",
            )
        if self.clamp is not None and (not self.svd or not 0 <= self.clamp <= 1):
            raise OptionError("--clamp Q needs --svd and a quantile 0 <= Q <= 1")
        self._check_pruning(kind)

    def _check_pruning(self, kind: CombineMethod) -> None:
        if kind.prunes and (self.density is None or not 0 < self.density <= 1):
            raise OptionError(f"{kind.value} needs --density D with 0 < D <= 1 (the fraction kept)")
        if not kind.prunes and self.density is not None:
            raise OptionError(f"--density applies to the pruning methods, not to {kind.value}")
        if self.majority_sign is not None and not kind.elects_sign:
            raise OptionError(f"--majority-sign applies to ties and dare_ties, not to {kind.value}")
        if self.seed is not None and not kind.random:
            raise OptionError(
                f"--seed seeds the DARE masks of dare_linear and dare_ties, not {kind.value}"
            )

    @property
    def sign(self) -> MajoritySign:
        """The majority sign method, ``total`` unless given."""
        return self.majority_sign or MajoritySign.TOTAL

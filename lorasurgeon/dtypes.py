"""The one dtype table: every dtype the safetensors format defines, and the --dtype choice.

Imports nothing from the package but ``errors``; torch only inside the functions that need it.
A tensor of any dtype here can be copied; only ``COMPUTE_DTYPES`` are computed on.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from .errors import OptionError

if TYPE_CHECKING:
    import torch

__all__ = [
    "COMPUTE_DTYPES",
    "DTYPES",
    "DType",
    "DTypeInfo",
    "code_of",
    "tensor_nbytes",
    "torch_dtype",
]


@dataclass(frozen=True)
class DTypeInfo:
    """One safetensors dtype: its code, bits per element, torch dtype name (None where torch
    has no element-wise equivalent, e.g. the sub-byte F4 and F6 codes) and whether it is a
    floating point format."""

    code: str
    bits: int
    torch_name: str | None
    floating: bool


#: Every dtype of the safetensors format (safetensors 0.8, ``Dtype`` in its Rust core).
DTYPES: dict[str, DTypeInfo] = {d.code: d for d in (
    DTypeInfo("BOOL", 8, "bool", False),
    DTypeInfo("F4", 4, None, True),
    DTypeInfo("F6_E2M3", 6, None, True),
    DTypeInfo("F6_E3M2", 6, None, True),
    DTypeInfo("U8", 8, "uint8", False),
    DTypeInfo("I8", 8, "int8", False),
    DTypeInfo("F8_E5M2", 8, "float8_e5m2", True),
    DTypeInfo("F8_E4M3", 8, "float8_e4m3fn", True),
    DTypeInfo("F8_E8M0", 8, "float8_e8m0fnu", True),
    DTypeInfo("F8_E4M3FNUZ", 8, "float8_e4m3fnuz", True),
    DTypeInfo("F8_E5M2FNUZ", 8, "float8_e5m2fnuz", True),
    DTypeInfo("I16", 16, "int16", False),
    DTypeInfo("U16", 16, "uint16", False),
    DTypeInfo("F16", 16, "float16", True),
    DTypeInfo("BF16", 16, "bfloat16", True),
    DTypeInfo("I32", 32, "int32", False),
    DTypeInfo("U32", 32, "uint32", False),
    DTypeInfo("F32", 32, "float32", True),
    DTypeInfo("C64", 64, "complex64", False),
    DTypeInfo("F64", 64, "float64", True),
    DTypeInfo("I64", 64, "int64", False),
    DTypeInfo("U64", 64, "uint64", False),
)}  # fmt: skip
#: Dtypes that merge, extract, combine and resize compute on (in float32) and --dtype converts.
COMPUTE_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})


def tensor_nbytes(code: str, numel: int) -> int | None:
    """Bytes of ``numel`` elements of dtype ``code``: numel·bits/8, as safetensors defines it;
    None when that is not a whole number of bytes (safetensors refuses such a tensor)."""
    bits = numel * DTYPES[code].bits
    return bits // 8 if bits % 8 == 0 else None


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code.

    Raises:
        OptionError: torch (this version) has no element-wise dtype for ``code``.
    """
    import torch

    name = DTYPES[code].torch_name
    dtype = getattr(torch, name, None) if name is not None else None
    if not isinstance(dtype, torch.dtype):
        raise OptionError(f"torch {torch.__version__} cannot compute on {code} tensors")
    return dtype


def code_of(dtype: torch.dtype) -> str:
    """The safetensors dtype code of a torch dtype.

    Raises:
        OptionError: safetensors has no code for it.
    """
    name = str(dtype).removeprefix("torch.")
    for info in DTYPES.values():
        if info.torch_name == name:
            return info.code
    raise OptionError(f"dtype {name} cannot be stored in safetensors")


class DType(str, Enum):
    """The output dtype choice (--dtype): ``auto`` keeps each tensor's dtype."""

    AUTO = "auto"
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"

    @property
    def code(self) -> str | None:
        """The safetensors dtype code, None for auto."""
        for info in DTYPES.values():
            if info.torch_name == self.value and info.code in COMPUTE_DTYPES:
                return info.code
        return None

    @classmethod
    def code_of(cls, value: str) -> str | None:
        """The safetensors code of a dtype choice (None for auto).

        Raises:
            OptionError: ``value`` is not one of the choices.
        """
        try:
            return cls(value).code
        except ValueError:
            choices = ", ".join(d.value for d in cls)
            raise OptionError(f"dtype must be one of {choices}, not {value!r}") from None

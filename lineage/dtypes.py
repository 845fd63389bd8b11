"""The safetensors dtypes lineage can compare, as data.

`unit_roundoff` is the relative rounding error of storing a real number in
that dtype (half an ULP at the top of a binade): the scale below which two
copies of a weight count as the same value stored twice. FP8 E4M3 keeps 3
mantissa bits, so its roundoff is 2^-4; with 128x128 block scales the error
of real weights is a few percent, as DESIGN.md says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DType:
    name: str
    itemsize: int
    torch_name: str | None  # attribute of the torch module that decodes it
    is_float: bool
    unit_roundoff: float

    @property
    def torch_dtype(self) -> Any:
        """The torch dtype, imported on first use: planning and the kernel path never need torch."""
        if self.torch_name is None:
            return None
        import torch

        return getattr(torch, self.torch_name)


_TABLE = [
    DType("F64", 8, "float64", True, 2.0**-53),
    DType("F32", 4, "float32", True, 2.0**-24),
    DType("F16", 2, "float16", True, 2.0**-11),
    DType("BF16", 2, "bfloat16", True, 2.0**-8),
    DType("F8_E4M3", 1, "float8_e4m3fn", True, 2.0**-4),
    DType("F8_E5M2", 1, "float8_e5m2", True, 2.0**-3),
    DType("I64", 8, "int64", False, 0.0),
    DType("I32", 4, "int32", False, 0.0),
    DType("I16", 2, "int16", False, 0.0),
    DType("I8", 1, "int8", False, 0.0),
    DType("U8", 1, "uint8", False, 0.0),
    DType("U16", 2, None, False, 0.0),
    DType("U32", 4, None, False, 0.0),
    DType("U64", 8, None, False, 0.0),
    DType("BOOL", 1, "bool", False, 0.0),
]
DTYPES: dict[str, DType] = {d.name: d for d in _TABLE}
FP8 = frozenset({"F8_E4M3", "F8_E5M2"})


MIXED = "mixed"  # the dtype of a view whose segments differ (geometry.View.dtype)
#: Near-equality of an element where a view mixes dtypes, so no single
#: rounding applies: FP8 E4M3's roundoff, the coarsest of the mixes met
#: (per-expert FP8 matrices with BF16 ones).
MIXED_NEAR_TOLERANCE = 2.0**-4


def rounding_tolerance(a: str, b: str) -> float | None:
    """Largest relative distance explained by storing one weight in dtypes a and b;
    None when either side mixes dtypes (no one rounding bounds it).

    Two tensors in the same dtype that hold the same values are bit-equal, so
    the tolerance is a small fraction of an ULP (a rare flip from a round
    trip). Across dtypes the coarser dtype's roundoff bounds the RMS error.
    """
    if MIXED in (a, b):
        return None
    ua, ub = DTYPES[a].unit_roundoff, DTYPES[b].unit_roundoff
    if a == b:
        return ua / 16
    return max(ua, ub)


def view_tolerance(a: str, b: str) -> float:
    """The per-element near-equality tolerance the engines count with."""
    tol = rounding_tolerance(a, b)
    return MIXED_NEAR_TOLERANCE if tol is None else tol

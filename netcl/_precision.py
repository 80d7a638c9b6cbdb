"""Half precision: parameters stored in float16 or bfloat16, updated in float32.

A half parameter (and its gradient) is stored in 16 bits; its state buffers, the update
and an optional master copy of the parameter are float32 (`compute_dtype`). The new
parameter is the float32 result, saturated at the storage dtype's largest finite value
(the extreme-value policy: never a silent infinity), then rounded to the storage dtype:
to nearest even, or stochastically (`stochastic_rounding`).

Stochastic rounding adds random bits to the bits that rounding drops (the 16 below
bfloat16's mantissa, 13 or more below float16's) and truncates them: unbiased, a value
rounds up with probability equal to its distance from the value below, in ulps. The
random bits come from a counter-based hash of the element's index and a per-parameter
key that changes with the step, so a run is reproducible and a resumed run continues
bit for bit. The fused kernel (`kernels/precision.cl`) and the
numpy code here compute the same bits.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import numpy.typing as npt

__all__ = [
    "BFLOAT16",
    "FLOAT16",
    "HALF_DTYPES",
    "compute_dtype",
    "is_half",
    "round_half",
    "stochastic_key",
]

FLOAT16 = np.dtype(np.float16)
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
HALF_DTYPES = (FLOAT16, BFLOAT16)
"""The 16-bit dtypes a parameter may have; its state and update are float32."""

_LARGEST: dict[np.dtype[Any], float] = {
    FLOAT16: 65504.0,
    BFLOAT16: float(np.array(0x7F7F0000, np.uint32).view(np.float32)[()]),  # (2 - 2**-7) * 2**127
}
"""Each half dtype's largest finite value, as a float32."""


def is_half(dtype: np.dtype[Any]) -> bool:
    """Whether `dtype` is a 16-bit storage dtype (float16 or bfloat16)."""
    return dtype in HALF_DTYPES


def compute_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The dtype a parameter of `dtype` is updated in, and its state buffers have."""
    return np.dtype(np.float32) if dtype in HALF_DTYPES else dtype


_KEY_RANGE = 1 << 24
"""Keys are integers below 2**24, exact in a float32 kernel argument."""


def stochastic_key(place: int, count: int) -> float:
    """The key of a parameter's random bits at its step `count`: from its place among
    the optimizer's parameters and the step, so each parameter and each step draws
    other bits (a kernel argument of the compute dtype, exact below 2**24)."""
    return float((place * 1_000_003 + count * 7_919) % _KEY_RANGE)


def _mix(x: npt.NDArray[np.uint32]) -> npt.NDArray[np.uint32]:
    """A 32-bit integer hash (the `mix` of `kernels/precision.cl`)."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def random_bits(key: float, size: int) -> npt.NDArray[np.uint32]:
    """The random 32-bit words of elements 0 .. size-1 of a parameter with `key`."""
    with np.errstate(over="ignore"):
        seed = _mix(np.array([int(key)], np.uint32))[0]
        index = np.arange(size, dtype=np.uint64).astype(np.uint32)
        return _mix(index + seed)


def round_half(x: npt.NDArray[np.float32], dtype: np.dtype[Any], key: float | None = None) -> npt.NDArray[Any]:
    """`x` (float32) saturated at `dtype`'s largest finite value and rounded to `dtype`:
    to nearest even, or stochastically with the random bits of `key` (flat index order).
    NaN stays NaN."""
    largest = np.float32(_LARGEST[dtype])
    x = np.clip(x, -largest, largest)
    # NaN: the quiet NaN of its sign (0x7fc00000), as the kernel's quiet_nan makes it
    x = np.where(np.isnan(x), np.copysign(np.float32(np.nan), x), x)
    if key is None:
        return x.astype(dtype)
    flat = np.ascontiguousarray(x).reshape(-1)
    bits = flat.view(np.uint32)
    r = random_bits(key, flat.size)
    with np.errstate(over="ignore"):
        if dtype == BFLOAT16:
            # the 16 bits below bfloat16's mantissa
            out = ((bits + (r & np.uint32(0xFFFF))) & np.uint32(0xFFFF0000)).view(np.float32)
        else:
            out = _stochastic_float16(flat, bits, r)
    return out.astype(dtype).reshape(x.shape)


def _stochastic_float16(
    flat: npt.NDArray[np.float32], bits: npt.NDArray[np.uint32], r: npt.NDArray[np.uint32]
) -> npt.NDArray[np.float32]:
    """float32 values on float16's grid, rounded stochastically (the kernel's
    `to_half_grid`)."""
    exponent = ((bits >> np.uint32(23)) & np.uint32(0xFF)).astype(np.int64)
    # float16 keeps 10 of float32's 23 mantissa bits down to 2**-14; below that, its
    # ulp stays 2**-24, so one more bit is dropped per binade
    drop = np.where(exponent >= 113, 13, 126 - exponent)
    tiny = drop > 23
    shift = np.minimum(drop, 23).astype(np.uint32)
    mask = (np.uint32(1) << shift) - np.uint32(1)
    kept = ((bits + (r & mask)) & ~mask).view(np.float32)
    # below 2**-24 (only 0 and 2**-24 are near): up with probability |x| / 2**-24, to
    # 32 bits (|x| * 2**56 is exact in float32 and below 2**32)
    threshold = (np.abs(np.where(tiny, flat, np.float32(0.0))) * np.float32(2.0**56)).astype(np.uint32)
    small = np.where(r < threshold, np.float32(2.0**-24), np.float32(0.0))
    small = np.where(np.signbit(flat), -small, small)
    return np.where(tiny, small, kept).astype(np.float32)

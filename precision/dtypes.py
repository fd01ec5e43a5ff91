"""Floating-point format facts shared by capture and compare (no torch needed).

Names are numpy-style (``float32``, ``float16``, ``bfloat16``, ``int64``, ``bool``).
``bfloat16`` arrays use :mod:`ml_dtypes`, so dumps read without torch. ml_dtypes is
imported on first use (:func:`bfloat16`), when an array needs it: its import takes about half
a second, which ``precision compare --help`` (and a compare of fp16 dumps) should not pay.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .errors import InputError

#: safetensors dtype tag -> numpy dtype name
SAFETENSORS_TO_NAME = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
NAME_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_TO_NAME.items()}

#: user-facing short names accepted on the command line
SHORT_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64"}
LONG_TO_SHORT = {v: k for k, v in SHORT_NAMES.items()}


#: bfloat16's largest finite value, ``(2 - 2**-7) * 2**127`` (``ml_dtypes.finfo(bfloat16).max``,
#: written out so that it needs no import; tests/test_dtypes.py checks it)
BF16_MAX = (2 - 2.0**-7) * 2.0**127


@functools.cache
def bfloat16() -> np.dtype:
    """numpy's ``bfloat16`` dtype, from :mod:`ml_dtypes`, imported here on first use."""
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype for a dtype name (``bfloat16`` via ml_dtypes, loaded then)."""
    if name == "bfloat16":
        return bfloat16()
    return np.dtype(name)


def itemsize(name: str) -> int:
    """Bytes per element of a dtype name, without loading ml_dtypes for ``bfloat16``."""
    return 2 if name == "bfloat16" else np.dtype(name).itemsize


def canonical(name: str) -> str:
    """Map ``fp16``/``half``/``torch.float16``/``F16`` style names to ``float16`` style."""
    n = name.strip().removeprefix("torch.")
    n = {"half": "float16", "float": "float32", "double": "float64"}.get(n, n)
    n = SHORT_NAMES.get(n.lower(), n)
    n = SAFETENSORS_TO_NAME.get(n, n)
    if n not in NAME_TO_SAFETENSORS:
        raise InputError(f"unknown dtype {name!r}: use fp32, fp16 or bf16")
    return n


def short(name: str) -> str:
    """``float16`` -> ``fp16``; other names unchanged."""
    return LONG_TO_SHORT.get(name, name)


def is_float(name: str) -> bool:
    """True for floating dtypes (float64/32/16, bfloat16)."""
    return name in ("float64", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class FloatFormat:
    """Facts about one floating-point format.

    ``mantissa_bits`` m gives the machine epsilon ``eps = 2**-m``; ``min_exp`` is the
    exponent of the smallest normal number ``2**min_exp``; ``max`` the largest finite value.
    """

    name: str
    mantissa_bits: int
    min_exp: int
    max: float

    @property
    def eps(self) -> float:
        """Machine epsilon ``2**-m``: the gap between 1 and the next representable number."""
        return float(2.0**-self.mantissa_bits)

    @property
    def lowest(self) -> float:
        """The most negative finite value (``-max``)."""
        return -self.max

    @property
    def smallest_normal(self) -> float:
        return float(2.0**self.min_exp)

    @property
    def smallest_subnormal(self) -> float:
        return float(2.0 ** (self.min_exp - self.mantissa_bits))


FORMATS = {
    "float64": FloatFormat("float64", 52, -1022, float(np.finfo(np.float64).max)),
    "float32": FloatFormat("float32", 23, -126, float(np.finfo(np.float32).max)),
    "float16": FloatFormat("float16", 10, -14, 65504.0),
    "bfloat16": FloatFormat("bfloat16", 7, -126, BF16_MAX),
}


#: fp16's limits, which stats-mode records count against whatever dtype ran
FP16_MAX = FORMATS["float16"].max
#: nonzero magnitudes below this round to zero in fp16 (half the smallest subnormal, 2^-24)
FP16_FLUSH = FORMATS["float16"].smallest_subnormal / 2
#: a value this close to its format's max (as a share of it) is "pinned near the max"
SATURATION = 0.98
NEAR_FP16_MAX = SATURATION * FP16_MAX


def float_format(name: str) -> FloatFormat:
    """The :class:`FloatFormat` of a floating dtype name; float32 for integer/bool dtypes."""
    return FORMATS.get(name, FORMATS["float32"])

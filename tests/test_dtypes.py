"""precision.dtypes: bfloat16 facts written out match ml_dtypes, which loads only on use."""

from __future__ import annotations

import subprocess
import sys

import ml_dtypes
import numpy as np

from precision import dtypes


def test_bfloat16_constants_match_ml_dtypes() -> None:
    assert float(ml_dtypes.finfo(ml_dtypes.bfloat16).max) == dtypes.BF16_MAX
    assert dtypes.FORMATS["bfloat16"].max == dtypes.BF16_MAX
    assert dtypes.bfloat16() == np.dtype(ml_dtypes.bfloat16)
    assert dtypes.numpy_dtype("bfloat16") == np.dtype(ml_dtypes.bfloat16)
    for name in ("bfloat16", "float16", "float32", "float64", "int64", "int8", "uint8", "bool"):
        assert dtypes.itemsize(name) == dtypes.numpy_dtype(name).itemsize, name


def test_ml_dtypes_loads_when_a_bfloat16_array_needs_it() -> None:
    code = ("import sys\n"
            "from precision import dtypes\n"
            "print(dtypes.float_format('bfloat16').max, dtypes.itemsize('bfloat16'),\n"
            "      'ml_dtypes' in sys.modules)\n"
            "print(dtypes.numpy_dtype('bfloat16'), 'ml_dtypes' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.splitlines()
    assert out == [f"{dtypes.BF16_MAX} 2 False", "bfloat16 True"]

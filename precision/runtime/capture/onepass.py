"""A CPU record's statistics and count sketch in one pass over its memory (numba, optional).

:func:`~precision.runtime.capture.tensorstats.tensor_stats` on the CPU makes six or seven
passes over a record with torch (sum, norm, min, max, the signed multiply and its sum);
:func:`one_pass` makes one, over a flat float32 or float64 array, and returns

- ``Σx`` and ``Σx²`` in float64 (each element widened exactly; per row of
  ``K = 1021`` elements, then row by row): for ``n`` elements the rounding error of each is
  at most ``δ(n) = (K + n / K + 2) ε`` times ``Σ|x|`` or ``Σx²`` (``ε = 2^-53``; recursive
  summation of ``m`` terms errs by at most ``(m - 1) ε`` of the sum of magnitudes, here a
  row's ``K`` terms and then ``n / K`` row sums, plus the square's rounding for float64);
- the smallest and largest element exactly, as order keys of their bit patterns
  (``b xor ((b >> 63) & MAX)`` orders integers as their floats; it vectorises where float
  comparisons that respect NaN do not). A NaN's key lies beyond both infinities', so the
  extrema alone tell whether the record holds NaN, inf or values near fp16's limit;
- the count sketch of :mod:`precision.dumps.sketch`, ``y_j = Σ_{i mod K = j} s(i) x_i``,
  into the caller's float64 ``y``, with the sign ``s(i) = σ(i mod P) σ(i div P)`` computed
  from the index as it goes (no table).

The loops are compiled with ``reassoc``/``contract`` only: sums may be reordered
(vectorised), but NaN and infinities keep their meaning (no ``nnan``/``ninf``). numba is the
optional ``fast`` extra (``pip install 'precision[fast]'``); this module is imported only
when the capture uses it (:func:`~precision.runtime.capture.tensorstats.fused_kernel`).
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

from ...dumps.sketch import BUCKETS, INDEX_MASK, MULTIPLIER, PERIOD

_jit = numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy",
                  fastmath={"reassoc", "contract"})

#: the order key's mask of each bit-pattern width (int32 for float32, int64 for float64)
MASKS = {4: (1 << 31) - 1, 8: (1 << 63) - 1}


def error_bound(n: int) -> float:
    """``δ(n)``: the relative rounding error bound of :func:`one_pass`'s sums (see above)."""
    return (BUCKETS + n / BUCKETS + 2) * 2.0**-53


@_jit
def _sigma(k: int) -> float:
    g = ((k & INDEX_MASK) * MULTIPLIER) & 0xFFFFFFFF
    return 1.0 - 2.0 * ((g >> 26) & 1)


@_jit
def _row(x: Any, bits: Any, y: Any, base: int, flip: float, mask: int) -> Any:
    """One row (at most ``K`` elements, the first at index ``base`` of its period): its
    sum, sum of squares and extreme keys; adds its signed elements to ``y``."""
    s = 0.0
    s2 = 0.0
    lo = np.int64(bits[0]) ^ ((np.int64(bits[0]) >> 63) & mask)
    hi = lo
    for k in range(x.size):
        v = np.float64(x[k])
        s += v
        s2 += v * v
        b = np.int64(bits[k])
        key = b ^ ((b >> 63) & mask)
        lo = min(lo, key)
        hi = max(hi, key)
        g = ((base + k) * MULTIPLIER) & 0xFFFFFFFF
        y[k] += flip * (1.0 - 2.0 * ((g >> 26) & 1)) * v
    return s, s2, lo, hi


@_jit
def _value(key: int, mask: int, itemsize: int) -> float:
    """The float whose order key (see :func:`one_pass`) is ``key``."""
    bits = key ^ ((key >> 63) & mask)
    if itemsize == 4:
        return np.float64(np.int32(bits).view(np.float32))
    return np.int64(bits).view(np.float64)


@_jit
def one_pass(x: Any, bits: Any, mask: int) -> Any:
    """``(Σx, Σx², min, max, sketch)`` of a flat array ``x`` (``x.size >= 1``) whose bit
    patterns are ``bits`` (the same memory as signed integers of its width, ``mask`` from
    :data:`MASKS`); the sketch is ``BUCKETS`` float64 values."""
    n = x.size
    y = np.zeros(BUCKETS)
    s = 0.0
    s2 = 0.0
    lo = np.int64(bits[0]) ^ ((np.int64(bits[0]) >> 63) & mask)
    hi = lo
    for start in range(0, n, PERIOD):
        flip = _sigma(start // PERIOD)
        for row in range(start, min(n, start + PERIOD), BUCKETS):
            end = min(n, row + BUCKETS)
            rs, rs2, rlo, rhi = _row(x[row:end], bits[row:end], y, row - start, flip, mask)
            s += rs
            s2 += rs2
            lo = min(lo, rlo)
            hi = max(hi, rhi)
    return s, s2, _value(lo, mask, x.itemsize), _value(hi, mask, x.itemsize), y


def summary(a: np.ndarray) -> tuple[float, float, float, float, np.ndarray]:
    """``(Σx, Σx², min, max, sketch)`` of a flat float32 or float64 array (not empty)."""
    if a.itemsize == 4:
        return one_pass(a, a.view(np.int32), MASKS[4])
    return one_pass(a, a.view(np.int64), MASKS[8])


def warm() -> None:
    """Compile :func:`one_pass` for float32 and float64 (or load it from numba's cache)."""
    summary(np.ones(1, np.float32))
    summary(np.ones(1, np.float64))

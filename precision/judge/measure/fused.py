"""The fused kernel: every per-element figure of a clean chunk in one call (numba, optional).

:class:`~precision.judge.measure.metrics.PairAccumulator` filters masked and non-finite elements
and hands this kernel (or its numpy twin) a *clean* chunk: two float64 arrays whose elements
are all compared. numpy needs a pass over the chunk per operation (about 30, each reading and
writing chunk-sized arrays); :func:`accumulate` makes three loops over the chunk:

1. the means of ``a`` and ``b`` (the centre of this chunk's co-moments),
2. every sum, maximum and count (``d²``, ``|d|``, the floored relative error and its
   thresholds, saturation, the centred co-moments), vectorised,
3. the noise model's binade histogram (count, ``d²``, max ``|d|`` per binade of ``|a|``),
   a scatter that cannot be vectorised (the second loop leaves each element's binade and
   ``|d|`` in scratch arrays for it), into four interleaved lanes so that consecutive
   elements of one binade do not wait on each other.

The figures are the numpy path's: counts and maxima identical (maxima of non-negative
finite floats are taken on their bit patterns, which order the same way and vectorise),
sums equal up to float64 rounding (another summation order). The loops are compiled with
``nnan``/``ninf`` fast-math, which holds because the caller passes only finite values whose
squared differences stay finite (``|a|, |b| < SAFE_ABS``); other chunks go to numpy.

numba is an optional dependency (``pip install precision[fast]``): it is large (LLVM), and
importing it and loading the compiled kernel from its on-disk cache costs about 0.4 s per
process (compiling it the first time, a few seconds), so compare uses it for large work only
(:mod:`precision.judge.measure.metrics`). This module is imported only when it is used.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

from .noise import BIN_OFFSET, BINS

#: lanes of the histogram scatter (independent accumulators)
LANES = 4
#: a chunk whose values reach this goes to numpy: ``d²`` would overflow under fast-math
SAFE_ABS = 2.0**500
#: float64 biased exponent ``E`` of ``x``: its frexp exponent is ``E - 1022``
_SHIFT = BIN_OFFSET - 1022

_jit = numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy",
                  fastmath={"nnan", "ninf", "nsz", "reassoc", "contract"})  # not arcp


@_jit
def _bits(x: float) -> int:
    return np.float64(x).view(np.int64)


@_jit
def _value(k: int) -> float:
    return np.int64(k).view(np.float64)


@_jit
def accumulate(a: Any, b: Any, floor: float, smallest_normal: float, tsat: float,
               bsat: float, t1: float, t2: float, t3: float, lanes: Any, bins: Any,
               absd: Any, h_count: Any, h_d2: Any, h_max: Any) -> Any:
    """One clean chunk (``a.size >= 1``): adds the binade histogram into ``h_count``,
    ``h_d2``, ``h_max`` and returns the counts over the thresholds ``t1..t3``, the
    saturated counts (``|b| >= tsat``, ``|a| >= bsat`` with a relative error above 1e-2),
    ``Σd²``, ``Σ|d|``, ``max |d|``, the max floored relative error, ``max |a|``, ``max |b|``,
    and the chunk's means and centred co-moments. Scratch: ``lanes`` (zeroed, left zeroed),
    ``bins`` and ``absd`` (at least ``a.size`` long)."""
    n = a.size
    sa = 0.0
    sb = 0.0
    for i in range(n):
        sa += a[i]
        sb += b[i]
    ma = sa / n
    mb = sb / n
    sd2 = sabs = caa = cbb = cab = 0.0
    mabs = mrel = maa = mab = np.int64(0)
    o1 = o2 = o3 = sat = sat_base = 0
    floor_bits = _bits(floor)
    low_bits = _bits(smallest_normal)
    lo = BINS
    hi = 0
    for i in range(n):
        x = a[i]
        y = b[i]
        d = y - x
        ad = abs(d)
        aa = abs(x)
        ab = abs(y)
        sd2 += d * d
        sabs += ad
        mabs = max(mabs, _bits(ad))
        maa = max(maa, _bits(aa))
        mab = max(mab, _bits(ab))
        rel = ad / _value(max(_bits(aa), floor_bits))
        mrel = max(mrel, _bits(rel))
        o1 += rel > t1
        o2 += rel > t2
        o3 += rel > t3
        big = rel > 1e-2
        sat += big & (ab >= tsat)
        sat_base += big & (aa >= bsat)
        xc = x - ma
        yc = y - mb
        caa += xc * xc
        cbb += yc * yc
        cab += xc * yc
        e = (max(_bits(aa), low_bits) >> 52) + _SHIFT
        bins[i] = e
        absd[i] = ad
        lo = min(lo, e)
        hi = max(hi, e)
    _scatter(n, bins, absd, lanes)
    for e in range(lo, hi + 1):
        for lane in range(LANES):
            h_count[e] += np.int64(lanes[e, 3 * lane])
            h_d2[e] += lanes[e, 3 * lane + 1]
            h_max[e] = max(h_max[e], lanes[e, 3 * lane + 2])
        lanes[e, :] = 0.0
    return (o1, o2, o3, sat, sat_base, sd2, sabs, _value(mabs), _value(mrel), _value(maa),
            _value(mab), ma, mb, caa, cbb, cab)


@_jit
def _scatter(n: int, bins: Any, absd: Any, lanes: Any) -> None:
    """Count, ``d²`` and max ``|d|`` per binade; element ``i`` goes to lane ``i % 4``."""
    whole = n - n % LANES
    for i in range(0, whole, LANES):
        for lane in range(LANES):
            e = bins[i + lane]
            ad = absd[i + lane]
            lanes[e, 3 * lane] += 1.0
            lanes[e, 3 * lane + 1] += ad * ad
            if ad > lanes[e, 3 * lane + 2]:
                lanes[e, 3 * lane + 2] = ad
    for i in range(whole, n):
        e = bins[i]
        ad = absd[i]
        lanes[e, 0] += 1.0
        lanes[e, 1] += ad * ad
        if ad > lanes[e, 2]:
            lanes[e, 2] = ad


@numba.njit(cache=True, nogil=True, boundscheck=False)  # IEEE comparisons: no fast-math
def ordinary(a: Any, b: Any, base_lowest: float, target_lowest: float,
             target_max: float) -> bool:
    """True when every element pair is finite, above its format's lowest value (no mask),
    ``|a| <= target_max`` (nothing beyond the target's range to count) and below
    :data:`SAFE_ABS`: a chunk :func:`accumulate` measures whole. One vectorised pass,
    instead of numpy's min and max of each side."""
    upper = min(target_max, SAFE_ABS)
    bad = 0
    for i in range(a.size):
        x = a[i]
        y = b[i]
        bad += not ((x > base_lowest) & (abs(x) <= upper) & (y > target_lowest)
                    & (abs(y) < SAFE_ABS))
    return bad == 0


@_jit
def half_to_float64(h: Any, out: Any) -> None:
    """fp16 bit patterns (uint16) to float64, exactly (numpy's fp16 conversion costs four
    times this vectorised one): sign, 5 exponent and 10 mantissa bits; exponent 0 holds
    zeros and subnormals (``m 2^-24``), 31 infinities (``m = 0``) and NaN."""
    for i in range(h.size):
        k = np.int64(h[i])
        m = k & 0x3FF
        e = (k >> 10) & 0x1F
        sign = (k >> 15) << 63
        normal = ((e + (1023 - 15)) << 52) | (m << 42)
        special = (0x7FF << 52) | (m << 42)
        tiny = _bits(np.float64(m) * 2.0**-24)
        out[i] = _value(sign | (tiny if e == 0 else (special if e == 31 else normal)))


def lanes() -> np.ndarray:
    """Zeroed histogram lanes for :func:`accumulate` (which leaves them zeroed)."""
    return np.zeros((BINS, 3 * LANES))


def warm() -> None:
    """Compile :func:`accumulate` (or load it from numba's cache) for float64 chunks, so that
    forked workers inherit it instead of each loading it again."""
    one = np.ones(1)
    half_to_float64(np.ones(1, np.uint16), one)
    ordinary(one, one, -1.0, -1.0, 1.0)
    accumulate(one, one, 1e-3, 2.0**-14, 1.0, 1.0, 1e-2, 1e-3, 1e-4, lanes(),
               np.zeros(1, np.int32), np.zeros(1), np.zeros(BINS, np.int64), np.zeros(BINS),
               np.zeros(BINS))

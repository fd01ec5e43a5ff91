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
  (``b xor ((b >> (w - 1)) & MAX)`` for ``w``-bit patterns orders integers as their
  floats; it vectorises where float comparisons that respect NaN do not; float32's keys
  stay 32-bit, eight to an AVX2 register). A NaN's key lies beyond both infinities', so
  the extrema alone tell whether the record holds NaN, inf or values near fp16's limit;
- the count sketch of :mod:`precision.dumps.sketch`, ``y_j = Σ_{i mod K = j} s(i) x_i``,
  into the caller's float64 ``y``, with the sign ``s(i) = σ(i mod P) σ(i div P)`` computed
  from the index as it goes (no table) and applied by flipping the element's sign bit.

Each row of ``K`` elements is read twice, for the sums and extrema and then for the sketch,
the second time from the L1 cache: two simple loops vectorise better than one (on an
AVX2-only AMD EPYC, a 4x128x512 float32 record took 127 us against 229 for the single loop
of 64-bit keys that a float multiply signed; docs/performance.md).

The loops are compiled with ``reassoc``/``contract`` only: sums may be reordered
(vectorised), but NaN and infinities keep their meaning (no ``nnan``/``ninf``). numba is the
optional ``fast`` extra (``pip install 'precision[fast]'``); this module is imported only
when the capture uses it (:func:`~precision.runtime.capture.tensorstats.fused_kernel`).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numba
import numpy as np

from ...dumps.sketch import BUCKETS, INDEX_MASK, MULTIPLIER, PERIOD

_jit = numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy",
                  fastmath={"reassoc", "contract"})

#: the fewest elements a piece of a record taken on its own thread holds (:func:`parts`):
#: below that, handing a piece to another thread costs more than it saves
PARALLEL_MIN = 1 << 20
#: the order key's mask of each bit-pattern width (int32 for float32, int64 for float64)
MASK32, MASK64 = (1 << 31) - 1, (1 << 63) - 1
MASKS = {4: MASK32, 8: MASK64}


def error_bound(n: int) -> float:
    """``δ(n)``: the relative rounding error bound of :func:`one_pass`'s sums (see above)."""
    return (BUCKETS + n / BUCKETS + 2) * 2.0**-53


@_jit
def _sigma(k: int) -> float:
    g = ((k & INDEX_MASK) * MULTIPLIER) & 0xFFFFFFFF
    return 1.0 - 2.0 * ((g >> 26) & 1)


@_jit
def _stats32(x: Any, bits: Any) -> Any:
    """Σx, Σx² and the extreme order keys of a float32 row, the keys in int32 (eight to a
    256-bit register: AVX2 has no 64-bit integer min or max)."""
    s = 0.0
    s2 = 0.0
    b = bits[0]
    lo = np.int32(b ^ np.int32(np.int32(b >> 31) & np.int32(MASK32)))
    hi = lo
    for k in range(x.size):
        v = np.float64(x[k])
        s += v
        s2 += v * v
        b = bits[k]
        key = np.int32(b ^ np.int32(np.int32(b >> 31) & np.int32(MASK32)))
        lo = min(lo, key)
        hi = max(hi, key)
    return s, s2, np.int64(lo), np.int64(hi)


@_jit
def _stats64(x: Any, bits: Any) -> Any:
    """:func:`_stats32` of a float64 row (int64 keys)."""
    s = 0.0
    s2 = 0.0
    lo = np.int64(bits[0]) ^ ((np.int64(bits[0]) >> 63) & MASK64)
    hi = lo
    for k in range(x.size):
        v = x[k]
        s += v
        s2 += v * v
        b = np.int64(bits[k])
        key = b ^ ((b >> 63) & MASK64)
        lo = min(lo, key)
        hi = max(hi, key)
    return s, s2, lo, hi


@_jit
def _sketch_row(bits: Any, y: Any, base: int, flip: float) -> None:
    """Adds ``flip x s(base + k) x x_k`` to ``y[k]`` for the row's elements (``base + k``
    within one period): ``g = (i x MULTIPLIER) mod 2^32`` advances by ``MULTIPLIER`` per
    element, and a sign of -1 (bit 26 of ``g``) flips the sign bit of ``x_k``'s pattern, an
    exact negation, as ``flip`` does."""
    g = np.uint32(np.uint32(base) * np.uint32(MULTIPLIER))
    step = np.uint32(MULTIPLIER)
    top = np.uint32(1 << 31)
    f = np.uint32(0) if flip > 0 else top
    if bits.itemsize == 4:
        for k in range(bits.size):
            sign = np.uint32(np.uint32(g << 5) & top) ^ f
            y[k] += np.float64(np.int32(np.uint32(bits[k]) ^ sign).view(np.float32))
            g = np.uint32(g + step)
    else:
        for k in range(bits.size):
            sign = np.uint64(np.uint32(np.uint32(g << 5) & top) ^ f) << np.uint64(32)
            y[k] += np.int64(np.uint64(bits[k]) ^ sign).view(np.float64)
            g = np.uint32(g + step)


@_jit
def _value(key: int, mask: int, itemsize: int) -> float:
    """The float whose order key (see :func:`one_pass`) is ``key``."""
    bits = key ^ ((key >> 63) & mask)
    if itemsize == 4:
        return np.float64(np.int32(bits).view(np.float32))
    return np.int64(bits).view(np.float64)


@_jit
def one_pass(x: Any, bits: Any, mask: int, offset: int, sketch: bool = True) -> Any:
    """``(Σx, Σx², min, max, sketch)`` of a flat array ``x`` (``x.size >= 1``) whose bit
    patterns are ``bits`` (the same memory as signed integers of its width, ``mask`` from
    :data:`MASKS`), its first element at index ``offset`` (a multiple of ``BUCKETS``) of
    the record it is part of; the sketch is ``BUCKETS`` float64 values (zeros unless
    ``sketch``: the kernel without it, which ``scripts/bench`` times to measure its share)."""
    n = x.size
    y = np.zeros(BUCKETS)
    s = 0.0
    s2 = 0.0
    lo = np.int64(bits[0]) ^ ((np.int64(bits[0]) >> 63) & mask)
    hi = lo
    start = 0
    while start < n:  # one period of signs (or what of it lies in x) at a time
        period = (offset + start) // PERIOD
        into = offset + start - period * PERIOD
        stop = min(n, start + PERIOD - into)
        flip = _sigma(period)
        for row in range(start, stop, BUCKETS):
            end = min(stop, row + BUCKETS)
            if x.itemsize == 4:
                rs, rs2, rlo, rhi = _stats32(x[row:end], bits[row:end])
            else:
                rs, rs2, rlo, rhi = _stats64(x[row:end], bits[row:end])
            if sketch:
                _sketch_row(bits[row:end], y, into + row - start, flip)
            s += rs
            s2 += rs2
            lo = min(lo, rlo)
            hi = max(hi, rhi)
        start = stop
    return s, s2, _value(lo, mask, x.itemsize), _value(hi, mask, x.itemsize), y


def summary(a: np.ndarray, offset: int = 0, sketch: bool = True
            ) -> tuple[float, float, float, float, np.ndarray]:
    """``(Σx, Σx², min, max, sketch)`` of a flat float32 or float64 array (not empty) whose
    first element is element ``offset`` (a multiple of ``BUCKETS``) of its record (the
    sketch all zeros unless ``sketch``)."""
    if a.itemsize == 4:
        return one_pass(a, a.view(np.int32), MASKS[4], offset, sketch)
    return one_pass(a, a.view(np.int64), MASKS[8], offset, sketch)


def parts(n: int, threads: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of up to ``threads`` pieces of ``n`` elements for :func:`summary` to
    take on their own: each at least :data:`PARALLEL_MIN` elements long and starting at a
    multiple of ``BUCKETS`` (so a piece's rows are the record's)."""
    count = max(1, min(threads, n // PARALLEL_MIN))
    step = -(-n // count // BUCKETS) * BUCKETS  # ceil(n / count), rounded up to whole rows
    return [(lo, min(n, lo + step)) for lo in range(0, n, step)]


def combine(pieces: list[tuple[float, float, float, float, np.ndarray]]
            ) -> tuple[float, float, float, float, np.ndarray]:
    """One record's :func:`summary` from its pieces' (sums and sketches added, extrema
    taken), or the first piece whose extrema are not finite as it is (NaN or inf: the caller
    counts them on the exact path, and NaN has no place among ordered extrema)."""
    bad = next((p for p in pieces if not (np.isfinite(p[2]) and np.isfinite(p[3]))), None)
    if bad is not None or len(pieces) == 1:
        return bad or pieces[0]
    y = pieces[0][4].copy()
    for p in pieces[1:]:
        y += p[4]
    return (sum(p[0] for p in pieces), sum(p[1] for p in pieces),
            min(p[2] for p in pieces), max(p[3] for p in pieces), y)


#: (pid, threads, pool): the threads that take a record's other pieces, made again in a
#: forked child (whose copy of the pool has no threads) or when more are asked for
_POOL: tuple[int, int, ThreadPoolExecutor] | None = None


def record_summary(a: np.ndarray, threads: int = 1
                   ) -> tuple[float, float, float, float, np.ndarray]:
    """:func:`summary` of a whole record, in up to ``threads`` pieces at once (:func:`parts`;
    the kernel releases the GIL): this thread takes the first, a pool the others."""
    if threads < 2 or a.size < 2 * PARALLEL_MIN:  # one piece (parts): no list to make
        return summary(a)
    pieces = parts(a.size, threads)
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid() or _POOL[1] < len(pieces) - 1:
        if _POOL is not None:
            _POOL[2].shutdown(wait=False)  # its threads end once idle (none in a child)
        _POOL = (os.getpid(), len(pieces) - 1,
                 ThreadPoolExecutor(len(pieces) - 1, thread_name_prefix="precision-stats"))
    others = [_POOL[2].submit(summary, a[lo:hi], lo) for lo, hi in pieces[1:]]
    first = summary(a[:pieces[0][1]])
    return combine([first] + [f.result() for f in others])


def warm() -> None:
    """Compile :func:`one_pass` for float32 and float64 (or load it from numba's cache)."""
    summary(np.ones(1, np.float32))
    summary(np.ones(1, np.float64))

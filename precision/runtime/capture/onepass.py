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

Each row of ``K`` elements is read twice, from the L1 cache the second time: once for the
extrema, on the 32-bit keys alone, and once for the sums and the sketch, which share the
element widened to float64 and whose sign there is a 64-bit operation as theirs are. Loops
whose lanes are all one width vectorise best: on a 2-vCPU AVX-512 Xeon a 4x128x512 float32
record took 95 to 97 us against 135 to 137 for a loop of the sums and keys followed by a loop
of the sketch (docs/performance.md), and on an AVX2-only AMD EPYC those two loops had taken
127 us against 229 for one loop of 64-bit keys and a float multiply's sign.

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
#: the float64 sign bit, and what the sketch's ``(i x MULTIPLIER) x 2^37 mod 2^64`` grows by
#: from one element to the next (:func:`_sums_sketch`)
TOP64, STEP64 = 1 << 63, (MULTIPLIER << 37) & ((1 << 64) - 1)


def error_bound(n: int) -> float:
    """``δ(n)``: the relative rounding error bound of :func:`one_pass`'s sums (see above)."""
    return (BUCKETS + n / BUCKETS + 2) * 2.0**-53


@_jit
def _sigma(k: int) -> float:
    g = ((k & INDEX_MASK) * MULTIPLIER) & 0xFFFFFFFF
    return 1.0 - 2.0 * ((g >> 26) & 1)


@_jit
def _extrema32(bits: Any) -> Any:
    """The smallest and largest order key of a row of float32 bit patterns, kept in int32
    (eight to a 256-bit register: AVX2 has no 64-bit integer min or max)."""
    b = bits[0]
    lo = np.int32(b ^ np.int32(np.int32(b >> 31) & np.int32(MASK32)))
    hi = lo
    for k in range(bits.size):
        b = bits[k]
        key = np.int32(b ^ np.int32(np.int32(b >> 31) & np.int32(MASK32)))
        lo = min(lo, key)
        hi = max(hi, key)
    return np.int64(lo), np.int64(hi)


@_jit
def _extrema64(bits: Any) -> Any:
    """:func:`_extrema32` of a row of float64 bit patterns (int64 keys)."""
    lo = np.int64(bits[0]) ^ ((np.int64(bits[0]) >> 63) & MASK64)
    hi = lo
    for k in range(bits.size):
        b = np.int64(bits[k])
        key = b ^ ((b >> 63) & MASK64)
        lo = min(lo, key)
        hi = max(hi, key)
    return lo, hi


@_jit
def _sums(x: Any) -> Any:
    """Σx and Σx² of a row, each element widened to float64 (the kernel without the sketch)."""
    s = 0.0
    s2 = 0.0
    for k in range(x.size):
        v = np.float64(x[k])
        s += v
        s2 += v * v
    return s, s2


@_jit
def _sums_sketch(x: Any, y: Any, base: int, flip: float) -> Any:
    """Σx and Σx² of a row, each element widened to float64, and ``flip x s(base + k) x x_k``
    added to ``y[k]`` (``base + k`` within one period), the widened value shared by both.

    The sign ``s(i)`` is bit 26 of ``g = (i x MULTIPLIER) mod 2^32``. Kept as
    ``h = (g x 2^37) mod 2^64``, which depends only on ``g mod 2^27``, that bit is bit 63 of
    ``h``, the float64 sign bit, and ``h`` advances by ``(MULTIPLIER x 2^37) mod 2^64`` per
    element in plain 64-bit arithmetic, as the float64 lanes do: flipping the sign bit of
    the widened ``x_k`` where it is set is an exact negation, as ``flip`` is. A negative
    ``flip`` starts ``h`` with bit 63 flipped: a sum's top bit flips with an operand's (the
    carry out of it is dropped), so every later ``h`` carries the flip too, and the sign
    is one ``x xor (h and 2^63)`` (one ternary logic instruction per vector)."""
    s = 0.0
    s2 = 0.0
    h = np.uint64(np.uint64(np.uint32(np.uint32(base) * np.uint32(MULTIPLIER))) << np.uint64(37))
    step = np.uint64(STEP64)
    top = np.uint64(TOP64)
    if flip < 0:
        h = np.uint64(h ^ top)
    for k in range(x.size):
        v = np.float64(x[k])
        s += v
        s2 += v * v
        y[k] += np.uint64(v.view(np.uint64) ^ (h & top)).view(np.float64)
        h = np.uint64(h + step)
    return s, s2


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
                rlo, rhi = _extrema32(bits[row:end])
            else:
                rlo, rhi = _extrema64(bits[row:end])
            if sketch:
                rs, rs2 = _sums_sketch(x[row:end], y, into + row - start, flip)
            else:
                rs, rs2 = _sums(x[row:end])
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
        if a.itemsize == 4:  # summary(a), a call fewer
            return one_pass(a, a.view(np.int32), MASK32, 0, True)
        return one_pass(a, a.view(np.int64), MASK64, 0, True)
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

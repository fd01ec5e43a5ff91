"""A count sketch of a tensor: 31 numbers from which two runs' error norm can be estimated.

Stats-mode records keep no elements, and norms cannot show drift that keeps them (noise in
the ordinary channels under a few massive ones). A count sketch can: element ``i`` goes to
bucket ``h(i)`` with sign ``s(i)``, ``y_j = Σ_{h(i)=j} s(i) x_i``, and for two runs ``a``
and ``b`` of the same record ``E ||y(b) - y(a)||² = ||b - a||²`` (Charikar, Chen and
Farach-Colton): the error norm, estimated to about ``sqrt(2 / 31)`` (25%) relative, from
statistics alone. The estimate is unbiased for any bucketing as long as the signs are
independent, so the bucket is simply ``i mod 31`` (a multiply and a strided sum on the
device). 31, a prime, and not 32: a channel of a ``(tokens, hidden)`` tensor whose width is a
multiple of 32 would fall in one bucket at every token, and a massive channel's error in one
bucket makes the estimate as noisy as one number. The sign comes from a multiplicative hash
of the index (``g = (i x 2654435761) mod 2^32``, sign = bit 26 of ``g``), the same on every
device and in numpy. Indices run over the elements a record's statistics cover (real tokens
only), in order.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

BUCKETS = 31
MULTIPLIER = 2654435761
#: indices wrap at 2^31 so that ``i x MULTIPLIER`` stays within int64 on every backend
INDEX_MASK = (1 << 31) - 1


def buckets_and_signs(first: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Bucket (0..31) and sign (+-1) of elements ``first .. first + n - 1``."""
    index = np.arange(first, first + n, dtype=np.int64)
    g = ((index & INDEX_MASK) * MULTIPLIER) & 0xFFFFFFFF
    return index % BUCKETS, 1.0 - 2.0 * ((g >> 26) & 1)


def count_sketch(chunks: Iterable[np.ndarray]) -> list[float]:
    """The sketch of consecutive chunks of one flattened tensor, accumulated in float64."""
    y = np.zeros(BUCKETS)
    first = 0
    for c in chunks:
        x = np.asarray(c, dtype=np.float64).reshape(-1)
        bucket, sign = buckets_and_signs(first, x.size)
        y += np.bincount(bucket, weights=sign * x, minlength=BUCKETS)
        first += x.size
    return y.tolist()


def sketch_distance(a: list[float], b: list[float]) -> float | None:
    """``||y(b) - y(a)||``: an estimate of ``||b - a||`` (None without two sketches)."""
    if len(a) != BUCKETS or len(b) != BUCKETS:
        return None
    return float(np.linalg.norm(np.subtract(b, a)))

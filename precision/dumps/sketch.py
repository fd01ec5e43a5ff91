"""A count sketch of a tensor: 1021 numbers from which two runs' error norm can be estimated.

Stats-mode records keep no elements, and norms cannot show drift that keeps them (noise in
the ordinary channels under a few massive ones). A count sketch can: element ``i`` goes to
bucket ``h(i)`` with sign ``s(i)``, ``y_j = Σ_{h(i)=j} s(i) x_i``, and for two runs ``a``
and ``b`` of the same record ``E ||y(b) - y(a)||² = ||b - a||²`` (Charikar, Chen and
Farach-Colton): the error norm from statistics alone. With ``K`` buckets one estimate of
``||b - a||²`` is off by about ``sqrt(2 / K)`` relative, so the norm by ``1 / sqrt(2K)``:
with ``K = 1021``, 2.2% (31 buckets, the first format: 13%, and the ratio of two such
estimates 18%, which a healthy deep model's worst record turned into a false step).

The bucket is ``i mod K`` (a multiply and a strided sum on the device, whose cost does not
grow with ``K``). ``K`` is a prime: a channel of a ``(tokens, hidden)`` tensor whose width
is a multiple of a power of two would otherwise fall in one bucket at every token, and a
massive channel's error in one bucket makes the estimate as noisy as one number. The sign
comes from a multiplicative hash, ``σ(k) = 1 - 2 x bit 26 of (k x 2654435761 mod 2^32)``,
and repeats with the period ``P = K x 4096`` elements, each period flipped as a whole:
``s(i) = σ(i mod P) σ(i div P)``. A device keeps one table of ``P`` signs at most, whatever
the records' sizes, and the signs of two elements in one bucket stay independent across
periods. Every index stays below 2^31 before the multiply, within int64 on every backend.
Indices run over the elements a record's statistics cover (real tokens only), in order.

A dump stores its records' sketches as rows of one float32 tensor beside the records'
(:data:`precision.dumps.dump.SKETCHES_KEY`, a record's ``stats.sketch_row`` naming its row):
float32 keeps ``2^-24`` of a bucket, far below the half-precision error a sketch estimates
(references are bf16 or fp16), and the header's JSON stays small (a record's line was 5.4
kB of text with its sketch in it; JSON and base64 cost a capture of 444 records 2% of its
forward). In memory a record's ``sketch`` is an array. Dumps written from 2026-12-01 to
2026-12-07 kept each sketch in the header as the base64 text of its values in little-endian
float32 (:func:`encode`), and those before as 31 numbers in a JSON list (bucket ``i mod
31``, sign ``σ(i)``): :func:`decode` reads all three, and two sketches of different sizes
estimate nothing (:func:`sketch_distance` is None).
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from typing import Any

import numpy as np

BUCKETS = 1021
#: the signs repeat with this period (a multiple of BUCKETS), each period flipped by σ
PERIOD = BUCKETS << 12
MULTIPLIER = 2654435761
#: indices wrap at 2^31 so that ``k x MULTIPLIER`` stays within int64 on every backend
INDEX_MASK = (1 << 31) - 1


def hash_sign(k: np.ndarray) -> np.ndarray:
    """``σ(k)``: +1 or -1 (float64) from bit 26 of ``(k x 2654435761) mod 2^32``."""
    g = ((np.asarray(k, dtype=np.int64) & INDEX_MASK) * MULTIPLIER) & 0xFFFFFFFF
    return 1.0 - 2.0 * ((g >> 26) & 1)


def signs(first: int, n: int) -> np.ndarray:
    """``s(i) = σ(i mod P) σ(i div P)`` of elements ``first .. first + n - 1`` (float64)."""
    index = np.arange(first, first + n, dtype=np.int64)
    return hash_sign(index % PERIOD) * hash_sign(index // PERIOD)


def count_sketch(chunks: Iterable[np.ndarray]) -> np.ndarray:
    """The sketch of consecutive chunks of one flattened tensor, accumulated in float64."""
    y = np.zeros(BUCKETS)
    first = 0
    for c in chunks:
        x = np.asarray(c, dtype=np.float64).reshape(-1)
        bucket = np.arange(first, first + x.size, dtype=np.int64) % BUCKETS
        y += np.bincount(bucket, weights=signs(first, x.size) * x, minlength=BUCKETS)
        first += x.size
    return y


def encode(y: Any) -> str:
    """A sketch as text: base64 of its values in little-endian float32 (how dumps of
    2026-12-01 to 2026-12-07 kept it, and how a sketch of another size stays in a header)."""
    return base64.b64encode(np.asarray(y, dtype="<f4").tobytes()).decode("ascii")


def decode(value: Any) -> np.ndarray | None:
    """A sketch as float64 values: an array (as captured, or a row of a dump's sketch
    tensor), the base64 text of :func:`encode`, or a list of numbers (the first format);
    None for anything else."""
    if isinstance(value, str):
        try:
            raw = base64.b64decode(value.encode("ascii"), validate=True)
        except ValueError:
            return None
        if len(raw) % 4:
            return None
        return np.frombuffer(raw, dtype="<f4").astype(np.float64)
    if isinstance(value, (list, tuple, np.ndarray)) and len(value):
        return np.asarray(value, dtype=np.float64).reshape(-1)
    return None


def valid(value: Any) -> bool:
    """Whether a header's ``sketch`` field is one (finite values, of either format)."""
    if isinstance(value, list) and not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return False
    y = decode(value)
    return y is not None and bool(np.isfinite(y).all())


def size_of(value: Any) -> int | None:
    """How many buckets a stored sketch has (None without one)."""
    y = decode(value)
    return None if y is None else int(y.size)


def sketch_distance(a: Any, b: Any) -> float | None:
    """``||y(b) - y(a)||``: an estimate of ``||b - a||`` (None without two sketches of the
    same size)."""
    ya, yb = decode(a), decode(b)
    if ya is None or yb is None or ya.size != yb.size:
        return None
    return float(np.linalg.norm(yb - ya))

"""Which relative distances a moved position bucket belongs to, and who inherits it.

Bucketed relative position biases (T5 and its kin) map each (query, key) pair to a bucket
id that depends only on the distance ``key - query``: ``bucket[i, j] = f(j - i)``. Far
distances are bucketed by ``log(d / max_exact) / log(max_distance / max_exact)`` truncated to
an integer; where that lands exactly on an integer (T5's bidirectional 32 buckets: d = 16,
32, 64) a ``log`` one ulp low on another backend moves the distance into the neighbouring
bucket. Every entry at that distance then takes the neighbour's bias, in every layer that
shares it: sparse, large errors that a norm hides.

:func:`diagnose` recognises such a tensor by its structure, not by its name: an integer
tensor whose last two axes are (query, key) and whose baseline values depend on ``j - i``
alone. When the target's ids differ it names the distances that moved, whether each sits on
a bucket boundary of the baseline, the flagged rows that follow in the same stack, and the
fix.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ...dumps.dump import Dump
from ...dumps.keys import parse_key
from ..measure.row import Row

FIX = ("compute the bucket ids on the host in float64 (or reuse the baseline's ids) "
       "instead of on the device")


@dataclass(frozen=True)
class BucketShift:
    """Distances whose bucket moved in one bucket-id tensor."""

    key: str
    distances: tuple[int, ...]
    on_boundary: tuple[bool, ...]
    inherited_by: tuple[str, ...]

    def describe(self) -> str:
        shown = ", ".join(f"{d:+d}" for d in self.distances[:8])
        more = f" and {len(self.distances) - 8} more" if len(self.distances) > 8 else ""
        where = ("each the first distance of its bucket in the baseline (a bucket boundary)"
                 if all(self.on_boundary) else
                 f"{sum(self.on_boundary)} of them on a bucket boundary")
        inherit = (f"; inherited by {len(self.inherited_by)} flagged row(s) after it, first "
                   f"{self.inherited_by[0]}" if self.inherited_by else "")
        return (f"position buckets moved at relative distances {shown}{more} ({where})"
                f"{inherit}: {FIX}")


#: what a position-bias module's name holds (T5's ``relative_attention_bias``): its bucket
#: ids may be one query row (a decoding step), which says nothing of a Toeplitz structure
BIAS_NAMES = ("relative_attention_bias", "position_bias", "rel_pos")


def distance_table(ids: np.ndarray, *, one_row: bool = False) -> dict[int, int] | None:
    """``{j - i: bucket}`` when every (query, key) plane of ``ids`` depends on ``j - i``
    alone (and the planes agree); None otherwise. A plane of one query row is anything's
    (token ids of a batch of one): it counts only with ``one_row`` (a position-bias
    module's record)."""
    if ids.ndim < 2 or ids.shape[-1] < 2 or ids.shape[-2] < (1 if one_row else 2):
        return None
    planes = ids.reshape(-1, ids.shape[-2], ids.shape[-1])
    q, k = np.indices(planes.shape[1:])
    dist = (k - q).ravel()
    table: dict[int, int] = {}
    for d, value in zip(dist.tolist(), planes[0].ravel().tolist(), strict=True):
        if table.setdefault(d, value) != value:
            return None
    if any(not np.array_equal(p, planes[0]) for p in planes[1:]):
        return None
    return table


def shift_of(key: str, base: np.ndarray, target: np.ndarray) -> BucketShift | None:
    """The distances at which ``target``'s bucket ids differ from a Toeplitz ``base``."""
    bias = any(n in key for n in BIAS_NAMES)
    if parse_key(key).is_input or (not bias and np.unique(base).size < 2):
        return None  # the model's inputs, or a constant (an attention mask of ones): not ids
    table = distance_table(base, one_row=bias)
    if table is None or base.shape != target.shape:
        return None
    planes = target.reshape(-1, base.shape[-2], base.shape[-1])
    q, k = np.indices(planes.shape[1:])
    dist = np.broadcast_to(k - q, planes.shape)
    base_planes = base.reshape(planes.shape)
    moved = sorted(set(dist[planes != base_planes].tolist()), key=lambda d: (abs(d), d))
    if not moved:
        return None
    step = {d: (1 if d > 0 else -1) for d in moved}
    boundary = tuple(table.get(d - step[d], table[d]) != table[d] for d in moved)
    return BucketShift(key, tuple(moved), boundary, ())


def diagnose(b: Dump, t: Dump, rows: list[Row]) -> tuple[list[Row], list[str]]:
    """Rows with the bucket-id reasons explained, and one warning per moved-bucket tensor."""
    out, notes = list(rows), []
    for i, row in enumerate(rows):
        if row.exact is None or row.exact.mismatched == 0 or row.key not in b.tensors \
                or row.key not in t.tensors:
            continue
        shift = shift_of(row.key, b[row.key], t[row.key])
        if shift is None:
            continue
        stack = parse_key(row.key).stack
        later = tuple(r.key for r in rows[i + 1:] if r.flagged and parse_key(r.key).stack
                      == stack)
        shift = replace(shift, inherited_by=later)
        out[i] = replace(row, reason=f"{row.reason}; {shift.describe().split(';')[0]}")
        notes.append(f"{row.key}: {shift.describe()}")
    return out, notes


"""Comparisons from per-tensor statistics, when one or both dumps were taken in stats mode.

Statistics cannot give elementwise errors, but they bound them: by the reverse triangle
inequality ``| ||b|| - ||a|| | <= ||b - a||``, so a norm gap beyond the tolerance proves
drift. Agreement of statistics cannot prove its absence; such rows say so in their reason.
:func:`stats_delta` gives what two records say about the pair as a :class:`StatsDelta`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from ...dtypes import FP16_FLUSH, FP16_MAX, NEAR_FP16_MAX, float_format, is_float
from ...dumps.dump import Dump
from ...dumps.sketch import BUCKETS, encode, signs, sketch_distance
from ..lineup.tokens import padding_of, real_elements
from .moments import Moments


def array_stats(chunks: Iterable[np.ndarray], *, lowest: float = -math.inf
                ) -> dict[str, Any]:
    """The statistics that stats-mode capture records, computed in float64 from chunks;
    values at or below ``lowest`` (the stored dtype's lowest finite value) count as
    ``masked`` and stay out of the moments, as in :mod:`precision.runtime.capture.tensorstats`."""
    n = nan = posinf = neginf = masked = beyond = near = flush = 0
    mom, sq = Moments(), 0.0
    lo, hi = math.inf, -math.inf
    sketch: np.ndarray | None = np.zeros(BUCKETS)
    for c in chunks:
        x = np.asarray(c, dtype=np.float64).reshape(-1)
        keep = np.isfinite(x) & (x > lowest)
        if sketch is not None and keep.all():
            bucket = np.arange(n, n + x.size, dtype=np.int64) % BUCKETS
            sketch += np.bincount(bucket, weights=signs(n, x.size) * x, minlength=BUCKETS)
        else:
            sketch = None
        n += x.size
        if not keep.all():
            nan += int(np.isnan(x).sum())
            posinf += int((x == math.inf).sum())
            neginf += int((x == -math.inf).sum())
            masked += int(np.count_nonzero(x <= lowest))
            x = x[keep]
        if x.size == 0:
            continue
        cm = float(x.mean())
        dev = x - cm
        mom = mom.merge(Moments(x.size, cm, m2a=float(np.einsum("i,i->", dev, dev))))
        sq += float(np.einsum("i,i->", x, x))
        lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
        mag = np.abs(x)
        beyond += int(np.count_nonzero(mag > FP16_MAX))
        near += int(np.count_nonzero(mag >= NEAR_FP16_MAX))
        flush += int(np.count_nonzero((mag <= FP16_FLUSH) & (mag > 0)))  # ties go to 0
    out: dict[str, Any] = {"numel": n, "nan": nan, "posinf": posinf, "neginf": neginf,
                           "masked": masked, "beyond_fp16": beyond, "near_fp16_max": near,
                           "flush_fp16": flush}
    if sketch is not None:
        out["sketch"] = encode(sketch)
    if mom.n == 0:
        return out | dict.fromkeys(("min", "max", "mean", "std", "norm", "absmax"))
    return out | {"min": lo, "max": hi, "mean": mom.mean_a, "std": math.sqrt(mom.m2a / mom.n),
                  "norm": math.sqrt(sq), "absmax": max(abs(lo), abs(hi))}


def record_stats(d: Dump, key: str, *, chunk: int = 1 << 18,
                 cache: dict[str, dict[str, Any] | None] | None = None
                 ) -> dict[str, Any] | None:
    """Statistics of a record however it was stored: its stats-mode record, the tensor that
    holds it (itself or what it aliases; ``cache`` avoids reading one tensor twice), or the
    stats record it aliases. ``None`` when the dump holds no data for it."""
    e = d.entry(key)
    if e is not None and e.stats is not None:
        return e.stats
    stored = d.resolve(key)
    if stored is not None:
        if cache is not None and stored in cache:
            return cache[stored]
        info = d.tensors[stored]
        lowest = float_format(info.dtype).lowest if is_float(info.dtype) else -math.inf
        # over real tokens only, as a stats-mode capture computes them
        pad = padding_of(d, stored, tuple(info.shape))
        if pad is None:
            stats = array_stats(d.chunks(stored, chunk), lowest=lowest)
        else:
            rows = max(1, chunk // pad.width) * pad.width
            stats = array_stats(real_elements(d.chunks(stored, rows), pad), lowest=lowest)
            stats["padded"] = pad.padded_elements
        if cache is not None:
            cache[stored] = stats
        return stats
    source = d.entry(e.alias_of) if e is not None and e.alias_of else None
    return source.stats if source is not None else None


def _within(st: dict[str, Any]) -> int:
    return int(st.get("near_fp16_max", 0)) - int(st.get("beyond_fp16", 0))


def _overflowed(st: dict[str, Any]) -> int:
    """+inf and masked values (-inf or at the lowest value): a mask when the other run has
    as many, an overflow where it has fewer. Old records without ``masked`` count -inf."""
    return int(st.get("posinf", 0)) + int(st.get("masked", st.get("neginf", 0)))


def checksum_kind(value: str) -> str:
    """Which checksum another tool wrote: msprobe's ``summary_mode`` xor writes ``0x`` and 16
    hex digits, its md5 mode a CRC-32 of 8; two kinds of one tensor never agree."""
    return "xor" if value.lower().startswith("0x") else f"{len(value)}-digit"


@dataclass(frozen=True)
class StatsDelta:
    """What the statistics records of a baseline ``a`` and a target ``b`` say about the pair
    (the row of a stats-only comparison). With ``||x||`` a record's recorded norm and counts
    taken per record; a statistic a record does not hold (another tool's file that did not
    write it, or no finite value) is None, never 0:

    - ``norm_gap = | ||b|| - ||a|| |``, a lower bound of ``||b - a||`` (reverse triangle
      inequality); ``norm_gap_rel = norm_gap / ||a||`` (0/0 = 0, x/0 = inf); None unless
      both norms are known
    - ``absmax_*``, ``mean_*``, ``max_*``, ``min_*``: each record's
    - ``checksum_*``: a checksum another tool wrote of the tensor's bytes (msprobe's md5 or
      xor summary), None where it wrote none
    - ``new_nan = max(0, nan_b - nan_a)``, ``base_only_nan`` the other way round;
      ``new_inf = max(0, over_b - over_a)`` with ``over = +inf + masked`` (-inf or at the
      lowest value; records without ``masked`` count -inf), ``base_only_inf`` the other way
    - ``masked = min(masked_a, masked_b)``: a mask, as many in both runs, not a difference
    - ``new_near_fp16_max = max(0, within_b - within_a)``, ``within = near_fp16_max -
      beyond_fp16``: values pinned near fp16's max but within it
    - ``numel``, ``padded``: the baseline's real-token elements and those left out as padding
    - ``sketch_gap``: the count-sketch estimate of ``||b - a||`` (:mod:`precision.dumps.sketch`;
      None without two sketches of one size)

    Values are kept as the records hold them (a norm stored as an integer stays one), so
    :meth:`as_dict` is the row's ``stats`` in the report's JSON (docs/json-schema.md).
    """

    norm_base: float | None
    norm_target: float | None
    norm_gap: float | None
    norm_gap_rel: float | None
    absmax_base: float | None
    absmax_target: float | None
    mean_base: float | None
    mean_target: float | None
    new_nan: int
    new_inf: int
    base_only_nan: int
    base_only_inf: int
    masked: int
    new_near_fp16_max: int
    numel: int
    padded: int
    sketch_gap: float | None
    max_base: float | None = None
    max_target: float | None = None
    min_base: float | None = None
    min_target: float | None = None
    checksum_base: str | None = None
    checksum_target: str | None = None

    @property
    def same_checksum_kind(self) -> bool:
        """Whether both records hold a checksum of one kind (:func:`checksum_kind`): only
        then do equal checksums say bit-identical and different ones say changed."""
        return (self.checksum_base is not None and self.checksum_target is not None
                and checksum_kind(self.checksum_base) == checksum_kind(self.checksum_target))

    @property
    def has_statistics(self) -> bool:
        """Whether both records hold one statistic in common (a norm, max, min or mean)."""
        return any(x is not None and y is not None for x, y in (
            (self.norm_base, self.norm_target), (self.max_base, self.max_target),
            (self.min_base, self.min_target), (self.mean_base, self.mean_target)))

    @property
    def recorded_elements(self) -> int:
        """The record's elements, padding included: ``numel + padded``."""
        return self.numel + self.padded

    def as_dict(self) -> dict[str, Any]:
        """Every field by name, in declaration order: the row's ``stats`` in the JSON."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def stats_delta(sa: dict[str, Any], sb: dict[str, Any]) -> StatsDelta:
    """What two statistics records say about the pair: norm gap, new NaN/inf on either
    side, saturation. Masked values (as many in both runs) are a mask, not a difference."""
    na, nb = sa.get("norm"), sb.get("norm")
    gap = abs(nb - na) if na is not None and nb is not None else None
    return StatsDelta(
        norm_base=na, norm_target=nb, norm_gap=gap,
        norm_gap_rel=(None if gap is None or na is None else (gap / na) if na
                      else (0.0 if gap == 0 else math.inf)),
        absmax_base=sa.get("absmax"), absmax_target=sb.get("absmax"),
        mean_base=sa.get("mean"), mean_target=sb.get("mean"),
        new_nan=max(0, int(sb.get("nan", 0)) - int(sa.get("nan", 0))),
        new_inf=max(0, _overflowed(sb) - _overflowed(sa)),
        base_only_nan=max(0, int(sa.get("nan", 0)) - int(sb.get("nan", 0))),
        base_only_inf=max(0, _overflowed(sa) - _overflowed(sb)),
        masked=min(int(sa.get("masked", 0)), int(sb.get("masked", 0))),
        # pinned near the max but within it: values beyond 65504 count as "near" too
        new_near_fp16_max=max(0, _within(sb) - _within(sa)),
        numel=int(sa.get("numel", 0)),
        padded=int(sa.get("padded", 0)),
        # an estimate of ||b - a|| from the count sketches (None where one has none)
        sketch_gap=sketch_distance(sa.get("sketch"), sb.get("sketch")),
        max_base=sa.get("max"), max_target=sb.get("max"),
        min_base=sa.get("min"), min_target=sb.get("min"),
        checksum_base=sa.get("checksum"), checksum_target=sb.get("checksum"),
    )

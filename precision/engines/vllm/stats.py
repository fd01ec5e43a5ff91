"""Statistics of an engine's stats-mode records as Hugging Face's (for :mod:`.crossimpl`).

A stats-mode engine capture holds, per record and engine step (and tensor-parallel rank),
statistics over the step's packed tokens. The moments and counts a stats record holds
(``numel``, NaN/inf/masked counts, min, max, mean, std, norm, absmax) do not depend on the
order of the elements, and merge exactly over disjoint sets of them (:func:`merge_stats`):
the steps of a request's prefill and decode tokens together are the real tokens of a
teacher-forced Hugging Face forward over the same tokens, and the ranks' column shares of a
column-parallel record are its columns. So the engine's statistics line up with those of a
teacher-forced replay (``meta.engine_replay.layout`` ``forward``), not with a step-by-step
one: an engine step may mix one request's prefill with another's decode token. The count
sketch (which depends on each element's index) is left out, and a fused projection's
statistics cannot be cut into its parts (q/k/v, gate/up): such records are listed, not
compared.
"""

from __future__ import annotations

import math
from typing import Any

from ...dumps.dump import Dump
from .mapping import Rule
from .unpack import RanksDiffer

#: counts that add up over parts
COUNTS = ("numel", "nan", "posinf", "neginf", "masked", "beyond_fp16", "near_fp16_max")


class NoStats(Exception):
    """A record whose statistics cannot stand for the Hugging Face record (with why)."""


def is_stats(d: Dump, key: str) -> bool:
    """A stats-mode record (statistics, no tensor)."""
    e = d.entry(key)
    return e is not None and e.stats is not None and d.resolve(key) is None


def merge_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The statistics of the union of disjoint element sets, from each one's."""
    out: dict[str, Any] = {k: sum(int(p.get(k) or 0) for p in parts) for k in COUNTS}
    if "masked" not in parts[0]:  # old records: -inf counted as masked
        out["masked"] = out["neginf"]
    have = [p for p in parts if p.get("mean") is not None]
    if not have:
        return out | dict.fromkeys(("min", "max", "mean", "std", "norm", "absmax"))
    kept = [int(p["numel"]) - int(p.get("nan") or 0) - int(p.get("posinf") or 0)
            - int(p.get("masked", p.get("neginf")) or 0) for p in have]
    total = sum(kept)
    mean = sum(k * float(p["mean"]) for k, p in zip(kept, have, strict=True)) / total
    m2 = sum(k * (float(p["std"]) ** 2 + (float(p["mean"]) - mean) ** 2)
             for k, p in zip(kept, have, strict=True))
    lo, hi = min(float(p["min"]) for p in have), max(float(p["max"]) for p in have)
    return out | {"min": lo, "max": hi, "mean": mean, "std": math.sqrt(m2 / total),
                  "norm": math.sqrt(sum(float(p["norm"]) ** 2 for p in have)),
                  "absmax": max(abs(lo), abs(hi))}


def scaled(st: dict[str, Any], factor: float) -> dict[str, Any]:
    """Statistics of the values times ``factor`` (> 0): the moments scale, counts stay."""
    out = dict(st)
    for k in ("min", "max", "mean", "std", "norm", "absmax"):
        if out.get(k) is not None:
            out[k] = float(out[k]) * factor
    return out


def record(views: list[Dump], physical: list[str], rule: Rule, config: dict[str, Any],
           key: str) -> tuple[dict[str, Any], tuple[int, ...], str]:
    """One engine record's statistics over every step and rank, the shape of one packed
    token's values once the ranks are put together, and its dtype. Raises :class:`NoStats`
    or :class:`RanksDiffer` (listed by the caller, not compared)."""
    if rule.split:
        raise NoStats("a fused projection's statistics cannot be cut into its parts: "
                      "capture the engine in full mode to compare them")
    steps: list[dict[str, Any]] = []
    width: tuple[int, ...] = ()
    dtype = ""
    for c, phys in enumerate(physical):
        ranks = [(v.entry(phys), v) for v in views if v.entry(phys) is not None]
        stats = [e.stats for e, _ in ranks if e is not None and e.stats is not None]
        if len(stats) != len(ranks) or not stats:
            raise NoStats(f"{phys} holds no statistics")
        shapes = [tuple(e.shape[1:]) for e, _ in ranks if e is not None]
        dtype = next(e.dtype for e, _ in ranks if e is not None)
        if len(stats) > 1 and not rule.tp:
            for r, st in enumerate(stats[1:], start=1):
                if {k: v for k, v in st.items() if k != "sketch"} != \
                        {k: v for k, v in stats[0].items() if k != "sketch"}:
                    raise RanksDiffer(f"rank {r} differs from rank 0 in step {c}, where "
                                      "every rank should hold it whole")
            stats, shapes = stats[:1], shapes[:1]
        width = _joined(shapes, rule.tp)
        steps.append(merge_stats(stats))
    merged = merge_stats(steps)
    factor = rule.factor(config)
    return (scaled(merged, factor) if factor is not None else merged), width, dtype


def _joined(shapes: list[tuple[int, ...]], tp: str) -> tuple[int, ...]:
    """The per-token shape of the ranks' shares put together."""
    first = shapes[0]
    if len(shapes) == 1 or not first:
        return first
    if tp == "heads":
        return (sum(s[0] for s in shapes), *first[1:])
    return (*first[:-1], sum(s[-1] for s in shapes))

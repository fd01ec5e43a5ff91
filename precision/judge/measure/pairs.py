"""Measure aligned pairs: pure, in the worker processes; no verdict is decided here.

Each pair is streamed in chunks into an accumulator (:class:`~precision.judge.measure.metrics.
PairAccumulator` for floats, exact comparison for integers, statistics for stats-mode
records, logits metrics for the logits) and becomes a :class:`~precision.judge.measure.row.Row`
whose status is ``OK`` with an informative reason, or ``MISSING``/``MISMATCH`` when the two
records cannot be compared at all. The rules (:mod:`precision.judge.verdict.rules`) then judge the
rows in the parent.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ...dtypes import is_float
from ...dumps.dump import Dump
from ...dumps.keys import GEN_PREFIX, parse_key
from ..lineup.align import Pair, same_positions
from ..lineup.tokens import keep_rows, padding_of, real_chunks, real_tokens
from ..profiles import Profile
from .generation import compare_generation, summarise
from .logits import compare_logit_rows
from .metrics import PairAccumulator, compare_exact
from .row import Row, Status
from .statsdiff import StatsDelta, checksum_kind, record_stats, stats_delta

#: an integer record's mean and norm agree to this relative difference, or to
#: ``4 sqrt(n) 2^-24`` for ``n`` elements where that is more: another tool sums them in
#: float32, in its own order (a million ids: about 7e-6 apart, where this allows 2.4e-4)
INTEGER_STATS_RTOL = 1e-6


@dataclass(frozen=True)
class Job:
    """What every worker needs: the runs' headers (no data) and the settings."""

    runs: dict[str, Dump]
    prof: Profile
    topk: int
    chunk: int
    kernel: str = "numpy"


@dataclass(frozen=True)
class Task:
    """One pair of one comparison (named runs)."""

    base: str
    target: str
    pair: Pair

    @property
    def cost(self) -> float:
        return self.pair.cost


def run_task(job: Job, task: Task) -> Row:
    return measure_pair(job.runs[task.base], job.runs[task.target], task.pair, job.prof,
                        job.topk, job.chunk, kernel=job.kernel)


def task_cost(task: Task) -> float:
    return task.cost


def measure_pair(b: Dump, t: Dump, p: Pair, prof: Profile, topk: int, chunk: int, *,
                 kernel: str = "numpy") -> Row:
    """The row of one aligned pair, measured (status ``OK`` unless it cannot be compared);
    ``kernel`` measures float chunks (:class:`~precision.judge.measure.metrics.PairAccumulator`)."""
    be, te = p.base, p.target
    if be is None or te is None:
        side = "target" if be is None else "baseline"
        e = be or te
        assert e is not None
        return Row(p.order, p.key, "MISSING", f"only in the {side}", e.shape,
                   be.dtype if be else "-", te.dtype if te else "-")
    row = Row(p.order, p.key, "OK", "", be.shape, be.dtype, te.dtype)
    if be.shape != te.shape and not (p.is_logits and same_positions(be.shape, te.shape)):
        return replace(row, status="MISMATCH", reason=f"shape {list(be.shape)} vs {list(te.shape)}")
    if is_float(be.dtype) != is_float(te.dtype):
        return replace(row, status="MISMATCH", reason=f"dtype {be.dtype} vs {te.dtype}")
    full_b = p.base_key in b.tensors
    full_t = p.target_key in t.tensors
    if not is_float(be.dtype):
        if full_b and full_t:
            ex = compare_exact(_chunk_pairs(b, t, p, chunk))
            return replace(row, exact=ex, reason="identical" if ex.mismatched == 0 else "")
        return _integer_stats_row(b, t, p, row, chunk)
    if full_b and full_t:
        return _float_row(b, t, p, row, prof, topk, chunk, kernel)
    return _stats_row(b, t, p, row, chunk)


def _chunk_pairs(b: Dump, t: Dump, p: Pair, chunk: int
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    assert p.base_key is not None and p.target_key is not None
    return zip(b.chunks(p.base_key, chunk), t.chunks(p.target_key, chunk), strict=True)


def _float_row(b: Dump, t: Dump, p: Pair, row: Row, prof: Profile, topk: int,
               chunk: int, kernel: str) -> Row:
    """Float metrics over real tokens: padded positions (:func:`padding_of`) are left out
    of every measure and counted in ``padded``."""
    acc = PairAccumulator(row.base_dtype, row.target_dtype, kernel=kernel)
    lg = None
    padded = 0
    if p.is_logits and len(row.shape) >= 1 and row.shape[-1] > 0:
        # one pass over the (largest) tensor: row-aligned chunks feed both measurements
        vocab = row.shape[-1]
        valid = real_tokens(b, row.shape)
        padded = 0 if valid is None else int(np.count_nonzero(~valid)) * vocab

        def fed(pairs: Any) -> Any:
            start = 0
            for x, y in pairs:  # all rows go on to the logits metrics, which skip pads
                rows = x.size // vocab
                if valid is None:
                    acc.update(x, y)
                else:
                    keep = valid[start:start + rows]
                    acc.update(keep_rows(x, keep, vocab), keep_rows(y, keep, vocab))
                start += rows
                yield x, y

        lg = compare_logit_rows(fed(_chunk_pairs(b, t, p, max(1, chunk // vocab) * vocab)),
                                vocab, k=topk, valid=valid, tie_noise=prof.noise_rms)
    else:
        pad = padding_of(b, p.key, row.shape)
        if pad is None:
            pairs = _chunk_pairs(b, t, p, chunk)
        else:
            padded = pad.padded_elements
            pairs = real_chunks(_chunk_pairs(b, t, p, max(1, chunk // pad.width) * pad.width),
                                pad)
        for x, y in pairs:
            acc.update(x, y)
    m = replace(acc.result(), padded=padded)
    reason = (f"baseline holds {m.nan_base} NaN and {m.inf_base} inf (excluded)"
              if m.nan_base + m.inf_base else "")
    return replace(row, reason=reason, metrics=m, logits=lg)


def _stats_row(b: Dump, t: Dump, p: Pair, row: Row, chunk: int) -> Row:
    assert p.base is not None and p.target is not None
    sa = record_stats(b, p.base.key, chunk=chunk)
    sb = record_stats(t, p.target.key, chunk=chunk)
    if sa is None or sb is None:
        return replace(row, status="MISSING", reason="no data stored for this record")
    delta = stats_delta(sa, sb)
    return replace(row, stats_delta=delta, reason=_stats_reason(delta))


def _integer_stats_row(b: Dump, t: Dump, p: Pair, row: Row, chunk: int) -> Row:
    """An integer record with statistics only (on one side at least): its extrema compared
    exactly, mean and norm to float32's rounding, a checksum of one kind exactly. The
    model's inputs that differ are a MISMATCH (the runs saw different inputs), another integer
    record DRIFT, as for full tensors; a module's integer inputs (an msprobe dump's token ids)
    say so; agreeing statistics prove no equality."""
    assert p.base is not None and p.target is not None
    sa = record_stats(b, p.base.key, chunk=chunk) or {}
    sb = record_stats(t, p.target.key, chunk=chunk) or {}
    moved = _integers_moved(sa, sb)
    if moved is None:
        return replace(row, reason="integer tensor in a stats-only dump: not compared")
    if not moved:
        return replace(row, reason="integer tensor in a stats-only dump: statistics agree")
    key = parse_key(p.key)
    if key.is_input:  # as the exact rule judges a full dump's (verdict.rules.exact_mismatch)
        return replace(row, status="MISMATCH", reason=(
            f"inputs differ ({moved}, by their statistics): capture the target with "
            "--replay BASE"))
    if key.kind == "in":
        return replace(row, status="DRIFT", reason=(
            f"integer inputs differ ({moved}, by their statistics): were the runs fed the "
            "same inputs? (else the model computed other indices)"))
    return replace(row, status="DRIFT", reason=f"integers differ ({moved}, by their statistics)")


def _integers_moved(sa: dict[str, Any], sb: dict[str, Any]) -> str | None:
    """The first statistic of two integer records that differs (``max 250 vs 300``), ``""``
    where every one both hold agrees, None where they hold none in common."""
    compared = False
    for name in ("min", "max", "mean", "norm"):
        x, y = sa.get(name), sb.get(name)
        if x is None or y is None:
            continue
        compared = True
        if name in ("min", "max"):
            if x != y:
                return f"{name} {x:.8g} vs {y:.8g}"
            continue
        numel = max(int(sa.get("numel") or 1), 1)
        tolerance = max(INTEGER_STATS_RTOL, 4 * math.sqrt(numel) * 2.0**-24)
        if abs(x - y) > tolerance * max(abs(x), abs(y)):
            return f"{name} {x:.8g} vs {y:.8g}"
    ca, cb = sa.get("checksum"), sb.get("checksum")
    if isinstance(ca, str) and isinstance(cb, str) and checksum_kind(ca) == checksum_kind(cb):
        if ca != cb:
            return "checksums differ"
        compared = True
    return "" if compared else None


def _stats_reason(d: StatsDelta) -> str:
    """What an unflagged stats-only row rests on: the statistics both records hold."""
    if d.norm_base is not None and d.norm_target is not None:
        return "stats only: norms agree (cannot rule out elementwise drift)"
    common = [name for name, x, y in (("max", d.max_base, d.max_target),
                                      ("min", d.min_base, d.min_target),
                                      ("mean", d.mean_base, d.mean_target))
              if x is not None and y is not None]
    if common:
        return f"stats only: {', '.join(common)} agree (no norm recorded)"
    if d.checksum_base is not None and d.checksum_base == d.checksum_target:
        return "bit-identical (checksums agree)"
    return "stats only: no statistic in common, nothing compared"


def generation_row(b: Dump, t: Dump, order: int, topk: int, prefix: str,
                   prof: Profile) -> Row:
    """The row of one generation (``prefix`` picks a rank's of a directory dump): MISMATCH
    when the runs hold different numbers of sequences (sequences pair by position: a file
    kept in part, or other prompts). Runs of different lengths are compared over the steps
    both made, and the reason says so when every sequence agrees there (another
    ``max_tokens``, or a file cut short)."""
    g = compare_generation(b, t, k=topk, prefix=prefix, tie_noise=prof.noise_rms)
    _, reason = summarise(g)
    key = prefix + GEN_PREFIX + "tokens"
    info, other = b.tensors[key], t.tensors[key]
    status: Status = "OK"
    (nb, sb), (nt, st) = info.shape[:2], other.shape[:2]
    if nb != nt:
        status, reason = "MISMATCH", (f"{nb} sequence(s) in the baseline, {nt} in the target: "
                                      "generations of other prompts, or a file kept in part")
    elif sb != st and g.identical == g.sequences:
        reason += (f" over the {min(sb, st)} step(s) both made (the "
                   f"{'baseline' if st < sb else 'target'} goes on to {max(sb, st)})")
    return Row(order, key, status, reason, info.shape, info.dtype, other.dtype, generation=g)

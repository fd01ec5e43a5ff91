"""Logits metrics over the last (vocabulary) axis, in float64 (numpy only).

For each position (row) r with baseline logits a_r and target logits b_r:

- top-1 agreement: ``argmax a_r == argmax b_r``; the rows where it fails are *flips*
- top-k overlap: ``|topk(a_r) ∩ topk(b_r)| / k``
- ``KL(p_r || q_r) = Σ_v p_v (log p_v - log q_v)`` with ``p = softmax(a_r)``,
  ``q = softmax(b_r)`` computed by log-sum-exp in float64; terms with ``p_v = 0`` are 0
- ``margin``: the baseline's gap between its top-1 and top-2 logit at each flip. A flip is a
  *near-tie* when the margin is within what the profile expects the two logits to move,
  ``margin <= 2 noise (|a_top| + median_v |a_rv|)``, with ``noise`` the profile's
  element-scaled rms limit (:mod:`precision.judge.measure.noise`): each of the two tokens
  may move by that much. The allowance follows the dtype pair, never the observed error, so
  a broken run cannot excuse its own flips. ``hard_flips`` counts the others; verdicts use
  ``hard_top1_agreement = 1 - hard/rows``.

Only real tokens count: ``valid`` (from the recorded attention mask) marks the rows that are
not padding; padded rows are skipped everywhere and their per-position values are NaN, so
left padding cannot dilute KL or top-1 by the pad share.

Speed (docs/performance.md): the work arrays are reused across chunks, KL takes three
passes instead of a dozen (:func:`_kl`), and top-k sorts only the elements above a sampled
bound (:func:`_topk`), with the same sets as a partition of the whole row.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..profiles import profile_for

ROWS_PER_CHUNK = 256
_THREAD = threading.local()
#: the expected element-scaled noise when no profile is given: fp16's limit
DEFAULT_TIE_NOISE = profile_for("float32", "float16").noise_rms


@dataclass(frozen=True)
class LogitsMetrics:
    """Agreement between two logits tensors.

    ``flips`` lists (row, base id, target id, margin, near_tie) for the first flips.
    """

    positions: int
    k: int
    top1_agreement: float
    topk_overlap: float
    kl_mean: float
    kl_max: float
    hard_flips: int = 0
    flips: list[tuple[int, int, int, float, bool]] = field(default_factory=list)
    kl_per_position: list[float] = field(default_factory=list)
    overlap_per_position: list[float] = field(default_factory=list)
    padded: int = 0

    @property
    def hard_top1_agreement(self) -> float:
        """Top-1 agreement counting near-tie flips as agreement."""
        return 1.0 - self.hard_flips / self.positions if self.positions else 1.0

    def as_dict(self) -> dict[str, Any]:
        return {"positions": self.positions, "k": self.k, "top1_agreement": self.top1_agreement,
                "hard_top1_agreement": self.hard_top1_agreement, "hard_flips": self.hard_flips,
                "topk_overlap": self.topk_overlap, "kl_mean": self.kl_mean,
                "kl_max": self.kl_max,
                "flips": [{"position": r, "base": i, "target": j, "margin": m, "near_tie": t}
                          for r, i, j, m, t in self.flips],
                "kl_per_position": self.kl_per_position,
                "overlap_per_position": self.overlap_per_position, "padded": self.padded}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    shifted = x - m
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):  # a row with +inf: NaN
        return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def _kl_exact(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``KL(softmax x || softmax y)`` per row, term by term (``p_v = 0`` terms are 0)."""
    lp, lq = _log_softmax(x), _log_softmax(y)
    p = np.exp(lp)
    with np.errstate(invalid="ignore"):
        return np.where(p > 0, p * (lp - lq), 0.0).sum(axis=-1)


def _work(shape: tuple[int, ...]) -> list[np.ndarray]:
    """Five float64 work arrays of ``shape``, reused by this thread: fresh chunk-sized
    temporaries page-fault on every chunk (and cost more than the arithmetic)."""
    size = math.prod(shape)
    work: list[np.ndarray] | None = getattr(_THREAD, "work", None)
    if work is None or work[0].size < size:
        work = _THREAD.work = [np.empty(size) for _ in range(5)]
    return [w[:size].reshape(shape) for w in work]


def _float64(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``x`` as float64: itself, or converted into ``out``."""
    if x.dtype == np.float64:
        return x
    with np.errstate(invalid="ignore"):  # a signalling NaN raises the flag and stays NaN
        np.copyto(out, x)
    return out


def _kl(x: np.ndarray, y: np.ndarray, top_x: np.ndarray, top_y: np.ndarray,
        work: list[np.ndarray]) -> np.ndarray:
    """``KL(p || q)`` per row, ``p = softmax x``, ``q = softmax y``, in three passes.

    With ``lp_v = x_v - m_x - log s_x`` (``m`` the row max, ``s = Σ exp(x - m)``):
    ``Σ p_v (lp_v - lq_v) = Σ p_v (x_v - y_v) + (m_y - m_x + log(s_y / s_x)) Σ p_v``. Rows
    with infinities or NaN (vocabulary masked with -inf, where ``0 x inf`` would be NaN)
    are computed term by term (:func:`_kl_exact`)."""
    rows = np.arange(x.shape[0])
    m_x, m_y = x[rows, top_x], y[rows, top_y]
    e_x, e_y, diff = work[:3]
    np.subtract(x, m_x[:, None], out=e_x)
    np.subtract(y, m_y[:, None], out=e_y)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        s_x = np.exp(e_x, out=e_x).sum(axis=-1)
        s_y = np.exp(e_y, out=e_y).sum(axis=-1)
        p = np.divide(e_x, s_x[:, None], out=e_x)
        np.subtract(x, y, out=diff)
        kl = (np.einsum("ij,ij->i", p, diff)
              + (m_y - m_x + np.log(s_y / s_x)) * p.sum(axis=-1))
    bad = ~np.isfinite(kl)
    if bad.any():
        kl[bad] = _kl_exact(x[bad], y[bad])
    return kl


def _topk(x: np.ndarray, k: int) -> np.ndarray:
    """The indices of each row's ``k`` largest values, sorted.

    A long row's k-th largest value is at least its every-16th sample's k-th largest, so
    only the few elements at or above that bound are sorted; a row whose k-th and next
    largest values are equal (fp16 logits tie often) is partitioned whole, its ties taken
    in index order (:func:`_topk_whole`)."""
    rows, vocab = x.shape
    if vocab < 64 * k:
        return _topk_whole(x, k)
    sample = x[:, ::16]
    bound = np.partition(sample, sample.shape[1] - k, axis=-1)[:, -k]
    out = np.empty((rows, k), dtype=np.intp)
    for r in range(rows):
        cand = np.flatnonzero(x[r] >= bound[r])  # all of the top k when k or more
        values = x[r, cand]
        order = np.argsort(-values)
        if cand.size < k or (cand.size > k and values[order[k - 1]] == values[order[k]]):
            out[r] = _topk_whole(x[r:r + 1], k)[0]  # NaN in the sample, or a tie
        else:
            out[r] = np.sort(cand[order[:k]])
    return out


def _topk_whole(x: np.ndarray, k: int) -> np.ndarray:
    """Each row's ``k`` largest values' indices, sorted; values tied at the k-th place are
    taken in index order. (argpartition's order among equal values follows numpy's SIMD
    dispatch, so it differs between CPUs; a row with NaN among its k largest keeps it.)"""
    neg = -x
    kth = np.partition(neg, k - 1, axis=-1)[:, k - 1:k]
    above, tied = neg < kth, neg == kth
    need = k - above.sum(axis=-1, keepdims=True)
    take = above | (tied & (np.cumsum(tied, axis=-1) <= need))
    exact = take.sum(axis=-1) == k  # not so where NaN stands among the k largest
    out = np.empty((x.shape[0], k), dtype=np.intp)
    out[exact] = np.nonzero(take[exact])[1].reshape(-1, k)
    if not exact.all():
        out[~exact] = np.sort(np.argpartition(neg[~exact], k - 1, axis=-1)[:, :k], axis=-1)
    return out


def compare_logits(a: np.ndarray, b: np.ndarray, *, k: int = 5, max_flips: int = 50,
                   valid: np.ndarray | None = None,
                   tie_noise: float = DEFAULT_TIE_NOISE) -> LogitsMetrics:
    """Compare logits ``a`` (baseline) and ``b`` (target) of equal shape ``(..., vocab)``;
    ``valid`` (shape ``a.shape[:-1]``) marks real tokens."""
    vocab = a.shape[-1] if a.ndim else 1
    a2, b2 = a.reshape(-1, vocab), b.reshape(-1, vocab)
    chunks = ((a2[i:i + ROWS_PER_CHUNK], b2[i:i + ROWS_PER_CHUNK])
              for i in range(0, a2.shape[0], ROWS_PER_CHUNK))
    return compare_logit_rows(chunks, vocab, k=k, max_flips=max_flips, valid=valid,
                              tie_noise=tie_noise)


def compare_logit_rows(chunks: Iterable[tuple[np.ndarray, np.ndarray]], vocab: int, *,
                       k: int = 5, max_flips: int = 50, valid: np.ndarray | None = None,
                       tie_noise: float = DEFAULT_TIE_NOISE) -> LogitsMetrics:
    """Compare logits given as chunks of flattened rows (each a multiple of ``vocab`` long);
    ``valid`` (one bool per row, in order) marks real tokens, ``tie_noise`` is the
    profile's expected element-scaled noise."""
    k = max(1, min(k, vocab))
    keep_all = None if valid is None else np.asarray(valid, dtype=bool).reshape(-1)
    seen = padded = 0
    rows = agree = overlap = hard = 0
    kl_sum, kl_max = 0.0, 0.0
    flips: list[tuple[int, int, int, float, bool]] = []
    kls: list[float] = []
    overlaps: list[float] = []
    for a_chunk, b_chunk in chunks:
        x = np.asarray(a_chunk).reshape(-1, vocab)
        work = _work(x.shape)
        x = _float64(x, work[0])
        y = _float64(np.asarray(b_chunk).reshape(-1, vocab), work[1])
        n_chunk = x.shape[0]
        first = seen
        seen += n_chunk
        keep = np.ones(n_chunk, bool)
        if keep_all is not None:
            part = keep_all[first:seen]
            keep[:part.size] = part  # a mask shorter than the rows: the rest count
            padded += int(n_chunk - keep.sum())
            x, y = x[keep], y[keep]
        position = np.flatnonzero(keep) + first
        if x.shape[0] == 0:
            kls += [math.nan] * n_chunk
            overlaps += [math.nan] * n_chunk
            continue
        top_a, top_b = np.argmax(x, axis=-1), np.argmax(y, axis=-1)
        same = top_a == top_b
        agree += int(same.sum())
        ka, kb = _topk(x, k), _topk(y, k)
        shared = [len(np.intersect1d(p, q, assume_unique=True))
                  for p, q in zip(ka, kb, strict=True)]
        overlap += sum(shared)
        per_overlap = np.full(n_chunk, math.nan)
        per_overlap[keep] = np.asarray(shared) / k
        overlaps += per_overlap.tolist()
        kl = _kl(x, y, top_a, top_b, _work(x.shape)[2:])  # x, y: in the first two or fresh
        per_kl = np.full(n_chunk, math.nan)
        per_kl[keep] = kl
        kls += per_kl.tolist()
        kl_sum += float(kl.sum())
        kl_max = float(np.max((kl_max, np.max(kl))))  # NaN stays NaN, as in kl_mean
        for r in np.flatnonzero(~same):
            top2 = np.sort(x[r])[-2:] if vocab > 1 else np.array([x[r, 0]] * 2)
            margin = float(top2[1] - top2[0])
            row = x[r][np.isfinite(x[r])]  # vocabulary masked (-inf) is no logit
            bulk = float(np.median(np.abs(row))) if row.size else 0.0
            near_tie = margin <= 2 * tie_noise * (abs(float(top2[1])) + bulk)
            hard += not near_tie
            if len(flips) < max_flips:
                flips.append((int(position[r]), int(top_a[r]), int(top_b[r]), margin, near_tie))
        rows += x.shape[0]
    if rows == 0:
        return LogitsMetrics(0, k, 1.0, 1.0, 0.0, 0.0, padded=padded)
    return LogitsMetrics(rows, k, agree / rows, overlap / (rows * k), kl_sum / rows, kl_max,
                         hard, flips, kls, overlaps, padded)

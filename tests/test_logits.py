"""precision.judge.measure.logits against scipy softmax/rel_entr references in float64."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from scipy.special import log_softmax, rel_entr, softmax

from precision.judge.measure.logits import (
    DEFAULT_TIE_NOISE,
    _topk,
    _topk_whole,
    compare_logit_rows,
    compare_logits,
)

BF16 = ml_dtypes.bfloat16


def reference(a: np.ndarray, b: np.ndarray, k: int, max_flips: int = 50,
              tie_noise: float = DEFAULT_TIE_NOISE) -> dict:
    """Row-wise top-1/top-k/KL with numpy argsort and scipy, all in float64."""
    vocab = a.shape[-1]
    x = np.asarray(a, np.float64).reshape(-1, vocab)
    y = np.asarray(b, np.float64).reshape(-1, vocab)
    k = max(1, min(k, vocab))
    kl = rel_entr(softmax(x, axis=-1), softmax(y, axis=-1)).sum(axis=-1)
    ta, tb = x.argmax(-1), y.argmax(-1)
    # ties at the k-th place in index order, as compare_logits takes them on every CPU
    top_x = np.argsort(-x, axis=-1, kind="stable")[:, :k]
    top_y = np.argsort(-y, axis=-1, kind="stable")[:, :k]
    overlap = [len(set(p) & set(q)) for p, q in zip(top_x, top_y, strict=True)]
    flips = []
    for r in np.flatnonzero(ta != tb):
        s = np.sort(x[r])[::-1]
        margin = float(s[0] - s[1])
        # each of the two tokens may move by the profile's noise at its own scale plus the
        # row's bulk (median |logit|): the allowance never grows with the observed error
        finite = x[r][np.isfinite(x[r])]
        near_tie = margin <= 2 * tie_noise * (abs(s[0]) + float(np.median(np.abs(finite))))
        flips.append((int(r), int(ta[r]), int(tb[r]), margin, near_tie))
    n = len(x)
    return {"positions": n, "k": k, "top1_agreement": float(np.mean(ta == tb)),
            "topk_overlap": sum(overlap) / (n * k), "kl_mean": float(kl.mean()),
            "kl_max": float(kl.max()), "flips": flips[:max_flips],
            "hard_flips": sum(not f[4] for f in flips)}


def check(m, ref: dict) -> None:
    assert (m.positions, m.k) == (ref["positions"], ref["k"])
    assert m.top1_agreement == pytest.approx(ref["top1_agreement"], rel=1e-12)
    assert m.topk_overlap == pytest.approx(ref["topk_overlap"], rel=1e-12)
    assert m.kl_mean == pytest.approx(ref["kl_mean"], rel=1e-7, abs=1e-15)
    assert m.kl_max == pytest.approx(ref["kl_max"], rel=1e-7, abs=1e-15)
    assert [f[:3] for f in m.flips] == [f[:3] for f in ref["flips"]]
    assert [f[3] for f in m.flips] == pytest.approx([f[3] for f in ref["flips"]], rel=1e-12)
    assert [f[4] for f in m.flips] == [f[4] for f in ref["flips"]]
    assert m.hard_flips == ref["hard_flips"]


def untied(x: np.ndarray, k: int) -> np.ndarray:
    """Rows whose top k+1 values are distinct, so top-1/top-k sets are unambiguous."""
    top = -np.sort(-np.asarray(x, np.float64), axis=-1)[:, : k + 1]
    return (np.diff(top, axis=-1) != 0).all(axis=-1)


def make_logits(seed: int, rows: int, vocab: int, dtype, noise: float, k: int = 5):
    rng = np.random.default_rng(seed)
    a = (3 * rng.standard_normal((rows, vocab))).astype(np.float32)
    b = (a + noise * rng.standard_normal((rows, vocab))).astype(dtype)
    ok = untied(a, k) & untied(b, k)
    return a[ok], b[ok]


@pytest.mark.parametrize("dtype", [np.float16, BF16, np.float32])
@pytest.mark.parametrize(("rows", "vocab"), [(1, 2), (40, 50), (300, 17), (30, 2000)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_against_reference(seed, rows, vocab, dtype):
    a, b = make_logits(seed, rows, vocab, dtype, noise=0.3)
    m = compare_logits(a, b, k=5)
    check(m, reference(a, b, 5))
    assert m.kl_mean > 0 and m.kl_max >= m.kl_mean


def test_random_has_flips_and_partial_overlap():
    a, b = make_logits(3, 200, 30, np.float16, noise=1.0)
    m = compare_logits(a, b, k=5, max_flips=1000)
    check(m, reference(a, b, 5, max_flips=1000))
    assert len(m.flips) > 50
    check(compare_logits(a, b, k=5), reference(a, b, 5))  # default: first 50 flips
    assert 0 < m.top1_agreement < 1 and 0 < m.topk_overlap < 1 and m.flips


def test_higher_rank_input_flattens_rows():
    a, b = make_logits(4, 80, 11, BF16, noise=0.5)
    a, b = a[:60], b[:60]
    m = compare_logits(a.reshape(3, 4, 5, 11), b.reshape(3, 4, 5, 11), k=3)
    check(m, reference(a, b, 3))


@pytest.mark.parametrize("rows_per_chunk", [1, 3, 7, 64])
def test_rows_chunked_same_as_whole(rows_per_chunk):
    a, b = make_logits(5, 150, 23, np.float16, noise=0.8)
    n, vocab = len(a), a.shape[1]
    whole = compare_logits(a, b, k=4)
    chunks = [(a[i:i + rows_per_chunk].ravel(), b[i:i + rows_per_chunk].ravel())
              for i in range(0, n, rows_per_chunk)]
    m = compare_logit_rows(chunks, vocab, k=4)
    check(m, reference(a, b, 4))
    assert m.flips == whole.flips and m.top1_agreement == whole.top1_agreement
    assert m.kl_mean == pytest.approx(whole.kl_mean, rel=1e-12)
    assert m.kl_max == whole.kl_max


def test_hand_computed_flip_and_kl():
    a = np.array([[1.0, 1.25, 0.0], [5.0, 0.0, 0.0]])
    b = np.array([[1.5, 1.25, 0.0], [5.0, 0.0, 0.0]])
    # margin 0.25 against 2 x noise x (|1.25| + median 1.0): a near-tie when the pair's
    # expected noise is 6%, a hard flip at fp16's 0.5%
    assert compare_logits(a, b, k=1, tie_noise=0.06).flips == [(0, 1, 0, 0.25, True)]
    m = compare_logits(a, b, k=1)
    assert m.flips == [(0, 1, 0, 0.25, False)]
    assert (m.hard_flips, m.hard_top1_agreement) == (1, 0.5)
    assert (m.top1_agreement, m.topk_overlap) == (0.5, 0.5)
    p, q = softmax(a[0]), softmax(b[0])
    kl0 = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    assert m.kl_max == pytest.approx(kl0, rel=1e-12)
    assert m.kl_mean == pytest.approx(kl0 / 2, rel=1e-12)
    d = m.as_dict()
    assert d["flips"] == [{"position": 0, "base": 1, "target": 0, "margin": 0.25,
                           "near_tie": False}]
    assert d["positions"] == 2 and d["k"] == 1


def test_identical_logits():
    a, _ = make_logits(6, 20, 9, np.float32, noise=0.0)
    m = compare_logits(a, a.copy(), k=5)
    assert (m.top1_agreement, m.topk_overlap, m.kl_max, m.flips) == (1.0, 1.0, 0.0, [])
    assert abs(m.kl_mean) < 1e-15


def test_neg_inf_entries():
    rng = np.random.default_rng(7)
    a = rng.standard_normal((6, 8))
    a[:, 5:] = -np.inf  # vocabulary masked on both sides: no contribution, finite KL
    b = a + 0.1 * rng.standard_normal((6, 8))
    m = compare_logits(a, b, k=3)
    check(m, reference(a, b, 3))
    assert math.isfinite(m.kl_max)
    b2 = b.copy()
    b2[2, 0] = -np.inf  # target gives zero probability to a token the baseline uses
    m2 = compare_logits(a, b2, k=3)
    assert m2.kl_max == math.inf == reference(a, b2, 3)["kl_max"]
    a3 = a.copy()
    a3[1, :4] = -np.inf  # baseline one-hot: KL = -log q(token 4)
    m3 = compare_logits(a3, b, k=3)
    assert m3.kl_max == pytest.approx(max(reference(a3, b, 3)["kl_max"],
                                          -log_softmax(b[1])[4]), rel=1e-12)
    check(m3, reference(a3, b, 3))


@pytest.mark.parametrize("k", [5, 8, 100])
def test_k_at_or_beyond_vocab(k):
    a, b = make_logits(8, 30, 8, np.float16, noise=1.0, k=7)
    m = compare_logits(a, b, k=k)
    assert m.k == 8 if k >= 8 else m.k == k
    check(m, reference(a, b, k))
    if k >= 8:
        assert m.topk_overlap == 1.0


def test_max_flips_caps_list_but_not_counts():
    a = np.tile([2.0, 1.0, 0.0], (100, 1))
    b = np.tile([1.0, 2.0, 0.0], (100, 1))
    m = compare_logits(a, b, k=1, max_flips=10)
    assert m.top1_agreement == 0.0 and len(m.flips) == 10
    assert [f[0] for f in m.flips] == list(range(10))
    chunks = [(a[i:i + 3].ravel(), b[i:i + 3].ravel()) for i in range(0, 100, 3)]
    assert compare_logit_rows(chunks, 3, k=1, max_flips=10).flips == m.flips
    assert compare_logits(a, b, max_flips=0).flips == []


def test_empty_and_degenerate_shapes():
    m = compare_logits(np.zeros((0, 10)), np.zeros((0, 10)))
    assert (m.positions, m.top1_agreement, m.topk_overlap, m.kl_mean, m.kl_max) == (
        0, 1.0, 1.0, 0.0, 0.0)
    assert compare_logit_rows([], 10).positions == 0
    single = compare_logits(np.array([1.0, 3.0, 2.0]), np.array([3.5, 3.0, 2.0]), k=2)
    assert single.positions == 1 and single.flips == [(0, 1, 0, 1.0, False)]  # 1 > 0.05
    assert single.topk_overlap == 0.5  # {1, 2} vs {0, 1}
    one = compare_logits(np.zeros((4, 1)), np.ones((4, 1)))  # vocab 1: p = q = 1
    assert (one.k, one.top1_agreement, one.kl_max) == (1, 1.0, 0.0)


def test_near_tie_versus_hard_flip():
    """A flip within the pair's expected noise is a near-tie; a flip of a wide margin is a
    hard flip however large the error elsewhere in the row (the allowance does not grow
    with the observed error, so a broken run cannot excuse its own flips)."""
    rng = np.random.default_rng(7)
    a = rng.standard_normal((2, 1000))
    a[0, :2] = [5.0, 4.99]  # margin 0.01
    a[1, :2] = [5.0, 2.0]  # margin 3
    b = a.copy()
    b[0] += 0.01 * rng.standard_normal(1000)  # rms 0.01 noise everywhere
    b[0, :2] = [4.985, 4.995]
    b[1, :2] = [2.0, 5.0]  # only the top two move: rms 0.134, margin 3
    m = compare_logits(a, b, k=1)
    assert [f[4] for f in m.flips] == [True, False]
    assert (m.hard_flips, m.hard_top1_agreement, m.top1_agreement) == (1, 0.5, 0.0)
    b[1] += 5.0 * rng.standard_normal(1000)  # the whole row wrong: still a hard flip
    b[1, :2] = [2.0, 50.0]
    assert [f[4] for f in compare_logits(a, b, k=1).flips] == [True, False]


def test_padded_positions_change_nothing():
    """Differences only at padded positions (the recorded attention mask) leave top-1,
    top-k and KL as they are; without the mask they dilute and distort them."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal((2, 6, 30))
    b = a + 0.05 * rng.standard_normal(a.shape)
    mask = np.ones((2, 6), bool)
    mask[1, :3] = False  # left padding on the second sequence
    noisy = b.copy()
    noisy[1, :3] = rng.standard_normal((3, 30)) * 10
    clean = compare_logits(a, b, k=3, valid=mask)
    padded = compare_logits(a, noisy, k=3, valid=mask)
    assert (padded.positions, padded.padded) == (9, 3)
    for name in ("top1_agreement", "topk_overlap", "kl_mean", "kl_max", "hard_flips"):
        assert getattr(padded, name) == getattr(clean, name), name
    assert np.isnan(padded.kl_per_position[6:9]).all()
    assert compare_logits(a, noisy, k=3).kl_mean > 10 * clean.kl_mean  # the trap avoided


def test_per_position_series_match_the_reference():
    rng = np.random.default_rng(11)
    a = rng.standard_normal((3, 5, 40))
    b = a + 0.3 * rng.standard_normal((3, 5, 40))
    m = compare_logits(a, b, k=4)
    x, y = a.reshape(-1, 40), b.reshape(-1, 40)
    kl = rel_entr(softmax(x, axis=-1), softmax(y, axis=-1)).sum(axis=-1)
    assert m.kl_per_position == pytest.approx(kl.tolist(), rel=1e-7, abs=1e-15)
    top = [set(np.argsort(-r)[:4]) for r in x], [set(np.argsort(-r)[:4]) for r in y]
    assert m.overlap_per_position == [len(p & q) / 4 for p, q in zip(*top, strict=True)]


@pytest.mark.parametrize("k", [1, 5, 20])
def test_topk_of_long_rows_is_the_whole_row_partition(k):
    """Long rows sort only the elements above a sampled bound; ties at the k-th place (fp16
    logits), NaN and -inf fall back to partitioning the whole row, so the sets are the same
    as ever."""
    rng = np.random.default_rng(k)
    x = (3 * rng.standard_normal((12, 4000))).astype(np.float16).astype(np.float64)
    x[1, :] = -np.inf
    x[1, 7] = 0.0
    x[2, ::16] = np.nan  # every sampled element
    x[3, 5] = np.nan
    x[4, :] = 1.0  # all tied
    top = np.sort(x[5])[-k]
    x[5, [10, 3000]] = top  # a tie at the k-th place
    x[6, ::2] = -np.inf
    got = _topk(x, k)
    assert got.shape == (12, k)
    assert np.array_equal(got, _topk_whole(x, k))
    finite = np.where(np.isnan(x), -np.inf, x)
    assert list(got[4]) == list(range(k))  # ties in index order, the same on every CPU
    for r in (0, 3, 7, 8):  # untied rows: exactly the k largest
        assert set(got[r]) == set(np.argsort(-finite[r], kind="stable")[:k])


def test_kl_of_long_rows_with_masked_vocabulary():
    """Rows with -inf (masked vocabulary) go term by term: 0 where p = 0, inf where the
    target masks what the baseline does not."""
    rng = np.random.default_rng(5)
    a = rng.standard_normal((3, 3000))
    b = a + 0.01 * rng.standard_normal(a.shape)
    a[0, :100] = b[0, :100] = -np.inf
    b[1, 7] = -np.inf
    a[2, 9] = -np.inf
    m = compare_logits(a, b, k=5)
    want = rel_entr(softmax(a, axis=-1), softmax(b, axis=-1)).sum(axis=-1)
    assert m.kl_per_position[1] == math.inf
    for r in (0, 2):
        assert m.kl_per_position[r] == pytest.approx(want[r], rel=1e-7)


def test_nan_logits_make_kl_max_nan_as_kl_mean() -> None:
    """A NaN target (an fp16 overflow that reached the head) gave kl_mean NaN but kl_max
    0.0: Python's max(0.0, nan) is 0.0."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal((4, 16))
    b = a + 0.01 * rng.standard_normal((4, 16))
    assert math.isfinite(compare_logits(a, b, k=3).kl_max)
    b[2:] = np.nan
    m = compare_logits(a, b, k=3)
    assert math.isnan(m.kl_mean) and math.isnan(m.kl_max)

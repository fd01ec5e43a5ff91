"""precision.judge.measure.metrics against independent float64 references written from the
docstring."""

from __future__ import annotations

import functools
import importlib.util
import math
import sys
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.spatial.distance import cosine
from scipy.stats import pearsonr

from precision.judge.measure import metrics
from precision.judge.measure.metrics import PairAccumulator, compare_exact, compare_float

HAS_NUMBA = importlib.util.find_spec("numba") is not None
#: every test here runs on both kernels: numpy and the fused one (numba, an optional extra)
KERNELS = ["numpy", pytest.param("numba", marks=pytest.mark.skipif(
    not HAS_NUMBA, reason="numba (the fast extra) is not installed"))]


@pytest.fixture(autouse=True, params=KERNELS)
def kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Bind this module's compare_float and PairAccumulator to one kernel."""
    here = sys.modules[__name__]
    monkeypatch.setattr(here, "compare_float",
                        functools.partial(metrics.compare_float, kernel=request.param))
    monkeypatch.setattr(here, "PairAccumulator",
                        functools.partial(metrics.PairAccumulator, kernel=request.param))
    return str(request.param)

BF16 = ml_dtypes.bfloat16
F32_MIN = float(np.finfo(np.float32).min)
TMAX = {"float16": 65504.0, "bfloat16": float(ml_dtypes.finfo(BF16).max),
        "float32": float(np.finfo(np.float32).max)}
NPDT = {"float16": np.float16, "bfloat16": BF16, "float32": np.float32}
MANT = {"float16": (10, -14), "bfloat16": (7, -126), "float32": (23, -126)}
COUNTS = ("numel", "compared", "masked", "nan_base", "nan_target", "inf_base", "inf_target",
          "new_nan", "new_inf", "base_only_nan", "base_only_inf", "saturated", "saturated_base",
          "beyond_target_range")
EXACT = ("max_abs", "max_rel", "max_ulp", "absmax_base", "absmax_target", "ratio_1e2",
         "ratio_1e3", "ratio_1e4", "target_max")
SUMS = ("mean_abs", "rmse", "rel_l2", "snr_db", "rms_base", "headroom_bits", "noise_rms",
        "noise_max", "bulk_scale")


def ulp_ref(x: np.ndarray, target: str) -> np.ndarray:
    """ulp_T(x) = 2^(max(floor(log2|x|), e_min) - m), with 2^e_min for x = 0."""
    m, emin = MANT[target]
    with np.errstate(divide="ignore"):
        e = np.floor(np.log2(np.abs(x)))
    return 2.0 ** (np.maximum(e, emin) - m)


def one_minus_cos_exact(x: np.ndarray, y: np.ndarray) -> float:
    """1 - cos from exact rational dot products: (1 - cos²) / (1 + cos) for cos > 0."""
    xs, ys = [Fraction(float(v)) for v in x], [Fraction(float(v)) for v in y]
    dot = sum(p * q for p, q in zip(xs, ys, strict=True))
    na2, nb2 = sum(p * p for p in xs), sum(q * q for q in ys)
    if na2 == 0 or nb2 == 0:
        return 0.0 if na2 == nb2 else 1.0
    cos = float(dot) / math.sqrt(float(na2) * float(nb2))
    return float(1 - dot * dot / (na2 * nb2)) / (1 + cos) if cos > 0 else 1 - cos


def noise_reference(x: np.ndarray, d: np.ndarray, target: str, floor: float) -> dict:
    """The noise model element by element, from precision.judge.measure.noise's docstring:
    s_i = p(|a_i|) + sigma, p(v) = 2^floor(log2 v) from twice the smallest normal up (else
    0), sigma = max(floor, 2^(floor(log2 m) + 1)) for m the lower median of those |a|."""
    if x.size == 0:
        return {"noise_rms": 0.0, "noise_max": 0.0, "bulk_scale": 0.0}
    big = np.abs(x) >= 2.0 * 2.0 ** MANT[target][1]
    with np.errstate(divide="ignore"):
        p = np.where(big, 2.0 ** np.floor(np.log2(np.abs(x))), 0.0)
    sigma = floor
    if big.any():
        vals = np.sort(np.abs(x[big]))
        m = vals[(vals.size + 1) // 2 - 1]
        sigma = max(floor, 2.0 ** (math.floor(math.log2(m)) + 1))
    z = np.abs(d) / (p + sigma)
    return {"noise_rms": float(np.sqrt(np.mean(z * z))), "noise_max": float(z.max()),
            "bulk_scale": sigma}


def reference(a, b, base: str, target: str, floor: float | None = None) -> dict:
    """All TensorMetrics fields from whole arrays, plain numpy/scipy in float64."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    floor = (1e-3 if target in ("float16", "bfloat16") else 1e-6) if floor is None else floor
    # an additive mask: both runs at their dtype's lowest finite value, or -inf
    masked = (a <= -TMAX[base]) & (b <= -TMAX[target])
    live, fa, fb = ~masked, np.isfinite(a), np.isfinite(b)
    keep = live & fa & np.isfinite(b)
    x, y = a[keep], b[keep]
    d, n, tmax = y - x, int(keep.sum()), TMAX[target]
    rel = np.abs(d) / np.maximum(np.abs(x), floor)
    na, nd = float(np.sqrt(np.sum(x * x))), float(np.sqrt(np.sum(d * d)))
    top = float(np.abs(y).max()) if n else 0.0

    def mx(v):
        return float(v.max()) if n else 0.0

    r = {"numel": a.size, "compared": n, "masked": int(masked.sum()),
         "nan_base": int((np.isnan(a) & live).sum()), "nan_target": int((np.isnan(b) & live).sum()),
         "inf_base": int((np.isinf(a) & live).sum()), "inf_target": int((np.isinf(b) & live).sum()),
         "new_nan": int((np.isnan(b) & live & fa).sum()),
         "new_inf": int((np.isinf(b) & live & fa).sum()),
         "base_only_nan": int((np.isnan(a) & fb).sum()),
         "base_only_inf": int((np.isinf(a) & live & fb).sum()),
         "saturated": int(((np.abs(y) >= 0.98 * tmax) & (rel > 1e-2)).sum()),
         "saturated_base": int(((np.abs(x) >= 0.98 * TMAX[base]) & (rel > 1e-2)).sum()),
         "beyond_target_range": int((live & fa & (np.abs(a) > tmax)).sum()),
         "max_abs": mx(np.abs(d)), "max_rel": mx(rel),
         "max_ulp": mx(np.abs(d) / ulp_ref(x, target)),
         "absmax_base": mx(np.abs(x)), "absmax_target": top, "target_max": tmax,
         "mean_abs": float(np.mean(np.abs(d))) if n else 0.0,
         "rmse": float(np.sqrt(np.mean(d * d))) if n else 0.0,
         "rel_l2": nd / na if na else (0.0 if nd == 0 else math.inf),
         "snr_db": (10 * math.log10(na**2 / nd**2) if nd and na
                    else (math.inf if nd == 0 else -math.inf)),
         "rms_base": na / math.sqrt(n) if n else 0.0,
         "headroom_bits": math.log2(tmax / top) if top else math.inf,
         "one_minus_cos": one_minus_cos_exact(x, y)}
    r |= noise_reference(x, d, target, floor)
    for i, t in enumerate((1e-2, 1e-3, 1e-4)):
        r[f"ratio_1e{i + 2}"] = float((rel > t).sum() / n) if n else 0.0
    if na and float(np.linalg.norm(y)):
        r["cos"] = 1.0 - cosine(x, y)
    else:
        r["cos"] = 1.0 - r["one_minus_cos"]
    if n >= 2 and np.ptp(x) > 0 and np.ptp(y) > 0:
        r["pearson"] = float(pearsonr(x, y).statistic)
    else:
        r["pearson"] = 1.0 if nd == 0 else 0.0
    return r


def check(m, ref: dict, rel: float = 1e-9, omc_rel: float = 1e-6) -> None:
    got = m.as_dict()
    for k in COUNTS:
        assert got[k] == ref[k], k
    for k in EXACT:
        assert got[k] == pytest.approx(ref[k], rel=1e-12, abs=0), k
    for k in SUMS:
        assert got[k] == pytest.approx(ref[k], rel=rel, abs=0), k
    assert got["one_minus_cos"] == pytest.approx(ref["one_minus_cos"], rel=omc_rel, abs=1e-300)
    assert got["cos"] == pytest.approx(ref["cos"], rel=0, abs=1e-12)
    assert got["pearson"] == pytest.approx(ref["pearson"], rel=0, abs=1e-10)
    assert not any(isinstance(v, float) and math.isnan(v) for v in got.values())


def cmp(a, b, base, target, chunk=None, floor=None):
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    step = chunk or max(a.size, 1)
    pairs = [(a[i:i + step], b[i:i + step]) for i in range(0, a.size, step)]
    return compare_float(pairs, base, target, floor=floor)


def make_pair(seed: int, shape, target: str, noise: float = 1e-3):
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal(shape) * 10.0 ** rng.uniform(-3, 3)).astype(np.float32)
    b = (a * (1 + noise * rng.standard_normal(shape))).astype(NPDT[target])
    return a, b


@pytest.mark.parametrize("target", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("shape", [(1,), (7,), (64, 33), (3, 5, 17)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_against_reference(seed, shape, target):
    a, b = make_pair(seed, shape, target)
    check(cmp(a, b, "float32", target), reference(a, b, "float32", target))


@pytest.mark.parametrize("seed", [3, 4])
@pytest.mark.parametrize("chunk", [1, 7, 1000, None])
def test_chunk_size_independent(seed, chunk):
    a, b = make_pair(seed, (2003,), "float16", noise=1e-2)
    a[::97], b[::89] = np.nan, np.inf  # exercise the filtered path in some chunks only
    whole, m = cmp(a, b, "float32", "float16").as_dict(), cmp(a, b, "float32", "float16", chunk)
    check(m, reference(a, b, "float32", "float16"))
    assert m.as_dict().keys() == whole.keys()
    for k, v in m.as_dict().items():
        if isinstance(v, str):  # the signature label: approx takes numbers only
            assert v == whole[k], k
            continue
        tol = 1e-6 if k == "one_minus_cos" else 1e-12
        assert v == pytest.approx(whole[k], rel=tol, abs=1e-15), k


def test_pair_accumulator_matches_compare_float():
    a, b = make_pair(5, (500,), "bfloat16")
    acc = PairAccumulator("float32", "bfloat16", floor=1e-2)
    for i in range(0, 500, 33):
        acc.update(a[i:i + 33], b[i:i + 33])
    assert acc.result() == cmp(a, b, "float32", "bfloat16", 33, floor=1e-2)
    check(acc.result(), reference(a, b, "float32", "bfloat16", floor=1e-2))


def test_one_minus_cos_keeps_digits():
    rng = np.random.default_rng(6)
    a = rng.standard_normal(1000)
    b = a * (1 + 1e-9 * rng.standard_normal(1000))
    exact = one_minus_cos_exact(a, b)
    assert 1e-19 < exact < 1e-17  # naive 1 - dot/(|a||b|) in float64 is 0 or 2e-16 here
    for chunk in (None, 7):
        m = cmp(a, b, "float64", "float64", chunk)
        assert m.one_minus_cos == pytest.approx(exact, rel=1e-6)
        assert m.cos == 1.0 - m.one_minus_cos


@pytest.mark.parametrize("target", ["float16", "bfloat16"])
def test_max_ulp_counts_target_ulps(target):
    grid = np.array([1.0, -3.0, 1000.5, 0.0078125, 2.0**-14, 6e-5, 0.0, 2.0], np.float32)
    a = grid.astype(NPDT[target]).astype(np.float32)
    ulp = ulp_ref(a, target)
    if target == "float16":  # numpy's own spacing of the fp16 value (2^-24 below 2^-14)
        assert np.array_equal(ulp, np.spacing(np.abs(a).astype(np.float16)).astype(np.float64))
    # 3 ulps away; the last step goes down a binade (6 ulps if measured at b instead of a)
    b = a + 3 * ulp * np.array([1, -1, 1, 1, -1, 1, 1, -1])
    for chunk in (None, 1):
        assert cmp(a, b, "float32", target, chunk).max_ulp == 3.0
    assert cmp(a, a + ulp / 4, "float32", target).max_ulp == 0.25


def test_floor_for_near_zero_baselines():
    a = np.array([1e-8, -1e-7, 0.0, 20.0], np.float32)
    b = a + np.float32(5e-4)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)

    def max_rel(fl):
        return float(np.max(np.abs(b64 - a64) / np.maximum(np.abs(a64), fl)))

    m = cmp(a, b, "float32", "float16")  # half target: floor 1e-3
    assert m.max_rel == max_rel(1e-3) == pytest.approx(0.5, rel=1e-3)
    assert m.ratio_1e2 == 0.75
    assert cmp(a, b, "float32", "bfloat16").max_rel == max_rel(1e-3)
    assert cmp(a, b, "float32", "float32").max_rel == max_rel(1e-6) == pytest.approx(500, rel=1e-3)
    m = cmp(a, b, "float32", "float16", floor=1.0)
    assert m.max_rel == max_rel(1.0)
    assert (m.ratio_1e2, m.ratio_1e3, m.ratio_1e4) == (0.0, 0.0, 0.75)


ADVERSARIAL = {
    "huge": ([1e30, -1e30, 1.0], [1e30 * (1 + 1e-3), 5.0, 1.0]),
    "overflow": ([1e30, 7e4, -7e4, np.nan, 1.0], [np.inf, np.inf, -np.inf, np.inf, 1.0]),
    "near_fp16_max": ([60000.0, 65000.0, 70000.0, -64500.0, 1.0],
                      [64224.0, 65504.0, 65504.0, -64224.0, 1.0]),
    "nan_inf": ([np.nan, 1.0, 2.0, np.inf, np.inf, 3.0, np.nan],
                [np.nan, np.nan, np.inf, np.inf, 5.0, 3.0, 1.0]),
    "masked_lowest": ([F32_MIN, -np.inf, F32_MIN, 1.0, 2.0], [0.0, -65504.0, np.nan, 1.0, 2.5]),
    "masked_below_fp16": ([-70000.0, np.nan, 1.0], [-np.inf, 1.0, 1.5]),
    "below_fp16_not_both": ([-70000.0, 1.0], [-60000.0, 1.0]),
    "all_zero": ([0.0] * 5, [0.0] * 5),
    "zero_base": ([0.0] * 4, [0.0, 1.0, 0.0, -1.0]),
    "zero_target": ([1.0, 2.0], [0.0, 0.0]),
    "constant_equal": ([0.1] * 9, [0.1] * 9),
    "constant_unequal": ([0.1] * 9, [0.2] * 9),
    "constant_vs_varying": ([2.0] * 4, [1.0, 2.0, 3.0, 2.0]),
    "anticorrelated": ([1.0, 2.0, 3.0], [-1.0, -2.0, -3.0]),
    "empty": ([], []),
    "all_masked": ([F32_MIN, -np.inf], [1.0, 2.0]),
    "all_nan": ([np.nan, np.nan], [np.nan, 1.0]),
}


@pytest.mark.parametrize("case", sorted(ADVERSARIAL))
@pytest.mark.parametrize("chunk", [None, 1])
def test_adversarial_against_reference(case, chunk):
    a, b = (np.array(v, np.float32) for v in ADVERSARIAL[case])
    b = b.astype(np.float16) if case != "huge" else b
    # (|d|² - (|a|-|b|)²) keeps only ~6 digits of 1 - cos for dissimilar vectors here
    check(cmp(a, b, "float32", "float16", chunk), reference(a, b, "float32", "float16"),
          omc_rel=1e-4)


def test_adversarial_hand_values():
    a, b = (np.array(v, np.float32) for v in ADVERSARIAL["near_fp16_max"])
    m = cmp(a, b.astype(np.float16), "float32", "float16")
    assert (m.saturated, m.beyond_target_range) == (2, 1)  # 60000->64224, 70000->65504
    assert m.headroom_bits == pytest.approx(0.0, abs=0)
    a, b = (np.array(v, np.float32) for v in ADVERSARIAL["nan_inf"])
    m = cmp(a, b.astype(np.float16), "float32", "float16")
    assert (m.nan_base, m.nan_target, m.inf_base, m.inf_target) == (2, 2, 2, 2)
    assert (m.new_nan, m.new_inf, m.compared) == (1, 1, 1)
    m = cmp(*(np.array(v, np.float32) for v in ADVERSARIAL["masked_lowest"]), "float32", "float16")
    # a mask only where both runs hold one (-inf / -65504); F32_MIN against 0 or NaN is not
    assert (m.masked, m.compared, m.nan_target, m.new_nan, m.inf_base) == (1, 3, 1, 1, 0)
    m = cmp(*(np.array(v, np.float32) for v in ADVERSARIAL["masked_below_fp16"]), "float32",
            "float16")  # -70000 -> -inf is an overflow, not a mask
    assert (m.masked, m.nan_base, m.new_inf, m.beyond_target_range, m.compared) == (
        0, 1, 1, 1, 1)
    zb = cmp(*(np.array(v) for v in ADVERSARIAL["zero_base"]), "float32", "float16")
    assert (zb.rel_l2, zb.cos, zb.one_minus_cos, zb.snr_db, zb.pearson) == (
        math.inf, 0.0, 1.0, -math.inf, 0.0)
    z = cmp(np.zeros(3), np.zeros(3), "float32", "float16")
    assert (z.rel_l2, z.cos, z.one_minus_cos, z.snr_db, z.pearson, z.headroom_bits) == (
        0.0, 1.0, 0.0, math.inf, 1.0, math.inf)
    e = compare_float([], "float32", "bfloat16")
    assert (e.numel, e.compared, e.rms_base, e.cos, e.pearson) == (0, 0, 0.0, 1.0, 1.0)


def test_baseline_overflow_is_not_a_mask():
    """An fp16 baseline's -inf/+inf/NaN where an fp32 target is finite: counted on the
    baseline's side (compare fp16.st fp32.st, or GPU-fp16 against NPU-fp16)."""
    a = np.array([-np.inf, np.inf, np.nan, -65504.0, 1.0], np.float16)
    b = np.array([-70000.0, 70000.0, 3.0, -70000.0, 1.0], np.float32)
    m = cmp(a, b, "float16", "float32")
    assert (m.masked, m.base_only_inf, m.base_only_nan, m.saturated_base) == (0, 2, 1, 1)
    assert (m.new_inf, m.new_nan) == (0, 0)
    both = cmp(np.array([-np.inf, 1.0], np.float16), np.array([-65504.0, 1.0], np.float16),
               "float16", "float16")
    assert (both.masked, both.base_only_inf) == (1, 0)  # the same position in both: a mask


def test_noise_model_sees_ordinary_channels_under_massive_ones():
    """Two massive channels dominate rel_l2; the element-scaled error still sees 8% noise
    in the ordinary ones, and the massive channels' own rounding is no outlier."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((64, 256))
    a[:, 0], a[:, 1] = 1800.0, -950.0
    healthy = a.astype(BF16).astype(np.float64)
    drift = healthy.copy()
    drift[:, 2:] += 0.08 * rng.standard_normal((64, 254))
    mh = cmp(a.astype(np.float32), healthy, "float32", "bfloat16")
    md = cmp(a.astype(np.float32), drift, "float32", "bfloat16")
    eps = 2.0**-7
    assert md.rel_l2 < 4 * eps  # the norm hides it ...
    assert md.noise_rms > 5 * eps > 20 * mh.noise_rms  # ... the noise model does not
    assert mh.noise_max < 1 * eps  # the massive channels round by up to 4: no outlier
    assert mh.signature_bits > 7.5 > md.signature_bits


@pytest.mark.parametrize("extra", [[], [np.nan], [F32_MIN]])  # clean and filtered chunks
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_overflow_of_either_sign_is_not_a_mask(extra, sign):
    """-70000 turning into -inf (or saturating at -65504) counts like +70000 does."""
    a = np.array([sign * 7e4, 1.0, *extra], np.float32)
    for tgt, new_inf, saturated in ((sign * np.inf, 1, 0), (sign * 65504.0, 0, 1)):
        # the extra F32_MIN is a mask only because the target holds one there too
        b = np.array([tgt, 1.0, *[-np.inf if extra == [F32_MIN] else 1.0] * len(extra)],
                     np.float16)
        m = cmp(a, b, "float32", "float16")
        assert (m.masked, m.new_inf, m.saturated, m.beyond_target_range) == (
            int(extra == [F32_MIN]), new_inf, saturated, 1)


@pytest.mark.parametrize("scale", [1e-12, 1e-3, 0.3, 0.49, 0.51, 1.9, 2.1, 1e6, 1e12])
def test_cos_with_different_norms(scale):
    rng = np.random.default_rng(8)
    a = rng.standard_normal(300)
    b = scale * (a + 0.5 * rng.standard_normal(300))
    for chunk in (None, 7):
        m = cmp(a, b, "float64", "float64", chunk)
        assert m.cos == pytest.approx(1 - cosine(a, b), abs=1e-12)
        assert m.one_minus_cos == pytest.approx(one_minus_cos_exact(a, b), rel=1e-9)
    a, b = np.array([1e12, 0.0]), np.array([1.0, 1.0])
    assert cmp(a, b, "float32", "float32").cos == pytest.approx(2**-0.5, abs=1e-12)


def test_beyond_target_range_counts_overflowed_targets():
    a, b = np.array([1e30, 1e5, 1.0], np.float32), np.array([np.inf, np.inf, 1.0], np.float16)
    assert cmp(a, b, "float32", "float16").beyond_target_range == 2
    # -1e5 -> -inf and -1e9 -> -65504 overflow like positive values; only F32_MIN against
    # the target's own mask value is a mask, and a baseline inf is not counted
    a = np.array([-1e5, -1e9, F32_MIN, np.inf, 7e4], np.float32)
    b = np.array([-np.inf, -65504, -65504, np.inf, 65504], np.float16)
    for chunk in (None, 1):
        m = cmp(a, b, "float32", "float16", chunk)
        assert (m.beyond_target_range, m.masked, m.compared, m.new_inf) == (3, 1, 2, 1)


def test_scalars_and_bf16_baseline():
    m = compare_float([(np.float32(3.0), np.float16(3.0078125))], "float32", "float16")
    assert (m.numel, m.compared, m.max_abs, m.max_ulp) == (1, 1, 0.0078125, 4.0)
    a = np.array([1.0, -2.5, 3e38], BF16)
    b = np.array([1.0078125, -2.5, 3e38], BF16)
    check(cmp(a, b, "bfloat16", "bfloat16"), reference(a, b, "bfloat16", "bfloat16"))


def test_compare_exact_int_and_bool():
    a, b = np.array([1, 5, -7, 9], np.int64), np.array([1, 2, 8, 9], np.int64)
    m = compare_exact([(a[:2], b[:2]), (a[2:], b[2:])])
    assert (m.numel, m.mismatched, m.max_abs, m.share) == (4, 2, 15.0, 0.5)
    m = compare_exact([(np.array([True, False, True]), np.array([True, True, False]))])
    assert (m.mismatched, m.max_abs) == (2, 1.0)
    m = compare_exact([(np.array([0], np.uint8), np.array([255], np.uint8))])
    assert m.max_abs == 255.0
    m = compare_exact([(np.zeros(0, np.int32), np.zeros(0, np.int32))])
    assert (m.numel, m.mismatched, m.share, m.max_abs) == (0, 0, 0.0, 0.0)
    m = compare_exact([(np.arange(6), np.arange(6))])
    assert (m.mismatched, m.max_abs) == (0, 0.0)


def test_compare_exact_large_int64():
    m = compare_exact([(np.array([2**62 + 1], np.int64), np.array([2**62], np.int64))])
    assert (m.mismatched, m.max_abs) == (1, 1.0)
    lo, hi = np.iinfo(np.int64).min, np.iinfo(np.int64).max
    m = compare_exact([(np.array([lo, 0]), np.array([hi, 0]))])  # no int64 wrap-around
    assert (m.mismatched, m.max_abs) == (1, float(2**64 - 1))


BOUNDED = st.floats(-(2.0**100), 2.0**100, width=32)


@settings(max_examples=60, deadline=None)
@given(x=hnp.arrays(np.float32, st.integers(0, 40), elements=st.floats(width=32)),
       target=st.sampled_from(["float16", "bfloat16", "float32"]))
def test_property_self_compare(x, target):
    m = cmp(x, x, "float32", target)
    assert (m.max_abs, m.rel_l2, m.cos, m.one_minus_cos, m.snr_db, m.pearson) == (
        0.0, 0.0, 1.0, 0.0, math.inf, 1.0)
    assert m.new_nan == m.new_inf == m.max_ulp == m.max_rel == 0


@settings(max_examples=60, deadline=None)
@given(data=st.data(), x=hnp.arrays(np.float32, st.integers(0, 40), elements=BOUNDED),
       chunk=st.integers(1, 9))
def test_property_symmetry_and_chunks(data, x, chunk):
    y = data.draw(hnp.arrays(np.float32, x.shape, elements=BOUNDED))
    ab, ba = cmp(x, y, "float32", "float32"), cmp(y, x, "float32", "float32")
    assert (ab.max_abs, ab.rmse, ab.mean_abs) == (ba.max_abs, ba.rmse, ba.mean_abs)
    split = cmp(x, y, "float32", "float32", chunk).as_dict()
    for k, v in ab.as_dict().items():
        if k in COUNTS or k in EXACT:
            assert split[k] == v, k
        elif k in ("mean_abs", "rmse", "rel_l2", "rms_base"):
            assert split[k] == pytest.approx(v, rel=1e-9), k

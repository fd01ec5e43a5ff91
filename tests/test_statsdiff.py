"""precision.judge.measure.statsdiff against numpy on the finite values, in float64."""

from __future__ import annotations

import json
import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from precision.dumps.sketch import decode
from precision.judge.measure.row import Row
from precision.judge.measure.statsdiff import array_stats, stats_delta

FP16_MAX = float(np.finfo(np.float16).max)
STAT_KEYS = ("min", "max", "mean", "std", "norm", "absmax")


def reference(x) -> dict:
    """Plain numpy statistics of the finite values; counts of NaN/±inf and fp16 range."""
    x = np.asarray(x, np.float64).ravel()
    f = x[np.isfinite(x)]
    with np.errstate(over="ignore"):  # huge values become inf in fp16: not zero, as wanted
        flushed = int(np.sum((np.abs(f) > 0) & (np.float16(f) == 0)))
    out = {"numel": x.size, "nan": int(np.isnan(x).sum()), "posinf": int(np.sum(x == np.inf)),
           "neginf": int(np.sum(x == -np.inf)), "masked": int(np.sum(x == -np.inf)),
           "beyond_fp16": int(np.sum(np.abs(f) > FP16_MAX)),
           "near_fp16_max": int(np.sum(np.abs(f) >= 0.98 * FP16_MAX)),
           # fp16 rounds these to zero: below half its smallest subnormal 2^-24
           "flush_fp16": flushed}
    if f.size == x.size:
        out["sketch"] = reference_sketch(x)
    if f.size == 0:
        return out | dict.fromkeys(STAT_KEYS)
    return out | {"min": f.min(), "max": f.max(), "mean": f.mean(), "std": f.std(),
                  "norm": np.linalg.norm(f), "absmax": np.abs(f).max()}


def reference_sketch(x: np.ndarray, first: int = 0) -> list[float]:
    """The count sketch element by element with Python integers: bucket = i mod 1021, the
    sign sigma(i mod P) sigma(i div P) with P = 1021 x 4096 and sigma(k) from bit 26 of
    (k x 2654435761) mod 2^32 (elements numbered from ``first``)."""
    def sigma(k: int) -> int:
        return -1 if ((k * 2654435761) % 2**32 >> 26) & 1 else 1

    period = 1021 * 4096
    y = [0.0] * 1021
    for i, v in enumerate(np.asarray(x, np.float64).ravel().tolist(), start=first):
        y[i % 1021] += sigma(i % period) * sigma(i // period) * v
    return y


def stats(x, chunk: int | None = None) -> dict:
    x = np.asarray(x).ravel()
    step = chunk or max(x.size, 1)
    return array_stats(x[i:i + step] for i in range(0, x.size, step))


def check(got: dict, ref: dict, std_rel: float = 1e-9) -> None:
    assert set(got) == set(ref)
    for k in ("numel", "nan", "posinf", "neginf", "masked", "beyond_fp16", "near_fp16_max"):
        assert got[k] == ref[k], k
    if ref["mean"] is None:
        assert all(got[k] is None for k in STAT_KEYS)
        return
    for k in ("min", "max", "absmax"):
        assert got[k] == ref[k], k
    assert got["mean"] == pytest.approx(ref["mean"], rel=1e-9, abs=1e-300)
    assert got["norm"] == pytest.approx(ref["norm"], rel=1e-12)
    assert got["std"] == pytest.approx(ref["std"], rel=std_rel, abs=1e-300)
    if "sketch" in ref:  # stored in float32: within 2^-24 of each value
        scale = float(np.abs(ref["sketch"]).max()) or 1.0
        assert np.allclose(decode(got["sketch"]), ref["sketch"], rtol=2.0**-23,
                           atol=1e-12 * scale)


def test_the_sketch_estimates_the_error_norm() -> None:
    """E ||y(b) - y(a)||² = ||b - a||²: over many pairs the estimate is unbiased, and one
    estimate is within about sqrt(2/1021) = 4.4% relative (in square)."""
    from precision.dumps.sketch import count_sketch, sketch_distance

    rng = np.random.default_rng(5)
    ratios = []
    for _ in range(300):
        a = rng.standard_normal(20000) * np.where(rng.random(20000) < 0.01, 100.0, 1.0)
        b = a + rng.standard_normal(20000) * 0.01 * (1 + np.abs(a))
        est = sketch_distance(count_sketch([a[:1234], a[1234:]]), count_sketch([b]))
        assert est is not None
        ratios.append(est**2 / float(np.sum((b - a) ** 2)))
    assert np.mean(ratios) == pytest.approx(1.0, abs=0.01)
    assert 0.03 < np.std(ratios) < 0.07


def test_the_sketch_follows_its_documented_definition_across_periods() -> None:
    """Elements past one period of signs (P = 1021 x 4096) take the period's sign too: the
    numpy sketch in chunks matches the element-by-element one on a window there."""
    from precision.dumps.sketch import PERIOD, count_sketch, signs

    rng = np.random.default_rng(8)
    x = rng.standard_normal(3000)
    first = PERIOD - 1000  # the window straddles the first period's end
    # the sketch of zeros up to ``first`` and then x: only x's elements count
    y = count_sketch([np.zeros(first), x[:777], x[777:]])
    np.testing.assert_allclose(y, reference_sketch(x, first), rtol=1e-12, atol=1e-12)
    assert set(np.unique(signs(0, 10000)).tolist()) == {-1.0, 1.0}


def test_stored_sketches_of_either_format_and_of_different_sizes() -> None:
    """The stored text decodes to the float32 values; a first-format list of 31 numbers
    reads too; sketches of different sizes estimate nothing."""
    from precision.dumps.sketch import encode, sketch_distance, valid

    y = np.arange(1021) / 7.0
    assert np.array_equal(decode(encode(y)), y.astype(np.float32).astype(np.float64))
    assert sketch_distance(encode(y), encode(y + 1.0)) == pytest.approx(np.sqrt(1021))
    old = [1.0] * 31
    assert valid(old) and sketch_distance(old, [2.0] * 31) == pytest.approx(np.sqrt(31))
    assert sketch_distance(old, encode(y)) is None
    assert not valid("not base64!") and not valid([True]) and not valid([math.inf])
    assert not valid(encode(np.array([np.nan])))


def randn(seed: int, shape, dtype, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (scale * rng.standard_normal(shape) + 0.1 * scale).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16, np.float64])
@pytest.mark.parametrize("shape", [(1,), (17,), (32, 65), (2, 3, 101)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_against_numpy(seed, shape, dtype):
    x = randn(seed, shape, dtype, scale=10.0 ** (seed - 1))
    check(stats(x), reference(x))


@pytest.mark.parametrize("chunk", [1, 7, 1000, None])
def test_chunked_with_nonfinite_and_fp16_range(chunk):
    x = randn(3, (3001,), np.float32, scale=3e4)
    x[::101], x[5::211], x[7::307] = np.nan, np.inf, -np.inf
    x[11:14] = [65504.0, -65505.0, 0.98 * 65504]
    ref = reference(x)
    assert ref["beyond_fp16"] > 1 and ref["near_fp16_max"] > ref["beyond_fp16"]
    check(stats(x, chunk), ref)


def test_fp16_range_boundaries():
    near = 0.98 * FP16_MAX
    x = np.array([65504.0, -65504.0, 65504.5, -1e30, near, np.nextafter(near, 0), 1e5, np.inf])
    s = stats(x)
    assert (s["beyond_fp16"], s["near_fp16_max"], s["posinf"]) == (3, 6, 1)
    assert s["absmax"] == 1e30 and s["min"] == -1e30 and s["max"] == 1e5
    h = stats(np.array([65504, -65504, 64192, 64224], np.float16))  # fp16 can't go beyond
    assert (h["beyond_fp16"], h["near_fp16_max"]) == (0, 3)


def test_huge_fp32_values():
    x = np.array([1e30, -3e38, 2.0, np.finfo(np.float32).min], np.float32)
    check(stats(x), reference(x))
    check(stats(x, 1), reference(x))


@pytest.mark.parametrize("x", [np.zeros(0, np.float32), np.array([np.nan, np.inf, -np.inf]),
                               np.full(4, np.nan, np.float16)])
def test_no_finite_values(x):
    s = stats(x)
    check(s, reference(x))
    assert s["numel"] == x.size


def test_constant_zero_and_scalar():
    for x in (np.zeros(50, np.float32), np.full(7, 0.5, np.float32), np.float16(-2.5)):
        s, ref = stats(x), reference(x)
        check(s, ref)
        assert s["std"] == 0.0 and s["min"] == s["max"] == s["mean"]
    assert array_stats([np.float32(3.0), np.array([4.0])])["norm"] == 5.0


@pytest.mark.parametrize("chunk", [None, 1, 7, 1000])
def test_std_large_mean_small_spread(chunk):
    """No E[x²] - mean² cancellation: ~7e-4 relative error here with the naive formula."""
    x = (1000 + 1e-3 * np.random.default_rng(4).standard_normal(4096)).astype(np.float32)
    assert stats(x, chunk)["std"] == pytest.approx(np.std(x.astype(np.float64)), rel=1e-9)
    assert stats(np.full(1000, 0.1, np.float32), chunk)["std"] == 0.0
    y = np.float32(1e6) + np.arange(4000, dtype=np.float32) % 4 * np.float32(0.0625)
    assert stats(y, chunk)["std"] == pytest.approx(np.std(y.astype(np.float64)), rel=1e-9)


@settings(max_examples=80, deadline=None)
@given(x=hnp.arrays(np.float32, st.integers(0, 50), elements=st.floats(width=32)),
       chunk=st.integers(1, 8))
def test_property_counts_and_extrema(x, chunk):
    s, ref = stats(x, chunk), reference(x)
    for k in ("numel", "nan", "posinf", "neginf", "beyond_fp16", "near_fp16_max",
              "min", "max", "absmax"):
        assert s[k] == ref[k], k
    if ref["norm"] is not None:
        assert s["norm"] == pytest.approx(ref["norm"], rel=1e-9)
        scale = float(np.mean(np.abs(x[np.isfinite(x)].astype(np.float64))))
        assert s["mean"] == pytest.approx(ref["mean"], rel=1e-9, abs=1e-12 * scale)
        assert s["std"] == pytest.approx(ref["std"], rel=1e-9, abs=1e-12 * scale)


# -- stats_delta --------------------------------------------------------------------------

def test_stats_delta_from_array_stats():
    rng = np.random.default_rng(5)
    a = rng.standard_normal(1000).astype(np.float32)
    b = (a * 1.01).astype(np.float16)
    b[:3], b[3:5], b[5:9] = np.nan, np.inf, 65504
    sa, sb = stats(a), stats(b)
    d = stats_delta(sa, sb)
    na, nb = sa["norm"], sb["norm"]
    assert d.norm_base == na and d.norm_target == nb
    assert d.norm_gap == abs(nb - na)
    assert d.norm_gap_rel == pytest.approx(abs(nb - na) / na, rel=1e-15)
    assert (d.new_nan, d.new_inf, d.new_near_fp16_max, d.numel) == (3, 2, 4, 1000)
    assert (d.absmax_base, d.absmax_target) == (sa["absmax"], 65504.0)
    assert (d.mean_base, d.mean_target) == (sa["mean"], sb["mean"])
    # reverse triangle inequality on the finite elements: | |b| - |a| | <= |b - a|
    keep = np.isfinite(b)
    diff = np.linalg.norm(b[keep].astype(np.float64) - a[keep])
    sub = stats_delta(stats(a[keep]), stats(b[keep]))
    assert 0 < sub.norm_gap <= diff


def test_stats_delta_fewer_problems_is_not_negative():
    sa = {"numel": 4, "nan": 3, "posinf": 1, "neginf": 1, "near_fp16_max": 2, "norm": 2.0}
    sb = {"numel": 4, "nan": 1, "posinf": 0, "neginf": 0, "near_fp16_max": 0, "norm": 2.0}
    d = stats_delta(sa, sb)
    assert (d.new_nan, d.new_inf, d.new_near_fp16_max) == (0, 0, 0)
    assert (d.norm_gap, d.norm_gap_rel) == (0.0, 0.0)
    d = stats_delta(sb | {"posinf": 2}, sa | {"neginf": 4})
    assert (d.new_nan, d.new_inf, d.new_near_fp16_max) == (2, 3, 2)


@pytest.mark.parametrize(("na", "nb", "rel"), [(None, None, None), (0.0, 0.0, 0.0),
                                               (None, 3.0, None), (0.0, 1e-300, math.inf),
                                               (4.0, None, None), (4.0, 5.0, 0.25)])
def test_stats_delta_zero_and_missing_norms(na, nb, rel):
    """A norm a record does not hold is unknown, never 0 (an msprobe summary without one
    read as 0 on both sides made every pair's norms agree)."""
    d = stats_delta({"norm": na}, {"norm": nb})
    assert d.norm_gap_rel == rel
    assert d.norm_gap == (None if na is None or nb is None else abs(nb - na))
    assert (d.new_nan, d.new_inf, d.numel) == (0, 0, 0)


def test_stats_delta_of_all_nonfinite_records():
    sa, sb = stats(np.array([1.0, 2.0])), stats(np.array([np.nan, np.inf], np.float16))
    d = stats_delta(sa, sb)
    assert d.norm_target is None and d.norm_gap_rel is None  # no finite value: no norm
    assert (d.new_nan, d.new_inf, d.absmax_target, d.mean_target) == (1, 1, None, None)


def test_stats_delta_as_dict_is_the_rows_stats_json() -> None:
    """``Row.as_dict()["stats"]``: docs/json-schema.md's fields in its order, values as the
    records hold them (a norm stored as an integer stays one)."""
    d = stats_delta({"numel": 4, "norm": 2, "nan": 0, "padded": 3},
                    {"numel": 4, "norm": 3, "nan": 1})
    assert json.dumps(d.as_dict()) == (
        '{"norm_base": 2, "norm_target": 3, "norm_gap": 1, "norm_gap_rel": 0.5, '
        '"absmax_base": null, "absmax_target": null, "mean_base": null, "mean_target": null, '
        '"new_nan": 1, "new_inf": 0, "base_only_nan": 0, "base_only_inf": 0, "masked": 0, '
        '"new_near_fp16_max": 0, "numel": 4, "padded": 3, "sketch_gap": null, '
        '"max_base": null, "max_target": null, "min_base": null, "min_target": null, '
        '"checksum_base": null, "checksum_target": null}')
    assert d.recorded_elements == 7
    row = Row(0, "x:out", "OK", "", (7,), "float32", "float16", stats_delta=d)
    assert row.as_dict()["stats"] == d.as_dict()


def test_flush_to_zero_count_matches_a_real_fp16_cast():
    x = np.array([0.0, 1e-9, -2e-8, 2.9e-8, 3.1e-8, 1e-7, 1.0, np.nan], np.float32)
    assert stats(x)["flush_fp16"] == int(np.sum((x != 0) & (x.astype(np.float16) == 0)))
    assert stats(x)["flush_fp16"] == 3

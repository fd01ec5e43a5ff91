"""The fused kernel (numba, the fast extra) against the numpy path it replaces, and how
compare picks one. tests/test_metrics.py runs its float64 reference checks on both."""

from __future__ import annotations

import importlib.util
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import precision
from precision.errors import InputError
from precision.judge.measure import kernels, metrics
from precision.judge.measure.kernels import FUSED_MIN_ELEMENTS, choose_kernel
from precision.judge.measure.metrics import compare_float
from precision.kernel_choice import KERNEL_ENV

HAS_NUMBA = importlib.util.find_spec("numba") is not None
needs_numba = pytest.mark.skipif(not HAS_NUMBA, reason="numba (the fast extra) is not installed")
BF16 = ml_dtypes.bfloat16
F32_MIN = float(np.finfo(np.float32).min)
#: float fields that are counts, maxima or read off them: equal to the last bit
EXACT = ("max_abs", "max_rel", "max_ulp", "absmax_base", "absmax_target", "ratio_1e2",
         "ratio_1e3", "ratio_1e4", "noise_max", "bulk_scale", "target_max", "headroom_bits")
#: absolute tolerances where a figure is a difference of sums: 1 - cos (4 eps) and dB
ABS = {"one_minus_cos": 1e-15, "cos": 1e-15, "snr_db": 1e-12, "pearson": 1e-15}


def _cases() -> dict[str, tuple[np.ndarray, np.ndarray, str, str]]:
    rng = np.random.default_rng(0)
    n = 70_001  # more than one 2^16 chunk, and a tail that no lane divides
    a = (rng.standard_normal(n) * np.exp(2 * rng.standard_normal(n))).astype(np.float32)
    b16 = (a * (1 + 1e-3 * rng.standard_normal(n))).astype(np.float16)
    massive = a.copy()
    massive[::512] = 1800.0
    dirty, dirty_b = a.copy(), b16.copy()
    dirty[::97], dirty_b[::89], dirty_b[5::101] = np.nan, np.inf, -np.inf
    dirty[7::211], dirty_b[7::211] = F32_MIN, -np.inf  # masks: both runs at their lowest
    dirty[3::307] = 7e4  # beyond fp16
    sub = (a * np.float32(1e-39)).astype(np.float32)  # fp32 subnormals and zeros
    big = rng.standard_normal(n)  # float64 beyond SAFE_ABS (2^500): numpy inside numba
    big[::1000] = 4e150
    ints = rng.integers(-50, 50, n).astype(np.float32)  # integer-valued floats
    return {
        "fp32_fp16": (a, b16, "float32", "float16"),
        "fp32_bf16": (a, a.astype(BF16), "float32", "bfloat16"),
        "bf16_bf16": (a.astype(BF16), (a * 1.01).astype(BF16), "bfloat16", "bfloat16"),
        "massive": (massive, massive.astype(BF16), "float32", "bfloat16"),
        "nan_inf_masks": (dirty, dirty_b, "float32", "float16"),
        "subnormal": (sub, (sub * np.float32(1.5)).astype(np.float32), "float32", "float32"),
        "subnormal_fp16": (a * np.float32(1e-6), (a * np.float32(1e-6)).astype(np.float16),
                           "float32", "float16"),
        "float64_huge": (big, big * (1 + 1e-12), "float64", "float64"),
        "integers": (ints, ints + (rng.random(n) < 0.1), "float32", "float32"),
        "saturated": (np.full(5000, 64000.0, np.float32), np.full(5000, 65504.0, np.float16),
                      "float32", "float16"),
    }


CASES = _cases()


@needs_numba
@pytest.mark.parametrize("chunk", [1 << 16, 4096, 7])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_kernel_equals_numpy(case: str, chunk: int) -> None:
    a, b, base, target = CASES[case]
    if chunk == 7:
        a, b = a[:3000], b[:3000]
    pairs = [(a[i:i + chunk], b[i:i + chunk]) for i in range(0, a.size, chunk)]
    got = compare_float(pairs, base, target, kernel="numba").as_dict()
    want = compare_float(pairs, base, target, kernel="numpy").as_dict()
    assert got.keys() == want.keys()
    for name, value in want.items():
        if isinstance(value, int) or name in EXACT or name == "signature":
            assert got[name] == value, name
        else:  # sums: another summation order; 1 - cos and snr_db come from differences
            assert got[name] == pytest.approx(value, rel=1e-12, abs=ABS.get(name, 0)), name
        assert not (isinstance(got[name], float) and math.isnan(got[name])), name


@needs_numba
def test_kernels_merge() -> None:
    """Parts measured by different kernels merge into the whole."""
    a, b, base, target = CASES["nan_inf_masks"]
    whole = metrics.PairAccumulator(base, target)
    whole.update(a, b)
    left = metrics.PairAccumulator(base, target, kernel="numba")
    right = metrics.PairAccumulator(base, target)
    left.update(a[:30_000], b[:30_000])
    right.update(a[30_000:], b[30_000:])
    left.merge(right)
    got, want = left.result().as_dict(), whole.result().as_dict()
    assert got.keys() == want.keys()
    for name, value in want.items():
        if isinstance(value, str):  # the signature label: approx takes numbers only
            assert got[name] == value, name
        else:
            assert got[name] == pytest.approx(value, rel=1e-9, abs=1e-300), name


@needs_numba
def test_half_to_float64_is_numpys_conversion() -> None:
    """Every fp16 bit pattern: zeros, subnormals, normals, infinities, NaN."""
    from precision.judge.measure import fused

    bits = np.arange(1 << 16, dtype=np.uint16)
    out = np.empty(bits.size)
    fused.half_to_float64(bits, out)
    want = bits.view(np.float16).astype(np.float64)
    assert np.array_equal(out, want, equal_nan=True)
    assert np.array_equal(np.signbit(out), np.signbit(want))


def test_unknown_kernel_is_refused() -> None:
    with pytest.raises(ValueError, match="kernel"):
        metrics.PairAccumulator("float32", "float16", kernel="cuda")


def test_choose_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    monkeypatch.setattr(kernels, "_FUSED_LOADED", False)
    monkeypatch.setattr(kernels, "_FUSED_FAILED", False)
    assert choose_kernel(FUSED_MIN_ELEMENTS - 1) == "numpy"  # not worth loading numba
    assert choose_kernel(FUSED_MIN_ELEMENTS) == ("numba" if HAS_NUMBA else "numpy")
    # once loaded, it serves small compares too
    assert choose_kernel(1) == ("numba" if HAS_NUMBA else "numpy")
    monkeypatch.setenv(KERNEL_ENV, "numpy")
    assert choose_kernel(1e12) == "numpy"
    monkeypatch.setenv(KERNEL_ENV, "fortran")
    with pytest.raises(InputError, match=KERNEL_ENV):
        choose_kernel(1)
    monkeypatch.setenv(KERNEL_ENV, "numba")
    if HAS_NUMBA:
        assert choose_kernel(1) == "numba"
    else:
        with pytest.raises(InputError, match="fast"):
            choose_kernel(1)


def test_a_kernel_that_cannot_load_falls_back_to_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    """numba installed but unloadable (LLVM under an address-space limit raises OSError):
    compare goes on with numpy, and says why when the kernel was asked for."""
    def broken() -> None:
        raise OSError("Could not find/load shared object file 'libllvmlite.so'")

    monkeypatch.setattr(kernels, "load_fused", broken)
    monkeypatch.setattr(kernels, "_FUSED_LOADED", False)
    monkeypatch.setattr(kernels, "_FUSED_FAILED", False)
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    assert choose_kernel(FUSED_MIN_ELEMENTS) == "numpy"
    assert kernels._FUSED_FAILED  # not tried again in this process
    monkeypatch.setenv(KERNEL_ENV, "numba")
    with pytest.raises(InputError, match="libllvmlite"):
        choose_kernel(1)


@needs_numba
def test_compare_is_the_same_on_both_kernels(make_dump: Callable[..., Path],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    base = {f"layer.{i}:out": rng.standard_normal((64, 256)).astype(np.float32)
            for i in range(4)}
    base["layer.2:out"][0, :7] = np.nan
    target = {k: (v * (1 + 3e-3 * rng.standard_normal(v.shape))).astype(np.float16)
              for k, v in base.items()}
    pa, pb = make_dump("base.st", base), make_dump("fp16.st", target, dtype="float16")
    monkeypatch.setattr(kernels, "_FUSED_LOADED", False)  # later tests: numpy as before
    reports = {}
    for kernel in ("numpy", "numba"):
        monkeypatch.setenv(KERNEL_ENV, kernel)
        reports[kernel] = precision.compare(pa, pb, jobs=1)
    fast, slow = reports["numba"], reports["numpy"]
    assert [(r.key, r.status) for r in fast.rows] == [(r.key, r.status) for r in slow.rows]
    for r, s in zip(fast.rows, slow.rows, strict=True):
        assert r.metrics is not None and s.metrics is not None
        got, want = r.metrics.as_dict(), s.metrics.as_dict()
        assert got.keys() == want.keys()
        for name, value in want.items():
            if isinstance(value, str):  # the signature label: approx takes numbers only
                assert got[name] == value, (r.key, name)
            else:
                assert got[name] == pytest.approx(value, rel=1e-12, abs=ABS.get(name, 0)), (
                    r.key, name)


@pytest.mark.parametrize("kernel", ["numpy", pytest.param("numba", marks=needs_numba)])
def test_signalling_nans_are_counted_without_a_warning(kernel: str,
                                                       make_dump: Callable[..., Path],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A NaN with its quiet bit clear (a device may write one) raises the CPU's invalid flag
    when widened; numpy warned "invalid value encountered in cast" through compare."""
    monkeypatch.setattr(kernels, "_FUSED_LOADED", False)
    monkeypatch.setenv(KERNEL_ENV, kernel)
    rng = np.random.default_rng(4)
    a = rng.standard_normal((8, 64)).astype(np.float32)
    signalling = {np.float32: (np.uint32, 0x7F800001), np.float16: (np.uint16, 0x7C01),
                  BF16: (np.uint16, 0x7F81)}
    for dtype, name in ((np.float32, "float32"), (np.float16, "float16"), (BF16, "bfloat16")):
        uint, pattern = signalling[dtype]
        b = a.astype(dtype)
        b.view(uint)[0, :5] = pattern
        assert np.isnan(b.astype(np.float32)[0, :5]).all()
        base = make_dump(f"base-{name}.st", {"l:out": a, "logits": a.reshape(2, 4, 64)})
        target = make_dump(f"target-{name}.st", {"l:out": b, "logits": b.reshape(2, 4, 64)},
                           dtype=name)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            report = precision.compare(base, target, jobs=1)
        row = next(r for r in report.rows if r.key == "l:out")
        assert row.status == "NAN" and row.metrics is not None and row.metrics.nan_target == 5

"""Fuzzing: the reader and the compare engine never crash, never lie, whatever the input.

Bounded for CI (a few hundred examples, well under a minute). Run longer with
``PRECISION_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest tests/test_fuzz.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import precision
from precision import DumpError

from .conftest import write_dump

EXAMPLES = int(os.environ.get("PRECISION_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


def _valid_dump(tmp: Path) -> bytes:
    rng = np.random.default_rng(0)
    p = write_dump(tmp / "seed.st", {
        "a:out": rng.standard_normal((3, 4)).astype(np.float32),
        "b:out": rng.standard_normal(5).astype(np.float16),
        "c:in.0": np.arange(6, dtype=np.int64),
        "d:out": rng.standard_normal(4).astype(ml_dtypes.bfloat16)})
    return p.read_bytes()


def _read_everything(path: Path) -> None:
    """Open and read every tensor; only DumpError may escape."""
    d = precision.load(path)
    repr(d)
    for key in d.tensors:
        d[key]
        for _ in d.chunks(key, 3):
            pass


@FUZZ
@given(data=st.data())
def test_mutated_dumps_fail_cleanly(tmp_path: Path, data: st.DataObject) -> None:
    raw = bytearray(_valid_dump(tmp_path))
    action = data.draw(st.sampled_from(["truncate", "flip", "splice"]))
    if action == "truncate":
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    elif action == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
    else:
        i = data.draw(st.integers(0, len(raw)))
        raw[i:i] = data.draw(st.binary(min_size=1, max_size=64))
    p = tmp_path / "fuzz.st"
    p.write_bytes(bytes(raw))
    try:
        _read_everything(p)
    except DumpError as exc:
        assert "\n" not in str(exc) and str(p) in str(exc)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
                    | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
SPEC = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "X9"]) | JSON,
    "shape": st.lists(st.integers(-2, 5), max_size=3) | JSON,
    "data_offsets": st.lists(st.integers(-4, 200), min_size=2, max_size=2) | JSON})


@FUZZ
@given(tensors=st.dictionaries(st.text(min_size=1, max_size=6), SPEC | JSON, max_size=4),
       meta=st.one_of(st.none(), JSON, st.fixed_dictionaries({
           "format": st.just("precision-dump"), "format_version": st.sampled_from(["1", "2", 1]),
           "meta": st.text(max_size=20) | JSON.map(json.dumps)})),
       payload=st.binary(max_size=256))
def test_arbitrary_headers_fail_cleanly(tmp_path: Path, tensors: dict, meta: object,
                                        payload: bytes) -> None:
    header = dict(tensors)
    if meta is not None:
        header["__metadata__"] = meta
    blob = json.dumps(header).encode()
    p = tmp_path / "h.st"
    p.write_bytes(struct.pack("<Q", len(blob)) + blob + payload)
    with contextlib.suppress(DumpError):  # anything else fails the test
        _read_everything(p)


FLOATS = st.floats(width=32, allow_nan=True, allow_infinity=True)


@FUZZ
@given(a=hnp.arrays(np.float32, st.integers(0, 64), elements=FLOATS),
       noise=st.floats(0, 1e-2), target=st.sampled_from([np.float16, np.float32]),
       chunk=st.integers(1, 70))
def test_compare_never_crashes_and_is_chunk_independent(tmp_path: Path, a: np.ndarray,
                                                        noise: float, target: type,
                                                        chunk: int) -> None:
    with np.errstate(all="ignore"):
        b = (a * (1 + noise)).astype(target)
    pa = write_dump(tmp_path / "a.st", {"x:out": a})
    pb = write_dump(tmp_path / "b.st", {"x:out": b}, dtype=np.dtype(target).name)
    try:
        whole = precision.compare(pa, pb, jobs=1)
    except precision.DumpError as exc:  # NaN/inf (or masks) at the same places, nothing else
        if a.size == 0:
            assert "only empty float records" in str(exc)
            return
        assert "hold no finite value at the same places" in str(exc)
        assert not (np.isfinite(a) & np.isfinite(b) & (np.abs(a) < 1e30)).any()
        with pytest.raises(precision.DumpError, match="no finite value at the same places"):
            precision.compare(pa, pb, jobs=2, chunk_elems=chunk)
        return
    parts = precision.compare(pa, pb, jobs=2, chunk_elems=chunk)
    r1, r2 = whole.rows[0], parts.rows[0]
    assert r1.status == r2.status and r1.status in ("OK", "DRIFT", "OVERFLOW", "NAN")
    m1, m2 = r1.metrics, r2.metrics
    assert m1 is not None and m2 is not None
    for field in ("compared", "masked", "new_nan", "new_inf", "saturated", "max_abs"):
        assert getattr(m1, field) == getattr(m2, field), field
    assert m1.rel_l2 == pytest.approx(m2.rel_l2, rel=1e-9, abs=1e-300) or (
        np.isinf(m1.rel_l2) and np.isinf(m2.rel_l2))
    for value in (m1.max_abs, m1.mean_abs, m1.rmse, m1.one_minus_cos, m1.pearson):
        assert not np.isnan(value)  # defined results, never NaN


@FUZZ
@given(a=hnp.arrays(np.float32, st.integers(1, 40), elements=FLOATS))
def test_self_comparison_is_perfect(tmp_path: Path, a: np.ndarray) -> None:
    p = write_dump(tmp_path / "a.st", {"x:out": a})
    if not (np.isfinite(a) & (np.abs(a) < 1e30)).any():  # nothing but NaN, inf or masks
        with pytest.raises(precision.DumpError, match="no finite value at the same places"):
            precision.compare(p, p)
        return
    report = precision.compare(p, p)
    assert any("same file" in w for w in report.warnings)
    row = report.rows[0]
    assert row.status == "OK" and row.metrics is not None
    assert row.metrics.max_abs == 0 and row.metrics.new_nan == row.metrics.new_inf == 0

"""One training step: module output and parameter gradients, compared like activations."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import precision
from precision.runtime.runner import CaptureOptions, run_capture

from .conftest import T5

pytestmark = pytest.mark.slow


def step(tmp: Path, name: str, **kw: object) -> Path:
    opts = {"model": str(T5), "output": str(tmp / name), "backward": True,
            "max_new_tokens": 2} | kw
    return run_capture(CaptureOptions(**opts))  # type: ignore[arg-type]


def test_gradients_recorded_unscaled_and_compared(tmp_path: Path) -> None:
    base = step(tmp_path, "fp32.st")
    d = precision.load(base)
    meta = d.meta["backward"]
    assert math.isfinite(meta["loss"]) and meta["loss_scale"] == 1.0
    pgrads = [k for k in d.tensors if k.endswith(":pgrad")]
    assert len(pgrads) == meta["parameter_grads"] > 0
    assert "lm_head:grad.0" in d.tensors and d["shared.weight:pgrad"].dtype == np.float32
    half = step(tmp_path, "fp16.st", dtype="fp16", loss_scale=1024.0, replay=str(base))
    report = precision.compare(base, half)
    assert report, report.summary  # healthy fp16 step, loss scale divided out
    # the fixtures tie lm_head to the embedding: one parameter, named shared.weight
    row = next(r for r in report.rows if r.key == "shared.weight:pgrad")
    assert row.metrics is not None and row.metrics.rel_l2 < 0.0156
    unscaled = step(tmp_path, "fp16-1.st", dtype="fp16", replay=str(base))
    assert precision.compare(half, unscaled)  # scale 1024 and 1 agree once divided out


def test_fp16_gradient_overflow_is_found(tmp_path: Path) -> None:
    base = step(tmp_path, "fp32.st")
    huge = step(tmp_path, "huge.st", dtype="fp16", loss_scale=1e9, replay=str(base))
    report = precision.compare(base, huge)
    grads = [r for r in report.rows if ":grad" in r.key or ":pgrad" in r.key]
    assert any(r.status in ("OVERFLOW", "NAN") for r in grads)
    assert not report

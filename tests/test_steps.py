"""Decoding steps after the generations diverged (precision/judge/verdict/steps.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

import precision
from precision.judge.measure.generation import Divergence, GenerationMetrics
from precision.judge.measure.row import Row
from precision.judge.verdict.steps import after_divergence

from .conftest import QWEN

PER_STEP = {"generation": {"layers_per_step": True}}


def _rows(explained: bool | None) -> list[Row]:
    gen = GenerationMetrics(sequences=3, identical=2, topk_overlap=1.0, divergences=[
        Divergence(row=1, step=6, base_token=5, target_token=9, vllm_ok=explained,
                   near_tie=True, margin=0.01)])
    drift = Row(0, "model.embed_tokens:out#7", "DRIFT", "error 85 eps rms", (3, 1, 8),
                "float32", "bfloat16")
    return [Row(1, "model.embed_tokens:out#6", "DRIFT", "error 9 eps rms", (3, 1, 8),
                "float32", "bfloat16"), drift,
            Row(2, "model.norm:out#7", "NAN", "3 NaN", (3, 1, 8), "float32", "bfloat16"),
            Row(3, "generation:tokens", "OK", "", (3, 8), "int64", "int64", generation=gen)]


def test_steps_after_an_explained_divergence_are_not_judged() -> None:
    rows, notes = after_divergence(_rows(True), PER_STEP, PER_STEP)
    assert [r.status for r in rows] == ["DRIFT", "OK", "NAN", "OK"]  # step 6 read the same
    assert rows[1].reason.startswith("not judged: from decoding step 7 the runs read other "
                                     "tokens")
    assert notes == ["1 DRIFT record(s) of decoding steps 7 and later are not judged: the "
                     "generations diverged at step 6 (a near tie, within each other's top-N), "
                     "so those steps read other tokens"]


@pytest.mark.parametrize(("explained", "meta"), [(False, PER_STEP), (None, PER_STEP),
                                                 (True, {})])
def test_an_unexplained_divergence_or_one_forward_judges_every_row(
        explained: bool | None, meta: dict[str, object]) -> None:
    rows, notes = after_divergence(_rows(explained), meta, PER_STEP)
    assert [r.status for r in rows] == ["DRIFT", "DRIFT", "NAN", "OK"] and notes == []


def test_a_healthy_bf16_run_with_a_near_tie_passes_step_by_step(tmp_path: Path) -> None:
    """The tiny Qwen3 in bf16, layers per decoding step: one sequence picks another token at
    step 6 (within the fp32 run's top-N); step 7's records read other tokens and failed the
    run (55 DRIFT, first the embedding's output)."""
    from precision.runtime.run.runner import CaptureOptions, run_capture

    base = run_capture(CaptureOptions(model=str(QWEN), output=str(tmp_path / "b.st"),
                                      capture_steps=True))
    target = run_capture(CaptureOptions(model=str(QWEN), output=str(tmp_path / "t.st"),
                                        dtype="bf16", capture_steps=True, replay=str(base)))
    report = precision.compare(base, target)
    generation = next(r.generation for r in report.rows if r.generation is not None)
    if not generation.divergences:
        pytest.skip("the generations did not diverge on this machine's kernels")
    assert report, report.summary
    assert any("are not judged: the generations diverged at step" in n for n in report.notes)


def test_runs_recorded_per_step_and_in_one_forward_are_one_line(tmp_path: Path) -> None:
    """A --capture-steps baseline against a plain replay: the records share names but not
    what they hold (step 0's prompt against the whole sequence); it gave MISMATCH rows and
    455 MISSING."""
    import numpy as np

    from .conftest import write_dump

    x = {"a:out": np.ones(4, np.float32)}
    steps = write_dump(tmp_path / "steps.st", x, meta={"generation": {"layers_per_step": True}})
    whole = write_dump(tmp_path / "whole.st", x, meta={"generation": {"layers_per_step": False}})
    for a, b in ((steps, whole), (whole, steps)):
        with pytest.raises(precision.InputError, match=r"^steps.st recorded its layers per "
                                                       r"decoding step \(--capture-steps\) and "
                                                       r"whole.st in one forward"):
            precision.compare(a, b)
    assert precision.compare(steps, steps)

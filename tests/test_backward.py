"""One training step: module output and parameter gradients, compared like activations."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import precision
from precision.runtime.run.runner import CaptureOptions, run_capture

from .conftest import T5

pytestmark = pytest.mark.slow


def step(tmp: Path, name: str, **kw: object) -> Path:
    opts = {"model": str(T5), "output": str(tmp / name), "backward": True,
            "max_new_tokens": 2} | kw
    return run_capture(CaptureOptions(**opts))  # type: ignore[arg-type]


@pytest.mark.kernels
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
    assert row.metrics is not None and row.metrics.rel_l2 < report.profile.grad_rel_l2
    unscaled = step(tmp_path, "fp16-1.st", dtype="fp16", replay=str(base))
    assert precision.compare(half, unscaled)  # scale 1024 and 1 agree once divided out


def test_fp16_gradient_overflow_is_found(tmp_path: Path) -> None:
    base = step(tmp_path, "fp32.st")
    huge = step(tmp_path, "huge.st", dtype="fp16", loss_scale=1e9, replay=str(base))
    report = precision.compare(base, huge)
    grads = [r for r in report.rows if ":grad" in r.key or ":pgrad" in r.key]
    assert any(r.status in ("OVERFLOW", "NAN") for r in grads)
    assert not report


def test_padded_labels_stay_out_of_the_loss(tmp_path: Path) -> None:
    """A left-padded batch: the loss is the mean over real next tokens only, so a batch's
    gradients do not depend on how much padding it carries."""
    import torch
    import transformers

    from .conftest import QWEN

    out = run_capture(CaptureOptions(model=str(QWEN), output=str(tmp_path / "q.st"),
                                     backward=True, max_new_tokens=0,
                                     prompts=("hi", "a much longer prompt with more words")))
    d = precision.load(out)
    ids, mask = (torch.from_numpy(d[f"input:{k}"]) for k in ("input_ids", "attention_mask"))
    assert not mask.all()
    model = transformers.AutoModelForCausalLM.from_pretrained(QWEN).eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             targets.reshape(-1))
    everything = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert d.meta["backward"]["loss"] == pytest.approx(float(want), rel=1e-5)
    assert abs(float(everything) - float(want)) > 1e-3


def test_a_training_step_prints_no_torch_hook_warning(tmp_path: Path) -> None:
    """torch's 'Full backward hook is firing ... no inputs require gradients' (the modules
    fed token ids) leaked into every --backward capture; their gradients come regardless."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = step(tmp_path, "s.st", capture_steps=True)
    assert any(e.kind == "grad" and e.module.endswith("embed_tokens")
               for e in precision.load(path).entries)

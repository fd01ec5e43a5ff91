"""Generation capture and comparison: identical runs, near-tie flips, real divergences."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import precision
from precision.judge.measure.generation import compare_generation
from precision.runtime.run.runner import CaptureOptions, run_capture

from .conftest import QWEN, T5

MakeDump = Callable[..., Path]


def gen_dump(make_dump: MakeDump, name: str, tokens: list[list[int]],
             top: list[list[list[tuple[int, float]]]] | None = None) -> Path:
    """A synthetic dump with generated tokens and, optionally, per-step (id, logprob) top-k."""
    t: dict[str, np.ndarray] = {"generation:tokens": np.array(tokens, np.int64)}
    if top is not None:
        t["generation:topk_ids"] = np.array([[[i for i, _ in s] for s in r] for r in top])
        t["generation:topk_logprobs"] = np.array(
            [[[lp for _, lp in s] for s in r] for r in top], np.float32)
    return make_dump(name, t)


STEP = [(5, -0.1), (6, -2.5), (7, -3.0), (8, -4.0), (9, -5.0), (10, -6.0)]


def test_identical_generations_are_ok(make_dump: MakeDump) -> None:
    a = gen_dump(make_dump, "a.st", [[5, 5, 1]], [[STEP] * 3])
    report = precision.compare(a, a)
    row = report.rows[-1]
    assert row.key == "generation:tokens" and row.status == "OK"
    assert row.generation.identical == 1 and row.generation.topk_overlap == 1.0


def test_divergence_after_a_near_tie_passes_the_vllm_check(make_dump: MakeDump) -> None:
    tie_b = [(5, -0.700), (6, -0.702), (7, -3.0), (8, -4.0), (9, -5.0), (10, -6.0)]
    tie_t = [(6, -0.699), (5, -0.701), (7, -3.01), (8, -3.99), (9, -5.0), (10, -6.0)]
    a = gen_dump(make_dump, "a.st", [[5, 5, 1]], [[STEP, tie_b, STEP]])
    b = gen_dump(make_dump, "b.st", [[5, 6, 1]], [[STEP, tie_t, STEP]])
    g = compare_generation(precision.load(a), precision.load(b))
    d = g.divergences[0]
    assert (d.row, d.step, d.base_token, d.target_token, d.vllm_ok) == (0, 1, 5, 6, True)
    assert d.near_tie and d.margin == pytest.approx(0.002, abs=1e-6)  # <= 2 x 0.0049 x 1.7
    report = precision.compare(a, b, profile="fp16")
    assert report and "near-tie" in report.rows[-1].reason
    # the same gap is no tie for two fp32 runs: the allowance follows the dtype pair
    strict = compare_generation(precision.load(a), precision.load(b), tie_noise=128 * 2**-23)
    assert strict.divergences[0].near_tie is False


def test_token_outside_top_n_is_drift(make_dump: MakeDump) -> None:
    a = gen_dump(make_dump, "a.st", [[5, 5]], [[STEP, STEP]])
    b = gen_dump(make_dump, "b.st", [[5, 42]], [[STEP, [(42, -0.1), *STEP[1:]]]])
    report = precision.compare(a, b)
    row = report.rows[-1]
    assert row.status == "DRIFT" and "vLLM check fails" in row.reason and not report
    assert row.generation.divergences[0].vllm_ok is False


def test_beam_search_divergence_cannot_be_explained(make_dump: MakeDump) -> None:
    a = gen_dump(make_dump, "a.st", [[5, 5], [7, 7]])
    b = gen_dump(make_dump, "b.st", [[5, 6], [7, 7]])
    row = precision.compare(a, b).rows[-1]
    assert row.status == "DRIFT" and "beam search" in row.reason
    assert row.generation.identical == 1


def test_real_generation_capture_and_replay(tmp_path: Path) -> None:
    """Both fixtures generate; the target generates freely from the baseline's prompt."""
    for model, kind in ((T5, "encoder-decoder"), (QWEN, "causal-lm")):
        base = run_capture(CaptureOptions(model=str(model), output=str(tmp_path / "b.st"),
                                          max_new_tokens=5, force=True))
        tgt = run_capture(CaptureOptions(model=str(model), output=str(tmp_path / "t.st"),
                                         dtype="bf16", replay=str(base), force=True))
        d = precision.load(tgt)
        assert d.meta["model"]["kind"] == kind
        assert d["generation:tokens"].shape[1] <= 5
        assert d["generation:topk_logprobs"].shape[-1] == 20
        assert (np.diff(d["generation:topk_logprobs"], axis=-1) <= 0).all()  # sorted top-k
        row = precision.compare(base, tgt).rows[-1]
        assert row.key == "generation:tokens" and row.generation.sequences == 3


def test_recorded_top_k_ranks_what_the_decoder_chose_from(tmp_path: Path) -> None:
    """The top-k comes from the scores after the model's logits processors: a suppressed
    token (Whisper suppresses " (" and " [", which top its raw logits) is left out, and the
    greedy token is each step's first. Ranked on the raw logits, a healthy bf16 Whisper's
    near-tie between two allowed tokens failed the vLLM check."""
    import json
    import shutil

    model = tmp_path / "qwen"
    shutil.copytree(QWEN, model)
    opts = {"max_new_tokens": 3, "prompts": ("hello",), "force": True}
    base = precision.load(run_capture(CaptureOptions(model=str(model),
                                                     output=str(tmp_path / "a.st"), **opts)))
    top = int(base["generation:topk_ids"][0, 0, 0])
    assert top == int(base["generation:tokens"][0, 0])
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps(config | {"suppress_tokens": [top]}))
    d = precision.load(run_capture(CaptureOptions(model=str(model),
                                                  output=str(tmp_path / "b.st"), **opts)))
    tokens, ids = d["generation:tokens"], d["generation:topk_ids"]
    assert top not in ids and top not in tokens
    assert (ids[..., 0] == tokens).all()
    assert np.isfinite(d["generation:topk_logprobs"][ids >= 0]).all()


def test_beam_search_capture(tmp_path: Path) -> None:
    out = run_capture(CaptureOptions(model=str(T5), output=str(tmp_path / "beam.st"),
                                     max_new_tokens=4, num_beams=3))
    d = precision.load(out)
    assert d.meta["generation"]["num_beams"] == 3 and "generation:topk_ids" not in d.tensors
    assert d["generation:tokens"].shape[0] == 3


def test_per_step_series(make_dump: MakeDump) -> None:
    """Step 0: both agree; step 1: one of two diverges; step 2: only the survivor counts."""
    a = gen_dump(make_dump, "a.st", [[5, 5, 5], [5, 6, 7]], [[STEP] * 3, [STEP] * 3])
    b = gen_dump(make_dump, "b.st", [[5, 5, 5], [5, 9, 7]], [[STEP] * 3, [STEP] * 3])
    g = compare_generation(precision.load(a), precision.load(b))
    assert g.top1_per_step == [1.0, 0.5, 1.0] and g.topk_per_step == [1.0, 1.0, 1.0]
    assert [d.step for d in g.divergences] == [1]


def test_layer_outputs_per_decoding_step(tmp_path: Path) -> None:
    out = run_capture(CaptureOptions(model=str(QWEN), output=str(tmp_path / "s.st"),
                                     max_new_tokens=3, capture_steps=True))
    d = precision.load(out)
    calls = sorted({e.call for e in d.entries if e.key.startswith("lm_head:out")})
    steps = d.meta["generation"]["steps"]
    assert d.meta["generation"]["layers_per_step"] and calls == list(range(steps + 1))
    # the last call is the teacher-forced forward over prompt and generated tokens
    last = d[f"lm_head:out#{steps}"]
    assert last.shape[1] == d["input:input_ids"].shape[1]
    # step 0 embeds the whole prompt, later steps one new token each (KV cache on); the
    # LM head only scores the last position while generating
    assert d["model.embed_tokens:out"].shape[1] == d["generation:prompt_ids"].shape[1]
    assert all(d[f"model.embed_tokens:out#{s}"].shape[1] == 1 for s in range(1, steps))
    assert all(d[f"lm_head:out#{s}" if s else "lm_head:out"].shape[1] == 1
               for s in range(steps))

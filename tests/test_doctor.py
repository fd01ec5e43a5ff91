"""The fp16 overflow doctor: scan, isolate and suggest, on the encoder and a decoder overflow."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForSeq2SeqLM

import precision
from precision.cli import main
from precision.doctor.checks import generalise, scan_model, suggest
from precision.runtime.runner import CaptureOptions, run_capture

from .conftest import OVERFLOW_WO, T5, T5_OVERFLOW

WO = OVERFLOW_WO.split(":")[0]
DECODER_WO = "decoder.block.1.layer.2.DenseReluDense.wo"


@pytest.fixture(scope="module")
def decoder_overflow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The healthy T5 fixture with one decoder FFN output projection scaled by 2^16."""
    out = tmp_path_factory.mktemp("dec") / "tiny-flan-t5-decoder-overflow"
    model = AutoModelForSeq2SeqLM.from_pretrained(T5)
    with torch.no_grad():
        dict(model.named_modules())[DECODER_WO].weight.mul_(65536.0)
    model.save_pretrained(out)
    for f in T5.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out


def opts(model: Path, dtype: str, **kw: object) -> CaptureOptions:
    return CaptureOptions(**{"model": str(model), "output": "", "dtype": dtype} | kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------- scan


def test_scan_finds_the_producer_and_what_it_passes_on() -> None:
    report = scan_model(opts(T5_OVERFLOW, "fp16", keep_fp32=("none",)))
    assert not report
    assert report.producers[0].key == OVERFLOW_WO
    assert report.producers[0].status == "OVERFLOW" and report.producers[0].inf > 0
    parent = next(r for r in report.rows if r.key == "encoder.block.2.layer.1:out")
    assert parent.origin == "passes on"
    clamped = next(r for r in report.rows if r.key == "encoder.block.2:out.0")
    assert clamped.status == "SATURATED" and clamped.inf == 0 and clamped.saturated > 0
    assert "starts at " + OVERFLOW_WO in report.summary


def test_scan_of_fp32_run_predicts_fp16_overflow_with_exact_headroom(tmp_path: Path) -> None:
    report = scan_model(opts(T5_OVERFLOW, "fp32", output=str(tmp_path / "s.st")))
    row = next(r for r in report.rows if r.key == OVERFLOW_WO)
    assert row.status == "OVERFLOW" and row.beyond > 0 and row.headroom_bits < 0
    stats = precision.load(tmp_path / "s.st").entry(OVERFLOW_WO).stats
    assert row.headroom_bits == pytest.approx(math.log2(65504.0 / stats["absmax"]), rel=1e-12)
    assert report.rows[0].status == "OVERFLOW"  # worst first


def test_scan_no_false_alarm_on_healthy_fp16_and_bf16() -> None:
    for dtype in ("fp16", "bf16"):
        report = scan_model(opts(T5, dtype, keep_fp32=("none",)))
        assert report, report.summary
        assert report.against == ("float16" if dtype == "fp16" else "bfloat16")
        assert all(r.nan == r.inf == 0 for r in report.rows)


def test_scan_decoder_overflow(decoder_overflow: Path) -> None:
    report = scan_model(opts(decoder_overflow, "fp16", keep_fp32=("none",)))
    assert report.producers[0].key == DECODER_WO + ":out"
    assert not any(r.key.startswith("encoder.") for r in report.problems)


def test_scan_of_a_dump_without_inputs_and_flush_share(t5_runs: dict[str, Path]) -> None:
    report = precision.scan(precision.load(t5_runs["ofp16_none"]))
    first = min(report.producers, key=lambda r: r.order)
    assert first.key == OVERFLOW_WO and first.origin == "first seen"
    assert report.notes  # says how to tell producers apart
    assert all(r.flush_share is not None and 0 <= r.flush_share <= 1 for r in report.rows)


# ---------------------------------------------------------------- isolate


@pytest.fixture(scope="module")
def overflow_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("iso")
    base = run_capture(CaptureOptions(model=str(T5_OVERFLOW), output=str(d / "base.st"),
                                      inputs=("*",)))
    target = run_capture(CaptureOptions(model=str(T5_OVERFLOW), output=str(d / "t.st"),
                                        dtype="fp16", keep_fp32=("none",), replay=str(base)))
    return {"base": base, "target": target}


def test_isolate_names_the_culprit_and_the_inherited(overflow_runs: dict[str, Path]) -> None:
    report = precision.isolate(overflow_runs["base"], str(T5_OVERFLOW), dtype="fp16",
                               target=overflow_runs["target"])
    assert [r.key for r in report.culprits] == [OVERFLOW_WO]
    assert report.culprits[0].local.new_inf > 0
    q = next(r for r in report.rows if r.key == "encoder.block.3.layer.0.SelfAttention.q:out")
    assert q.verdict == "inherited" and q.local_status == "OK"
    assert q.accumulated is not None and q.accumulated.status == "DRIFT"
    norm = next(r for r in report.rows if r.key == "encoder.block.3.layer.0.layer_norm:out")
    assert norm.verdict == "inherited" and "does not fit fp16" in norm.local_reason
    assert report.skipped > 0  # attention blocks called with masks cannot run alone


def test_isolate_healthy_has_no_culprit_and_needs_inputs(overflow_runs: dict[str, Path],
                                                        t5_runs: dict[str, Path]) -> None:
    report = precision.isolate(overflow_runs["base"], str(T5_OVERFLOW), dtype="bf16")
    assert report and not report.culprits
    with pytest.raises(precision.InputError, match="--inputs"):
        precision.isolate(t5_runs["fp16"], str(T5), dtype="fp16")
    with pytest.raises(precision.InputError, match="different model"):
        precision.isolate(overflow_runs["base"], str(FIXTURE_QWEN), dtype="fp16")


FIXTURE_QWEN = T5.parent / "tiny-qwen3"


# ---------------------------------------------------------------- suggest


def test_suggest_fixes_the_planted_overflow_and_verifies_it() -> None:
    s = suggest(str(T5_OVERFLOW), dtype="fp16")
    assert s.fixed and s.policy == (WO,)
    assert not s.before and s.before.first_divergence.key == OVERFLOW_WO
    assert s.after and s.after.counts()["OVERFLOW"] == 0
    assert s.general == ("*.block.*.layer.*.DenseReluDense.wo",)
    assert s.general_report is not None and s.general_report
    table = dict((k, (b, a)) for k, b, a in s.table())
    assert table["verdict"] == ("FAIL", "PASS")
    # the policy works when applied from Python too
    model = AutoModelForSeq2SeqLM.from_pretrained(T5_OVERFLOW).half().eval()
    kept = precision.keep_fp32(model, list(s.general))
    assert WO in kept and len(kept) == 8  # 4 encoder + 4 decoder blocks
    ids = torch.tensor([[5, 6, 7, 1]])
    with torch.no_grad():
        out = model(input_ids=ids, decoder_input_ids=torch.tensor([[0, 5]]))
    assert torch.isfinite(out.logits).all()


def test_suggest_decoder_overflow(decoder_overflow: Path) -> None:
    s = suggest(str(decoder_overflow), dtype="fp16")
    assert s.fixed and s.policy == (DECODER_WO,)


def test_suggest_says_when_nothing_within_budget_fixes_it() -> None:
    s = suggest(str(T5_OVERFLOW), dtype="fp16", budget=0)
    assert not s.fixed and "budget of 0" in s.message and WO in s.message
    healthy = suggest(str(T5), dtype="fp16")
    assert healthy.fixed and healthy.policy == () and "nothing to fix" in healthy.message


def test_generalise() -> None:
    assert generalise(["encoder.block.2.layer.1.DenseReluDense.wo",
                       "decoder.block.3.layer.2.DenseReluDense.wo"]) == (
        "*.block.*.layer.*.DenseReluDense.wo",)
    assert generalise(["lm_head"]) == ("lm_head",)
    assert generalise(["model.layers.3.mlp.down_proj"]) == ("*.layers.*.mlp.down_proj",)


# ---------------------------------------------------------------- CLI


def test_cli_scan_suggest_isolate(tmp_path: Path, overflow_runs: dict[str, Path]) -> None:
    runner = CliRunner()
    r = runner.invoke(main, ["scan", "--model", str(T5_OVERFLOW), "--dtype", "fp16",
                             "--keep-fp32", "none", "-q", "--json", str(tmp_path / "s.json")])
    assert r.exit_code == 1 and OVERFLOW_WO in r.output
    assert '"passed": false' in (tmp_path / "s.json").read_text()
    assert runner.invoke(main, ["scan", "--model", str(T5), "-q"]).exit_code == 0
    r = runner.invoke(main, ["scan"])
    assert r.exit_code == 2 and "either a DUMP.st or --model" in r.output
    r = runner.invoke(main, ["suggest", "--model", str(T5_OVERFLOW), "--keep-fp32", "none",
                             "-q"])
    assert r.exit_code == 0 and ("--keep-fp32 none --keep-fp32 "
                                 "'*.block.*.layer.*.DenseReluDense.wo'") in r.output
    r = runner.invoke(main, ["suggest", "--model", str(T5_OVERFLOW), "--keep-fp32", "none",
                             "--budget", "0", "-q"])
    assert r.exit_code == 1
    r = runner.invoke(main, ["isolate", str(overflow_runs["base"]), "--model",
                             str(T5_OVERFLOW), "-q"])
    assert r.exit_code == 1 and "culprit: " + OVERFLOW_WO in r.output
    assert np.isfinite(precision.load(overflow_runs["base"])[OVERFLOW_WO]).all()


def test_results_render_in_jupyter(t5_runs: dict[str, Path]) -> None:
    report = precision.compare(t5_runs["obase"], t5_runs["ofp16_none"])
    page = report._repr_html_()
    assert page.startswith("<div>") and OVERFLOW_WO in page and "#cf222e" in page
    scan_page = precision.scan(precision.load(t5_runs["ofp16_none"]))._repr_html_()
    assert "SATURATED" in scan_page and "&lt;" not in OVERFLOW_WO

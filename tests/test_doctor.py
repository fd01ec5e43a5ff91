"""The fp16 overflow doctor: scan, isolate and suggest, on the encoder and a decoder overflow."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

import precision
from precision.cli import main
from precision.doctor.checks import generalise, scan_model, suggest
from precision.runtime.run.runner import CaptureOptions, run_capture

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


@pytest.mark.kernels
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


def test_scan_of_an_fp16_run_weighs_what_it_keeps_in_fp32_against_fp32(
        t5_runs: dict[str, Path]) -> None:
    """The overflow fixture in fp16 with --keep-fp32 auto keeps wo in fp32, whose output
    reaches 1.55e5 as fp32: no overflow (compare passes the run); scan said FAIL, weighing it
    against fp16's 65504. Asked for fp16 explicitly, every record is weighed against it."""
    dump = precision.load(t5_runs["ofp16_auto"])
    assert precision.compare(t5_runs["obase"], t5_runs["ofp16_auto"])
    report = precision.scan(dump)
    assert report, report.summary
    wo = next(r for r in report.rows if r.key == OVERFLOW_WO)
    assert wo.status == "OK" and wo.absmax is not None and wo.absmax > 65504
    assert any(n.endswith("are weighed against their own format's range, not fp16's "
                          "(against= fp16 weighs them too)") for n in report.notes)
    strict = precision.scan(dump, against="fp16")
    assert not strict and next(r for r in strict.rows if r.key == OVERFLOW_WO).status == \
        "OVERFLOW"
    assert not precision.scan(precision.load(t5_runs["ofp16_none"]))  # cast wholesale: fails


def test_scan_summary_names_what_went_wrong_and_no_headroom_without_a_finite_value(
        make_dump: Callable[..., Path]) -> None:
    """A record of NaN alone has no headroom to show ('-', not inf); the summary says which
    of overflow, saturation and NaN it found."""
    nan = np.full(8, np.nan, np.float32)
    ok = np.linspace(-2, 2, 8, dtype=np.float32)
    sat = np.array([65000.0, 1.0], np.float32)
    big = np.array([70000.0, 1.0], np.float32)
    only_nan = precision.scan(precision.load(make_dump("n.st", {"a:out": ok, "b:out": nan})))
    assert only_nan.summary == "FAIL [fp16]: 1 layer(s) hold NaN; it starts at b:out (NAN, " \
                               "first seen)"
    row = next(r for r in only_nan.rows if r.key == "b:out")
    assert row.absmax is None and row.headroom_text == "-"
    fine = next(r for r in only_nan.rows if r.key == "a:out")
    assert fine.headroom_text == f"{math.log2(65504 / 2):.1f}"
    both = precision.scan(precision.load(make_dump("s.st", {"a:out": big, "b:out": sat})))
    assert "2 layer(s) overflow or saturate; it starts at a:out" in both.summary
    three = precision.scan(precision.load(make_dump("t.st", {"a:out": big, "b:out": sat,
                                                             "c:out": nan})))
    assert "3 layer(s) overflow, saturate or hold NaN; it starts at c:out" in three.summary


def test_scan_table_shows_a_dash_for_headroom_without_a_finite_value(
        make_dump: Callable[..., Path]) -> None:
    path = make_dump("n.st", {"b:out": np.full(8, np.nan, np.float32)})
    result = CliRunner().invoke(main, ["scan", str(path)])
    assert result.exit_code == 1
    row = next(ln for ln in result.stdout.splitlines() if ln.split()[1:2] == ["b:out"]).split()
    assert row[2:5] == ["NAN", "-", "-"] and "inf" not in row[:5], row


# ---------------------------------------------------------------- isolate


def test_isolate_and_suggest_show_no_error_where_nothing_was_compared(
        capsys: pytest.CaptureFixture[str], make_dump: Callable[..., Path]) -> None:
    """An all-NaN output measures nothing: its rel_l2 shows '-', not 0 (which reads as
    exact), in isolate's table and HTML and in suggest's worst rel_l2."""
    from precision.doctor.isolation import IsolateReport
    from precision.doctor.isolation.report import IsolateRow
    from precision.judge.measure.metrics import compare_float
    from precision.judge.measure.row import Row
    from precision.judge.profiles import profile_for
    from precision.outputs.render import print_isolate

    nan = np.full(8, np.nan, np.float32)
    none = compare_float([(np.ones(8, np.float32), nan)], "float32", "float16")
    some = compare_float([(np.ones(8, np.float32), np.full(8, 1.5, np.float32))],
                         "float32", "float16")
    assert none.compared == 0 and none.rel_l2 == 0 and none.measured("rel_l2") is None
    assert some.measured("rel_l2") == pytest.approx(0.5, rel=1e-12)
    acc = Row(order=0, key="a:out", status="NAN", reason="8 NaN", shape=(8,),
              base_dtype="float32", target_dtype="float16", metrics=none)
    row = IsolateRow(order=0, key="a:out", local=none, local_status="NAN", local_reason="",
                     accumulated=acc, verdict="culprit")
    report = IsolateReport(profile=profile_for("float32", "float16"), rows=(row,), calls=1)
    print_isolate(report)
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("0 "))
    assert line.split()[:7] == ["0", "a:out", "culprit", "-", "NAN", "-", "NAN"], line
    assert "<td>culprit</td><td>-</td>" in report._repr_html_().replace(
        '<td style="color:#cf222e;font-weight:600">culprit</td>', "<td>culprit</td>")
    from precision.doctor.checks import Suggestion

    x = {"a:out": np.ones(8, np.float32)}
    before = precision.compare(make_dump("a.st", x), make_dump("b.st", {"a:out": nan}))
    assert [r.status for r in before.rows] == ["NAN"]
    table = Suggestion(fixed=False, policy=(), before=before, after=before, steps=()).table()
    assert ("worst rel_l2", "-", "-") in table



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
    assert report.culprits[0].local is not None and report.culprits[0].local.new_inf > 0
    q = next(r for r in report.rows if r.key == "encoder.block.3.layer.0.SelfAttention.q:out")
    assert q.verdict == "inherited" and q.local_status == "OK"
    assert q.accumulated is not None and q.accumulated.status == "DRIFT"
    norm = next(r for r in report.rows if r.key == "encoder.block.3.layer.0.layer_norm:out")
    assert norm.verdict == "inherited" and "does not fit fp16" in norm.local_reason
    assert "no worse than that implies" in norm.local_reason
    # blocks called with masks and position bias are re-run too: they enclose the culprit
    by_key = {r.key: r for r in report.rows}
    for key in ("encoder.block.2:out.0", "encoder.block.2.layer.1:out",
                "encoder.block.2.layer.1.DenseReluDense:out"):
        assert by_key[key].verdict == "encloses" and OVERFLOW_WO in by_key[key].local_reason
    assert by_key["encoder.block.3:out.0"].verdict == "inherited"
    assert by_key["decoder.block.1:out.0"].verdict in ("ok", "inherited")
    assert report.skipped == 0 and not report.unknown and not report


def test_isolate_healthy_has_no_culprit_and_needs_inputs(overflow_runs: dict[str, Path],
                                                        t5_runs: dict[str, Path],
                                                        make_dump: Callable[..., Path]) -> None:
    report = precision.isolate(overflow_runs["base"], str(T5_OVERFLOW), dtype="bf16")
    assert report and not report.culprits and report.summary.startswith("PASS")
    healthy = precision.isolate(t5_runs["base"], str(T5), dtype="fp16",
                                target=t5_runs["fp16"])
    assert healthy and {r.verdict for r in healthy.rows} == {"ok"}, healthy.summary
    assert any(r.key == "encoder.block.1:out.0" for r in healthy.rows)
    bare = make_dump("bare.st", {"encoder.block.0:out.0": np.zeros((1, 2, 4), np.float32)})
    with pytest.raises(precision.InputError, match="input:"):
        precision.isolate(bare, str(T5), dtype="fp16")
    with pytest.raises(precision.InputError, match="different model"):
        precision.isolate(overflow_runs["base"], str(FIXTURE_QWEN), dtype="fp16")


FIXTURE_QWEN = T5.parent / "tiny-qwen3"
#: the Qwen3 decoder layer whose own residual adds overflow fp16 (none of its submodules do)
QWEN_LAYER = 2


@pytest.fixture(scope="module")
def qwen_residual_overflow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-qwen3 with the residual stream's channel 0 at 40000 (embedding column 0) and
    layer 2's o_proj and down_proj each adding 15000 to it: the layer's two residual adds
    reach 70000, while its attention and MLP outputs stay at 15000."""
    out = tmp_path_factory.mktemp("qwen") / "tiny-qwen3-residual-overflow"
    model = AutoModelForCausalLM.from_pretrained(FIXTURE_QWEN).eval()
    layer = model.model.layers[QWEN_LAYER]
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])

    def mean_input(mod: torch.nn.Module) -> torch.Tensor:
        seen: list[torch.Tensor] = []
        handle = mod.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
        model(input_ids=ids, use_cache=False)
        handle.remove()
        return seen[0].reshape(-1, seen[0].shape[-1]).mean(0)

    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 40000.0
        for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
            u = mean_input(proj)  # (nearly) every token's input: the stream is all channel 0
            proj.weight[0] = 15000.0 * u / u.dot(u)
    model.save_pretrained(out)
    for f in FIXTURE_QWEN.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation")):
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def qwen_runs(qwen_residual_overflow: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> dict[str, Path]:
    """fp32 baseline (no --inputs: isolate needs only the model inputs) and fp16 target."""
    d = tmp_path_factory.mktemp("qruns")
    model = str(qwen_residual_overflow)
    base = run_capture(CaptureOptions(model=model, output=str(d / "base.st")))
    target = run_capture(CaptureOptions(model=model, output=str(d / "t.st"), dtype="fp16",
                                        keep_fp32=("none",), replay=str(base)))
    return {"base": base, "target": target}


def test_qwen_overflow_is_made_by_the_layer_not_its_submodules(
        qwen_residual_overflow: Path, qwen_runs: dict[str, Path]) -> None:
    """The premise, in fp32: the layer's input and every submodule output fit fp16, its
    output does not; and the fp16 run overflows there."""
    model = AutoModelForCausalLM.from_pretrained(qwen_residual_overflow).eval()
    name = f"model.layers.{QWEN_LAYER}"
    layer = model.model.layers[QWEN_LAYER]
    absmax: dict[str, float] = {}
    handles = [m.register_forward_hook(
        lambda _m, _a, o, n=n: absmax.__setitem__(n, float(o[0].abs().max()) if isinstance(
            o, tuple) else float(o.abs().max())))
        for n, m in layer.named_modules(prefix=name)]
    handles.append(layer.register_forward_pre_hook(
        lambda _m, a, k: absmax.__setitem__("input", float(
            (a[0] if a else k["hidden_states"]).abs().max())), with_kwargs=True))
    ids = torch.from_numpy(precision.load(qwen_runs["base"])["input:input_ids"])
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    subs = {n: v for n, v in absmax.items() if n.startswith(name + ".")}
    assert len(subs) >= 10 and max(subs.values()) < 65504 < absmax[name]
    assert absmax["input"] < 65504
    compared = precision.compare(qwen_runs["base"], qwen_runs["target"])
    assert compared.first_divergence.key == f"{name}:out"
    assert compared.first_divergence.status == "OVERFLOW"


def test_isolate_names_the_decoder_layer_whose_residual_add_overflows(
        qwen_residual_overflow: Path, qwen_runs: dict[str, Path]) -> None:
    report = precision.isolate(qwen_runs["base"], str(qwen_residual_overflow), dtype="fp16",
                               target=qwen_runs["target"])
    layer = f"model.layers.{QWEN_LAYER}:out"
    assert [r.key for r in report.culprits] == [layer], report.summary
    assert not report and report.summary.startswith(f"FAIL [fp32->fp16]: culprit: {layer}")
    assert report.culprits[0].local_status == "OVERFLOW"
    by_key = {r.key: r for r in report.rows}
    # every submodule of the layer was re-run, in range and fine alone
    subs = [r for k, r in by_key.items() if k.startswith(f"model.layers.{QWEN_LAYER}.")]
    assert len(subs) >= 10 and all(r.verdict == "ok" for r in subs)
    # the norm fed the overflowed stream inherits it, and says so
    norm = by_key["model.norm:out"]
    assert norm.verdict == "inherited" and "does not fit fp16" in norm.local_reason
    assert by_key[f"model.layers.{QWEN_LAYER + 1}:out"].verdict == "inherited"
    assert by_key["model:out.last_hidden_state"].verdict == "encloses"
    assert report.calls > 60 and report.skipped == 0 and not report.unknown
    page = report._repr_html_()
    assert "culprit" in page and "encloses" in page and f"model.layers.{QWEN_LAYER}:out" in page


def test_isolate_a_module_that_cannot_rerun_is_unknown_and_never_passes(
        qwen_residual_overflow: Path, qwen_runs: dict[str, Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer

    forward = Qwen3DecoderLayer.forward

    def no_half(self: Qwen3DecoderLayer, hidden_states: torch.Tensor, *args: object,
                **kwargs: object) -> torch.Tensor:
        if hidden_states.dtype == torch.float16 and self.self_attn.layer_idx == QWEN_LAYER:
            raise RuntimeError("no fp16 kernel for this op\n(second line)")
        return forward(self, hidden_states, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Qwen3DecoderLayer, "forward", no_half)
    report = precision.isolate(qwen_runs["base"], str(qwen_residual_overflow), dtype="fp16",
                               target=qwen_runs["target"])
    row = next(r for r in report.rows if r.key == f"model.layers.{QWEN_LAYER}:out")
    assert row.verdict == "unknown" and row.local is None
    assert row.local_reason == ("re-running it alone raised RuntimeError: no fp16 kernel for "
                                "this op")
    assert not report.culprits and report.unknown
    assert not report and report.summary.startswith("FAIL") and "PASS" not in report.summary
    assert "OVERFLOW/NAN" in report.summary and "could not be re-run" in report.summary
    assert any("full run in fp16 failed" in n for n in report.notes)
    # without a target run to say it overflowed, nothing alone is beyond the profile
    assert precision.isolate(qwen_runs["base"], str(qwen_residual_overflow), dtype="fp16")


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


def test_cli_isolate_decoder_layer_culprit(qwen_residual_overflow: Path,
                                           qwen_runs: dict[str, Path]) -> None:
    r = CliRunner().invoke(main, ["isolate", str(qwen_runs["base"]), "--model",
                                  str(qwen_residual_overflow), "--dtype", "fp16", "--target",
                                  str(qwen_runs["target"]), "-q"])
    assert r.exit_code == 1, r.output
    assert f"culprit: model.layers.{QWEN_LAYER}:out" in r.output and "PASS" not in r.output


def test_results_render_in_jupyter(t5_runs: dict[str, Path]) -> None:
    report = precision.compare(t5_runs["obase"], t5_runs["ofp16_none"])
    page = report._repr_html_()
    assert page.startswith("<div>") and OVERFLOW_WO in page and "#cf222e" in page
    scan_page = precision.scan(precision.load(t5_runs["ofp16_none"]))._repr_html_()
    assert "SATURATED" in scan_page and "&lt;" not in OVERFLOW_WO

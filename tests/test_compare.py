"""The compare engine: every verdict rule trips on a crafted case and stays quiet on noise."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner

from precision import DumpError, capture, compare, load
from precision.cli import main
from precision.errors import InputError
from precision.judge.profiles import profile_for

from .conftest import OVERFLOW_WO, QWEN, stats_of

RNG = np.random.default_rng(0)
MakeDump = Callable[..., Path]


def fp16_noise(a: np.ndarray) -> np.ndarray:
    """What a healthy fp16 run gives: the fp32 values rounded to fp16."""
    return a.astype(np.float16)


def pair(make_dump: MakeDump, key: str, a: np.ndarray, b: np.ndarray,
         tdtype: str = "float16", **kw: object) -> tuple[Path, Path]:
    return (make_dump("a.st", {key: a}, dtype="float32", **kw),
            make_dump("b.st", {key: b}, dtype=tdtype, **kw))


def status(report: object, key: str) -> str:
    return next(r.status for r in report.rows if r.key == key)  # type: ignore[attr-defined]


# ---------------------------------------------------------------- real fixtures


@pytest.mark.kernels
def test_healthy_fp16_and_bf16_are_clean(t5_runs: dict[str, Path]) -> None:
    for target in ("fp16", "bf16"):
        report = compare(t5_runs["base"], t5_runs[target])
        assert report, report.summary
        assert report.first_divergence is None
        assert {r.status for r in report.rows} == {"OK"}


@pytest.mark.parametrize("half", ["fp16", "bf16"])
def test_the_reference_note_names_the_half_precision_whichever_side_holds_it(
        t5_runs: dict[str, Path], half: str) -> None:
    """Without a reference, the note says which --expect to capture: the half precision of
    the pair, also when the arguments are swapped (--expect takes no fp32)."""
    for pair in ((t5_runs["base"], t5_runs[half]), (t5_runs[half], t5_runs["base"])):
        report = compare(*pair)
        told = [n for n in report.notes if "no same-precision reference" in n]
        assert len(told) == 1 and told[0].endswith(f"--expect {half}"), report.notes


def test_planted_overflow_is_the_first_divergence(t5_runs: dict[str, Path]) -> None:
    report = compare(t5_runs["obase"], t5_runs["ofp16_none"])
    assert not report
    first = report.first_divergence
    assert first is not None and first.key == OVERFLOW_WO and first.status == "OVERFLOW"
    assert first.metrics is not None and first.metrics.new_inf > 0
    # T5Block clamps the inf to ±64504: in fp32 its output aliases the FF output, in fp16
    # it is a new tensor, and that row must show the saturation
    clamp = next(r for r in report.rows if r.key == "encoder.block.2:out.0")
    assert clamp.status == "OVERFLOW" and clamp.metrics and clamp.metrics.saturated > 0
    assert clamp.metrics.new_inf == 0


def test_keep_fp32_auto_and_bf16_do_not_overflow(t5_runs: dict[str, Path]) -> None:
    assert compare(t5_runs["obase"], t5_runs["ofp16_auto"])
    assert compare(t5_runs["obase"], t5_runs["obf16"])


def test_logits_metrics_present_on_real_runs(t5_runs: dict[str, Path]) -> None:
    report = compare(t5_runs["base"], t5_runs["bf16"], topk=3)
    row = next(r for r in report.rows if r.logits is not None)
    assert row.key == "lm_head:out"
    assert row.logits.k == 3 and row.logits.positions == row.shape[0] * row.shape[1]
    assert 0 <= row.logits.kl_mean < 5e-3


def test_jobs_and_chunk_size_do_not_change_results(t5_runs: dict[str, Path],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # worker processes even for this small pair of dumps
    monkeypatch.setattr(sys.modules["precision.judge.compare"], "PARALLEL_MIN_ELEMENTS", 0)
    one = compare(t5_runs["obase"], t5_runs["ofp16_none"], jobs=1, chunk_elems=1 << 16)
    two = compare(t5_runs["obase"], t5_runs["ofp16_none"], jobs=2, chunk_elems=1000)
    assert [r.status for r in one.rows] == [r.status for r in two.rows]
    for r1, r2 in zip(one.rows, two.rows, strict=True):
        if r1.metrics:
            assert r2.metrics is not None
            assert r2.metrics.max_abs == r1.metrics.max_abs
            assert r2.metrics.rel_l2 == pytest.approx(r1.metrics.rel_l2, rel=1e-9, abs=1e-300)
    assert [r.key for r in one.rows] == [r.key for r in two.rows]


def _capture_qwen(path: Path, dtype: str, mode: str, mlp: str = "") -> Path:
    """The Qwen-style fixture on a left-padded batch, from Python; ``mlp`` replaces block
    2's MLP output with a new tensor: ``noise`` (8% relative noise on each element: a
    faulty kernel for the whole MLP) or ``copy`` (the same values: a healthy fused one)."""
    import torch
    import transformers

    from precision.dumps import reference_path

    tok = transformers.AutoTokenizer.from_pretrained(QWEN)
    tok.padding_side = "left"
    inputs = dict(tok(["hi", "a longer prompt, padded on the left, with more words in it"],
                      return_tensors="pt", padding=True))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        QWEN, dtype=getattr(torch, dtype)).eval()
    gen = torch.Generator().manual_seed(5)

    def replace_output(_m: object, _args: object, out: torch.Tensor) -> torch.Tensor:
        if mlp == "copy":
            return out.clone()
        return (out.float() * (1 + 0.08 * torch.randn(out.shape, generator=gen))).to(out.dtype)

    handles = [model.model.layers[2].mlp.register_forward_hook(replace_output)] if mlp else []
    with torch.no_grad(), capture(model, path, force=True, mode=mode):
        model(**inputs)
    for h in handles:
        h.remove()
    if dtype == "float32":  # the baseline's bf16 reference, where compare finds it
        _capture_qwen(reference_path(path, "bfloat16"), "bfloat16", mode)
    return path


@pytest.mark.parametrize("mode", ["full", "stats"])
def test_noise_in_a_whole_mlp_is_judged_against_the_reference(tmp_path: Path,
                                                               mode: str) -> None:
    """The MLP returns ``down_proj``'s tensor: the baseline and its reference store its
    output once, as an alias. A target whose MLP makes a new tensor (8% noise, down_proj
    healthy) is judged against the reference's measurement of that tensor, and the MLP is
    the first divergence; the fixed limits alone pass it (within 5 eps rms; in stats mode
    the norms agree), and so did compare while it had no reference row for the key."""
    mlp = "model.layers.2.mlp:out"
    base = _capture_qwen(tmp_path / "b.st", "float32", mode)
    assert load(base).entry(mlp).alias_of == "model.layers.2.mlp.down_proj:out"
    target = _capture_qwen(tmp_path / "t.st", "bfloat16", mode, "noise")
    fault = compare(base, target, jobs=1)
    first = fault.first_divergence
    assert first is not None and first.key == mlp, fault.summary
    assert first.status == "DRIFT" and "the reference's" in first.reason, first.reason
    if mode == "stats":
        assert "count sketch" in first.reason
    assert status(compare(base, target, jobs=1, auto_reference=False), mlp) == "OK"
    # healthy: the same aliasing as the baseline, or a new tensor holding the same values
    for name, how in (("h.st", ""), ("c.st", "copy")):
        healthy = compare(base, _capture_qwen(tmp_path / name, "bfloat16", mode, how), jobs=1)
        assert healthy, healthy.summary
        assert (mlp in [r.key for r in healthy.rows]) == (how == "copy")


# ---------------------------------------------------------------- verdict rules


def test_noise_of_the_dtype_is_ok(make_dump: MakeDump) -> None:
    a = RNG.standard_normal(4096).astype(np.float32)
    assert compare(*pair(make_dump, "x:out", a, fp16_noise(a)))
    bf = a.astype(ml_dtypes.bfloat16)
    assert compare(*pair(make_dump, "x:out", a, bf, "bfloat16"))


def test_norm_drift_trips_and_just_below_does_not(make_dump: MakeDump) -> None:
    a = RNG.standard_normal(4096).astype(np.float32)
    tol = profile_for("float32", "float16").noise_rms
    direction = RNG.standard_normal(4096)
    direction *= np.linalg.norm(a) / np.linalg.norm(direction)
    over = (a + 2.0 * tol * direction).astype(np.float32)
    under = (a + 0.5 * tol * direction).astype(np.float32)
    assert status(compare(*pair(make_dump, "x:out", a, over, "float32",
                                meta={"dtype": "float16"})), "x:out") == "DRIFT"
    assert status(compare(*pair(make_dump, "x:out", a, under, "float32",
                                meta={"dtype": "float16"})), "x:out") == "OK"


def test_sparse_outlier_trips_although_the_norm_is_fine(make_dump: MakeDump) -> None:
    """A moved position bucket: two entries take a neighbour's value; norms barely move."""
    a = RNG.standard_normal(256 * 256).astype(np.float32)
    b = a.copy()
    b[[5, 900]] += np.float32(1.0)  # about one RMS off, on 2 of 65536 entries
    report = compare(*pair(make_dump, "x:out", a, b, "float32", meta={"dtype": "float16"}))
    row = report.rows[0]
    assert row.metrics.noise_rms < profile_for("float32", "float16").noise_rms
    assert row.status == "DRIFT" and "outlier" in row.reason


def test_new_inf_and_saturation_are_overflow(make_dump: MakeDump) -> None:
    a = RNG.standard_normal(1000).astype(np.float32) * 10
    a[3] = 70000.0
    with np.errstate(over="ignore"):
        b_inf = a.astype(np.float16)  # 70000 -> inf
    assert np.isinf(b_inf[3])
    assert status(compare(*pair(make_dump, "x:out", a, b_inf)), "x:out") == "OVERFLOW"
    b_clamped = b_inf.copy()
    b_clamped[3] = 64512.0  # transformers' T5 clamp
    report = compare(*pair(make_dump, "x:out", a, b_clamped))
    assert report.rows[0].status == "OVERFLOW" and report.rows[0].metrics.saturated == 1
    # a genuine large value that fp16 holds is not an overflow
    a_ok = a.copy()
    a_ok[3] = 64000.0
    assert status(compare(*pair(make_dump, "x:out", a_ok, a_ok.astype(np.float16))),
                  "x:out") == "OK"


def test_new_nan_is_nan_shared_nan_is_excluded_baseline_nan_is_flagged(
        make_dump: MakeDump) -> None:
    a = RNG.standard_normal(100).astype(np.float32)
    b = fp16_noise(a)
    b[7] = np.nan
    assert status(compare(*pair(make_dump, "x:out", a, b)), "x:out") == "NAN"
    a2 = a.copy()
    a2[7] = np.nan
    report = compare(*pair(make_dump, "x:out", a2, b))  # NaN at the same place in both
    assert report.rows[0].status == "OK" and report.rows[0].metrics.nan_base == 1
    assert any("both runs hold NaN/inf at the same places" in w for w in report.warnings)
    swapped = compare(*pair(make_dump, "x:out", a2, fp16_noise(a)))  # only the baseline
    assert swapped.rows[0].status == "NAN" and "swapped" in swapped.rows[0].reason
    assert any("arguments may be swapped" in w for w in swapped.warnings)


def test_masked_position_bias_is_excluded(make_dump: MakeDump) -> None:
    """T5's bias with the mask folded in: finfo.min in fp32, -inf/-65504 in fp16."""
    bias = RNG.standard_normal((1, 4, 8, 8)).astype(np.float32)
    a = bias.copy()
    a[..., 6:] = np.finfo(np.float32).min
    b = fp16_noise(bias)
    b[..., 6:] = -np.inf
    b[..., 7:] = np.float16(-65504)
    report = compare(*pair(make_dump, "pb:out", a, b))
    row = report.rows[0]
    assert row.status == "OK", row.reason
    assert row.metrics.masked == 4 * 8 * 2 and row.metrics.compared == 4 * 8 * 6


def test_integer_bucket_ids_compare_exactly(make_dump: MakeDump) -> None:
    ids = RNG.integers(0, 32, (16, 16))
    moved = ids.copy()
    moved[3, 9] += 1
    key = "enc.relative_attention_bias:in.0"
    assert status(compare(*pair(make_dump, key, ids, ids)), key) == "OK"
    report = compare(*pair(make_dump, key, ids, moved))
    assert report.rows[0].status == "DRIFT" and report.rows[0].exact.mismatched == 1


def test_different_inputs_are_a_mismatch_with_advice(make_dump: MakeDump) -> None:
    ids = RNG.integers(0, 100, (2, 5))
    report = compare(*pair(make_dump, "input:input_ids", ids, ids + 1))
    assert report.rows[0].status == "MISMATCH" and not report
    assert any("--replay" in w for w in report.warnings)


def test_missing_and_shape_and_kind_mismatch(make_dump: MakeDump) -> None:
    x = np.ones((2, 3), np.float32)
    a = make_dump("a.st", {"only_a:out": x, "s:out": x, "k:out": x})
    b = make_dump("b.st", {"s:out": np.ones((3, 2), np.float32), "k:out": x.astype(np.int64),
                           "only_b:out": x})
    report = compare(a, b)
    got = {r.key: r.status for r in report.rows}
    assert got == {"only_a:out": "MISSING", "s:out": "MISMATCH", "k:out": "MISMATCH",
                   "only_b:out": "MISSING"}
    assert report.fail_on == "drift" and not report  # mismatches fail
    assert not compare(a, b, fail_on="any")
    assert compare(a, b, fail_on="overflow")


def test_logits_kl_and_top1_rules(make_dump: MakeDump) -> None:
    logits = RNG.standard_normal((4, 8, 50)).astype(np.float32) * 3
    quiet = compare(*pair(make_dump, "lm:out", logits, fp16_noise(logits),
                          logits_key="lm:out"))
    assert quiet and quiet.rows[0].logits.top1_agreement == 1.0
    flipped = logits.copy()
    flipped[..., 0] = logits.max(axis=-1) + 5  # every position now prefers token 0
    report = compare(*pair(make_dump, "lm:out", logits, flipped.astype(np.float16),
                           logits_key="lm:out"))
    assert report.rows[0].status == "DRIFT" and len(report.rows[0].logits.flips) > 0


def test_stats_only_dumps_prove_drift_or_say_they_cannot(make_dump: MakeDump) -> None:
    a = RNG.standard_normal(1000).astype(np.float32)
    close = fp16_noise(a).astype(np.float32)
    far = a * 1.5
    base = make_dump("a.st", {}, stats={"x:out": stats_of(a)})
    ok = make_dump("b.st", {}, dtype="float16", stats={"x:out": stats_of(close)})
    bad = make_dump("c.st", {}, dtype="float16", stats={"x:out": stats_of(far)})
    r_ok = compare(base, ok)
    assert r_ok and "cannot rule out" in r_ok.rows[0].reason
    assert status(compare(base, bad), "x:out") == "DRIFT"
    # mixed: full baseline against a stats-only target
    full = make_dump("d.st", {"x:out": a})
    assert status(compare(full, bad), "x:out") == "DRIFT"
    inf = a.copy()
    inf[0] = np.inf
    assert status(compare(base, make_dump("e.st", {}, dtype="float16",
                                          stats={"x:out": stats_of(inf)})), "x:out") == "OVERFLOW"


def test_different_models_are_refused(make_dump: MakeDump) -> None:
    x = {"x:out": np.ones(3, np.float32)}
    a = make_dump("a.st", x)
    b = make_dump("b.st", x, meta={"model": {"class": "Other", "config_hash": "abc"}})
    with pytest.raises(DumpError, match="different models"):
        compare(a, b)
    assert compare(a, b, allow_different_models=True)


# ---------------------------------------------------------------- CLI


def test_cli_exit_codes_json_and_markdown(t5_runs: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(main, ["compare", str(t5_runs["base"]), str(t5_runs["fp16"]), "-q"])
    assert ok.exit_code == 0 and ok.output.startswith("PASS")
    js, md = tmp_path / "r.json", tmp_path / "r.md"
    bad = runner.invoke(main, ["compare", str(t5_runs["obase"]), str(t5_runs["ofp16_none"]),
                               "--json", str(js), "--markdown", str(md), "--only-flagged"])
    assert bad.exit_code == 1
    assert "first divergence at " + OVERFLOW_WO in bad.output
    doc = json.loads(js.read_text())
    assert doc["schema_version"] == 1 and doc["passed"] is False
    assert doc["first_divergence"] == OVERFLOW_WO
    assert doc["rows"][0]["metrics"] is not None or doc["rows"][0]["exact"] is not None
    assert OVERFLOW_WO in md.read_text()
    never = runner.invoke(main, ["compare", str(t5_runs["obase"]), str(t5_runs["ofp16_none"]),
                                 "--fail-on", "never", "-q"])
    assert never.exit_code == 0
    nan_only = runner.invoke(main, ["compare", str(t5_runs["obase"]),
                                    str(t5_runs["ofp16_none"]), "--fail-on", "nan", "-q"])
    assert nan_only.exit_code == 0  # the overflow is clamped: no NaN reaches any layer
    strict = runner.invoke(main, ["compare", str(t5_runs["base"]), str(t5_runs["bf16"]),
                                  "--profile", "fp16", "-q"])
    assert strict.exit_code == 1  # bf16 noise judged by the fp16 profile is drift


def test_markdown_renders_a_table_and_says_what_it_leaves_out(t5_runs: dict[str, Path],
                                                              tmp_path: Path) -> None:
    """The quoted notes ran into the table (no blank line: no table in CommonMark with
    tables), and rows past the 20th were left out without a word; --top was ignored."""
    from markdown_it import MarkdownIt

    md = tmp_path / "pr.md"
    args = ["compare", str(t5_runs["obase"]), str(t5_runs["ofp16_none"]), "--markdown", str(md)]
    report = compare(t5_runs["obase"], t5_runs["ofp16_none"])
    flagged = sum(r.flagged for r in report.rows)
    assert flagged > 3 and report.notes
    for extra, shown in (([], min(20, flagged)), (["--top", "3"], 3)):
        assert CliRunner().invoke(main, args + extra + ["--force", "-q"]).exit_code == 1
        text = md.read_text()
        html = MarkdownIt("commonmark").enable("table").render(text)
        assert html.count("<table>") == 1 and html.count("<tr>") == shown + 1  # the header
        left = flagged - shown
        assert (f"... and {left} more flagged rows" in text) == (left > 0)


def test_report_to_pandas(t5_runs: dict[str, Path]) -> None:
    pytest.importorskip("pandas")
    df = compare(t5_runs["base"], t5_runs["fp16"]).to_pandas()
    assert {"key", "status", "rel_l2", "one_minus_cos"} <= set(df.columns)
    assert (df["status"] == "OK").all()


def test_module_inputs_on_one_side_only_are_not_missing(make_dump: MakeDump) -> None:
    x = RNG.standard_normal(10).astype(np.float32)
    a = make_dump("a.st", {"m:out": x, "m:in.0": x})
    b = make_dump("b.st", {"m:out": x.astype(np.float16)}, dtype="float16")
    assert [r.key for r in compare(a, b).rows] == ["m:out"]
    c = make_dump("c.st", {"m:out": x, "input:input_ids": np.arange(3)})
    assert status(compare(c, a), "input:input_ids") == "MISSING"  # model inputs still count


def test_subnormals_have_defined_metrics(make_dump: MakeDump) -> None:
    """fp32 subnormals that fp16 flushes to zero: compared, ULP at fp16's subnormal spacing."""
    a = np.array([1e-40, -3e-39, 2e-45, 1.0], np.float32)  # three fp32 subnormals
    b = a.astype(np.float16)  # all three flush to 0 in fp16
    assert (b[:3] == 0).all()
    row = compare(*pair(make_dump, "x:out", a, b)).rows[0]
    m = row.metrics
    assert row.status == "OK" and m.compared == 4 and not np.isnan(m.rel_l2)
    assert m.max_abs == pytest.approx(3e-39, rel=1e-6)
    assert m.max_ulp == pytest.approx(3e-39 / 2.0**-24, rel=1e-6)  # fp16 subnormal spacing


# ---------------------------------------------------------------- padding (no model needed)

#: left padding, as a decoder's batch carries it: 2, 0 and 3 pad positions
PAD_MASK = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]], np.int64)


def _garbage_at_pads(x: np.ndarray, axis: int, rng: np.random.Generator,
                     special: bool) -> np.ndarray:
    """``x`` with its padded positions (``PAD_MASK`` along token ``axis``) overwritten by
    noise of scale 1e4, and inf, -inf and NaN in some of them when ``special``."""
    out = x.copy()
    pad = np.moveaxis(out, axis, 1)  # a view: [batch, seq, ...]
    where = PAD_MASK == 0
    noise = rng.standard_normal(pad[where].shape).astype(out.dtype) * 1e4
    if special:
        noise.reshape(noise.shape[0], -1)[:, :3] = [np.inf, -np.inf, np.nan]
    pad[where] = noise
    return out


def _padded_pair(make_dump: MakeDump, mask: np.ndarray | None,
                 decoder: bool = False) -> tuple[Path, Path]:
    """A baseline and a target that agree (to fp32 rounding) on every real token and hold
    different garbage at every padded position: 1e4 noise (alone in the ``[batch, seq,
    hidden]`` record, so judging it fails by size, not by NaN), and inf, -inf and NaN in the
    target's attention-layout record (``[batch, heads, seq, head_dim]``) and logits.
    ``mask`` is the recorded attention mask (None: none recorded). ``decoder``: an
    encoder-decoder's ``decoder.*`` records, whose positions ``decoder_attention_mask``
    says."""
    rng = np.random.default_rng(30)
    stack = "decoder.block.0" if decoder else "model.layers.0"
    clean = {f"{stack}:out": (rng.standard_normal((3, 6, 16)), 1),
             f"{stack}.self_attn.q_norm:out": (rng.standard_normal((3, 4, 6, 8)), 2),
             "lm_head:out": (rng.standard_normal((3, 6, 32)) * 3, 1)}  # (values, token axis)
    base, target = {}, {}
    for key, (x, axis) in clean.items():
        close = x * (1 + rng.standard_normal(x.shape) * 1e-7)
        base[key] = _garbage_at_pads(x.astype(np.float32), axis, rng, special=False)
        target[key] = _garbage_at_pads(close.astype(np.float32), axis, rng,
                                       special=key != f"{stack}:out")
    inputs: dict[str, np.ndarray] = {}
    ids = rng.integers(3, 100, PAD_MASK.shape)
    if decoder:
        inputs["input:input_ids"] = ids[:, :4]
        inputs["input:attention_mask"] = np.ones((3, 4), np.int64)
        inputs["input:decoder_input_ids"] = ids
        if mask is not None:
            inputs["input:decoder_attention_mask"] = mask
    else:
        inputs["input:input_ids"] = ids
        if mask is not None:
            inputs["input:attention_mask"] = mask
    return (make_dump("a.st", inputs | base, logits_key="lm_head:out"),
            make_dump("b.st", inputs | target, logits_key="lm_head:out"))


@pytest.mark.parametrize("decoder", [False, True], ids=["decoder-only", "encoder-decoder"])
def test_garbage_at_padded_positions_changes_no_verdict(make_dump: MakeDump,
                                                        decoder: bool) -> None:
    """Padded positions are don't-care values (DOMAIN.md: 21,753 apart between two healthy
    attention kernels at depth): 1e4 noise, inf and NaN there, different on each side, leave
    every record and the logits OK, judged on the real tokens only."""
    report = compare(*_padded_pair(make_dump, PAD_MASK, decoder), jobs=1)
    assert report, [(r.key, r.status, r.reason) for r in report.rows]
    judged = [r for r in report.rows if r.metrics is not None and r.key.endswith(":out")]
    assert len(judged) == 3
    real = int(PAD_MASK.sum())
    for r in judged:
        assert r.status == "OK" and r.metrics is not None, (r.key, r.reason)
        width = int(np.prod(r.shape)) // PAD_MASK.size  # elements per token
        assert r.metrics.numel == real * width and r.metrics.padded == (18 - real) * width
        assert r.metrics.nan_target == r.metrics.inf_target == 0, r.key
    lg = next(r.logits for r in report.rows if r.logits is not None)
    assert lg is not None
    assert (lg.positions, lg.padded, lg.top1_agreement) == (real, 18 - real, 1.0)
    assert lg.kl_max < 1e-9
    assert np.isnan(np.asarray(lg.kl_per_position)[PAD_MASK.reshape(-1) == 0]).all()
    assert any("padding left out: 3 record(s)" in n for n in report.notes), report.notes


@pytest.mark.filterwarnings("error")  # +inf in judged logits is NaN, quietly
@pytest.mark.parametrize("mask", ["all real", "none recorded"])
def test_with_the_mask_off_the_same_garbage_fails(make_dump: MakeDump, mask: str) -> None:
    """The same dumps with every position real (or no mask recorded): the garbage is judged,
    and every record with it fails, the logits too. So the test above passes because the
    padding is left out, not because the garbage is too small to see."""
    base, target = _padded_pair(make_dump, np.ones_like(PAD_MASK) if mask == "all real"
                                else None)
    report = compare(base, target, jobs=1)
    assert not report
    for key in ("model.layers.0:out", "model.layers.0.self_attn.q_norm:out", "lm_head:out"):
        assert status(report, key) != "OK", key
    assert not any("padding left out" in n for n in report.notes)


def test_python_errors_name_keyword_arguments(t5_runs: dict[str, Path]) -> None:
    """From Python, a bad option is named as the keyword argument it is, not as a flag."""
    from precision.errors import InputError

    with pytest.raises(InputError, match=r"^fail_on='nans': choose one of"):
        compare(t5_runs["base"], t5_runs["fp16"], fail_on="nans")
    with pytest.raises(InputError, match=r"^jobs=0: use 1 or more"):
        compare(t5_runs["base"], t5_runs["fp16"], jobs=0)


def test_a_run_compared_with_itself_is_a_warning(make_dump: Callable[..., Path],
                                                 tmp_path: Path) -> None:
    x = {"a:out": np.linspace(-1, 1, 8, dtype=np.float32)}
    a = make_dump("a.st", x)
    link = tmp_path / "link.st"
    link.symlink_to(a)
    for other in (a, link):
        assert any("are the same file" in w for w in compare(a, other).warnings)
    copy = tmp_path / "copy.st"  # a deterministic run twice is the same bytes: no warning
    copy.write_bytes(a.read_bytes())
    report = compare(a, copy)
    assert report and not any("itself" in w for w in report.warnings)


def test_runs_of_empty_records_alone_say_so(make_dump: Callable[..., Path]) -> None:
    empty = {"e:out": np.zeros((0, 4), np.float32)}
    a, b = make_dump("a.st", empty), make_dump("b.st", empty, dtype="float16")
    with pytest.raises(DumpError, match=r"hold only empty float records \(1, first e:out: "
                                        r"shape \[0, 4\]\)"):
        compare(a, b)
    both = {"e:out": np.zeros((0, 4), np.float32), "n:out": np.full(3, np.nan, np.float32)}
    a, b = make_dump("c.st", both), make_dump("d.st", both)
    with pytest.raises(DumpError, match="first n:out: NaN or inf in both"):
        compare(a, b)


def test_a_reference_of_other_inputs_is_not_used(make_dump: Callable[..., Path],
                                                  tmp_path: Path) -> None:
    """A sibling reference left from an earlier baseline (other prompts) made 85 DRIFT rows
    vanish, and a planted 3% fault pass: it is now left out with a warning, and one given
    by --reference is refused."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(4096).astype(np.float32)
    ids = np.array([[5, 6, 7]], np.int64)

    def run(name: str, values: np.ndarray, token: int, dtype: str = "float16") -> Path:
        return make_dump(name, {"input:input_ids": ids + np.array([[0, 0, token]]),
                                "m:out": values.astype(dtype)}, dtype=dtype)

    base = run("a.st", x, 0, "float32")
    faulty = run("t.st", x * 1.03, 0)  # a 3% fault: far beyond fp16's rounding
    loose = (x + rng.standard_normal(4096).astype(np.float32) * 0.05).astype(np.float16)
    for token, used in ((0, True), (1, False)):
        ref = run("a.fp16-reference.st", loose, token)
        report = compare(base, faulty)
        stale = [w for w in report.warnings if "not its run in another precision" in w]
        assert bool(stale) != used
        assert bool(report) == used  # the stale reference's own error would excuse the fault
        if not used:
            assert "input:input_ids holds other values" in stale[0]
            assert "--expect fp16" in stale[0]
            with pytest.raises(InputError, match="is not the baseline's run"):
                compare(base, faulty, reference=ref)
        ref.unlink()


def test_rtol_is_a_hard_limit_with_a_reference_too(make_dump: Callable[..., Path]) -> None:
    """With a reference found, --rtol was ignored for every record it measured, though the
    summary said '+rtol': a CI job that tightened it got no tightening."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(4096).astype(np.float32)
    base = make_dump("a.st", {"m:out": x})
    noisy = [(x * (1 + rng.standard_normal(4096) * 2**-10)).astype(np.float16) for _ in "rt"]
    make_dump("a.fp16-reference.st", {"m:out": noisy[0]}, dtype="float16")
    target = make_dump("t.st", {"m:out": noisy[1]}, dtype="float16")
    loose = compare(base, target)
    assert loose and any("judged against a.fp16-reference.st" in n for n in loose.notes)
    error = loose.rows[0].metrics.noise_rms
    assert compare(base, target, rtol=2 * error)
    tight = compare(base, target, rtol=error / 2)
    assert not tight and tight.rows[0].status == "DRIFT"
    assert "eps rms (element-scaled) >" in tight.rows[0].reason


def test_a_row_with_nothing_compared_has_no_growth(make_dump: Callable[..., Path]) -> None:
    """A NaN row (rel_l2 null in the JSON) had growth 0.0."""
    x = np.linspace(-1, 1, 64, dtype=np.float32)
    base = make_dump("a.st", {"a:out": x, "b:out": x, "c:out": x})
    y = (x * 1.001).astype(np.float16)
    target = make_dump("t.st", {"a:out": y, "b:out": np.full(64, np.nan, np.float16),
                                "c:out": (x * 1.002).astype(np.float16)}, dtype="float16")
    rows = {r.key: r for r in compare(base, target).rows}
    assert rows["b:out"].status == "NAN" and rows["b:out"].growth is None
    c, a = rows["c:out"].metrics.rel_l2, rows["a:out"].metrics.rel_l2
    assert rows["c:out"].growth == pytest.approx(c / a)


def test_generations_of_other_sizes_say_so(make_dump: Callable[..., Path]) -> None:
    """A vLLM logprobs file with 3 of 8 sequences passed as 'all 3 sequences identical': it
    is a MISMATCH (sequences pair by position). One of other length (4 of 8 steps, or
    another max_tokens) is compared over the steps both made, and says so."""
    x = {"m:out": np.linspace(-1, 1, 16, dtype=np.float32)}
    tokens = np.arange(64, dtype=np.int64).reshape(8, 8)
    base = make_dump("a.st", x | {"generation:tokens": tokens})
    target = make_dump("t3.st", x | {"generation:tokens": tokens[:3]})
    report = compare(base, target)
    row = next(r for r in report.rows if r.key == "generation:tokens")
    assert row.status == "MISMATCH" and not report
    assert "8 sequence(s) in the baseline, 3 in the target" in row.reason
    short = make_dump("t4.st", x | {"generation:tokens": tokens[:, :4]})
    row = next(r for r in compare(base, short).rows if r.key == "generation:tokens")
    assert row.status == "OK" and row.reason.endswith(
        "over the 4 step(s) both made (the baseline goes on to 8)")
    whole = make_dump("w.st", x | {"generation:tokens": tokens.copy()})
    row = next(r for r in compare(base, whole).rows if r.key == "generation:tokens")
    assert row.status == "OK" and "step(s) both made" not in row.reason


def test_a_reference_fed_float_inputs_cast_to_its_dtype_is_used(
        make_dump: Callable[..., Path]) -> None:
    """Float inputs are the baseline's cast to the reference's dtype: embeddings of 0.002
    (fp16 subnormals), values beyond fp16 and float32-minimum masks (inf once cast) made a
    true --expect reference look like one of other inputs."""
    rng = np.random.default_rng(2)
    embeds = (rng.standard_normal((2, 8, 16)) * 2e-5).astype(np.float32)
    embeds[0, 0, :3] = (1e5, np.finfo(np.float32).min, 3e-8)
    x = rng.standard_normal(256).astype(np.float32)
    base = make_dump("a.st", {"input:inputs_embeds": embeds, "m:out": x})
    for dtype in ("float16", "bfloat16"):
        with np.errstate(over="ignore"):  # 1e5 is inf in fp16, as a capture casts it
            cast = embeds.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16)
        ref = make_dump(f"a.{dtype[:2]}16-ref.st", {"input:inputs_embeds": cast,
                                                   "m:out": x.astype(cast.dtype)}, dtype=dtype)
        report = compare(base, ref, reference=ref)  # refused were it judged another run
        assert not any("not its run" in w for w in report.warnings)
        moved = cast.copy()
        moved[1, 1, 1] *= 2
        other = make_dump(f"o{dtype}.st", {"input:inputs_embeds": moved,
                                          "m:out": x.astype(cast.dtype)}, dtype=dtype)
        with pytest.raises(InputError, match="input:inputs_embeds holds other values"):
            compare(base, ref, reference=other)

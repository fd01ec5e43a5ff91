"""One set of comparison options: `precision compare`, `precision report` and
`precision.compare` take the same ones (precision/judge/options.py, precision/commands/options.py),
and report's act as compare's do."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import click
import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner

import precision
from precision.cli import main
from precision.commands.options import ComparisonOption
from precision.judge import compare as judge_compare
from precision.judge.options import CompareOptions
from precision.judge.report import FAIL_ON

#: each command's own options (its outputs); every other option is a comparison option
OWN = {"compare": {"base", "target", "json_out", "md_out", "only_flagged", "top", "force",
                   "quiet"},
       "report": {"base", "target", "output", "md_out", "force"}}


def _comparison_options(name: str) -> dict[str, dict[str, Any]]:
    command = main.commands[name]
    assert isinstance(command, click.Command)
    return {p.name or "": p.to_info_dict() for p in command.params if p.name not in OWN[name]}


def test_compare_and_report_offer_the_same_comparison_options() -> None:
    """An option added to one command only (not to precision/commands/options.py) fails here:
    declare it there, or, if it is an output of that command alone, in OWN above."""
    compare, report = _comparison_options("compare"), _comparison_options("report")
    assert compare == report
    # one flag per CompareOptions field, each named after its field
    assert set(compare) == {f.name for f in fields(CompareOptions)}
    for name in ("compare", "report"):
        command = main.commands[name]
        assert all(isinstance(p, ComparisonOption) for p in command.params
                   if p.name not in OWN[name])
    fail_on = next(p for p in main.commands["compare"].params if p.name == "fail_on")
    assert isinstance(fail_on.type, click.Choice) and set(fail_on.type.choices) == set(FAIL_ON)


def test_help_lists_the_comparison_options_by_group() -> None:
    text = CliRunner().invoke(main, ["report", "-h"], terminal_width=100).output
    headings = [ln for ln in text.splitlines() if ln.endswith(":") and not ln.startswith(" ")]
    assert headings == ["Options:", "What to compare:", "How to judge:", "How to run:"]
    judge = text.split("How to judge:")[1].split("How to run:")[0]
    assert "--fail-on" in judge and "--base-dtype" in judge and "--jobs" not in judge


@pytest.fixture
def runs(make_dump: Callable[..., Path]) -> dict[str, Path]:
    """``base``: fp32; ``rounded``: the same tensors rounded to bf16 but stored as fp32 (as
    logits saved from a bf16 run are): DRIFT judged as fp32, OK judged as bf16."""
    rng = np.random.default_rng(0)
    x = {f"layers.{i}:out": rng.standard_normal((4, 64)).astype(np.float32) for i in range(3)}
    return {"base": make_dump("base.st", x),
            "rounded": make_dump("rounded.st", {k: v.astype(ml_dtypes.bfloat16)
                                                .astype(np.float32) for k, v in x.items()})}


def _both(base: Path, target: Path, *flags: str, out: Path) -> dict[str, tuple[int, str]]:
    """Exit code and summary line of compare and report on the same runs and flags."""
    runner = CliRunner()
    done = {}
    for name, extra in (("compare", ["-q"]), ("report", ["-o", str(out), "--force"])):
        result = runner.invoke(main, [name, str(base), str(target), *extra, *flags])
        assert result.exit_code in (0, 1), result.output
        done[name] = (result.exit_code, result.output.splitlines()[0])
    return done


def test_report_fails_on_what_fail_on_names(runs: dict[str, Path], tmp_path: Path) -> None:
    codes = {}
    for choice in FAIL_ON:
        done = _both(runs["base"], runs["rounded"], "--fail-on", choice,
                     out=tmp_path / "r.html")
        assert done["report"] == done["compare"], choice
        codes[choice] = done["report"][0]
    # the rows are DRIFT only
    assert codes == {"drift": 1, "any": 1, "overflow": 0, "nan": 0, "never": 0}


def test_report_takes_the_stated_dtypes(runs: dict[str, Path], tmp_path: Path) -> None:
    base, rounded, out = runs["base"], runs["rounded"], tmp_path / "r.html"
    as_stored = _both(base, rounded, out=out)
    assert as_stored["report"] == as_stored["compare"]
    assert as_stored["report"][0] == 1 and "[fp32->fp32]" in as_stored["report"][1]
    stated = _both(base, rounded, "--target-dtype", "bf16", out=out)
    assert stated["report"] == stated["compare"]
    assert stated["report"][0] == 0 and "[fp32->bf16]" in stated["report"][1]
    both = _both(rounded, base, "--base-dtype", "bf16", "--target-dtype", "fp32", out=out)
    assert both["report"] == both["compare"]
    assert "[bf16->fp32]" in both["report"][1]


def test_both_commands_hand_the_comparison_the_same_options(
        runs: dict[str, Path], make_dump: Callable[..., Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every comparison flag reaches precision.compare, from report as from compare."""
    seen: list[CompareOptions | None] = []
    real = judge_compare.compare

    def spy(base: Any, target: Any, options: CompareOptions | None = None,
            **kw: Any) -> precision.Report:
        seen.append(options)
        return real(base, target, options, **kw)

    monkeypatch.setattr(judge_compare, "compare", spy)
    ref = make_dump("ref.st", {"layers.0:out": np.ones(4, np.float32)}, dtype="bfloat16")
    flags = ["--reference", str(ref), "--no-reference", "--allow-different-models",
             "--allow-partial", "--rtol", "0.01", "--atol", "1e-6", "--profile", "bf16",
             "--base-dtype", "fp32", "--target-dtype", "bf16", "--fail-on", "never",
             "--topk", "3", "--jobs", "2", "--max-memory", "64M"]
    done = _both(runs["base"], runs["rounded"], *flags, out=tmp_path / "r.html")
    assert done["report"] == done["compare"]
    assert seen == [CompareOptions(reference=str(ref), auto_reference=False, rtol=0.01,
                                   atol=1e-6, profile="bf16", base_dtype="fp32",
                                   target_dtype="bf16", fail_on="never", topk=3, jobs=2,
                                   max_memory=64 << 20, allow_different_models=True,
                                   allow_partial=True)] * 2


def test_report_passes_max_memory_on(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    result = CliRunner().invoke(main, ["report", str(runs["base"]), str(runs["rounded"]),
                                       "-o", str(out), "--max-memory", "1K"])
    assert result.exit_code == 2 and "--max-memory" in result.output
    assert not out.exists()


def test_python_api_takes_options_and_keywords(runs: dict[str, Path]) -> None:
    """precision.compare takes a CompareOptions, its fields as keywords, or both (keywords
    win); the defaults are the CLI's."""
    base, rounded = runs["base"], runs["rounded"]
    assert not precision.compare(base, rounded)
    options = precision.CompareOptions(target_dtype="bf16")
    by_options = precision.compare(base, rounded, options)
    by_keyword = precision.compare(base, rounded, target_dtype="bf16")
    assert by_options and by_keyword and by_options.summary == by_keyword.summary
    assert not precision.compare(base, rounded, options, target_dtype=None)
    assert precision.compare(base, rounded, fail_on="never").fail_on == "never"
    with pytest.raises(TypeError, match="rtoll"):
        precision.compare(base, rounded, rtoll=0.1)
    with pytest.raises(precision.InputError, match="fail_on='sometimes'"):
        precision.CompareOptions(fail_on="sometimes")
    with pytest.raises(precision.InputError, match="jobs=0"):
        precision.compare(base, rounded, jobs=0)


def test_a_pass_that_let_flagged_rows_by_says_so() -> None:
    """With --fail-on never, a run with DRIFT rows passes, and its verdict says by which
    rule (PASS alone beside a DRIFT or an OVERFLOW would read as a clean run); a clean run
    and a failing one say PASS and FAIL."""
    from click.testing import CliRunner

    from precision.cli import main

    data = Path(__file__).parent / "data" / "msprobe"
    base, fault = data / "fp32-train", data / "bf16-fault-train"
    lenient = precision.compare(base, fault, fail_on="never")
    assert lenient and lenient.flagged
    assert lenient.summary.startswith("PASS (fail_on='never') [fp32->bf16]: first divergence")
    assert not precision.compare(base, fault).summary.startswith("PASS")
    assert precision.compare(base, base, fail_on="never").summary.startswith("PASS [")
    result = CliRunner().invoke(main, ["compare", str(base), str(fault), "--fail-on", "never",
                                       "-q"])
    assert result.exit_code == 0
    assert result.output.startswith("PASS (--fail-on never) [fp32->bf16]")


def test_records_in_one_run_only_are_said_and_fail_on_any_names_them(
        make_dump: Callable[..., Path]) -> None:
    """Runs that recorded different calls (one forward against two): more than a quarter of
    the records in one run only is a warning beside the PASS on what pairs; a few are not;
    with fail_on='any' the FAIL names them rather than 'no divergence'."""
    x = np.linspace(-1, 1, 8, dtype=np.float32)
    keys = [f"l{i}:out" for i in range(8)]
    base = make_dump("base.st", {k: x for k in keys})
    once = make_dump("once.st", {k: x for k in keys[:4]})
    most = make_dump("most.st", {k: x for k in keys[:7]})
    report = precision.compare(base, once)
    assert report and report.counts()["MISSING"] == 4
    assert [w for w in report.warnings if "in one run only" in w] == [
        "4 of 8 records are in one run only (first l4:out, only in the baseline): the runs "
        "did not record the same module calls (other --include/--exclude or inputs, another "
        "number of forward calls, a generation of another length), and those records are not "
        "judged (fail_on='any' fails on them)"]
    assert not any("in one run only" in w for w in precision.compare(base, most).warnings)
    strict = precision.compare(base, once, fail_on="any")
    assert strict.summary == ("FAIL [fp32->fp32]: 4 record(s) MISSING, first l4:out (only in "
                              "the baseline); 4 OK, 4 MISSING")
    result = CliRunner().invoke(main, ["compare", str(base), str(once)])
    assert result.exit_code == 0 and "warning: 4 of 8 records are in one run only" in \
        result.output and "(--fail-on any fails on them)" in result.output


def test_tolerances_and_topk_out_of_range_are_one_line(make_dump: Callable[..., Path]) -> None:
    """--topk 0 divided by zero; --rtol nan or -1 flagged every layer."""
    x = {"a:out": np.linspace(-1, 1, 8, dtype=np.float32)}
    a, b = make_dump("a.st", x), make_dump("b.st", x)
    for kw, said in (({"topk": 0}, "topk=0: use 1 or more"),
                     ({"rtol": float("nan")}, "rtol=nan: a tolerance is a finite number"),
                     ({"atol": -5.0}, "atol=-5.0: a tolerance is a finite number")):
        with pytest.raises(precision.InputError, match=said):
            precision.compare(a, b, **kw)
    result = CliRunner().invoke(main, ["compare", str(a), str(b), "--rtol", "-1"])
    assert result.exit_code == 2 and "error: --rtol -1.0: a tolerance is a finite number" in \
        result.output


def test_a_baseline_mask_of_zeros_is_judged_not_a_crash(make_dump: Callable[..., Path]) -> None:
    """An attention mask of zeros makes every position padding: the note says nothing was
    judged there (it divided by zero), and a mask is no position-bucket table."""
    h = np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 4, 8)
    base = make_dump("a.st", {"input:attention_mask": np.zeros((2, 4), np.int64), "a:out": h})
    target = make_dump("b.st", {"input:attention_mask": np.ones((2, 4), np.int64), "a:out": h})
    report = precision.compare(base, target)
    first = report.first_divergence
    assert first is not None and first.key == "input:attention_mask"
    assert first.status == "MISMATCH" and "bucket" not in first.reason
    assert any("a mask of zeros: nothing of those records was judged" in n for n in report.notes)


def test_runs_of_nan_alone_are_nothing_to_compare(make_dump: Callable[..., Path]) -> None:
    """Two runs whose every float record is NaN at the same places passed (144 OK): nothing
    was compared. That is one line, exit 2; NaN in one run only stays a FAIL."""
    nan = np.full(8, np.nan, np.float32)
    x = np.linspace(-1, 1, 8, dtype=np.float32)
    broken = make_dump("nan.st", {"a:out": nan, "b:out": nan})
    with pytest.raises(precision.DumpError, match=r"hold no finite value at the same places "
                                                  r"in any of their 2 float record\(s\) \(first "
                                                  r"a:out"):
        precision.compare(broken, broken)
    result = CliRunner().invoke(main, ["compare", str(broken), str(broken)])
    assert result.exit_code == 2
    healthy = make_dump("x.st", {"a:out": x, "b:out": x})
    assert not precision.compare(broken, healthy) and not precision.compare(healthy, broken)
    some = make_dump("some.st", {"a:out": nan, "b:out": x})
    assert precision.compare(some, some)  # the finite record is compared: a PASS

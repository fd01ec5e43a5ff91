"""A decoder whose residual stream overflows fp16 in no submodule (fixtures/tiny-llama-overflow),
end to end: scan, compare, isolate and suggest name it, and what suggest prints fixes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import precision
from precision.cli import main

from .conftest import FIXTURES, T5_OVERFLOW

LLAMA = FIXTURES / "tiny-llama-overflow"
LAYER = "model.layers.4"

pytestmark = pytest.mark.slow


def cli(*args: object) -> tuple[int, str]:
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("residual")
    out = {"base": d / "b.st", "fp16": d / "f.st"}
    assert cli("capture", "--model", LLAMA, "--dtype", "fp32", "-q", "-o", out["base"])[0] == 0
    code, text = cli("capture", "--model", LLAMA, "--dtype", "fp16", "--keep-fp32", "none",
                     "--replay", out["base"], "-q", "-o", out["fp16"])
    assert code == 0, text
    return out


def test_scan_and_compare_say_it_is_made_in_the_layers_own_forward(
        runs: dict[str, Path]) -> None:
    scan = precision.scan(precision.load(runs["base"]))
    first = min(scan.problems, key=lambda r: r.order)
    assert first.key == f"{LAYER}:out" and first.origin == "own forward", scan.summary
    assert "own forward" in scan.summary
    report = precision.compare(runs["base"], runs["fp16"])
    row = report.first_divergence
    assert row is not None and row.key == f"{LAYER}:out" and row.status == "OVERFLOW"
    assert f"made in {LAYER}'s own forward, not in a submodule" in row.reason
    later = [r for r in report.rows if r.status in ("OVERFLOW", "NAN") and r is not row]
    assert later and not any("own forward" in r.reason for r in later)


def test_an_overflow_made_in_a_submodule_is_not_called_the_parents(tmp_path: Path) -> None:
    base, half = tmp_path / "b.st", tmp_path / "h.st"
    cli("capture", "--model", T5_OVERFLOW, "--dtype", "fp32", "-q", "-o", base)
    cli("capture", "--model", T5_OVERFLOW, "--dtype", "fp16", "--keep-fp32", "none",
        "--replay", base, "-q", "-o", half)
    report = precision.compare(base, half)
    assert not any("own forward" in r.reason for r in report.rows)
    scan = precision.scan(precision.load(base))
    assert not any(r.origin == "own forward" for r in scan.rows)


def test_isolate_names_the_layer_a_culprit(runs: dict[str, Path]) -> None:
    code, text = cli("isolate", runs["base"], "--model", LLAMA, "--dtype", "fp16",
                     "--keep-fp32", "none", "--target", runs["fp16"], "--only-flagged")
    assert code == 1, text
    assert f"culprit: {LAYER}:out" in text and "PASS" not in text


def test_suggest_hands_the_residual_stream_on_in_fp32_and_that_fixes_it(
        tmp_path: Path, runs: dict[str, Path]) -> None:
    out = tmp_path / "s.json"
    code, text = cli("suggest", "--model", LLAMA, "--dtype", "fp16", "--keep-fp32", "none",
                     "--json", out, "-q")
    assert code == 0, text
    result = json.loads(out.read_text())
    assert result["fixed"] and result["keep_fp32"] == ["none", f"{LAYER}:fp32"], result
    assert [s["kept"] for s in result["steps"]] == [[LAYER], [f"{LAYER}:fp32"]]
    fixed = tmp_path / "fixed.st"
    args = [a for k in result["keep_fp32"] for a in ("--keep-fp32", k)]
    assert cli("capture", "--model", LLAMA, "--dtype", "fp16", *args, "--replay",
               runs["base"], "-q", "-o", fixed)[0] == 0
    assert precision.compare(runs["base"], fixed)


def test_without_budget_the_alternatives_are_verified(tmp_path: Path) -> None:
    out = tmp_path / "s.json"
    code, text = cli("suggest", "--model", LLAMA, "--dtype", "fp16", "--keep-fp32", "none",
                     "--budget", "0", "--json", out, "-q")
    assert code == 1, text
    result = json.loads(out.read_text())
    assert not result["fixed"] and "verified instead: --dtype bf16" in result["message"]
    tried = {a["capture_args"]: a["passed"] for a in result["alternatives"]}
    assert tried == {"--dtype bf16": True,
                     "--dtype fp16 --keep-fp32 none --keep-fp32 model.embed_tokens:fp32": True}


def test_suggest_headline_names_the_fix_it_verified(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 33's real case, an 18-layer decoder in fp16: keeping the culprit layer in fp32
    did not remove its error, the listed attempt FAILs, and what was verified is the residual
    stream in fp32 from the embedding on. The headline must name that fix, not a count of
    modules that a failed step shares ("keeping 1 module(s) in fp32 fixes it")."""
    from precision.doctor import checks

    real_culprit = checks._culprit

    def culprit(report: precision.Report) -> tuple[str, bool] | None:
        found = real_culprit(report)  # the layer again, as if keeping it changed nothing
        return (found[0], False) if found else None

    monkeypatch.setattr(checks, "_culprit", culprit)
    s = checks.suggest(str(LLAMA), dtype="fp16", keep_fp32="none", budget=1,
                       prompts=("The capital of France is",))
    assert s.fixed and s.keep_fp32 == ("none", "model.embed_tokens:fp32"), s.message
    assert [(st.kept, bool(st.report)) for st in s.steps] == [
        ((LAYER,), False), (("model.embed_tokens:fp32",), True)]
    assert s.message.startswith("the residual stream in fp32 from model.embed_tokens on "
                                "fixes it (verified; --keep-fp32 model.embed_tokens:fp32"), \
        s.message


def test_suggest_headline_names_the_module_handed_on_in_fp32(tmp_path: Path) -> None:
    """The fix found step by step: the headline names ``model.layers.4`` handed on in fp32
    (what the last, passing step ran), not "keeping 1 module(s)" that the failing first step,
    ``model.layers.4`` handed back in fp16, kept too."""
    s = precision.suggest(str(LLAMA), dtype="fp16", keep_fp32="none",
                          prompts=("The capital of France is",))
    assert s.fixed and [bool(st.report) for st in s.steps] == [False, True]
    assert s.message == (f"keeping {LAYER} (its output handed on in fp32) in fp32 fixes it "
                         "(verified; 1 module(s) in fp32)"), s.message

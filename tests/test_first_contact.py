"""What a new user meets first: reprs, error advice in the caller's terms, sizes, the
inspect header, dumps that are not dumps, usage errors on one line, Ctrl-C, suggest's
verified policy (issue 14)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

import precision
from precision.cli import INTERRUPTED, main
from precision.errors import DumpError

from .conftest import OVERFLOW_WO, T5, T5_OVERFLOW

MakeDump = Callable[..., Path]


def _run(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


# ---------------------------------------------------------------- Python API


def test_report_repr_is_one_line_and_str_is_the_capped_table(t5_runs: dict[str, Path]) -> None:
    report = precision.compare(t5_runs["obase"], t5_runs["ofp16_none"])
    line = repr(report)
    assert "\n" not in line and len(line) < 400
    assert line.startswith("<Report FAIL [fp32->fp16]") and OVERFLOW_WO in line
    assert f"{report.counts()['OVERFLOW']} OVERFLOW" in line and "OK" in line
    text = str(report)
    lines = text.splitlines()
    assert lines[0] == report.summary
    notes = [ln for ln in lines[1:] if ln.startswith("note: ")]
    assert notes == [f"note: {n}" for n in report.notes] and len(notes) == 2
    assert re.match(r"\s*#\s+layer\s+status", lines[1 + len(notes)])
    rows = [ln for ln in lines[2:] if re.match(r"\s*\d+\s", ln)]
    assert len(rows) == report.STR_TOP and any("◀ first" in ln for ln in rows)
    assert lines[-1].startswith(f"({len(report.rows) - report.STR_TOP} more rows")
    assert len(text) < 10_000 and not any(ln != ln.rstrip() for ln in lines)
    clean = precision.compare(t5_runs["base"], t5_runs["base"])
    assert repr(clean).startswith("<Report PASS") and "first divergence" not in repr(clean)


def test_every_result_shows_one_line_in_a_repl(t5_runs: dict[str, Path]) -> None:
    """scan, isolate, suggest, check and consistency results print their summary, not a
    dataclass's every row."""
    from precision.doctor.checks import Suggestion
    from precision.doctor.isolation import IsolateReport
    from precision.doctor.opcheck import CheckReport
    from precision.judge.consistency import consistency_of
    from precision.judge.profiles import profile_for

    scanned = precision.scan(precision.load(t5_runs["ofp16_none"]))
    report = precision.compare(t5_runs["obase"], t5_runs["ofp16_none"])
    results = [
        scanned,
        consistency_of([precision.load(t5_runs["base"])] * 2),
        IsolateReport(profile=profile_for("float32", "float16"), rows=(), calls=3,
                      notes=("a note",)),
        CheckReport(path=Path("x.st"), ops=()),
        Suggestion(fixed=False, policy=(), before=report, after=report, steps=(),
                   message="no fp32 policy within budget fixes it"),
    ]
    assert len(scanned.rows) > 20 and not scanned
    for result in results:
        line = repr(result)
        name = type(result).__name__
        assert line == f"<{name} {result.summary}>" and "\n" not in line, line
        assert "Row(" not in line and len(line) < 400, line
        lines = str(result).splitlines()
        assert lines == [result.summary, *(f"note: {n}" for n in result.notes)]
    assert repr(scanned).startswith("<ScanReport FAIL [fp16]")
    assert str(results[2]).endswith("note: a note\n")


def test_python_calls_take_paths_and_refuse_a_loaded_model_in_one_line(
        t5_runs: dict[str, Path]) -> None:
    """scan takes a dump's path as compare does; suggest, isolate and port load the model
    themselves, so a loaded model is one line saying to pass its folder; suggest's
    keep_fp32 is its base policy; a Suggestion is truthy only when it fixed the run."""
    import torch

    from precision.doctor.checks import Suggestion
    from precision.errors import InputError

    path = t5_runs["ofp16_none"]
    assert precision.scan(path).summary == precision.scan(precision.load(path)).summary
    assert precision.scan(str(path)).rows == precision.scan(path).rows
    model = torch.nn.Linear(2, 2)
    for call in (lambda: precision.suggest(model), lambda: precision.port(model),
                 lambda: precision.isolate(path, model)):
        with pytest.raises(InputError, match=r"takes the model's folder .* not a loaded Linear"
                                             r".*save_pretrained\(DIR\)") as err:
            call()
        assert "\n" not in str(err.value)
    with pytest.raises(InputError, match=r"keep_fp32 of suggest is the policy it starts from, "
                                         r"auto or none, not none \*\.wo"):
        precision.suggest(str(T5), keep_fp32=["none", "*.wo"])
    report = precision.compare(t5_runs["base"], t5_runs["base"])
    unfixed = Suggestion(fixed=False, policy=(), before=report, after=report, steps=())
    assert not unfixed and Suggestion(fixed=True, policy=("x",), before=report, after=report,
                                      steps=())


def test_capture_errors_from_python_name_keywords_and_its_repr_is_one_line(
        t5_runs: dict[str, Path]) -> None:
    import torch

    from precision.errors import InputError

    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    for call, said in ((lambda: precision.capture(model, every=0), "every must be 1 or more"),
                       (lambda: precision.capture(model, include=["zz"]),
                        "no module matches include/exclude: nothing would be captured"),
                       (lambda: precision.keep_fp32(model, ["zz"]),
                        "keep_fp32 zz matches no module"),
                       (lambda: precision.keep_fp32(model, ["0:wide"]),
                        "keep_fp32 0:wide: after ':' comes how"),
                       (lambda: precision.capture(model, mode="stats", full=["zz"]),
                        "full zz matches no module")):
        with pytest.raises(InputError) as err:
            call()
        assert str(err.value).startswith(said) and "--" not in str(err.value), err.value
    cap = precision.capture(model, mode="stats")
    assert re.fullmatch(r"<Capture stats of Sequential -> \S+capture\.st: 1 module\(s\) "
                        r"hooked, 0 record\(s\) so far>", repr(cap)), repr(cap)
    with cap, torch.no_grad():
        model(torch.ones(1, 2))
    assert re.fullmatch(r"<Capture stats of Sequential -> \S+capture\.st: 3 record\(s\) "
                        r"written>", repr(cap)), repr(cap)
    empty = r"nothing ran inside the capture of Sequential: \S+ holds no records \(call the"
    with pytest.warns(UserWarning, match=empty), precision.capture(model, mode="stats"):
        pass
    scanned = precision.scan(t5_runs["ofp16_none"])
    assert scanned.notes and "inputs=['*']" in scanned.notes[0] and "--inputs" not in \
        scanned.notes[0]
    code, out, _ = _run("scan", t5_runs["ofp16_none"])
    assert code == 1 and "capture with --inputs '*'" in out


def test_a_capture_without_a_path_leaves_nothing_behind(tmp_path: Path) -> None:
    """Its temporary dump stays readable while the process runs (cap.dump) and is removed at
    exit; one whose block raised is removed at once; a saved one is moved."""
    import subprocess
    import sys

    script = (
        "import torch, precision\n"
        "m = torch.nn.Linear(2, 2)\n"
        "with torch.no_grad(), precision.capture(m) as cap:\n"
        "    m(torch.ones(1, 2))\n"
        "assert cap.dump['root:out'].shape == (1, 2)\n"
        "print(cap.path)\n"
        "bad = precision.capture(m)\n"
        "try:\n"
        "    with bad:\n"
        "        raise KeyboardInterrupt\n"
        "except KeyboardInterrupt:\n"
        "    pass\n"
        "assert not bad.path.parent.exists(), bad.path\n"
        "with torch.no_grad(), precision.capture(m) as kept:\n"
        "    m(torch.ones(1, 2))\n"
        "folder = kept.path.parent\n"
        "kept.save(r'%s')\n"
        "assert not folder.exists()\n" % (tmp_path / "kept.st"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=os.environ | {"TMPDIR": str(tmp_path)}, timeout=300)
    assert done.returncode == 0, done.stderr
    written = Path(done.stdout.strip())
    assert written.name == "capture.st" and written.parent.parent == tmp_path
    assert not written.parent.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.st"]


def test_python_errors_name_keyword_arguments_and_the_cli_names_flags(
        tmp_path: Path, make_dump: MakeDump) -> None:
    import numpy as np

    x = {"a:out": np.ones(4, np.float32)}
    a = make_dump("a.st", x)
    b = make_dump("b.st", x, meta={"model": {"class": "Other", "config_hash": "abc"}})
    with pytest.raises(DumpError, match=r"allow_different_models=True") as err:
        precision.compare(a, b)
    assert "--" not in str(err.value)
    code, _, stderr = _run("compare", a, b)
    assert code == 2 and "--allow-different-models" in stderr and "=True" not in stderr
    import torch

    with pytest.raises(DumpError, match=r"pass force=True to overwrite"), \
            precision.capture(torch.nn.Linear(2, 2), a):
        pass
    code, _, stderr = _run("compare", a, a, "--json", a)
    assert code == 2 and "pass --force to overwrite" in stderr
    folder = tmp_path / "shards"
    folder.mkdir()
    with pytest.raises(DumpError, match=r"no index.json and no rank shards: not a dump") as e:
        precision.load(folder)
    assert "allow_partial" not in str(e.value)  # no shards: the hint would lead nowhere
    code, _, stderr = _run("scan", folder)
    assert code == 2 and "no rank shards: not a dump" in stderr and "--allow" not in stderr
    (folder / "rank0.st").write_bytes(b"")
    with pytest.raises(DumpError, match=r"unfinished multi-rank capture \(compare and report "
                                        r"read the shards it has with allow_partial=True\)"):
        precision.load(folder)
    code, _, stderr = _run("scan", folder)  # names the commands that take the flag
    assert code == 2 and "compare and report read the shards it has with --allow-partial" \
        in stderr


def test_dump_repr_names_device_and_dtype_of_python_captures(tmp_path: Path) -> None:
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).half()
    with torch.no_grad(), precision.capture(model, tmp_path / "py.st"):
        model(torch.ones(2, 4, dtype=torch.float16))
    d = precision.load(tmp_path / "py.st")
    text = repr(d)
    assert "?" not in text and " on cpu in fp16," in text, text
    size = os.path.getsize(tmp_path / "py.st")
    assert text.endswith(f"{size / 1e3:.3g} kB>") if size < 1e6 else "MB>" in text


# ---------------------------------------------------------------- CLI


def test_capture_inspect_and_the_file_agree_on_the_size(t5_runs: dict[str, Path]) -> None:
    path = t5_runs["ofp16_auto"]
    size = os.path.getsize(path)
    expected = f"{size / 1e6:.3g} MB"
    assert precision.load(path).file_bytes == size
    code, out, _ = _run("inspect", path)
    assert code == 0 and f"tensors, {expected}" in out
    assert repr(precision.load(path)).endswith(f"{expected}>")
    # what ran in fp32 under --keep-fp32 auto is listed, never "kept: -"
    assert "kept: -" not in out
    assert re.search(r"fp32\s+8 module\(s\) kept in fp32: encoder\.block\.0\.layer\.1\."
                     r"DenseReluDense\.wo", out), out


def test_capture_prints_the_same_size_as_inspect(tmp_path: Path) -> None:
    code, out, _ = _run("capture", "--model", T5, "--prompt", "hi", "--max-new-tokens", "1",
                        "--include", "encoder.block.0*", "-o", tmp_path / "c.st")
    assert code == 0, out
    size = os.path.getsize(tmp_path / "c.st")
    unit, scale = ("MB", 1e6) if size >= 1e6 else ("kB", 1e3)
    assert f", {size / scale:.3g} {unit} (full mode)" in out, out


def test_a_text_file_or_a_model_folder_given_as_a_dump(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("these are not tensors\n" * 50)
    code, _, stderr = _run("inspect", text)
    assert code == 2 and "not a precision dump or safetensors file (a text file)" in stderr
    assert "header length" not in stderr
    code, _, stderr = _run("compare", T5, T5)
    assert code == 2 and "is a model directory, not a dump" in stderr
    assert f"precision capture --model {T5} -o base.st" in stderr
    assert "--allow-partial" not in stderr


@pytest.mark.parametrize("args", [["compare", "a.st"], ["compare", "--top", "0", "a", "b"],
                                  ["nosuch"], ["compare", "--max-memory", "xx", "a", "b"],
                                  ["scan"]])
def test_usage_errors_are_one_line(args: list[str]) -> None:
    code, out, stderr = _run(*args)
    assert code == 2 and out == ""
    assert len(stderr.splitlines()) == 1 and stderr.startswith("error: "), stderr


def test_ctrl_c_exits_130(monkeypatch: pytest.MonkeyPatch, t5_runs: dict[str, Path]) -> None:
    def interrupted(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("precision.judge.compare.compare", interrupted)
    code, _, stderr = _run("compare", t5_runs["base"], t5_runs["fp16"])
    assert INTERRUPTED == 130 and code == 130
    assert stderr.strip() == "error: interrupted; no output was written"


def test_suggest_prints_and_writes_the_capture_arguments_it_verified(tmp_path: Path) -> None:
    out = tmp_path / "s.json"
    code, stdout, _ = _run("suggest", "--model", T5_OVERFLOW, "--keep-fp32", "none",
                           "--json", out, "-q")
    assert code == 0, stdout
    result = json.loads(out.read_text())
    assert result["keep_fp32"] == ["none", "*.block.*.layer.*.DenseReluDense.wo"]
    assert result["capture_args"] == ("--keep-fp32 none "
                                      "--keep-fp32 '*.block.*.layer.*.DenseReluDense.wo'")
    assert len(result["kept_modules"]) == 8 and result["message"].startswith(
        "keeping *.block.*.layer.*.DenseReluDense.wo in fp32 fixes it (verified")
    assert "8 module(s) in fp32" in result["message"]
    assert result["holdout"].startswith("PASS") and "held back" in result["message"]
    assert stdout.strip().endswith(result["capture_args"])
    # the printed arguments reproduce the verified run through capture itself
    base, fixed = tmp_path / "b.st", tmp_path / "f.st"
    assert _run("capture", "--model", T5_OVERFLOW, "-q", "-o", base)[0] == 0
    assert _run("capture", "--model", T5_OVERFLOW, "--dtype", "fp16", "--replay", base,
                *re.findall(r"--keep-fp32|'[^']+'|\S+", result["capture_args"].replace(
                    "'", "")), "-q", "-o", fixed)[0] == 0
    assert precision.compare(base, fixed)
    # the default starts from auto, as capture does: nothing to fix on this model
    code, stdout, _ = _run("suggest", "--model", T5_OVERFLOW, "-q")
    assert code == 0 and "nothing to fix" in stdout and stdout.strip().endswith(
        "--keep-fp32 auto")


def test_suggest_fails_when_the_held_back_prompts_are_not_fixed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The held-back prompts are run apart, and a failure there is not a fix."""
    from precision.doctor import checks

    seen: list[list[str]] = []
    real_compare, real_capture = checks.compare, checks.run_capture

    def capture(opts: checks.CaptureOptions, log: object) -> Path:
        if opts.replay is None:
            seen.append(list(opts.prompts))
        return real_capture(opts, log)  # type: ignore[arg-type]

    def compare(base: Path, target: Path) -> precision.Report:
        # pretend the policy does not hold on the prompts held back
        report = real_compare(base, target)
        if Path(base).name == "held-base.st":
            return real_compare(base, Path(base).with_name("step0.st"))
        return report

    monkeypatch.setattr(checks, "run_capture", capture)
    monkeypatch.setattr(checks, "compare", compare)
    from precision.runtime.models.load import DEFAULT_PROMPTS as prompts

    s = checks.suggest(str(T5_OVERFLOW), dtype="fp16")
    assert seen == [list(prompts[:2]), list(prompts[2:])]
    assert not s.fixed and "but not on the 1 held back" in s.message
    assert s.holdout is not None and not s.holdout

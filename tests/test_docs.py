"""Docs stay true to the code: the CLI reference matches --help, quoted outputs match what
the commands print (scripts/make_doc_outputs.py), and README links resolve."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys

import pytest

from .conftest import ROOT


def test_cli_reference_matches_help() -> None:
    spec = importlib.util.spec_from_file_location("make_cli_docs",
                                                  ROOT / "scripts" / "make_cli_docs.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert (ROOT / "docs" / "cli.md").read_text() == mod.render(), \
        "docs/cli.md is stale: run scripts/make_cli_docs.py"


def test_readme_starts_with_the_two_setup_commands_and_links_resolve() -> None:
    text = (ROOT / "README.md").read_text()
    commands = re.findall(r"^(scripts/\w+)", text, flags=re.M)
    assert commands[:2] == ["scripts/demo", "scripts/test"]
    assert "scripts/test" in (ROOT / ".ci" / "run").read_text()
    for link in re.findall(r"\]\(([^)#]+\.md)\)", text):
        assert (ROOT / link).is_file(), link


def python_block(doc: str, heading: str) -> str:
    """The first ```python block after ``heading`` in a docs file."""
    text = (ROOT / "docs" / doc).read_text()
    after = text[text.index(heading):]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


def test_quickstart_python_example_runs(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The notebook walk-through in docs/quickstart.md: find the overflow, fix it, confirm."""
    (tmp_path / "fixtures").symlink_to(ROOT / "fixtures")
    monkeypatch.chdir(tmp_path)
    code = python_block("quickstart.md", "## Python and notebooks")
    code = code.replace("report.first_divergence.key      #",
                        "assert report.first_divergence.key ==")
    scope: dict[str, object] = {}
    exec(compile(code, "quickstart.md", "exec"), scope)
    report = scope["report"]
    assert not report and report.first_divergence.status == "OVERFLOW"  # type: ignore[attr-defined]


def _doc_outputs():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("make_doc_outputs",
                                                  ROOT / "scripts" / "make_doc_outputs.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_every_quoted_output_is_generated() -> None:
    """A code block quoting a verdict line or a `$ precision` run with output is marked."""
    mod = _doc_outputs()
    for path in mod.DOCS:
        text = path.read_text()
        marked = {m.start(2) for m in mod.MARKER.finditer(text)}
        for m in re.finditer(r"^```\w*\n(.*?)^```\n", text, flags=re.M | re.S):
            body = m.group(1)
            quotes = re.search(r"^(PASS|FAIL)( \[|:)", body, flags=re.M) or any(
                not ln.startswith(("$ ", " ")) for ln in body.splitlines()
                if body.startswith("$ precision"))
            assert not quotes or m.start(1) in marked, (path.name, body[:200])
        assert set(mod.marked(text)) <= set(mod.BLOCKS), path.name


def _check_quoted(engine: str, *, real: bool = False) -> None:
    """The marked blocks of one kind (``engine``; ``real``: on the real model without an
    engine) are what the commands print now."""
    mod = _doc_outputs()
    docs = {p: p.read_text() for p in mod.DOCS}
    names = {name for t in docs.values() for name in mod.marked(t)
             if mod.BLOCKS[name].engine == engine and mod.BLOCKS[name].real == real}
    assert names, engine
    why = next((w for n in sorted(names) if (w := mod.missing(mod.BLOCKS[n]))), None)
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    texts = mod.outputs(names)
    for path, text in docs.items():
        for name, quoted in mod.quoted(text).items():
            if name in names:
                found = mod.disagreements(quoted, texts[name])
                assert not found, (f"{path.name} quotes stale output in {name} (run "
                                   f"scripts/make_doc_outputs.py): {found[:3]}")


def test_quoted_outputs_are_compared_as_the_cpu_moves_them() -> None:
    """Words, statuses and keys exactly; counts within 2 (or 2%), figures within 4x; a
    healthy table row may name another healthy record."""
    mod = _doc_outputs()
    layered = "FAIL: first divergence at model.layers.2.mlp:out (DRIFT: 5.1 eps); 3 OK\n"
    assert mod.disagreements(layered, layered.replace("layers.2.", "layers.5."))
    assert mod.disagreements(layered, layered.replace("5.1", "6.2")) == []
    quoted = ("FAIL [fp32->fp16]: first divergence at a.wo:out (OVERFLOW: 465 inf); 60 OK\n"
              " 1  a.wo:out   OVERFLOW  3x26x64  0.002005  324.4\n"
              " 2  b.norm:out OK        3x26x64  5.2e-08   1.27e-06\n")
    moved = quoted.replace("465", "464").replace("324.4", "249.4").replace(
        "b.norm:out", "c.mean:out").replace("1.27e-06", "3.77e-06")
    assert mod.disagreements(quoted, moved) == []
    for old, new in (("FAIL", "PASS"), ("OVERFLOW:", "DRIFT:"), ("a.wo:out   OVERFLOW",
                     "a.wi:out   OVERFLOW"), ("465", "480"), ("0.002005", "0.02005"),
                     ("3x26x64  0.002005", "3x26x65  0.002005"), ("324.4", "-324.4"),
                     ("OK        3x26x64", "DRIFT     3x26x64"),
                     ("at a.wo:out", "at layers.5.wo:out"),
                     ("OK        3x26x64", "OK        3x26x65")):
        assert mod.disagreements(quoted, quoted.replace(old, new, 1)), (old, new)
    assert mod.disagreements(quoted, quoted + "one more line\n")


@pytest.mark.slow
def test_quoted_outputs_match_the_code() -> None:
    """README.md and docs/*.md quote what the commands print now (scripts/make_doc_outputs.py)."""
    _check_quoted("")


@pytest.mark.slow
def test_quoted_real_model_outputs_match_the_code() -> None:
    """docs/port.md's healthy real decoder (SmolLM2; skipped without it, failed in CI)."""
    _check_quoted("", real=True)


@pytest.mark.slow
def test_quoted_vllm_outputs_match_the_code() -> None:
    """Seed 001's blocks, from a real vLLM engine on a real model (vLLM's venv, as
    tests/test_vllm.py; skipped without it or the model, failed in CI)."""
    _check_quoted("vllm")


def test_cuda_page_shows_its_recorded_run() -> None:
    """docs/cuda.md's tables are what scripts/gpu_check.py renders from the committed record."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    page = (ROOT / "docs" / "cuda.md").read_text()
    for name in re.findall(r"<!-- gpu_check: ([\w-]+) -->", page):
        if name == "end":
            continue
        shown = page.split(f"<!-- gpu_check: {name} -->\n", 1)[1].split("<!-- gpu_check: end")[0]
        record = json.loads((ROOT / "docs" / "cuda" / f"{name}.json").read_text())
        assert shown == gpu_check.tables(record), f"docs/cuda.md: {name} is not its record"

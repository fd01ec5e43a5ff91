"""Docs stay true to the code: the CLI reference matches --help, and README links resolve."""

from __future__ import annotations

import importlib.util
import re

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

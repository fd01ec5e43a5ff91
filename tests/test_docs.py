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

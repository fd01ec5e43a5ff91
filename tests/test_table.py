"""The comparison table (judge/table.py): one list of columns that every rendering shows, and
``str(report)`` its plain text, laid out as the terminal's table (issue 31)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import precision
from precision.judge.report import Report
from precision.judge.table import BRIEF, COLUMNS, FIRST, FRAME, PAGE, TEXT, columns
from precision.outputs.htmlreport import build
from precision.outputs.render import print_report

MakeDump = Callable[..., Path]


@pytest.fixture
def dumps(make_dump: MakeDump) -> tuple[Path, Path]:
    """Four layers: equal, fp16 rounding, a large error, an overflow."""
    x = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    big = x + 0.5 * np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    inf = x.copy()
    inf[0, :3] = np.inf
    base = make_dump("a.st", {f"layers.{i}:out": x for i in range(4)})
    target = make_dump("b.st", {"layers.0:out": x,
                                "layers.1:out": x.astype(np.float16).astype(np.float32),
                                "layers.2:out": big, "layers.3:out": inf})
    return base, target


@pytest.fixture
def report(dumps: tuple[Path, Path]) -> Report:
    rep = precision.compare(*dumps)
    assert not rep and rep.first_divergence is not None
    return rep


def test_views_name_columns_of_the_one_list() -> None:
    names = [c.name for c in COLUMNS]
    assert len(names) == len(set(names))
    for view in (TEXT, BRIEF, PAGE, FRAME):
        assert len(view) == len(set(view)) and set(view) <= set(names)
        assert [c.name for c in columns(view)] == list(view)


def test_every_rendering_shows_its_views_headers(report: Report, dumps: tuple[Path, Path],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    def headers(view: tuple[str, ...]) -> list[str]:
        return [c.header for c in columns(view)]

    markdown = report.to_markdown(only_flagged=False).splitlines()
    assert next(ln for ln in markdown if ln.startswith("| ")) == (
        "| " + " | ".join(headers(BRIEF)) + " |")
    jupyter = re.findall(r"<th(?: [^>]*)?>(.*?)</th>", report._repr_html_())
    assert jupyter == headers(BRIEF)
    page = build(report, precision.load(dumps[0]), precision.load(dumps[1]))
    assert re.findall(r"<th>(.*?)</th>", page) == headers(PAGE)
    assert list(report.to_pandas().columns[:len(FRAME)]) == list(FRAME)
    print_report(report)
    terminal = capsys.readouterr().out.splitlines()
    head = next(ln for ln in terminal if ln.lstrip().startswith("#"))
    assert head.split() == " ".join(headers(TEXT)).split()


def test_str_is_the_terminal_table_as_plain_text(report: Report,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """What the terminal prints to a pipe (220 columns, rich) is ``str(report)`` where no
    line is wider; a longer line is not wrapped in ``str(report)``."""
    print_report(report, top=Report.STR_TOP)
    terminal = capsys.readouterr().out
    text = str(report)
    assert text == "".join(ln.rstrip() + "\n" for ln in terminal.splitlines())
    assert text.splitlines()[0] == report.summary
    assert sum(FIRST in ln for ln in text.splitlines()) == 1

    first = report.first_divergence
    assert first is not None
    long_first = dataclasses.replace(first, reason="word " * 60 + "end")
    rows = tuple(long_first if r is first else r for r in report.rows)
    long = dataclasses.replace(report, rows=rows, first_divergence=long_first)
    lines = str(long).splitlines()
    assert lines[0] == long.summary and len(lines[0]) > 220
    row = [ln for ln in lines if FIRST in ln]
    assert len(row) == 1 and row[0].endswith("word end")
    assert len(lines) == len(text.splitlines())


def test_a_row_with_nothing_compared_shows_no_error(make_dump: MakeDump) -> None:
    """A record NaN in every element of the target compares no element: the row is NAN and
    its error metrics are absent (``-`` in the table, None in JSON and NaN in pandas), not
    0 and "exact"; a row with elements compared keeps its figures."""
    x = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    nan = np.full_like(x, np.nan)
    base = make_dump("a.st", {"layers.0:out": x, "layers.1:out": x})
    target = make_dump("b.st", {"layers.0:out": nan, "layers.1:out": x * (1 + 1e-4)},
                       dtype="float16")
    report = precision.compare(base, target)
    none, some = report.rows
    assert none.status == "NAN" and none.metrics is not None and none.metrics.compared == 0
    shown = {c.name: c.text(none) for c in columns(TEXT)}
    assert shown["rel_l2"] == shown["bits"] == shown["one_minus_cos"] == shown["max_abs"] == "-"
    as_json = none.as_dict()["metrics"]
    assert as_json["rel_l2"] is None and as_json["signature"] is None
    assert as_json["nan_target"] == 64 and as_json["compared"] == 0
    assert some.as_dict()["metrics"]["rel_l2"] == pytest.approx(1e-4, rel=1e-2)
    assert {c.name: c.text(some) for c in columns(TEXT)}["bits"] != "-"
    pytest.importorskip("pandas")
    frame = report.to_pandas()
    assert frame.loc[frame["key"] == "layers.0:out", "rel_l2"].isna().all()

"""Small self-contained HTML tables for Jupyter (``_repr_html_``), no dependencies."""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence

COLOURS = {"OK": "#1a7f37", "PASS": "#1a7f37", "ok": "#1a7f37", "DRIFT": "#9a6700",
           "LOW": "#9a6700", "inherited": "#9a6700", "MISMATCH": "#8250df", "MISSING": "#6e7781",
           "OVERFLOW": "#cf222e", "NAN": "#cf222e", "SATURATED": "#cf222e", "FAIL": "#cf222e",
           "culprit": "#cf222e"}


def _cell(value: object) -> str:
    text = html.escape(str(value))
    colour = COLOURS.get(str(value))
    if colour:
        return f'<td style="color:{colour};font-weight:600">{text}</td>'
    return f"<td>{text}</td>"


def table(title: str, headers: Sequence[str], rows: Iterable[Sequence[object]],
          *, limit: int = 40) -> str:
    """A titled table; statuses are coloured; at most ``limit`` rows, with a count of the rest."""
    rows = list(rows)
    head = "".join(f"<th style='text-align:left'>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_cell(v) for v in r) + "</tr>" for r in rows[:limit])
    more = (f"<p><i>{len(rows) - limit} more rows: use .rows or .to_pandas()</i></p>"
            if len(rows) > limit else "")
    return (f"<div><p><b>{html.escape(title)}</b></p><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table>{more}</div>")


def num(x: float | None) -> str:
    """Three significant digits, or '-'."""
    return "-" if x is None else f"{x:.3g}"

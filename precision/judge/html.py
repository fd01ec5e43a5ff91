"""How a result shows itself: small self-contained HTML tables for Jupyter
(``_repr_html_``), and one line in a terminal's REPL (:class:`Summarised`); no dependencies."""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence

COLOURS = {"OK": "#1a7f37", "PASS": "#1a7f37", "ok": "#1a7f37", "DRIFT": "#9a6700",
           "LOW": "#9a6700", "inherited": "#9a6700", "MISMATCH": "#8250df", "MISSING": "#6e7781",
           "OVERFLOW": "#cf222e", "NAN": "#cf222e", "SATURATED": "#cf222e", "FAIL": "#cf222e",
           "culprit": "#cf222e"}


class Summarised:
    """``repr()`` and ``str()`` of a result with a ``summary`` (and ``notes``) for a plain
    REPL: ``<ScanReport FAIL [fp16]: ...>`` rather than every row of a dataclass's repr. The
    dataclass that mixes it in is declared with ``repr=False`` (else its own repr wins)."""

    @property
    def summary(self) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.summary}>"

    def __str__(self) -> str:
        """The summary, then a line per note."""
        notes = getattr(self, "notes", ())
        return "".join(f"{line}\n" for line in (self.summary, *(f"note: {n}" for n in notes)))


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

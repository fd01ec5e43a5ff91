"""Comparison results: the frozen :class:`~.measure.row.Row` objects of a comparison inside a
:class:`Report`.

A report is truthy when no row is flagged, so ``assert precision.compare(a, b)`` works in a
test. It renders to plain text (``str(report)``), JSON (schema in ``docs/json-schema.md``),
Markdown and pandas; its tables take their columns from :mod:`.table`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import option
from .measure.row import FLAGGED, STATUSES, Row
from .profiles import Profile
from .table import BRIEF, FRAME, TEXT, Table, columns

SCHEMA_VERSION = 1
#: what each --fail-on choice fails on
FAIL_ON = {
    "never": frozenset(),
    "nan": frozenset({"NAN"}),
    "overflow": frozenset({"OVERFLOW", "NAN"}),
    "drift": FLAGGED,
    "any": FLAGGED | {"MISSING"},
}


@dataclass(frozen=True)
class Report:
    """All rows of a comparison in the baseline's execution order, plus the verdict."""

    base: str
    target: str
    profile: Profile
    rows: tuple[Row, ...]
    first_divergence: Row | None
    warnings: tuple[str, ...] = ()
    fail_on: str = "drift"
    info: dict[str, Any] = field(default_factory=dict)
    #: what the verdicts left out or judged against (padding, the reference), one line each
    notes: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return not self.failing

    #: rows ``str(report)`` shows: the worst, as ``precision compare --top 20``
    STR_TOP = 20

    def __repr__(self) -> str:
        """One line: verdict, counts and the first divergence (the rows: ``str(report)``)."""
        counts = ", ".join(f"{n} {s}" for s, n in self.counts().items() if n)
        first = self.first_divergence
        where = f"; first divergence {first.key} ({first.status})" if first else ""
        return (f"<Report {self.verdict} [{self.profile.name}] "
                f"{self.base} vs {self.target}: {counts}{where}>")

    def __str__(self) -> str:
        """The summary, warnings, notes and the table of the worst rows, as ``precision
        compare --top 20`` prints them to a pipe (no line wrapped)."""
        parts = [self.summary, *(f"warning: {w}" for w in self.warnings),
                 *(f"note: {n}" for n in self.notes)]
        table = self.table(top=self.STR_TOP)
        if table.rows:
            parts += [table.text(), table.more]
        return "".join(ln.rstrip() + "\n" for p in parts if p for ln in p.splitlines())

    @property
    def failing(self) -> list[Row]:
        """Rows whose status is one that ``fail_on`` fails on."""
        bad = FAIL_ON[self.fail_on]
        return [r for r in self.rows if r.status in bad]

    @property
    def flagged(self) -> list[Row]:
        return [r for r in self.rows if r.flagged]

    def worst(self, top: int | None = None, *, only_flagged: bool = False) -> list[Row]:
        """Rows to show, in execution order: all (or those not OK), cut to the ``top`` most
        severe (status, then how far beyond its limit the verdict's measure is, then rel_l2);
        the first divergence is always among them."""
        rows = [r for r in self.rows if r.status != "OK"] if only_flagged else list(self.rows)
        if top is None:
            return rows
        kept = sorted(rows, key=_severity, reverse=True)[:top]
        if self.first_divergence is not None and self.first_divergence not in kept:
            kept.append(self.first_divergence)  # the row the summary names
        return sorted(kept, key=lambda r: r.order)

    def table(self, view: Sequence[str] = TEXT, *, top: int | None = None,
              only_flagged: bool = False) -> Table:
        """The rows :meth:`worst` picks under the columns ``view`` names (:mod:`.table`), the
        first divergence marked, with a count of the rows left out."""
        shown = sum(r.status != "OK" for r in self.rows) if only_flagged else len(self.rows)
        rows = self.worst(top, only_flagged=only_flagged)
        return Table(columns(view), tuple(rows), self.first_divergence, shown - len(rows))

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = dict.fromkeys(STATUSES, 0)
        for r in self.rows:
            out[r.status] = out.get(r.status, 0) + 1
        return out

    @property
    def summary(self) -> str:
        """One line: verdict, first divergence and counts by status."""
        counts = ", ".join(f"{n} {s}" for s, n in self.counts().items() if n)
        if self.first_divergence is None and not self:  # failing rows that do not diverge
            first = min(self.failing, key=lambda r: r.order)
            statuses = sorted({r.status for r in self.failing})
            head = (f"{len(self.failing)} record(s) {'/'.join(statuses)}, first {first.key} "
                    f"({first.reason})")
        elif self.first_divergence is None:
            head = "no divergence beyond the expected noise"
        else:
            r = self.first_divergence
            head = f"first divergence at {r.key} ({r.status}: {r.reason})"
        return f"{self.verdict} [{self.profile.name}]: {head}; {counts}"

    @property
    def verdict(self) -> str:
        """``PASS`` or ``FAIL``; a pass with flagged rows says the ``fail_on`` that let them
        by (``PASS (--fail-on never)``): PASS alone beside an OVERFLOW would read as none."""
        if not self:
            return "FAIL"
        if self.flagged:
            return f"PASS ({option(f'--fail-on {self.fail_on}', f'fail_on={self.fail_on!r}')})"
        return "PASS"

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION, "base": self.base, "target": self.target,
            "profile": vars(self.profile), "fail_on": self.fail_on, "passed": bool(self),
            "summary": self.summary, "counts": self.counts(),
            "first_divergence": self.first_divergence.key if self.first_divergence else None,
            "warnings": list(self.warnings), "notes": list(self.notes), "info": self.info,
            "rows": [r.as_dict() for r in self.rows],
        }

    def _repr_html_(self) -> str:
        """Jupyter: the summary and the flagged rows (all rows when none is flagged)."""
        from .html import table

        shown = Table(columns(BRIEF), tuple(self.flagged or self.rows))
        return table(self.summary, shown.headers, (shown.cells(r, digits=3) for r in shown.rows))

    def to_json(self) -> str:
        """JSON text; non-finite floats become the strings ``"inf"``, ``"-inf"``, ``"nan"``."""
        return json.dumps(json_safe(self.to_dict()), indent=1)

    def to_markdown(self, *, only_flagged: bool = True, top: int | None = 20) -> str:
        """A summary fit for a pull-request comment: the verdict, each warning and note a
        quoted paragraph of its own, and a table of the first ``top`` rows (flagged ones
        only, unless not ``only_flagged``), saying how many more there are."""
        lines = [f"**precision**: {self.summary}", ""]
        for quoted in [f"> warning: {w}" for w in self.warnings] + [
                f"> note: {n}" for n in self.notes]:
            lines += [quoted, ""]  # a blank line ends the quote: the table is not in it
        rows = [r for r in self.rows if r.flagged] if only_flagged else list(self.rows)
        shown = Table(columns(BRIEF), tuple(rows[:top] if top is not None else rows))
        if shown.rows:
            lines.append(shown.markdown())
        if len(rows) > len(shown.rows):
            what = "flagged rows" if only_flagged else "rows"
            lines += ["", f"... and {len(rows) - len(shown.rows)} more {what} (the full "
                          "report: `--json`)"]
        return "\n".join(lines).rstrip("\n") + "\n"

    def to_pandas(self) -> Any:
        """One DataFrame row per compared key with the main metrics as columns."""
        import pandas as pd

        records = []
        fields = columns(FRAME)
        for r in self.rows:
            rec: dict[str, Any] = {c.name: c.value(r) for c in fields}
            if r.metrics:
                rec |= r.metrics.shown()
            if r.logits:
                rec |= {f"logits_{k}": v for k, v in r.logits.as_dict().items() if k != "flips"}
            records.append(rec)
        return pd.DataFrame.from_records(records)


def _severity(r: Row) -> tuple[int, float, float]:
    m = r.metrics
    return (STATUSES.index(r.status), r.score,
            m.rel_l2 if m and m.rel_l2 == m.rel_l2 else 0.0)


def json_safe(value: Any) -> Any:
    """Non-finite floats as the strings ``inf``, ``-inf``, ``nan`` (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value

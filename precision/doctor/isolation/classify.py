"""The verdicts of :func:`~precision.doctor.isolation.isolate`: which re-run calls are
culprits, and which enclose a culprit (the error is made inside them)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .calls import Call
from .report import IsolateRow

#: statuses that mean a value the dtype cannot hold was made (severity 2; drift is 1)
RANGE_STATUSES = frozenset({"OVERFLOW", "NAN"})


@dataclass
class CallResult:
    """One call re-run: its rows, and as a culprit how severe (0: not one)."""

    call: Call
    rows: list[IsolateRow]
    severity: int = 0


def mark_enclosing(results: list[CallResult]) -> None:
    """A culprit call around another culprit call at least as severe becomes ``encloses``:
    the error is made inside it."""
    culprits = [r for r in results if r.severity]

    def inside(inner: CallResult, outer: CallResult) -> bool:
        return outer.call.start < inner.call.start and inner.call.end < outer.call.end

    demoted = {id(r) for r in culprits
               if any(inside(o, r) and o.severity >= r.severity for o in culprits)}
    makers = {id(r): next(o for o in culprits if id(o) not in demoted and inside(o, r)
                          and o.severity >= r.severity)
              for r in culprits if id(r) in demoted}
    for r in culprits:
        maker = makers.get(id(r))
        if maker is None:
            continue
        first = next(row.key for row in maker.rows if row.verdict == "culprit")
        r.rows = [replace(row, verdict="encloses", local_reason=f"made inside it, by {first}")
                  if row.verdict == "culprit" else row for row in r.rows]
        r.severity = 0

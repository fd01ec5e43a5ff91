"""The verdicts of :func:`~precision.doctor.isolation.isolate` (its docstring states them):
each output re-run alone (:func:`verdict_alone`, :func:`verdict_on_overflowed_inputs`), the
calls that enclose a culprit (:func:`mark_enclosing`), and the full run's say
(:func:`verdict_with_full_run`)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ...judge.measure.row import Row
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


def verdict_alone(status: str) -> tuple[str, int]:
    """Verdict and culprit severity of an output whose inputs fit the target dtype, from its
    status alone: ``culprit`` beyond the profile (severity 2 for OVERFLOW or NAN, 1 for
    drift), else ``ok`` (0)."""
    if status == "OK":
        return "ok", 0
    return "culprit", 2 if status in RANGE_STATUSES else 1


def verdict_on_overflowed_inputs(given: str, own: int) -> tuple[str, int, str]:
    """Verdict, severity and reason of an output whose inputs do not fit the target dtype
    (``given`` says how): ``culprit`` (2) when alone it makes ``own`` inf/NaN/pinned values
    where an fp32 copy of it on the same inputs stays finite, else ``inherited`` (its status
    column says what it did alone)."""
    if own:
        return "culprit", 2, (f"{given}, yet alone it makes {own} inf/NaN/pinned values where "
                              "an fp32 copy of it on the same inputs stays finite")
    return "inherited", 0, f"{given}; no worse than that implies"


def verdict_with_full_run(verdict: str, accumulated: Row | None) -> str:
    """An output fine alone but flagged in the full (``target``) run is ``inherited``."""
    if verdict == "ok" and accumulated is not None and accumulated.flagged:
        return "inherited"
    return verdict


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

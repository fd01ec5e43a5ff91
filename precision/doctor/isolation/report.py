"""What :func:`~precision.doctor.isolation.isolate` finds: each module output's error alone
and in the full run (:class:`IsolateRow`), and the report over them (:class:`IsolateReport`)."""

from __future__ import annotations

from dataclasses import dataclass

from ...judge.html import Summarised
from ...judge.measure.metrics import TensorMetrics
from ...judge.measure.row import Row
from ...judge.profiles import Profile

#: verdicts, worst first
VERDICTS = ("culprit", "encloses", "unknown", "inherited", "ok")


@dataclass(frozen=True)
class IsolateRow:
    """One module output: its error alone and in the full run.

    ``order`` is the baseline's record order of ``key`` (-1 when the baseline has no such
    record); ``local`` is ``None`` for ``unknown`` rows (``local_status`` ``ERROR``);
    ``overflowed_inputs`` counts the finite input values that do not fit the dtype the target
    run holds them in.
    """

    order: int
    key: str
    local: TensorMetrics | None
    local_status: str
    local_reason: str
    accumulated: Row | None
    verdict: str
    overflowed_inputs: int = 0


@dataclass(frozen=True, repr=False)
class IsolateReport(Summarised):
    """Rows in execution order; truthy when no module is a culprit and the target run (when
    given) has no OVERFLOW or NAN record.

    ``calls``: module calls re-run; ``skipped``: calls with no floating output to measure;
    ``target_problems``: the target run's OVERFLOW and NAN rows.
    """

    profile: Profile
    rows: tuple[IsolateRow, ...]
    calls: int
    skipped: int = 0
    target_problems: tuple[Row, ...] = ()
    notes: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return not self.culprits and not self.target_problems

    def _repr_html_(self) -> str:
        """Jupyter: the rows that are not ok."""
        from ...judge.html import num, table

        rows = [r for r in self.rows if r.verdict != "ok"] or list(self.rows)
        return table(self.summary, ["#", "layer", "verdict", "local rel_l2", "local",
                                    "accumulated", "why"],
                     ([r.order, r.key, r.verdict,
                       num(r.local.measured("rel_l2") if r.local else None), r.local_status,
                       r.accumulated.status if r.accumulated else "-",
                       r.local_reason] for r in rows))

    def of(self, verdict: str) -> list[IsolateRow]:
        return [r for r in self.rows if r.verdict == verdict]

    @property
    def culprits(self) -> list[IsolateRow]:
        return self.of("culprit")

    @property
    def unknown(self) -> list[IsolateRow]:
        return self.of("unknown")

    @property
    def summary(self) -> str:
        n = {v: len(self.of(v)) for v in VERDICTS}
        if self.culprits:
            head = f"culprit: {self.culprits[0].key} ({self.culprits[0].local_reason})"
        elif self.target_problems:
            p = self.target_problems[0]
            head = (f"no module alone is a culprit, yet the target run has "
                    f"{len(self.target_problems)} OVERFLOW/NAN record(s), first {p.key} "
                    f"({p.status}: {p.reason})")
            if self.unknown:
                u = self.unknown[0]
                head += f"; {u.key} could not be re-run ({u.local_reason})"
        else:
            head = "no module is beyond the profile on its own"
        skipped = f", {self.skipped} without a floating output" if self.skipped else ""
        return (f"{'PASS' if self else 'FAIL'} [{self.profile.name}]: {head}; "
                f"{n['culprit']} culprit(s), {n['encloses']} enclosing, {n['inherited']} "
                f"inherited, {n['unknown']} unknown; {self.calls} module calls re-run"
                f"{skipped}")

"""One lined-up record's measurements and, once judged, its verdict: a frozen :class:`Row`.

The measure stage makes each row (status ``OK``, metrics filled in); the verdict stage
replaces its status, reason and score; the :class:`~precision.judge.report.Report` holds them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from .generation import GenerationMetrics
from .logits import LogitsMetrics
from .metrics import ExactMetrics, TensorMetrics
from .statsdiff import StatsDelta

Status = Literal["OK", "MISSING", "MISMATCH", "DRIFT", "OVERFLOW", "NAN"]
#: statuses, mildest first
STATUSES: tuple[Status, ...] = ("OK", "MISSING", "MISMATCH", "DRIFT", "OVERFLOW", "NAN")
#: the statuses a row is flagged with (``--fail-on drift``, the default)
FLAGGED: frozenset[str] = frozenset({"DRIFT", "OVERFLOW", "NAN", "MISMATCH"})


@dataclass(frozen=True)
class Row:
    """One aligned key: its verdict and metrics (``None`` where they do not apply)."""

    order: int
    key: str
    status: Status
    reason: str
    shape: tuple[int, ...]
    base_dtype: str
    target_dtype: str
    metrics: TensorMetrics | None = None
    exact: ExactMetrics | None = None
    logits: LogitsMetrics | None = None
    stats_delta: StatsDelta | None = None
    growth: float | None = None
    generation: GenerationMetrics | None = None
    #: the deciding rule's measure over its limit (above 1 when flagged, 0 when no rule
    #: flagged the row): how far beyond, on the scale the verdict used
    score: float = 0.0

    @property
    def flagged(self) -> bool:
        return self.status in FLAGGED

    def as_dict(self) -> dict[str, Any]:
        return {
            "order": self.order, "key": self.key, "status": self.status, "reason": self.reason,
            "shape": list(self.shape), "base_dtype": self.base_dtype,
            "target_dtype": self.target_dtype, "growth": self.growth,
            "metrics": self.metrics.shown() if self.metrics else None,
            "exact": ({"numel": self.exact.numel, "mismatched": self.exact.mismatched,
                       "share": self.exact.share, "max_abs": self.exact.max_abs}
                      if self.exact else None),
            "logits": self.logits.as_dict() if self.logits else None,
            "stats": self.stats_delta.as_dict() if self.stats_delta is not None else None,
            "generation": self.generation.as_dict() if self.generation else None,
        }

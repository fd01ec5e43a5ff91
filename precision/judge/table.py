"""The comparison table: its columns, and the rows a rendering shows.

:data:`COLUMNS` is the one list of the table's columns: each names a :class:`Row`'s value,
the header above it, how the value reads as text, and its alignment. Every rendering of a
comparison's rows takes its columns from here, by the names of one of the views below: the
terminal (``outputs/render.py``, rich) and ``str(report)`` (:meth:`Table.text`) show
:data:`TEXT`, Markdown (:meth:`Table.markdown`) and Jupyter show :data:`BRIEF`, the HTML
report (``outputs/htmlreport.py``) :data:`PAGE`, and pandas :data:`FRAME`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ..dtypes import short
from .measure.row import Row

#: how the first divergence's status cell is marked
FIRST = "◀ first"


def number(value: Any, digits: int = 4) -> str:
    """A value as table text: floats to ``digits`` significant digits, ``None`` as ``-``."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


@dataclass(frozen=True)
class Column:
    """One column: ``name`` (what a view selects it by, and pandas' column), ``header`` (what
    a table shows above it), ``value`` (the row's value; ``None`` where the row has none) and
    ``show`` (the value as text, where :func:`number` would not do). ``wrap``: free text, the
    one column a narrow terminal may wrap."""

    name: str
    header: str
    value: Callable[[Row], Any]
    align: Literal["left", "right"] = "right"
    show: Callable[[Row], str] | None = None
    wrap: bool = False

    def text(self, row: Row, digits: int = 4) -> str:
        """The cell of ``row``, numbers to ``digits`` significant digits."""
        return self.show(row) if self.show is not None else number(self.value(row), digits)


def _metric(name: str) -> Callable[[Row], Any]:
    """A tensor metric of the row, ``None`` where it has none (MISSING, exact compares, an
    error metric of a row where no element was compared: all NaN)."""
    def value(r: Row) -> Any:
        return None if r.metrics is None else r.metrics.measured(name)

    return value


def _absmax_target(r: Row) -> Any:
    """The target's largest finite ``|x|``: from the tensors, or a stats-only row's record."""
    if r.metrics is not None:
        return r.metrics.measured("absmax_target")
    return None if r.stats_delta is None else r.stats_delta.absmax_target


def _bits(r: Row) -> str:
    """The error signature: significant bits kept and the precision that costs as much."""
    if r.metrics is None or not r.metrics.compared:
        return "-"
    if r.metrics.signature_bits == float("inf"):
        return "exact"
    return f"{r.metrics.signature_bits:.1f} {r.metrics.signature}"


def _why(r: Row) -> str:
    """The verdict's reason and, on a logits row, how the top tokens and distributions agree."""
    lg = r.logits
    if lg is None:
        return r.reason
    ties = len(lg.flips) and sum(f[4] for f in lg.flips)
    return (f"{r.reason}; " if r.reason else "") + (
        f"top1 {lg.top1_agreement:.1%}" + (f" ({ties} near-tie flips)" if ties else "")
        + f", top{lg.k} {lg.topk_overlap:.1%}, KL mean {lg.kl_mean:.2g} max {lg.kl_max:.2g}")


def _dtypes(r: Row) -> str:
    return f"{short(r.base_dtype)}/{short(r.target_dtype)}"


COLUMNS: tuple[Column, ...] = (
    Column("order", "#", lambda r: r.order),
    Column("key", "layer", lambda r: r.key, "left"),
    Column("status", "status", lambda r: r.status, "left"),
    Column("reason", "why", lambda r: r.reason, "left", wrap=True),
    Column("why", "why", _why, "left", wrap=True),
    Column("shape", "shape", lambda r: r.shape, "left",
           show=lambda r: "x".join(map(str, r.shape))),
    Column("dtypes", "dtypes", _dtypes, "left"),
    Column("base_dtype", "base dtype", lambda r: r.base_dtype, "left"),
    Column("target_dtype", "target dtype", lambda r: r.target_dtype, "left"),
    Column("rel_l2", "rel_l2", _metric("rel_l2")),
    Column("bits", "bits", _metric("signature_bits"), show=_bits),
    Column("one_minus_cos", "1-cos", _metric("one_minus_cos")),
    Column("max_abs", "max_abs", _metric("max_abs")),
    Column("snr_db", "snr dB", _metric("snr_db")),
    Column("max_ulp", "max_ulp", _metric("max_ulp")),
    Column("absmax_target", "absmax tgt", _absmax_target),
    Column("growth", "growth", lambda r: r.growth),
)

#: the terminal's and ``str(report)``'s columns
TEXT = ("order", "key", "status", "shape", "dtypes", "rel_l2", "bits", "one_minus_cos",
        "max_abs", "absmax_target", "why")
#: Markdown's and Jupyter's: short enough for a pull-request comment or a notebook
BRIEF = ("order", "key", "status", "rel_l2", "one_minus_cos", "max_abs", "reason")
#: the HTML report's: every measure worth sorting by
PAGE = ("order", "key", "status", "reason", "rel_l2", "bits", "one_minus_cos", "max_abs",
        "snr_db", "max_ulp", "absmax_target", "growth", "shape", "dtypes")
#: pandas': the row's own fields, as values (every metric follows them)
FRAME = ("order", "key", "status", "reason", "shape", "base_dtype", "target_dtype", "growth")


def columns(view: Sequence[str]) -> tuple[Column, ...]:
    """The columns a view names, in its order."""
    by_name = {c.name: c for c in COLUMNS}
    return tuple(by_name[name] for name in view)


@dataclass(frozen=True)
class Table:
    """``rows`` to show under ``columns``; the first divergence (``first``) is marked where it
    is among them, and ``left_out`` more rows (the mildest) are not shown."""

    columns: tuple[Column, ...]
    rows: tuple[Row, ...]
    first: Row | None = None
    left_out: int = 0

    @property
    def headers(self) -> list[str]:
        return [c.header for c in self.columns]

    def cells(self, row: Row, digits: int = 4) -> list[str]:
        """The cells of ``row``, numbers to ``digits`` significant digits."""
        return [c.text(row, digits) for c in self.columns]

    def is_first(self, row: Row) -> bool:
        """Whether ``row`` is the first divergence."""
        first = self.first
        return first is not None and row.order == first.order and row.key == first.key

    @property
    def more(self) -> str:
        """The line under a table that leaves rows out ('' when it shows them all)."""
        return f"({self.left_out} more rows, the mildest, not shown)" if self.left_out else ""

    def text(self) -> str:
        """Plain text: columns two spaces apart, aligned, the first divergence marked; the
        layout of the terminal's table (rich) written to a pipe, with no line wrapped."""
        lines = [self.headers]
        for r in self.rows:
            cells = self.cells(r)
            if self.is_first(r):
                cells = [f"{t} {FIRST}" if c.name == "status" else t
                         for c, t in zip(self.columns, cells, strict=True)]
            lines.append(cells)
        widths = [max(len(ln[i]) for ln in lines) for i in range(len(self.columns))]
        return "\n".join(
            "  ".join(t.ljust(w) if c.align == "left" else t.rjust(w)
                      for c, t, w in zip(self.columns, ln, widths, strict=True)).rstrip()
            for ln in lines)

    def markdown(self) -> str:
        """A Markdown table: layer names as code, ``|`` in cells escaped."""
        lines = ["| " + " | ".join(self.headers) + " |",
                 "|" + "---|" * len(self.columns)]
        for r in self.rows:
            cells = [f"`{t}`" if c.name == "key" else t.replace("|", "\\|")
                     for c, t in zip(self.columns, self.cells(r, digits=3), strict=True)]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

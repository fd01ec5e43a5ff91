"""Headroom scan: how close each layer comes to the limits of a low-precision format.

For every floating output record of a dump (stats or full), against a reference format F
(fp16 by default; the run's own dtype when that is fp16 or bf16):

- ``absmax``: the largest finite magnitude; ``headroom_bits = log2(max_F / absmax)``:
  doublings left before F overflows (negative: F cannot hold these values)
- ``nan``/``inf`` counts, and ``origin``: ``passes on`` when a submodule's output or one of
  the module's recorded inputs already held NaN/inf, ``produces`` when its recorded inputs
  were finite; for a module without recorded inputs, the first non-finite record in
  execution order is ``first seen`` and later ones ``unknown``
- ``own forward``: the first values beyond F, in a module's output while none of its
  submodules' outputs went beyond: made in the module's own forward (a residual add), which
  keeping a submodule in fp32 cannot fix
- ``saturated``: values within 2% of the fp16 max (what clamps such as transformers' T5
  ±64504 leave behind)
- ``flush``: share of the tensor's values that are nonzero but that fp16 rounds to zero
  (``0 < |x| <= 2^-25``)

Rows are sorted worst first: producers of NaN/inf, then values beyond the format, saturation,
and then by headroom. Works on fp32 runs too: "would this model overflow in fp16?".
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from ..dtypes import FORMATS, canonical, is_float, short
from ..dumps.dump import Dump, Entry
from ..dumps.external import open_any
from ..errors import option
from .html import Summarised
from .measure.statsdiff import record_stats

CHUNK = 1 << 18
#: recording every module's inputs, on the command line and from Python
INPUTS_ALL = ("--inputs '*'", "inputs=['*']")


@dataclass(frozen=True)
class ScanRow:
    """One record's distance to the reference format's limits."""

    order: int
    key: str
    status: str  # NAN, OVERFLOW, SATURATED, LOW (headroom < 1 bit), OK
    absmax: float | None
    headroom_bits: float
    nan: int
    inf: int
    saturated: int
    beyond: int
    flush_share: float | None
    origin: str
    numel: int

    @property
    def headroom_text(self) -> str:
        """Headroom in bits to one decimal, or ``-`` for a record with no finite value (its
        ``headroom_bits`` is inf: nothing there can overflow, and nothing is known)."""
        return "-" if self.absmax is None else f"{self.headroom_bits:.1f}"


@dataclass(frozen=True, repr=False)
class ScanReport(Summarised):
    """Scan of one dump; truthy when nothing overflows, saturates or turns NaN."""

    source: str
    against: str
    rows: tuple[ScanRow, ...]
    notes: tuple[str, ...] = field(default=())

    def __bool__(self) -> bool:
        return not self.problems

    @property
    def problems(self) -> list[ScanRow]:
        return [r for r in self.rows if r.status in ("NAN", "OVERFLOW", "SATURATED")]

    @property
    def producers(self) -> list[ScanRow]:
        """Records that create NaN/inf themselves (their inputs were finite)."""
        return [r for r in self.rows if r.origin in ("produces", "first seen")]

    @property
    def summary(self) -> str:
        worst = self.rows[0] if self.rows else None
        if not self.problems:
            head = "no layer overflows"
            if worst is not None and worst.absmax is not None:
                head += (f"; least headroom {worst.headroom_bits:.1f} bits at {worst.key} "
                         f"(|x| up to {worst.absmax:.4g})")
        else:
            first = min(self.producers or self.problems, key=lambda r: r.order)
            why = first.status + (f", {first.origin}" if first.origin else
                                  f", |x| up to {first.absmax:.4g}")
            words = [w for status, w in (("OVERFLOW", "overflow"), ("SATURATED", "saturate"),
                                         ("NAN", "hold NaN"))
                     if any(r.status == status for r in self.problems)]
            what = " or ".join([", ".join(words[:-1]), words[-1]] if len(words) > 1 else words)
            head = f"{len(self.problems)} layer(s) {what}; it starts at {first.key} ({why})"
        return f"{'PASS' if self else 'FAIL'} [{short(self.against)}]: {head}"

    def _repr_html_(self) -> str:
        """Jupyter: the summary and the worst rows."""
        from .html import num, table

        return table(self.summary, ["#", "layer", "status", "absmax", "headroom bits", "nan",
                                    "inf", "saturated", "origin"],
                     ([r.order, r.key, r.status, num(r.absmax), r.headroom_text, r.nan,
                       r.inf, r.saturated, r.origin] for r in self.rows), limit=20)

    def to_json(self) -> str:
        from .report import json_safe

        return json.dumps(json_safe({"source": self.source, "against": self.against,
                                     "passed": bool(self), "summary": self.summary,
                                     "notes": list(self.notes),
                                     "rows": [asdict(r) for r in self.rows]}), indent=1)


def scan(dump: Dump | str | os.PathLike[str], *, against: str | None = None) -> ScanReport:
    """Scan every floating output record of ``dump`` (a dump, or its path: another tool's
    too, an msprobe summary) against ``against`` (default: see module)."""
    if not isinstance(dump, Dump):
        dump = open_any(dump)
    ref = canonical(against) if against else _default_against(dump)
    fmt = FORMATS[ref]
    # a record an fp16/bf16 run keeps wider (--keep-fp32: T5's wo) holds its own format's
    # range; asked for a format (against=), every record is weighed against it
    kept = {} if against or dump.dtype != ref else {
        e.key: wide for e in dump.entries if e.kind == "out" and is_float(e.dtype)
        and (wide := FORMATS.get(canonical(e.dtype))) is not None and wide.max > fmt.max}
    recorded = {(e.module, e.call) for e in dump.entries if e.kind == "in"}
    cache: dict[str, dict[str, Any] | None] = {}  # inputs alias outputs: read each once
    bad_inputs = _nonfinite_inputs(dump, cache)
    rows: list[ScanRow] = []
    bad_modules: list[tuple[str, int]] = []
    seen: dict[str, bool] = {}  # module -> whether an output of it held values beyond fmt
    for e in dump.entries:
        if e.kind != "out" or e.alias_of or not is_float(e.dtype):
            continue
        st = record_stats(dump, e.key, chunk=CHUNK, cache=cache)
        if st is None:
            continue
        nonfinite = int(st.get("nan", 0)) + int(st.get("posinf", 0)) + int(st.get("neginf", 0))
        own = kept.get(e.key, fmt)
        beyond = (st.get("absmax") or 0.0) > own.max
        origin = ""
        if nonfinite:
            origin = _origin(e, bad_modules, recorded, bad_inputs)
            bad_modules.append((e.module, e.call))
        elif beyond:
            inside = [b for m, b in seen.items() if m.startswith(e.module + ".")]
            before = [b for m, b in seen.items() if not m.startswith(e.module + ".")]
            if inside and not any(inside) and not any(before):
                origin = "own forward"  # the first beyond, and in no submodule: a residual add
        seen[e.module] = seen.get(e.module, False) or beyond or bool(nonfinite)
        rows.append(_row(e, st, own.max, origin))
    rows.sort(key=_severity)
    guessed = any(r.origin in ("first seen", "unknown") for r in rows)
    notes: tuple[str, ...] = (
        "some modules have no recorded inputs: 'first seen' marks the first non-finite "
        f"record; capture with {option(*INPUTS_ALL)} (precision scan --model does) to tell "
        "producers apart",) if guessed else ()
    if kept:
        notes += (f"{len(kept)} record(s) this {short(ref)} run keeps wider (kept in fp32) are "
                  f"weighed against their own format's range, not {short(ref)}'s (against= "
                  f"{short(ref)} weighs them too)",)
    return ScanReport(str(dump.path), ref, tuple(rows), notes)


def _origin(e: Entry, bad_modules: list[tuple[str, int]], recorded: set[tuple[str, int]],
            bad_inputs: set[tuple[str, int]]) -> str:
    """Whether ``e``'s module made its NaN/inf or received them (see the module docstring)."""
    prefix = e.module + "."
    if any(m.startswith(prefix) for m, _ in bad_modules) or (e.module, e.call) in bad_inputs:
        return "passes on"
    if (e.module, e.call) in recorded:
        return "produces"
    return "unknown" if bad_modules else "first seen"


def _default_against(dump: Dump) -> str:
    return dump.dtype if dump.dtype in ("float16", "bfloat16") else "float16"


def _nonfinite_inputs(dump: Dump, cache: dict[str, dict[str, Any] | None]
                      ) -> set[tuple[str, int]]:
    """(module, call) pairs whose recorded inputs hold NaN/inf (aliases resolved)."""
    bad: set[tuple[str, int]] = set()
    for e in dump.entries:
        if e.kind != "in" or not is_float(e.dtype):
            continue
        st = record_stats(dump, e.key, chunk=CHUNK, cache=cache)
        if st and int(st.get("nan", 0)) + int(st.get("posinf", 0)) + int(st.get("neginf", 0)):
            bad.add((e.module, e.call))
    return bad


def _row(e: Entry, st: dict[str, Any], fmax: float, origin: str) -> ScanRow:
    absmax = st.get("absmax")
    headroom = math.log2(fmax / absmax) if absmax else math.inf
    nan = int(st.get("nan", 0))
    inf = int(st.get("posinf", 0)) + int(st.get("neginf", 0))
    near = int(st.get("near_fp16_max", 0)) if fmax == FORMATS["float16"].max else 0
    beyond = int(st.get("beyond_fp16", 0)) if fmax == FORMATS["float16"].max else 0
    numel = int(st.get("numel", 0))
    flush = st.get("flush_fp16")
    flush_share = (flush / numel) if (flush is not None and numel) else None
    if nan:
        status = "NAN"
    elif inf or beyond:
        status = "OVERFLOW"
    elif near:
        status = "SATURATED"
    elif headroom < 1:
        status = "LOW"
    else:
        status = "OK"
    return ScanRow(e.order, e.key, status, absmax, headroom, nan, inf, near - beyond, beyond,
                   flush_share, origin, numel)


def _severity(r: ScanRow) -> tuple[int, int, float, int]:
    """Worst first; equal headroom (to 0.1 bit) in execution order."""
    rank = {"NAN": 0, "OVERFLOW": 1, "SATURATED": 2, "LOW": 3, "OK": 4}[r.status]
    origin = 0 if r.origin in ("produces", "first seen") else 1
    return (rank, origin, round(r.headroom_bits, 1), r.order)

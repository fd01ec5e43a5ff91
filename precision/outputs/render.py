"""Terminal output with rich: ``inspect`` listings and ``compare`` tables."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..dtypes import short
from ..dumps.atomic import format_bytes
from ..dumps.dump import FORMAT_VERSION, Dump
from ..judge.table import FIRST

if TYPE_CHECKING:
    from ..doctor.checks import Suggestion
    from ..doctor.isolation import IsolateReport
    from ..doctor.opcheck import CheckReport
    from ..judge.report import Report
    from ..judge.scan import ScanReport

STATUS_STYLE = {"OK": "green", "DRIFT": "yellow", "OVERFLOW": "bold red", "NAN": "bold red",
                "MISMATCH": "magenta", "MISSING": "dim", "EXACT": "green"}


def _console() -> Console:
    """A console that keeps long layer names whole when output goes to a file or pipe."""
    import sys

    width = None if sys.stdout.isatty() else 220
    return Console(highlight=False, soft_wrap=False, width=width)


#: what each of a stats dump's ``statistics`` paths is, for inspect
STATISTICS_PATHS = {"onepass": "the one-pass kernel (float64 sums)",
                    "torch": "torch's reductions (float32 sums)",
                    "deferred": "batches on the device (float64 sums)"}


def _statistics_note(statistics: Any) -> str:
    """``, statistics by ...`` for a stats dump's ``statistics`` metadata (older dumps have
    none: nothing)."""
    if not isinstance(statistics, dict) or statistics.get("path") not in STATISTICS_PATHS:
        return ""
    why = statistics.get("why")
    return (f", statistics by {STATISTICS_PATHS[statistics['path']]}"
            + (f": {why}" if why else ""))


def print_inspect(dump: Dump, *, show_all: bool = False) -> None:
    """Metadata summary and the records of ``dump`` (aliases hidden unless ``show_all``)."""
    con = _console()
    m = dump.meta
    model = m.get("model", {})
    dev = m.get("device", {})
    policy = m.get("policy", {})
    if not m.get("external"):
        con.print(f"[bold]{escape(str(dump.path))}[/]  format v{FORMAT_VERSION}  "
                  f"{'complete' if dump.complete else '[red]INCOMPLETE[/]'}")
    rows = [
        ("model", f"{model.get('class', '?')} ({model.get('kind', '?')}) "
                  f"{model.get('path', '')}  config {model.get('config_hash', '?')}"),
        ("device", f"{dev.get('name', '?')} [{dev.get('torch_device', '?')}]"),
        ("dtype", f"{short(str(m.get('dtype', '?')))}  keep-fp32: "
                  + " ".join([policy.get("base", "?"), *policy.get("globs", [])])),
        ("mode", f"{dump.mode}  {len(dump.entries)} records, {len(dump.tensors)} tensors, "
                 f"{format_bytes(dump.file_bytes)}" + _statistics_note(m.get("statistics"))),
        ("logits", str(m.get("logits_key") or ", ".join(m.get("logits_keys", [])) or None)),
        ("env", "  ".join(f"{k} {v}" for k, v in m.get("env", {}).items() if k != "platform")),
        ("created", f"{m.get('created', '?')} by precision {m.get('tool_version', '?')}"),
    ]
    if m.get("device_map"):
        counts = Counter(m["device_map"].values())
        rows.insert(2, ("placed", "device map: " + ", ".join(
            f"{n} module(s) on {where}" for where, n in counts.items())))
    if m.get("shards"):
        rows.insert(0, ("shards", f"{m['shards']} ranks ({m.get('index', {}).get('backend')}), "
                              "keys prefixed rank<r>/"))
    if m.get("foreign"):
        rows = [("format", "plain safetensors file (no precision metadata)")]
    if m.get("external"):  # another tool's file, converted: say what it was and what it lost
        title = str(m["external"])
        raw = m.get("msprobe")
        info: dict[str, Any] = raw if isinstance(raw, dict) else {}
        what = ("msprobe " + " ".join(str(info[k]) for k in ("framework", "task", "level")
                                      if info.get(k)) if m.get("msprobe") else "external file")
        if len(info.get("steps") or []) > 1:
            what += f", step {info.get('step')} of {', '.join(map(str, info['steps']))}"
        if info.get("ranks"):
            what += f", ranks {', '.join(map(str, info['ranks']))}"
        left = m.get("left_out") or {}
        rows = [("source", what),
                ("dtype", short(str(m.get("dtype", "?")))),
                ("mode", f"{dump.mode}  {len(dump.entries)} records"),
                ("left out", ", ".join(f"{n} {why}" for why, n in left.items()) or "nothing")]
        con.print(f"[bold]{escape(title)}[/]")
    for name, value in rows:
        con.print(f"  [cyan]{name:8}[/] {escape(value)}")
    if m.get("dtype") not in (None, "float32") and "module_dtypes" in m:
        # what ran in fp32: transformers' own choice (auto) and --keep-fp32 globs alike
        fp32 = [k for k, v in m["module_dtypes"].items() if v == "float32"]
        fp32 += [k for k in policy.get("kept_fp32", []) if k not in fp32]
        shown = ", ".join(fp32[:3]) + (f" and {len(fp32) - 3} more" if len(fp32) > 3 else "")
        con.print(f"  [cyan]{'fp32':8}[/] "
                  + escape(f"{len(fp32)} module(s) kept in fp32: {shown}" if fp32 else
                           "no module kept in fp32"))
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    for col in ("#", "key", "shape", "dtype", "absmax" if dump.mode == "stats" else "note"):
        table.add_column(col, overflow="fold")
    for e in dump.entries:
        if e.alias_of and not show_all:
            continue
        note = f"= {e.alias_of}" if e.alias_of else ""
        if e.stats is not None:
            note = _fmt(e.stats.get("absmax"))
        table.add_row(str(e.order), escape(e.key), "x".join(map(str, e.shape)) or "scalar",
                      short(e.dtype), note)
    con.print(table)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_report(report: Report, *, only_flagged: bool = False, top: int | None = None) -> None:
    """The summary line, warnings, then the rows (flagged ones highlighted)."""
    con = _console()
    for item in _report_parts(report, only_flagged=only_flagged, top=top):
        con.print(item)


def _report_parts(report: Report, *, only_flagged: bool, top: int | None) -> list[Any]:
    """The summary line, the warnings, the table and, when rows were left out, a note."""
    style = "bold green" if report else "bold red"
    parts: list[Any] = [f"[{style}]{escape(report.summary)}[/]"]
    parts += [f"[yellow]warning:[/] {escape(w)}" for w in report.warnings]
    parts += [f"note: {escape(n)}" for n in report.notes]
    shown = report.table(top=top, only_flagged=only_flagged)
    if not shown.rows:
        return parts
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    for col in shown.columns:
        table.add_column(col.header, justify=col.align, no_wrap=not col.wrap)
    status = [c.name for c in shown.columns].index("status")
    for r in shown.rows:
        cells = [escape(text) for text in shown.cells(r)]
        mark = f" {FIRST}" if shown.is_first(r) else ""
        cells[status] = f"[{STATUS_STYLE.get(r.status, '')}]{r.status}[/]{mark}"
        table.add_row(*cells, style="on grey15" if r.flagged else None)
    parts.append(table)
    if shown.more:
        parts.append(shown.more)
    return parts


def print_scan(report: ScanReport, *, top: int | None = None) -> None:
    """The scan summary, then rows worst first."""
    con = _console()
    con.print(f"[{'bold green' if report else 'bold red'}]{escape(report.summary)}[/]")
    for n in report.notes:
        con.print(f"[yellow]note:[/] {escape(n)}")
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    for col in ("#", "layer", "status", "absmax", "headroom bits", "nan", "inf",
                "saturated", "fp16 flush", "origin"):
        table.add_column(col, justify="left" if col in ("layer", "status", "origin") else "right",
                         no_wrap=True)
    style = {"NAN": "bold red", "OVERFLOW": "bold red", "SATURATED": "red", "LOW": "yellow",
             "OK": "green"}
    for r in report.rows[:top] if top else report.rows:
        flush = "-" if r.flush_share is None else f"{r.flush_share:.2%}"
        table.add_row(str(r.order), escape(r.key), f"[{style[r.status]}]{r.status}[/]",
                      _fmt(r.absmax), r.headroom_text, str(r.nan), str(r.inf),
                      str(r.saturated), flush, r.origin)
    con.print(table)


def print_suggestion(s: Suggestion) -> None:
    """Before/after table and the policy to apply."""
    con = _console()
    con.print(f"[{'bold green' if s.fixed else 'bold red'}]{escape(s.message)}[/]")
    for step in s.steps:
        con.print(f"  keep {escape(', '.join(step.kept))}: {escape(step.report.summary)}")
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    for col in ("", "before", "after"):
        table.add_column(col)
    for row in s.table():
        table.add_row(*(escape(c) for c in row))
    con.print(table)
    if s.holdout is not None:
        con.print(f"  held-back prompts: {escape(s.holdout.summary)}")
    for flags, rep in s.alternatives:
        con.print(f"  instead, {escape(flags)}: {escape(rep.summary)}")
    if s.fixed and s.policy:
        patterns = list(s.general or s.policy)
        con.print("capture: " + escape(s.cli_flags))
        how = ("a model loaded with from_pretrained(..., dtype=...) keeps what auto keeps"
               if s.keep_fp32[:1] == ("auto",) else "after a wholesale model.half()")
        con.print(f"python: precision.keep_fp32(model, {escape(repr(patterns))})  # {how}")
        if s.general:
            con.print(f"(the general form covers every block: {len(s.kept_modules)} module(s); "
                      f"the minimal set is {escape(', '.join(s.policy))})")


def print_isolate(report: IsolateReport, *, only_flagged: bool = False) -> None:
    """Local error next to accumulated error, with the verdict per module output."""
    con = _console()
    con.print(f"[{'bold green' if report else 'bold red'}]{escape(report.summary)}[/]")
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    for col in ("#", "layer", "verdict", "local rel_l2", "local", "accumulated rel_l2",
                "accumulated", "why"):
        table.add_column(col, no_wrap=col != "why")
    style = {"culprit": "bold red", "encloses": "red", "unknown": "bold magenta",
             "inherited": "yellow", "ok": "green"}
    for r in report.rows:
        if only_flagged and r.verdict == "ok":
            continue
        acc = r.accumulated
        acc_m = acc.metrics if acc is not None else None
        table.add_row("-" if r.order < 0 else str(r.order), escape(r.key),
                      f"[{style[r.verdict]}]{r.verdict}[/]",
                      _fmt(r.local.measured("rel_l2") if r.local else None), r.local_status,
                      _fmt(acc_m.measured("rel_l2") if acc_m else None),
                      acc.status if acc else "-",
                      escape(r.local_reason or (acc.reason if acc else "")))
    con.print(table)
    for note in report.notes:
        con.print(f"note: {escape(note)}")


def print_check(report: CheckReport, *, only_flagged: bool = False,
                top: int | None = None) -> None:
    """Each operation run again: the device's and the CPU's error against float64."""
    con = _console()
    con.print(f"[{'bold green' if report else 'bold red'}]{escape(report.summary)}[/]")
    rows = [o for o in report.ops if not only_flagged or o.status in ("DRIFT", "OVERFLOW")]
    if top is not None:
        rows = sorted(rows, key=lambda o: (o.status not in ("DRIFT", "OVERFLOW"),
                                           -o.ratio if o.ratio == o.ratio else 0))[:top]
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    for col in ("operation", "status", "dtype", "device err", "CPU err", "ratio", "why"):
        table.add_column(col, no_wrap=col != "why")
    style = {"OK": "green", "DRIFT": "bold red", "OVERFLOW": "bold red", "SKIPPED": "magenta"}
    for o in rows:
        table.add_row(escape(o.key), f"[{style[o.status]}]{o.status}[/]", o.dtype,
                      _fmt(o.device_err), _fmt(o.cpu_err),
                      "-" if o.ratio != o.ratio else f"{o.ratio:.3g}", escape(o.reason))
    con.print(table)
    if report.skipped_without_inputs:
        con.print(f"note: {report.skipped_without_inputs} operation record(s) have no inputs "
                  "recorded (their modules did not match --inputs): not checked")

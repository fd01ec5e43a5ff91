"""``precision report``: one self-contained HTML file (inline SVG, CSS and script, no network).

Sections: the verdict with the first divergence (linked to its row) and counts by status,
error versus depth, headroom to the limit of the dtype that ran, the logits panel, T5's
position-bias difference against the expected noise, and the full table, sortable by
clicking a header and filterable by text or to flagged rows. When anything is flagged the
table opens on the flagged rows alone, the first divergence marked. Hovering a point of a
plot names its layer (an SVG ``<title>``, no script needed).
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from typing import Any

from ..dumps.dump import Dump
from ..dumps.keys import parse_key
from ..judge.measure.row import Row
from ..judge.report import Report
from ..judge.table import FIRST, PAGE, Column, Table, columns
from . import plots

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#1f2328}
main{max-width:1600px;margin:0 auto}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}
.verdict{padding:10px 14px;border-radius:6px;font-weight:600}
.verdict a{color:inherit}
.PASS{background:#dafbe1;color:#1a7f37}.FAIL{background:#ffebe9;color:#cf222e}
.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:12px;width:100%}
th,td{padding:3px 6px;border-bottom:1px solid #d0d7de;text-align:left;white-space:nowrap}
th{cursor:pointer;background:#f6f8fa;position:sticky;top:0}
td.why{white-space:normal;min-width:24em}td.layer{white-space:normal}
.s-OK{color:#1a7f37}.s-DRIFT{color:#9a6700;font-weight:600}.s-MISSING{color:#6e7781}
.s-OVERFLOW,.s-NAN{color:#cf222e;font-weight:600}.s-MISMATCH{color:#8250df;font-weight:600}
tr.flagged{background:#fff8f0}tr.op td.layer{padding-left:22px;color:#57606a}
.counts td{border:none;padding-right:18px}
tr.first{background:#ffebe9;outline:2px solid #cf222e}tr.first:target{outline-width:3px}
.mark{color:#cf222e;font-weight:700}
svg{max-width:100%;height:auto}.muted{color:#6e7781}
.hits :hover{fill-opacity:.25;stroke:#1f2328;stroke-width:1}
"""

SCRIPT = """
(function(){
  const table=document.getElementById('rows');
  const body=table.tBodies[0];
  let dir=1, last=-1;
  table.tHead.addEventListener('click', e=>{
    const th=e.target.closest('th'); if(!th) return;
    const col=[...th.parentNode.children].indexOf(th);
    dir=(col===last)?-dir:1; last=col;
    const rows=[...body.rows];
    rows.sort((a,b)=>{
      const x=a.cells[col].dataset.v, y=b.cells[col].dataset.v;
      const nx=parseFloat(x), ny=parseFloat(y);
      if(!isNaN(nx)&&!isNaN(ny)) return (nx-ny)*dir;
      return x.localeCompare(y)*dir;
    });
    rows.forEach(r=>body.appendChild(r));
  });
  const text=document.getElementById('filter'), only=document.getElementById('flagged');
  const ops=document.getElementById('ops');
  const shown=document.getElementById('shown');
  function apply(){
    const q=text.value.toLowerCase();
    let n=0;
    for(const r of body.rows){
      const hit=r.cells[1].dataset.v.toLowerCase().includes(q);
      const op=r.classList.contains('op')&&!r.classList.contains('flagged');
      r.hidden=!(hit&&(!only.checked||r.classList.contains('flagged'))&&(!op||!ops||ops.checked));
      n+=!r.hidden;
    }
    shown.textContent=n+' of '+body.rows.length+' rows shown';
  }
  text.addEventListener('input', apply); only.addEventListener('change', apply);
  if(ops) ops.addEventListener('change', apply);
  const first=document.getElementById('first-divergence');
  document.querySelectorAll('a[href="#first-divergence"]').forEach(a=>a.addEventListener(
    'click', ()=>{ if(first&&first.hidden){ only.checked=false; text.value=''; apply(); } }));
  apply();
  document.body.dataset.ready='1';
})();
"""

FIRST_MARK = f'<span class="mark" title="first divergence">{FIRST}</span>'

#: the cells' classes by column: a status's colour, and the columns that may break
CSS = {"key": "layer", "reason": "why"}


def _cell(column: Column, row: Row) -> str:
    """One cell; ``data-v`` holds the sort key (a number's value, else its text). Layer names
    may break after their dots."""
    value, shown = column.value(row), column.text(row)
    if isinstance(value, float):
        sort = repr(value) if math.isfinite(value) else ("1e999" if value > 0 else "-1e999")
    else:
        sort = "-1e999" if value is None else shown
    css = f"s-{row.status}" if column.name == "status" else CSS.get(column.name, "")
    cls = f' class="{css}"' if css else ""
    text = html.escape(shown)
    if column.name == "key":
        text = text.replace(".", ".<wbr>")
    return f'<td{cls} data-v="{html.escape(sort)}">{text}</td>'


def _table(report: Report, only_flagged: bool) -> str:
    """The rows in execution order; the first divergence has ``id="first-divergence"`` and a
    mark; with ``only_flagged`` the others start ``hidden`` (the page works without script),
    and so do operation rows (``class="op"``, shown under their module with the
    "operations" box) that are not flagged."""
    shown = Table(columns(PAGE), report.rows, report.first_divergence)
    head = "".join(f"<th>{html.escape(name)}</th>" for name in shown.headers)
    body = []
    for r in shown.rows:
        cells = []
        is_first = shown.is_first(r)
        for col in shown.columns:
            cell = _cell(col, r)
            if col.name == "status" and is_first:
                cell = cell.replace("</td>", f" {FIRST_MARK}</td>")
            cells.append(cell)
        css = " ".join(c for c in ("flagged" if r.flagged else "",
                                   "first" if is_first else "",
                                   "op" if parse_key(r.key).op else "") if c)
        attrs = f' class="{css}"' + (' id="first-divergence"' if is_first else "") + (
            " hidden" if (only_flagged or parse_key(r.key).op) and not r.flagged else "")
        body.append(f"<tr{attrs}>{''.join(cells)}</tr>")
    return (f'<div class="scroll"><table id="rows"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _banner(report: Report) -> str:
    """The summary line; the first divergence's name links to its table row."""
    text = html.escape(report.summary)
    first = report.first_divergence
    if first is not None:
        name = html.escape(first.key)
        text = text.replace(f"first divergence at {name}",
                            f'first divergence at <a href="#first-divergence">{name}</a>', 1)
    return f"<p class='verdict {'PASS' if report else 'FAIL'}'>{text}</p>"


def _figure_html(make: Callable[[], Any], caption: str) -> str:
    fig = make()
    if fig is None:
        return ""
    return f"<h2>{html.escape(caption)}</h2>{plots.to_svg(fig)}"


def build(report: Report, base: Dump, target: Dump) -> str:
    """The whole HTML page for ``report`` (``base``/``target`` feed the bias heatmap)."""
    counts = "".join(f"<td>{html.escape(k)}: <b>{v}</b></td>"
                     for k, v in report.counts().items() if v)
    warnings = "".join(f"<p class='muted'>warning: {html.escape(w)}</p>"
                       for w in report.warnings)
    warnings += "".join(f"<p class='muted'>note: {html.escape(n)}</p>" for n in report.notes)
    info = report.info
    def side(s: dict[str, Any]) -> str:
        known = ", ".join(str(v) for v in (s.get("dtype"), s.get("device")) if v)
        return html.escape(f"{s.get('path')}" + (f" ({known})" if known else ""))

    sides = " vs ".join(side(info.get(k, {})) for k in ("base", "target"))
    lg = next((r.logits for r in report.rows if r.logits), None)
    logits_line = "" if lg is None else (
        f"<p>Logits: top-1 agreement {lg.top1_agreement:.2%} ({lg.hard_flips} flips beyond a "
        f"near-tie), top-{lg.k} overlap {lg.topk_overlap:.2%}, mean KL {lg.kl_mean:.3g}, "
        f"max KL {lg.kl_max:.3g}.</p>")
    only = bool(report.flagged)
    has_ops = any(parse_key(r.key).op for r in report.rows)
    shown = (f"{len(report.flagged) if only else len(report.rows)} of {len(report.rows)} "
             "rows shown")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>precision: {html.escape(report.summary[:80])}</title>",
        f"<style>{STYLE}</style></head><body><main>",
        "<h1>precision comparison</h1>",
        f"<p class='muted'>{sides}</p>",
        _banner(report),
        f"<table class='counts'><tr>{counts}</tr></table>{warnings}{logits_line}",
        _figure_html(lambda: plots.error_vs_depth(report), "Error versus depth"
                     + (" (modules; operations in the table)" if has_ops else "")),
        _figure_html(lambda: plots.headroom(report), "Headroom"),
        _figure_html(lambda: plots.logits_panel(report, base), "Logits"),
        _figure_html(lambda: plots.position_bias_heatmap(base, target, report.profile),
                     "T5 relative position bias"),
        "<h2>All layers</h2>",
        "<p><input id='filter' placeholder='filter layers' size='40'> "
        f"<label><input type='checkbox' id='flagged'{' checked' if only else ''}> "
        f"only flagged</label> "
        + ("<label><input type='checkbox' id='ops'> operations (each under its module; "
           "flagged ones always shown)</label> " if has_ops else "")
        + f"<span id='shown' class='muted'>{shown}</span> "
        "<span class='muted'>· click a header to sort · hover a plot's point to name "
        "it</span></p>",
        _table(report, only),
        f"<script>{SCRIPT}</script></main></body></html>",
    ]
    return "\n".join(p for p in parts if p)

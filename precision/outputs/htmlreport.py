"""``precision report``: one self-contained HTML file (inline SVG, CSS and script, no network).

Sections: the verdict with the first divergence and counts by status, error versus depth,
headroom to the fp16 limit, the logits panel, T5's position-bias heatmap, and the full
table, sortable by clicking a header and filterable by text or to flagged rows.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from typing import Any

from ..dumps.dump import Dump
from ..judge.report import Report, Row
from . import plots

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1200px;color:#1f2328}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}
.verdict{padding:10px 14px;border-radius:6px;font-weight:600}
.PASS{background:#dafbe1;color:#1a7f37}.FAIL{background:#ffebe9;color:#cf222e}
table{border-collapse:collapse;font-size:12px;width:100%}
th,td{padding:3px 8px;border-bottom:1px solid #d0d7de;text-align:left;white-space:nowrap}
th{cursor:pointer;background:#f6f8fa;position:sticky;top:0}
td.why{white-space:normal}
.s-OK{color:#1a7f37}.s-DRIFT{color:#9a6700;font-weight:600}.s-MISSING{color:#6e7781}
.s-OVERFLOW,.s-NAN{color:#cf222e;font-weight:600}.s-MISMATCH{color:#8250df;font-weight:600}
tr.flagged{background:#fff8f0}.counts td{border:none;padding-right:18px}
svg{max-width:100%;height:auto}.muted{color:#6e7781}
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
  function apply(){
    const q=text.value.toLowerCase();
    for(const r of body.rows){
      const hit=r.cells[1].dataset.v.toLowerCase().includes(q);
      r.hidden=!(hit&&(!only.checked||r.classList.contains('flagged')));
    }
  }
  text.addEventListener('input', apply); only.addEventListener('change', apply);
  document.body.dataset.ready='1';
})();
"""

COLUMNS: list[tuple[str, Callable[[Row], Any]]] = [
    ("#", lambda r: r.order),
    ("layer", lambda r: r.key),
    ("status", lambda r: r.status),
    ("shape", lambda r: "x".join(map(str, r.shape))),
    ("dtypes", lambda r: f"{r.base_dtype}/{r.target_dtype}"),
    ("rel_l2", lambda r: r.metrics.rel_l2 if r.metrics else None),
    ("1-cos", lambda r: r.metrics.one_minus_cos if r.metrics else None),
    ("max_abs", lambda r: r.metrics.max_abs if r.metrics else None),
    ("snr dB", lambda r: r.metrics.snr_db if r.metrics else None),
    ("max_ulp", lambda r: r.metrics.max_ulp if r.metrics else None),
    ("absmax tgt", lambda r: r.metrics.absmax_target if r.metrics else None),
    ("growth", lambda r: r.growth),
    ("why", lambda r: r.reason),
]


def _cell(value: Any, css: str = "") -> str:
    if isinstance(value, float):
        sort = repr(value) if math.isfinite(value) else ("1e999" if value > 0 else "-1e999")
        shown = f"{value:.4g}"
    elif value is None:
        sort, shown = "-1e999", "-"
    else:
        sort = shown = str(value)
    cls = f' class="{css}"' if css else ""
    return f'<td{cls} data-v="{html.escape(sort)}">{html.escape(shown)}</td>'


def _table(report: Report) -> str:
    head = "".join(f"<th>{html.escape(name)}</th>" for name, _ in COLUMNS)
    body = []
    for r in report.rows:
        cells = []
        for name, get in COLUMNS:
            css = f"s-{r.status}" if name == "status" else ("why" if name == "why" else "")
            cells.append(_cell(get(r), css))
        body.append(f'<tr class="{"flagged" if r.flagged else ""}">{"".join(cells)}</tr>')
    return (f'<table id="rows"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def _figure_html(make: Callable[[], Any], caption: str) -> str:
    fig = make()
    if fig is None:
        return ""
    return f"<h2>{html.escape(caption)}</h2>{plots.to_svg(fig)}"


def build(report: Report, base: Dump, target: Dump) -> str:
    """The whole HTML page for ``report`` (``base``/``target`` feed the bias heatmap)."""
    verdict = "PASS" if report else "FAIL"
    counts = "".join(f"<td>{html.escape(k)}: <b>{v}</b></td>"
                     for k, v in report.counts().items() if v)
    warnings = "".join(f"<p class='muted'>warning: {html.escape(w)}</p>"
                       for w in report.warnings)
    info = report.info
    sides = " vs ".join(
        html.escape(f"{s.get('path')} ({s.get('dtype')}, {s.get('device')})")
        for s in (info.get("base", {}), info.get("target", {})))
    lg = next((r.logits for r in report.rows if r.logits), None)
    logits_line = "" if lg is None else (
        f"<p>Logits: top-1 agreement {lg.top1_agreement:.2%} ({lg.hard_flips} flips beyond a "
        f"near-tie), top-{lg.k} overlap {lg.topk_overlap:.2%}, mean KL {lg.kl_mean:.3g}, "
        f"max KL {lg.kl_max:.3g}.</p>")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>precision: {html.escape(report.summary[:80])}</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>precision comparison</h1>",
        f"<p class='muted'>{sides}</p>",
        f"<p class='verdict {verdict}'>{html.escape(report.summary)}</p>",
        f"<table class='counts'><tr>{counts}</tr></table>{warnings}{logits_line}",
        _figure_html(lambda: plots.error_vs_depth(report), "Error versus depth"),
        _figure_html(lambda: plots.headroom(report), "Headroom"),
        _figure_html(lambda: plots.logits_panel(report), "Logits"),
        _figure_html(lambda: plots.position_bias_heatmap(base, target),
                     "T5 relative position bias"),
        "<h2>All layers</h2>",
        "<p><input id='filter' placeholder='filter layers' size='40'> "
        "<label><input type='checkbox' id='flagged'> only flagged</label> "
        "<span class='muted'>click a header to sort</span></p>",
        _table(report),
        f"<script>{SCRIPT}</script></body></html>",
    ]
    return "\n".join(p for p in parts if p)

"""``report.html`` of a port: one page, the verdict first, then each stage, linking to the
per-layer comparison reports (:mod:`precision.outputs.htmlreport`) beside it."""

from __future__ import annotations

import html
from typing import Any

from ...outputs.htmlreport import STYLE
from .result import PortResult

#: each stage's heading on the page, in order
SECTIONS = (("baseline", "1. Baseline"), ("target", "2. Target"), ("compare", "3. Compare"),
            ("consistency", "4. Self-consistency"), ("scan", "5a. Overflow scan"),
            ("isolate", "5b. Isolate"), ("suggest", "5c. Suggest"),
            ("fix", "5d. The target with the fix"))


def _e(x: object) -> str:
    return html.escape(str(x))


def page(result: PortResult, outcomes: dict[str, dict[str, Any]]) -> str:
    """The whole page (self-contained: inline CSS, links to files in the same folder)."""
    css = "PASS" if result else "FAIL"
    rows = "".join(f"<tr><td>{_e(c.name)}</td><td class='s-{_e(c.status)}'>{_e(c.status)}"
                   f"</td><td class='why'>{_e(c.evidence)}</td></tr>" for c in result.checks)
    m, t = result.model, result.target
    parts = ["<!doctype html><html><head><meta charset='utf-8'>",
             f"<title>precision port: {_e(result.verdict.upper())} {_e(m.get('name'))}</title>",
             f"<style>{STYLE}.s-PASS{{color:#1a7f37}}.s-FAIL{{color:#cf222e;font-weight:600}}"
             ".s-SKIP,.s-INFO{color:#6e7781}</style></head><body><main>",
             f"<h1>Port of {_e(m.get('name'))} to {_e(t.get('device_name'))} "
             f"({_e(t.get('dtype'))})</h1>",
             f"<p class='verdict {css}'>{_e(result.verdict.upper())}: {_e(result.message)}</p>",
             "<table><thead><tr><th>check</th><th>status</th><th>evidence</th></tr></thead>"
             f"<tbody>{rows}</tbody></table>",
             "<p class='muted'>" + ", ".join(f"{_e(k)} {_e(v)}" for k, v in
                                             result.versions.items()) + "</p>"]
    parts += [f"<p class='muted'>note: {_e(n)}</p>" for n in result.notes]
    links = {"compare": result.files.get("compare_html"),
             "fix": result.files.get("fixed_compare_html")}
    times = {s.name: ("reused" if s.reused else f"{s.seconds:.1f} s") for s in result.stages}
    for name, title in SECTIONS:
        o = outcomes.get(name)
        if o is None:
            continue
        parts.append(f"<h2 id='{name}'>{_e(title)} <span class='muted'>"
                     f"({_e(times.get(name, ''))})</span></h2>")
        text = o.get("summary") or o.get("message")
        if text:
            parts.append(f"<p>{_e(text)}</p>")
        if name in ("baseline", "target"):
            parts.append(f"<p>{_e(o['dtype'])} on {_e(o['device_name'])}, {o['records']} "
                         f"records: <code>{_e(', '.join(o['files']))}</code></p>")
        if name == "suggest":
            parts += [f"<p class='muted'>keep {_e(', '.join(st['kept']))}: {_e(st['summary'])}"
                      "</p>" for st in o.get("steps", [])]
        if links.get(name):
            parts.append(f"<p><a href='{_e(links[name])}'>the per-layer report</a></p>")
    parts.append("</main></body></html>")
    return "\n".join(parts)

"""What ``precision port`` found: the checks, the fix, the environment; as JSON (port.json),
Markdown (PORT.md) and HTML (Jupyter).

port.json's schema is :data:`SCHEMA_VERSION` (docs/json-schema.md, "precision port");
:meth:`PortResult.to_dict` writes it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...judge.html import table
from .stages import StageRun

#: port.json's schema version: changes when a field changes meaning or disappears
SCHEMA_VERSION = 1
#: what each verdict means, and its exit code
VERDICTS = {"pass": 0, "fixed": 1, "fail": 1}


@dataclass(frozen=True)
class Check:
    """One row of the port's table: a check, its status (PASS, FAIL, SKIP, INFO) and the
    evidence in a few words."""

    name: str
    status: str
    evidence: str

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status, "evidence": self.evidence}


@dataclass(frozen=True)
class PortResult:
    """A port's verdict: ``pass`` (the target matches the baseline and is deterministic),
    ``fixed`` (it fails as it is and passes with the verified fix) or ``fail``.

    Truthy only for ``pass``: a port that needs a fix is not a pass until the fix is applied.
    """

    verdict: str
    message: str
    folder: str
    model: Mapping[str, Any]
    baseline: Mapping[str, Any]
    target: Mapping[str, Any]
    versions: Mapping[str, str]
    checks: tuple[Check, ...]
    fix: Mapping[str, Any] | None
    stages: tuple[StageRun, ...]
    files: Mapping[str, str]
    notes: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return self.verdict == "pass"

    @property
    def exit_code(self) -> int:
        """0 pass, 1 fails or passes only with the fix (``precision port``'s exit code)."""
        return VERDICTS[self.verdict]

    def to_dict(self) -> dict[str, Any]:
        """port.json (docs/json-schema.md)."""
        return {"schema_version": SCHEMA_VERSION, "verdict": self.verdict,
                "passed": bool(self), "exit_code": self.exit_code, "message": self.message,
                "model": dict(self.model), "baseline": dict(self.baseline),
                "target": dict(self.target), "versions": dict(self.versions),
                "checks": [c.as_dict() for c in self.checks],
                "fix": dict(self.fix) if self.fix is not None else None,
                "stages": [s.as_dict() for s in self.stages], "files": dict(self.files),
                "notes": list(self.notes)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, default=str) + "\n"

    def to_markdown(self) -> str:
        """PORT.md: the table a person pastes in a pull request."""
        m, b, t = self.model, self.baseline, self.target
        lines = [f"## Port of `{m.get('name')}` to {t.get('device_name')} ({t.get('dtype')})",
                 "", f"**{self.verdict.upper()}**: {_md(self.message)}", "",
                 "| | |", "|---|---|",
                 f"| model | `{_md(str(m.get('name')))}` ({_md(str(m.get('class')))}, "
                 f"config hash `{m.get('config_hash')}`) |",
                 f"| parameters | {_count(m.get('parameters'))} |",
                 f"| target | {_md(str(t.get('device_name')))} (`{t.get('device')}`), "
                 f"{t.get('dtype')}, engine {t.get('engine')}"
                 + (f", --keep-fp32 {' '.join(t['keep_fp32'])}" if t.get("keep_fp32") else "")
                 + " |",
                 f"| baseline | {_md(str(b.get('device_name')))} (`{b.get('device')}`), fp32"
                 + (f", with its {', '.join(b.get('references', []))} reference" if
                    b.get("references") else "") + " |",
                 "| versions | " + ", ".join(f"{k} {v}" for k, v in self.versions.items())
                 + " |", "", "| check | status | evidence |", "|---|---|---|"]
        lines += [f"| {c.name} | {c.status} | {_md(c.evidence)} |" for c in self.checks]
        if self.fix is not None:
            lines += ["", f"**Fix** ({'verified' if self.fix.get('passed') else 'not verified'}"
                      f" on the target, the baseline's inputs): `{self.fix.get('capture_args')}`"]
        lines += ["", *(f"> note: {_md(n)}" for n in self.notes)] if self.notes else []
        lines += ["", f"Made by `precision port` ({len(self.stages)} stages); the per-layer "
                  f"report is `{self.files.get('compare_html')}`."]
        return "\n".join(lines) + "\n"

    def _repr_html_(self) -> str:
        """Jupyter: the verdict and the checks."""
        title = f"{self.verdict.upper()}: {self.message}"
        return table(title, ["check", "status", "evidence"],
                     [(c.name, c.status, c.evidence) for c in self.checks])

    def __repr__(self) -> str:
        return f"<PortResult {self.verdict.upper()} {self.folder}: {self.message}>"


def _md(text: str) -> str:
    """Text safe in a Markdown table cell."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")


def _count(n: object) -> str:
    """``134515008`` -> ``134.5M``; unknown -> ``?``."""
    if not isinstance(n, int):
        return "?"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"

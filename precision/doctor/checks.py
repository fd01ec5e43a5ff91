"""Run a model to diagnose and fix low-precision trouble (torch needed).

- :func:`scan_model`: a stats capture with every module's inputs, scanned for headroom.
- :func:`consistency`: the same inputs several times on one device, compared bitwise.
- :func:`suggest`: find the smallest set of modules to keep in fp32, greedily: run the
  target dtype, take the first module that overflows (or the first divergence), keep it in
  fp32, run again, until the comparison against the fp32 baseline is clean or the budget is
  spent. Every step is a real re-run and a real comparison; the policy that comes out is
  verified, and so is its generalised form (block indices replaced by ``*``).
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..dumps import load
from ..errors import InputError
from ..judge.compare import compare
from ..judge.consistency import ConsistencyReport, consistency_of
from ..judge.report import Report
from ..judge.scan import ScanReport, scan
from ..runtime.runner import CaptureOptions, run_capture

Log = Callable[[str], None]


def _quiet(_msg: str) -> None:
    """Discard progress messages."""


def scan_model(opts: CaptureOptions, *, against: str | None = None,
               log: Log = _quiet) -> ScanReport:
    """Capture ``opts.model`` in stats mode with module inputs, then :func:`scan` it."""
    with tempfile.TemporaryDirectory(prefix="precision-scan-") as tmp:
        keep = Path(opts.output) if opts.output else None
        path = keep or Path(tmp) / "scan.st"
        run_capture(replace(opts, output=str(path), mode="stats", inputs=("*",), detail=True),
                    log)
        return scan(load(path), against=against)


@dataclass(frozen=True)
class Step:
    """One re-run: the fp32 policy tried and what the comparison said."""

    kept: tuple[str, ...]
    report: Report


@dataclass(frozen=True)
class Suggestion:
    """What :func:`suggest` found: a verified policy, or why there is none within budget."""

    fixed: bool
    policy: tuple[str, ...]
    before: Report
    after: Report
    steps: tuple[Step, ...]
    general: tuple[str, ...] = ()
    general_report: Report | None = None
    message: str = ""
    notes: tuple[str, ...] = field(default=())

    def _repr_html_(self) -> str:
        """Jupyter: the before/after table and the policy."""
        from ..judge.html import table

        title = self.message + (f" - policy: {self.cli_flags}" if self.policy else "")
        return table(title, ["", "before", "after"], self.table())

    @property
    def cli_flags(self) -> str:
        """The policy as ``precision capture`` flags."""
        return " ".join(f"--keep-fp32 '{p}'" for p in (self.general or self.policy))

    def table(self) -> list[tuple[str, str, str]]:
        """(measure, before, after) rows for a before/after display."""
        def first(r: Report) -> str:
            return r.first_divergence.key if r.first_divergence else "-"

        def worst(r: Report) -> str:
            vals = [x.metrics.rel_l2 for x in r.rows if x.metrics]
            return f"{max(vals):.3g}" if vals else "-"

        def logits(r: Report) -> str:
            lg = next((x.logits for x in r.rows if x.logits), None)
            return f"{lg.kl_mean:.3g}" if lg else "-"

        after = self.general_report or self.after
        rows = [("verdict", "PASS" if self.before else "FAIL", "PASS" if after else "FAIL")]
        for status in ("OVERFLOW", "NAN", "DRIFT"):
            rows.append((status, str(self.before.counts()[status]), str(after.counts()[status])))
        rows += [("first divergence", first(self.before), first(after)),
                 ("worst rel_l2", worst(self.before), worst(after)),
                 ("logits mean KL", logits(self.before), logits(after))]
        return rows


def generalise(modules: Sequence[str]) -> tuple[str, ...]:
    """``encoder.block.2.layer.1.DenseReluDense.wo`` -> ``*.block.*.layer.*.DenseReluDense.wo``

    Numeric path components become ``*`` and the stack name too, so the pattern covers the
    same module type in every block of encoder and decoder alike.
    """
    out = []
    for m in modules:
        parts = ["*" if p.isdigit() else p for p in m.split(".")]
        if len(parts) > 2 and "*" in parts[1:]:
            parts[0] = "*"
        pattern = re.sub(r"(\*\.)+\*", "*", ".".join(parts))
        if pattern not in out:
            out.append(pattern)
    return tuple(out)


def _culprit(report: Report) -> str | None:
    """The module to keep in fp32 next: first overflow/NaN, else the first divergence."""
    rows = [r for r in report.rows if r.status in ("OVERFLOW", "NAN")] or (
        [report.first_divergence] if report.first_divergence else [])
    for r in rows:
        module = r.key.split(":")[0]
        if module not in ("root", "input"):
            return module
    return None


def suggest(model: str, *, dtype: str = "fp16", device: str = "cpu",
            prompts: Sequence[str] = (), prompts_file: str | None = None,
            base_policy: str = "none", budget: int = 8, max_new_tokens: int = 8,
            log: Log = _quiet) -> Suggestion:
    """Find and verify a small keep-fp32 policy that makes ``dtype`` match fp32."""
    with tempfile.TemporaryDirectory(prefix="precision-suggest-") as tmp:
        work = Path(tmp)
        common = {"model": model, "device": device, "prompts": prompts,
                  "prompts_file": prompts_file, "max_new_tokens": max_new_tokens}

        def run(name: str, dt: str, keep: Sequence[str], replay: str | None) -> Path:
            return run_capture(CaptureOptions(output=str(work / f"{name}.st"), dtype=dt,
                                              keep_fp32=tuple(keep), replay=replay,
                                              **common), _quiet)  # type: ignore[arg-type]

        log(f"capturing the fp32 baseline of {model}")
        base = run("base", "fp32", ("auto",), None)
        log(f"capturing {dtype} with --keep-fp32 {base_policy}")
        before = compare(base, run("step0", dtype, (base_policy,), str(base)))
        steps: list[Step] = []
        kept: list[str] = []
        report = before
        while not report:
            culprit = _culprit(report)
            if culprit is None or culprit in kept or len(kept) >= budget:
                if culprit is None:
                    why = "the trouble is not in any module"
                elif culprit in kept:
                    why = f"keeping {culprit} in fp32 did not remove its error"
                else:
                    why = f"the budget of {budget} module(s) is spent (next: {culprit})"
                return Suggestion(False, tuple(kept), before, report, tuple(steps),
                                  message=f"no fp32 policy within budget fixes it: {why}")
            kept.append(culprit)
            log(f"keeping {', '.join(kept)} in fp32 and running again")
            report = compare(base, run(f"step{len(kept)}", dtype, (base_policy, *kept),
                                       str(base)))
            steps.append(Step(tuple(kept), report))
        general = generalise(kept)
        general_report = None
        if kept and general != tuple(kept):
            log(f"checking the general form {', '.join(general)}")
            general_report = compare(base, run("general", dtype, (base_policy, *general),
                                               str(base)))
            if not general_report:
                general, general_report = (), None
        message = ("nothing to fix: the run is within the expected noise" if not kept else
                   f"keeping {len(kept)} module(s) in fp32 fixes it")
        return Suggestion(True, tuple(kept), before, report, tuple(steps), general,
                          general_report, message)


def consistency(model: str, *, repeat: int = 3, dtype: str = "bf16", device: str = "cpu",
                prompts: Sequence[str] = (), prompts_file: str | None = None,
                max_new_tokens: int = 8, mode: str = "full",
                log: Log = _quiet) -> ConsistencyReport:
    """Run the same inputs ``repeat`` times on one device; compare every run with the first."""
    if repeat < 2:
        raise InputError("--repeat must be at least 2 to compare runs")
    with tempfile.TemporaryDirectory(prefix="precision-consistency-") as tmp:
        paths: list[Path] = []
        for i in range(repeat):
            log(f"run {i + 1} of {repeat}")
            paths.append(run_capture(CaptureOptions(
                model=model, output=str(Path(tmp) / f"run{i}.st"), device=device, dtype=dtype,
                prompts=prompts, prompts_file=prompts_file, max_new_tokens=max_new_tokens,
                mode=mode, replay=str(paths[0]) if paths else None), _quiet))
        return consistency_of([load(p) for p in paths])

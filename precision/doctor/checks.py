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
import shlex
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..dtypes import canonical, short
from ..dumps import load, reference_path
from ..dumps.keys import parse_key
from ..errors import InputError, option
from ..judge.compare import compare
from ..judge.consistency import ConsistencyReport, consistency_of
from ..judge.html import Summarised
from ..judge.report import Report
from ..judge.scan import ScanReport, scan
from ..runtime.models.load import read_prompts
from ..runtime.run.runner import CaptureOptions, run_capture

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


@dataclass(frozen=True, repr=False)
class Suggestion(Summarised):
    """What :func:`suggest` found: a verified policy, or why there is none within budget.

    ``keep_fp32`` is exactly what the verifying capture was given (``auto``/``none`` and the
    globs), ``kept_modules`` the modules it kept in fp32 beyond that base, and ``holdout``
    the check of the policy on prompts it was not fitted on (``None`` when none were held).
    """

    fixed: bool
    policy: tuple[str, ...]
    before: Report
    after: Report
    steps: tuple[Step, ...]
    general: tuple[str, ...] = ()
    general_report: Report | None = None
    message: str = ""
    notes: tuple[str, ...] = field(default=())
    keep_fp32: tuple[str, ...] = ()
    kept_modules: tuple[str, ...] = ()
    holdout: Report | None = None
    #: when no policy within budget fixes it: the other fixes tried, as (capture flags,
    #: report), e.g. ``--dtype bf16`` and the residual stream in fp32
    alternatives: tuple[tuple[str, Report], ...] = ()

    @property
    def summary(self) -> str:
        """The message, and the policy's capture flags when there is one."""
        return self.message + (f" - policy: {self.cli_flags}" if self.policy else "")

    def __bool__(self) -> bool:
        """Whether a policy was found and verified (:attr:`fixed`)."""
        return self.fixed

    def _repr_html_(self) -> str:
        """Jupyter: the before/after table and the policy."""
        from ..judge.html import table

        return table(self.summary, ["", "before", "after"], self.table())

    @property
    def cli_flags(self) -> str:
        """The verified policy as ``precision capture`` flags, base policy included."""
        return " ".join(f"--keep-fp32 {shlex.quote(p)}" for p in self.keep_fp32)

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-ready data (``precision suggest --json``)."""
        def summary(r: Report | None) -> str | None:
            return r.summary if r is not None else None

        return {"fixed": self.fixed, "message": self.message, "keep_fp32": list(self.keep_fp32),
                "capture_args": self.cli_flags, "kept_modules": list(self.kept_modules),
                "minimal": list(self.policy), "general": list(self.general),
                "before": summary(self.before), "after": summary(self.general_report
                                                                 or self.after),
                "holdout": summary(self.holdout), "notes": list(self.notes),
                "alternatives": [{"capture_args": a, "passed": bool(r), "summary": r.summary}
                                 for a, r in self.alternatives],
                "steps": [{"kept": list(st.kept), "summary": st.report.summary}
                          for st in self.steps]}

    def table(self) -> list[tuple[str, str, str]]:
        """(measure, before, after) rows for a before/after display."""
        def first(r: Report) -> str:
            return r.first_divergence.key if r.first_divergence else "-"

        def worst(r: Report) -> str:
            vals = [v for x in r.rows
                    if x.metrics and (v := x.metrics.measured("rel_l2")) is not None]
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


def _culprit(report: Report) -> tuple[str, bool] | None:
    """The module to keep in fp32 next, and whether it overflowed: the first overflow/NaN,
    else the first divergence."""
    rows = [r for r in report.rows if r.status in ("OVERFLOW", "NAN")] or (
        [report.first_divergence] if report.first_divergence else [])
    for r in rows:
        key = parse_key(r.key)
        if key.module != "root" and not key.is_input:
            return key.module, r.status in ("OVERFLOW", "NAN")
    return None


def suggest(model: str, *, dtype: str = "fp16", device: str = "cpu",
            prompts: Sequence[str] = (), prompts_file: str | None = None,
            keep_fp32: str | Sequence[str] = "none", budget: int = 8,
            max_new_tokens: int = 8,
            replay: str | None = None, mode: str = "full", include: Sequence[str] = (),
            exclude: Sequence[str] = (), log: Log = _quiet) -> Suggestion:
    """Find and verify a small keep-fp32 policy that makes ``dtype`` match fp32.

    With two or more prompts (the built-in three by default) about a third are held back:
    the policy is fitted on the rest and then checked on them. ``replay`` takes the inputs
    of an earlier dump instead (nothing held back). ``keep_fp32`` is the policy the search
    starts from (``auto`` or ``none``, alone or as a list of one): ``none`` matches a
    wholesale ``.half()`` from Python; the CLI's default is ``auto``, as for capture.
    """
    base_policy = _base_policy(keep_fp32)
    held: list[str] = []
    if replay is None:
        fit = read_prompts(prompts, prompts_file)
        if len(fit) >= 2:
            cut = len(fit) - max(1, len(fit) // 3)
            fit, held = fit[:cut], fit[cut:]
        prompts, prompts_file = fit, None
    with tempfile.TemporaryDirectory(prefix="precision-suggest-") as tmp:
        work = Path(tmp)

        def run(name: str, dt: str, keep: Sequence[str], replay: str | None,
                batch: Sequence[str] = prompts) -> Path:
            return run_capture(CaptureOptions(
                model=model, output=str(work / f"{name}.st"), device=device, dtype=dt,
                prompts=batch, prompts_file=prompts_file, max_new_tokens=max_new_tokens,
                keep_fp32=tuple(keep), replay=replay, mode=mode, include=include,
                exclude=exclude), _quiet)

        # each baseline's same-precision references, cast as the steps are (the base
        # policy): a step is judged against what the precision costs on this model cast
        # this way, so neither healthy noise at depth nor what the cast itself costs (a
        # wholesale .half() rounds rotary frequencies too) is chased as a culprit
        expect = sorted({short(canonical(dtype))} | (
            {"bf16"} if canonical(dtype) == "float16" else set()))

        def baseline(name: str, replay: str | None, batch: Sequence[str]) -> Path:
            path = run(name, "fp32", ("auto",), replay, batch)
            for e in expect:
                run(reference_path(path, e).stem, e, (base_policy,), str(path), batch)
            return path

        log(f"capturing the fp32 baseline of {model}, and its {' and '.join(expect)} "
            f"reference (--keep-fp32 {base_policy})")
        base = baseline("base", replay, prompts)
        log(f"capturing {dtype} with --keep-fp32 {base_policy}")
        before = compare(base, run("step0", dtype, (base_policy,), str(base)))
        steps: list[Step] = []
        kept: list[str] = []
        report = before
        final = work / "step0.st"
        alternatives: list[tuple[str, Report, tuple[str, ...] | None, Path]] = []
        stream_fixed = False  # the fix is the residual stream in fp32, not the steps' modules
        while not report:
            found = _culprit(report)
            culprit, blown = found if found is not None else (None, False)
            if culprit is not None and culprit in kept and blown:
                # kept in fp32 yet its output still overflows when handed back: the values
                # it hands on need fp32's range (a residual stream): hand them on in fp32
                kept[kept.index(culprit)] = f"{culprit}:fp32"
                log(f"{culprit} in fp32 still hands on values beyond {dtype}: handing its "
                    "output on in fp32 (the residual stream from there on)")
            elif (culprit is None or culprit in kept or f"{culprit}:fp32" in kept
                  or len(kept) >= budget):
                if culprit is None:
                    why = "the trouble is not in any module"
                elif culprit in kept or f"{culprit}:fp32" in kept:
                    why = f"keeping {culprit} in fp32 did not remove its error"
                else:
                    why = f"the budget of {budget} module(s) is spent (next: {culprit})"
                alternatives = _alternatives(base, dtype, base_policy, run, log)
                stream = next(((keep, r, path) for _, r, keep, path in alternatives
                               if keep is not None and r), None)
                if stream is None or len(stream[0]) - 1 > budget:
                    good = [a for a, r, _, _ in alternatives if r]
                    return Suggestion(False, tuple(kept), before, report, tuple(steps),
                                      message=f"no fp32 policy within budget fixes it: {why}"
                                      + (f"; verified instead: {good[0]}" if good else
                                         "; no alternative verified either"),
                                      keep_fp32=(base_policy, *kept),
                                      alternatives=tuple((a, r) for a, r, _, _ in alternatives))
                log(f"{why}; the residual stream in fp32 from the first module on fixes it")
                kept, report, final = list(stream[0][1:]), stream[1], stream[2]
                stream_fixed = True
                steps.append(Step(tuple(kept), report))
                break
            else:
                kept.append(culprit)
            log(f"keeping {', '.join(kept)} in fp32 and running again")
            final = run(f"step{len(steps) + 1}", dtype, (base_policy, *kept), str(base))
            report = compare(base, final)
            steps.append(Step(tuple(kept), report))
        general = generalise(kept)
        general_report = None
        if general == tuple(kept):
            general = ()
        if kept and general:
            log(f"checking the general form {', '.join(general)}")
            general_report = compare(base, run("general", dtype, (base_policy, *general),
                                               str(base)))
            if general_report:
                final = work / "general.st"
            else:
                general, general_report = (), None
        keep = (base_policy, *(general or kept))
        modules = tuple(load(final).meta.get("policy", {}).get("kept_fp32", []))
        holdout = None
        if held:
            log(f"checking --keep-fp32 {' '.join(keep)} on {len(held)} prompt(s) held back")
            held_base = baseline("held-base", None, held)
            holdout = compare(held_base, run("held", dtype, keep, str(held_base), held))
        message = headline(general or kept, modules, stream=stream_fixed, held=len(held),
                           held_passed=holdout is None or bool(holdout))
        if holdout is not None and not holdout:
            return Suggestion(False, tuple(kept), before, report, tuple(steps), general,
                              general_report, f"{message}: {holdout.summary}",
                              keep_fp32=keep, kept_modules=modules, holdout=holdout)
        return Suggestion(True, tuple(kept), before, report, tuple(steps), general,
                          general_report, message, keep_fp32=keep, kept_modules=modules,
                          holdout=holdout,
                          alternatives=tuple((a, r) for a, r, _, _ in alternatives))


def headline(fix: Sequence[str], modules: Sequence[str], *, stream: bool = False,
             held: int = 0, held_passed: bool = True) -> str:
    """The result line of a fix that was verified: it names the ``--keep-fp32`` patterns the
    verifying run was given (``fix``), never only a count that a failed step may share;
    ``modules`` are the modules that run kept in fp32. ``stream``: the fix is the residual
    stream handed on in fp32 from its first module, found when keeping modules did not fix
    it. ``held``: prompts held back and checked too (``held_passed``: with what result).

    E.g. ``keeping *.DenseReluDense.wo in fp32 fixes it (verified; 2 module(s) in fp32)``
    or ``the residual stream in fp32 from emb on fixes it (verified, and on 1 prompt(s) held
    back; --keep-fp32 emb:fp32, 1 module(s) in fp32)``.
    """
    if not fix:
        return "nothing to fix: the run is within the expected noise"
    detail = f"{len(modules)} module(s) in fp32"
    if stream:
        subject = f"the residual stream in fp32 from {fix[0].removesuffix(':fp32')} on"
        detail = " ".join(f"--keep-fp32 {shlex.quote(p)}" for p in fix) + f", {detail}"
    else:
        subject = "keeping " + ", ".join(
            f"{p.removesuffix(':fp32')} (its output handed on in fp32)" if p.endswith(":fp32")
            else p for p in fix) + " in fp32"
    if held and not held_passed:
        return (f"{subject} fixes it on the prompts it was fitted on ({detail}), but not on "
                f"the {held} held back")
    verified = "verified" + (f", and on {held} prompt(s) held back" if held else "")
    return f"{subject} fixes it ({verified}; {detail})"


def _base_policy(keep_fp32: str | Sequence[str]) -> str:
    """suggest's ``keep_fp32``: ``auto`` or ``none`` (a list of one), else one line."""
    given = [keep_fp32] if isinstance(keep_fp32, str) else list(keep_fp32)
    if len(given) != 1 or given[0] not in ("auto", "none"):
        raise InputError(f"{option('--keep-fp32', 'keep_fp32')} of suggest is the policy it "
                         f"starts from, auto or none, not {' '.join(map(str, given)) or '()'}"
                         ": it finds the modules to keep itself")
    return str(given[0])


def _alternatives(base: Path, dtype: str, base_policy: str, run: Callable[..., Path],
                  log: Log) -> list[tuple[str, Report, tuple[str, ...] | None, Path]]:
    """The fixes a user has when no module set does: bf16 (fp32's range) for an fp16 run,
    and the whole residual stream in fp32 with compute in ``dtype`` (the first module's
    output, the input embedding, handed on in fp32); each captured and compared. Each is
    (capture flags, report, the keep-fp32 policy when it is one, the dump)."""
    out: list[tuple[str, Report, tuple[str, ...] | None, Path]] = []
    if canonical(dtype) == "float16":
        log("trying bf16 instead of fp16 (fp32's range, fewer mantissa bits)")
        path = run("alt-bf16", "bf16", (base_policy,), str(base))
        out.append(("--dtype bf16", compare(base, path), None, path))
    first = next((e.module for e in load(base).entries
                  if e.kind == "out" and e.module not in ("root", "input")), None)
    if first is not None:
        keep = (base_policy, f"{first}:fp32")
        log(f"trying the residual stream in fp32 from {first} on, computing in {dtype}")
        flags = " ".join(f"--keep-fp32 {shlex.quote(k)}" for k in keep)
        path = run("alt-stream", dtype, keep, str(base))
        out.append((f"--dtype {short(canonical(dtype))} {flags}", compare(base, path), keep,
                    path))
    return out


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

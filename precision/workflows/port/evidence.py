"""The port's stages' results as JSON-ready outcomes (stored in the stamps), and the outcomes
as the rows of the port's table (:class:`precision.workflows.port.result.Check`)."""

from __future__ import annotations

from typing import Any

from ...doctor.checks import Suggestion
from ...doctor.isolation import IsolateReport
from ...dumps.keys import parse_key
from ...judge.consistency import ConsistencyReport
from ...judge.report import Report
from ...judge.scan import ScanReport
from .result import Check

#: a row's status in the comparison table, as the port's table shows it
STATUS = {"OK": "PASS", "MISSING": "SKIP"}
#: in the comparison's note on an engine's run lined up with Hugging Face's records
#: (:func:`precision.engines.vllm.lineup.notes`)
LINED_UP = "records lined up with Hugging Face's"


def of_compare(report: Report) -> dict[str, Any]:
    """A comparison's outcome: verdict, counts, first divergence, logits and generations."""
    out: dict[str, Any] = {"passed": bool(report), "summary": report.summary,
                           "counts": report.counts(), "notes": list(report.notes),
                           "first_divergence": (report.first_divergence.key
                                                if report.first_divergence else None),
                           "logits": None, "generation": None}
    lg = next((r for r in report.rows if r.logits is not None), None)
    if lg is not None and lg.logits is not None:
        m = lg.logits
        out["logits"] = {"key": lg.key, "status": lg.status, "top1_agreement": m.top1_agreement,
                         "k": m.k, "topk_overlap": m.topk_overlap, "kl_mean": m.kl_mean,
                         "kl_max": m.kl_max, "hard_flips": m.hard_flips}
    gen = next((r for r in report.rows if r.generation is not None), None)
    if gen is not None and gen.generation is not None:
        g = gen.generation
        out["generation"] = {"status": gen.status, "reason": gen.reason,
                             "sequences": g.sequences, "identical": g.identical}
    out["gradients"] = of_gradients(report)
    return out


def of_gradients(report: Report) -> dict[str, Any] | None:
    """The ``--backward`` rows of a comparison (gradients of module outputs, ``:grad``, and
    of parameters, ``:pgrad``): how many, by status, and the first that fails the verdict;
    ``None`` when the runs recorded no gradient."""
    rows = [r for r in report.rows if parse_key(r.key).is_gradient]
    if not rows:
        return None
    failing = {id(r) for r in report.failing}
    first = next((r for r in rows if id(r) in failing), None)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    return {"passed": first is None, "records": len(rows),
            "outputs": sum(parse_key(r.key).kind == "grad" for r in rows),
            "parameters": sum(parse_key(r.key).kind == "pgrad" for r in rows),
            "measured": sum(r.metrics is not None or r.stats_delta is not None for r in rows),
            "counts": counts,
            "first_failing": None if first is None else {
                "key": first.key, "status": first.status, "reason": first.reason}}


def of_consistency(report: ConsistencyReport) -> dict[str, Any]:
    return {"passed": bool(report), "summary": report.summary, "runs": report.runs,
            "tensors": report.tensors, "notes": list(report.notes)}


def of_scan(report: ScanReport) -> dict[str, Any]:
    return {"passed": bool(report), "summary": report.summary,
            "producers": [r.key for r in report.producers][:10]}


def of_isolate(report: IsolateReport) -> dict[str, Any]:
    return {"passed": bool(report), "summary": report.summary,
            "culprits": [r.key for r in report.culprits][:10]}


def of_suggestion(s: Suggestion) -> dict[str, Any]:
    return s.to_dict()


def _gradients(g: dict[str, Any] | None) -> Check:
    """The ``gradients`` row: the backward records compared, and the first that fails."""
    if g is None:
        return Check("gradients", "FAIL", "--backward asked for, but no gradient was "
                     "recorded in both runs")
    counts = ", ".join(f"{n} {s}" for s, n in g["counts"].items())
    what = (f"{g['measured']} of {g['records']} gradient records measured ({g['outputs']} of "
            f"module outputs, {g['parameters']} of parameters): {counts}")
    bad = g["first_failing"]
    if bad is not None:
        what += f"; first failing {bad['key']} ({bad['status']}: {bad['reason']})"
    return Check("gradients", _status(g["passed"]), what)


def _status(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def checks(outcomes: dict[str, dict[str, Any]], *, dtype: str, repeat: int,
           backward: bool = False) -> list[Check]:
    """The table's rows, in the stages' order; a stage that did not run is SKIP, with why.
    With ``backward`` (one training step), a ``gradients`` row after ``layers``."""
    rows: list[Check] = []
    base, cmp = outcomes["baseline"], outcomes["compare"]
    refs = base.get("references") or []
    rows.append(Check("baseline", "INFO", f"fp32 on {base['device_name']}, "
                      f"{base['records']} records"
                      + (f"; {', '.join(refs)} reference on the same inputs" if refs else "")))
    rows.append(Check("layers", _status(cmp["passed"]), cmp["summary"]))
    if backward and "gradients" in cmp:  # (a stamp from before the row: no row)
        rows.append(_gradients(cmp["gradients"]))
    engine = outcomes["target"].get("engine", "hf")
    if engine != "hf":  # how the engine's records met Hugging Face's (docs/vllm.md)
        lined = [n.split(": ", 1)[1] for n in cmp.get("notes", [])
                 if LINED_UP in n and ": " in n]
        rows.append(Check(f"{engine} lineup", "INFO", lined[0] if lined else
                          f"no note of how {engine}'s records were lined up"))
    lg = cmp.get("logits")
    rows.append(Check("logits", STATUS.get(lg["status"], lg["status"]) if lg else "SKIP",
                      f"top-1 agreement {lg['top1_agreement']:.2%}, top-{lg['k']} overlap "
                      f"{lg['topk_overlap']:.2%}, mean KL {lg['kl_mean']:.3g}" if lg else
                      "no logits recorded"))
    gen = cmp.get("generation")
    rows.append(Check("generations", STATUS.get(gen["status"], gen["status"]) if gen else "SKIP",
                      (gen["reason"] if gen["reason"] and (gen["status"] != "OK" or
                                                           gen["identical"] < gen["sequences"])
                       else f"{gen['identical']} of {gen['sequences']} greedy sequences "
                            "identical") if gen else
                      "nothing generated (--max-new-tokens 0 or an encoder)"))
    cons = outcomes.get("consistency")
    rows.append(Check(f"self-consistency ({repeat} runs)", _status(cons["passed"]) if cons
                      else "SKIP", cons["summary"] if cons else "not run"))
    flagged = "nothing flagged: not needed"
    for name, title in (("scan", "overflow scan"), ("isolate", "isolate")):
        o = outcomes.get(name)
        rows.append(Check(title, _status(o["passed"]) if o else "SKIP",
                          o["summary"] if o else flagged))
    sug, fix = outcomes.get("suggest"), outcomes.get("fix")
    if sug is None:
        rows.append(Check("fix", "SKIP", flagged))
    elif fix is None:
        rows.append(Check("fix", "FAIL", f"suggest: {sug['message']}"))
    else:
        rows.append(Check("fix", _status(fix["passed"]),
                          f"{dtype} with {fix['capture_args']}, replayed and compared again: "
                          f"{fix['summary']}"))
    return rows

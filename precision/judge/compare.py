"""Compare runs in three stages: align, measure, judge.

- **align** (:mod:`precision.judge.lineup.align`): the runs by name (``base``, ``target``, and an
  optional same-precision ``reference``), the comparisons wanted between them
  (``base->target``; ``base->reference`` with a reference), and each one's records paired
  by key;
- **measure** (:mod:`precision.judge.measure.pairs`): pure, in worker processes
  (:mod:`precision.judge.measure.parallel`), each streaming its tensor pair in chunks, so memory
  stays bounded by ``jobs x chunk`` work buffers whatever the dump size; ``max_memory``
  shrinks the chunk (and, if need be, the number of jobs) to fit a budget;
- **judge** (:mod:`precision.judge.verdict.rules`): once, here, a list of small rules over each row
  of ``base->target`` with its context (neighbours, the other comparisons' rows of the
  same key); then T5's moved position buckets are explained, error growth attached, and
  the first flagged row is the first divergence.

The report's warnings and notes (swapped runs, padding, the reference...) are written by
:mod:`precision.judge.notes`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from ..dtypes import short
from ..dumps import reference_path
from ..dumps.dump import Dump
from ..dumps.external import open_any
from ..dumps.external.msprobe_l1 import line_up_runs, lineup_notes
from ..engines.vllm import lineup as engine_lineup
from ..errors import DumpError, InputError
from .lineup.align import (
    BASE,
    REFERENCE,
    TARGET,
    align,
    check_same_model,
    comparisons,
    generation_only,
    outputs_only,
    reference_differs,
    run_precision,
    shared_aliases,
)
from .measure import parallel
from .measure.generation import generation_prefixes
from .measure.kernels import choose_kernel
from .measure.metrics import TensorMetrics
from .measure.pairs import Job, Task, generation_row, run_task, task_cost
from .measure.row import Row
from .measure.statsdiff import checksum_kind
from .notes import (
    displayed_path,
    external_notes,
    folded_notes,
    operation_notes,
    padding_notes,
    reference_notes,
    report_warnings,
    sketch_notes,
    unpaired_warnings,
    unused_mapping_warnings,
)
from .options import CompareOptions
from .profiles import Profile, named_profile, profile_for
from .report import Report
from .verdict.posbias import diagnose
from .verdict.rules import (
    RULES,
    SWAPPED,
    Context,
    Rule,
    judge_rows,
    made_in_own_forward,
    verdict_of,
)
from .verdict.steps import after_divergence, check_same_layout

__all__ = ["SWAPPED", "compare", "plan_jobs", "status_of_metrics"]

#: per job: about 10 MiB of work arrays (a logits chunk is at least one vocabulary row);
#: 2^16 float64 (512 KiB) per array stays in cache
#: (2^14 to 2^18 measured: 2^16 was fastest with one job and with two)
CHUNK_ELEMS = 1 << 16
#: work memory per chunk element, at most: the read buffers (16), the six float64, one int64
#: and one bool scratch arrays of the metrics (57), and the five float64 work arrays of the
#: logits (40); the fused kernel adds 210 KiB of histogram lanes per job
WORK_BYTES_PER_ELEMENT = 160
MIN_CHUNK_ELEMS = 1 << 12
#: below this much work (elements, see Pair.cost), starting processes costs more than it saves
PARALLEL_MIN_ELEMENTS = 8 << 20


def compare(base: str | os.PathLike[str] | Dump, target: str | os.PathLike[str] | Dump,
            options: CompareOptions | None = None, *, rules: Sequence[Rule] = RULES,
            chunk_elems: int = CHUNK_ELEMS,
            progress: Callable[[int, int], None] | None = None, **settings: Any) -> Report:
    """Compare two dumps of the same model and inputs; returns a :class:`Report`.

    ``options`` (:class:`~precision.judge.options.CompareOptions`) says what to compare, how
    to judge it and how to run it; its fields may also be given as keyword arguments
    (``settings``), which override ``options``: ``compare(a, b, fail_on="nan", jobs=2)``.

    ``reference``: a third run of the same model and inputs in the target's precision on a
    trusted backend; its error against the baseline is measured too and given to the rules
    (:data:`precision.judge.verdict.rules.REFERENCE_COMPARISON`), which then judge each
    record against what that precision costs there. Without one, ``auto_reference`` takes
    the baseline's sibling ``BASE.<precision>-reference.st`` (``capture --expect``) when it
    exists.
    ``rules`` replaces the verdict rules.
    ``profile`` (``fp16``/``bf16``/``fp32``) overrides the tolerance profile chosen from the
    two runs' dtypes; ``rtol``/``atol`` override its norm tolerance and absolute floor.
    ``fail_on`` decides which statuses make the report falsy (see ``report.FAIL_ON``).
    ``allow_partial`` reads an unfinished multi-rank dump's shards (with a warning).
    ``jobs`` worker processes (default: the usable cores) share the tensor pairs;
    ``max_memory`` (bytes) caps their work buffers together (see :func:`plan_jobs`);
    ``chunk_elems`` is the most elements a job reads at a time.
    ``base_dtype``/``target_dtype`` state what a run computed in when its file cannot say
    (logits saved as fp32 from a bf16 run: numpy has no bf16); the profile follows them.
    A run that holds outputs only (logits, a logprobs file) has no layers: the other run's
    records are left out with one note (not MISSING); for generations alone (a logprobs
    file) no reference is looked for, as none of its rows could use one.
    A run captured inside an engine (``precision.vllm``) against a Hugging Face capture is
    first lined up with it (:mod:`precision.engines.vllm.lineup`): its records renamed, split and
    unpacked into Hugging Face's keys, by its family's table or the ``mapping`` file.
    """
    o = replace(options or CompareOptions(), **settings)
    runs = {BASE: _open(base, o), TARGET: _open(target, o)}
    stated = {BASE: o.base_dtype, TARGET: o.target_dtype}
    target_precision = run_precision(runs[TARGET], o.target_dtype)
    reference = o.reference
    if reference is None and o.auto_reference:
        found = reference_path(runs[BASE].path, target_precision) if target_precision in (
            "float16", "bfloat16") and not generation_only(runs[TARGET]) else None
        reference = found if found is not None and found.is_file() else None
    stale: list[str] = []
    if reference is not None:
        runs[REFERENCE] = _open(reference, o)
        why = reference_differs(runs[BASE], runs[REFERENCE])
        if why is not None and o.reference is not None:
            raise InputError(f"the reference {runs[REFERENCE].path.name} is not the baseline's "
                             f"run in another precision: {why}; capture it with --replay "
                             f"{runs[BASE].path.name} (or the baseline with --expect)")
        if why is not None:  # a sibling left from an earlier baseline: not used
            stale.append(f"{runs.pop(REFERENCE).path.name} beside the baseline is not its "
                         f"run in another precision ({why}): not used; capture the baseline "
                         f"again with --expect {short(target_precision)}, or delete it")
    runs = line_up_runs(runs)
    lined = engine_lineup.line_up(runs, o.mapping)
    b, t = runs[BASE], runs[TARGET]
    for name, other in runs.items():
        if name != BASE:
            check_same_model(b, other, o.allow_different_models)
            check_same_layout(b, other)
    dtypes = {name: run_precision(d, stated.get(name)) for name, d in runs.items()}
    if REFERENCE in runs and dtypes[REFERENCE] != dtypes[TARGET]:
        raise InputError(f"the reference {runs[REFERENCE].path.name} computed in "
                         f"{short(dtypes[REFERENCE])} and the target in "
                         f"{short(dtypes[TARGET])}: a reference is the target's precision "
                         "on a trusted backend")
    prof = (named_profile(o.profile) if o.profile
            else profile_for(dtypes[BASE], dtypes[TARGET])).with_overrides(o.rtol, o.atol)
    tasks, folded = _tasks(runs, lined)
    workers, chunk = plan_jobs(o.jobs or parallel.cpu_count(), o.max_memory, chunk_elems)
    work = sum(task.cost for task in tasks)
    if work < PARALLEL_MIN_ELEMENTS:
        workers = 1
    kernel = choose_kernel(work)  # loaded here, before the workers fork
    measured = parallel.run(run_task, tasks, Job(runs, prof, o.topk, chunk, kernel),
                            workers=workers, cost=task_cost, progress=progress)
    by_comparison: dict[str, list[Row]] = {}
    for task, row in zip(tasks, measured, strict=True):
        by_comparison.setdefault(f"{task.base}->{task.target}", []).append(row)
    rows = by_comparison.pop(f"{BASE}->{TARGET}", [])
    for prefix in sorted(set(generation_prefixes(b)) & set(generation_prefixes(t))):
        rows.append(generation_row(b, t, len(rows), o.topk, prefix, prof))
    ctx = Context(prof, {name: d.dtype for name, d in runs.items()},
                  others={name: _by_key(rs, runs, name) for name, rs in by_comparison.items()},
                  stateless=stateless_modules(b))
    judged, step_notes = after_divergence(made_in_own_forward(judge_rows(rows, ctx, rules)),
                                          b.meta, t.meta)
    gen = [r for r in judged if r.generation is not None]
    rows, bias_notes = diagnose(b, t, _with_growth([r for r in judged if r.generation is None]))
    rows += gen
    _check_something_compared(b, t, rows)
    first = next((r for r in rows if r.flagged), None)
    return Report(base=displayed_path(b), target=displayed_path(t), profile=prof,
                  rows=tuple(rows),
                  first_divergence=first,
                  warnings=tuple(stale + report_warnings(b, t, rows, stated) + bias_notes
                                 + unused_mapping_warnings(o.mapping, lined, runs)
                                 + unpaired_warnings(b, t, rows)),
                  fail_on=o.fail_on, info=_info(b, t),
                  notes=tuple(step_notes + padding_notes(rows) + folded_notes(runs, folded)
                              + operation_notes(b, t)
                              + reference_notes(runs, dtypes, prof, rows) + sketch_notes(runs)
                              + lineup_notes(runs) + external_notes(runs, rows)
                              + engine_lineup.notes(lined, [r.key for r in rows])))


def _check_something_compared(b: Dump, t: Dump, rows: list[Row]) -> None:
    """A comparison with no row that measured anything (no record paired, or pairs with no
    statistic in common) says nothing: an error naming both runs and what each holds, never
    a PASS; so do two runs most of whose records pair with nothing and the rest differ in
    shape (another model: two msprobe dumps, which state no config to refuse them by)."""
    paired = sum(r.status != "MISSING" for r in rows)
    differ = sum(r.status == "MISMATCH" for r in rows)
    if differ and (differ < paired or 2 * paired >= len(rows)):
        return  # records that cannot be compared are a verdict of their own (MISMATCH),
        # unless they are all there is and most records pair with nothing: unrelated runs
    if any(r.status != "MISSING" and (
            (r.metrics and (r.metrics.compared or r.status != "OK"))
            or r.exact or r.logits or r.generation or (
                r.stats_delta is not None and (r.stats_delta.has_statistics
                                               or r.stats_delta.same_checksum_kind)))
           for r in rows):
        return  # a measurement (a float pair of NaN at the same places alone is none)
    blank = [r for r in rows if r.metrics is not None and not r.metrics.compared]
    if blank and all(math.prod(r.shape) == 0 for r in blank):
        raise DumpError(f"nothing to compare: {displayed_path(b)} and {displayed_path(t)} hold "
                        f"only empty float records ({len(blank)}, first {blank[0].key}: "
                        f"shape {list(blank[0].shape)}): capture the model on real inputs")
    if blank:
        first = next(r for r in blank if math.prod(r.shape))
        raise DumpError(f"nothing to compare: {displayed_path(b)} and {displayed_path(t)} hold "
                        f"no finite value at the same places in any of their {len(blank)} "
                        f"float record(s) (first {first.key}: NaN or inf in both): such a "
                        "baseline is no reference; capture it again")

    def holds(d: Dump) -> str:
        keys = [e.key for e in d.entries]
        return (f"{displayed_path(d)} holds {len(keys)} record(s)"
                + (f" (first {keys[0]})" if keys else ""))

    kinds = {(checksum_kind(d.checksum_base), checksum_kind(d.checksum_target))
             for r in rows if (d := r.stats_delta) is not None
             and d.checksum_base is not None and d.checksum_target is not None}
    if kinds and all(a != b for a, b in kinds):
        raise DumpError(f"nothing to compare: {displayed_path(b)} and {displayed_path(t)} hold "
                        f"checksums of different kinds ({', '.join(sorted(kinds.pop()))}: "
                        "msprobe's summary_mode md5 and xor), which never agree, and no "
                        "statistic in common: dump both runs with one summary_mode (md5 or "
                        "statistics also write Max, Min, Mean and Norm)")
    what = (f"the {differ} that pair differ in shape" if differ and differ == paired
            else "none with a value or statistic in common")
    raise DumpError(f"nothing to compare: {paired} record(s) paired, {what}; {holds(b)}, "
                    f"{holds(t)}: are these runs of the same model, and dumps that hold "
                    "values (not only their shapes)?")


def _tasks(runs: dict[str, Dump], lined: dict[str, engine_lineup.Lineup]
           ) -> tuple[list[Task], dict[str, int]]:
    """What to measure, and per run that holds outputs only (:func:`outputs_only`) how many
    of the baseline's records it has no counterpart for: those are left out, not MISSING
    (a logprobs file holds no layers), and one note counts them."""
    held = {name: outputs_only(d) for name, d in runs.items()}
    tasks: list[Task] = []
    folded: dict[str, int] = {}
    for c in comparisons(runs):
        for p in align(runs[c.base], runs[c.target]):
            if engine_lineup.engine_lacks(lined, p.key):
                continue
            lacking = (c.target if p.target is None and held[c.target]
                       else c.base if p.base is None and held[c.base] else None)
            if lacking is None:
                tasks.append(Task(c.base, c.target, p))
            elif c.base == BASE and c.target == TARGET:
                folded[lacking] = folded.get(lacking, 0) + 1
    return tasks, folded


def _by_key(rows: list[Row], runs: dict[str, Dump], comparison: str) -> dict[str, Row]:
    """A comparison's rows by key, and each key both of its runs hold as an alias of the
    same record (:func:`~precision.judge.lineup.align.shared_aliases`) with that record's row: the
    measurement of the tensor the key holds. So a key the baseline and the reference alias
    (an MLP returning ``down_proj``'s tensor) and the target does not (a fused MLP kernel)
    is judged against the reference's error on that tensor, not by the fixed limits."""
    by_key = {r.key: r for r in rows}
    base, target = comparison.split("->")
    for key, record in shared_aliases(runs[base], runs[target]).items():
        if key not in by_key and record in by_key:
            by_key[key] = replace(by_key[record], key=key)
    return by_key


def _open(run: str | os.PathLike[str] | Dump, o: CompareOptions) -> Dump:
    return run if isinstance(run, Dump) else open_any(run, allow_partial=o.allow_partial,
                                                       mapping=o.mapping)


def plan_jobs(jobs: int, max_memory: int | None, chunk_elems: int = CHUNK_ELEMS
              ) -> tuple[int, int]:
    """Worker count and chunk size whose work buffers fit ``max_memory`` bytes.

    Each job holds at most ``chunk x WORK_BYTES_PER_ELEMENT`` bytes of work arrays; the chunk
    shrinks to fit, down to ``MIN_CHUNK_ELEMS``, and then the job count drops. Logits are
    read a whole vocabulary row at a time at least, so a job comparing them may hold
    ``vocab x WORK_BYTES_PER_ELEMENT`` (24 MB for a 152k vocabulary) whatever the budget.
    Each forked worker also costs the pages it writes, a few MB.
    """
    if max_memory is None:
        return jobs, chunk_elems
    per_job = max_memory // max(1, jobs) // WORK_BYTES_PER_ELEMENT
    if per_job >= MIN_CHUNK_ELEMS:
        return jobs, min(chunk_elems, per_job)
    fits = max_memory // (MIN_CHUNK_ELEMS * WORK_BYTES_PER_ELEMENT)
    if fits < 1:
        raise InputError(f"--max-memory {max_memory / 2**20:.3g} MiB is below the "
                         f"{MIN_CHUNK_ELEMS * WORK_BYTES_PER_ELEMENT / 2**20:.3g} MiB one "
                         "job needs")
    return int(fits), MIN_CHUNK_ELEMS


def status_of_metrics(m: TensorMetrics, prof: Profile, *, gradient: bool = False
                      ) -> tuple[str, str]:
    """Status and reason of one tensor's float metrics under a profile: the full-tensor
    rules of :mod:`precision.judge.verdict.rules` applied to a row holding only ``m``."""
    key = "tensor:grad" if gradient else "tensor:out"
    row = Row(0, key, "OK", "", (m.numel,), "float32", "float32", metrics=m)
    found = verdict_of(row, Context(prof, {}))
    return (found.status, found.reason) if found else ("OK", "")


def _with_growth(rows: list[Row]) -> list[Row]:
    """Attach ``growth``: a row's rel_l2 over the previous compared float row's rel_l2 (none
    for a row with no element compared: its rel_l2 is no measurement)."""
    out: list[Row] = []
    prev: float | None = None
    for r in rows:
        if r.metrics is not None and r.metrics.compared and math.isfinite(r.metrics.rel_l2):
            cur = r.metrics.rel_l2
            growth = (cur / prev) if prev else None
            out.append(replace(r, growth=growth))
            prev = cur if cur > 0 else prev
        else:
            out.append(r)
    return out


def stateless_modules(d: Dump) -> frozenset[str]:
    """The modules of a capture that hold no parameter, themselves or below them
    (activations, dropout; not a decoder layer, whose parameters are its children's), from
    its ``module_dtypes``; none when the dump does not say."""
    holders = d.meta.get("module_dtypes")
    if not isinstance(holders, dict) or not holders:
        return frozenset()
    with_params = {".".join(name.split(".")[:i]) for name in holders
                   for i in range(1, name.count(".") + 2)}
    return frozenset(e.module for e in d.entries
                     if e.kind == "out" and "/" not in e.module and e.module not in with_params
                     and e.module not in ("root", "input", "generation"))


def _info(b: Dump, t: Dump) -> dict[str, Any]:
    def side(d: Dump) -> dict[str, Any]:
        return {"path": displayed_path(d), "dtype": d.dtype, "mode": d.mode,
                "device": d.meta.get("device", {}).get("name"),
                "model": d.meta.get("model", {}).get("class")}

    return {"base": side(b), "target": side(t)}

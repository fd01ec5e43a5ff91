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
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..dtypes import short
from ..dumps import reference_path
from ..dumps.dump import Dump
from ..dumps.external import open_any
from ..dumps.external.msprobe_l1 import line_up_runs, lineup_notes
from ..dumps.keys import INPUT_PREFIX
from ..dumps.sketch import BUCKETS, size_of
from ..engines.vllm import lineup as engine_lineup
from ..errors import InputError, option
from .lineup.align import (
    BASE,
    REFERENCE,
    TARGET,
    align,
    check_same_model,
    comparisons,
    one_sided_operations,
    outputs_only,
    run_precision,
    shared_aliases,
)
from .measure import parallel
from .measure.generation import generation_prefixes, has_generation
from .measure.metrics import TensorMetrics, choose_kernel
from .measure.pairs import Job, Task, generation_row, run_task, task_cost
from .measure.row import Row
from .options import CompareOptions
from .profiles import REF_RMS_RATIO, Profile, named_profile, precision_name, profile_for
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

__all__ = ["SWAPPED", "compare", "judge", "plan_jobs"]

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
    (:data:`precision.judge.verdict.rules.REFERENCE`), which then judge each record against what
    that precision costs there. Without one, ``auto_reference`` takes the baseline's
    sibling ``BASE.<precision>-reference.st`` (``capture --expect``) when it exists.
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
    runs = {BASE: _open(base, o.allow_partial), TARGET: _open(target, o.allow_partial)}
    stated = {BASE: o.base_dtype, TARGET: o.target_dtype}
    target_precision = run_precision(runs[TARGET], o.target_dtype)
    reference = o.reference
    if reference is None and o.auto_reference:
        found = reference_path(runs[BASE].path, target_precision) if target_precision in (
            "float16", "bfloat16") and not _generation_only(runs[TARGET]) else None
        reference = found if found is not None and found.is_file() else None
    if reference is not None:
        runs[REFERENCE] = _open(reference, o.allow_partial)
    runs = line_up_runs(runs)
    lined = engine_lineup.line_up(runs, o.mapping)
    b, t = runs[BASE], runs[TARGET]
    for name, other in runs.items():
        if name != BASE:
            check_same_model(b, other, o.allow_different_models)
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
    judged = made_in_own_forward(judge_rows(rows, ctx, rules))
    gen = [r for r in judged if r.generation is not None]
    rows, bias_notes = diagnose(b, t, _with_growth([r for r in judged if r.generation is None]))
    rows += gen
    first = next((r for r in rows if r.flagged), None)
    return Report(base=str(b.path), target=str(t.path), profile=prof, rows=tuple(rows),
                  first_divergence=first,
                  warnings=tuple(_warnings(b, t, rows, stated) + bias_notes
                                 + _unused_mapping(o.mapping, lined)),
                  fail_on=o.fail_on, info=_info(b, t),
                  notes=tuple(_notes(rows) + _folded_notes(runs, folded)
                              + _operation_notes(b, t)
                              + _reference_notes(runs, dtypes, prof) + _sketch_notes(runs)
                              + lineup_notes(runs)
                              + engine_lineup.notes(lined, [r.key for r in rows])))


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


def _folded_notes(runs: dict[str, Dump], folded: dict[str, int]) -> list[str]:
    """One line per run that holds outputs only: the other run's records left out."""
    out = []
    for name, n in folded.items():
        d, other = runs[name], runs[TARGET if name == BASE else BASE]
        how = ("capture the engine too (precision capture --engine vllm, docs/vllm.md)"
               if _generation_only(d) else "capture both runs")
        out.append(f"{_file_name(d)} holds {outputs_only(d)} only: {n} record(s) of "
                   f"{_file_name(other)} (layers, inputs) have nothing to pair with there and "
                   f"are left out; per layer, {how}")
    return out


def _unused_mapping(mapping: str | os.PathLike[str] | None,
                    lined: dict[str, engine_lineup.Lineup]) -> list[str]:
    """A mapping file given where no run was lined up says so, rather than pass unseen."""
    if mapping is None or lined:
        return []
    return [f"{option('--mapping', 'mapping=')} {Path(mapping).name} was not used: it maps "
            "an engine's records (capture --engine vllm) onto a Hugging Face capture's, and "
            "these runs are not one of each"]


def _generation_only(d: Dump) -> bool:
    """A run that holds generated tokens (and log-probabilities) but no tensor to judge."""
    held = outputs_only(d)
    return held is not None and "logits" not in held


def _file_name(d: Dump) -> str:
    """The name a user gave: another tool's file or an engine's dump, not the temporary
    dump it was converted or translated into."""
    return Path(str(d.meta.get("external") or d.meta.get("translated_from") or d.path)).name


def _open(run: str | os.PathLike[str] | Dump, allow_partial: bool) -> Dump:
    return run if isinstance(run, Dump) else open_any(run, allow_partial=allow_partial)


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


def judge(m: TensorMetrics, prof: Profile, *, gradient: bool = False) -> tuple[str, str]:
    """Status and reason of one tensor's float metrics under a profile: the full-tensor
    rules of :mod:`precision.judge.verdict.rules` applied to a row holding only ``m``."""
    key = "tensor:grad" if gradient else "tensor:out"
    row = Row(0, key, "OK", "", (m.numel,), "float32", "float32", metrics=m)
    found = verdict_of(row, Context(prof, {}))
    return (found.status, found.reason) if found else ("OK", "")


def _with_growth(rows: list[Row]) -> list[Row]:
    """Attach ``growth``: a row's rel_l2 over the previous compared float row's rel_l2."""
    out: list[Row] = []
    prev: float | None = None
    for r in rows:
        if r.metrics is not None and math.isfinite(r.metrics.rel_l2):
            cur = r.metrics.rel_l2
            growth = (cur / prev) if prev else None
            out.append(replace(r, growth=growth))
            prev = cur if cur > 0 else prev
        else:
            out.append(r)
    return out


def _warnings(b: Dump, t: Dump, rows: list[Row], stated: dict[str, str | None]
              ) -> list[str]:
    notes = []
    files = [d for d in (b, t) if d.meta.get("external")]
    if any(r.key.startswith(INPUT_PREFIX) and r.status == "MISMATCH" for r in rows):
        notes.append("the two runs saw different inputs: capture the target with "
                     f"--replay {b.path.name}")
    swapped = [r.key for r in rows if r.metrics and (r.metrics.base_only_inf
                                                      or r.metrics.base_only_nan
                                                      or r.metrics.saturated_base)]
    if swapped:
        notes.append(f"the baseline holds inf/NaN or clamped values where the target is finite "
                     f"in {len(swapped)} tensor(s), first {swapped[0]}: is the baseline the "
                     "low-precision run? The arguments may be swapped")
    dirty = [r.key for r in rows if r.metrics and (r.metrics.nan_base or r.metrics.inf_base)
             and r.key not in swapped]
    if dirty:
        notes.append(f"both runs hold NaN/inf at the same places in {len(dirty)} tensor(s), "
                     f"first {dirty[0]}: those elements are excluded")
    if has_generation(b) != has_generation(t) and not files:
        notes.append("only one dump holds a generation: capture the target with --replay "
                     "from a baseline taken with --max-new-tokens to compare generations")
    notes += _dtype_warnings(b, t, stated)
    wb, wt = (d.meta.get("model", {}).get("weights_fingerprint") for d in (b, t))
    if wb and wt and wb != wt:  # the same config, another checkpoint (a fine-tune?)
        notes.append(f"{b.path.name} and {t.path.name} come from different weights "
                     f"(fingerprint {wb} vs {wt}): differences show the weights, not only "
                     "the numerics")
    for d in (b, t):
        if not d.complete:
            notes.append(f"{d.path.name} is marked incomplete")
        if d.meta.get("foreign"):
            notes.append(f"{d.path.name} has no precision metadata: keys are matched by name")
    return notes


def _dtype_warnings(b: Dump, t: Dump, stated: dict[str, str | None]) -> list[str]:
    """What a run's file cannot tell about its precision, and a stated dtype that
    contradicts what an engine's own config recorded (``meta.engine``)."""
    out = []
    for d, side in ((b, "base"), (t, "target")):
        other = t if d is b else b
        how = option(f"--{side}-dtype bf16", f"{side}_dtype='bf16'")
        if (d.meta.get("external") and stated[side] is None
                and (d.dtype or "float32") == "float32"
                and (other.dtype or "float32") == "float32"):
            name = _file_name(d)
            if d.dtype is None and has_generation(d):  # log-probabilities: no dtype at all
                out.append(f"{name} holds log-probabilities, which do not say what the engine "
                           "computed in, and is judged as an fp32 run: if it ran in bf16 or "
                           f"fp16, say so with {how} (or \"dtype\": \"bfloat16\" in the file, "
                           "docs/external.md)")
            else:
                out.append(f"{name} came from a file that stores float32 and is judged as an "
                           f"fp32 run: if it computed in bf16 or fp16, say so with {how}")
        engine = d.meta.get("engine")
        engine = engine if isinstance(engine, dict) else {}
        said = engine.get("dtype")
        if said and stated[side] and precision_name(str(stated[side])) != said:
            out.append(f"{_file_name(d)}: {engine.get('name', 'the engine')}'s own config says it "
                       f"computed in {short(str(said))}, but it is judged as "
                       f"{short(precision_name(str(stated[side])))} as stated "
                       f"({option(f'--{side}-dtype', f'{side}_dtype')})")
    return out


def _notes(rows: list[Row]) -> list[str]:
    """What the verdicts left out: padded positions."""
    def padded(r: Row) -> tuple[int, int]:
        if r.metrics is not None:
            return r.metrics.padded, r.metrics.numel
        d = r.stats_delta or {}
        return int(d.get("padded", 0)), int(d.get("numel", 0)) + int(d.get("padded", 0))

    left_out = [padded(r) for r in rows if padded(r)[0]]
    if not left_out:
        return []
    share = max(n / total for n, total in left_out)
    return [f"padding left out: {len(left_out)} record(s) judged on real tokens only (up to "
            f"{share:.0%} of a record is padding, per the recorded attention masks)"]


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


def _operation_notes(b: Dump, t: Dump) -> list[str]:
    """Operations (``--level ops``) that ran in one run only: a code path of one precision
    (T5's fp16 clamp), with nothing to compare them with."""
    notes = []
    for side, names in one_sided_operations(b, t).items():
        if names:
            counts = Counter(names)
            top = ", ".join(f"{n} x{c}" for n, c in counts.most_common(4))
            more = ", ..." if len(counts) > 4 else ""
            notes.append(f"{len(names)} operation(s) ran in the {side} only ({top}{more}): "
                         "a code path of its precision, with nothing to compare them with")
    return notes


def _reference_notes(runs: dict[str, Dump], dtypes: dict[str, str], prof: Profile
                     ) -> list[str]:
    """What the noise verdicts judged against: the reference, or the fixed limits."""
    if _generation_only(runs[TARGET]):
        return []
    if REFERENCE in runs:
        ref = runs[REFERENCE]
        where = (ref.meta.get("device") or {}).get("name") or "its device"
        return [f"judged against {ref.path.name}, the same inputs in "
                f"{short(dtypes[REFERENCE])} on {where}: a record drifts when its error is "
                f"beyond {REF_RMS_RATIO:g}x what that run shows on it (docs/verdicts.md)"]
    if dtypes[TARGET] in ("float16", "bfloat16") or dtypes[BASE] in ("float16", "bfloat16"):
        return [f"no same-precision reference, so fixed limits ({prof.in_eps(prof.noise_rms):g} "
                "eps rms): for verdicts that hold at depth, capture the baseline with "
                f"--expect {short(dtypes[TARGET])}"]
    return []


def _sketch_notes(runs: dict[str, Dump]) -> list[str]:
    """Stats records whose count sketches cannot be compared: runs that kept sketches of
    different sizes (a capture from before the 1021-bucket sketch keeps 31 numbers). A full
    dump's statistics, sketch included, are computed from its tensors by this version."""
    sizes = {}
    for name, d in runs.items():
        found = next((n for n in (size_of((e.stats or {}).get("sketch")) for e in d.entries)
                      if n is not None), BUCKETS if d.mode == "full" else None)
        if found is not None:
            sizes[name] = (d, found)
    if len({n for _, n in sizes.values()}) < 2:
        return []
    told = ", ".join(f"{d.path.name}: {n}" for d, n in sizes.values())
    return [f"count sketches of different sizes ({told} buckets): no error estimate from "
            f"them; capture the older run(s) again to get the {BUCKETS}-bucket sketch "
            "(docs/format.md)"]


def _info(b: Dump, t: Dump) -> dict[str, Any]:
    def side(d: Dump) -> dict[str, Any]:
        return {"path": str(Path(d.path)), "dtype": d.dtype, "mode": d.mode,
                "device": d.meta.get("device", {}).get("name"),
                "model": d.meta.get("model", {}).get("class")}

    return {"base": side(b), "target": side(t)}

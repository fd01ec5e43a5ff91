"""Align two dumps, compute metrics per tensor, give verdicts and the first divergence.

Rows follow the baseline's execution order; keys only the target has come last as MISSING.
Aliases (a module output that is the very tensor of an earlier record) are not compared
twice, unless only one side aliases: T5's block output is its FF layer's output in fp32 but
a new, clamped tensor in fp16, and that clamp is worth a row.

Work is spread over worker processes (:mod:`precision.judge.parallel`), each streaming its tensor
pair in chunks, so memory stays bounded by ``jobs x chunk`` work buffers whatever the dump
size; ``max_memory`` shrinks the chunk (and, if need be, the number of jobs) to fit a budget.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..dtypes import is_float
from ..dumps.dump import INPUT_PREFIX, Dump, Entry
from ..dumps.external import open_any
from ..errors import DumpError, InputError, option
from . import parallel
from .generation import PREFIX as GEN_PREFIX
from .generation import compare_generation, generation_prefixes, has_generation, summarise
from .logits import compare_logit_rows
from .metrics import PairAccumulator, TensorMetrics, compare_exact
from .posbias import diagnose
from .profiles import Profile, effective_precision, named_profile, precision_name, profile_for
from .report import FAIL_ON, Report, Row
from .statsdiff import record_stats, stats_delta

GEN_TOKENS = GEN_PREFIX + "tokens"
#: said when the baseline, not the target, holds the NaN/inf or the clamped values
SWAPPED = "the baseline overflowed: are the arguments swapped?"
#: per job: about 10 MiB of work arrays (a logits chunk is at least one vocabulary row);
#: 2^16 float64 (512 KiB) per array stays in cache
#: (2^14 to 2^18 measured: 2^16 was fastest with one job and with two)
CHUNK_ELEMS = 1 << 16
#: work memory per chunk element, at most: the read buffers, the six float64 and two small
#: scratch arrays of the metrics, and the float64 log-softmax temporaries of the logits
WORK_BYTES_PER_ELEMENT = 160
MIN_CHUNK_ELEMS = 1 << 12
#: below this much work (elements, see _cost), starting processes costs more than it saves
PARALLEL_MIN_ELEMENTS = 8 << 20


@dataclass(frozen=True)
class _Pair:
    order: int
    key: str
    base: Entry | None
    target: Entry | None
    base_key: str | None
    target_key: str | None
    is_logits: bool


def compare(base: str | os.PathLike[str] | Dump, target: str | os.PathLike[str] | Dump, *,
            rtol: float | None = None, atol: float | None = None, profile: str | None = None,
            fail_on: str = "drift", topk: int = 5, jobs: int | None = None,
            chunk_elems: int = CHUNK_ELEMS, max_memory: int | None = None,
            allow_different_models: bool = False, allow_partial: bool = False,
            base_dtype: str | None = None, target_dtype: str | None = None,
            progress: Callable[[int, int], None] | None = None) -> Report:
    """Compare two dumps of the same model and inputs; returns a :class:`Report`.

    ``profile`` (``fp16``/``bf16``/``fp32``) overrides the tolerance profile chosen from the
    two runs' dtypes; ``rtol``/``atol`` override its norm tolerance and absolute floor.
    ``fail_on`` decides which statuses make the report falsy (see ``report.FAIL_ON``).
    ``allow_partial`` reads an unfinished multi-rank dump's shards (with a warning).
    ``jobs`` worker processes (default: the usable cores) share the tensor pairs;
    ``max_memory`` (bytes) caps their work buffers together (see :func:`plan_jobs`).
    ``base_dtype``/``target_dtype`` state what a run computed in when its file cannot say
    (logits saved as fp32 from a bf16 run: numpy has no bf16); the profile follows them.
    """
    if fail_on not in FAIL_ON:
        raise InputError(f"--fail-on {fail_on!r}: choose one of {', '.join(FAIL_ON)}")
    b = base if isinstance(base, Dump) else open_any(base, allow_partial=allow_partial)
    t = target if isinstance(target, Dump) else open_any(target, allow_partial=allow_partial)
    _check_same_model(b, t, allow_different_models)
    stated = {"base": base_dtype, "target": target_dtype}
    prof = (named_profile(profile) if profile else
            profile_for(_precision(b, base_dtype), _precision(t, target_dtype))
            ).with_overrides(rtol, atol)
    pairs = _align(b, t)
    if jobs is not None and jobs < 1:
        raise InputError(f"--jobs {jobs}: use 1 or more")
    workers, chunk = plan_jobs(jobs or parallel.cpu_count(), max_memory, chunk_elems)
    if sum(_cost(p) for p in pairs) < PARALLEL_MIN_ELEMENTS:
        workers = 1
    rows = parallel.run(_run_pair, pairs, _Job(b, t, prof, topk, chunk), workers=workers,
                        cost=_cost, progress=progress)
    rows, bias_notes = diagnose(b, t, _with_growth(rows))
    for prefix in sorted(set(generation_prefixes(b)) & set(generation_prefixes(t))):
        rows.append(_generation_row(b, t, len(rows), topk, prefix, prof))
    first = next((r for r in rows if r.flagged), None)
    return Report(base=str(b.path), target=str(t.path), profile=prof, rows=tuple(rows),
                  first_divergence=first,
                  warnings=tuple(_warnings(b, t, rows, stated) + bias_notes),
                  fail_on=fail_on, info=_info(b, t))


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


@dataclass(frozen=True)
class _Job:
    """What every worker needs: the two dumps' headers (no data) and the settings."""

    b: Dump
    t: Dump
    prof: Profile
    topk: int
    chunk: int


def _run_pair(job: _Job, pair: _Pair) -> Row:
    return _compare_pair(job.b, job.t, pair, job.prof, job.topk, job.chunk)


def _cost(p: _Pair) -> float:
    """Relative work of a pair: its elements, thrice for logits (top-k, log-softmax, KL)."""
    e = p.base or p.target
    assert e is not None
    return math.prod(e.shape) * (3 if p.is_logits else 1)


def _check_same_model(b: Dump, t: Dump, allow: bool) -> None:
    hb, ht = b.config_hash, t.config_hash
    if hb and ht and hb != ht and not allow:
        raise DumpError(f"{b.path.name} and {t.path.name} come from different models "
                        f"(config hash {hb} vs {ht}); pass "
                        f"{option('--allow-different-models', 'allow_different_models=True')} to "
                        "compare them anyway")


def _precision(d: Dump, stated: str | None) -> str:
    """What a run computed in: as stated (``--base-dtype``), else its recorded dtype (TF32/HF32
    when its recorded matmul settings say so), else its most common float dtype."""
    if stated is not None:
        return precision_name(stated)
    return effective_precision(d.dtype or _guess_dtype(d), d.meta.get("compute"))


def _guess_dtype(d: Dump) -> str:
    floats = [e.dtype for e in d.entries if is_float(e.dtype)]
    return max(set(floats), key=floats.count) if floats else "float32"


def _stored_key(d: Dump, e: Entry) -> str | None:
    """The key whose data holds this entry: itself, or what it aliases (if stored)."""
    if e.key in d.tensors or e.stats is not None:
        return e.key
    if e.alias_of:
        return e.alias_of
    return None


def _align(b: Dump, t: Dump) -> list[_Pair]:
    logits = ({b.meta.get("logits_key"), t.meta.get("logits_key")}
              | set(b.meta.get("logits_keys", ())) | set(t.meta.get("logits_keys", ()))) - {None}
    # logits stored under different names (a capture's lm_head:out, an external 'logits')
    renamed = {}
    lb, lt = b.meta.get("logits_key"), t.meta.get("logits_key")
    if lb and lt and lb != lt:
        renamed[lb] = lt
    pairs: list[_Pair] = []
    seen = set(renamed.values())
    for e in b.entries:
        te = t.entry(renamed.get(e.key, e.key))
        if e.alias_of and (te is None or te.alias_of == e.alias_of):
            continue  # the same tensor as an earlier record on both sides: compared there
        if e.kind == "generation" or (te is None and _optional(e)):
            continue
        seen.add(e.key)
        pairs.append(_Pair(len(pairs), e.key, e, te, _stored_key(b, e),
                           _stored_key(t, te) if te else None, e.key in logits))
    for e in t.entries:
        if (e.key not in seen and not e.alias_of and b.entry(e.key) is None
                and not _optional(e)):
            pairs.append(_Pair(len(pairs), e.key, None, e, None, _stored_key(t, e), False))
    return pairs


def _same_positions(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Logits (batch, seq, vocab) against (batch*seq, vocab): the same rows, flattened."""
    return bool(a) and bool(b) and a[-1] == b[-1] and math.prod(a) == math.prod(b)


def _optional(e: Entry) -> bool:
    """Module inputs recorded on request (``--inputs``), absent on the other side, are fine;
    generation records get a row of their own (:func:`_generation_row`)."""
    return (e.kind == "in" and e.module != "input") or e.kind == "generation"


def _generation_row(b: Dump, t: Dump, order: int, topk: int, prefix: str,
                    prof: Profile) -> Row:
    g = compare_generation(b, t, k=topk, prefix=prefix, tie_noise=prof.noise_rms)
    status, reason = summarise(g)
    key = prefix + GEN_TOKENS
    info = b.tensors[key]
    return Row(order, key, status, reason, info.shape, info.dtype, t.tensors[key].dtype,
               generation=g)


def _compare_pair(b: Dump, t: Dump, p: _Pair, prof: Profile, topk: int,
                  chunk: int) -> Row:
    be, te = p.base, p.target
    if be is None or te is None:
        side = "target" if be is None else "baseline"
        e = be or te
        assert e is not None
        return Row(p.order, p.key, "MISSING", f"only in the {side}", e.shape,
                   be.dtype if be else "-", te.dtype if te else "-")
    row = Row(p.order, p.key, "OK", "", be.shape, be.dtype, te.dtype)
    if be.shape != te.shape and not (p.is_logits and _same_positions(be.shape, te.shape)):
        return replace(row, status="MISMATCH", reason=f"shape {list(be.shape)} vs {list(te.shape)}")
    if is_float(be.dtype) != is_float(te.dtype):
        return replace(row, status="MISMATCH", reason=f"dtype {be.dtype} vs {te.dtype}")
    full_b = p.base_key in b.tensors
    full_t = p.target_key in t.tensors
    if not is_float(be.dtype):
        if full_b and full_t:
            return _exact_row(b, t, p, row, chunk)
        return replace(row, reason="integer tensor in a stats-only dump: not compared")
    if full_b and full_t:
        return _float_row(b, t, p, row, prof, topk, chunk)
    return _stats_row(b, t, p, row, prof, chunk)


def _chunk_pairs(b: Dump, t: Dump, p: _Pair, chunk: int) -> Any:
    assert p.base_key is not None and p.target_key is not None
    return zip(b.chunks(p.base_key, chunk), t.chunks(p.target_key, chunk), strict=True)


def _exact_row(b: Dump, t: Dump, p: _Pair, row: Row, chunk: int) -> Row:
    ex = compare_exact(_chunk_pairs(b, t, p, chunk))
    if ex.mismatched == 0:
        return replace(row, exact=ex, reason="identical")
    what = f"{ex.mismatched} of {ex.numel} values differ (max |diff| {ex.max_abs:g})"
    if p.key.startswith(INPUT_PREFIX):
        return replace(row, exact=ex, status="MISMATCH",
                       reason=f"inputs differ, {what}: capture the target with --replay BASE")
    return replace(row, exact=ex, status="DRIFT", reason=what)


def _float_row(b: Dump, t: Dump, p: _Pair, row: Row, prof: Profile, topk: int,
               chunk: int) -> Row:
    acc = PairAccumulator(row.base_dtype, row.target_dtype)
    lg = None
    if p.is_logits and len(row.shape) >= 1 and row.shape[-1] > 0:
        # one pass over the (largest) tensor: row-aligned chunks feed both measurements
        vocab = row.shape[-1]

        def fed(pairs: Any) -> Any:
            for x, y in pairs:
                acc.update(x, y)
                yield x, y

        lg = compare_logit_rows(fed(_chunk_pairs(b, t, p, max(1, chunk // vocab) * vocab)),
                                vocab, k=topk, valid=real_tokens(b, row.shape),
                                tie_noise=prof.noise_rms)
    else:
        for x, y in _chunk_pairs(b, t, p, chunk):
            acc.update(x, y)
    m = acc.result()
    status, reason = judge(m, prof, gradient=_is_gradient(p.key))
    if status == "OK" and lg is not None:
        if lg.kl_mean > prof.kl_mean:
            status, reason = "DRIFT", f"mean KL {lg.kl_mean:.3g} > {prof.kl_mean:g}"
        elif lg.hard_top1_agreement < prof.top1:
            status, reason = "DRIFT", (f"top-1 agreement {lg.hard_top1_agreement:.2%} < "
                                       f"{prof.top1:.0%} (near-tie flips excluded)")
    if status == "OK" and m.nan_base + m.inf_base:
        reason = f"baseline holds {m.nan_base} NaN and {m.inf_base} inf (excluded)"
    return replace(row, status=status, reason=reason, metrics=m, logits=lg)


def _is_gradient(key: str) -> bool:
    """``--backward`` records: module output gradients (``:grad``), parameter ones (``:pgrad``)."""
    kind = key.rsplit(":", 1)[-1].split(".")[0].split("#")[0]
    return kind in ("grad", "pgrad")


def real_tokens(d: Dump, shape: tuple[int, ...]) -> Any:
    """Which logits rows are real tokens: the recorded attention mask of the positions the
    logits belong to (``decoder_attention_mask`` for an encoder-decoder, else
    ``attention_mask`` of a decoder-only model), when its shape matches; else None (all)."""
    positions = tuple(shape[:-1])
    has_decoder = INPUT_PREFIX + "decoder_input_ids" in d.tensors
    name = "decoder_attention_mask" if has_decoder else "attention_mask"
    key = INPUT_PREFIX + name
    if key not in d.tensors or tuple(d.tensors[key].shape) != positions:
        return None
    return d[key].reshape(-1) != 0


def judge(m: TensorMetrics, prof: Profile, *, gradient: bool = False) -> tuple[str, str]:
    """Status and reason for float metrics under a profile (rules in docs/verdicts.md).

    Non-finite values first, on either side: the baseline's own NaN/inf or clamped values
    where the target is finite are as much a divergence as the target's (the baseline
    overflowed, e.g. an fp16 baseline, or the arguments are swapped). Then the noise model:
    element-scaled rms error (diffuse drift) and max error (sparse outliers). Gradients
    (``gradient``) are judged by norm instead: their signal is in the tails, and the
    near-zero bulk, whose error the backward pass accumulates, carries none.
    """
    if m.new_nan:
        return "NAN", f"{m.new_nan} NaN where the baseline is finite"
    if m.base_only_nan:
        return "NAN", (f"the baseline has {m.base_only_nan} NaN where the target is finite "
                       "(are the arguments swapped?)")
    if m.new_inf or m.saturated:
        parts = []
        if m.new_inf:
            parts.append(f"{m.new_inf} inf where the baseline is finite")
        if m.saturated:
            parts.append(f"{m.saturated} values pinned near ±{m.target_max:g}")
        return "OVERFLOW", ", ".join(parts)
    if m.base_only_inf or m.saturated_base:
        what = (f"the baseline has {m.base_only_inf} inf where the target is finite"
                if m.base_only_inf else f"{m.saturated_base} baseline values are pinned near "
                                        "their format's max")
        return "OVERFLOW", f"{what} ({SWAPPED})"
    if m.max_abs <= prof.atol:
        return "OK", ""
    if gradient:
        return _judge_gradient(m, prof)
    if m.noise_rms > prof.noise_rms:
        return "DRIFT", (f"error {prof.in_eps(m.noise_rms):.3g} eps rms (element-scaled) > "
                         f"{prof.in_eps(prof.noise_rms):.3g}")
    if m.noise_max > prof.noise_max:
        return "DRIFT", (f"outlier: an element off by {prof.in_eps(m.noise_max):.3g} eps of "
                         f"its scale (> {prof.in_eps(prof.noise_max):.3g})")
    return "OK", ""


def _judge_gradient(m: TensorMetrics, prof: Profile) -> tuple[str, str]:
    """``||d|| <= grad_rel_l2 ||a|| + atol sqrt(n)`` and ``max|d| <= grad_outlier max|a|``."""
    if m.rmse * math.sqrt(m.compared) > (prof.grad_rel_l2 * m.norm_base
                                          + prof.atol * math.sqrt(m.compared)):
        return "DRIFT", f"gradient rel_l2 {m.rel_l2:.3g} > {prof.grad_rel_l2:.3g}"
    if m.max_abs > prof.grad_outlier * m.absmax_base + prof.atol:
        return "DRIFT", (f"gradient outlier: max|d| {m.max_abs:.3g} > {prof.grad_outlier:.3g}"
                         " x max|a|")
    return "OK", ""


def _stats_row(b: Dump, t: Dump, p: _Pair, row: Row, prof: Profile, chunk: int) -> Row:
    assert p.base is not None and p.target is not None
    sa = record_stats(b, p.base.key, chunk=chunk)
    sb = record_stats(t, p.target.key, chunk=chunk)
    if sa is None or sb is None:
        return replace(row, status="MISSING", reason="no data stored for this record")
    delta = stats_delta(sa, sb)
    row = replace(row, stats_delta=delta)
    if delta["new_nan"]:
        return replace(row, status="NAN", reason=f"{delta['new_nan']} more NaN than the baseline")
    if delta["new_inf"] or (t.dtype == "float16" and delta["new_near_fp16_max"]):
        return replace(row, status="OVERFLOW",
                       reason=f"{delta['new_inf']} more inf, {delta['new_near_fp16_max']} more "
                              "values near the fp16 max than the baseline")
    if delta["base_only_nan"]:
        return replace(row, status="NAN", reason=f"the baseline has {delta['base_only_nan']} "
                                                 "more NaN than the target (are the "
                                                 "arguments swapped?)")
    if delta["base_only_inf"]:
        return replace(row, status="OVERFLOW", reason=f"the baseline has "
                       f"{delta['base_only_inf']} more inf than the target ({SWAPPED})")
    # a healthy run's ||d|| stays within noise_rms x (||a|| + sigma sqrt(n)) <= 2 x noise_rms
    # x ||a|| when the bulk scale is at most the rms, and | ||b|| - ||a|| | <= ||d||
    bound = 2 * prof.noise_rms * delta["norm_base"] + prof.atol * math.sqrt(delta["numel"])
    if delta["norm_gap"] > bound:
        return replace(row, status="DRIFT",
                       reason=f"norms differ by {delta['norm_gap_rel']:.3g} relative "
                              f"(> {2 * prof.noise_rms:.3g}; proves rel_l2 at least that)")
    return replace(row, reason="stats only: norms agree (cannot rule out elementwise drift)")


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
    for d, side in ((b, "base"), (t, "target")):
        other = t if d is b else b
        if (d.meta.get("external") and stated[side] is None
                and d.dtype == "float32" and (other.dtype or "float32") == "float32"):
            name = Path(str(d.meta["external"])).name
            how = option(f"--{side}-dtype bf16", f"{side}_dtype='bf16'")
            notes.append(f"{name} came from a file that stores float32 and is judged as an "
                         f"fp32 run: if it computed in bf16 or fp16, say so with {how}")
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


def _info(b: Dump, t: Dump) -> dict[str, Any]:
    def side(d: Dump) -> dict[str, Any]:
        return {"path": str(Path(d.path)), "dtype": d.dtype, "mode": d.mode,
                "device": d.meta.get("device", {}).get("name"),
                "model": d.meta.get("model", {}).get("class")}

    return {"base": side(b), "target": side(t)}

"""Verdict rules: each a small function from a measured row and its context to a verdict.

The judge runs once, in the parent process, after every row is measured
(:mod:`precision.judge.measure.pairs`). :data:`RULES` lists the rules in order; the first that
returns a :class:`Verdict` decides the row, and a row that no rule flags keeps the status
its measurement gave (``OK`` with an informative reason, or ``MISSING``/``MISMATCH`` from
alignment, which no rule overrides). A rule sees the row and a :class:`Context`: the
profile, the dtypes each run computed in, every row of the comparison in execution order
(its neighbours) and the other comparisons' rows of the same key (a same-precision
reference run's error, for instance). docs/verdicts.md states each rule with its limit.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

from ...dumps.keys import parse_key
from ..lineup.align import BASE, REFERENCE, Comparison
from ..measure.generation import summarise
from ..measure.metrics import TensorMetrics
from ..measure.row import Row, Status
from ..profiles import (
    REF_FLOOR_MAX_EPS,
    REF_FLOOR_RMS_EPS,
    REF_JUMP,
    REF_JUMP_FLOOR,
    REF_JUMP_MIN_VECTORS,
    REF_JUMP_WINDOW,
    REF_KL_RATIO,
    REF_MAX_RATIO,
    REF_RMS_RATIO,
    REF_SKETCH_RATIO,
    REF_VECTOR_GRAD_RATIO,
    Profile,
)

#: said when the baseline, not the target, holds the NaN/inf or the clamped values
SWAPPED = "the baseline overflowed: are the arguments swapped?"
#: the comparison of the baseline with a same-precision reference run (``base->reference``),
#: whose rows the reference rules read: ``ctx.other(REFERENCE_COMPARISON, key)``
REFERENCE_COMPARISON = Comparison(BASE, REFERENCE).name


@dataclass(frozen=True)
class Verdict:
    """A rule's finding: the status, a one-line reason, and ``score``: the rule's measure
    over its limit (above 1 when flagged; 0 where a rule has no single measure)."""

    status: Status
    reason: str
    score: float = 0.0


@dataclass(frozen=True)
class Context:
    """What a rule may look at besides the row itself."""

    profile: Profile
    #: the dtype each run computed in, by run name (``base``, ``target``, ``reference``)
    dtypes: Mapping[str, str | None]
    #: every row of this comparison, in execution order
    rows: Sequence[Row] = ()
    #: the other comparisons' rows by key: ``others["base->reference"][key]``
    others: Mapping[str, Mapping[str, Row]] = field(default_factory=dict)
    #: modules known to hold no parameters (activations, dropout): their output is a function
    #: of their input alone (:func:`inherited_scale`)
    stateless: frozenset[str] = frozenset()

    def other(self, comparison: str, key: str) -> Row | None:
        return self.others.get(comparison, {}).get(key)

    def before(self, row: Row) -> Iterator[Row]:
        """The rows before ``row`` in execution order, nearest first."""
        return (self.rows[i] for i in range(min(row.order, len(self.rows)) - 1, -1, -1))


Rule = Callable[[Row, Context], "Verdict | None"]


# --------------------------------------------------------------------- full tensors
def non_finite(row: Row, ctx: Context) -> Verdict | None:
    """NaN/inf or clamped values on either side where the other is finite.

    The baseline's own NaN/inf or clamps where the target is finite are as much a divergence
    as the target's (an fp16 baseline overflowed, or the arguments are swapped).
    """
    m = row.metrics
    if m is None:
        return None
    if m.new_nan:
        return Verdict("NAN", f"{m.new_nan} NaN where the baseline is finite")
    if m.base_only_nan:
        return Verdict("NAN", f"the baseline has {m.base_only_nan} NaN where the target is "
                              "finite (are the arguments swapped?)")
    if m.new_inf or m.saturated:
        parts = []
        if m.new_inf:
            parts.append(f"{m.new_inf} inf where the baseline is finite")
        if m.saturated:
            parts.append(f"{m.saturated} values pinned near ±{m.target_max:g}")
        return Verdict("OVERFLOW", ", ".join(parts))
    if m.base_only_inf or m.saturated_base:
        what = (f"the baseline has {m.base_only_inf} inf where the target is finite"
                if m.base_only_inf else f"{m.saturated_base} baseline values are pinned near "
                                        "their format's max")
        return Verdict("OVERFLOW", f"{what} ({SWAPPED})")
    return None


def _noisy(row: Row, ctx: Context, *, gradient: bool, hard: bool = False
           ) -> TensorMetrics | None:
    """The row's metrics when a fixed-limit noise rule applies: beyond ``atol``, of the
    right kind (activation or gradient), and with no reference measurement of the key
    (:func:`reference_rms` judges those) unless the limit is ``hard`` (``--rtol``)."""
    m = row.metrics
    if m is None or m.max_abs <= ctx.profile.atol or parse_key(row.key).is_gradient != gradient:
        return None
    return m if hard or _reference(row, ctx, gradient=gradient) is None else None


def _reference(row: Row, ctx: Context, *, gradient: bool = False
               ) -> tuple[TensorMetrics, TensorMetrics] | None:
    """The row's metrics and the reference run's of the same key, when both exist, the row
    is of the kind asked for (activation, or ``gradient``) and the reference is usable there:
    a reference that overflowed itself (NaN/inf where the baseline is finite) measures
    nothing about the precision's cost, and the fixed limits judge such records."""
    ref = ctx.other(REFERENCE_COMPARISON, row.key)
    if (row.metrics is None or ref is None or ref.metrics is None
            or parse_key(row.key).is_gradient != gradient):
        return None
    r = ref.metrics
    if r.new_nan or r.new_inf or r.saturated or r.compared == 0:
        return None
    return row.metrics, r


def _beyond_reference(row: Row, ctx: Context, measure: str, ratio: float,
                      floor_eps: float) -> tuple[float, float, float] | None:
    """(the row's ``measure``, the reference's, the limit) when the row's is beyond
    ``max(ratio x the reference's, floor_eps eps)``; None otherwise."""
    both, prof = _reference(row, ctx), ctx.profile
    if both is None or both[0].max_abs <= prof.atol:
        return None
    value, ref = (float(getattr(m, measure)) for m in both)
    limit = max(ratio * ref, floor_eps * prof.eps)
    return (value, ref, limit) if value > limit else None


def reference_rms(row: Row, ctx: Context) -> Verdict | None:
    """With a reference: element-scaled rms error beyond ``REF_RMS_RATIO`` times the
    reference's own against the same baseline, and beyond ``REF_FLOOR_RMS_EPS`` eps."""
    found, eps = _beyond_reference(row, ctx, "noise_rms", REF_RMS_RATIO,
                                   REF_FLOOR_RMS_EPS), ctx.profile.eps
    if found is None:
        return None
    value, ref, limit = found
    return Verdict("DRIFT", f"error {value / eps:.3g} eps rms (element-scaled), "
                            f"{_times(value, ref)} the reference's {ref / eps:.3g} eps "
                            f"(> {limit / eps:.3g} eps)", value / limit)


def reference_max(row: Row, ctx: Context) -> Verdict | None:
    """With a reference: the worst element's scaled error beyond ``REF_MAX_RATIO`` times
    the reference's worst, and beyond ``REF_FLOOR_MAX_EPS`` eps."""
    found, eps = _beyond_reference(row, ctx, "noise_max", REF_MAX_RATIO,
                                   REF_FLOOR_MAX_EPS), ctx.profile.eps
    if found is None:
        return None
    value, ref, limit = found
    return Verdict("DRIFT", f"outlier: an element off by {value / eps:.3g} eps of its scale, "
                            f"{_times(value, ref)} the reference's worst {ref / eps:.3g} eps "
                            f"(> {limit / eps:.3g} eps)", value / limit)


def reference_gradient(row: Row, ctx: Context) -> Verdict | None:
    """Gradients with a reference: ``rel_l2`` beyond ``REF_RMS_RATIO`` times the reference's
    (and ``REF_FLOOR_RMS_EPS`` eps), or ``max|d| / max|a|`` beyond ``REF_MAX_RATIO`` times
    the reference's (and ``REF_FLOOR_MAX_EPS`` eps): the backward pass's accumulated error
    grows with depth like the forward's, and the reference carries it too. A 1-D parameter's
    gradient (norm weight, bias) is judged by ``rel_l2`` alone, against
    ``REF_VECTOR_GRAD_RATIO`` times the reference's."""
    both, prof = _reference(row, ctx, gradient=True), ctx.profile
    if both is None or both[0].max_abs <= prof.atol:
        return None
    m, ref = both
    vector = parse_key(row.key).kind == "pgrad" and len(row.shape) == 1
    ratio = REF_VECTOR_GRAD_RATIO if vector else REF_RMS_RATIO
    limit = max(ratio * ref.rel_l2, REF_FLOOR_RMS_EPS * prof.eps)
    if m.rel_l2 > limit:
        return Verdict("DRIFT", f"gradient rel_l2 {m.rel_l2:.3g}, "
                                f"{_times(m.rel_l2, ref.rel_l2)} the reference's "
                                f"{ref.rel_l2:.3g} (> {limit:.3g})", m.rel_l2 / limit)
    if vector:  # a few hundred sums: their norm is their outlier measure
        return None
    worst, ref_worst = (x.max_abs / x.absmax_base if x.absmax_base else 0.0 for x in (m, ref))
    limit = max(REF_MAX_RATIO * ref_worst, REF_FLOOR_MAX_EPS * prof.eps)
    if worst > limit:
        return Verdict("DRIFT", f"gradient outlier: max|d| {worst:.3g} x max|a|, "
                                f"{_times(worst, ref_worst)} the reference's (> {limit:.3g})",
                       worst / limit)
    return None


def _rms_ratio(row: Row, ctx: Context) -> float | None:
    """An activation's element-scaled rms error over the reference's (the rms rule's floor
    keeps a nearly exact reference from making it explode)."""
    both = _reference(row, ctx)
    if both is None:
        return None
    m, ref = both
    return m.noise_rms / max(ref.noise_rms, REF_FLOOR_RMS_EPS * ctx.profile.eps / REF_RMS_RATIO)


def reference_jump(row: Row, ctx: Context) -> Verdict | None:
    """With a reference: error *added* nearby. The ratio to the reference is at least
    ``REF_JUMP_FLOOR`` and ``REF_JUMP`` times the lowest ratio among the ``REF_JUMP_WINDOW``
    records before it, over at least ``REF_JUMP_MIN_VECTORS`` vectors of its last axis:
    deep in a model the reference carries the inherited error too, so one faulty kernel's
    share shows as a step in the ratio before it reaches ``REF_RMS_RATIO``; a ratio
    inherited from a fault upstream is no step."""
    if row.metrics is None or row.metrics.max_abs <= ctx.profile.atol \
            or not _enough_vectors(row, row.metrics.numel):
        return None
    return _jump(row, ctx, _rms_ratio, "")


def _enough_vectors(row: Row, numel: int) -> bool:
    """Whether ``numel`` elements hold ``REF_JUMP_MIN_VECTORS`` vectors of the record's last
    axis: a step measured over a handful of tokens is sampling noise."""
    return numel >= REF_JUMP_MIN_VECTORS * (row.shape[-1] if row.shape else 1)


def _jump(row: Row, ctx: Context, ratio_of: Callable[[Row, Context], float | None],
          what: str) -> Verdict | None:
    """The step rule of :func:`reference_jump` on the ratios ``ratio_of`` gives: the row's
    at least ``REF_JUMP_FLOOR`` and ``REF_JUMP x max(1, the lowest of the REF_JUMP_WINDOW
    ratios before it)``."""
    ratio = ratio_of(row, ctx)
    if ratio is None or ratio < REF_JUMP_FLOOR:
        return None
    ratios = (r for r in (ratio_of(p, ctx) for p in ctx.before(row)) if r is not None)
    before = list(itertools.islice(ratios, REF_JUMP_WINDOW))
    if not before:
        return None
    low = max(min(before), 1.0)
    if ratio < REF_JUMP * low:
        return None
    return Verdict("DRIFT", f"error added here: {ratio:.3g}x the reference's{what}, up from "
                            f"{low:.3g}x within the {REF_JUMP_WINDOW} records before "
                            f"(> {REF_JUMP:g}x that, and {REF_JUMP_FLOOR:g}x)",
                   ratio / (REF_JUMP * low))


def _times(value: float, ref: float) -> str:
    return f"{value / ref:.3g}x" if ref > 0 else "where the reference is exact,"


def inherited_scale(row: Row, ctx: Context) -> float | None:
    """The bulk scale of what a parameter-free module's output was computed from, when it
    is larger than the output's own: the record just before it with as many elements (GELU
    after ``fc1``, SiLU after ``gate_proj``). A squashing activation maps most of its inputs
    near zero, so its own bulk scale is tiny while its error follows its input's: an
    element's expected error follows the scale of what it was computed from
    (docs/verdicts.md). None for modules with parameters, operations and the rest."""
    key = parse_key(row.key)
    if key.op or key.module not in ctx.stateless or row.metrics is None:
        return None
    numel = math.prod(row.shape)
    source = next((r for r in ctx.before(row) if r.metrics is not None
                   and not parse_key(r.key).is_gradient), None)
    if source is None or source.metrics is None or math.prod(source.shape) != numel:
        return None
    scale = source.metrics.bulk_scale
    return scale if scale > row.metrics.bulk_scale else None


def _within_inherited(row: Row, ctx: Context, error: float, limit: float) -> bool:
    """Whether ``error`` (an rms or a largest |d|) over the inherited bulk scale is within
    ``limit``: every element's scale is at least that, so the element-scaled error is too."""
    scale = inherited_scale(row, ctx)
    return scale is not None and error / scale <= limit


def noise_rms(row: Row, ctx: Context) -> Verdict | None:
    """Diffuse drift: element-scaled rms error beyond the profile's ``noise_rms`` (and, for
    a parameter-free module, beyond it against its input's scale too). A ``--rtol`` given
    is a hard limit: it judges the records a reference measures too (after the reference's
    own rules), so a CI job that tightens it gets the tighter limit."""
    m, prof = _noisy(row, ctx, gradient=False, hard=ctx.profile.rtol_given), ctx.profile
    if m is None or m.noise_rms <= prof.noise_rms or _within_inherited(
            row, ctx, m.rmse, prof.noise_rms):
        return None
    return Verdict("DRIFT", f"error {prof.in_eps(m.noise_rms):.3g} eps rms (element-scaled) > "
                            f"{prof.in_eps(prof.noise_rms):.3g}", m.noise_rms / prof.noise_rms)


def noise_max(row: Row, ctx: Context) -> Verdict | None:
    """Sparse outliers: one element off by more than ``noise_max`` of its own scale (and,
    for a parameter-free module, of its input's scale too)."""
    m, prof = _noisy(row, ctx, gradient=False), ctx.profile
    if m is None or m.noise_max <= prof.noise_max or _within_inherited(
            row, ctx, m.max_abs, prof.noise_max):
        return None
    return Verdict("DRIFT", f"outlier: an element off by {prof.in_eps(m.noise_max):.3g} eps of "
                            f"its scale (> {prof.in_eps(prof.noise_max):.3g})",
                   m.noise_max / prof.noise_max)


def gradient_norm(row: Row, ctx: Context) -> Verdict | None:
    """Gradients: ``||d|| <= grad_rel_l2 ||a|| + atol sqrt(n)``."""
    m, prof = _noisy(row, ctx, gradient=True), ctx.profile
    if m is None:
        return None
    limit = prof.grad_rel_l2 * m.norm_base + prof.atol * math.sqrt(m.compared)
    if m.rmse * math.sqrt(m.compared) <= limit:
        return None
    return Verdict("DRIFT", f"gradient rel_l2 {m.rel_l2:.3g} > {prof.grad_rel_l2:.3g}",
                   m.rmse * math.sqrt(m.compared) / limit)


def gradient_outlier(row: Row, ctx: Context) -> Verdict | None:
    """Gradients: ``max|d| <= grad_outlier max|a| + atol``."""
    m, prof = _noisy(row, ctx, gradient=True), ctx.profile
    if m is None:
        return None
    limit = prof.grad_outlier * m.absmax_base + prof.atol
    if m.max_abs <= limit:
        return None
    return Verdict("DRIFT", f"gradient outlier: max|d| {m.max_abs:.3g} > "
                            f"{prof.grad_outlier:.3g} x max|a|", m.max_abs / limit)


def logits_kl(row: Row, ctx: Context) -> Verdict | None:
    """Logits: mean per-token ``KL(base || target)`` over real tokens beyond ``kl_mean``, or,
    where a same-precision reference measured them (finite), beyond
    ``max(kl_mean, REF_KL_RATIO x KL(base || reference))``."""
    lg, prof = row.logits, ctx.profile
    if lg is None:
        return None
    ref = ctx.other(REFERENCE_COMPARISON, row.key)
    ref_kl = ref.logits.kl_mean if ref is not None and ref.logits is not None else 0.0
    limit = max(prof.kl_mean, REF_KL_RATIO * ref_kl if math.isfinite(ref_kl) else 0.0)
    if lg.kl_mean <= limit:
        return None
    if limit > prof.kl_mean:
        return Verdict("DRIFT", f"mean KL {lg.kl_mean:.3g}, {lg.kl_mean / ref_kl:.3g}x the "
                                f"reference's {ref_kl:.3g} (> {REF_KL_RATIO:g}x)",
                       lg.kl_mean / limit)
    return Verdict("DRIFT", f"mean KL {lg.kl_mean:.3g} > {prof.kl_mean:g}", lg.kl_mean / limit)


def logits_top1(row: Row, ctx: Context) -> Verdict | None:
    """Logits: top-1 agreement (near-tie flips excluded) below ``top1``."""
    lg, prof = row.logits, ctx.profile
    if lg is None or lg.hard_top1_agreement >= prof.top1:
        return None
    return Verdict("DRIFT", f"top-1 agreement {lg.hard_top1_agreement:.2%} < {prof.top1:.0%} "
                            "(near-tie flips excluded)",
                   (1 - lg.hard_top1_agreement) / max(1 - prof.top1, 1e-12))


# ------------------------------------------------------------------------- stats mode
def stats_non_finite(row: Row, ctx: Context) -> Verdict | None:
    """Stats mode: more NaN or inf than the other run, or, in an fp16 target, more values
    pinned near fp16's max than the baseline."""
    d = row.stats_delta
    if d is None:
        return None
    if d.new_nan:
        return Verdict("NAN", f"{d.new_nan} more NaN than the baseline")
    fp16 = ctx.dtypes.get("target") == "float16"
    if d.new_inf or (fp16 and d.new_near_fp16_max):
        near = (f", {d.new_near_fp16_max} more values near the fp16 max"
                if fp16 and d.new_near_fp16_max else "")
        return Verdict("OVERFLOW", f"{d.new_inf} more inf{near} than the baseline")
    if d.base_only_nan:
        return Verdict("NAN", f"the baseline has {d.base_only_nan} more NaN than the target "
                              "(are the arguments swapped?)")
    if d.base_only_inf:
        return Verdict("OVERFLOW", f"the baseline has {d.base_only_inf} more inf than the "
                                   f"target ({SWAPPED})")
    return None


def _sketch_gaps(row: Row, ctx: Context) -> tuple[float, float, float] | None:
    """Stats mode with a reference: the count-sketch estimates of ``||b - a||`` for the
    target and the reference (:mod:`precision.dumps.sketch`), and ``||a||``; None where a
    run has no sketch (NaN, inf or masked values; sketches of different sizes)."""
    d, ref = row.stats_delta, ctx.other(REFERENCE_COMPARISON, row.key)
    if d is None or ref is None or ref.stats_delta is None:
        return None
    gap, ref_gap = d.sketch_gap, ref.stats_delta.sketch_gap
    if gap is None or ref_gap is None or d.norm_base is None:
        return None
    return float(gap), float(ref_gap), float(d.norm_base)


def reference_sketch(row: Row, ctx: Context) -> Verdict | None:
    """Stats mode with a reference: the count-sketch estimate of ``||b - a||``
    (:mod:`precision.dumps.sketch`) beyond ``REF_SKETCH_RATIO`` times the reference's, and
    beyond ``eps / 4 x ||a||`` where the reference is nearly exact."""
    gaps = _sketch_gaps(row, ctx)
    if gaps is None:
        return None
    gap, ref_gap, norm = gaps
    limit = max(REF_SKETCH_RATIO * ref_gap, ctx.profile.eps / 4 * norm)
    if gap <= limit or gap <= ctx.profile.atol:
        return None
    return Verdict("DRIFT", f"error norm about {gap / norm:.3g} relative (count "
                            f"sketch), {_times(gap, ref_gap)} the reference's (> "
                            f"{limit / norm:.3g})", gap / limit)


def _sketch_ratio(row: Row, ctx: Context) -> float | None:
    """The count-sketch error estimate over the reference's, as :func:`reference_sketch`
    judges it: ``gap / max(ref_gap, eps/4 x ||a|| / REF_SKETCH_RATIO)`` (above
    ``REF_SKETCH_RATIO`` exactly where that rule fires, up to ``atol``)."""
    gaps = _sketch_gaps(row, ctx)
    if gaps is None:
        return None
    gap, ref_gap, norm = gaps
    floor = max(ref_gap, ctx.profile.eps / 4 * norm / REF_SKETCH_RATIO)
    return gap / floor if floor > 0 else (math.inf if gap > 0 else 1.0)


def reference_sketch_jump(row: Row, ctx: Context) -> Verdict | None:
    """Stats mode with a reference: error *added* nearby, the step rule of
    :func:`reference_jump` on the count-sketch ratios (:func:`_sketch_ratio`), with the
    same limits (the minimum of token vectors included): at depth a faulty kernel's share
    of the error stays under ``REF_SKETCH_RATIO`` and shows as a step (1021 buckets
    estimate a norm to about 2%; 31 did to 13%, too coarse for a step)."""
    gaps, d = _sketch_gaps(row, ctx), row.stats_delta
    if (gaps is None or d is None or gaps[0] <= ctx.profile.atol
            or not _enough_vectors(row, d.recorded_elements)):
        return None
    return _jump(row, ctx, _sketch_ratio, " (count sketch)")


def stats_norm_gap(row: Row, ctx: Context) -> Verdict | None:
    """Stats mode: a statistic that moved more than the error norm allows proves drift.

    A healthy run's ``||d|| = ||b - a||`` stays within ``bound = 2 noise_rms ||a|| + atol
    sqrt(n)`` (``noise_rms (||a|| + sigma sqrt(n)) <= 2 noise_rms ||a||`` when the bulk scale
    is at most the rms). Each statistic both records hold bounds ``||d||`` from below:

    - ``| ||b|| - ||a|| | <= ||d||`` (reverse triangle inequality);
    - ``|max b - max a| <= max_i |d_i| <= ||d||``, and the same for ``min``;
    - ``sqrt(n) |mean b - mean a| = |sum_i d_i| / sqrt(n) <= ||d||`` (Cauchy-Schwarz).

    The largest of them beyond ``bound`` is DRIFT. Without a recorded norm (an msprobe
    summary of max and min only) ``||a|| <= sqrt(n) max |a_i|`` stands in for it; a
    statistic neither record holds is not guessed.
    """
    d, prof = row.stats_delta, ctx.profile
    if d is None:
        return None
    n = d.numel
    scale = d.norm_base if d.norm_base is not None else (
        d.absmax_base * math.sqrt(n) if d.absmax_base is not None else None)
    if scale is None:
        return None
    bound = 2 * prof.noise_rms * scale + prof.atol * math.sqrt(n)
    moved = [(gap, what) for gap, what in (
        (d.norm_gap, "norm"), (_moved(d.max_base, d.max_target), "max"),
        (_moved(d.min_base, d.min_target), "min"),
        (_moved(d.mean_base, d.mean_target, math.sqrt(n)), "mean")) if gap is not None]
    if not moved:
        return None
    gap, what = max(moved)
    if gap <= bound:
        return None
    score = gap / bound if bound else math.inf
    if what == "norm":
        return Verdict("DRIFT", f"norms differ by {d.norm_gap_rel:.3g} relative "
                                f"(> {2 * prof.noise_rms:.3g}; proves rel_l2 at least that)",
                       score)
    base, target = {"max": (d.max_base, d.max_target), "min": (d.min_base, d.min_target),
                    "mean": (d.mean_base, d.mean_target)}[what]
    return Verdict("DRIFT", f"{what} moved from {base:.4g} to {target:.4g}, more than an "
                            f"error within the expected noise can move it (proves rel_l2 > "
                            f"{2 * prof.noise_rms:.3g})", score)


def _moved(a: float | None, b: float | None, weight: float = 1.0) -> float | None:
    """``weight x |b - a|``, None unless both are known."""
    return None if a is None or b is None else weight * abs(b - a)


def stats_checksum(row: Row, ctx: Context) -> Verdict | None:
    """Stats mode, records that hold a checksum and no statistic in common (msprobe's
    summary_mode xor): different checksums are DRIFT, since nothing says by how much the
    tensors differ; equal ones are bit-identical."""
    d = row.stats_delta
    if (d is None or d.has_statistics or not d.same_checksum_kind
            or d.checksum_base == d.checksum_target):
        return None
    return Verdict("DRIFT", "checksums differ and the dumps hold no statistic to say by how "
                            "much (a summary of checksums only)")


# ------------------------------------------------------------- exact and generations
def exact_mismatch(row: Row, ctx: Context) -> Verdict | None:
    """Integer and bool tensors compare exactly: the model's inputs differing is a
    MISMATCH (the runs saw different inputs), any other difference DRIFT."""
    ex = row.exact
    if ex is None or ex.mismatched == 0:
        return None
    what = f"{ex.mismatched} of {ex.numel} values differ (max |diff| {ex.max_abs:g})"
    if parse_key(row.key).is_input:
        return Verdict("MISMATCH", f"inputs differ, {what}: capture the target with --replay "
                                   "BASE")
    return Verdict("DRIFT", what, ex.share)


def generation_check(row: Row, ctx: Context) -> Verdict | None:
    """Generations: a sequence that diverges and fails the vLLM top-N check."""
    if row.generation is None:
        return None
    status, reason = summarise(row.generation)
    return Verdict("DRIFT", reason) if status == "DRIFT" else None


#: the rules in the order they are tried; the first verdict decides
RULES: tuple[Rule, ...] = (
    non_finite, reference_gradient, gradient_norm, gradient_outlier, reference_rms,
    reference_max, reference_jump, noise_rms,
    noise_max, logits_kl, logits_top1,
    stats_non_finite, reference_sketch, reference_sketch_jump, stats_norm_gap, stats_checksum,
    exact_mismatch,
    generation_check,
)

#: statuses a measurement settles (alignment or shapes): no rule overrides them
SETTLED: frozenset[str] = frozenset({"MISSING", "MISMATCH"})


def verdict_of(row: Row, ctx: Context, rules: Sequence[Rule] = RULES) -> Verdict | None:
    """The first rule's verdict on ``row``, or None when no rule flags it."""
    if row.status in SETTLED:
        return None
    for rule in rules:
        found = rule(row, ctx)
        if found is not None:
            return found
    return None


def judge_rows(rows: Sequence[Row], ctx: Context, rules: Sequence[Rule] = RULES
               ) -> list[Row]:
    """Every row with its verdict applied (status, reason, score)."""
    ctx = Context(ctx.profile, ctx.dtypes, rows, ctx.others, ctx.stateless)
    out = []
    for row in rows:
        found = verdict_of(row, ctx, rules)
        out.append(row if found is None else
                   replace(row, status=found.status, reason=found.reason, score=found.score))
    return out


BLOWN = frozenset({"OVERFLOW", "NAN"})


def made_in_own_forward(rows: Sequence[Row]) -> list[Row]:
    """The first OVERFLOW/NAN row, when it was made in its module's own forward: no recorded
    output of its submodules is blown (a residual add, or another operation written in the
    module's forward, made it). The reason says so."""
    out = list(rows)
    for i, row in enumerate(rows):
        if row.status not in BLOWN:
            continue
        key = parse_key(row.key)
        if key.kind != "out" or key.module in ("root", "input"):
            break
        inside = [r for r in rows[:i] if parse_key(r.key).module.startswith(key.module + ".")]
        if inside and not any(r.status in BLOWN for r in inside):
            out[i] = replace(row, reason=f"{row.reason}; made in {key.module}'s own forward, "
                                         "not in a submodule: a residual add or another "
                                         "operation there")
        break
    return out

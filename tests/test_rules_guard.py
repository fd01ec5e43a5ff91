"""Guards on the verdict rules a mutation check found unheld (docs/verdicts.md).

Each rule is tripped by a case just beyond its documented limit and left quiet by one just
inside it, on small dumps written here and compared with ``precision.compare``. The limits
are the documented multiples of each profile's eps (5/256 eps for fp16, bf16 and TF32,
128/16384 eps for fp32 against fp32, gradients 16/128 eps, KL 1e-4 fp16 and TF32, 5e-3
bf16, 1e-6 fp32): the tensors are built from those numbers, not from the code's, so a limit
moved by 10% either way turns one side of a pair. The cases sit at 0.95x and 1.05x of a
limit: a point at exactly 0.9x cannot tell the limit from one lowered by 10%.

The baseline is 1536 everywhere, one binade ([1024, 2048)), so every element's noise scale
is known: ``s = p(1536) + sigma = 1024 + 2048 = 3072`` (:mod:`precision.judge.measure.noise`). The
targets are stored in float64 (the dump's ``dtype`` says what the run computed in), so the
metric lands where the test puts it, which each test asserts before the verdict.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import precision
from precision import Report, Row

from .conftest import stats_of

MakeDump = Callable[..., Path]

A = 1536.0  # the baseline's value: p(|a|) = 1024, bulk scale sigma = 2048
SCALE = 3072.0  # s = p(|a|) + sigma for every element
N = 1 << 16  # elements: one outlier moves the rms by max / 256
INSIDE, BEYOND = 0.95, 1.05
FP16_MAX = 65504.0


@dataclass(frozen=True)
class Documented:
    """A profile as docs/verdicts.md states it."""

    target: str  # the target dump's dtype
    name: str  # report.profile.name
    eps: float
    rms_eps: float  # noise_rms, in eps
    max_eps: float  # noise_max, in eps
    kl_mean: float
    top1: float
    meta: tuple[tuple[str, Any], ...] = ()


TF32_ON_CUDA = {"device_type": "cuda", "cuda_matmul_allow_tf32": True, "has_conv": False}
PROFILES = {
    "fp16": Documented("float16", "fp32->fp16", 2.0**-10, 5, 256, 1e-4, 0.99),
    "bf16": Documented("bfloat16", "fp32->bf16", 2.0**-7, 5, 256, 5e-3, 0.99),
    "tf32": Documented("float32", "fp32->tf32", 2.0**-10, 5, 256, 1e-4, 0.99,
                       (("compute", TF32_ON_CUDA),)),
    "fp32": Documented("float32", "fp32->fp32", 2.0**-23, 128, 16384, 1e-6, 1.0),
}
GRAD_REL_L2_EPS, GRAD_OUTLIER_EPS = 32, 128
#: with a reference: gradients of matrices and activations, and of 1-D parameters
REF_GRAD_RATIO, REF_VECTOR_GRAD_RATIO = 3, 10
#: with a reference that measured the logits: their mean KL against 3x the reference's
REF_KL_RATIO = 3


def _compare(make_dump: MakeDump, doc: Documented, key: str, a: np.ndarray, b: np.ndarray,
             **kw: Any) -> tuple[Report, Row]:
    base = make_dump("base.st", {key: a}, dtype="float32", **kw)
    target = make_dump("target.st", {key: b}, dtype=doc.target, meta=dict(doc.meta), **kw)
    report = precision.compare(base, target, jobs=1)
    assert report.profile.name == doc.name
    assert report.profile.eps == doc.eps
    (row,) = report.rows
    return report, row


def _baseline() -> np.ndarray:
    return np.full(N, A, dtype=np.float32)


# --- stats mode: values pinned near the fp16 max ----------------------------------------------

NEAR = 0.98 * FP16_MAX  # 64193.92
PINNED, BELOW_NEAR, ORDINARY = 64224.0, 64192.0, 64000.0  # fp16 values either side of NEAR


def _stats_status(make_dump: MakeDump, base: np.ndarray, target: np.ndarray,
                  target_dtype: str) -> Row:
    b = make_dump("b.st", {}, stats={"x:out": stats_of(base)})
    t = make_dump("t.st", {}, dtype=target_dtype, stats={"x:out": stats_of(target)})
    (row,) = precision.compare(b, t, jobs=1).rows
    return row


def _large_values(top: float) -> np.ndarray:
    x = np.random.default_rng(0).standard_normal(1000) * 10
    x[:3] = top
    return x.astype(np.float16).astype(np.float64)


def test_stats_mode_values_pinned_near_the_fp16_max_are_overflow(make_dump: MakeDump) -> None:
    """Three values pushed from 64000 to 64224 (the first fp16 value within 2% of 65504) in
    an fp16 target: OVERFLOW, though the norms agree (so DRIFT could not catch it)."""
    assert BELOW_NEAR < NEAR <= PINNED < FP16_MAX
    base = _large_values(ORDINARY)
    pinned = _large_values(PINNED)
    row = _stats_status(make_dump, base, pinned, "float16")
    assert row.stats_delta is not None and row.stats_delta.new_near_fp16_max == 3
    assert row.stats_delta.new_inf == 0 and row.stats_delta.norm_gap_rel < 5 * 2.0**-10
    assert row.status == "OVERFLOW" and "near the fp16 max" in row.reason, row.reason


def test_stats_mode_just_below_the_fp16_band_or_as_many_as_the_baseline_is_ok(
        make_dump: MakeDump) -> None:
    base = _large_values(ORDINARY)
    below = _stats_status(make_dump, base, _large_values(BELOW_NEAR), "float16")
    assert below.stats_delta is not None and below.stats_delta.new_near_fp16_max == 0
    assert below.status == "OK", below.reason
    # the baseline holds the same values pinned: nothing new near the max
    same = _stats_status(make_dump, _large_values(PINNED), _large_values(PINNED), "float16")
    assert same.status == "OK", same.reason


def test_stats_mode_fp16_band_does_not_apply_to_a_bf16_target(make_dump: MakeDump) -> None:
    """bf16 reaches 3.4e38: values near 65504 are ordinary there."""
    row = _stats_status(make_dump, _large_values(ORDINARY), _large_values(PINNED), "bfloat16")
    assert row.stats_delta is not None and row.stats_delta.new_near_fp16_max == 3
    assert row.status == "OK", row.reason


# --- first divergence ---------------------------------------------------------------------------

def test_first_divergence_is_a_mismatch_when_that_comes_first(make_dump: MakeDump) -> None:
    x = np.ones((2, 3), np.float32)
    a = _baseline()
    drifted = a * (1 + 0.1)  # far beyond any profile
    base = make_dump("a.st", {"early:out": x, "late:out": a})
    target = make_dump("b.st", {"early:out": x.reshape(3, 2), "late:out": drifted},
                       dtype="float16")
    report = precision.compare(base, target, jobs=1)
    assert [(r.key, r.status) for r in report.rows] == [("early:out", "MISMATCH"),
                                                        ("late:out", "DRIFT")]
    assert report.first_divergence is not None
    assert report.first_divergence.key == "early:out"
    assert report.first_divergence.status == "MISMATCH"


def test_first_divergence_skips_missing_and_ok_rows(make_dump: MakeDump) -> None:
    x = np.ones((2, 3), np.float32)
    a = _baseline()
    base = make_dump("a.st", {"gone:out": x, "same:out": x, "late:out": a})
    target = make_dump("b.st", {"same:out": x, "late:out": a * (1 + 0.1)}, dtype="float16")
    report = precision.compare(base, target, jobs=1)
    assert [r.status for r in report.rows] == ["MISSING", "OK", "DRIFT"]
    assert report.first_divergence is not None
    assert report.first_divergence.key == "late:out"


# --- the element-scaled limits, each profile ----------------------------------------------------

def _diffuse(factor: float, doc: Documented) -> np.ndarray:
    """Every element off by ``factor x rms_eps`` eps of its scale, alternating in sign."""
    d = factor * doc.rms_eps * doc.eps * SCALE
    sign = np.where(np.arange(N) % 2 == 0, 1.0, -1.0)
    return _baseline().astype(np.float64) + sign * d


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_noise_rms_limit_is_the_documented_eps_multiple(make_dump: MakeDump,
                                                       profile: str) -> None:
    doc = PROFILES[profile]
    for factor, want in ((INSIDE, "OK"), (BEYOND, "DRIFT")):
        report, row = _compare(make_dump, doc, "x:out", _baseline(), _diffuse(factor, doc))
        assert row.metrics is not None and row.metrics.bulk_scale == 2048.0
        assert row.metrics.noise_rms / doc.eps == pytest.approx(factor * doc.rms_eps, rel=1e-9)
        assert row.metrics.noise_max < doc.max_eps * doc.eps / 10
        assert row.status == want, (factor, row.reason)
        if want == "DRIFT":
            assert "rms" in row.reason
    assert report.profile.noise_rms == doc.rms_eps * doc.eps


def _outlier(factor: float, limit_eps: float, eps: float, scale: float) -> np.ndarray:
    """One element off by ``factor x limit_eps`` eps of ``scale``; the rest exact."""
    b = _baseline().astype(np.float64)
    b[N // 3] += factor * limit_eps * eps * scale
    return b


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_noise_max_limit_is_the_documented_eps_multiple(make_dump: MakeDump,
                                                       profile: str) -> None:
    doc = PROFILES[profile]
    for factor, want in ((INSIDE, "OK"), (BEYOND, "DRIFT")):
        b = _outlier(factor, doc.max_eps, doc.eps, SCALE)
        report, row = _compare(make_dump, doc, "x:out", _baseline(), b)
        assert row.metrics is not None
        assert row.metrics.noise_max / doc.eps == pytest.approx(factor * doc.max_eps, rel=1e-9)
        # the rms stays far inside its own limit: only the outlier rule can fire
        assert row.metrics.noise_rms < doc.rms_eps * doc.eps / 1.5
        assert row.status == want, (factor, row.reason)
        if want == "DRIFT":
            assert "outlier" in row.reason
    assert report.profile.noise_max == doc.max_eps * doc.eps


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_gradient_rel_l2_limit_is_32_eps(make_dump: MakeDump, profile: str) -> None:
    """``:grad`` rows: ||d|| <= 32 eps ||a||; the element-scaled rule (5 eps) is not theirs:
    the quiet case reads 15 eps rms for the half profiles."""
    doc = PROFILES[profile]
    for factor, want in ((INSIDE, "OK"), (BEYOND, "DRIFT")):
        b = _baseline().astype(np.float64) * (1 + factor * GRAD_REL_L2_EPS * doc.eps)
        report, row = _compare(make_dump, doc, "blocks.0:grad", _baseline(), b)
        assert row.metrics is not None
        assert row.metrics.rel_l2 / doc.eps == pytest.approx(factor * GRAD_REL_L2_EPS,
                                                             rel=1e-6)
        assert row.status == want, (factor, row.reason)
        if want == "DRIFT":
            assert row.reason.startswith("gradient rel_l2"), row.reason
    assert report.profile.grad_rel_l2 == GRAD_REL_L2_EPS * doc.eps


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_gradient_outlier_limit_is_128_eps_of_max(make_dump: MakeDump, profile: str) -> None:
    """``:grad`` rows: max|d| <= 128 eps max|a|, while rel_l2 stays at 0.5 eps."""
    doc = PROFILES[profile]
    for factor, want in ((INSIDE, "OK"), (BEYOND, "DRIFT")):
        b = _outlier(factor, GRAD_OUTLIER_EPS, doc.eps, A)  # of max|a| = A
        report, row = _compare(make_dump, doc, "blocks.0:grad", _baseline(), b)
        assert row.metrics is not None and row.metrics.absmax_base == A
        assert row.metrics.max_abs / A / doc.eps == pytest.approx(factor * GRAD_OUTLIER_EPS,
                                                                  rel=1e-9)
        assert row.metrics.rel_l2 < GRAD_REL_L2_EPS * doc.eps / 10
        assert row.status == want, (factor, row.reason)
        if want == "DRIFT":
            assert "gradient outlier" in row.reason, row.reason
    assert report.profile.grad_outlier == GRAD_OUTLIER_EPS * doc.eps


def _with_reference(make_dump: MakeDump, key: str, shape: tuple[int, ...], target: float,
                    reference: float, *, spike: float = 0.0) -> Row:
    """A gradient row whose target is off by ``target`` (relative, every element) and the
    bf16 reference by ``reference``; ``spike`` adds one element off by that share of
    max|a| to the target."""
    a = np.random.default_rng(7).standard_normal(shape).astype(np.float32) + 3
    noise = np.random.default_rng(8).choice([-1.0, 1.0], size=shape)
    t = a * (1 + target * noise)
    t.reshape(-1)[0] += spike * np.abs(a).max()
    base = make_dump("base.st", {key: a})
    ref = make_dump("ref.st", {key: a * (1 + reference * noise)}, dtype="bfloat16")
    tgt = make_dump("target.st", {key: t}, dtype="bfloat16")
    (row,) = precision.compare(base, tgt, reference=ref, jobs=1).rows
    return row


@pytest.mark.parametrize(("key", "shape", "ratio"), [
    ("blocks.0.fc.weight:pgrad", (64, 96), REF_GRAD_RATIO),
    ("blocks.0:grad.0", (4, 16, 96), REF_GRAD_RATIO),
    ("blocks.0.norm.weight:pgrad", (576,), REF_VECTOR_GRAD_RATIO),
])
def test_reference_gradient_ratio(make_dump: MakeDump, key: str, shape: tuple[int, ...],
                                  ratio: int) -> None:
    """With a reference: a gradient's rel_l2 beyond 3x the reference's (10x for a 1-D
    parameter's: a few hundred sums over every token) is DRIFT; within it, OK."""
    eps = 2.0**-7
    ref = 4 * eps
    for factor, want in ((INSIDE, "OK"), (BEYOND, "DRIFT")):
        row = _with_reference(make_dump, key, shape, factor * ratio * ref, ref)
        assert row.metrics is not None
        assert row.status == want, (factor, row.reason)
        if want == "DRIFT":
            assert row.reason.startswith("gradient rel_l2") and "the reference's" in row.reason


@pytest.mark.parametrize(("key", "shape", "flagged"), [
    ("blocks.0.fc.weight:pgrad", (64, 96), True), ("blocks.0.norm.weight:pgrad", (576,), False),
])
def test_reference_gradient_outlier(make_dump: MakeDump, key: str, shape: tuple[int, ...],
                                    flagged: bool) -> None:
    """One element off by 0.5 max|a| (the rel_l2 within its ratio): DRIFT for a matrix's
    gradient; a 1-D parameter's is judged by its norm alone."""
    eps = 2.0**-7
    row = _with_reference(make_dump, key, shape, eps, eps, spike=0.5)
    assert row.metrics is not None
    assert (row.status == "DRIFT") == flagged, row.reason
    if flagged:
        assert "gradient outlier" in row.reason, row.reason


# --- logits -------------------------------------------------------------------------------------

POSITIONS, VOCAB = 8, 64
LOGITS = "lm_head:out"


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_logits_kl_mean_limit(make_dump: MakeDump, profile: str) -> None:
    """Uniform baseline logits; the target moves half the vocabulary up by h and half down,
    so KL(p || q) = log cosh h at every position, and no top-1 changes."""
    doc = PROFILES[profile]
    a = np.full((POSITIONS, VOCAB), A, dtype=np.float32)
    sign = np.where(np.arange(VOCAB) % 2 == 0, 1.0, -1.0)
    for factor, want in ((INSIDE, "OK"), (BEYOND, "DRIFT")):
        h = math.acosh(math.exp(factor * doc.kl_mean))
        b = a.astype(np.float64) + h * sign
        report, row = _compare(make_dump, doc, LOGITS, a, b, logits_key=LOGITS)
        assert row.logits is not None and row.metrics is not None
        assert row.logits.kl_mean == pytest.approx(factor * doc.kl_mean, rel=1e-6)
        assert row.logits.hard_flips == 0 and row.logits.top1_agreement == 1.0
        assert row.metrics.noise_rms < doc.rms_eps * doc.eps / 2  # the noise rules are quiet
        assert row.status == want, (factor, row.reason)
        if want == "DRIFT":
            assert "mean KL" in row.reason, row.reason
    assert report.profile.kl_mean == doc.kl_mean


@pytest.mark.parametrize(("profile", "reference", "target", "want"), [
    # a reference near kl_mean (in its units): the limit is REF_KL_RATIO times its KL
    ("fp16", 0.9, REF_KL_RATIO * 0.9 * INSIDE, "OK"),
    ("fp16", 0.9, REF_KL_RATIO * 0.9 * BEYOND, "DRIFT"),
    ("bf16", 1.5, REF_KL_RATIO * 1.5 * INSIDE, "OK"),
    ("bf16", 1.5, REF_KL_RATIO * 1.5 * BEYOND, "DRIFT"),
    # a reference far below it: kl_mean stays the limit
    ("fp16", 0.1, INSIDE, "OK"),
    ("fp16", 0.1, BEYOND, "DRIFT"),
])
def test_logits_kl_against_the_reference(make_dump: MakeDump, profile: str, reference: float,
                                         target: float, want: str) -> None:
    """With a same-precision reference, the logits' mean KL DRIFTs beyond
    ``max(kl_mean, REF_KL_RATIO x the reference's)`` (logits built as in
    :func:`test_logits_kl_mean_limit`: KL = log cosh h)."""
    doc = PROFILES[profile]
    a = np.full((POSITIONS, VOCAB), A, dtype=np.float32)
    sign = np.where(np.arange(VOCAB) % 2 == 0, 1.0, -1.0)

    def moved(kl: float) -> np.ndarray:
        return a.astype(np.float64) + math.acosh(math.exp(kl * doc.kl_mean)) * sign

    kw: dict[str, Any] = {"dtype": doc.target, "meta": dict(doc.meta), "logits_key": LOGITS}
    base = make_dump("base.st", {LOGITS: a}, dtype="float32", logits_key=LOGITS)
    ref = make_dump("ref.st", {LOGITS: moved(reference)}, **kw)
    tgt = make_dump("target.st", {LOGITS: moved(target)}, **kw)
    (row,) = precision.compare(base, tgt, reference=ref, jobs=1).rows
    assert row.logits is not None
    assert row.logits.kl_mean == pytest.approx(target * doc.kl_mean, rel=1e-6)
    assert row.status == want, row.reason
    if want == "DRIFT":
        said = "the reference's" if reference * REF_KL_RATIO > 1 else f"> {doc.kl_mean:g}"
        assert row.reason.startswith("mean KL") and said in row.reason, row.reason


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_logits_top1_limit(make_dump: MakeDump, profile: str) -> None:
    """400 positions whose token 0 leads the rest (1.5) by a quarter of noise_max x 3; the
    target swaps tokens 0 and 1 at some: a hard flip each (the near-tie allowance,
    2 noise_rms (|top| + median), is 4 to 16 times smaller). 99% agreement (4 hard flips)
    is OK for the rounding formats, one more is DRIFT; fp32 allows none. Flips whose
    baseline margin is 3 eps are near-ties, never counted."""
    doc = PROFILES[profile]
    positions, vocab, ties = 400, 256, 3
    margin = doc.max_eps / 4 * doc.eps * 3  # each swapped element: max_eps / 4 of its scale
    allowed = round((1 - doc.top1) * positions)
    a = np.full((positions, vocab), 1.5)
    a[:, 0] += margin
    a[-ties:, 1] = a[-ties:, 0] - 3 * doc.eps  # near-ties: within 2 x 5 eps x 3

    def flipped(hard: int) -> np.ndarray:
        b = a.copy()
        rows = [*range(hard), *range(positions - ties, positions)]
        b[rows, 0], b[rows, 1] = a[rows, 1], a[rows, 0]
        return b

    for hard, want in ((allowed, "OK"), (allowed + 1, "DRIFT")):
        report, row = _compare(make_dump, doc, LOGITS, a, flipped(hard), logits_key=LOGITS)
        assert row.logits is not None and row.metrics is not None
        assert row.logits.top1_agreement == 1 - (hard + ties) / positions
        assert row.logits.hard_flips == hard, row.logits.flips[:5]
        assert row.logits.hard_top1_agreement == 1 - hard / positions
        assert row.logits.kl_mean < doc.kl_mean / 2
        assert row.metrics.noise_max < doc.max_eps * doc.eps / 2
        assert row.status == want, (hard, row.reason)
        if want == "DRIFT":
            assert "top-1 agreement" in row.reason, row.reason
    assert report.profile.top1 == doc.top1


# --- inherited scale: a parameter-free module judged by what it was computed from -------

def _activation_pair(make_dump: Callable[..., Any], *, error: float, holders: dict[str, str],
                     source_numel: int = 4096) -> Any:
    """fc1 (bulk ~8) then an activation that squashes 90% of it to ~1e-3, its error ``error``
    times fc1's scale: by its own tiny bulk scale that is far beyond 5 eps; by fc1's not."""
    rng = np.random.default_rng(0)
    fc1 = rng.normal(0, 8, source_numel).astype(np.float32)
    act = np.where(rng.random(4096) < 0.9, 1e-3, rng.normal(0, 8, 4096)).astype(np.float32)
    eps = 2.0**-8  # bf16
    noisy = (act + rng.normal(0, 1, 4096) * error * eps * 8).astype(np.float32)
    base = make_dump("b.st", {"fc1:out": fc1, "act:out": act},
                     meta={"module_dtypes": holders})
    target = make_dump("t.st", {"fc1:out": fc1, "act:out": noisy}, dtype="bfloat16",
                       meta={"module_dtypes": holders})
    return precision.compare(base, target, target_dtype="bf16")


def test_an_activation_within_its_inputs_scale_passes(make_dump: Callable[..., Any]) -> None:
    report = _activation_pair(make_dump, error=1.0, holders={"fc1": "float32"})
    act = next(r for r in report.rows if r.key == "act:out")
    assert act.metrics is not None and act.metrics.noise_rms > report.profile.noise_rms
    assert act.status == "OK", act.reason


@pytest.mark.parametrize(("error", "holders", "source_numel"), [
    (1.0, {"fc1": "float32", "act": "float32"}, 4096),  # a module with parameters
    (1.0, {"fc1": "float32"}, 2048),  # no record of as many elements before it
    (12.0, {"fc1": "float32"}, 4096),  # beyond the limit against its input's scale too
])
def test_the_inherited_scale_does_not_hide_drift(make_dump: Callable[..., Any], error: float,
                                                 holders: dict[str, str],
                                                 source_numel: int) -> None:
    report = _activation_pair(make_dump, error=error, holders=holders,
                              source_numel=source_numel)
    act = next(r for r in report.rows if r.key == "act:out")
    assert act.status == "DRIFT", act.reason


# --- stats mode against a reference: the count-sketch rules -------------------------------------

REF_GAP = 1e4  # the reference's estimated error norm: far above the eps/4 floor (here 768)


def _sketch_runs(make_dump: MakeDump, ratios: list[float], *, ref_gap: float = REF_GAP,
                 buckets: tuple[int, int, int] = (1021, 1021, 1021),
                 vectors: int = 256, width: int = N // 256) -> Report:
    """bf16 stats-mode runs of records ``m.l.<i>:out`` whose count sketches put the target's
    error estimate at ``ratios[i] x`` the reference's exactly: the baseline's sketch is zero,
    the reference's ``ref_gap`` in one bucket, the target's ``ratios[i] x ref_gap`` there.
    The records are ``vectors`` token vectors of ``width`` elements."""
    from precision.dumps.sketch import encode

    def sketch(value: float, size: int) -> str:
        y = np.zeros(size)
        y[0] = value
        return encode(y)

    a = stats_of(np.full(vectors * width, A, dtype=np.float32))
    runs = {}
    for name, dtype, size, gap in (("b.st", "float32", buckets[0], [0.0] * len(ratios)),
                                   ("t.st", "bfloat16", buckets[1],
                                    [r * ref_gap for r in ratios]),
                                   ("r.st", "bfloat16", buckets[2], [ref_gap] * len(ratios))):
        runs[name] = make_dump(name, {}, dtype=dtype, stats={
            f"m.l.{i}:out": a | {"sketch": sketch(g, size)} for i, g in enumerate(gap)},
            stats_shapes={f"m.l.{i}:out": (vectors, width) for i in range(len(gap))})
    return precision.compare(runs["b.st"], runs["t.st"], reference=runs["r.st"], jobs=1)


def test_stats_sketch_beyond_3x_the_reference_is_drift(make_dump: MakeDump) -> None:
    beyond = _sketch_runs(make_dump, [3 * BEYOND])
    row = beyond.rows[0]
    assert row.status == "DRIFT" and "count sketch" in row.reason, row.reason
    assert "3.15x the reference's" in row.reason, row.reason
    inside = _sketch_runs(make_dump, [3 * INSIDE]).rows[0]
    assert inside.status == "OK", inside.reason


def test_stats_sketch_floor_where_the_reference_is_nearly_exact(make_dump: MakeDump) -> None:
    """A reference with no error at all: the limit is eps/4 x ||a|| (bf16: 2^-9 ||a||)."""
    floor = 2.0**-7 / 4 * float(np.linalg.norm(_baseline().astype(np.float64)))
    beyond = _sketch_runs(make_dump, [BEYOND * floor], ref_gap=1.0).rows[0]
    assert beyond.status == "DRIFT", beyond.reason
    inside = _sketch_runs(make_dump, [INSIDE * floor], ref_gap=1.0).rows[0]
    assert inside.status == "OK", inside.reason


def test_stats_error_added_at_depth_is_a_step_in_the_sketch_ratio(make_dump: MakeDump) -> None:
    """Under the 3x limit, a record at 2x the reference after records at 1x is error added
    here: DRIFT at the 2x floor (1.05x of it; not 0.95x), and at 1.75x the lowest ratio of
    the 8 records before (1.05x of it; not 0.95x)."""
    quiet = [1.0] * 8
    floor = _sketch_runs(make_dump, [*quiet, 2.0 * BEYOND])
    row = floor.rows[-1]
    assert row.status == "DRIFT" and [r.status for r in floor.rows[:-1]] == ["OK"] * 8
    assert "error added here: 2.1x the reference's (count sketch), up from 1x" in row.reason
    assert _sketch_runs(make_dump, [*quiet, 2.0 * INSIDE]).rows[-1].status == "OK"
    step = 1.75 * 1.4  # the 8 records before at 1.4x: the step is measured from there
    raised = [1.0, *[1.4] * 8]  # the 9th before, at 1x, is outside the window
    assert _sketch_runs(make_dump, [*raised, step * BEYOND]).rows[-1].status == "DRIFT"
    assert _sketch_runs(make_dump, [*raised, step * INSIDE]).rows[-1].status == "OK"


@pytest.mark.parametrize(("vectors", "status"), [(16, "DRIFT"), (15, "OK")])
def test_stats_sketch_step_needs_enough_token_vectors(make_dump: MakeDump, vectors: int,
                                                      status: str) -> None:
    """As in full mode, a step over fewer than REF_JUMP_MIN_VECTORS (16) token vectors is
    sampling noise: judged by the 3x limit alone."""
    from precision.judge.profiles import REF_JUMP_MIN_VECTORS

    assert REF_JUMP_MIN_VECTORS == 16
    report = _sketch_runs(make_dump, [1.0] * 8 + [2.0 * BEYOND], vectors=vectors, width=4096)
    assert report.rows[-1].status == status, report.rows[-1].reason


def test_stats_sketches_of_different_sizes_are_not_compared(make_dump: MakeDump) -> None:
    """A target captured before the 1021-bucket sketch (31 numbers): no estimate, and the
    report says why."""
    report = _sketch_runs(make_dump, [10.0], buckets=(1021, 31, 1021))
    row = report.rows[0]
    assert row.stats_delta is not None and row.stats_delta.sketch_gap is None
    assert row.status == "OK", row.reason
    assert any("count sketches of different sizes" in n and "t.st: 31" in n
               for n in report.notes), report.notes

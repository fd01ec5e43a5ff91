"""Error metrics between a baseline tensor ``a`` and a target tensor ``b`` (numpy only).

Every metric is accumulated in float64 over chunks, so memory stays bounded by the chunk
size and the result does not depend on it (up to float64 rounding). With ``d = b - a`` over
the *compared* elements (both finite, not masked):

- ``max_abs = max|d|``, ``mean_abs = mean|d|``, ``rmse = sqrt(mean(d²))``
- ``rel_l2 = ||d|| / ||a||`` (norm-relative error; 0/0 = 0, x/0 = inf)
- ``max_rel = max |d| / max(|a|, floor)``: elementwise relative error with the denominator
  floored at ``floor`` (default 1e-3 for half types, 1e-6 otherwise: the Ascend small-value
  thresholds), so near-zero baselines do not explode it
- ``ratio_1e2/1e3/1e4``: share of compared elements whose floored relative error exceeds
  1e-2, 1e-3, 1e-4 (Ascend's "error ratio"; reported, not used for verdicts, because a
  fixed floor makes them fire on near-zero elements of healthy tensors)
- ``rms_base = ||a|| / sqrt(n)``: the baseline's scale, against which ``max_abs`` is judged
- ``cos = a·b / (||a|| ||b||)``; ``one_minus_cos`` is computed as
  ``(||d||² - (||a|| - ||b||)²) / (2 ||a|| ||b||)``, which keeps its digits near cos = 1
- ``snr_db = 10 log10(||a||² / ||d||²)`` (inf when d = 0)
- ``pearson = cov(a, b) / (std(a) std(b))`` from Chan's pairwise co-moments
- ``max_ulp = max |d| / ulp_T(a)``: error in units in the last place of the target format T
  at the baseline value, ``ulp_T(x) = 2^(max(floor(log2|x|), e_min) - m)``
- the noise model (:mod:`precision.judge.measure.noise`): each element's error is scaled by what
  rounding and accumulation can move it, ``s_i = p(|a_i|) + sigma``, where ``p(x)`` is ``x``
  rounded down to a power of two (0 below the target's smallest normal) and ``sigma``, the
  *bulk scale*, is the upper power-of-two edge of the median of the nonzero ``|a|`` (at
  least the small-value floor). ``noise_rms = sqrt(mean((d_i / s_i)²))`` and
  ``noise_max = max |d_i| / s_i``. A value's own rounding is relative (``eps/2 |a_i|``)
  and a near-zero value's error is set by the values it was computed from (``sigma``), so
  massive channels neither raise false alarms nor hide drift in the ordinary channels
  (whole-tensor norms are dominated by them). ``signature_bits = -log2(noise_rms)``: the
  significant bits the target kept, about 8 for a healthy bf16 run, 11 for fp16.

Masked elements are excluded and counted: an additive attention mask (T5 folds
``finfo.min`` into its position bias) sits at or below the format's lowest finite value, or
at -inf, *at the same position in both runs*. A value at -inf or the lowest value in one run
only is not a mask: a baseline value beyond the target's range that the target turns into
-inf is an overflow, and so is an fp16 baseline's -inf where the target is finite. NaN/inf
are excluded and counted per side; a target NaN/inf where the baseline is finite counts as
``new_nan``/``new_inf``, a baseline NaN/inf where the target is finite as
``base_only_nan``/``base_only_inf`` (the baseline overflowed, or the arguments are swapped).
Values within 2% of their format's max that differ from the other side by more than 1%
count as ``saturated`` (target) or ``saturated_base`` (clamps such as transformers' T5
±64504). ``beyond_target_range`` counts
finite, unmasked baseline values that the target tensor's dtype cannot hold
(``|a| > max_T``).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from ...dtypes import SATURATION, float_format, is_float
from .kernels import KERNELS, load_fused
from .moments import Moments
from .noise import BIN_OFFSET as _BIN_OFFSET
from .noise import BINS as _BINS
from .noise import noise_model, signature, signature_label

RATIO_THRESHOLDS = (1e-2, 1e-3, 1e-4)

_THREAD = threading.local()


def default_floor(target_dtype: str) -> float:
    """Denominator floor for elementwise relative error: 1e-3 for half types, else 1e-6."""
    return 1e-3 if target_dtype in ("float16", "bfloat16") else 1e-6


#: the metrics of the difference of compared elements: none where nothing was compared
ERROR_METRICS = ("max_abs", "mean_abs", "rmse", "rel_l2", "max_rel", "ratio_1e2", "ratio_1e3",
                 "ratio_1e4", "cos", "one_minus_cos", "snr_db", "pearson", "max_ulp",
                 "noise_rms", "noise_max", "signature_bits", "signature")


@dataclass(frozen=True)
class TensorMetrics:
    """Comparison of one tensor pair; see the module docstring for each formula. With no
    element compared, the error metrics (:data:`ERROR_METRICS`) are 0 here (1 for ``cos``)
    and shown as absent (:meth:`shown`, the report's table)."""

    numel: int
    compared: int
    masked: int
    nan_base: int
    nan_target: int
    inf_base: int
    inf_target: int
    new_nan: int
    new_inf: int
    base_only_nan: int
    base_only_inf: int
    saturated: int
    saturated_base: int
    beyond_target_range: int
    max_abs: float
    mean_abs: float
    rmse: float
    rel_l2: float
    max_rel: float
    ratio_1e2: float
    ratio_1e3: float
    ratio_1e4: float
    cos: float
    one_minus_cos: float
    snr_db: float
    pearson: float
    max_ulp: float
    absmax_base: float
    absmax_target: float
    norm_base: float
    target_max: float
    bulk_scale: float = 0.0
    noise_rms: float = 0.0
    noise_max: float = 0.0
    padded: int = 0

    @property
    def signature_bits(self) -> float:
        """``-log2(noise_rms)``: significant bits the target kept (inf when exact)."""
        return signature(self.noise_rms)

    @property
    def signature(self) -> str:
        """The precision whose healthy noise this error looks like (``bf16``, ...)."""
        return signature_label(self.signature_bits)

    @property
    def rms_base(self) -> float:
        """Root mean square of the compared baseline elements, ``||a|| / sqrt(n)``."""
        return self.norm_base / math.sqrt(self.compared) if self.compared else 0.0

    @property
    def headroom_bits(self) -> float:
        """``log2(target_max / absmax_target)``: doublings left before the target overflows."""
        if self.absmax_target == 0:
            return math.inf
        return math.log2(self.target_max / self.absmax_target)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {
            "headroom_bits": self.headroom_bits, "rms_base": self.rms_base,
            "signature_bits": self.signature_bits, "signature": self.signature}

    def measured(self, name: str) -> Any:
        """Metric ``name`` as a report shows it: ``None`` for an error metric where no
        element was compared (see :meth:`shown`)."""
        return None if not self.compared and name in ERROR_METRICS else getattr(self, name)

    def shown(self) -> dict[str, Any]:
        """:meth:`as_dict` as a report shows it: the error metrics ``None`` where no element
        was compared (every element NaN, inf or masked on one side or the other: there is
        no error to measure, and 0 would read as exact)."""
        return self.as_dict() | (dict.fromkeys(ERROR_METRICS) if not self.compared else {})


class PairAccumulator:
    """Streams chunk pairs of a baseline and a target tensor into :class:`TensorMetrics`.

    Its state is declared below: counts and sums that add, maxima that take the larger,
    the binade histogram (counts and ``d²`` add, ``max |d|`` takes the larger) and the
    co-moments (:class:`~precision.judge.measure.moments.Moments`). :meth:`merge` combines two
    accumulators of disjoint parts of one tensor pair, so a tensor can be split across
    workers, or measured by another kernel, and merged into the same result.

    ``kernel`` measures each clean chunk: ``numpy`` (always there) or ``numba``, the fused
    kernel of :mod:`precision.judge.measure.fused` (``pip install precision[fast]``; see
    :func:`~precision.judge.measure.kernels.choose_kernel`). Both give the same counts and
    maxima, and sums equal up to float64 rounding.
    """

    #: state that adds on merge
    SUMS = ("numel", "masked", "nan_a", "nan_b", "inf_a", "inf_b", "new_nan", "new_inf",
            "saturated", "beyond", "base_nan_only", "base_inf_only", "saturated_base",
            "sum_d2", "sum_abs", "over", "h_count", "h_d2")
    #: state that takes the larger on merge (``max_ulp`` is read off ``h_max``: the ulp is
    #: one power of two per binade)
    MAXIMA = ("max_abs", "max_rel", "absmax_a", "absmax_b", "h_max")

    def __init__(self, base_dtype: str, target_dtype: str, *, floor: float | None = None,
                 kernel: str = "numpy") -> None:
        if kernel not in KERNELS:
            raise ValueError(f"kernel {kernel!r}: choose one of {', '.join(KERNELS)}")
        self.kernel = kernel
        self.base_fmt = float_format(base_dtype)
        self.tgt_fmt = float_format(target_dtype if is_float(target_dtype) else base_dtype)
        self.floor = default_floor(target_dtype) if floor is None else floor
        self.numel = self.masked = self.nan_a = self.nan_b = self.inf_a = self.inf_b = 0
        self.new_nan = self.new_inf = self.saturated = self.beyond = 0
        self.base_nan_only = self.base_inf_only = self.saturated_base = 0
        self.h_count = np.zeros(_BINS, dtype=np.int64)
        self.h_d2 = np.zeros(_BINS)
        self.h_max = np.zeros(_BINS)
        self.moments = Moments()
        self.sum_d2 = self.sum_abs = self.max_abs = self.max_rel = 0.0
        self.absmax_a = self.absmax_b = 0.0
        self.over = np.zeros(len(RATIO_THRESHOLDS), dtype=np.int64)

    def merge(self, other: PairAccumulator) -> None:
        """Add ``other``'s part (the same dtypes and floor) to this one."""
        if (other.base_fmt, other.tgt_fmt, other.floor) != (self.base_fmt, self.tgt_fmt,
                                                            self.floor):
            raise ValueError("accumulators of different dtypes or floors cannot merge")
        for name in self.SUMS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in self.MAXIMA:
            setattr(self, name, np.maximum(getattr(self, name), getattr(other, name))
                    if name == "h_max" else max(getattr(self, name), getattr(other, name)))
        self.moments = self.moments.merge(other.moments)

    @staticmethod
    def _scratch(n: int) -> list[np.ndarray]:
        """Work arrays (six float64, one int64, one bool) reused by every accumulator of this
        thread: fresh large temporaries would page-fault on every chunk."""
        work: list[np.ndarray] | None = getattr(_THREAD, "work", None)
        if work is None or work[0].size < n:
            work = [np.empty(n) for _ in range(6)]
            work += [np.empty(n, dtype=np.int64), np.empty(n, dtype=bool)]
            _THREAD.work = work
        return [w[:n] for w in work]

    def update(self, a: np.ndarray, b: np.ndarray) -> None:
        """Add one chunk (flat arrays of equal length, any float dtypes)."""
        a = np.asarray(a).reshape(-1)
        b = np.asarray(b).reshape(-1)
        n = a.size
        self.numel += n
        if n == 0:
            return
        a64, b64 = self._scratch(n)[:2]
        if self.kernel == "numba":
            fused = load_fused()
            for x, x64 in ((a, a64), (b, b64)):
                if x.dtype == np.float16:
                    fused.half_to_float64(x.view(np.uint16), x64)
                else:
                    _widen(x, x64)
            # one pass: every element finite, unmasked, within the target's range and
            # small enough for the kernel's fast-math (else numpy filters and counts)
            if fused.ordinary(a64, b64, self.base_fmt.lowest, self.tgt_fmt.lowest,
                              self.tgt_fmt.max):
                self._accumulate_fused(a64, b64)
                return
        else:
            _widen(a, a64)
            _widen(b, b64)
        with np.errstate(invalid="ignore", over="ignore"):
            # four vectorised reductions tell a clean chunk (NaN propagates into min/max)
            lo_a, hi_a, lo_b, hi_b = (float(f(x)) for x in (a64, b64) for f in (np.min, np.max))
            clean = (all(map(math.isfinite, (lo_a, hi_a, lo_b, hi_b)))
                     and lo_a > self.base_fmt.lowest and lo_b > self.tgt_fmt.lowest)
            tmax = self.tgt_fmt.max
            if not (-tmax <= lo_a and hi_a <= tmax):  # NaN lands here too
                live = self._unmasked(a64, b64) & np.isfinite(a64)
                self.beyond += int(np.count_nonzero(live & (np.abs(a64) > tmax)))
        if clean:
            self._accumulate(a64, b64, max(hi_a, -lo_a), max(hi_b, -lo_b))
            return
        a64, b64 = self._filter(a64, b64)
        if a64.size:  # fresh arrays (boolean indexing), off the scratch _accumulate uses
            self._accumulate(a64, b64, max(float(a64.max()), -float(a64.min())),
                             max(float(b64.max()), -float(b64.min())))

    def _unmasked(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """False where both runs hold an additive mask: at or below their dtype's lowest
        finite value, or -inf (``finfo.min`` folded into T5's position bias). One run alone
        at -inf or its lowest value is an overflow or a clamp, never a mask."""
        with np.errstate(invalid="ignore"):
            return ~((a <= self.base_fmt.lowest) & (b <= self.tgt_fmt.lowest))

    def _filter(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Count masked and non-finite elements; return the comparable ones."""
        live = self._unmasked(a, b)
        fa, fb = np.isfinite(a), np.isfinite(b)
        self.masked += int(np.count_nonzero(~live))
        nan_a, nan_b = np.isnan(a), np.isnan(b)
        inf_a, inf_b = np.isinf(a) & live, np.isinf(b) & live
        self.nan_a += int(nan_a.sum())
        self.nan_b += int(nan_b.sum())
        self.inf_a += int(inf_a.sum())
        self.inf_b += int(inf_b.sum())
        self.new_nan += int((nan_b & fa).sum())
        self.new_inf += int((inf_b & fa).sum())
        self.base_nan_only += int((nan_a & fb).sum())
        self.base_inf_only += int((inf_a & fb).sum())
        keep = live & fa & fb
        return a[keep], b[keep]

    def _accumulate(self, a: np.ndarray, b: np.ndarray, absmax_a: float,
                    absmax_b: float) -> None:
        """A clean chunk (all elements compared, float64) whose ``max |a|``, ``max |b|`` are
        known."""
        if self.kernel == "numba" and max(absmax_a, absmax_b) < load_fused().SAFE_ABS:
            self._accumulate_fused(a, b)
        else:
            self.absmax_a = max(self.absmax_a, absmax_a)
            self.absmax_b = max(self.absmax_b, absmax_b)
            self._accumulate_numpy(a, b, absmax_a, absmax_b)

    def _accumulate_fused(self, a: np.ndarray, b: np.ndarray) -> None:
        fused = load_fused()
        n = a.size
        work = self._scratch(n)
        lanes: np.ndarray | None = getattr(_THREAD, "lanes", None)
        if lanes is None:
            lanes = _THREAD.lanes = fused.lanes()
        sat = SATURATION
        (o1, o2, o3, saturated, saturated_base, sum_d2, sum_abs, max_abs, max_rel, absmax_a,
         absmax_b, mean_a, mean_b, m2a, m2b, cab) = fused.accumulate(
            a, b, self.floor, self.tgt_fmt.smallest_normal, sat * self.tgt_fmt.max,
            sat * self.base_fmt.max, *RATIO_THRESHOLDS, lanes, work[6], work[3], self.h_count,
            self.h_d2, self.h_max)
        self.over += (o1, o2, o3)
        self.saturated += saturated
        self.saturated_base += saturated_base
        self.sum_d2 += sum_d2
        self.sum_abs += sum_abs
        self.max_abs = max(self.max_abs, max_abs)
        self.max_rel = max(self.max_rel, max_rel)
        self.absmax_a = max(self.absmax_a, absmax_a)
        self.absmax_b = max(self.absmax_b, absmax_b)
        self.moments = self.moments.merge(Moments(n, mean_a, mean_b, m2a, m2b, cab))

    def _accumulate_numpy(self, a: np.ndarray, b: np.ndarray, absmax_a: float,
                          absmax_b: float) -> None:
        n2 = a.size
        _, _, d, absd, abs_a, tmp, bins, flag = self._scratch(n2)
        np.subtract(b, a, out=d)
        np.abs(d, out=absd)
        np.abs(a, out=abs_a)
        self.sum_d2 += _dot(d, d)
        self.sum_abs += float(absd.sum())
        self.max_abs = max(self.max_abs, float(absd.max()))
        rel = np.maximum(abs_a, self.floor, out=tmp)
        np.divide(absd, rel, out=rel)
        self.max_rel = max(self.max_rel, float(rel.max()))
        for i, t in enumerate(RATIO_THRESHOLDS):
            self.over[i] += int(np.count_nonzero(np.greater(rel, t, out=flag)))
        tmax, bmax = self.tgt_fmt.max, self.base_fmt.max
        if absmax_b >= SATURATION * tmax:
            self.saturated += int(np.count_nonzero((np.abs(b) >= SATURATION * tmax)
                                                   & (rel > 1e-2)))
        if absmax_a >= SATURATION * bmax:
            self.saturated_base += int(np.count_nonzero((abs_a >= SATURATION * bmax)
                                                        & (rel > 1e-2)))
        # noise model: per binade of max(|a|, smallest normal of T), the count, sum of d²
        # and max |d|. The binade is the float64 exponent field E (frexp exponent E - 1022),
        # read off the bits: frexp and ldexp cost more than the rest of this pass together
        np.right_shift(abs_a.view(np.int64), 52, out=bins)
        np.maximum(bins, _exponent_field(self.tgt_fmt.smallest_normal), out=bins)
        np.add(bins, _BIN_OFFSET - 1022, out=bins)
        self.h_count += np.bincount(bins, minlength=_BINS)
        self.h_d2 += np.bincount(bins, weights=np.multiply(d, d, out=d), minlength=_BINS)
        if self.moments.n == 0 and n2 >= 1 << 12:
            # a first chunk raises every bin's maximum: seed them from a sample, so that
            # few elements are left for the slow scatter-max below
            np.maximum.at(self.h_max, bins[::64], absd[::64])
        rising = np.greater(absd, np.take(self.h_max, bins, out=tmp), out=flag)
        if rising.any():  # a gather is cheap; the scatter-max is not
            up = np.flatnonzero(rising)
            np.maximum.at(self.h_max, bins[up], absd[up])
        # this chunk's means and co-moments, merged into the running ones
        ma2, mb2 = float(a.mean()), float(b.mean())
        ac, bc = np.subtract(a, ma2, out=abs_a), np.subtract(b, mb2, out=tmp)
        self.moments = self.moments.merge(
            Moments(n2, ma2, mb2, _dot(ac, ac), _dot(bc, bc), _dot(ac, bc)))

    def _max_ulp(self) -> float:
        """``max |d| / ulp_T(a)``: the ulp is the same power of two within a binade."""
        k = np.flatnonzero(self.h_count)
        if k.size == 0:
            return 0.0
        ulp = np.ldexp(1.0, k - _BIN_OFFSET - 1 - self.tgt_fmt.mantissa_bits)
        return float(np.max(self.h_max[k] / ulp))

    def result(self) -> TensorMetrics:
        mom = self.moments
        n = mom.n
        # x * x, not x**2: float64 dumps can hold means whose square overflows, and ** raises
        norm_a = math.sqrt(max(mom.m2a + n * (mom.mean_a * mom.mean_a), 0.0))
        norm_b = math.sqrt(max(mom.m2b + n * (mom.mean_b * mom.mean_b), 0.0))
        norm_d = math.sqrt(self.sum_d2)
        sum_ab = mom.cab + n * mom.mean_a * mom.mean_b
        model = noise_model(self.h_count, self.h_d2, self.h_max, self.tgt_fmt,
                            self.floor)
        return TensorMetrics(
            numel=self.numel, compared=n, masked=self.masked, nan_base=self.nan_a,
            nan_target=self.nan_b, inf_base=self.inf_a, inf_target=self.inf_b,
            new_nan=self.new_nan, new_inf=self.new_inf, base_only_nan=self.base_nan_only,
            base_only_inf=self.base_inf_only, saturated=self.saturated,
            saturated_base=self.saturated_base,
            beyond_target_range=self.beyond, max_abs=self.max_abs,
            mean_abs=self.sum_abs / n if n else 0.0,
            rmse=math.sqrt(self.sum_d2 / n) if n else 0.0,
            rel_l2=_ratio(norm_d, norm_a), max_rel=self.max_rel,
            ratio_1e2=int(self.over[0]) / n if n else 0.0,
            ratio_1e3=int(self.over[1]) / n if n else 0.0,
            ratio_1e4=int(self.over[2]) / n if n else 0.0,
            cos=1.0 - _one_minus_cos(norm_a, norm_b, norm_d, sum_ab),
            one_minus_cos=_one_minus_cos(norm_a, norm_b, norm_d, sum_ab),
            snr_db=_snr(norm_a, norm_d), pearson=_pearson(mom.m2a, mom.m2b, mom.cab, norm_d),
            max_ulp=self._max_ulp(), absmax_base=self.absmax_a, absmax_target=self.absmax_b,
            norm_base=norm_a, target_max=self.tgt_fmt.max, bulk_scale=model.bulk_scale,
            noise_rms=model.rms, noise_max=model.max,
        )


def _exponent_field(x: float) -> int:
    """The biased exponent field of a float64."""
    return int(np.float64(x).view(np.int64) >> 52)


def _widen(x: np.ndarray, out: np.ndarray) -> None:
    """Copy ``x`` into the float64 ``out``. A signalling NaN (a NaN bit pattern with the
    quiet bit clear, as a device can write) raises the CPU's invalid flag when converted;
    it stays NaN, so the flag is no news."""
    with np.errstate(invalid="ignore"):
        np.copyto(out, x)


def _dot(x: np.ndarray, y: np.ndarray) -> float:
    """Sum of products without BLAS: OpenBLAS threads spin and fight over small chunks."""
    return float(np.einsum("i,i->", x, y))


def _ratio(num: float, den: float) -> float:
    """``num / den`` with 0/0 = 0 and x/0 = inf."""
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


def _one_minus_cos(na: float, nb: float, nd: float, sum_ab: float) -> float:
    """``1 - cos``: from ``||d||`` when the norms are alike (keeps digits near cos = 1), else
    from ``a·b`` directly (the identity cancels when one norm dwarfs the other)."""
    if na == 0 or nb == 0:
        return 0.0 if na == nb else 1.0
    if max(na, nb) <= 2 * min(na, nb):
        value = (nd * nd - (na - nb) ** 2) / (2 * na * nb)
    else:
        value = 1.0 - sum_ab / (na * nb)
    return min(max(value, 0.0), 2.0)


def _snr(na: float, nd: float) -> float:
    if nd == 0:
        return math.inf
    if na == 0:
        return -math.inf
    return 10.0 * math.log10(na * na / (nd * nd))


def _pearson(m2a: float, m2b: float, cab: float, nd: float) -> float:
    """Correlation; for a constant side: 1 when the tensors are equal, else 0."""
    if m2a <= 0 or m2b <= 0:
        return 1.0 if nd == 0 else 0.0
    return max(-1.0, min(1.0, cab / math.sqrt(m2a * m2b)))


def compare_float(pairs: Iterable[tuple[np.ndarray, np.ndarray]], base_dtype: str,
                  target_dtype: str, *, floor: float | None = None,
                  kernel: str = "numpy") -> TensorMetrics:
    """Metrics over an iterable of (baseline chunk, target chunk) pairs."""
    acc = PairAccumulator(base_dtype, target_dtype, floor=floor, kernel=kernel)
    for a, b in pairs:
        acc.update(a, b)
    return acc.result()


@dataclass(frozen=True)
class ExactMetrics:
    """Integer/bool comparison: ``mismatched`` elements and their share; ``max_abs`` diff."""

    numel: int
    mismatched: int
    max_abs: float

    @property
    def share(self) -> float:
        return self.mismatched / self.numel if self.numel else 0.0


def compare_exact(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> ExactMetrics:
    """Exact comparison of integer or bool tensors, chunk by chunk."""
    numel = mismatched = 0
    max_abs = 0.0
    for a, b in pairs:
        ne = a != b
        numel += a.size
        k = int(np.count_nonzero(ne))
        mismatched += k
        if k:  # Python ints: exact for any int64, no overflow
            diff = np.abs(a[ne].astype(object) - b[ne].astype(object))
            max_abs = max(max_abs, float(diff.max()))
    return ExactMetrics(numel, mismatched, max_abs)

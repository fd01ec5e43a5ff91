"""The noise model: how far rounding and accumulation can move each element.

Rounding to a format with machine epsilon ``eps`` moves a value ``x`` by up to ``eps/2 |x|``:
error is *relative* to the element. A layer's output also mixes many inputs, so an element
near zero carries the error of the values it was computed from, which is set by the tensor's
bulk, not by the element. So the scale of element ``i`` is

    s_i = p(|a_i|) + sigma

with ``p(x)`` the power of two at or below ``x`` (0 below the target's smallest normal) and
``sigma`` the *bulk scale*: the power of two at or above the median of the nonzero ``|a|``,
at least ``floor`` (the small-value floor, 1e-3 for half types). The median ignores the few
massive channels of trained LLMs (values in the thousands), which dominate every norm: a
whole-tensor ``rel_l2`` cannot see drift in the ordinary channels under them, and an outlier
rule against ``rms(a)`` fires on their healthy rounding. From a per-binade histogram of
``|a|`` (count, sum of ``d²``, max ``|d|``), accumulated chunk by chunk, exactly:

    noise_rms = sqrt(sum_i (d_i / s_i)² / n)       noise_max = max_i |d_i| / s_i

Both are dimensionless: a healthy run's ``noise_rms`` is a small multiple of the coarser
format's ``eps`` (the profiles in :mod:`precision.judge.profiles` hold the multiples,
calibrated in docs/verdicts.md), and ``-log2(noise_rms)`` is the error *signature*: the
significant bits the target kept (:func:`signature`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ...dtypes import FloatFormat
from ..profiles import signature_bands

#: bin k of the histogram holds |a| in [2^(e-1), 2^e) with e = k - BIN_OFFSET
BIN_OFFSET = 1100
BINS = 2 * BIN_OFFSET


@dataclass(frozen=True)
class NoiseModel:
    """``rms``/``max`` of ``|d_i| / s_i`` and the bulk scale ``sigma`` they used."""

    bulk_scale: float
    rms: float
    max: float


def noise_model(count: np.ndarray, d2: np.ndarray, dmax: np.ndarray, target: FloatFormat,
                floor: float) -> NoiseModel:
    """Noise-scaled error from the binade histogram (see the module docstring).

    ``count[k]``, ``d2[k]``, ``dmax[k]``: elements, sum of ``d²`` and max ``|d|`` whose
    ``max(|a|, smallest normal of the target)`` has binary exponent ``k - BIN_OFFSET``.
    """
    n = int(count.sum())
    if n == 0:
        return NoiseModel(0.0, 0.0, 0.0)
    bins = np.nonzero(count)[0]
    exps = bins.astype(np.int64) - BIN_OFFSET
    lowest = target.min_exp + 1  # the bin of the smallest normal: holds zeros and subnormals
    lower = np.where(exps > lowest, np.ldexp(1.0, exps - 1), 0.0)
    nonzero = exps > lowest
    sigma = floor
    if nonzero.any():
        c = count[bins][nonzero]
        median_bin = int(np.searchsorted(np.cumsum(c), (c.sum() + 1) // 2))
        sigma = max(floor, math.ldexp(1.0, int(exps[nonzero][median_bin])))
    scale = lower + sigma
    rms = math.sqrt(float(np.sum(d2[bins] / (scale * scale))) / n)
    worst = float(np.max(dmax[bins] / scale))
    return NoiseModel(sigma, rms, worst)


def signature(noise_rms: float) -> float:
    """``-log2(noise_rms)``: the significant bits the target kept (inf when exact)."""
    return -math.log2(noise_rms) if noise_rms > 0 else math.inf


def signature_label(bits: float) -> str:
    """The precision whose healthy noise an error of ``bits`` looks like.

    The bands end at each profile's limit, ``-log2(limit)``: fp32 (another device's
    accumulation order) down to 16 bits, fp16/TF32/HF32 down to 7.7, bf16 down to 4.7, and
    below that "<bf16". Healthy runs measured in docs/verdicts.md: bf16 5.9-7.5,
    fp16 8.0-10.0, TF32 8.8-13.8, fp32 with another accumulation order 18.7-23.3.
    """
    for label, lowest in signature_bands():
        if bits >= lowest:
            return label
    return "<bf16"

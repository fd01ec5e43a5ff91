"""Expected-noise tolerances per (baseline dtype, target dtype).

Rounding to a format with machine epsilon ``eps`` perturbs each value by up to ``eps/2``
relative; a layer then mixes many such values, and errors carry from layer to layer. So a
healthy low-precision run shows a norm-relative error of a few ``eps`` per layer, growing
slowly with depth. The profile of a pair is set by the coarser format's epsilon
``eps = max(eps_base, eps_target)``:

- ``rel_l2``: a tensor DRIFTs when ``||b - a|| > rel_l2 * ||a|| + atol * sqrt(n)`` (an
  ``allclose`` in norm form). ``rel_l2 = 16 eps``: 1.6e-2 for fp16, 0.125 for bf16,
  1.9e-6 for fp32 vs fp32 on another device.
- ``outlier``: a tensor also DRIFTs when one element is off by more than ``outlier`` times
  the baseline's RMS: ``max|b - a| > outlier * rms(a) + atol``. This catches sparse, large
  errors that a norm hides (a T5 position bucket that moved gives errors of about one RMS
  on a few entries). ``outlier = 128 eps``: 0.125 for fp16, 1.0 for bf16. It is scaled by
  the tensor, not by each element, because elementwise relative errors explode on the
  near-zero entries every healthy tensor has (msprobe's false alarms).
- Measured on the bundled T5 fixture (healthy, fp32 baseline): the worst layer reaches
  rel_l2 = 1.9 eps and max|d| = 23 eps * rms in fp16 and bf16 alike, so both limits keep a
  margin of 5-8x for deeper models; the planted fp16 overflow drives rel_l2 to 255 eps.
- logits: DRIFT when the mean per-token ``KL(base || target)`` exceeds ``kl_mean``
  (Ascend guidance: 1e-4 for fp16, 5e-3 for bf16) or top-1 agreement falls below
  ``top1`` counting only flips beyond a near-tie; near-tie flips are listed, never failed.

``docs/verdicts.md`` explains the numbers; ``--rtol``/``--atol`` override ``rel_l2``/``atol``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..dtypes import float_format, short


@dataclass(frozen=True)
class Profile:
    """Tolerances for one dtype pair."""

    name: str
    eps: float
    rel_l2: float
    atol: float
    outlier: float
    kl_mean: float
    top1: float

    def with_overrides(self, rtol: float | None = None, atol: float | None = None) -> Profile:
        p = self
        if rtol is not None:
            p = replace(p, rel_l2=rtol, name=p.name + "+rtol")
        if atol is not None:
            p = replace(p, atol=atol, name=p.name + "+atol")
        return p


REL_L2_EPS = 16
OUTLIER_EPS = 128
KL_MEAN = {"float16": 1e-4, "bfloat16": 5e-3}


def profile_for(base_dtype: str, target_dtype: str) -> Profile:
    """The profile for comparing a ``base_dtype`` run against a ``target_dtype`` run."""
    coarse = max((base_dtype, target_dtype), key=lambda d: float_format(d).eps)
    eps = float_format(coarse).eps
    return Profile(
        name=f"{short(base_dtype)}->{short(target_dtype)}",
        eps=eps,
        rel_l2=REL_L2_EPS * eps,
        atol=1e-5 if coarse in ("float16", "bfloat16") else 1e-7,
        outlier=OUTLIER_EPS * eps,
        kl_mean=KL_MEAN.get(coarse, 1e-6),
        top1=0.99 if coarse in ("float16", "bfloat16") else 1.0,
    )


PROFILE_NAMES = ("fp32", "fp16", "bf16")


def named_profile(name: str) -> Profile:
    """``--profile fp16`` style: the profile of fp32 against that dtype."""
    from ..dtypes import canonical

    return profile_for("float32", canonical(name))

"""Expected noise per dtype pair: the limits that verdicts judge the noise model against.

A pair's profile is set by the coarser *effective* precision of its two runs: the dtype, or
for an fp32 run whose matmuls ran in TF32 (CUDA) or HF32 (Ascend), that 10-bit format
(:func:`effective_precision` reads the settings the capture recorded). With that format's
``eps``:

- ``noise_rms``: a tensor DRIFTs when the element-scaled rms error
  (:mod:`precision.judge.measure.noise`) exceeds ``NOISE_RMS_EPS x eps``: diffuse drift, seen in the
  ordinary channels even under massive ones;
- ``noise_max``: or when one element is off by more than ``NOISE_MAX_EPS x eps`` of its
  own scale: sparse, large errors a norm hides (a T5 position bucket that moved);
- ``atol``: a tensor whose largest error is within ``atol`` is never DRIFT;
- gradients (``--backward``): ``||d|| <= 32 eps ||a||`` and ``max|d| <= 128 eps max|a|``:
  their signal is in the tails and the near-zero bulk carries the backward pass's
  accumulated error (the fixture T5's healthy fp16 and bf16 steps reach 16.5 eps rel_l2 under
  AVX2 kernels, 12 under AVX-512: scripts/kernel_margins.py);
- logits: DRIFT when the mean per-token ``KL(base || target)`` over real (unpadded) tokens
  exceeds ``kl_mean`` (Ascend guidance: 1e-4 fp16, 5e-3 bf16), or top-1 agreement falls
  below ``top1`` counting only flips beyond a near-tie (a margin within the expected noise).

fp32 against fp32 from another device differs by accumulation order alone, which grows like
``sqrt(reduction length)`` ulps: its multiples are larger in units of its (tiny) eps. The
numbers were calibrated on one set of models and checked on another; docs/verdicts.md gives
both, the healthy worst case and the smallest planted fault each profile detects.
``--rtol``/``--atol`` override ``noise_rms``/``atol``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..dtypes import canonical, short
from ..dumps.meta import ComputeSettings

#: effective precisions: significand bits after the leading one (eps = 2^-m)
MANTISSA = {"float64": 52, "float32": 23, "tf32": 10, "hf32": 10, "float16": 10,
            "bfloat16": 7}
#: limits in units of eps: rounding-dominated formats, and fp32 (accumulation order)
NOISE_RMS_EPS = 5.0
NOISE_MAX_EPS = 256.0
FP32_NOISE_RMS_EPS = 128.0
FP32_NOISE_MAX_EPS = 16384.0
#: gradients (``--backward``) are judged by norm: rel_l2 and max error against max|a|
GRAD_REL_L2_EPS = 32.0
GRAD_OUTLIER_EPS = 128.0
#: with a same-precision reference run, a record DRIFTs when its element-scaled error is
#: beyond these multiples of the reference's error against the same baseline, and beyond
#: the floors (in eps) where the reference's own error is tiny
REF_RMS_RATIO = 3.0
REF_MAX_RATIO = 8.0
REF_FLOOR_RMS_EPS = 1.0
REF_FLOOR_MAX_EPS = 16.0
#: a 1-D parameter's gradient (a norm weight, a bias) is a few hundred sums over every token:
#: the error norm of so few correlated sums spreads widely from one implementation or CPU to
#: the next (SmolLM2's healthy bf16 step, 61 norm weights: up to 6.6x the reference under
#: AVX2 kernels, against 1.9x for its 211 matrices and 1.5x for activation gradients), so it is
#: judged by ``rel_l2`` against this multiple of the reference's
REF_VECTOR_GRAD_RATIO = 10.0
#: error added near a record: its ratio to the reference at least REF_JUMP_FLOOR, and
#: REF_JUMP times the lowest ratio among the REF_JUMP_WINDOW records before it
REF_JUMP = 1.75
REF_JUMP_FLOOR = 2.0
REF_JUMP_WINDOW = 8
#: ... over at least this many vectors (tokens) of its last axis: a step measured over a
#: handful of tokens is sampling noise (the ratio of two error norms of k token vectors
#: seen through a projection spreads like an F ratio with few degrees of freedom: a healthy
#: vLLM bf16 run of SmolLM2 read 0.80-2.09x at lm_head over 3-token decode steps, 1.07x over
#: its 21-token prefill); smaller records are judged by REF_RMS_RATIO alone
REF_JUMP_MIN_VECTORS = 16
#: stats mode: the count-sketch estimate of the error norm against the reference's
REF_SKETCH_RATIO = 3.0
KL_MEAN = {"float16": 1e-4, "bfloat16": 5e-3, "tf32": 1e-4, "hf32": 1e-4}
#: with a reference that measured the logits, their mean KL DRIFTs beyond this multiple of
#: the reference's, where that is above ``kl_mean``: a model whose healthy run on the
#: reference's own device is near ``kl_mean`` (SmolLM2-135M in fp16 over two short prompts:
#: 0.84e-4 to 1.10e-4 by the CPU's kernels alone) is judged on what the port adds, not on
#: which side of the limit its CPU's rounding falls (docs/verdicts.md)
REF_KL_RATIO = 3.0


@dataclass(frozen=True)
class Profile:
    """Tolerances for one pair of effective precisions."""

    name: str
    eps: float
    noise_rms: float
    noise_max: float
    atol: float
    kl_mean: float
    top1: float
    grad_rel_l2: float = 0.0
    grad_outlier: float = 0.0
    #: ``noise_rms`` was set by the user (``--rtol``): a hard limit on every record, those
    #: a same-precision reference measures included
    rtol_given: bool = False

    def in_eps(self, value: float) -> float:
        """``value`` in units of this profile's eps."""
        return value / self.eps

    def with_overrides(self, rtol: float | None = None, atol: float | None = None) -> Profile:
        p = self
        if rtol is not None:
            p = replace(p, noise_rms=rtol, name=p.name + "+rtol", rtol_given=True)
        if atol is not None:
            p = replace(p, atol=atol, name=p.name + "+atol")
        return p


def effective_precision(dtype: str, compute: ComputeSettings | None = None) -> str:
    """What an fp32 run computed in: ``tf32``/``hf32`` when its settings said so.

    CUDA: matmuls in TF32 under ``allow_tf32`` or matmul precision ``high``/``medium``;
    convolutions (if the model has any) under cuDNN's ``allow_tf32`` (on by default).
    Ascend: HF32 under ``npu_matmul_allow_hf32``, or for convolutions ``npu_conv_allow_hf32``
    (on by default). Other dtypes and CPU runs are what they are.
    """
    if dtype != "float32" or not compute:
        return dtype
    device, conv = compute.get("device_type"), bool(compute.get("has_conv"))
    if device == "cuda":
        matmul = (compute.get("cuda_matmul_allow_tf32")
                  or compute.get("float32_matmul_precision") in ("high", "medium"))
        if matmul or (conv and compute.get("cudnn_allow_tf32")):
            return "tf32"
    if device == "npu" and (compute.get("npu_matmul_allow_hf32")
                            or (conv and compute.get("npu_conv_allow_hf32"))):
        return "hf32"
    return dtype


def profile_for(base: str, target: str) -> Profile:
    """The profile for a ``base`` run against a ``target`` run (dtypes or tf32/hf32)."""
    coarse = max((base, target), key=lambda d: 2.0 ** -MANTISSA.get(d, 23))
    eps = 2.0 ** -MANTISSA.get(coarse, 23)
    fp32 = MANTISSA.get(coarse, 23) >= 23
    half = coarse in ("float16", "bfloat16")
    return Profile(
        name=f"{short(base)}->{short(target)}",
        eps=eps,
        noise_rms=(FP32_NOISE_RMS_EPS if fp32 else NOISE_RMS_EPS) * eps,
        noise_max=(FP32_NOISE_MAX_EPS if fp32 else NOISE_MAX_EPS) * eps,
        atol=1e-5 if half else 1e-7,
        kl_mean=KL_MEAN.get(coarse, 1e-6),
        top1=0.99 if not fp32 else 1.0,
        grad_rel_l2=GRAD_REL_L2_EPS * eps,
        grad_outlier=GRAD_OUTLIER_EPS * eps,
    )


PROFILE_NAMES = ("fp32", "tf32", "hf32", "fp16", "bf16")


def precision_name(name: str) -> str:
    """``bf16``/``torch.float16``/... as a dtype name; ``tf32``/``hf32`` as they are."""
    return name if name in ("tf32", "hf32") else canonical(name)


def named_profile(name: str) -> Profile:
    """``--profile fp16`` style: the profile of fp32 against that precision."""
    return profile_for("float32", precision_name(name))



def signature_bands() -> list[tuple[str, float]]:
    """(label, fewest bits) per precision, finest first: ``-log2`` of each profile's
    diffuse-drift limit (:func:`precision.judge.measure.noise.signature_label`)."""
    return [(label, -math.log2(profile_for("float32", p).noise_rms))
            for label, p in (("fp32", "float32"), ("fp16/tf32", "float16"),
                             ("bf16", "bfloat16"))]

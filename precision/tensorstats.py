"""Per-tensor statistics computed on the tensor's own device (torch needed).

The common case costs three reductions: ``aminmax``, ``var_mean`` (a stable two-moment
reduction, so a large mean does not cancel the spread) and a 2-norm, accumulated in float32
for half types and in the tensor's own precision otherwise. Only when those reveal a NaN,
an inf or values near the fp16 limit is a second, exact pass made to count them.

Fields: ``numel``, ``min``, ``max``, ``mean``, ``std`` (population), ``norm`` (L2),
``absmax``, ``nan``, ``posinf``, ``neginf``, ``beyond_fp16`` (finite ``|x| > 65504``) and
``near_fp16_max`` (finite ``|x| >= 0.98 * 65504``). ``min``..``absmax`` cover finite values
only and are ``None`` when there are none.
"""

from __future__ import annotations

import math
from typing import Any

import torch

FP16_MAX = 65504.0
NEAR_FP16_MAX = 0.98 * FP16_MAX


def tensor_stats(t: torch.Tensor) -> dict[str, Any]:
    """Statistics of ``t`` as plain Python numbers (one device synchronisation)."""
    x = t.detach()
    out: dict[str, Any] = {"numel": x.numel(), "nan": 0, "posinf": 0, "neginf": 0,
                           "beyond_fp16": 0, "near_fp16_max": 0}
    if x.numel() == 0:
        return out | dict.fromkeys(("min", "max", "mean", "std", "norm", "absmax"))
    if not (x.is_floating_point()):
        x = x.to(torch.float64)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    summary = _summary(x, acc)
    lo, hi = summary[0], summary[1]
    if all(math.isfinite(v) for v in summary) and max(abs(lo), abs(hi)) < NEAR_FP16_MAX:
        return out | _moments(*summary)
    return out | _exact(x, acc)


def _summary(x: torch.Tensor, acc: torch.dtype) -> list[float]:
    """min, max, mean, population variance, L2 norm: three reductions, one synchronisation."""
    mn, mx = torch.aminmax(x)
    xs = x if x.dtype == acc else x.to(acc)
    var, mean = torch.var_mean(xs, correction=0)
    norm = torch.linalg.vector_norm(x, dtype=acc)
    return torch.stack([mn.to(acc), mx.to(acc), mean, var, norm]).tolist()


def _moments(lo: float, hi: float, mean: float, var: float, norm: float) -> dict[str, Any]:
    return {"min": lo, "max": hi, "mean": mean, "std": math.sqrt(max(var, 0.0)), "norm": norm,
            "absmax": max(abs(lo), abs(hi))}


def _exact(x: torch.Tensor, acc: torch.dtype) -> dict[str, Any]:
    """Slow path: count non-finite values and recompute the moments over finite ones."""
    finite = torch.isfinite(x)
    counts = torch.stack([torch.isnan(x).sum(), (x == math.inf).sum(), (x == -math.inf).sum()])
    nan, posinf, neginf = (int(v) for v in counts.tolist())
    xf = x[finite]
    out: dict[str, Any] = {"nan": nan, "posinf": posinf, "neginf": neginf}
    if xf.numel() == 0:
        return out | dict.fromkeys(("min", "max", "mean", "std", "norm", "absmax"))
    mag = xf.abs()
    counts2 = torch.stack([(mag > FP16_MAX).sum(), (mag >= NEAR_FP16_MAX).sum()]).tolist()
    return out | _moments(*_summary(xf, acc)) | {
        "beyond_fp16": int(counts2[0]), "near_fp16_max": int(counts2[1])}

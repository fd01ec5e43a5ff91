"""Per-tensor statistics computed on the tensor's own device (torch needed).

The common case costs three reductions: ``aminmax``, a sum and a 2-norm, all accumulated in
float32 for half types and in the tensor's own precision otherwise (torch reduces
pairwise). Only when those reveal a NaN, an inf or values near the fp16 limit is a second,
exact pass made to count them.

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
    mn, mx = torch.aminmax(x)
    summary = torch.stack([mn.to(acc), mx.to(acc), x.sum(dtype=acc),
                           torch.linalg.vector_norm(x, dtype=acc)]).tolist()
    lo, hi, total, norm = summary
    absmax = max(abs(lo), abs(hi))
    if all(math.isfinite(v) for v in summary) and absmax < NEAR_FP16_MAX:
        return out | _moments(x.numel(), lo, hi, total, norm)
    return out | _exact(x, acc)


def _moments(n: int, lo: float, hi: float, total: float, norm: float) -> dict[str, Any]:
    mean = total / n
    var = max(norm * norm / n - mean * mean, 0.0)
    return {"min": lo, "max": hi, "mean": mean, "std": math.sqrt(var), "norm": norm,
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
    vals = torch.stack([xf.min().to(acc), xf.max().to(acc), xf.sum(dtype=acc),
                        torch.linalg.vector_norm(xf, dtype=acc),
                        (mag > FP16_MAX).sum().to(acc), (mag >= NEAR_FP16_MAX).sum().to(acc)])
    lo, hi, total, norm, beyond, near = vals.tolist()
    return out | _moments(xf.numel(), lo, hi, total, norm) | {
        "beyond_fp16": int(beyond), "near_fp16_max": int(near)}

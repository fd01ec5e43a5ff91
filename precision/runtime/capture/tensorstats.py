"""Per-tensor statistics computed on the tensor's own device (torch needed).

The common case costs three reductions: ``aminmax``, a sum and a 2-norm, accumulated in
float32 (torch reduces in cascades, so the relative error stays near 1e-7, far below any
tolerance that stats are judged by). The variance ``norm²/n - mean²`` is recomputed with a
two-pass ``var_mean`` in float64 only when the mean is so large against the spread that the
difference could cancel. Only when the reductions reveal a NaN, an inf or values
near the fp16 limit is a second, exact pass made to count them. On the CPU, where numba
loads, the summary and the sketch come from one pass instead
(:mod:`precision.runtime.capture.onepass`, float64 sums: :func:`_one_pass`).

Fields: ``numel``, ``min``, ``max``, ``mean``, ``std`` (population), ``norm`` (L2),
``absmax``, ``nan``, ``posinf``, ``neginf``, ``masked`` (values at or below the dtype's
lowest finite value, -inf included: an additive attention mask, or an overflow; compare
tells them apart by the count in the other run), ``beyond_fp16`` (finite ``|x| > 65504``)
and ``near_fp16_max`` (finite ``|x| >= 0.98 * 65504``). ``min``..``absmax`` cover finite,
unmasked values only and are ``None`` when there are none. ``sketch``: the count sketch of
:mod:`precision.dumps.sketch` (1021 float32 numbers, summed in float64 on CUDA and by the
one-pass kernel, float32 by torch on the CPU; a dump keeps them as rows of one tensor),
from which compare estimates two runs' error norm;
left out where the tensor holds NaN, inf or masked values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ...dtypes import FP16_FLUSH, FP16_MAX, NEAR_FP16_MAX
from ...dumps.sketch import BUCKETS, MULTIPLIER, PERIOD, hash_sign
from ...errors import InputError
from ...kernel_choice import KERNEL_ENV, wanted_kernel

#: recompute the variance exactly when norm²/n - mean² could have lost this many ulps
CANCELLATION = 1e3
#: with the one-pass kernel's float64 sums: recompute the variance exactly when its rounding
#: bound exceeds this fraction of it (the std then errs by at most half of it)
VARIANCE_TOLERANCE = 1e-8
#: the dtypes the one-pass kernel reads (halves through the float32 work buffer)
_FUSED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
#: the one-pass kernel's module once loaded, False where numba cannot load (see fused_kernel)
_FUSED: Any = None
#: why the one-pass kernel could not load, once it was tried and failed (see fused_kernel)
_FUSED_FAILURE = ""
#: ``tensor_stats(kernel=AUTO)``: the kernel is looked up at each CPU record
AUTO = "auto"
#: the counts of a record that holds no NaN, inf, masked or near-fp16-limit value
_NO_COUNTS = {"nan": 0, "posinf": 0, "neginf": 0, "masked": 0, "beyond_fp16": 0,
              "near_fp16_max": 0}


def tensor_stats(t: torch.Tensor, *, detail: bool = False,
                 kernel: Any = AUTO) -> dict[str, Any]:
    """Statistics of ``t`` as plain Python numbers (one device synchronisation).

    ``detail`` adds ``flush_fp16``: nonzero finite values that fp16 rounds to zero
    (``0 < |x| <= 2^-25``; the tie rounds to even, 0), one more pass, used by ``precision scan``.
    ``kernel``: the one-pass kernel's module, or None for torch's reductions, as
    :func:`fused_kernel` gives it; :data:`AUTO` asks :func:`fused_kernel` at each CPU
    record (a capture asks once, when it opens).
    """
    out = _stats(t, kernel)
    if detail:
        x = t.detach()
        mag = x.abs() if x.is_floating_point() else x.to(torch.float32).abs()
        out["flush_fp16"] = int(((mag <= FP16_FLUSH) & (mag > 0)).sum())  # ties go to 0
    return out


def _stats(t: torch.Tensor, kernel: Any) -> dict[str, Any]:
    x = t.detach() if t.requires_grad else t
    n = x.numel()
    if n and not x.is_floating_point():
        x = x.to(torch.float64)
    if n and x.is_cpu and x.dtype in _FUSED_DTYPES:
        if kernel is AUTO:
            kernel = fused_kernel()
        fused = None if kernel is None else _one_pass(x, kernel)
        if fused is not None:
            return fused
    out: dict[str, Any] = {"numel": n} | _NO_COUNTS
    if n == 0:
        return out | dict.fromkeys(("min", "max", "mean", "std", "norm", "absmax"))
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    staged = _staged(x)
    summary = _summary(x if staged is None else staged, acc)
    lo, hi = summary[0], summary[1]
    if all(math.isfinite(v) for v in summary) and max(abs(lo), abs(hi)) < NEAR_FP16_MAX:
        return out | _moments(*summary) | {
            "sketch": sketch(x) if staged is None else sketch(staged, scratch=True)}
    exact = _exact(x, acc)
    if not (exact["nan"] or exact["posinf"] or exact["neginf"] or exact["masked"]):
        exact["sketch"] = sketch(x)
    return out | exact


def fused_kernel() -> Any:
    """The one-pass kernel's module (:mod:`precision.runtime.capture.onepass`), loaded when
    the process's first CPU stats capture opens or its first CPU record comes (importing
    numba and loading the compiled kernel from its cache: about 0.5 s once; a few seconds
    the first time it compiles); None where numba is not installed or cannot load, or
    ``PRECISION_KERNEL=numpy`` (:func:`statistics_path` says which, and why).
    ``PRECISION_KERNEL=numba`` makes a kernel that cannot load an error, as compare does."""
    global _FUSED, _FUSED_FAILURE
    wanted = wanted_kernel()
    if wanted == "numpy":
        return None
    if _FUSED is None:
        try:
            from . import onepass

            onepass.warm()
            _FUSED = onepass
        except ModuleNotFoundError as exc:
            _FUSED = False
            _FUSED_FAILURE = (f"{exc.name} is not installed (pip install 'precision[fast]')"
                              if exc.name in ("numba", "llvmlite") else _failure(exc))
        except Exception as exc:  # LLVM cannot load (under a memory limit), a stale cache
            _FUSED = False
            _FUSED_FAILURE = _failure(exc)
    if not _FUSED and wanted == "numba":
        raise InputError(f"{KERNEL_ENV}=numba, but {_FUSED_FAILURE}")
    return _FUSED or None


def _failure(exc: BaseException) -> str:
    """One line on why the one-pass kernel did not load."""
    first = (str(exc).strip().splitlines() or [""])[0][:160]
    return f"the one-pass kernel did not load ({type(exc).__name__}{': ' + first if first else ''})"


def statistics_path(kernel: Any) -> dict[str, str]:
    """What computes a CPU record's statistics given :func:`fused_kernel`'s answer
    ``kernel``, for a dump's metadata: ``{"path": "onepass"}`` (float64 sums), or
    ``{"path": "torch", "why": ...}`` (torch's reductions: float32 cascades)."""
    if kernel is not None:
        return {"path": "onepass"}
    why = f"{KERNEL_ENV}=numpy" if wanted_kernel() == "numpy" else _FUSED_FAILURE
    return {"path": "torch", "why": why}


def _one_pass(x: torch.Tensor, kernel: Any) -> dict[str, Any] | None:
    """Statistics and sketch of a float CPU tensor (not empty) from one pass of the kernel,
    or None where it holds NaN, inf or values near fp16's limit (the exact path counts them).

    ``mean = Σx / n``, ``var = Σx²/n - mean²``, ``norm = sqrt(Σx²)``, with ``Σx`` and ``Σx²``
    in float64 and within ``δ(n) = onepass.error_bound(n)`` of ``Σ|x|`` and ``Σx²``: so the
    variance is within ``3δ (mean² + var)``; where that exceeds
    ``VARIANCE_TOLERANCE x var``, it is recomputed with the two-pass ``var_mean`` in float64.

    Written for the hooks' path: it runs between two operations of the forward, where each
    line of Python costs several times what it does in a loop (docs/performance.md).
    """
    if x.dtype in (torch.float16, torch.bfloat16):
        staged = _staged(x)
        flat = staged if staged is not None else x.reshape(-1).float()
    else:
        flat = x.reshape(-1)
    if not flat.is_contiguous():  # a strided 1-D view stays one
        flat = flat.contiguous()
    a = flat.numpy()
    total, squares, lo, hi, y = kernel.record_summary(a, torch.get_num_threads())
    if not (lo > -NEAR_FP16_MAX and hi < NEAR_FP16_MAX):  # also False for NaN
        return None  # so the extrema are finite and small, and so are the sums
    n = a.size
    mean = total / n
    var = squares / n - mean * mean
    if 3 * kernel.error_bound(n) * (mean * mean + max(var, 0.0)) > VARIANCE_TOLERANCE * var:
        v, m = torch.var_mean(flat.to(torch.float64), correction=0)
        var, mean = float(v), float(m)
    # _moments' fields written out (a call and a merge fewer)
    return {"numel": n, "nan": 0, "posinf": 0, "neginf": 0, "masked": 0, "beyond_fp16": 0,
            "near_fp16_max": 0, "min": lo, "max": hi, "mean": mean,
            "std": math.sqrt(var) if var > 0 else 0.0, "norm": math.sqrt(squares),
            "absmax": max(abs(lo), abs(hi)), "sketch": y.astype(np.float32)}


def _staged(x: torch.Tensor) -> torch.Tensor | None:
    """A half-precision tensor on the CPU as float32 in the reused work buffer (at most one
    period of the sketch's signs), else None: there float32 reductions, numpy's extrema and
    the sketch's multiply in place cost two thirds of the half-precision kernels'."""
    if x.device.type != "cpu" or x.dtype not in (torch.float16, torch.bfloat16) \
            or x.numel() > PERIOD:
        return None
    work = _grown(_WORK, x.numel(), x.device,
                  lambda k: torch.empty(k, dtype=torch.float32, device=x.device))
    return work.copy_(x.reshape(-1))


def _summary(x: torch.Tensor, acc: torch.dtype) -> list[float]:
    """min, max, mean, population variance, L2 norm: three reductions, one synchronisation.

    The variance comes from ``norm²/n - mean²``; where that could cancel (a mean large
    against the spread) it is recomputed with the two-pass ``var_mean``. The extrema of a
    float32 or float64 tensor on the CPU come from numpy (exact, like ``aminmax``, and twice
    as fast there).
    """
    total = x.sum(dtype=acc)
    norm = torch.linalg.vector_norm(x, dtype=acc)
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        a = x.numpy()
        s, nrm = torch.stack([total, norm]).tolist()
        lo, hi = float(a.min()), float(a.max())
    else:
        mn, mx = torch.aminmax(x)
        lo, hi, s, nrm = torch.stack([mn.to(acc), mx.to(acc), total, norm]).tolist()
    n = x.numel()
    mean = s / n
    var = nrm * nrm / n - mean * mean
    if var <= mean * mean * torch.finfo(acc).eps * CANCELLATION:
        exact = torch.float64 if x.device.type in ("cpu", "cuda") else acc
        v, m = torch.var_mean(x.to(exact), correction=0)
        var, mean = float(v), float(m)
    return [lo, hi, mean, var, nrm]


def _moments(lo: float, hi: float, mean: float, var: float, norm: float) -> dict[str, Any]:
    return {"min": lo, "max": hi, "mean": mean, "std": math.sqrt(max(var, 0.0)), "norm": norm,
            "absmax": max(abs(lo), abs(hi))}


def _exact(x: torch.Tensor, acc: torch.dtype) -> dict[str, Any]:
    """Slow path: count non-finite and masked values; moments over the finite, unmasked."""
    masked = x <= torch.finfo(x.dtype).min
    keep = torch.isfinite(x) & ~masked
    counts = torch.stack([torch.isnan(x).sum(), (x == math.inf).sum(), (x == -math.inf).sum(),
                          masked.sum()])
    nan, posinf, neginf, n_masked = (int(v) for v in counts.tolist())
    xf = x[keep]
    out: dict[str, Any] = {"nan": nan, "posinf": posinf, "neginf": neginf, "masked": n_masked}
    if xf.numel() == 0:
        return out | dict.fromkeys(("min", "max", "mean", "std", "norm", "absmax"))
    mag = xf.abs()
    counts2 = torch.stack([(mag > FP16_MAX).sum(), (mag >= NEAR_FP16_MAX).sum()]).tolist()
    # huge finite values (a finfo.min mask) overflow float32 sums: use float64 where it is fast
    wide = torch.float64 if x.device.type in ("cpu", "cuda") else acc
    moments = {k: (v if math.isfinite(v) else None)
               for k, v in _moments(*_summary(xf, wide)).items()}
    return out | moments | {"beyond_fp16": int(counts2[0]), "near_fp16_max": int(counts2[1])}


#: device -> the signs s(i) of elements 0 .. len - 1 (float32), grown as records need it,
#: up to one period (precision.dumps.sketch): one table per device, whatever the sizes
_SIGNS: dict[str, torch.Tensor] = {}
#: device -> a float32 buffer the signed elements are written to (no allocation per record)
_WORK: dict[str, torch.Tensor] = {}
#: ones for the CPU's matrix-vector sums (one per row of 1021 elements)
_ONES: dict[str, torch.Tensor] = {}
#: the smallest table or buffer made (elements)
_FIRST_SIZE = 1 << 16


def _grown(cache: dict[str, torch.Tensor], n: int, device: torch.device,
           make: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """The first ``n`` elements of ``cache``'s tensor for ``device``, made by ``make(size)``
    at twice the size it had (at least ``n``, at most one period) when it is too short."""
    key = str(device)
    have = cache.get(key)
    if have is None or have.numel() < n:
        size = min(PERIOD, max(n, _FIRST_SIZE, 2 * (0 if have is None else have.numel())))
        have = cache[key] = make(size)
    return have[:n]


def _sign_table(n: int, device: torch.device) -> torch.Tensor:
    """``σ(i)`` (+-1, float32) of ``i = 0 .. n - 1``, ``n`` at most one period (see
    precision.dumps.sketch); every ``i`` is below 2^31, so ``i x MULTIPLIER`` fits int64."""
    def make(size: int) -> torch.Tensor:
        i = torch.arange(size, device=device, dtype=torch.int64)
        g = (i * MULTIPLIER) & 0xFFFFFFFF
        return (1 - 2 * ((g >> 26) & 1)).to(torch.float32)

    return _grown(_SIGNS, n, device, make)


def _ones(n: int, dtype: torch.dtype) -> torch.Tensor:
    """``n`` ones on the CPU (at most one period's rows), kept between records."""
    return _grown(_ONES, n, torch.device("cpu"), lambda k: torch.ones(k))[:n].to(dtype)


def sketch(x: torch.Tensor, *, scratch: bool = False) -> np.ndarray:
    """The count sketch of ``x`` (flattened) as a record keeps it (float32 values):
    :func:`precision.dumps.sketch.count_sketch` up to rounding. Per period of ``P`` elements,
    one multiply by the device's sign table into a reused float32 buffer (exact: the signs
    are +-1) and a sum over every 1021st element, times the period's sign. On the CPU the
    sum is a float32 matrix-vector product (four times faster than a strided float64 sum;
    relative error about 1e-6 of ``||x||``, far below the half-precision errors a sketch
    estimates); elsewhere a float64 (CUDA) or float32 sum. float64 tensors stay float64.
    ``scratch``: ``x`` is a float32 tensor whose values may be overwritten (the product is
    written in place)."""
    flat = x.detach().reshape(-1)
    y: torch.Tensor | None = None
    for start in range(0, flat.numel(), PERIOD):
        block = _period_sketch(flat[start:start + PERIOD], scratch)
        if start and hash_sign(np.int64(start // PERIOD)) < 0:
            block = -block
        y = block if y is None else y + block
    if y is None:
        return np.zeros(BUCKETS, np.float32)
    return y.to("cpu", torch.float32).numpy()


def _period_sketch(part: torch.Tensor, scratch: bool = False) -> torch.Tensor:
    """The sketch of at most one period of elements, numbered from 0 (see :func:`sketch`)."""
    device, size = part.device, part.numel()
    signs = _sign_table(size, device)
    if part.dtype == torch.float64:
        prod = part * signs.double()
    elif scratch:
        prod = part.mul_(signs)
    else:
        work = _grown(_WORK, size, device,
                      lambda k: torch.empty(k, dtype=torch.float32, device=device))
        prod = torch.mul(part, signs, out=work)
    rows = size // BUCKETS
    whole = rows * BUCKETS
    if device.type == "cpu":
        y = (_ones(rows, prod.dtype) @ prod[:whole].view(rows, BUCKETS) if rows
             else torch.zeros(BUCKETS, dtype=prod.dtype))
    else:
        acc = torch.float64 if device.type == "cuda" else prod.dtype
        y = (prod[:whole].view(rows, BUCKETS).sum(0, dtype=acc) if rows
             else torch.zeros(BUCKETS, dtype=acc, device=device))
    if size > whole:  # the tail: buckets 0 .. size % 1021 - 1 of the last row
        y[: size - whole] += prod[whole:]
    return y

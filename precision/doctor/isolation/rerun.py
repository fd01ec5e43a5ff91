"""Pass 3 of :func:`~precision.doctor.isolation.isolate`: each recorded call again, alone,
on its arguments rounded to the dtypes the target run holds them in, each output measured
against its fp32 output (padded positions left out, as compare does).

Additive masks at fp32's lowest value move to the target's lowest, as the target run builds
them. A call whose inputs do not fit the target dtype is also run by an fp32 copy of the
module on the same inputs: what those inputs imply, against which its own damage is counted.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from ...dtypes import SATURATION, short
from ...dumps.dump import Dump
from ...dumps.keys import make_key
from ...judge.compare import status_of_metrics
from ...judge.lineup.tokens import Padding, padding_of, real_chunks
from ...judge.measure.metrics import PairAccumulator, TensorMetrics
from ...judge.profiles import Profile
from ...runtime.capture.tensors import torch_dtype_name
from ...runtime.capture.trees import flatten, map_tensors
from ...runtime.models.load import one_line
from .calls import Call
from .classify import CallResult, verdict_alone, verdict_on_overflowed_inputs
from .report import IsolateRow

CHUNK = 1 << 18
#: a recorded floating value at or below this share of its dtype's lowest is an additive mask
MASK_SHARE = 0.5


def rerun_call(b: Dump, c: Call, mod: torch.nn.Module, held: dict[str, torch.dtype],
               dtype: torch.dtype, device: str, prof: Profile) -> CallResult:
    """Re-run one call alone on its arguments as the target run holds them."""
    keys = {idx: make_key(c.module, "out", idx, c.call) for idx in c.outputs}
    tally = {"overflowed": 0, "not_finite": 0}

    def cast(path: str, t: torch.Tensor) -> torch.Tensor:
        x = t.to(device)
        if not x.is_floating_point():
            return x
        want = held.get(path, dtype)
        mask = x <= -MASK_SHARE * torch.finfo(x.dtype).max  # additive masks, -inf too
        finite = torch.isfinite(x)
        y = x.to(want)
        if want != x.dtype and bool((mask & finite).any()):
            y = y.masked_fill(mask & finite, torch.finfo(want).min)
        real = _real(b, make_key(c.module, "in", path, c.call), tuple(x.shape), device)
        lost = finite & ~mask & ~torch.isfinite(y)
        bad = ~finite & ~mask
        if real is not None:
            lost, bad = lost & real, bad & real
        tally["overflowed"] += int(lost.sum())
        tally["not_finite"] += int(bad.sum())
        return y

    def unknown(why: str) -> CallResult:
        return CallResult(c, [IsolateRow(-1, k, None, "ERROR", why, None, "unknown",
                                      tally["overflowed"]) for k in keys.values()])

    try:
        args, kwargs = map_tensors((c.args, c.kwargs), cast)
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        with torch.no_grad():
            got = dict(flatten(mod(*args, **kwargs)))
    except Exception as exc:  # any error of any model's code: the row says which
        return unknown(f"re-running it alone raised {type(exc).__name__}: {one_line(exc)}")
    for idx, ref in c.outputs.items():
        y = got.get(idx)
        if y is None or tuple(y.shape) != tuple(ref.shape):
            what = "no output" if y is None else f"shape {tuple(y.shape)} for"
            return unknown(f"alone it gave {what} {keys[idx]} (fp32: {tuple(ref.shape)})")
    overflowed, not_finite = tally["overflowed"], tally["not_finite"]
    implied: dict[str, torch.Tensor] | None = None
    if overflowed or not_finite:
        try:
            implied = _implied(mod, args, kwargs)
        except Exception as exc:  # as above
            return unknown(f"{_inputs_text(overflowed, not_finite, dtype)}, and an fp32 "
                           f"copy of it raised {type(exc).__name__}: {one_line(exc)}")
    res = CallResult(c, [])
    for idx, ref in c.outputs.items():
        y = got[idx]
        key = keys[idx]
        local = _measure(b, key, ref, y)
        status, reason = status_of_metrics(local, prof)
        if implied is None:
            verdict, severity = verdict_alone(status)
        else:
            verdict, severity, reason = verdict_on_overflowed_inputs(
                _inputs_text(overflowed, not_finite, dtype),
                _own_damage(b, key, y, implied.get(idx), device))
        res.severity = max(res.severity, severity)
        res.rows.append(IsolateRow(-1, key, local, status, reason, None, verdict, overflowed))
    return res


def _short(dtype: torch.dtype) -> str:
    return short(torch_dtype_name(dtype))


def _inputs_text(overflowed: int, not_finite: int, dtype: torch.dtype) -> str:
    parts = []
    if overflowed:
        parts.append(f"its input does not fit {_short(dtype)} ({overflowed} values overflow "
                     "when rounded)")
    if not_finite:
        parts.append(f"its input holds {not_finite} NaN/inf in fp32 already")
    return ", and ".join(parts)


def _implied(mod: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
             ) -> dict[str, torch.Tensor]:
    """What the overflowed inputs imply: an fp32 copy of the module on the same inputs (the
    values the target dtype lost are inf there too)."""
    twin = copy.deepcopy(mod).float()
    up = map_tensors((args, kwargs), lambda _p, t: t.float() if t.is_floating_point() else t)
    try:
        with torch.no_grad():
            return {k: v for k, v in flatten(twin(*up[0], **up[1])) if v.is_floating_point()}
    finally:
        del twin


def _own_damage(b: Dump, key: str, y: torch.Tensor, implied: torch.Tensor | None,
                device: str) -> int:
    """Values the module makes inf, NaN or pins near its dtype's max where the fp32 copy on
    the same (overflowed) inputs is finite, over real tokens."""
    if implied is None:
        return 0
    imp = implied.to(device=y.device, dtype=torch.float32)
    bad = ~torch.isfinite(y)
    if y.dtype in (torch.float16, torch.bfloat16):
        yf = y.float()
        pinned = ((yf.abs() >= SATURATION * torch.finfo(y.dtype).max)
                  & ((yf - imp).abs() > 1e-2 * imp.abs()))
        bad |= pinned
    own = bad & torch.isfinite(imp)
    real = _real(b, key, tuple(y.shape), str(y.device))
    if real is not None:
        own &= real
    return int(own.sum())


def _real(b: Dump, key: str, shape: tuple[int, ...], device: str) -> torch.Tensor | None:
    """Where a tensor of ``shape`` holds real tokens (None: everywhere), as compare sees it."""
    pad = padding_of(b, key, shape)
    if pad is None:
        return None
    n = int(np.prod(shape, dtype=np.int64))
    keep = np.repeat(pad.keep(0, n // pad.width), pad.width)
    return torch.from_numpy(keep).reshape(shape).to(device)


def _measure(b: Dump, key: str, ref: torch.Tensor, got: torch.Tensor) -> TensorMetrics:
    """``got`` against its fp32 output ``ref``, padded positions left out."""
    want = ref.numpy().reshape(-1)
    have = got.detach().float().cpu().numpy().reshape(-1)
    acc = PairAccumulator("float32", torch_dtype_name(got.dtype))
    pad: Padding | None = padding_of(b, key, tuple(ref.shape))
    step = CHUNK if pad is None else max(1, CHUNK // pad.width) * pad.width
    pairs: Any = ((want[i:i + step], have[i:i + step]) for i in range(0, want.size, step))
    if pad is not None:
        pairs = real_chunks(pairs, pad)
    for x, y in pairs:
        acc.update(x, y)
    return replace(acc.result(), padded=pad.padded_elements if pad is not None else 0)

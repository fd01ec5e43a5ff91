"""Local versus inherited error: re-run each module alone on the baseline's inputs.

A layer can look bad in a comparison because it is bad, or because what fed it already was.
:func:`isolate` takes a baseline dump captured with module inputs (``--inputs '*'``), loads
the model in the target dtype, and runs every leaf module that was called with one tensor
argument on the baseline's own input, rounded to the target dtype as the target run would
hold it. Its output against the baseline's output is the *local* error: the module alone.
Next to the *accumulated* error of a full target run (``target``), it says who is to blame:

- ``culprit``: the module alone is beyond the profile (e.g. ``wo`` overflowing fp16);
- ``inherited``: the full run is beyond the profile but the module alone is not, or the
  baseline's input itself does not fit the target dtype (it overflowed upstream, so the
  module cannot be judged alone);
- ``ok``: neither.

Modules called with several arguments or keyword arguments (attention blocks with masks
and caches) cannot be re-run from recorded tensors alone and are skipped, which the report
says; their leaves (projections, norms, activations) are covered.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..dtypes import canonical, is_float, short
from ..dumps import load
from ..dumps.dump import Dump, Entry
from ..errors import InputError
from ..judge.compare import compare, judge
from ..judge.metrics import PairAccumulator, TensorMetrics
from ..judge.profiles import Profile, profile_for
from ..judge.report import Row
from ..runtime.models import TORCH_DTYPES, Policy, load_model
from ..runtime.recorder import flatten, numpy_to_torch, require_same_model, torch_dtype_name

CHUNK = 1 << 18


@dataclass(frozen=True)
class IsolateRow:
    """One module output: its error alone and in the full run."""

    order: int
    key: str
    local: TensorMetrics
    local_status: str
    local_reason: str
    accumulated: Row | None
    verdict: str


@dataclass(frozen=True)
class IsolateReport:
    """Rows in execution order; truthy when no module is a culprit."""

    profile: Profile
    rows: tuple[IsolateRow, ...]
    skipped: int

    def __bool__(self) -> bool:
        return not self.culprits

    def _repr_html_(self) -> str:
        """Jupyter: culprits and inherited rows."""
        from ..judge.html import num, table

        rows = [r for r in self.rows if r.verdict != "ok"] or list(self.rows)
        return table(self.summary, ["#", "layer", "verdict", "local rel_l2", "local",
                                    "accumulated", "why"],
                     ([r.order, r.key, r.verdict, num(r.local.rel_l2), r.local_status,
                       r.accumulated.status if r.accumulated else "-", r.local_reason]
                      for r in rows))

    @property
    def culprits(self) -> list[IsolateRow]:
        return [r for r in self.rows if r.verdict == "culprit"]

    @property
    def summary(self) -> str:
        inherited = sum(r.verdict == "inherited" for r in self.rows)
        head = (f"culprit: {self.culprits[0].key} ({self.culprits[0].local_reason})"
                if self.culprits else "no module is beyond the profile on its own")
        return (f"{'PASS' if self else 'FAIL'} [{self.profile.name}]: {head}; "
                f"{len(self.culprits)} culprit(s), {inherited} inherited, {len(self.rows)} "
                f"modules re-run, {self.skipped} skipped (not re-runnable alone)")


def isolate(base: str | os.PathLike[str] | Dump, model: str, *, dtype: str = "fp16",
            device: str = "cpu", keep_fp32: Sequence[str] = ("none",),
            target: str | os.PathLike[str] | Dump | None = None) -> IsolateReport:
    """Local error of every re-runnable module, next to the accumulated error of ``target``."""
    b = base if isinstance(base, Dump) else load(base)
    calls = _single_input_calls(b)
    if not any(is_float(b.entry(k).dtype) for k in calls.values()):  # type: ignore[union-attr]
        raise InputError(f"{b.path.name} holds no floating-point module inputs to re-run: "
                         "capture the baseline with --inputs '*'")
    dt = canonical(dtype)
    loaded = load_model(model, dtype=dt, device=device, policy=Policy.parse(keep_fp32))
    require_same_model(b, loaded.model, b.path.name)
    prof = profile_for(b.dtype or "float32", dt)
    accumulated = ({r.key: r for r in compare(b, target).rows} if target is not None else {})
    modules = dict(loaded.model.named_modules())
    rows, skipped = [], 0
    for e in b.entries:
        if e.kind != "out" or e.index or e.module not in modules:
            continue
        in_key = calls.get((e.module, e.call))
        mod = modules[e.module]
        if in_key is None or any(True for _ in mod.children()):
            skipped += e.module not in ("root", "input")
            continue
        local, lost = _rerun(b, mod, in_key, e, dt, device)
        status, reason = judge(local, prof)
        acc = accumulated.get(e.key)
        if lost:
            verdict = "inherited"
            reason = f"its input does not fit {short(dt)}: {lost} values overflow when rounded"
        else:
            verdict = ("culprit" if status != "OK" else
                       "inherited" if acc is not None and acc.flagged else "ok")
        rows.append(IsolateRow(e.order, e.key, local, status, reason, acc, verdict))
    return IsolateReport(prof, tuple(rows), skipped)


def _single_input_calls(d: Dump) -> dict[tuple[str, int], str]:
    """(module, call) -> input key, for calls whose only recorded input is positional #0."""
    found: dict[tuple[str, int], list[Entry]] = {}
    for e in d.entries:
        if e.kind == "in" and e.module != "input":
            found.setdefault((e.module, e.call), []).append(e)
    return {k: v[0].key for k, v in found.items() if len(v) == 1 and v[0].index == "0"}


def _rerun(b: Dump, mod: torch.nn.Module, in_key: str, out: Entry, dtype: str,
           device: str) -> tuple[TensorMetrics, int]:
    """Local metrics, and how many finite input values the rounding to ``dtype`` lost."""
    x = numpy_to_torch(b[in_key]).to(device)
    lost = 0
    if x.is_floating_point():
        finite = torch.isfinite(x)
        x = x.to(TORCH_DTYPES[dtype])  # what the target run holds: the input rounded to it
        lost = int((finite & ~torch.isfinite(x)).sum())
        params = {p.dtype for p in mod.parameters(recurse=False)}
        if len(params) == 1:
            x = x.to(params.pop())  # modules kept in fp32 upcast, as their callers do
    with torch.no_grad():
        y: Any = mod(x)
    tensors = dict(flatten(y))
    got = tensors.get("")
    if got is None:
        raise InputError(f"re-running {out.module} gave no tensor output")
    want = b[out.key].reshape(-1)
    acc = PairAccumulator(out.dtype, torch_dtype_name(got.dtype))
    flat = got.detach().float().cpu().numpy().reshape(-1)
    for i in range(0, want.size, CHUNK):
        acc.update(want[i:i + CHUNK], flat[i:i + CHUNK])
    return acc.result(), lost


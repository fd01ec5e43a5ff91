"""Local versus inherited error: re-run every module alone, in the target dtype, on the exact
arguments the model called it with.

A layer can look bad in a comparison because it is bad, or because what fed it already was.
:func:`isolate` separates the two for every module the model calls: leaves (projections,
norms, activations) and the modules around them (attention blocks, decoder layers called with
``hidden_states`` plus masks, ``position_embeddings=(cos, sin)``, ``position_ids``, caches and
flags; whole stacks).

How the calls are re-created, in three passes:

1. **Record** (fp32): load the model in fp32 and run it once on the baseline's own model
   inputs (its ``input:*`` records, which every capture keeps whole, stats mode included),
   caches off. A forward pre-hook (``with_kwargs=True``) on every module keeps each call's
   positional and keyword arguments as they were: tensors cloned to host memory (a tensor
   that several calls share, such as the mask or ``(cos, sin)``, once), tuples, ``None``,
   numbers and flags as they are, cache objects dropped. A forward hook keeps the call's
   fp32 outputs: the local reference.
2. **Probe** (target dtype): load the model in the target dtype under the ``keep_fp32``
   policy and run it once on the same inputs, noting only the dtype each floating argument of
   each call arrives in (before a kept module's upcast): what the target run holds it as.
3. **Re-run**: call each module alone on its recorded arguments rounded to those dtypes
   (integer and bool tensors as they are; additive masks at fp32's lowest value moved to the
   target's lowest, as the target run builds them; ``use_cache=False``), and measure each
   output against its fp32 output (padded positions left out, as compare does).

Why not record module inputs in the dump (``capture --inputs``): every keyword argument of
every call (masks, ``position_embeddings``, flags) would have to be stored and described, and
calls whose arguments are not tensors could still not be re-created; running the model once
needs only the model inputs every capture records, and gives each module exactly the call
the model makes. The price: host memory for every call's arguments and fp32 outputs (about
what a full capture with ``--inputs '*'`` writes), and the model loaded twice, one after the
other.

Verdicts, per module output (worst first):

- ``culprit``: all its floating inputs are finite and fit the dtype they are held in, and
  alone it is beyond the profile (inf/NaN or values pinned near the dtype's max: OVERFLOW,
  NAN; or drift): the error is made here. Also a module whose inputs already overflowed, when
  alone it makes inf/NaN/pinned values where an fp32 copy of it on those same inputs stays
  finite: it adds an overflow of its own.
- ``encloses``: beyond the profile alone, but a module it calls is a culprit at least as
  severe (an overflow counts over drift): the error is made inside it. A decoder layer whose
  own residual add overflows while none of its submodules does is the culprit itself.
- ``inherited``: its inputs do not fit the target dtype (they overflowed upstream) and its
  output is no worse than that implies; or it is fine alone but flagged in the full run
  (``target``). The reason says which.
- ``unknown``: re-running it raised; the reason is the error's first line.
- ``ok``.

The report is falsy when there is a culprit, and whenever the full ``target`` run has an
OVERFLOW or NAN record: a run that overflows or turns to NaN never passes, even where no
module alone can be blamed (modules that could not be re-run, say).
"""

from __future__ import annotations

import copy
import gc
import inspect
import itertools
import os
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from ..dtypes import SATURATION, canonical, short
from ..dumps import load
from ..dumps.dump import Dump
from ..dumps.keys import INPUT_PREFIX, make_key
from ..errors import InputError
from ..judge.compare import compare, judge
from ..judge.lineup.tokens import Padding, padding_of, real_chunks
from ..judge.measure.metrics import PairAccumulator, TensorMetrics
from ..judge.measure.row import Row
from ..judge.profiles import Profile, profile_for
from ..runtime.capture.selection import select_modules
from ..runtime.capture.tensors import torch_dtype_name
from ..runtime.capture.trees import flatten
from ..runtime.models.identity import require_same_model
from ..runtime.models.load import TORCH_DTYPES, Policy, load_model, one_line
from ..runtime.run.runner import replay_inputs

CHUNK = 1 << 18
#: verdicts, worst first
VERDICTS = ("culprit", "encloses", "unknown", "inherited", "ok")
#: statuses that mean a value the dtype cannot hold was made (severity 2; drift is 1)
RANGE_STATUSES = frozenset({"OVERFLOW", "NAN"})
#: a recorded floating value at or below this share of its dtype's lowest is an additive mask
MASK_SHARE = 0.5


@dataclass(frozen=True)
class IsolateRow:
    """One module output: its error alone and in the full run.

    ``order`` is the baseline's record order of ``key`` (-1 when the baseline has no such
    record); ``local`` is ``None`` for ``unknown`` rows (``local_status`` ``ERROR``);
    ``overflowed_inputs`` counts the finite input values that do not fit the dtype the target
    run holds them in.
    """

    order: int
    key: str
    local: TensorMetrics | None
    local_status: str
    local_reason: str
    accumulated: Row | None
    verdict: str
    overflowed_inputs: int = 0


@dataclass(frozen=True)
class IsolateReport:
    """Rows in execution order; truthy when no module is a culprit and the target run (when
    given) has no OVERFLOW or NAN record.

    ``calls``: module calls re-run; ``skipped``: calls with no floating output to measure;
    ``target_problems``: the target run's OVERFLOW and NAN rows.
    """

    profile: Profile
    rows: tuple[IsolateRow, ...]
    calls: int
    skipped: int = 0
    target_problems: tuple[Row, ...] = ()
    notes: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return not self.culprits and not self.target_problems

    def _repr_html_(self) -> str:
        """Jupyter: the rows that are not ok."""
        from ..judge.html import num, table

        rows = [r for r in self.rows if r.verdict != "ok"] or list(self.rows)
        return table(self.summary, ["#", "layer", "verdict", "local rel_l2", "local",
                                    "accumulated", "why"],
                     ([r.order, r.key, r.verdict, num(r.local.rel_l2) if r.local else "-",
                       r.local_status, r.accumulated.status if r.accumulated else "-",
                       r.local_reason] for r in rows))

    def of(self, verdict: str) -> list[IsolateRow]:
        return [r for r in self.rows if r.verdict == verdict]

    @property
    def culprits(self) -> list[IsolateRow]:
        return self.of("culprit")

    @property
    def unknown(self) -> list[IsolateRow]:
        return self.of("unknown")

    @property
    def summary(self) -> str:
        n = {v: len(self.of(v)) for v in VERDICTS}
        if self.culprits:
            head = f"culprit: {self.culprits[0].key} ({self.culprits[0].local_reason})"
        elif self.target_problems:
            p = self.target_problems[0]
            head = (f"no module alone is a culprit, yet the target run has "
                    f"{len(self.target_problems)} OVERFLOW/NAN record(s), first {p.key} "
                    f"({p.status}: {p.reason})")
            if self.unknown:
                u = self.unknown[0]
                head += f"; {u.key} could not be re-run ({u.local_reason})"
        else:
            head = "no module is beyond the profile on its own"
        skipped = f", {self.skipped} without a floating output" if self.skipped else ""
        return (f"{'PASS' if self else 'FAIL'} [{self.profile.name}]: {head}; "
                f"{n['culprit']} culprit(s), {n['encloses']} enclosing, {n['inherited']} "
                f"inherited, {n['unknown']} unknown; {self.calls} module calls re-run"
                f"{skipped}")


@dataclass
class _Call:
    """One module call of the recording run (or, with ``held``, of the probe)."""

    module: str
    call: int
    start: int
    end: int = -1
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    held: dict[str, torch.dtype] = field(default_factory=dict)


def isolate(base: str | os.PathLike[str] | Dump, model: str, *, dtype: str = "fp16",
            device: str = "cpu", keep_fp32: Sequence[str] = ("none",),
            target: str | os.PathLike[str] | Dump | None = None) -> IsolateReport:
    """Local error of every module call, next to the accumulated error of ``target``."""
    b = base if isinstance(base, Dump) else load(base)
    if not any(k.startswith(INPUT_PREFIX) for k in b.tensors):
        raise InputError(f"{b.path.name} holds no model inputs (input:* records) to re-run "
                         "the model on: take the baseline with `precision capture`")
    dt = canonical(dtype)
    prof = profile_for("float32", dt)
    accumulated: dict[str, Row] = {}
    problems: tuple[Row, ...] = ()
    if target is not None:
        rows = compare(b, target).rows
        accumulated = {r.key: r for r in rows}
        problems = tuple(r for r in rows if r.status in RANGE_STATUSES)
    calls, notes = _record(b, model, device)
    loaded = load_model(model, dtype=dt, device=device, policy=Policy.parse(keep_fp32))
    held, probe_note = _probe(loaded.model, b, device, dt)
    notes += [probe_note] if probe_note else []
    modules = dict(loaded.model.named_modules())
    target_dtype = TORCH_DTYPES[dt]
    results: list[_Result] = []
    skipped = 0
    for c in calls:
        if not c.outputs:
            skipped += 1
            continue
        results.append(_rerun(b, c, modules[c.module], held.get((c.module, c.call), {}),
                              target_dtype, device, prof))
    _mark_enclosing(results)
    out: list[IsolateRow] = []
    for res in results:
        for r in res.rows:
            acc = accumulated.get(r.key)
            e = b.entry(r.key)
            verdict = r.verdict
            if verdict == "ok" and acc is not None and acc.flagged:
                verdict = "inherited"
            out.append(replace(r, order=e.order if e is not None else -1, accumulated=acc,
                               verdict=verdict))
    return IsolateReport(prof, tuple(out), len(results), skipped, problems, tuple(notes))


# ---------------------------------------------------------------- passes 1 and 2


def _record(b: Dump, model: str, device: str) -> tuple[list[_Call], list[str]]:
    """Pass 1: every module call's arguments and fp32 outputs, in the order calls end."""
    loaded = load_model(model, dtype="float32", device=device, policy=Policy())
    require_same_model(b, loaded.model, b.path.name)
    notes = []
    ours = loaded.loading.get("weights_fingerprint")
    theirs = (b.meta.get("model") or {}).get("weights_fingerprint")
    if ours and theirs and ours != theirs:
        notes.append(f"{b.path.name} was captured from other weights than {model}: the "
                     "local columns are this model's, the accumulated ones that run's")
    inputs = replay_inputs(b, device, torch.float32)
    try:
        calls = _hooked_run(loaded.model, inputs, record=True)
    except (RuntimeError, ValueError, NotImplementedError, TypeError) as exc:
        raise InputError(f"the model failed to run in fp32 on {device} on the inputs of "
                         f"{b.path.name}: {one_line(exc)}") from None
    del loaded
    gc.collect()
    return calls, notes


def _probe(model: torch.nn.Module, b: Dump, device: str, dtype: str
           ) -> tuple[dict[tuple[str, int], dict[str, torch.dtype]], str]:
    """Pass 2: the dtype each floating argument of each call arrives in, in the target run;
    empty (every argument in the target dtype) with a note when that run fails."""
    inputs = replay_inputs(b, device, TORCH_DTYPES[dtype])
    try:
        calls = _hooked_run(model, inputs, record=False)
    except (RuntimeError, ValueError, NotImplementedError, TypeError) as exc:
        return {}, (f"the full run in {short(dtype)} failed ({one_line(exc)}): every "
                    f"floating argument is taken as held in {short(dtype)}")
    return {(c.module, c.call): c.held for c in calls}, ""


def _hooked_run(model: torch.nn.Module, inputs: dict[str, torch.Tensor], *,
                record: bool) -> list[_Call]:
    """Run ``model`` once with hooks on every module; ``record``: keep arguments and
    outputs, else only the dtypes floating arguments arrive in."""
    clones = _Clones()
    counts: dict[str, int] = {}
    running: dict[str, list[_Call]] = {}
    done: list[_Call] = []
    tick = itertools.count()

    def pre(name: str) -> Callable[..., None]:
        def hook(mod: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            n = counts.get(name, 0)
            counts[name] = n + 1
            c = _Call(name, n, next(tick))
            if record:
                c.args, c.kwargs = clones.keep(args), clones.keep(kwargs)
            else:
                c.held = {p: t.dtype for p, t in flatten((args, kwargs))
                          if t.is_floating_point()}
                done.append(c)
            running.setdefault(name, []).append(c)
        return hook

    def post(name: str) -> Callable[..., None]:
        def hook(mod: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                 output: Any) -> None:
            c = running[name].pop()
            c.end = next(tick)
            c.outputs = {idx: clones.clone(t) for idx, t in flatten(output)
                         if t.is_floating_point()}
            done.append(c)
        return hook

    handles = []
    for name, mod in select_modules(model):
        # prepend: see the arguments before a kept module's own upcast (keep_fp32)
        handles.append(mod.register_forward_pre_hook(pre(name), with_kwargs=True,
                                                     prepend=True))
        if record:
            handles.append(mod.register_forward_hook(post(name), with_kwargs=True))
    try:
        with torch.no_grad():
            model(**inputs, **_no_cache(model))
    finally:
        for h in handles:
            h.remove()
    return done


def _no_cache(model: torch.nn.Module) -> dict[str, Any]:
    """``use_cache=False`` where the model's forward takes it."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


def _is_cache(value: Any) -> bool:
    """A transformers KV cache object (``DynamicCache``, ``EncoderDecoderCache``...)."""
    kind = type(value)
    return kind.__module__.startswith("transformers") and kind.__name__.endswith("Cache")


def _version(t: torch.Tensor) -> int | None:
    try:
        return int(t._version)
    except RuntimeError:  # inference-mode tensors have no version counter
        return None


class _Clones:
    """Host copies of the tensors a run passes around, each tensor object copied once while
    it is unchanged (its in-place version counter says so)."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[Any, int | None, torch.Tensor]] = {}

    def clone(self, t: torch.Tensor) -> torch.Tensor:
        version = _version(t)
        hit = self._seen.get(id(t))
        if hit is not None and hit[0]() is t and version is not None and hit[1] == version:
            return hit[2]
        copied = t.detach().to("cpu", copy=True)
        self._seen[id(t)] = (weakref.ref(t), version, copied)
        return copied

    def keep(self, value: Any) -> Any:
        """``value`` with tensors copied (inside tuples, lists, dicts) and caches dropped."""
        if isinstance(value, torch.Tensor):
            return self.clone(value)
        if _is_cache(value):
            return None
        if type(value) is tuple:
            return tuple(self.keep(v) for v in value)
        if type(value) is list:
            return [self.keep(v) for v in value]
        if type(value) is dict:
            return {k: self.keep(v) for k, v in value.items()}
        return value


def _map(value: Any, fn: Callable[[str, torch.Tensor], torch.Tensor], prefix: str = "") -> Any:
    """``value`` with each tensor replaced by ``fn(path, tensor)``; paths as
    :func:`~precision.runtime.capture.trees.flatten` names them."""
    if isinstance(value, torch.Tensor):
        return fn(prefix, value)
    if isinstance(value, dict):
        return {k: _map(v, fn, f"{prefix}.{k}" if prefix else str(k)) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        items = [_map(v, fn, f"{prefix}.{i}" if prefix else str(i)) for i, v in enumerate(value)]
        return tuple(items) if isinstance(value, tuple) else items
    return value


# ---------------------------------------------------------------- pass 3


@dataclass
class _Result:
    """One call re-run: its rows, and as a culprit how severe (0: not one)."""

    call: _Call
    rows: list[IsolateRow]
    severity: int = 0


def _rerun(b: Dump, c: _Call, mod: torch.nn.Module, held: dict[str, torch.dtype],
           dtype: torch.dtype, device: str, prof: Profile) -> _Result:
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

    def unknown(why: str) -> _Result:
        return _Result(c, [IsolateRow(-1, k, None, "ERROR", why, None, "unknown",
                                      tally["overflowed"]) for k in keys.values()])

    try:
        args, kwargs = _map((c.args, c.kwargs), cast)
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
    res = _Result(c, [])
    for idx, ref in c.outputs.items():
        y = got[idx]
        key = keys[idx]
        local = _measure(b, key, ref, y)
        status, reason = judge(local, prof)
        verdict = "ok"
        severity = 0
        if implied is not None:
            own = _own_damage(b, key, y, implied.get(idx), device)
            given = _inputs_text(overflowed, not_finite, dtype)
            if own:
                verdict, severity = "culprit", 2
                reason = (f"{given}, yet alone it makes {own} inf/NaN/pinned values where an "
                          "fp32 copy of it on the same inputs stays finite")
            else:  # the local status column says what it did alone
                verdict, reason = "inherited", f"{given}; no worse than that implies"
        elif status != "OK":
            verdict, severity = "culprit", 2 if status in RANGE_STATUSES else 1
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
    up = _map((args, kwargs), lambda _p, t: t.float() if t.is_floating_point() else t)
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


def _mark_enclosing(results: list[_Result]) -> None:
    """A culprit call around another culprit call at least as severe becomes ``encloses``:
    the error is made inside it."""
    culprits = [r for r in results if r.severity]

    def inside(inner: _Result, outer: _Result) -> bool:
        return outer.call.start < inner.call.start and inner.call.end < outer.call.end

    demoted = {id(r) for r in culprits
               if any(inside(o, r) and o.severity >= r.severity for o in culprits)}
    makers = {id(r): next(o for o in culprits if id(o) not in demoted and inside(o, r)
                          and o.severity >= r.severity)
              for r in culprits if id(r) in demoted}
    for r in culprits:
        maker = makers.get(id(r))
        if maker is None:
            continue
        first = next(row.key for row in maker.rows if row.verdict == "culprit")
        r.rows = [replace(row, verdict="encloses", local_reason=f"made inside it, by {first}")
                  if row.verdict == "culprit" else row for row in r.rows]
        r.severity = 0

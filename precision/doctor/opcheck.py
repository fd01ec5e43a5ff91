"""``precision check``: every recorded operation run again on the CPU on the inputs it was given.

From one dump of ``capture --level ops --inputs GLOB`` (full mode), each operation whose
inputs and call were recorded (``op_call`` in its entry, docs/format.md) is run again with
those exact inputs: in float64 on the CPU (the golden output) and in the recorded dtype on
the CPU (what that dtype costs there). Error is local: the inputs are the device's own, so
nothing accumulated upstream counts; no baseline run and no model are needed.

For an output ``o`` against the golden ``g`` (elements finite in both)::

    err(o)   = ||o - g||_2 / ||g||_2              (relative L2)
    worst(o) = max|o - g| / max|g|

An operation is **DRIFT** when the device's ``err`` is beyond ``max(3 x the CPU's, eps)``
or its ``worst`` beyond ``max(8 x the CPU's, 16 eps)`` (eps of the recorded dtype: the
ratios and floors of the reference rules, docs/verdicts.md, as Ascend's operator accuracy
standard compares a device's error with a CPU's in the same precision), and **OVERFLOW**
when its output holds inf or NaN where the golden is finite (the reason says whether the
CPU's run in that dtype overflows too: the format's range, not the kernel).
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..dtypes import canonical, float_format
from ..dumps import load
from ..dumps.dump import Dump
from ..dumps.keys import make_key, parse_key
from ..errors import InputError
from ..judge.html import Summarised
from ..judge.profiles import REF_FLOOR_MAX_EPS, REF_FLOOR_RMS_EPS, REF_MAX_RATIO, REF_RMS_RATIO
from ..runtime.capture.ops import CALLABLE_HOMES
from ..runtime.capture.tensors import numpy_to_torch
from ..runtime.capture.trees import flatten


@dataclass(frozen=True)
class OpCheck:
    """One operation checked: its key, function, dtype, the device's and the CPU's errors
    against the float64 golden (``err``, ``worst``), and the verdict."""

    key: str
    func: str
    dtype: str
    status: str  # OK, DRIFT, OVERFLOW or SKIPPED
    reason: str
    device_err: float = math.nan
    cpu_err: float = math.nan
    device_worst: float = math.nan
    cpu_worst: float = math.nan

    @property
    def ratio(self) -> float:
        """The device's relative L2 error over the CPU's (floored at 1 eps / 3)."""
        floor = REF_FLOOR_RMS_EPS * float_format(self.dtype).eps / REF_RMS_RATIO
        return self.device_err / max(self.cpu_err, floor)


@dataclass(frozen=True, repr=False)
class CheckReport(Summarised):
    """Every checked operation of a dump, in execution order; falsy when one is flagged."""

    path: Path
    ops: tuple[OpCheck, ...]
    skipped_without_inputs: int = 0
    notes: tuple[str, ...] = field(default=())

    @property
    def flagged(self) -> list[OpCheck]:
        return [o for o in self.ops if o.status in ("DRIFT", "OVERFLOW")]

    @property
    def first(self) -> OpCheck | None:
        return next(iter(self.flagged), None)

    def __bool__(self) -> bool:
        return not self.flagged

    @property
    def summary(self) -> str:
        checked = [o for o in self.ops if o.status != "SKIPPED"]
        counts = ", ".join(f"{sum(o.status == s for o in self.ops)} {s}"
                           for s in ("OK", "DRIFT", "OVERFLOW", "SKIPPED")
                           if any(o.status == s for o in self.ops))
        first = self.first
        if first is None:
            return (f"PASS: {len(checked)} operation(s) within what their dtype costs on the "
                    f"CPU; {counts or 'none checked'}")
        return f"FAIL: first {first.key} ({first.status}: {first.reason}); {counts}"


#: the operators a Tensor's dunder methods compute (``__rsub__``, ``__iadd__``); no other
#: name with a leading underscore (``__reduce_ex__``, ``_make_subclass``) is ever run
ARITHMETIC = frozenset({"add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul",
                        "neg", "abs", "and", "or", "xor"})


@functools.lru_cache(maxsize=1)
def _operations() -> frozenset[Any]:
    """What a TorchFunctionMode can see: torch's overridable functions and Tensor methods."""
    return frozenset(f for funcs in torch.overrides.get_overridable_functions().values()
                     for f in funcs)


def resolve(path: str) -> Callable[..., Any]:
    """The function a recorded ``op_call`` names, if it is one of torch's operations (what
    a capture can record, never ``torch.load`` and the like) in one of
    :data:`precision.runtime.capture.ops.CALLABLE_HOMES`: a dump makes us run nothing else."""
    home, _, name = path.rpartition(".")
    refused = InputError(f"operation {path!r} is not a torch function precision can run")
    if home not in CALLABLE_HOMES or not name.isidentifier() or (
            name.startswith("_") and name.strip("_").removeprefix("r").removeprefix("i")
            not in ARITHMETIC):
        raise refused
    where: Any = torch.Tensor if home == "Tensor" else importlib.import_module(home)
    func = getattr(where, name, None)
    if func is None or func not in _operations():
        raise refused
    return func


def _arguments(spec: Any, tensor: Callable[[str], torch.Tensor], wide: bool) -> Any:
    """Rebuild recorded arguments; ``wide`` turns floating tensors and dtypes into float64."""
    if isinstance(spec, dict) and "tensor" in spec:
        t = tensor(str(spec["tensor"])).clone()
        return t.double() if wide and t.is_floating_point() else t
    if isinstance(spec, dict) and "dtype" in spec:
        dt = getattr(torch, canonical(str(spec["dtype"])), None)
        if not isinstance(dt, torch.dtype):
            raise InputError(f"dtype {spec['dtype']!r} in a recorded call")
        return torch.float64 if wide and dt.is_floating_point else dt
    if isinstance(spec, dict) and "list" in spec:
        return [_arguments(v, tensor, wide) for v in spec["list"]]
    if spec is None or isinstance(spec, (bool, int, float, str)):
        return spec
    raise InputError(f"unreadable recorded argument {spec!r}")


def _errors(out: torch.Tensor, gold: torch.Tensor) -> tuple[float, float]:
    """(relative L2 error, worst error over max|golden|) over elements finite in both."""
    o, g = out.double().reshape(-1), gold.double().reshape(-1)
    keep = torch.isfinite(o) & torch.isfinite(g)
    d = (o - g)[keep]
    norm_g = float(torch.linalg.vector_norm(g[keep]))
    max_g = float(g[keep].abs().max()) if bool(keep.any()) else 0.0
    err = float(torch.linalg.vector_norm(d)) / norm_g if norm_g else float(d.abs().sum() > 0)
    worst = float(d.abs().max()) / max_g if max_g else 0.0
    return err, worst


def _first_float(value: Any, index: str) -> torch.Tensor | None:
    return next((t for i, t in flatten(value) if i == index), None)


def check_op(d: Dump, entry: dict[str, Any]) -> OpCheck:
    """Run one recorded operation again (see the module docstring) and judge it."""
    key = str(entry["key"])
    k = parse_key(key)
    call, index, dtype = entry["op_call"], k.index, str(entry.get("dtype", "float32"))
    name = f"{k.module}/{k.op}"

    def tensor(path: str) -> torch.Tensor:
        stored = make_key(name, "in", path, k.call)
        if stored not in d:
            raise InputError(f"{key}: its input {stored} is not in the dump")
        return numpy_to_torch(d[stored])

    func_name = str(call.get("func"))
    func = resolve(func_name)
    runs = {}
    for label, wide in (("golden", True), ("cpu", False)):
        args = [_arguments(a, tensor, wide) for a in call.get("args", [])]
        kwargs = {str(n): _arguments(v, tensor, wide) for n, v in call.get("kwargs", {}).items()}
        try:
            with torch.no_grad():
                runs[label] = _first_float(func(*args, **kwargs), index)
        except Exception as exc:  # an op the CPU lacks in this dtype: skipped, and said
            first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
            return OpCheck(key, func_name, dtype, "SKIPPED",
                           f"does not run on the CPU in {'float64' if wide else dtype}: "
                           f"{type(exc).__name__}: {first}")
    gold, cpu = runs["golden"], runs["cpu"]
    if gold is None or cpu is None:
        return OpCheck(key, func_name, dtype, "SKIPPED", "no output at its recorded index")
    device = numpy_to_torch(d[key])
    if device.shape != gold.shape:
        return OpCheck(key, func_name, dtype, "SKIPPED",
                       f"shape {list(device.shape)} where the CPU makes {list(gold.shape)}")
    (dev_err, dev_worst), (cpu_err, cpu_worst) = _errors(device, gold), _errors(cpu, gold)
    measured = {"device_err": dev_err, "cpu_err": cpu_err, "device_worst": dev_worst,
                "cpu_worst": cpu_worst}
    finite_gold = torch.isfinite(gold)
    blown = int((~torch.isfinite(device.double()) & finite_gold).sum())
    if blown:
        cpu_blown = int((~torch.isfinite(cpu.double()) & finite_gold).sum())
        why = (f"{blown} inf/NaN where float64 is finite; the CPU in {dtype} makes "
               f"{cpu_blown}" + (": the format's range" if cpu_blown >= blown else
                                 ": the device's kernel, not the format"))
        return OpCheck(key, func_name, dtype, "OVERFLOW", why, **measured)
    eps = float_format(dtype).eps
    limit = max(REF_RMS_RATIO * cpu_err, REF_FLOOR_RMS_EPS * eps)
    if dev_err > limit:
        return OpCheck(key, func_name, dtype, "DRIFT",
                       f"error {dev_err:.3g}, {dev_err / max(cpu_err, 1e-300):.3g}x the CPU's "
                       f"{cpu_err:.3g} in {dtype} (> {limit:.3g})", **measured)
    limit = max(REF_MAX_RATIO * cpu_worst, REF_FLOOR_MAX_EPS * eps)
    if dev_worst > limit:
        return OpCheck(key, func_name, dtype, "DRIFT",
                       f"worst element off by {dev_worst:.3g} of max|x|, the CPU's "
                       f"{cpu_worst:.3g} in {dtype} (> {limit:.3g})", **measured)
    return OpCheck(key, func_name, dtype, "OK", f"{dev_err:.3g} vs the CPU's {cpu_err:.3g}",
                   **measured)


def recorded_calls(d: Dump) -> Iterator[dict[str, Any]]:
    """The entries that hold a replayable operation call, in execution order."""
    for entry in d.meta.get("entries") or ():
        if isinstance(entry, dict) and isinstance(entry.get("op_call"), dict) \
                and "alias_of" not in entry:
            yield entry


def check(path: str | Path, *, log: Callable[[str], None] = lambda _m: None) -> CheckReport:
    """Check every operation of the dump at ``path`` that has its call and inputs recorded."""
    d = load(path)
    if d.mode != "full":
        raise InputError(f"{Path(path).name} is a {d.mode}-mode dump: check needs the "
                         "operations' inputs whole (capture --level ops --inputs GLOB, "
                         "--mode full)")
    entries = list(recorded_calls(d))
    ops_without = sum(1 for e in d.entries if parse_key(e.key).op and e.kind == "out"
                      and not e.alias_of) - len(entries)
    if not entries:
        raise InputError(f"{Path(path).name} holds no operation with its inputs: capture "
                         "with --level ops --inputs GLOB (e.g. --inputs '*')")
    log(f"running {len(entries)} operation(s) again on the CPU in float64 and their dtype")
    return CheckReport(Path(path), tuple(check_op(d, e) for e in entries),
                       skipped_without_inputs=max(ops_without, 0))

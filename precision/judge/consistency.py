"""Self-consistency: do repeated runs on the same device give the same numbers?

Seed 001 checks that bf16 greedy decoding is deterministic. :func:`consistency_of` compares
dumps of repeated runs of the same inputs against the first, tensor by tensor: bitwise
identity (raw bytes, so NaN payloads and signed zeros count too), otherwise the largest
absolute deviation. The generated tokens are compared the same way.

An engine's runs (``precision.vllm``) that batched the same tokens into different steps
(vLLM's scheduler admits prompts as they arrive) hold tensors of other shapes: they are
compared token by token instead, each unpacked into Hugging Face's keys and layout
(:func:`precision.engines.vllm.lineup.translate`), and a note says so. A kernel that is not
batch-invariant then shows as a deviation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..dumps.dump import Dump
from ..dumps.keys import GEN_PREFIX
from ..engines.vllm import lineup as engine_lineup
from ..engines.vllm import unpack
from .html import Summarised

CHUNK = 1 << 18


@dataclass(frozen=True)
class Deviation:
    """A tensor that is not bitwise identical across runs."""

    order: int
    key: str
    runs_differing: int
    max_abs: float
    elements_differing: int


@dataclass(frozen=True, repr=False)
class ConsistencyReport(Summarised):
    """Truthy when every run is bitwise identical to the first."""

    runs: int
    tensors: int
    deviations: tuple[Deviation, ...]
    #: how the runs were compared, where it is not plain
    notes: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return not self.deviations

    @property
    def summary(self) -> str:
        if not self.deviations:
            return (f"PASS: {self.runs} runs bitwise identical across {self.tensors} tensors "
                    "(generated tokens included)")
        worst = max(self.deviations, key=lambda d: d.max_abs)
        first = min(self.deviations, key=lambda d: d.order)
        gen = next((d for d in self.deviations if d.key == GEN_PREFIX + "tokens"), None)
        return (f"FAIL: {len(self.deviations)} of {self.tensors} tensors differ between "
                f"{self.runs} runs; first {first.key}, largest deviation {worst.max_abs:.3g} "
                f"at {worst.key}" + ("; generated tokens differ" if gen else ""))


def consistency_of(dumps: Sequence[Dump]) -> ConsistencyReport:
    """Compare every stored tensor of ``dumps[1:]`` with ``dumps[0]`` (an engine's runs
    batched differently: token by token, see the module doc)."""
    notes: tuple[str, ...] = ()
    if engine_lineup.engine_of(dumps[0]) and not _same_schedule(dumps):
        steps = ", ".join(f"{d.path.name} {_steps(d)}" for d in dumps)
        notes = (f"the runs batched the tokens into different engine steps ({steps}): "
                 "compared token by token, in Hugging Face's keys",)
        dumps = [engine_lineup.translate(d).dump for d in dumps]
    first = dumps[0]
    order = {e.key: e.order for e in first.entries}
    devs = []
    for key, info in first.tensors.items():
        differing, worst, elements = 0, 0.0, 0
        for other in dumps[1:]:
            same, dev, n = _diff(first, other, key, info.numel)
            if not same:
                differing += 1
                worst = max(worst, dev)
                elements = max(elements, n)
        if differing:
            devs.append(Deviation(order.get(key, len(order)), key, differing, worst, elements))
    devs.sort(key=lambda d: d.order)
    return ConsistencyReport(len(dumps), len(first.tensors), tuple(devs), notes)


def _schedule(d: Dump) -> list[np.ndarray]:
    """Each engine step's positions and sequence starts, in order."""
    keys = sorted((k for k in d.tensors if k.startswith(unpack.ENGINE + ":in.")
                   and ".input_ids" not in k), key=lambda k: (len(k), k))
    return [np.asarray(d[k]) for k in keys]


def _same_schedule(dumps: Sequence[Dump]) -> bool:
    first = _schedule(dumps[0])
    return all(len(s) == len(first) and all(np.array_equal(a, b) for a, b in
                                            zip(s, first, strict=True))
               for s in (_schedule(d) for d in dumps[1:]))


def _steps(d: Dump) -> str:
    engine = d.meta.get("engine")
    n = engine.get("steps") if isinstance(engine, dict) else None
    return f"{n} steps" if n is not None else "steps unknown"


def _diff(a: Dump, b: Dump, key: str, numel: int) -> tuple[bool, float, int]:
    """(bitwise identical, max |a - b| over finite pairs or inf, elements that differ)."""
    if key not in b.tensors or b.tensors[key].shape != a.tensors[key].shape:
        return False, math.inf, numel
    same, worst, count = True, 0.0, 0
    for x, y in zip(a.chunks(key, CHUNK), b.chunks(key, CHUNK), strict=True):
        xb, yb = x.view(np.uint8).reshape(x.size, -1), y.view(np.uint8).reshape(y.size, -1)
        if xb.shape != yb.shape:
            return False, math.inf, numel
        neq = (xb != yb).any(axis=1)
        if neq.any():
            same = False
            count += int(neq.sum())
            with np.errstate(invalid="ignore"):
                d = np.abs(x[neq].astype(np.float64) - y[neq].astype(np.float64))
            worst = max(worst, float(np.nanmax(d)) if np.isfinite(d).any() else math.inf)
    return same, worst, count

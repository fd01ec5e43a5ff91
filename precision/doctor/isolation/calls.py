"""Passes 1 and 2 of :func:`~precision.doctor.isolation.isolate`: every module call of one
run of the model, with hooks on every module.

Pass 1 (:func:`record_calls`, fp32) keeps each call's arguments as they were (tensors copied
to host memory once per tensor object, caches dropped) and its fp32 outputs, with the order
calls start and end in (which call runs inside which). Pass 2 (:func:`probe_dtypes`, the
target dtype) notes only the dtype each floating argument arrives in.

These hooks are not the capture's recorder (:class:`~precision.runtime.capture.recorder.Capture`),
which streams module outputs to a dump: to call a module again they keep every argument of
every call in memory, keyword arguments, masks and flags included. They share its module
selection, tensor paths and in-place version counter (:mod:`precision.runtime.capture.selection`,
:mod:`~precision.runtime.capture.trees`, :mod:`~precision.runtime.capture.tensors`).
"""

from __future__ import annotations

import gc
import inspect
import itertools
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ...dtypes import short
from ...dumps.dump import Dump
from ...errors import InputError
from ...runtime.capture.selection import select_modules
from ...runtime.capture.tensors import tensor_version
from ...runtime.capture.trees import flatten
from ...runtime.models.identity import require_same_model
from ...runtime.models.load import TORCH_DTYPES, Policy, load_model, one_line
from ...runtime.run.runner import replay_inputs


@dataclass
class Call:
    """One module call of the recording run (or, with ``held``, of the probe)."""

    module: str
    call: int
    start: int
    end: int = -1
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    held: dict[str, torch.dtype] = field(default_factory=dict)


def record_calls(b: Dump, model: str, device: str) -> tuple[list[Call], list[str]]:
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


def probe_dtypes(model: torch.nn.Module, b: Dump, device: str, dtype: str
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
                record: bool) -> list[Call]:
    """Run ``model`` once with hooks on every module; ``record``: keep arguments and
    outputs, else only the dtypes floating arguments arrive in."""
    clones = _Clones()
    counts: dict[str, int] = {}
    running: dict[str, list[Call]] = {}
    done: list[Call] = []
    tick = itertools.count()

    def pre(name: str) -> Callable[..., None]:
        def hook(mod: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            n = counts.get(name, 0)
            counts[name] = n + 1
            c = Call(name, n, next(tick))
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


class _Clones:
    """Host copies of the tensors a run passes around, each tensor object copied once while
    it is unchanged (its in-place version counter says so)."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[Any, int | None, torch.Tensor]] = {}

    def clone(self, t: torch.Tensor) -> torch.Tensor:
        version = tensor_version(t)
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

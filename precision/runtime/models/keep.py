"""Keep chosen modules of a model in fp32 while the rest computes in fp16/bf16 (torch needed).

:func:`keep_fp32` works for any module: a whole decoder layer, an attention or MLP block, a
norm, an embedding, ``lm_head``, the members of a ``ModuleList``, a whole stack, whatever
its code does with dtypes. The contract (docs/fp16-overflow.md, "Keeping modules in fp32"):

- In: a kept module's parameters are fp32, and its floating inputs (positional or keyword,
  also inside tuples, lists, dicts and dataclasses) are upcast to fp32 on entry; integer
  inputs (token ids, bucket ids) stay integer. It computes what an fp32 copy of it computes
  on those inputs, to the bit.
- Out, ``hand_on="compute"``: its floating outputs (tensors, tuples, lists, dicts,
  dataclasses, ``ModelOutput`` fields) are handed back cast to the model's compute dtype,
  the dtype of its modules that are not kept: what the module's caller computes in.
- Out, ``hand_on="fp32"``: its main output (the tensor, or the first item of a tuple, dict
  or ``ModelOutput``: the hidden states) goes on in fp32, the others as for ``compute``, so
  that a residual stream that needs fp32's range keeps it. A Llama/Qwen3 decoder layer adds
  the residual in its own forward, where torch promotes fp16 + fp32 to fp32: the stream
  stays fp32 from there on. What computes on it stays in the compute dtype: every module
  outside the kept ones that holds parameters gets a pre-hook casting fp32 inputs to its own
  dtype (a ``Linear``'s input is a normalised value), and a normalisation layer (a class
  whose name holds ``Norm``), whose input is the stream itself, computes in fp32 with its
  weights upcast and hands its output on in its own dtype. Code without parameters between
  modules promotes as torch does, so an ``fp32`` output should reach adds and norms (a
  decoder layer's, an attention or MLP block's, an embedding's); a bare ``k_proj`` meets
  fp16 queries in ``sdpa`` and fails, where ``compute`` works.
- ``hand_on="auto"`` (the default): ``fp32`` for the modules the model's own code keeps in
  fp32 (``_keep_in_fp32_modules``, T5's ``wo``), whose callers are written for an fp32
  output, as transformers hands them on; ``compute`` for every other.
- A glob may carry the choice as a suffix: ``'model.layers.*:fp32'``, ``'*.mlp:compute'``
  (module names hold no ``:``).
- A key/value cache (``DynamicCache``, ``EncoderDecoderCache``, a static cache) stays in
  the compute dtype: the cache layers a kept module uses are upcast (exactly) while it runs,
  so it reads and appends in fp32, and cast back when it returns; a cache it returns is cast
  too. The next step's ``torch.cat`` finds the dtype it expects.
- A module sharing a parameter with a kept one (``lm_head`` tied to the embedding) holds
  fp32 weights too, so it is kept as well, with the same ``hand_on``.

Call it after the model is cast to its compute dtype (``model.half()``, then
``keep_fp32``); calling it again adds modules or changes a kept module's ``hand_on``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ...errors import InputError, option

HAND_ON = ("auto", "compute", "fp32")
_STATE = "_precision_keep_fp32"  # per model: _ModelState
_KEPT = "_precision_kept"  # per kept module: _Kept
_CONSUMER = "_precision_consumer"  # per downstream module: _Consumer


@dataclasses.dataclass
class _ModelState:
    compute: torch.dtype  # fixed by the first call: what the modules not kept hold


@dataclasses.dataclass
class _Kept:
    hand_on: str  # "compute" or "fp32", resolved
    compute: torch.dtype
    layers: frozenset[int] | None  # cache layers it uses (None: all)
    name: str = ""  # in the model, for the error of a model cast after keep_fp32
    caches: list[list[Any]] = dataclasses.field(default_factory=list)  # per open call


@dataclasses.dataclass
class _Consumer:
    compute: torch.dtype  # the model's; what a module with buffers alone computes in
    norm: bool
    saved: list[dict[str, torch.nn.Parameter] | None] = dataclasses.field(default_factory=list)


def split_pattern(pattern: str) -> tuple[str, str | None]:
    """``'GLOB:fp32'`` -> ``('GLOB', 'fp32')``; a glob without a suffix -> ``(GLOB, None)``."""
    glob, sep, suffix = pattern.rpartition(":")
    if not sep:
        return pattern, None
    if suffix not in HAND_ON or not glob:
        raise InputError(f"{option('--keep-fp32', 'keep_fp32')} {pattern}: after ':' comes how "
                         "outputs are handed on, "
                         f"one of {', '.join(HAND_ON)} (e.g. 'model.layers.*:fp32')")
    return glob, suffix


def keep_fp32(model: torch.nn.Module, patterns: Sequence[str], *,
              hand_on: str = "auto") -> list[str]:
    """Keep the modules whose names match ``patterns`` in fp32; returns their names.

    ``patterns`` are globs over ``model.named_modules()`` names, each optionally suffixed
    with ``:fp32``/``:compute``/``:auto`` (overriding ``hand_on`` for it). Floating inputs
    are upcast to fp32 on entry; outputs go on in the model's compute dtype (``compute``)
    or in fp32 (``fp32``, for a residual stream that needs fp32's range); ``auto`` is
    ``fp32`` for the modules the model's class keeps in fp32 itself (T5's ``wo``) and
    ``compute`` otherwise. See this module's docstring for the whole contract.
    """
    if hand_on not in HAND_ON:
        raise InputError(f"hand_on={hand_on!r}: one of {', '.join(HAND_ON)}")
    parsed = [split_pattern(p) for p in patterns]
    state = getattr(model, _STATE, None)
    named = list(model.named_modules())
    before = list(kept_modules(model))
    matched: list[tuple[str, torch.nn.Module, str]] = []
    for name, mod in named:
        if not name:
            continue
        how = next((h or hand_on for g, h in parsed if fnmatch.fnmatchcase(name, g)), None)
        if how is None or any(name.startswith(k + ".") for k, _, _ in matched) or any(
                name.startswith(k + ".") for k in before):
            continue
        matched.append((name, mod, how))
    if not matched:
        raise InputError(f"{option('--keep-fp32', 'keep_fp32')} {' '.join(patterns)} matches "
                         "no module: "
                         "check the names with `precision inspect` on a dump")
    if state is None:
        state = _ModelState(_compute_dtype(model, {n for n, _, _ in matched}))
        object.__setattr__(model, _STATE, state)
    own = _own_fp32(model)
    kept_params = {id(p) for _, mod, _ in matched for p in mod.parameters()}
    for _, mod, _ in matched:
        mod.float()
    # a module sharing a parameter with a kept one now holds fp32 weights: keep it too
    covered = [n for n, _, _ in matched]
    for name, mod in named:
        if (name and not _inside(name, covered) and getattr(mod, _KEPT, None) is None
                and any(id(p) in kept_params for p in mod.parameters(recurse=False))):
            how = next(h for n, m, h in matched
                       if any(p is q for p in m.parameters() for q in mod.parameters(False)))
            matched.append((name, mod, how))
            covered.append(name)
    for name, mod, how in matched:
        resolved = how if how != "auto" else ("fp32" if _is_own(name, own) else "compute")
        _keep_one(mod, name, resolved, state.compute)
    if state.compute != torch.float32 and any(
            getattr(m, _KEPT).hand_on == "fp32" for _, m, _ in matched):
        _hook_consumers(model, state)
    return [name for name, _, _ in matched]


def kept_modules(model: torch.nn.Module) -> dict[str, str]:
    """Name -> hand-on (``compute``/``fp32``) of every module :func:`keep_fp32` keeps."""
    return {name: getattr(mod, _KEPT).hand_on for name, mod in model.named_modules()
            if getattr(mod, _KEPT, None) is not None}


def _inside(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _compute_dtype(model: torch.nn.Module, kept: set[str]) -> torch.dtype:
    """The floating dtype holding most parameters outside the kept modules (else overall)."""
    counts: dict[torch.dtype, int] = {}
    overall: dict[torch.dtype, int] = {}
    skip = sorted(kept | set(kept_modules(model)))
    seen: set[int] = set()
    for name, mod in model.named_modules():
        outside = not _inside(name, skip) if name else True
        for p in mod.parameters(recurse=False):
            if not p.is_floating_point() or id(p) in seen:
                continue
            seen.add(id(p))
            overall[p.dtype] = overall.get(p.dtype, 0) + p.numel()
            if outside:
                counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    pick = counts or overall
    return max(pick, key=lambda d: pick[d]) if pick else torch.float32


def _own_fp32(model: torch.nn.Module) -> list[str]:
    """Module names the model's own class keeps in fp32 (``_keep_in_fp32_modules``)."""
    names: list[str] = []
    for mod in model.modules():
        for attr in ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict"):
            value = getattr(mod, attr, None)
            if isinstance(value, (list, tuple, set)):
                names += [str(v) for v in value if str(v) not in names]
    return names


def _is_own(name: str, own: Sequence[str]) -> bool:
    return any(name == n or name.endswith("." + n) for n in own)


def _keep_one(mod: torch.nn.Module, name: str, hand_on: str, compute: torch.dtype) -> None:
    existing = getattr(mod, _KEPT, None)
    if existing is not None:
        existing.hand_on = hand_on
        return
    indices = {i for m in mod.modules() if isinstance(i := getattr(m, "layer_idx", None), int)}
    object.__setattr__(mod, _KEPT, _Kept(hand_on, compute, frozenset(indices) or None, name))
    mod.register_forward_pre_hook(_kept_pre, with_kwargs=True)
    mod.register_forward_hook(_kept_post, with_kwargs=True, always_call=True)


# ------------------------------------------------------------------ kept modules


def _kept_pre(module: torch.nn.Module, args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    kept: _Kept = getattr(module, _KEPT)
    weight = next(module.parameters(), None)
    if weight is not None and weight.is_floating_point() and weight.dtype != torch.float32:
        raise InputError(f"{kept.name} was kept in fp32 by keep_fp32, but the model was cast "
                         f"after that (its weights are {str(weight.dtype).removeprefix('torch.')}"
                         f"): call precision.keep_fp32 after model.half() or .to(dtype)")
    caches = list(_caches((args, kwargs)))
    if kept.compute != torch.float32:
        for cache in caches:
            _recast_cache(cache, kept.compute, torch.float32, kept.layers)
    kept.caches.append(caches)
    return _map(args, _upcast), _map(kwargs, _upcast)


def _kept_post(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
               output: Any) -> Any:
    kept: _Kept = getattr(module, _KEPT)
    caches = kept.caches.pop() if kept.caches else []
    if kept.compute == torch.float32:
        return None
    for cache in caches:
        _recast_cache(cache, torch.float32, kept.compute, kept.layers)
    for cache in _caches(output):
        _recast_cache(cache, torch.float32, kept.compute, None)
    if output is None:
        return None
    cast = _caster(kept.compute)
    if kept.hand_on == "fp32":  # the main output goes on in fp32, the others do not
        main = _main(output)
        return _map(output, lambda t: t if t is main else cast(t))
    return _map(output, cast)


def _main(value: Any) -> torch.Tensor | None:
    """A module's main output: the tensor itself, or the first item of a tuple, list, dict,
    ``ModelOutput`` or dataclass (``hidden_states``, ``attn_output``, ``last_hidden_state``)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return _main(value[0]) if value else None
    if isinstance(value, dict):
        return next((_main(v) for v in value.values() if v is not None), None)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return next((_main(getattr(value, f.name)) for f in dataclasses.fields(value)
                     if getattr(value, f.name) is not None), None)
    return None


def _upcast(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point() and torch.finfo(t.dtype).bits < 32:
        return t.float()
    return t


def _map(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` applied to every tensor in ``value`` (tuples, lists, dicts, dataclasses,
    ``ModelOutput``s, modified in place); other objects (caches) are passed as they are."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        items = [_map(v, fn) for v in value]
        if all(a is b for a, b in zip(items, value, strict=True)):
            return value
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, list):
        return [_map(v, fn) for v in value]
    if isinstance(value, dict):
        if dataclasses.is_dataclass(value):  # a ModelOutput: a dataclass and a dict at once
            for k in list(value.keys()):
                new = _map(value[k], fn)
                if new is not value[k]:
                    value[k] = new
            return value
        out = {k: _map(v, fn) for k, v in value.items()}
        return out if type(value) is dict else type(value)(out)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {}
        for f in dataclasses.fields(value):
            if f.init:
                old = getattr(value, f.name)
                new = _map(old, fn)
                if new is not old:
                    changes[f.name] = new
        return dataclasses.replace(value, **changes) if changes else value
    return value


# ------------------------------------------------------------------ caches


def _is_cache(obj: Any) -> bool:
    return callable(getattr(obj, "get_seq_length", None)) and (
        hasattr(obj, "layers") or hasattr(obj, "self_attention_cache"))


def _caches(value: Any, depth: int = 0) -> Iterator[Any]:
    """The key/value caches in ``value`` and its tuples, lists and dicts (three levels)."""
    if _is_cache(value):
        yield value
    elif depth < 3 and isinstance(value, (tuple, list)):
        for v in value:
            yield from _caches(v, depth + 1)
    elif depth < 3 and isinstance(value, dict):
        for v in value.values():
            yield from _caches(v, depth + 1)


def _recast_cache(cache: Any, src: torch.dtype, dst: torch.dtype,
                  layers: frozenset[int] | None) -> None:
    """Cast the ``src`` tensors of ``cache``'s layers (``layers`` only, when given) to ``dst``."""
    for attr in ("self_attention_cache", "cross_attention_cache"):
        sub = getattr(cache, attr, None)
        if sub is not None and sub is not cache:
            _recast_cache(sub, src, dst, layers)
    items = getattr(cache, "layers", None)
    if not isinstance(items, list):
        return
    for i, layer in enumerate(items):
        if layers is not None and i not in layers:
            continue
        for key, value in list(vars(layer).items()):
            if isinstance(value, torch.Tensor) and value.dtype == src:
                setattr(layer, key, value.to(dst))


# ------------------------------------------------------------------ downstream of fp32 outputs


def _hook_consumers(model: torch.nn.Module, state: _ModelState) -> None:
    """Pre-hooks on every module outside the kept ones that holds parameters (or buffers):
    fp32 inputs are cast to its dtype on entry, or, for a norm, it computes in fp32."""
    kept = [n for n, m in model.named_modules() if getattr(m, _KEPT, None) is not None]
    for name, mod in model.named_modules():
        if _inside(name, kept) or getattr(mod, _CONSUMER, None) is not None:
            continue
        params = [p for p in mod.parameters(recurse=False) if p.is_floating_point()]
        buffers = [b for b in mod.buffers(recurse=False) if b.is_floating_point()]
        if not params and not buffers:
            continue
        norm = bool(params) and "norm" in type(mod).__name__.lower()
        object.__setattr__(mod, _CONSUMER, _Consumer(state.compute, norm))
        mod.register_forward_pre_hook(_consumer_pre, with_kwargs=True)
        if norm:
            mod.register_forward_hook(_consumer_post, with_kwargs=True, always_call=True)


def _wide(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dtype == torch.float32
    if isinstance(value, (tuple, list)):
        return any(_wide(v) for v in value)
    if isinstance(value, dict):
        return any(_wide(v) for v in value.values())
    return False


def _consumer_pre(module: torch.nn.Module, args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    c: _Consumer = getattr(module, _CONSUMER)
    dtype = _dtype_of(module, c.compute)
    wide = dtype != torch.float32 and (_wide(args) or _wide(kwargs))
    if not c.norm:
        if not wide:
            return None
        down = _caster(dtype)
        return _map(args, down), _map(kwargs, down)
    saved: dict[str, torch.nn.Parameter] | None = None
    if wide:  # the residual stream itself: normalise it in fp32
        saved = {}
        for key, p in list(module._parameters.items()):
            if p is not None and p.dtype == dtype:
                saved[key] = p
                module._parameters[key] = p.float()  # type: ignore[assignment]
    c.saved.append(saved)
    return None


def _consumer_post(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                   output: Any) -> Any:
    c: _Consumer = getattr(module, _CONSUMER)
    saved = c.saved.pop() if c.saved else None
    if saved is None:
        return None
    dtype = next(iter(saved.values())).dtype if saved else c.compute
    module._parameters.update(saved)
    if output is None:
        return None
    return _map(output, _caster(dtype))


def _caster(dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """fp32 tensors to ``dtype``; others as they are."""
    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if t.dtype == torch.float32 else t
    return cast


def _dtype_of(module: torch.nn.Module, compute: torch.dtype) -> torch.dtype:
    """What a downstream module computes in: its parameters' dtype (the compute dtype for a
    module with buffers alone, such as a rotary embedding)."""
    for p in module.parameters(recurse=False):
        if p.is_floating_point():
            return p.dtype
    return compute

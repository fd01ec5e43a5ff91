"""The nested values a module call passes and returns, as the recorder names them.

A module's arguments and outputs are tensors inside tuples, lists and dicts (and
``ModelOutput`` dicts). :func:`flatten` names each tensor by its path in them (``"0"``,
``"logits"``, ``"1.0"``): the index part of a record's key (``:out.logits``);
:func:`map_tensors` replaces each by path. The other helpers read a call's arguments: by
parameter name, and the plain ones (strings, numbers) that tell calls of one module apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch


def flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(path, tensor)`` for every tensor inside nested tuples, lists and dicts.

    Paths join tuple positions and dict keys (:func:`part`) with dots (``"0"``,
    ``"logits"``, ``"1.0"``); non-tensor leaves (``None``, caches, numbers) are skipped.
    """
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from flatten(v, f"{prefix}.{part(k)}" if prefix else part(k))
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            yield from flatten(v, f"{prefix}.{i}" if prefix else str(i))


#: what a dict key may not bring into a record's key: the separators of its path (``.``)
#: and of the key itself (``:`` kind, ``#`` call, ``/`` operation)
_SEPARATORS = str.maketrans({".": "_", ":": "_", "#": "_", "/": "_"})


def part(key: Any) -> str:
    """A dict key as one part of a path: its separators replaced by ``_``, and an empty key
    as ``_`` (``{'a.b': x}`` and ``{'a': {'b': y}}`` were both ``a.b``; ``'a:b#1'`` read
    as another kind and call)."""
    return str(key).translate(_SEPARATORS) or "_"


def map_tensors(value: Any, fn: Callable[[str, torch.Tensor], torch.Tensor],
                prefix: str = "") -> Any:
    """``value`` with each tensor replaced by ``fn(path, tensor)``, inside tuples, lists and
    dicts (rebuilt as plain ones); paths as :func:`flatten` names them."""
    if isinstance(value, torch.Tensor):
        return fn(prefix, value)
    if isinstance(value, dict):
        return {k: map_tensors(v, fn, f"{prefix}.{part(k)}" if prefix else part(k))
                for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        items = [map_tensors(v, fn, f"{prefix}.{i}" if prefix else str(i))
                 for i, v in enumerate(value)]
        return tuple(items) if isinstance(value, tuple) else items
    return value


#: the argument types :func:`call_signature` keeps
PLAIN = (str, int, float, bool)


def call_signature(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The plain arguments of a module call (strings, numbers, booleans), e.g. Gemma 3's
    ``rotary_emb(x, positions, "sliding_attention")``; None when there are none.

    Calls of one module whose order comes from a set (Gemma 3 iterates
    ``set(config.layer_types)``, an order that changes with ``PYTHONHASHSEED`` from one
    process to the next) are paired by it across dumps (:func:`precision.judge.lineup.align.align`).
    """
    parts = [repr(a) for a in args if isinstance(a, PLAIN)]
    if kwargs:
        parts += [f"{k}={v!r}" for k, v in sorted(kwargs.items()) if isinstance(v, PLAIN)]
    return ",".join(parts)[:200] or None


def named_arguments(module: torch.nn.Module, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> dict[str, Any]:
    """Positional and keyword arguments of ``module.forward`` by parameter name."""
    import inspect

    try:
        bound = inspect.signature(module.forward).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return {str(i): a for i, a in enumerate(args)} | kwargs
    named = dict(bound.arguments)
    extra = named.pop("kwargs", None)
    return named | (extra if isinstance(extra, dict) else {})

"""Operator level: the torch operations called inside modules' own forwards (``--level ops``).

A :class:`torch.overrides.TorchFunctionMode` sees every torch function, ``Tensor`` method and
operator a forward calls (``F.softmax``, ``scores += position_bias``, ``x.float()``), before
autograd and dispatch, under the names a user reads in the model's source. Each call whose
result holds floating-point tensors is handed to the recorder under the innermost module
running it: ``encoder.block.0.layer.0.SelfAttention/softmax:out`` (its n-th call in that
module ``#n``), so two runs on different devices line up by key as module records do.

Skipped, as they compute nothing (:data:`SKIPPED`): views and reshapes, indexing, shape and
device queries, and casts that keep the dtype; a cast that changes it (``.float()``,
``.to(torch.float16)``) is recorded as ``cast_<from>_<to>`` (``cast_bfloat16_float32``), as
precision is lost or gained there; a run in another precision casts elsewhere, and compare
leaves casts found on one side only out of its rows. Calls made inside
another recorded call (``F.softmax`` calling ``Tensor.softmax``) are not seen twice: the
mode is off while a call runs.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from ..dtypes import canonical
from ..dumps.keys import CAST_PREFIX

#: the methods and functions that cast (recorded as ``cast_<from>_<to>`` when the dtype changes)
CASTS = frozenset({"to", "float", "half", "bfloat16", "double", "type_as", "type"})
#: operations that move, view or describe data without computing on it
SKIPPED = frozenset({
    "view", "view_as", "reshape", "reshape_as", "transpose", "t", "permute", "expand",
    "expand_as", "contiguous", "getitem", "setitem", "size", "dim", "numel", "unsqueeze",
    "squeeze", "flatten", "unflatten", "narrow", "select", "split", "chunk", "unbind",
    "movedim", "detach", "clone", "get", "set", "repeat", "repeat_interleave", "stack", "cat",
    "index_select", "gather", "masked_select", "tolist", "item", "cpu", "cuda", "dtype",
    "device", "shape", "requires_grad_", "is_floating_point", "is_contiguous", "stride",
    "storage_offset", "data_ptr", "element_size", "len", "iter", "bool", "format", "repr",
    "zeros_like", "ones_like", "empty_like", "full_like", "arange", "zeros", "ones", "empty",
    "full", "tensor", "as_tensor", "broadcast_to", "new_zeros", "new_ones", "new_empty",
    "new_full", "new_tensor", "diagonal", "tril", "triu", "split_with_sizes",
})


def op_name(func: Any) -> str:
    """``torch.nn.functional.softmax`` -> ``softmax``; ``Tensor.__add__`` -> ``add``;
    ``Tensor.__iadd__`` -> ``iadd`` (in place: ``scores += bias``)."""
    name = getattr(func, "__name__", None) or type(func).__name__
    return name.strip("_") or "call"


def _floats(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _floats(v)]
    return []


def _first_tensor(args: Sequence[Any]) -> torch.Tensor | None:
    return next((a for a in args if isinstance(a, torch.Tensor)), None)


class OpCapture(TorchFunctionMode):
    """Hands each computing call made while a module runs to ``record(module, op, result,
    args, kwargs)``; ``stack`` holds the running modules' names, innermost last (the
    recorder's forward pre- and post-hooks keep it). ``include``/``exclude`` are globs on
    operation names."""

    def __init__(self, stack: list[str], record: Callable[[str, str, Any, tuple[Any, ...],
                                                          dict[str, Any]], None],
                 include: Sequence[str] = (), exclude: Sequence[str] = ()) -> None:
        super().__init__()
        self._stack = stack
        self._record = record
        self._include = tuple(include)
        self._exclude = tuple(exclude)
        self._paused = 0

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        """The recorder's own work (statistics, copies) is no operation of the model."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def wanted(self, name: str) -> bool:
        if name in SKIPPED:
            return False
        if self._include and not any(fnmatch.fnmatchcase(name, g) for g in self._include):
            return False
        return not any(fnmatch.fnmatchcase(name, g) for g in self._exclude)

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self._stack or self._paused:
            return out
        name = op_name(func)
        if not self.wanted(name) or not _floats(out):
            return out
        if name in CASTS:
            src = _first_tensor(args)
            if src is None or not isinstance(out, torch.Tensor) or src.dtype == out.dtype:
                return out
            name = (f"{CAST_PREFIX}{canonical(str(src.dtype))}_"
                    f"{canonical(str(out.dtype))}")
        self._record(self._stack[-1], name, out, args, kwargs)
        return out

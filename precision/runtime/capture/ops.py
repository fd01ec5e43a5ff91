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

from ...dtypes import NAME_TO_SAFETENSORS, canonical, is_float
from ...dumps.keys import CAST_PREFIX
from ...errors import InputError

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
    """``torch.nn.functional.softmax`` -> ``softmax``; ``a + b`` -> ``add``; ``a += b`` ->
    ``add_`` (in place); ``1 - a`` -> ``rsub``."""
    name = str(getattr(func, "__name__", None) or type(func).__name__)
    if len(name) > 4 and name.startswith("__") and name.endswith("__"):
        name = name[2:-2]  # a dunder: the operator's name (in place keeps its "_": add_)
    return name or "call"


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``bfloat16``, also for dtypes a dump cannot hold (float8)."""
    try:
        return canonical(str(dtype))
    except InputError:
        return str(dtype).removeprefix("torch.")


def storable(t: torch.Tensor) -> bool:
    """Whether a dump can hold ``t``'s dtype (float8 and complex it cannot)."""
    return dtype_name(t.dtype) in NAME_TO_SAFETENSORS


def _floats(value: Any) -> list[torch.Tensor]:
    """The floating-point tensors in ``value`` that a dump can hold (not float8)."""
    if isinstance(value, torch.Tensor):
        return [value] if is_float(dtype_name(value.dtype)) else []
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _floats(v)]
    return []


def _first_tensor(args: Sequence[Any]) -> torch.Tensor | None:
    return next((a for a in args if isinstance(a, torch.Tensor)), None)


#: where ``precision check`` may find a recorded operation again (nothing else is imported)
CALLABLE_HOMES = ("torch", "torch.nn.functional", "torch._C._nn", "torch.special",
                  "torch.linalg", "torch.fft", "Tensor")


def func_path(func: Any) -> str | None:
    """A name that finds ``func`` again: ``torch.nn.functional.softmax``, ``Tensor.add_``,
    ``torch.matmul``, ``torch._C._nn.linear``; None for anything else."""
    name = getattr(func, "__name__", None)
    qualname = getattr(func, "__qualname__", "") or ""
    if not name:
        return None
    if qualname.startswith(("TensorBase.", "Tensor.")):
        return f"Tensor.{name}"
    home = getattr(func, "__module__", None) or ""
    return f"{home}.{name}" if home in CALLABLE_HOMES else None


def call_spec(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The call's arguments as JSON, each tensor replaced by the index its input record has
    (``{"tensor": "0"}``, as :func:`precision.runtime.capture.trees.flatten` names
    them); None when an argument is neither a tensor nor plain data (it could not be replayed)."""
    def spec(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            return {"tensor": path}
        if isinstance(value, torch.dtype):
            return {"dtype": canonical(str(value))}
        if value is None or isinstance(value, (bool, int, float, str)):
            if isinstance(value, float) and value != value:  # NaN: JSON has none
                raise ValueError
            return value
        if isinstance(value, (tuple, list, torch.Size)):
            return {"list": [spec(v, f"{path}.{i}" if path else str(i))
                             for i, v in enumerate(value)]}
        raise ValueError

    try:
        return {"args": [spec(a, str(i)) for i, a in enumerate(args)],
                "kwargs": {k: spec(v, k) for k, v in kwargs.items()}}
    except (ValueError, InputError):  # InputError: a dtype a dump has no name for
        return None


class OpCapture(TorchFunctionMode):
    """Hands each computing call made while a module runs to ``record(module, op, func,
    result, args, kwargs)``; ``stack`` holds the running modules' names, innermost last (the
    recorder's forward pre- and post-hooks keep it). ``include``/``exclude`` are globs on
    operation names. ``snapshot(module)`` says whether the inputs of ``module``'s
    operations are recorded: an in-place operation's first argument is then copied before
    it runs, so the input recorded is the one it read."""

    def __init__(self, stack: list[str],
                 record: Callable[[str, str, Any, Any, tuple[Any, ...], dict[str, Any]], None],
                 include: Sequence[str] = (), exclude: Sequence[str] = (),
                 snapshot: Callable[[str], bool] = lambda _module: False) -> None:
        super().__init__()
        self._stack = stack
        self._record = record
        self._snapshot = snapshot
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
        if not self._stack or self._paused:
            return func(*args, **kwargs)
        name, module = op_name(func), self._stack[-1]
        if not self.wanted(name):
            return func(*args, **kwargs)
        seen = args
        if name.endswith("_") and args and isinstance(args[0], torch.Tensor) \
                and self._snapshot(module):
            seen = (args[0].clone(), *args[1:])
        out = func(*args, **kwargs)
        if not _floats(out):
            return out
        if name in CASTS:
            src = _first_tensor(args)
            if src is None or not isinstance(out, torch.Tensor) or src.dtype == out.dtype:
                return out
            name = f"{CAST_PREFIX}{dtype_name(src.dtype)}_{dtype_name(out.dtype)}"
        self._record(module, name, func, out, seen, kwargs)
        return out

"""Facts about one torch tensor that the recorder and the doctor's re-runs share: its dtype's
name in a dump, a stored array as a tensor again, and whether it changed in place."""

from __future__ import annotations

import functools
from typing import Any

import torch

from ...dtypes import canonical


@functools.cache
def torch_dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``float16`` (remembered: asked once per record)."""
    return canonical(str(dtype))


def numpy_to_torch(arr: Any) -> torch.Tensor:
    """A numpy array as a tensor; ml_dtypes bfloat16 through its bits (torch cannot read it)."""
    if arr.dtype.name == "bfloat16":
        return torch.from_numpy(arr.view("int16")).view(torch.bfloat16)
    return torch.from_numpy(arr)


def tensor_version(t: torch.Tensor) -> int | None:
    """The in-place version counter; ``None`` for inference-mode tensors, which have none
    (they are then never aliased: stored again rather than risk a stale value)."""
    try:
        return int(t._version)
    except RuntimeError:
        return None

"""The CUDA backend (NVIDIA GPUs through torch.cuda)."""

from __future__ import annotations

from types import ModuleType

import torch

from ...errors import DeviceError, given


def check(index: int, dtype: str) -> None:
    if not torch.cuda.is_available():
        build = "a CPU-only torch build" if torch.version.cuda is None else "no visible GPU"
        raise DeviceError(f"CUDA is not available here ({build}): install a CUDA build of torch "
                          "on a machine with an NVIDIA GPU, or use "
                          f"{given('--device', 'device', 'cpu')}")
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(f"cuda:{index} does not exist: this machine has {count} CUDA device(s)")
    if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"cuda:{index} ({torch.cuda.get_device_name(index)}) cannot run bf16: "
                          f"use {given('--dtype', 'dtype', 'fp16')} or fp32")


def describe(index: int) -> str:
    return f"{torch.cuda.get_device_name(index)} (CUDA {torch.version.cuda})"


def synchronize(index: int) -> None:
    torch.cuda.synchronize(index)


def streams() -> ModuleType:
    """``torch.cuda``: its ``Stream``, ``Event``, ``current_stream`` and ``stream``."""
    return torch.cuda

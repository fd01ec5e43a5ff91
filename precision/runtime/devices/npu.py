"""The Ascend NPU backend; ``torch_npu`` is imported here and only here, on first use."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from ...errors import DeviceError, given


def _torch_npu() -> ModuleType:
    try:
        return importlib.import_module("torch_npu")
    except ImportError:
        raise DeviceError(f"{given('--device', 'device', 'npu')} needs torch_npu (Ascend's "
                          "PyTorch plugin) and CANN: "
                          "pip install 'precision[npu]' on an Ascend machine, "
                          f"or use {given('--device', 'device', 'cpu')} or cuda") from None
    except Exception as exc:  # CANN missing or broken: torch_npu raises at import
        raise DeviceError(f"torch_npu is installed but failed to load ({exc}): "
                          "source the CANN set_env.sh and check the driver") from None


def _npu() -> Any:
    _torch_npu()
    import torch

    return torch.npu  # type: ignore[attr-defined]


def check(index: int, dtype: str) -> None:
    npu = _npu()
    if not npu.is_available():
        raise DeviceError("torch_npu is installed but no NPU is visible: check npu-smi info "
                          "and ASCEND_RT_VISIBLE_DEVICES")
    count = npu.device_count()
    if index >= count:
        raise DeviceError(f"npu:{index} does not exist: this machine has {count} NPU(s)")
    supports_bf16 = getattr(npu, "is_bf16_supported", lambda: True)
    if dtype == "bfloat16" and not supports_bf16():
        raise DeviceError(f"npu:{index} cannot run bf16 (Ascend 910B or later needed): "
                          f"use {given('--dtype', 'dtype', 'fp16')}")


def describe(index: int) -> str:
    return f"{_npu().get_device_name(index)} (torch_npu {_torch_npu().__version__})"


def synchronize(index: int) -> None:
    _npu().synchronize(index)


def streams() -> Any:
    """``torch.npu`` (torch_npu): the same ``Stream``, ``Event``, ``current_stream`` and
    ``stream`` as ``torch.cuda``."""
    return _npu()

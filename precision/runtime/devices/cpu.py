"""The CPU backend: always present; fp32, fp16 and bf16 all run (slowly for half types)."""

from __future__ import annotations

import platform
from types import ModuleType

from ...errors import DeviceError, given


def check(index: int, dtype: str) -> None:
    if index != 0:
        raise DeviceError(f"cpu:{index} does not exist: use {given('--device', 'device', 'cpu')}")


def describe(index: int) -> str:
    return f"CPU ({platform.processor() or platform.machine()})"


def synchronize(index: int) -> None:
    """CPU work is synchronous; nothing to wait for."""


def streams() -> ModuleType | None:
    """No streams: CPU operations complete before they return."""
    return None

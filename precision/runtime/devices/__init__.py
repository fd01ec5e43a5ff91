"""Device registry: ``cpu``, ``cuda[:N]``, ``npu[:N]`` behind one small surface.

Each backend module exposes ``check(index, dtype)`` (raise :class:`DeviceError` with what to
install or choose), ``describe(index)`` (a human-readable device name),
``synchronize(index)`` and ``streams()`` (the ``torch.cuda``-like namespace whose ``Stream``,
``Event``, ``current_stream`` and ``stream`` the capture's asynchronous copies and deferred
statistics use; ``None`` on the CPU, whose work is synchronous). ``torch_npu`` is imported
only inside :mod:`precision.runtime.devices.npu`, only when an NPU is asked for.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from types import ModuleType

from ...errors import DeviceError

BACKENDS = {"cpu": "cpu", "cuda": "cuda", "npu": "npu"}
_SPEC = re.compile(r"^(?P<type>[a-z]+)(?::(?P<index>\d+))?$")


@dataclass(frozen=True)
class Device:
    """A resolved device: ``type`` (cpu/cuda/npu), ``index`` and its ``torch`` spelling."""

    type: str
    index: int
    name: str

    @property
    def torch_device(self) -> str:
        return "cpu" if self.type == "cpu" else f"{self.type}:{self.index}"

    def synchronize(self) -> None:
        _backend(self.type).synchronize(self.index)

    def as_meta(self) -> dict[str, object]:
        return {"type": self.type, "index": self.index, "name": self.name,
                "torch_device": self.torch_device}


def _backend(kind: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{BACKENDS[kind]}")


def streams(kind: str) -> ModuleType | None:
    """The stream-and-event namespace of device type ``kind`` (``torch.cuda``, ``torch.npu``),
    or ``None`` for the CPU and for types this registry does not know (their work is run as
    the CPU's: synchronously, in order)."""
    if kind not in BACKENDS:
        return None
    api: ModuleType | None = _backend(kind).streams()
    return api


def parse(spec: str) -> tuple[str, int]:
    """``"cuda:1"`` -> ``("cuda", 1)``; unknown names raise :class:`DeviceError`."""
    m = _SPEC.match(spec.strip().lower())
    if not m or m["type"] not in BACKENDS:
        raise DeviceError(f"unknown device {spec!r}: choose cpu, cuda, cuda:N, npu or npu:N")
    return m["type"], int(m["index"] or 0)


def resolve(spec: str, dtype: str = "float32") -> Device:
    """Check that ``spec`` exists here and can run ``dtype``; return the :class:`Device`."""
    kind, index = parse(spec)
    backend = _backend(kind)
    backend.check(index, dtype)
    return Device(kind, index, backend.describe(index))

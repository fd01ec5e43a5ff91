"""Device registry: parsing device names, resolving cpu/cuda/npu, lazy torch_npu import."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from precision.errors import DeviceError, PrecisionError
from precision.runtime import devices

DTYPES = ["float32", "float16", "bfloat16"]


@pytest.mark.parametrize(("spec", "expected"), [
    ("cpu", ("cpu", 0)),
    ("cuda", ("cuda", 0)),
    ("cuda:1", ("cuda", 1)),
    ("npu", ("npu", 0)),
    ("npu:0", ("npu", 0)),
    ("npu:7", ("npu", 7)),
    (" CUDA:2 ", ("cuda", 2)),
])
def test_parse_valid(spec: str, expected: tuple[str, int]) -> None:
    assert devices.parse(spec) == expected


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "", " ", "cuda:", "cuda:-1", "cuda:1:2",
                                  ":0", "mps", "cpu0", "npu 0"])
def test_parse_invalid(spec: str) -> None:
    """Unknown names are DeviceErrors that list the valid choices."""
    with pytest.raises(DeviceError, match="unknown device") as info:
        devices.parse(spec)
    assert "cpu" in str(info.value)
    assert isinstance(info.value, PrecisionError)


@pytest.mark.parametrize("dtype", DTYPES)
def test_resolve_cpu(dtype: str) -> None:
    """The CPU runs every dtype."""
    dev = devices.resolve("cpu", dtype)
    assert (dev.type, dev.index, dev.torch_device) == ("cpu", 0, "cpu")
    assert dev.name.startswith("CPU")
    assert dev.as_meta()["torch_device"] == "cpu"
    dev.synchronize()  # a no-op that must not fail


def test_resolve_cpu_index() -> None:
    """Only cpu:0 exists."""
    assert devices.resolve("cpu:0").index == 0
    with pytest.raises(DeviceError, match="cpu:1"):
        devices.resolve("cpu:1")


def test_resolve_bad_name() -> None:
    with pytest.raises(DeviceError, match="unknown device"):
        devices.resolve("gpu")


def test_resolve_cuda_without_cuda() -> None:
    """On a machine without CUDA, asking for it is a DeviceError that says so."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    for spec in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(DeviceError, match="CUDA"):
            devices.resolve(spec, "float16")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_resolve_cuda(dtype: str) -> None:
    """With a GPU, cuda resolves (bf16 may be refused on old GPUs, as a DeviceError)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        with pytest.raises(DeviceError, match="bf16"):
            devices.resolve("cuda", dtype)
        return
    dev = devices.resolve("cuda", dtype)
    assert (dev.type, dev.index, dev.torch_device) == ("cuda", 0, "cuda:0")
    assert "CUDA" in dev.name
    dev.synchronize()
    count = torch.cuda.device_count()
    with pytest.raises(DeviceError, match="does not exist"):
        devices.resolve(f"cuda:{count}", dtype)


def _block_torch_npu(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    """Make importlib.import_module('torch_npu') raise ``exc``; other imports go through."""
    real = importlib.import_module

    def fake(name: str, package: str | None = None) -> object:
        if name == "torch_npu":
            raise exc
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", fake)


@pytest.mark.parametrize("spec", ["npu", "npu:1"])
def test_resolve_npu_without_torch_npu(monkeypatch: pytest.MonkeyPatch, spec: str) -> None:
    """Without torch_npu, --device npu says what to install."""
    _block_torch_npu(monkeypatch, ImportError("No module named 'torch_npu'"))
    with pytest.raises(DeviceError, match="torch_npu") as info:
        devices.resolve(spec, "float16")
    assert "\n" not in str(info.value)


def test_resolve_npu_broken_cann(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch_npu that fails at import (CANN missing) gives a DeviceError about CANN."""
    (tmp_path / "torch_npu.py").write_text(
        "raise RuntimeError('libascendcl.so: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    with pytest.raises(DeviceError, match="CANN") as info:
        devices.resolve("npu", "float16")
    assert "libascendcl" in str(info.value)
    assert "torch_npu" not in sys.modules


def test_resolve_npu_broken_cann_injected(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same, with the failure injected through import_module."""
    _block_torch_npu(monkeypatch, RuntimeError("ACL error 507033"))
    with pytest.raises(DeviceError, match="CANN"):
        devices.resolve("npu:0", "bfloat16")


def test_import_does_not_load_torch_npu() -> None:
    """Importing precision.runtime.devices (and resolving cpu) never imports torch_npu."""
    code = ("import sys, precision.runtime.devices as d; d.resolve('cpu'); d.parse('npu:1'); "
            "print('torch_npu' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "False"


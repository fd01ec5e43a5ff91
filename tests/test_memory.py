"""Compare streams: a dump bigger than the process's memory limit compares within it."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import write_dump

pytestmark = pytest.mark.slow
LIMIT_MB = 200


def _limited(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (LIMIT_MB << 20, LIMIT_MB << 20))

    return subprocess.run([sys.executable, "-c", code, *args], preexec_fn=limit,
                          capture_output=True, text=True, timeout=300)


def test_compare_of_a_dump_larger_than_the_memory_limit(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = write_dump(tmp_path / "big.st", {
        f"layer{i}:out": rng.standard_normal(8_000_000, dtype=np.float32) for i in range(12)})
    assert path.stat().st_size > 1.8 * (LIMIT_MB << 20)  # 384 MB, read twice
    ok = _limited("import precision, sys; r = precision.compare(sys.argv[1], sys.argv[1]); "
                  "print(r.summary)", str(path))
    assert ok.returncode == 0, ok.stderr[-500:]
    assert ok.stdout.startswith("PASS") and "12 OK" in ok.stdout
    # control: holding the tensors in memory under the same limit does fail
    hoard = _limited("import precision, sys; d = precision.load(sys.argv[1]); "
                     "kept = [d[k] for k in d.tensors]", str(path))
    assert hoard.returncode != 0 and "MemoryError" in hoard.stderr

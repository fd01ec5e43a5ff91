"""scripts/kernel_levels.py: which CPU kernel levels a machine can emulate, and their settings."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import kernel_levels

AVX2_ONLY = {"sse4_1", "avx2", "fma"}  # an AMD EPYC Zen 2/3
AVX512 = AVX2_ONLY | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}  # Cascade Lake
AMX = AVX512 | {"avx512_bf16", "amx_tile"}  # Sapphire Rapids


@pytest.mark.parametrize(("flags", "levels"), [
    (AMX, ["native", "avx512", "avx2", "default"]),
    (AVX512, ["native", "avx2", "default"]),
    (AVX2_ONLY, ["native", "default"]),
    (set(), ["native"]),  # flags unknown (ARM64): nothing to cap
])
def test_levels_cap_only_below_what_the_cpu_runs(monkeypatch: pytest.MonkeyPatch,
                                                 flags: set[str], levels: list[str]) -> None:
    monkeypatch.setattr(kernel_levels, "cpu_flags", lambda: flags)
    assert kernel_levels.supported() == levels
    monkeypatch.setenv("KERNEL_LEVELS", "avx512,default")
    assert kernel_levels.chosen() == [x for x in ("avx512", "default") if x in levels]


def test_each_level_sets_its_own_settings_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx512")
    env = kernel_levels.environment("default")
    assert env["ATEN_CPU_CAPABILITY"] == "default" and env["ONEDNN_MAX_CPU_ISA"] == "SSE41"
    assert "ATEN_CPU_CAPABILITY" not in kernel_levels.environment("native")


@pytest.mark.skipif("default" not in kernel_levels.supported(), reason="no level to cap here")
def test_a_command_runs_under_each_level_and_a_failure_fails() -> None:
    script = str(ROOT / "scripts" / "kernel_levels.py")
    env = {"KERNEL_LEVELS": "default", "PATH": "/usr/bin:/bin"}
    ok = subprocess.run([sys.executable, script, sys.executable, "-c",
                         "import os; assert os.environ['ATEN_CPU_CAPABILITY'] == 'default'"],
                        env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([sys.executable, script, sys.executable, "-c", "raise SystemExit(3)"],
                         env=env, capture_output=True, text=True)
    assert bad.returncode == 1 and "failed under kernel level(s): default" in bad.stderr
    unknown = subprocess.run([sys.executable, script], env=env | {"KERNEL_LEVELS": "sse9"},
                             capture_output=True, text=True)
    assert unknown.returncode == 1 and "unknown kernel level(s) sse9" in unknown.stderr

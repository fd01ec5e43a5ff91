"""Run a command under each CPU kernel level this machine can emulate.

PyTorch's CPU numbers depend on the kernels it picks for the CPU it runs on: ATen's own
vectorised kernels (``ATEN_CPU_CAPABILITY``: default, avx2, avx512), oneDNN's GEMMs and
convolutions, bf16 ones included (``ONEDNN_MAX_CPU_ISA`` caps them), and MKL's fp32 GEMMs
(``MKL_ENABLE_INSTRUCTIONS``); and numpy, which compare runs on, dispatches its own SIMD
loops (``NPY_DISABLE_CPU_FEATURES`` turns off its targets beyond a level). A baseline taken
on an AVX2 server, an AVX-512 one, an AMX one or an ARM64 host holds other bits, so verdicts
must hold under each. A machine cannot emulate
an instruction set it lacks, only cap what it uses; :func:`supported` lists the levels at or
below this CPU's (and not the one it runs anyway: on an AVX2 CPU, ``avx2`` is ``native``).

Levels (each names the three settings together, as one kind of host would run them):

- ``native``: nothing capped (this CPU's best: AVX-512 with AMX here);
- ``avx512``: AVX-512 without AMX or AVX512-FP16 (a Skylake/Cascade Lake server);
- ``avx2``: an AVX2 server without AVX-512 (AMD EPYC Zen 2/3, Haswell to Coffee Lake);
- ``default``: no vector ISA in ATen, SSE4.1 GEMMs: the scalar fallback, whose reductions
  run in another order again (the closest stand-in for an ARM64 host's kernels here).

    python scripts/kernel_levels.py                 list the levels this CPU supports
    python scripts/kernel_levels.py CMD [ARG ...]   run CMD under each; exit 1 if any failed
    KERNEL_LEVELS=avx2,default python scripts/kernel_levels.py CMD ...   just those
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

#: level -> the environment that emulates it
LEVELS: dict[str, dict[str, str]] = {
    "native": {},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
               "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "default": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}
#: the CPU flags a level needs
NEEDS = {"native": (), "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq"),
         "avx2": ("avx2", "fma"), "default": ("sse4_1",)}


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux x86: /proc/cpuinfo); empty where unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


#: the CPU flags beyond a level: without any of them the level is what the CPU runs anyway
BEYOND = {"avx512": ("amx_tile", "avx512_bf16", "avx512_fp16", "avx512_vnni"),
          "avx2": ("avx512f",), "default": ("avx2",)}


def supported() -> list[str]:
    """The levels this CPU can run, best first, less those that cap nothing (``avx2`` on an
    AVX2 CPU is ``native``); ``native`` alone where the flags are unknown (an ARM64 host
    runs its own kernels: nothing to cap)."""
    flags = cpu_flags()
    if not flags:
        return ["native"]
    return ["native"] + [name for name in LEVELS if name != "native"
                         and all(f in flags for f in NEEDS[name])
                         and any(f in flags for f in BEYOND[name])]


def chosen() -> list[str]:
    """``$KERNEL_LEVELS`` (comma-separated) among the supported levels, else all of them."""
    have = supported()
    asked = [s for s in os.environ.get("KERNEL_LEVELS", "").split(",") if s]
    unknown = [s for s in asked if s not in LEVELS]
    if unknown:
        sys.exit(f"error: unknown kernel level(s) {', '.join(unknown)}; "
                 f"known: {', '.join(LEVELS)}")
    return [s for s in asked if s in have] if asked else have


#: numpy's dispatch targets beyond a level (its names: numpy 2's ``X86_V4``, numpy 1's
#: ``AVX512F``...), by prefix
NUMPY_BEYOND = {"avx512": ("AVX512_SPR",), "avx2": ("AVX512", "X86_V4"),
                "default": ("AVX512", "X86_V4", "X86_V3", "AVX2", "FMA3", "AVX", "F16C")}


def numpy_caps(level: str) -> dict[str, str]:
    """``NPY_DISABLE_CPU_FEATURES`` naming the dispatch targets of this numpy beyond
    ``level`` (only those it dispatches: naming another is an error at its import)."""
    try:
        try:
            from numpy._core._multiarray_umath import __cpu_dispatch__ as dispatch
        except ImportError:  # numpy 1
            from numpy.core._multiarray_umath import __cpu_dispatch__ as dispatch
    except ImportError:
        return {}
    off = [t for t in dispatch if t.startswith(NUMPY_BEYOND.get(level, ()))]
    return {"NPY_DISABLE_CPU_FEATURES": " ".join(off)} if off else {}


def environment(level: str) -> dict[str, str]:
    """This process's environment with ``level``'s settings (and no others of theirs)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
                        "NPY_DISABLE_CPU_FEATURES")}
    return env | LEVELS[level] | numpy_caps(level)


def main(argv: list[str]) -> int:
    levels = chosen()
    if not argv:
        for name in levels:
            caps = LEVELS[name] | numpy_caps(name)
            print(name, " ".join(f"{k}={v!r}" if " " in v else f"{k}={v}"
                                 for k, v in caps.items()) or "(as is)")
        return 0
    failed = []
    for name in levels:
        print(f"== kernel level {name}: {' '.join(argv)}", flush=True)
        start = time.perf_counter()
        code = subprocess.call(argv, env=environment(name) | {"PRECISION_KERNEL_LEVEL": name})
        print(f"== kernel level {name}: exit {code} in {time.perf_counter() - start:.0f} s",
              flush=True)
        if code:
            failed.append(name)
    if failed:
        print(f"failed under kernel level(s): {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

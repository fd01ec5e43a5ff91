"""Compare timings for scripts/bench, in a process as lean as `precision compare`'s.

Forking the benchmark's own process (torch, three models, a host buffer) for the compare
workers would cost more than forking the CLI does, so the compare is timed here: one job,
two jobs and the read floor alternate round by round; the page cache is warm, as for a
second compare. The read floor is what reading both dumps costs before any arithmetic:
compare's own reader (chunks read into one reused buffer) and a vectorised max over each
chunk's bytes, and safetensors' numpy loader (a fresh array per tensor) with the same max.
``--kernel numpy`` times the numpy path (the install without the fast extra).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import numpy as np
from benchutil import interleaved, peak_rss  # scripts/ is on the path
from safetensors import safe_open

from precision.dumps import load
from precision.judge.compare import CHUNK_ELEMS, compare
from precision.judge.measure.kernels import KERNEL_ENV, choose_kernel


def read_chunks(paths: list[str]) -> None:
    """Every tensor of each dump, as compare reads them, and a max over the bytes."""
    for path in paths:
        dump = load(path)
        for key in dump.tensors:
            for chunk in dump.chunks(key, CHUNK_ELEMS):
                chunk.view(np.uint8).max()


def read_safetensors(paths: list[str]) -> None:
    """Every tensor of each file through safetensors' numpy loader, and a max over it."""
    for path in paths:
        with safe_open(path, framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118 (a safe_open handle is no mapping)
                tensor = f.get_tensor(key)
                tensor.reshape(-1).view(np.uint8).max()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("base")
    ap.add_argument("target")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--kernel", choices=["auto", "numpy", "numba"], default="auto",
                    help="the metrics kernel (PRECISION_KERNEL); auto: numba when installed")
    args = ap.parse_args()
    if args.kernel != "auto":
        os.environ[KERNEL_ENV] = args.kernel
    kernel = choose_kernel(float("inf"))
    paths = [args.base, args.target]
    compare(args.base, args.target)  # warm the page cache (and load the kernel)
    times = interleaved({"jobs1": lambda: compare(args.base, args.target, jobs=1),
                         "jobs2": lambda: compare(args.base, args.target, jobs=2),
                         "read": lambda: read_chunks(paths),
                         "read_safetensors": lambda: read_safetensors(paths)},
                        args.repeat, lambda: None)
    with peak_rss() as mem:
        compare(args.base, args.target, jobs=2)
    with peak_rss() as capped:
        compare(args.base, args.target, jobs=2, max_memory=4 << 20)
    json.dump({"kernel": kernel,
               "jobs1_s": statistics.median(times["jobs1"]),
               "jobs2_s": statistics.median(times["jobs2"]),
               "jobs2_speedup": statistics.median(
                   a / b for a, b in zip(times["jobs1"], times["jobs2"], strict=True)),
               "read_s": statistics.median(times["read"]),
               "read_safetensors_s": statistics.median(times["read_safetensors"]),
               "peak_extra_bytes": mem["extra"], "capped_peak_extra_bytes": capped["extra"]},
              sys.stdout)


if __name__ == "__main__":
    main()

"""Stats-mode capture overhead alone, on scripts/bench's model, with a thread count of choice.

`scripts/bench --only speed` measures it with every core, next to compare and multi-rank
runs; on a machine shared with other work, threads fight and the ratio is noise. This runs
the plain forward and the stats capture round-robin (as scripts/bench does) and also
reports the time spent in the statistics themselves (``tensor_stats``, per capture), which
load disturbs least, and the count sketches' share (``bench.sketch_share``: the records
sketched alone, over the plain forward). Two more runs in the same rounds show the floor
that faster statistics cannot go below: ``hooks_ratio``, the forward with a no-op forward
hook on every module a capture hooks (torch's hook path alone), and
``no_statistics_ratio``, the stats capture with each record's statistics replaced by a
fixed answer (hooks, bookkeeping, opening and closing the dump; no pass over the values).
To compare two checkouts side by side, run it from this one against each package in turn:

    PYTHONPATH=CHECKOUT python scripts/bench_stats.py --threads 1 --repeat 11

or, for a change to the one-pass kernel alone, in one process: ``--against CHECKOUT`` loads
that checkout's ``onepass`` module too and times a stats capture with its kernel in the same
rounds (``against_ratio``, and ``this_less_against``: the median over rounds of this
capture's time less that one's, over the forward), which a noisy host's drift does not skew,
and its single records (``against_tensor_stats_us``).

Prints one JSON line: medians over rounds, and ``tensor_stats_us``: the fastest of 150
calls of the statistics on single records of a few shapes and dtypes (microseconds).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from bench import bench_model, sketch_share  # scripts/ is on the path
from benchutil import interleaved

import precision
from precision.runtime.capture import recorder, tensorstats
from precision.runtime.capture.selection import select_modules

#: single records timed alone: (shape, dtype)
RECORDS = (((4, 128, 512), torch.float32), ((4, 32, 32128), torch.float32),
           ((80, 1536), torch.bfloat16))


def per_record(repeat: int = 150) -> dict[str, float]:
    """The fastest of ``repeat`` calls of ``tensor_stats`` on each of :data:`RECORDS`."""
    out = {}
    for shape, dtype in RECORDS:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
        recorder.tensor_stats(x)
        best = math.inf
        for _ in range(repeat):
            start = time.perf_counter()
            recorder.tensor_stats(x)
            best = min(best, time.perf_counter() - start)
        out["x".join(map(str, shape)) + " " + str(dtype).removeprefix("torch.")] = round(
            best * 1e6, 1)
    return out


def kernel_of(checkout: Path) -> Any:
    """The one-pass kernel module of another checkout, loaded beside this one's (its numba
    cache kept apart in a temporary folder: a cache written under another module's name
    would not load in that checkout's own runs)."""
    import numba

    source = checkout / "precision" / "runtime" / "capture" / "onepass.py"
    name = "precision.runtime.capture._onepass_against"
    spec = importlib.util.spec_from_file_location(name, source)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--against {checkout}: no {source}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    cache_dir = numba.config.CACHE_DIR
    numba.config.CACHE_DIR = tempfile.mkdtemp(prefix="precision-bench-numba-")
    try:
        spec.loader.exec_module(module)
        module.warm()
    finally:
        numba.config.CACHE_DIR = cache_dir
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=11)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: this process's CPU seconds (all threads) instead of wall time, "
                         "for a machine whose other work keeps the cores busy")
    ap.add_argument("--d-model", type=int, default=512,
                    help="the bench model's width (d_ff and the heads scale with it): the "
                         "statistics cost the same per element at any width, the forward "
                         "about d_model multiply-adds an element")
    ap.add_argument("--against", type=Path, metavar="CHECKOUT",
                    help="another checkout whose one-pass kernel is timed in the same rounds")
    args = ap.parse_args()
    mine = tensorstats.fused_kernel()
    loaded = tensorstats._FUSED  # restored after each swap (False where numba cannot load)
    other = None if args.against is None else kernel_of(args.against)
    if other is not None and mine is None:
        raise SystemExit("--against: this checkout's one-pass kernel does not load (numba)")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    model = bench_model(torch.float32, args.d_model)
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(2, 32128, (4, 128), generator=g),
              "attention_mask": torch.ones(4, 128, dtype=torch.long),
              "decoder_input_ids": torch.randint(2, 32128, (4, 32), generator=g)}
    path = Path(tempfile.mkdtemp(prefix="precision-bench-stats-")) / "stats.st"
    spent: list[float] = []
    original = recorder.tensor_stats

    def timed(*a: Any, **kw: Any) -> dict[str, Any]:
        start = clock()
        try:
            return original(*a, **kw)
        finally:
            spent[-1] += clock() - start

    single = per_record()
    single_against: dict[str, float] = {}
    if other is not None:
        tensorstats._FUSED = other
        single_against = per_record()
        tensorstats._FUSED = loaded
    recorder.tensor_stats = timed  # type: ignore[assignment]

    def plain() -> None:
        with torch.no_grad():
            model(**inputs)

    def stats() -> None:
        spent.append(0.0)
        with torch.no_grad(), precision.capture(model, path, mode="stats"):
            model(**inputs)

    hooked = [m for _, m in select_modules(model)]
    fixed = original(torch.ones(8))

    def hooks_only() -> None:
        handles = [m.register_forward_hook(lambda *_: None, with_kwargs=True) for m in hooked]
        try:
            plain()
        finally:
            for h in handles:
                h.remove()

    def untimed(statistics_of: Callable[..., dict[str, Any]], kernel: Any = loaded) -> None:
        """A stats capture with ``statistics_of`` as the records' statistics and ``kernel`` as
        the one-pass kernel, outside the statistics' timing."""
        recorder.tensor_stats = statistics_of  # type: ignore[assignment]
        tensorstats._FUSED = kernel
        try:
            with torch.no_grad(), precision.capture(model, path, mode="stats"):
                model(**inputs)
        finally:
            recorder.tensor_stats = timed  # type: ignore[assignment]
            tensorstats._FUSED = loaded

    def no_statistics() -> None:
        untimed(lambda t, **kw: dict(fixed))

    def against() -> None:
        untimed(original, other)

    def prepare() -> None:
        path.unlink(missing_ok=True)

    runs = {"plain": plain, "stats": stats, "hooks": hooks_only, "no_statistics": no_statistics}
    if other is not None:
        runs["against"] = against
    plain()
    for warm in runs.values():
        prepare()
        warm()
    spent.clear()
    times = interleaved(runs, args.repeat, prepare, clock)
    prepare()
    stats()  # the dump measured below is a real one (not no_statistics')
    spent.pop()

    def ratio(name: str) -> float:
        return round(statistics.median(
            t / p for t, p in zip(times[name], times["plain"], strict=True)), 3)

    compared = {} if other is None else {
        "against": str(args.against), "against_ratio": ratio("against"),
        "against_tensor_stats_us": single_against,
        "this_less_against": round(statistics.median(
            (t - a) / p for t, a, p in zip(times["stats"], times["against"], times["plain"],
                                           strict=True)), 3)}
    print(json.dumps({
        "precision": str(Path(precision.__file__).parents[1]), "threads": args.threads,
        "clock": args.clock, "d_model": args.d_model,
        "repeat": args.repeat, "forward_s": round(statistics.median(times["plain"]), 4),
        "capture_stats_ratio": ratio("stats"),
        "hooks_ratio": ratio("hooks"), "no_statistics_ratio": ratio("no_statistics"),
        "tensor_stats_s": round(statistics.median(spent), 4),
        "tensor_stats_share": round(statistics.median(
            s / p for s, p in zip(spent, times["plain"], strict=True)), 3),
        "sketch_share": round(sketch_share(model, inputs) / statistics.median(times["plain"]),
                              3),
        "records": len(precision.load(path).entries), "dump_bytes": path.stat().st_size,
        "tensor_stats_us": single} | compared))


if __name__ == "__main__":
    main()

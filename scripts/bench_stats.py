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
To compare two checkouts side by side, in one process: ``--against CHECKOUT`` loads that
checkout's whole package too (copied under another name, its numba cache apart) and times
its stats capture in the same rounds (``against_ratio``, and ``this_less_against``: the
median over rounds of this capture's time less that one's, over the forward), which a noisy
host's drift does not skew, and its single records (``against_tensor_stats_us``). Every
other round runs the captures in reverse order.

Prints one JSON line: medians over rounds, and ``tensor_stats_us``: the fastest of 150
calls of the statistics on single records of a few shapes and dtypes (microseconds).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import shutil
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
from precision.runtime.capture import recorder
from precision.runtime.capture.selection import select_modules

#: single records timed alone: (shape, dtype)
RECORDS = (((4, 128, 512), torch.float32), ((4, 32, 32128), torch.float32),
           ((80, 1536), torch.bfloat16))


def per_record(stats_of: dict[str, Callable[..., Any]],
               repeat: int = 150) -> dict[str, dict[str, float]]:
    """For each of ``stats_of`` (packages' ``tensor_stats`` by name), the fastest of
    ``repeat`` calls on each of :data:`RECORDS` (microseconds), the packages' calls taking
    turns."""
    out: dict[str, dict[str, float]] = {name: {} for name in stats_of}
    for shape, dtype in RECORDS:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
        best = dict.fromkeys(stats_of, math.inf)
        for fn in stats_of.values():
            fn(x)
        for _ in range(repeat):
            for name, fn in stats_of.items():
                start = time.perf_counter()
                fn(x)
                best[name] = min(best[name], time.perf_counter() - start)
        label = "x".join(map(str, shape)) + " " + str(dtype).removeprefix("torch.")
        for name, seconds in best.items():
            out[name][label] = round(seconds * 1e6, 1)
    return out


def package_of(checkout: Path) -> Any:
    """Another checkout's ``precision`` package, imported beside this one as
    ``precision_against`` (a copy in a temporary folder: the package imports itself
    relatively, and the copy's numba cache is its own; a cache written for one file under
    another module's name would not load in that checkout's own runs)."""
    source = checkout / "precision"
    if not (source / "__init__.py").is_file():
        raise SystemExit(f"--against {checkout}: no precision package there")
    into = Path(tempfile.mkdtemp(prefix="precision-bench-against-"))
    shutil.copytree(source, into / "precision_against",
                    ignore=shutil.ignore_patterns("__pycache__"))
    sys.path.insert(0, str(into))
    try:
        return importlib.import_module("precision_against")
    finally:
        sys.path.remove(str(into))


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
    other = None if args.against is None else package_of(args.against)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    model = bench_model(torch.float32, args.d_model)
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(2, 32128, (4, 128), generator=g),
              "attention_mask": torch.ones(4, 128, dtype=torch.long),
              "decoder_input_ids": torch.randint(2, 32128, (4, 32), generator=g)}
    path = Path(tempfile.mkdtemp(prefix="precision-bench-stats-")) / "stats.st"
    spent: list[float] = []  # this capture's statistics, seconds per capture
    spent_against: list[float] = []  # the other checkout's (timed alike, not reported)
    original = recorder.tensor_stats

    def timer(stats_of: Callable[..., Any], into: list[float]) -> Callable[..., Any]:
        def timed(*a: Any, **kw: Any) -> Any:
            start = clock()
            try:
                return stats_of(*a, **kw)
            finally:
                into[-1] += clock() - start

        return timed

    timed = timer(original, spent)
    stats_of = {"this": original}
    if other is not None:
        theirs = importlib.import_module(other.__name__ + ".runtime.capture.recorder")
        stats_of["against"] = theirs.tensor_stats
    single = per_record(stats_of)
    if other is not None:  # its records' statistics timed as this one's: the same cost
        theirs.tensor_stats = timer(theirs.tensor_stats, spent_against)
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

    def no_statistics() -> None:
        """The stats capture with each record's statistics a fixed answer (not timed)."""
        recorder.tensor_stats = lambda t, **kw: dict(fixed)  # type: ignore[assignment]
        try:
            with torch.no_grad(), precision.capture(model, path, mode="stats"):
                model(**inputs)
        finally:
            recorder.tensor_stats = timed  # type: ignore[assignment]

    def against() -> None:
        spent_against.append(0.0)
        with torch.no_grad(), other.capture(model, path, mode="stats"):
            model(**inputs)

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
    times = interleaved(runs, args.repeat, prepare, clock, alternate=True)
    prepare()
    stats()  # the dump measured below is a real one (not no_statistics')
    spent.pop()

    def ratio(name: str) -> float:
        return round(statistics.median(
            t / p for t, p in zip(times[name], times["plain"], strict=True)), 3)

    compared = {} if other is None else {
        "against": str(args.against), "against_ratio": ratio("against"),
        "against_tensor_stats_us": single["against"],
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
        "tensor_stats_us": single["this"]} | compared))


if __name__ == "__main__":
    main()

"""Timing and memory helpers shared by the benchmark scripts (no torch: compare's process
must stay as lean as `precision compare`'s)."""

from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def rss() -> int:
    """This process's proportional set size plus its children's (compare's workers): pages
    shared after fork count once in total, not once per process."""
    total = 0
    pids = ["self"] + [c for task in Path("/proc/self/task").iterdir()
                       for c in _read(task / "children").split()]
    for pid in pids:
        for line in _read(Path(f"/proc/{pid}/smaps_rollup")).splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1]) * 1024
    return total


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:  # a worker that just exited
        return ""


@contextmanager
def peak_rss() -> Iterator[dict[str, int]]:
    """Sample memory (:func:`rss`) every 2 ms; yields a dict that gets 'extra' (peak - start)."""
    out = {"extra": 0}
    start = rss()
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            out["extra"] = max(out["extra"], rss() - start)
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield out
    finally:
        stop.set()
        t.join()


def interleaved(fns: dict[str, Callable[[], Any]], repeat: int,
                prepare: Callable[[], None],
                clock: Callable[[], float] = time.perf_counter, *,
                alternate: bool = False) -> dict[str, list[float]]:
    """Run the functions round-robin so that machine-load drift hits them all alike;
    ``prepare`` runs untimed before each (removing old outputs, flushing dirty pages).
    ``clock``: wall time by default; ``time.process_time`` counts this process's CPU
    seconds (all its threads), which waiting for a busy core does not inflate.
    ``alternate``: every other round runs them in reverse order (what runs after what
    favours none)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeat):
        for name in list(fns)[::-1] if alternate and r % 2 else list(fns):
            fn = fns[name]
            prepare()
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    return times


#: `precision compare --help`, start to exit, median over runs (scripts/bench's target)
CLI_STARTUP_TARGET_S = 0.3


def cli_startup(repeat: int) -> dict[str, Any]:
    """Seconds that ``precision compare --help`` takes as a fresh process (the installed
    script next to this interpreter, else the same entry point through it): the median and
    spread over ``repeat`` runs after one warm-up (which fills the page cache)."""
    script = Path(sys.executable).with_name("precision")
    cmd = ([str(script)] if script.exists() else
           [sys.executable, "-c", "import sys; from precision.cli import main; main()"])
    times = []
    for i in range(repeat + 1):
        t0 = time.perf_counter()
        subprocess.run([*cmd, "compare", "--help"], check=True, stdout=subprocess.DEVNULL)
        if i:
            times.append(time.perf_counter() - t0)
    return {"median_s": round(statistics.median(times), 3),
            "spread_s": [round(min(times), 3), round(max(times), 3)],
            "target_s": CLI_STARTUP_TARGET_S}

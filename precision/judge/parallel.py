"""Spread independent pieces of work over worker processes, largest first.

``compare`` reads and reduces every tensor pair on its own, so the pairs can run anywhere.
Threads were tried first: numpy releases the GIL inside each operation, but the Python
between operations serialises them, and two threads ran only 1.3x one. Worker processes
share nothing but the files they read.

Each worker receives a *state* once (for compare: the two dump headers and the settings,
never tensor data) and then one task at a time. Tasks are handed out in decreasing cost
(longest-processing-time order), so the biggest tensor, usually the logits, starts first
and the small ones fill in around it; small tasks travel in batches, since handing out
hundreds of single tensors cost a visible share of two cores.

Workers are forked: a pool starts in about 10 ms and inherits the state without pickling.
``spawn`` and ``forkserver`` children re-import the caller's ``__main__``, which breaks any
script that calls ``precision.compare`` without an ``if __name__ == "__main__"`` guard. A
forked worker runs only numpy code that the parent has already imported, so locks held by
the parent's other threads (torch's, a progress bar's) are never taken in the child. Where
the platform is not Linux (no ``fork`` on Windows; on macOS, forking after the system
frameworks started can crash the child), the work runs in the calling process. Workers ignore
Ctrl-C; the parent cancels what has not started.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from ..errors import PrecisionError

S = TypeVar("S")
T = TypeVar("T")
R = TypeVar("R")

_STATE: Any = None


def cpu_count() -> int:
    """Cores this process may run on (honours affinity masks and cpusets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def run(fn: Callable[[S, T], R], tasks: Sequence[T], state: S, *, workers: int,
        cost: Callable[[T], float],
        progress: Callable[[int, int], None] | None = None) -> list[R]:
    """``[fn(state, task) for task in tasks]``, computed by ``workers`` processes.

    ``fn`` must be a module-level function. Results keep the order of ``tasks``. With one
    worker, or one task, everything runs here.
    """
    order = sorted(range(len(tasks)), key=lambda i: -cost(tasks[i]))
    results: list[Any] = [None] * len(tasks)
    if workers <= 1 or len(tasks) <= 1 or not sys.platform.startswith("linux"):
        for done, i in enumerate(order, 1):
            results[i] = fn(state, tasks[i])
            if progress is not None:
                progress(done, len(tasks))
        return results
    batches = _batches(order, [cost(t) for t in tasks], workers)
    pool = ProcessPoolExecutor(min(workers, len(batches)),
                               mp_context=multiprocessing.get_context("fork"),
                               initializer=_start_worker, initargs=(state,))
    try:
        with warnings.catch_warnings():  # Python 3.12+ warns on fork() in threaded processes
            warnings.filterwarnings("ignore", message=".*multi-threaded.*fork",
                                    category=DeprecationWarning)
            pending: dict[Future[list[R]], list[int]] = {
                pool.submit(_call, fn, [tasks[i] for i in batch]): batch for batch in batches}
        done_count = 0
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                batch = pending.pop(fut)
                for i, result in zip(batch, fut.result(), strict=True):
                    results[i] = result
                done_count += len(batch)
                if progress is not None:
                    progress(done_count, len(tasks))
    except BrokenProcessPool:
        raise PrecisionError("a compare worker process died (killed for memory?): retry "
                             "with --jobs 1 or a smaller --max-memory") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results


def _batches(order: list[int], costs: list[float], workers: int) -> list[list[int]]:
    """Consecutive runs of ``order`` (largest first) worth about 1/(8 x workers) of the total
    each: few enough that handing them out costs little, enough to balance the load."""
    share = sum(costs) / (8 * workers)
    batches: list[list[int]] = []
    current: list[int] = []
    acc = 0.0
    for i in order:
        current.append(i)
        acc += costs[i]
        if acc >= share:
            batches.append(current)
            current, acc = [], 0.0
    if current:
        batches.append(current)
    return batches


def _start_worker(state: Any) -> None:
    global _STATE
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    _STATE = state


def _call(fn: Callable[[Any, T], R], batch: list[T]) -> list[R]:
    return [fn(_STATE, task) for task in batch]

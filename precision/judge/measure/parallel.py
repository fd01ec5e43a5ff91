"""Spread independent pieces of work over worker processes, largest first.

``compare`` reads and reduces every tensor pair on its own, so the pairs can run anywhere.
Threads were tried first: numpy releases the GIL inside each operation, but the Python
between operations serialises them, and two threads ran only 1.3x one. Worker processes
share nothing but the files they read.

The calling process is one of the workers and forks the others, which inherit the *state*
(for compare: the dump headers and the settings, never tensor data) without pickling. Tasks
are ordered by decreasing cost (longest-processing-time order) and cut into batches; each
process takes the next batch from a counter in shared memory when it is free, so the
biggest tensor, usually the logits, starts first and the small ones fill in around it.
Each forked worker sends its results back once, when no batch is left, through a pipe
(``multiprocessing``'s, which pickles; only this process's own forked child writes it).
Before, a ``ProcessPoolExecutor`` (two forked workers, a manager thread, a queue per task
batch, the parent waiting) cost about 0.035 s per compare: a fifth of two jobs' time on the
benchmark pair once the fused kernel made the arithmetic 4x faster.

Workers are forked: ``spawn`` and ``forkserver`` children re-import the caller's
``__main__``, which breaks any script that calls ``precision.compare`` without an ``if
__name__ == "__main__"`` guard. A forked worker runs only numpy code that the parent has
already imported, so locks held by the parent's other threads (torch's, a progress bar's)
are never taken in the child. Where the platform is not Linux (no ``fork`` on Windows; on
macOS, forking after the system frameworks started can crash the child), the work runs in
the calling process. Workers ignore Ctrl-C; on Ctrl-C or an error the parent kills them.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import warnings
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any, TypeVar

from ...errors import PrecisionError

S = TypeVar("S")
T = TypeVar("T")
R = TypeVar("R")

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
    worker, or one task, everything runs here; otherwise this process is one of the workers
    and forks the others.
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
    ctx = multiprocessing.get_context("fork")
    queue = _Queue(ctx, len(batches))
    children: list[tuple[int, Connection]] = []
    try:
        with warnings.catch_warnings():  # Python 3.12+ warns on fork() in threaded processes
            warnings.filterwarnings("ignore", message=".*multi-threaded.*fork",
                                    category=DeprecationWarning)
            for _ in range(min(workers, len(batches)) - 1):
                children.append(_fork_worker(fn, tasks, state, batches, queue))
        while (b := queue.take()) is not None:
            for i in batches[b]:
                results[i] = fn(state, tasks[i])
            queue.finished(len(batches[b]))
            if progress is not None:
                progress(queue.done(), len(tasks))
        while children:
            pid, reader = children.pop()
            for b, out in _receive(pid, reader):  # closes the pipe, reaps the child
                for i, result in zip(batches[b], out, strict=True):
                    results[i] = result
    finally:
        for pid, reader in children:  # an error or Ctrl-C here: stop the others
            reader.close()
            _stop(pid)
    if progress is not None:
        progress(len(tasks), len(tasks))
    return results


class _Queue:
    """Batch numbers handed out in order to whichever process asks first, and a count of
    finished tasks, in memory shared by the forked workers."""

    def __init__(self, ctx: Any, size: int) -> None:
        self._lock = ctx.Lock()
        self._next = ctx.RawValue("l", 0)
        self._done = ctx.RawValue("l", 0)
        self._size = size

    def take(self) -> int | None:
        with self._lock:
            b = int(self._next.value)
            if b >= self._size:
                return None
            self._next.value = b + 1
            return b

    def finished(self, count: int) -> None:
        with self._lock:
            self._done.value += count

    def done(self) -> int:
        return int(self._done.value)


def _fork_worker(fn: Callable[[S, T], R], tasks: Sequence[T], state: S,
                 batches: list[list[int]], queue: _Queue) -> tuple[int, Connection]:
    """Fork a worker that takes batches from ``queue`` until none is left, then sends
    ``[(batch, results), ...]`` (or the error it met) through a pipe; returns (pid, the
    pipe's reading end)."""
    reader, writer = multiprocessing.get_context("fork").Pipe(duplex=False)
    pid = os.fork()
    if pid:
        writer.close()
        return pid, reader
    reader.close()  # the child: never returns
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    code = 0
    try:
        try:
            out: list[tuple[int, list[R]]] = []
            while (b := queue.take()) is not None:
                out.append((b, [fn(state, tasks[i]) for i in batches[b]]))
                queue.finished(len(batches[b]))
            writer.send(("ok", out))
        except BaseException as exc:  # carried to the parent
            try:
                writer.send(("error", exc))
            except Exception:  # an exception that cannot travel: its text can
                writer.send(("error", PrecisionError(f"{type(exc).__name__}: {exc}")))
    except BaseException:  # the parent sees the pipe closed without a message
        code = 1
    finally:
        os._exit(code)


def _receive(pid: int, reader: Connection) -> list[tuple[int, list[Any]]]:
    """A worker's results, from the pipe only that forked child of this process writes
    (never a file); its error raised here."""
    try:
        kind, payload = reader.recv()
    except EOFError:
        raise PrecisionError("a compare worker process died (killed for memory?): retry "
                             "with --jobs 1 or a smaller --max-memory") from None
    except Exception as exc:  # an error whose class cannot be rebuilt on this side
        raise PrecisionError(f"a compare worker failed and its error could not be read "
                             f"back ({type(exc).__name__}: {exc})") from None
    finally:
        reader.close()
        os.waitpid(pid, 0)
    if kind == "error":
        raise payload
    return list(payload)


def _stop(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


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

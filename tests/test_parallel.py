"""Worker processes for compare: order, scheduling, errors, memory budget, CLI sizes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from precision.cli import ByteSize, main
from precision.errors import DumpError, InputError, PrecisionError
from precision.judge.compare import (
    CHUNK_ELEMS,
    MIN_CHUNK_ELEMS,
    WORK_BYTES_PER_ELEMENT,
    compare,
    plan_jobs,
)
from precision.judge.measure import parallel

from .conftest import write_dump


def _pid_after_nap(state: float, task: int) -> tuple[int, int]:
    time.sleep(state)
    return task, os.getpid()


def _fail_on_three(state: None, task: int) -> int:
    if task == 3:
        raise DumpError("tensor 3 is truncated")
    return task


def _die_in_a_worker(parent: int, task: int) -> int:
    if os.getpid() != parent:  # this process works too: only the forked worker dies
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.05)  # leave the worker batches to take
    return task


def test_results_keep_task_order_and_two_processes_share_the_work() -> None:
    tasks = list(range(20))
    out = parallel.run(_pid_after_nap, tasks, 0.02, workers=2, cost=lambda t: float(t % 7))
    assert [t for t, _ in out] == tasks
    pids = {pid for _, pid in out}
    assert len(pids) == 2 and os.getpid() in pids  # this process is one of the two


def test_one_worker_runs_in_this_process_with_progress() -> None:
    seen: list[tuple[int, int]] = []
    out = parallel.run(_pid_after_nap, [1, 2, 3], 0.0, workers=1, cost=float,
                       progress=lambda d, n: seen.append((d, n)))
    assert {pid for _, pid in out} == {os.getpid()}
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_progress_reaches_the_total_with_processes() -> None:
    seen: list[tuple[int, int]] = []
    parallel.run(_pid_after_nap, list(range(10)), 0.0, workers=2, cost=float,
                 progress=lambda d, n: seen.append((d, n)))
    assert seen[-1] == (10, 10) and [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_a_worker_error_keeps_its_type_and_message() -> None:
    with pytest.raises(DumpError, match="tensor 3 is truncated"):
        parallel.run(_fail_on_three, list(range(8)), None, workers=2, cost=float)


def test_a_killed_worker_is_one_clear_error() -> None:
    with pytest.raises(PrecisionError, match="worker process died"):
        parallel.run(_die_in_a_worker, list(range(8)), os.getpid(), workers=2, cost=float)


def test_batches_cover_every_task_once_largest_first() -> None:
    costs = [5.0, 100.0, 1.0, 1.0, 50.0, 2.0, 2.0, 3.0] * 4
    order = sorted(range(len(costs)), key=lambda i: -costs[i])
    batches = parallel._batches(order, costs, workers=2)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(costs))) and flat == order
    assert len(batches[0]) == 1 and costs[batches[0][0]] == 100.0  # the big one alone, first
    assert 2 <= len(batches) <= 8 * 2 + 1


def test_memory_budget_shrinks_chunks_then_jobs() -> None:
    assert plan_jobs(2, None) == (2, CHUNK_ELEMS)
    jobs, chunk = plan_jobs(2, 8 << 20)
    assert jobs == 2 and chunk * WORK_BYTES_PER_ELEMENT * jobs <= 8 << 20
    assert chunk == (8 << 20) // 2 // WORK_BYTES_PER_ELEMENT < CHUNK_ELEMS
    one_job = MIN_CHUNK_ELEMS * WORK_BYTES_PER_ELEMENT
    assert plan_jobs(4, one_job * 2) == (2, MIN_CHUNK_ELEMS)  # fewer jobs, not tinier chunks
    assert plan_jobs(8, 1 << 40) == (8, CHUNK_ELEMS)  # a large budget does not grow chunks
    with pytest.raises(InputError, match="below"):
        plan_jobs(1, one_job - 1)


def test_compare_under_a_small_budget_matches_the_default(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules["precision.judge.compare"], "PARALLEL_MIN_ELEMENTS", 0)
    rng = np.random.default_rng(1)
    tensors = {f"l{i}:out": rng.standard_normal(50_000).astype(np.float32) for i in range(6)}
    a = write_dump(tmp_path / "a.st", tensors)
    b = write_dump(tmp_path / "b.st", {k: v.astype(np.float16) for k, v in tensors.items()},
                   dtype="float16")
    free = compare(a, b, jobs=1)
    tight = compare(a, b, jobs=2, max_memory=MIN_CHUNK_ELEMS * WORK_BYTES_PER_ELEMENT)
    for r1, r2 in zip(free.rows, tight.rows, strict=True):
        assert r1.key == r2.key and r1.status == r2.status
        assert r1.metrics is not None and r2.metrics is not None
        assert r2.metrics.max_abs == r1.metrics.max_abs
        assert r2.metrics.rel_l2 == pytest.approx(r1.metrics.rel_l2, rel=1e-9)


def test_a_script_without_a_main_guard_can_compare_in_parallel(tmp_path: Path) -> None:
    """spawn/forkserver would re-run this script in each worker; fork does not."""
    rng = np.random.default_rng(2)
    tensors = {f"l{i}:out": rng.standard_normal(1000).astype(np.float32) for i in range(4)}
    a = write_dump(tmp_path / "a.st", tensors)
    script = tmp_path / "check.py"
    script.write_text(
        "import sys, precision\n"
        "c = sys.modules['precision.judge.compare']\n"
        "c.PARALLEL_MIN_ELEMENTS = 0\n"
        f"r = c.compare({str(a)!r}, {str(a)!r}, jobs=2)\n"
        "print('RESULT', r.summary)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-800:]
    assert done.stdout.count("RESULT") == 1 and "4 OK" in done.stdout


@pytest.mark.parametrize(("text", "size"), [("1048576", 1 << 20), ("512K", 512 << 10),
                                            ("256M", 256 << 20), ("2G", 2 << 30),
                                            ("1.5g", 3 << 29), ("64MiB", 64 << 20)])
def test_sizes_parse(text: str, size: int) -> None:
    assert ByteSize().convert(text, None, None) == size


@pytest.mark.parametrize("text", ["0", "-5M", "lots", "12X", "inf", "1e400", "nan"])
def test_bad_sizes_are_usage_errors(text: str, tmp_path: Path) -> None:
    a = write_dump(tmp_path / "a.st", {"x:out": np.ones(4, np.float32)})
    result = CliRunner().invoke(main, ["compare", str(a), str(a), "--max-memory", text])
    assert result.exit_code == 2 and "--max-memory" in result.output
    assert "Traceback" not in result.output

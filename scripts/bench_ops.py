"""Operator level's cost (scripts/bench --only ops): ops in stats mode against the plain
forward, and full ops against msprobe L1's tensor dump (time and size) in the same process,
when msprobe (``mindstudio-probe``) is importable; otherwise that comparison is skipped."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from benchutil import interleaved

import precision


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run(model: torch.nn.Module, inputs: dict[str, torch.Tensor], repeat: int,
        work: Path) -> dict[str, Any]:
    """Ratios are medians over interleaved rounds of (capture / plain forward)."""
    full_path, stats_path = work / "ops-full.st", work / "ops-stats.st"

    def forward() -> None:
        with torch.no_grad():
            model(**inputs)

    def captured(mode: str, path: Path) -> Callable[[], None]:
        def go() -> None:
            with torch.no_grad(), precision.capture(model, path, mode=mode, level="ops"):
                model(**inputs)
        return go

    def prepare() -> None:
        full_path.unlink(missing_ok=True)
        stats_path.unlink(missing_ok=True)

    forward()
    captured("full", full_path)()  # warm up
    prepare()
    times = interleaved({"plain": forward, "ops_stats": captured("stats", stats_path),
                         "ops_full": captured("full", full_path)}, repeat, prepare)

    def ratio(name: str) -> float:
        return statistics.median(t / p for t, p in zip(times[name], times["plain"], strict=True))

    prepare()
    captured("full", full_path)()
    result: dict[str, Any] = {
        "forward_s": round(statistics.median(times["plain"]), 4),
        "ops_stats_s": round(statistics.median(times["ops_stats"]), 4),
        "ops_full_s": round(statistics.median(times["ops_full"]), 4),
        "ops_stats_ratio": round(ratio("ops_stats"), 3),
        "ops_full_ratio": round(ratio("ops_full"), 3),
        "ops_records": len(precision.load(full_path).entries),
        "ops_full_mb": round(full_path.stat().st_size / 1e6, 1),
        "targets": {"ops_stats_ratio": 2.0, "ops_full_s": "< msprobe_l1_s",
                    "ops_full_mb": "< msprobe_l1_mb"},
    }
    full_path.unlink(missing_ok=True)
    result |= msprobe_l1(model, forward, repeat, work)
    met = result["ops_stats_ratio"] <= 2.0
    if "msprobe_l1_s" in result:
        met = met and result["ops_full_s"] < result["msprobe_l1_s"] \
            and result["ops_full_mb"] < result["msprobe_l1_mb"]
    result["meets_targets"] = met
    return result


def msprobe_l1(model: torch.nn.Module, forward: Callable[[], None], repeat: int,
               work: Path) -> dict[str, Any]:
    """msprobe's L1 tensor dump (forward inputs and outputs) of the same forward. Run last:
    msprobe patches torch's APIs for the rest of the process."""
    try:
        from msprobe.pytorch import PrecisionDebugger
    except ImportError as exc:
        return {"msprobe": f"skipped: msprobe is not importable ({exc})"}
    dump = Path(tempfile.mkdtemp(prefix="msprobe-", dir=work))
    config = work / "msprobe.json"
    config.write_text(json.dumps({
        "task": "tensor", "dump_path": str(dump), "rank": [], "step": [], "level": "L1",
        "tensor": {"scope": [], "list": [], "data_mode": ["forward"]}}))
    debugger = PrecisionDebugger(config_path=str(config))
    took, size = [], 0
    for _ in range(max(1, min(repeat, 3))):
        start = time.perf_counter()
        debugger.start(model)
        forward()
        debugger.stop()
        debugger.step()
        took.append(time.perf_counter() - start)
        size = max(size, max(folder_bytes(s) for s in dump.glob("step*")))
    records = sum(len(json.loads(f.read_text())["data"]) for f in
                  sorted(dump.glob("step*"))[0].rglob("dump.json"))
    return {"msprobe": "L1 tensor dump, forward inputs and outputs (.pt)",
            "msprobe_l1_s": round(statistics.median(took), 4),
            "msprobe_l1_mb": round(size / 1e6, 1), "msprobe_l1_records": records}

"""Benchmark behind scripts/bench: see `scripts/bench --help`."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import transformers

import precision
from precision import streaming
from precision.compare import compare


def bench_model(dtype: torch.dtype) -> transformers.T5ForConditionalGeneration:
    """flan-t5-small shape (d_model 512, 8+8 blocks, d_ff 1024, vocab 32128), seeded."""
    cfg = transformers.T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=8,
                                num_decoder_layers=8, num_heads=6, feed_forward_proj="gated-gelu",
                                tie_word_embeddings=False, decoder_start_token_id=0)
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(cfg).to(dtype).eval()


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_rss() -> Iterator[dict[str, int]]:
    """Sample resident memory every 2 ms; yields a dict that gets 'extra' (peak - start)."""
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


def timed(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(fns: dict[str, Callable[[], Any]], repeat: int,
                prepare: Callable[[], None]) -> dict[str, list[float]]:
    """Run the functions round-robin so that machine-load drift hits them all alike;
    ``prepare`` runs untimed before each (removing old outputs, flushing dirty pages)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            prepare()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def ratio(times: dict[str, list[float]], name: str) -> float:
    """Median over rounds of (this run / the plain forward of the same round)."""
    return statistics.median(t / p for t, p in zip(times[name], times["plain"], strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=7, help="rounds per timing (median)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--enc-len", type=int, default=128)
    ap.add_argument("--dec-len", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(tempfile.mkdtemp(prefix="precision-bench-"))
    model = bench_model(torch.float32)
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(2, 32128, (args.batch, args.enc_len), generator=g),
              "attention_mask": torch.ones(args.batch, args.enc_len, dtype=torch.long),
              "decoder_input_ids": torch.randint(2, 32128, (args.batch, args.dec_len),
                                                 generator=g)}

    def forward() -> None:
        with torch.no_grad():
            model(**inputs)

    def captured(mode: str, path: Path) -> Callable[[], None]:
        """A capture into a fresh file (deleting the old one first is not capture's cost)."""
        def run() -> None:
            with torch.no_grad(), precision.capture(model, path, mode=mode):
                model(**inputs)
        return run

    forward()  # warm up
    full_path, stats_path = work / "full.st", work / "stats.st"

    def prepare() -> None:
        full_path.unlink(missing_ok=True)
        stats_path.unlink(missing_ok=True)
        os.sync()

    prepare()
    captured("full", full_path)()  # warm up (and fill the host buffer pool)
    times = interleaved({"plain": forward, "full": captured("full", full_path),
                         "stats": captured("stats", stats_path)}, args.repeat, prepare)
    plain, full, stats = (statistics.median(times[k]) for k in ("plain", "full", "stats"))
    prepare()
    streaming._POOL.clear()  # count the host buffer: measure as a first capture would
    with peak_rss() as mem_full:
        captured("full", full_path)()
    dump = precision.load(full_path)
    tensor_bytes = sum(t.nbytes for t in dump.tensors.values())

    half = bench_model(torch.float16)
    half_path = work / "fp16.st"
    with torch.no_grad(), precision.capture(half, half_path):
        half(**inputs)
    compare_bytes = full_path.stat().st_size + half_path.stat().st_size
    compare(full_path, half_path)  # warm the page cache, as a second compare would see it
    t_cmp = timed(lambda: compare(full_path, half_path), max(1, args.repeat // 2))
    t_cmp1 = timed(lambda: compare(full_path, half_path, jobs=1), 1)
    with peak_rss() as mem_cmp:
        compare(full_path, half_path)
    largest = max(t.nbytes for t in dump.tensors.values())

    result = {
        "model": "flan-t5-small shape, seeded, CPU fp32",
        "batch": f"{args.batch} x {args.enc_len} encoder / {args.dec_len} decoder tokens",
        "threads": torch.get_num_threads(),
        "repeat": args.repeat,
        "forward_s": round(plain, 4), "forward_spread_s": [round(min(times["plain"]), 4),
                                                           round(max(times["plain"]), 4)],
        "capture_full_s": round(full, 4), "capture_stats_s": round(stats, 4),
        "capture_full_ratio": round(ratio(times, "full"), 3),
        "capture_stats_ratio": round(ratio(times, "stats"), 3),
        "tensors": len(dump.tensors), "tensor_mb": round(tensor_bytes / 1e6, 1),
        "dump_mb": round(full_path.stat().st_size / 1e6, 1),
        "dump_size_ratio": round(full_path.stat().st_size / tensor_bytes, 4),
        "capture_full_peak_extra_mb": round(mem_full["extra"] / 1e6, 1),
        "compare_input_mb": round(compare_bytes / 1e6, 1),
        "compare_s": round(t_cmp, 3), "compare_mb_per_s": round(compare_bytes / 1e6 / t_cmp, 1),
        "compare_jobs1_mb_per_s": round(compare_bytes / 1e6 / t_cmp1, 1),
        "compare_peak_extra_mb": round(mem_cmp["extra"] / 1e6, 1),
        "largest_tensor_mb": round(largest / 1e6, 1),
        "targets": {"capture_full_ratio": 1.5, "capture_stats_ratio": 1.3,
                    "dump_size_ratio": 1.1, "compare_mb_per_s": 250},
    }
    result["meets_targets"] = (result["capture_full_ratio"] <= 1.5
                               and result["capture_stats_ratio"] <= 1.3
                               and result["dump_size_ratio"] <= 1.1
                               and result["compare_mb_per_s"] >= 250)
    for p in (full_path, stats_path, half_path):
        p.unlink(missing_ok=True)
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()

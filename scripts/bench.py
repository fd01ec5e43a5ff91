"""Benchmark behind scripts/bench: see `scripts/bench --help`."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench_ops  # scripts/ is on the path
import bench_verdicts
import torch
import transformers
from benchutil import CLI_STARTUP_TARGET_S, cli_startup, interleaved, peak_rss

import precision
from precision.runtime.capture import streaming


def bench_model(dtype: torch.dtype,
                d_model: int = 512) -> transformers.T5ForConditionalGeneration:
    """flan-t5-small shape (d_model 512, 8+8 blocks, d_ff 1024, 6 heads, vocab 32128), seeded;
    another ``d_model`` scales d_ff and the heads with it."""
    cfg = transformers.T5Config(vocab_size=32128, d_model=d_model, d_kv=64, d_ff=2 * d_model,
                                num_layers=8, num_decoder_layers=8,
                                num_heads=6 * d_model // 512, feed_forward_proj="gated-gelu",
                                tie_word_embeddings=False, decoder_start_token_id=0)
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(cfg).to(dtype).eval()


def ratio(times: dict[str, list[float]], name: str) -> float:
    """Median over rounds of (this run / the plain forward of the same round)."""
    return statistics.median(t / p for t, p in zip(times[name], times["plain"], strict=True))


def sketch_share(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    """Seconds the count sketches of one stats capture take, measured apart: what leaving
    the sketch out would save, summed over the records a stats capture takes statistics of.
    With the one-pass kernel (numba): each record's kernel time less that of the kernel
    without the sketch (``sketch=False``), the fastest of 3 calls of each; without numba,
    torch's ``tensorstats.sketch`` of each record (the fastest of 3)."""
    from precision.runtime.capture import onepass, recorder, tensorstats

    records: list[torch.Tensor] = []
    original = recorder.tensor_stats

    def keep(t: torch.Tensor, **kw: Any) -> dict[str, Any]:
        records.append(t.detach().clone())
        return original(t, **kw)

    recorder.tensor_stats = keep  # type: ignore[assignment]
    try:
        with torch.no_grad(), precision.capture(model, None, mode="stats"):
            model(**inputs)
    finally:
        recorder.tensor_stats = original

    def fastest(f: Callable[[], Any]) -> float:
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            f()
            best = min(best, time.perf_counter() - t0)
        return best

    if tensorstats.fused_kernel() is None:
        return sum(fastest(lambda t=t: tensorstats.sketch(t)) for t in records)
    total = 0.0
    for t in records:
        a = t.reshape(-1).to(torch.float32 if t.dtype != torch.float64 else t.dtype).numpy()
        if a.size:
            total += fastest(lambda a=a: onepass.summary(a)) - fastest(
                lambda a=a: onepass.summary(a, sketch=False))
    return total


def capture_in_ranks(ranks: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Capture overhead (captured / plain forward) per rank of a ``torchrun`` job on CPU: the
    batch is split between the ranks and so are the cores."""
    folder = work / f"ranks{ranks}"
    folder.mkdir()
    cores = os.cpu_count() or 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
           "--master-port", str(29500 + ranks), str(Path(__file__).with_name("bench_ranks.py")),
           "--batch", str(max(1, args.batch // ranks)), "--enc-len", str(args.enc_len),
           "--dec-len", str(args.dec_len), "--repeat", str(args.repeat),
           "--threads", str(max(1, cores // ranks)), "--folder", str(folder)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True,
                          env=os.environ | {"OMP_NUM_THREADS": str(max(1, cores // ranks))})
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=7, help="rounds per timing (median)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--enc-len", type=int, default=128)
    ap.add_argument("--dec-len", type=int, default=32)
    ap.add_argument("--only", choices=["speed", "capture", "verdicts", "ops", "startup"],
                    help="run one part: speed (capture, compare, CLI start-up), capture "
                         "(the capture ratios alone, with the sketch's share), verdicts "
                         "(false flags on healthy pairs, smallest detected drift), ops "
                         "(--level ops against the plain forward and msprobe L1) or startup "
                         "(`precision compare --help` alone); default all")
    args = ap.parse_args()
    if args.only == "startup":
        startup = cli_startup(max(args.repeat, 7))
        json.dump({"cli_startup": startup,
                   "meets_targets": startup["median_s"] <= CLI_STARTUP_TARGET_S},
                  sys.stdout, indent=1)
        print()
        return
    if args.only == "verdicts":
        json.dump({"verdicts": bench_verdicts.run()}, sys.stdout, indent=1)
        print()
        return
    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(tempfile.mkdtemp(prefix="precision-bench-"))
    model = bench_model(torch.float32)
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(2, 32128, (args.batch, args.enc_len), generator=g),
              "attention_mask": torch.ones(args.batch, args.enc_len, dtype=torch.long),
              "decoder_input_ids": torch.randint(2, 32128, (args.batch, args.dec_len),
                                                 generator=g)}
    if args.only == "ops":
        json.dump({"ops": bench_ops.run(model, inputs, args.repeat, work)}, sys.stdout, indent=1)
        print()
        return

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
    capture = {"forward_s": round(plain, 4), "forward_spread_s": [
        round(min(times["plain"]), 4), round(max(times["plain"]), 4)],
        "capture_full_ratio": round(ratio(times, "full"), 3),
        "capture_stats_ratio": round(ratio(times, "stats"), 3),
        "sketch_share": round(sketch_share(model, inputs) / plain, 3)}
    if args.only == "capture":
        json.dump({"threads": torch.get_num_threads(), "repeat": args.repeat} | capture
                  | {"targets": {"capture_full_ratio": 1.5, "capture_stats_ratio": 1.15}},
                  sys.stdout, indent=1)
        print()
        return
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
    cmp, cmp_numpy = (json.loads(subprocess.run(
        [sys.executable, str(Path(__file__).with_name("bench_compare.py")), str(full_path),
         str(half_path), "--repeat", str(args.repeat), "--kernel", kernel],
        capture_output=True, text=True, check=True).stdout) for kernel in ("auto", "numpy"))
    largest = max(t.nbytes for t in dump.tensors.values())
    ranks = {n: capture_in_ranks(n, args, work) for n in (1, 2)}
    startup = cli_startup(max(args.repeat, 7))

    result = {
        "model": "flan-t5-small shape, seeded, CPU fp32",
        "batch": f"{args.batch} x {args.enc_len} encoder / {args.dec_len} decoder tokens",
        "threads": torch.get_num_threads(),
        "repeat": args.repeat,
        **capture, "capture_full_s": round(full, 4), "capture_stats_s": round(stats, 4),
        "tensors": len(dump.tensors), "tensor_mb": round(tensor_bytes / 1e6, 1),
        "dump_mb": round(full_path.stat().st_size / 1e6, 1),
        "dump_size_ratio": round(full_path.stat().st_size / tensor_bytes, 4),
        "capture_full_peak_extra_mb": round(mem_full["extra"] / 1e6, 1),
        "compare_input_mb": round(compare_bytes / 1e6, 1),
        "compare_s": round(cmp["jobs2_s"], 3),
        "compare_mb_per_s": round(compare_bytes / 1e6 / cmp["jobs2_s"], 1),
        "compare_jobs1_mb_per_s": round(compare_bytes / 1e6 / cmp["jobs1_s"], 1),
        "compare_jobs2_speedup": round(cmp["jobs2_speedup"], 2),
        "compare_kernel": cmp["kernel"],
        "compare_numpy_mb_per_s": round(compare_bytes / 1e6 / cmp_numpy["jobs2_s"], 1),
        "compare_numpy_jobs1_mb_per_s": round(compare_bytes / 1e6 / cmp_numpy["jobs1_s"], 1),
        "read_floor_mb_per_s": round(compare_bytes / 1e6 / cmp["read_s"], 1),
        "read_safetensors_mb_per_s": round(compare_bytes / 1e6 / cmp["read_safetensors_s"], 1),
        "compare_peak_extra_mb": round(cmp["peak_extra_bytes"] / 1e6, 1),
        "compare_max_memory_4m_peak_extra_mb": round(cmp["capped_peak_extra_bytes"] / 1e6, 1),
        "capture_ratio_1_rank": ranks[1]["ratio"], "capture_ratio_2_ranks": ranks[2]["ratio"],
        "capture_ratio_2_ranks_per_rank": ranks[2]["per_rank_ratio"],
        "largest_tensor_mb": round(largest / 1e6, 1),
        "cli_startup_s": startup["median_s"], "cli_startup_spread_s": startup["spread_s"],
        "targets": {"capture_full_ratio": 1.5, "capture_stats_ratio": 1.15,
                    "dump_size_ratio": 1.1, "compare_mb_per_s": 1500,
                    "compare_jobs1_mb_per_s": 800,
                    "compare_jobs2_speedup": "close to 2 (>= 1.7)",
                    "capture_ratio_2_ranks": "<= capture_ratio_1_rank (+5% noise)",
                    "cli_startup_s": CLI_STARTUP_TARGET_S},
    }
    result["meets_targets"] = (result["capture_full_ratio"] <= 1.5
                               and result["capture_stats_ratio"] <= 1.15
                               and result["dump_size_ratio"] <= 1.1
                               and result["compare_mb_per_s"] >= 1500
                               and result["compare_jobs1_mb_per_s"] >= 800
                               and result["compare_jobs2_speedup"] >= 1.7
                               and ranks[2]["ratio"] <= 1.05 * ranks[1]["ratio"]
                               and startup["median_s"] <= CLI_STARTUP_TARGET_S)
    for p in (full_path, stats_path, half_path):
        p.unlink(missing_ok=True)
    if args.only is None:
        result["ops"] = bench_ops.run(model, inputs, args.repeat, work)  # last: msprobe
        result["meets_targets"] = result["meets_targets"] and result["ops"]["meets_targets"]
        result["verdicts"] = bench_verdicts.run()
        result["meets_targets"] = result["meets_targets"] and all(
            result["verdicts"][s]["false_flags"] == 0 for s in ("calibration", "check"))
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()

"""Capture overhead inside each rank of a torchrun job (run by scripts/bench.py).

Every rank takes ``batch`` sequences (its share of the job's batch) and alternates plain
forwards and captured forwards into its own shard, ``rank<r>.st``; rank 0 prints, as JSON,
the median over rounds of (captured / plain) of the slowest rank.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from bench import bench_model  # scripts/ is on the path: this file runs as a script

import precision


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, required=True, help="sequences per rank")
    ap.add_argument("--enc-len", type=int, default=128)
    ap.add_argument("--dec-len", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, required=True, help="torch threads per rank")
    ap.add_argument("--folder", required=True)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(args.threads)
    model = bench_model(torch.float32)
    g = torch.Generator().manual_seed(rank)
    inputs = {"input_ids": torch.randint(2, 32128, (args.batch, args.enc_len), generator=g),
              "attention_mask": torch.ones(args.batch, args.enc_len, dtype=torch.long),
              "decoder_input_ids": torch.randint(2, 32128, (args.batch, args.dec_len),
                                                 generator=g)}
    shard = Path(args.folder) / f"rank{rank}.st"

    def plain() -> None:
        with torch.no_grad():
            model(**inputs)

    def captured() -> None:
        with torch.no_grad(), precision.capture(model, shard, force=True):
            model(**inputs)

    plain()
    captured()  # warm up, and fill the host buffer pool
    ratios = []
    for _ in range(args.repeat):
        times = []
        for fn in (plain, captured):
            dist.barrier()  # ranks start together, as in a real job
            shard.unlink(missing_ok=True)
            os.sync()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        ratios.append(times[1] / times[0])
    mine = statistics.median(ratios)
    every: list[float | None] = [None] * world
    dist.all_gather_object(every, mine)
    if rank == 0:
        json.dump({"ranks": world, "per_rank_ratio": [round(r or 0, 3) for r in every],
                   "ratio": round(max(r or 0 for r in every), 3)}, sys.stdout)
        print()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

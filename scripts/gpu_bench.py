"""Capture overhead on a GPU (or NPU), in one short run: prints one JSON object.

    python scripts/gpu_bench.py [--device cuda] [--rounds 7] [--no-decoder]

Models, built here from their configs with seeded weights (nothing downloaded, nothing to
carry): scripts/bench's flan-t5-small shape, and a decoder of SmolLM2-135M's shape (Llama,
30 layers, width 576; ``--no-decoder`` leaves it out), both in bf16 at batch 8 x 256 tokens
(T5: 64 decoder tokens). For each, the plain forward, a full capture, a stats capture
(statistics deferred on the device: precision/runtime/capture/deferred.py) and a stats
capture reading each record as it is made (``deferred=False``, the path before) run
round-robin; each ratio is the median over rounds of that round's time over the plain
forward's (the device synchronised before and after each). Also the dump bytes of each
mode, and whether each captured forward runs under ``torch.cuda.set_sync_debug_mode
("error")`` (``"model"`` where the plain forward itself synchronises, so the check says
nothing). The CPU figures are scripts/bench's; docs/performance.md and docs/cuda.md say
what a run showed. ``--device cpu`` runs the same steps on the CPU (to check the script).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from bench import bench_model  # scripts/ is on the path

import precision
from precision.runtime.devices import streams


def decoder() -> torch.nn.Module:
    """SmolLM2-135M's shape (its config.json's numbers), seeded random weights."""
    cfg = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, hidden_act="silu",
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
        tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def models(device: str, with_decoder: bool) -> dict[str, tuple[torch.nn.Module, dict[str, Any]]]:
    g = torch.Generator().manual_seed(0)
    out = {"flan-t5-small shape": (bench_model(torch.bfloat16), {
        "input_ids": torch.randint(2, 32128, (8, 256), generator=g),
        "decoder_input_ids": torch.randint(2, 32128, (8, 64), generator=g)})}
    if with_decoder:
        out["smollm2-135m shape"] = (decoder().to(torch.bfloat16), {
            "input_ids": torch.randint(3, 49152, (8, 256), generator=g)})
    return {name: (model.to(device), {k: v.to(device) for k, v in feed.items()})
            for name, (model, feed) in out.items()}


def sync_free(run: Callable[[], None], device: str) -> str:
    """"yes" when ``run`` raises nothing under torch's sync debug mode "error", else the
    first line of what it raised."""
    if not device.startswith("cuda"):
        return "not checked (no CUDA)"
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
        return "yes"
    except RuntimeError as exc:
        return f"no: {str(exc).splitlines()[0][:200]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")


def measure(model: torch.nn.Module, feed: dict[str, Any], device: str, rounds: int,
            work: Path) -> dict[str, Any]:
    api = streams(torch.device(device).type)

    def sync() -> None:
        if api is not None:
            api.synchronize()

    def plain() -> None:
        with torch.no_grad():
            model(**feed)

    def captured(mode: str, deferred: bool | None = None) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad(), precision.capture(model, work / f"{mode}.st", mode=mode,
                                                    force=True, deferred=deferred):
                model(**feed)
        return run

    runs = {"plain": plain, "full": captured("full"), "stats": captured("stats"),
            "stats_per_record": captured("stats", deferred=False)}
    for run in runs.values():  # warm up: kernels, allocator, pinned host buffers
        run()
        sync()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            sync()
            t0 = time.perf_counter()
            run()
            sync()
            times[name].append(time.perf_counter() - t0)
    plain_sync = sync_free(plain, device)
    return {
        "forward_ms": round(statistics.median(times["plain"]) * 1e3, 2),
        **{f"{k}_ratio": round(statistics.median(
            t / p for t, p in zip(times[k], times["plain"], strict=True)), 3)
           for k in runs if k != "plain"},
        "dump_bytes": {m: (work / f"{m}.st").stat().st_size for m in ("full", "stats")},
        "records": len(precision.load(work / "stats.st").entries),
        "sync_free": {"plain": plain_sync} | {
            k: (sync_free(runs[k], device) if plain_sync == "yes"
                else "model" if plain_sync.startswith("no") else plain_sync)
            for k in ("full", "stats")},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-decoder", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="precision-gpu-bench-"))
    result: dict[str, Any] = {
        "torch": torch.__version__, "transformers": transformers.__version__,
        "device": args.device, "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "batch": "8 x 256 tokens (T5: 64 decoder tokens), bf16", "rounds": args.rounds}
    for name, (model, feed) in models(args.device, not args.no_decoder).items():
        t0 = time.perf_counter()
        try:
            result[name] = measure(model, feed, args.device, args.rounds, work)
        except Exception as exc:  # record it and go on: one run, several models
            result[name] = {"error": f"{type(exc).__name__}: {exc}"}
        result[name + " s"] = round(time.perf_counter() - t0, 1)
        for f in work.iterdir():
            f.unlink()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

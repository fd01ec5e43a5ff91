"""Real CUDA fp16/bf16/fp32 captures against CPU fp32 baselines, as a user would run them.

    python scripts/gpu_check.py OUT_DIR [--models DIR] [--device cuda]

For each model (the fixtures, and the real pretrained models found in ``--models``): a CPU
fp32 baseline with its fp16 and bf16 references (``capture --expect``), then captures on the
device in fp16, bf16 and fp32 replaying the baseline's inputs, each compared with the CLI.
Also the planted fp16 overflows, stats mode on the device, a bf16 training step, capture
overhead on the device, and compare's scaling with ``--jobs`` on this machine's cores.
Writes ``OUT_DIR/gpu_check.json``; docs/cuda.md records a run. ``--device cpu`` runs the
same steps with the CPU as the target, to check the script itself where there is no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
#: real models: folder -> the transformers class to feed random tokens with one padded row,
#: or None for the built-in prompts through the model's tokenizer (a left-padded batch)
REAL: dict[str, str | None] = {
    "rxnfp-bert-class": "BertForSequenceClassification", "rxnmapper-albert": "AlbertForMaskedLM",
    "iglm-gpt2": "GPT2LMHeadModel", "smollm2-135m": None}


def cli(*args: object) -> tuple[int, str]:
    """Run ``precision ARGS`` in a fresh process (as a user would); exit code and output."""
    done = subprocess.run([sys.executable, "-m", "precision.cli", *map(str, args)],
                          capture_output=True, text=True, env=os.environ | {"COLUMNS": "200"})
    return done.returncode, (done.stdout + done.stderr).strip()


def compare(base: Path, target: Path, out: Path) -> dict[str, Any]:
    """``precision compare --json``: verdict, flagged rows, first divergence, notes."""
    code, text = cli("compare", base, target, "--json", out, "--force")
    if not out.is_file():
        return {"exit": code, "error": text.splitlines()[-1:]}
    report = json.loads(out.read_text())
    rows = report["rows"]
    flagged = [f"{r['key']} {r['status']}" for r in rows if r["status"] != "OK"]
    return {"exit": code, "summary": report["summary"], "rows": len(rows),
            "flagged": len(flagged), "flagged_first": flagged[:5],
            "notes": report.get("notes", [])}


def model_args(name: str, models: Path | None, work: Path) -> tuple[list[str], list[str]] | None:
    """CLI arguments that load model ``name`` and those that feed it (a replay leaves them
    out); None when it is not here."""
    if name in REAL:
        if models is None or not (models / name / "config.json").is_file():
            return None
        cls = REAL[name]
        if cls is None:
            return ["--model", str(models / name)], []
        feed = work / f"{name}.feed.safetensors"
        if not feed.exists():
            import torch
            from safetensors.torch import save_file
            from transformers import AutoConfig

            vocab = AutoConfig.from_pretrained(models / name).vocab_size
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(5, min(vocab, 30), (3, 40), generator=g)
            mask = torch.ones_like(ids)
            mask[2, 28:] = 0
            save_file({"input_ids": ids, "attention_mask": mask}, str(feed))
        return ["--model", str(models / name), "--class", cls], ["--feed", str(feed)]
    return ["--model", str(FIXTURES / name)], []


def capture(args: list[str], out: Path, device: str, dtype: str, *extra: object) -> str | None:
    """Capture; None when it worked, else its last line."""
    code, text = cli("capture", *args, "--device", device, "--dtype", dtype, "--force", "-q",
                     "-o", out, *extra)
    return None if code == 0 else (text.splitlines() or ["?"])[-1]


def pairs(models: Path | None, device: str, work: Path,
          names: tuple[str, ...] = ("tiny-flan-t5", "tiny-qwen3", *REAL)) -> dict[str, Any]:
    """Healthy pairs: CPU fp32 (with references) against the device in fp16, bf16, fp32."""
    found: dict[str, Any] = {}
    for name in [*names]:
        given = model_args(name, models, work)
        if given is None:
            found[name] = "absent"
            continue
        args, feed = given
        base = work / f"{name}.base.st"
        failed = capture(args + feed, base, "cpu", "fp32", "--expect", "fp16", "--expect", "bf16")
        if failed:
            found[name] = {"baseline": failed}
            continue
        runs: dict[str, Any] = {}
        for dtype in ("fp16", "bf16", "fp32"):
            target = work / f"{name}.{device}.{dtype}.st"
            failed = capture(args, target, device, dtype, "--replay", base)
            runs[dtype] = ({"capture": failed} if failed else
                           compare(base, target, work / f"{name}.{dtype}.json"))
        found[name] = runs
        print(f"· {name}: " + ", ".join(f"{d} {r.get('summary', r)}" for d, r in runs.items()),
              flush=True)
    return found


def faults(device: str, work: Path) -> dict[str, Any]:
    """The planted fp16 overflows, stats mode on the device, a bf16 training step."""
    found: dict[str, Any] = {}
    t5o, llama = ["--model", str(FIXTURES / "tiny-flan-t5-overflow")], [
        "--model", str(FIXTURES / "tiny-llama-overflow")]
    for name, args in (("t5-overflow", t5o), ("llama-residual-overflow", llama)):
        base = work / f"{name}.base.st"
        capture(args, base, "cpu", "fp32")
        for keep in ("none", "auto"):
            target = work / f"{name}.{keep}.st"
            failed = capture(args, target, device, "fp16", "--keep-fp32", keep, "--replay", base)
            found[f"{name} fp16 --keep-fp32 {keep}"] = (
                {"capture": failed} if failed else
                compare(base, target, work / f"{name}.{keep}.json"))
    qwen = ["--model", str(FIXTURES / "tiny-qwen3")]
    base = work / "tiny-qwen3.base.st"
    for dtype in ("fp32", "bf16"):
        target = work / f"qwen.stats.{dtype}.st"
        failed = capture(qwen, target, device, dtype, "--mode", "stats", "--replay", base)
        found[f"tiny-qwen3 stats {dtype}"] = (
            {"capture": failed} if failed else compare(base, target, work / "s.json"))
    for name in ("tiny-flan-t5", "tiny-qwen3"):
        args = ["--model", str(FIXTURES / name)]
        base = work / f"{name}.bwd.st"
        capture(args, base, "cpu", "fp32", "--backward")
        target = work / f"{name}.bwd.bf16.st"
        failed = capture(args, target, device, "bf16", "--backward", "--replay", base)
        found[f"{name} --backward bf16"] = (
            {"capture": failed} if failed else compare(base, target, work / "b.json"))
    code, text = cli("suggest", "--model", FIXTURES / "tiny-llama-overflow", "--device", device,
                     "--dtype", "fp16", "--keep-fp32", "none", "--json", work / "sg.json", "-q")
    found["suggest tiny-llama-overflow fp16"] = (
        json.loads((work / "sg.json").read_text()) | {"exit": code}
        if (work / "sg.json").is_file() else {"exit": code, "error": text[-300:]})
    found["suggest tiny-llama-overflow fp16"].pop("steps", None)
    found["suggest tiny-llama-overflow fp16"].pop("alternatives", None)
    return found


def overhead(device: str, rounds: int = 7) -> dict[str, Any]:
    """Capture overhead on the device: the bench model (flan-t5-small shape) in bf16,
    captured in full and stats mode, over its plain forward (median of per-round ratios)."""
    import tempfile

    import torch

    sys.path.insert(0, str(ROOT / "scripts"))
    from bench import bench_model

    import precision

    model = bench_model(torch.bfloat16).to(device)
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(2, 32128, (8, 256), generator=g).to(device),
              "decoder_input_ids": torch.randint(2, 32128, (8, 64), generator=g).to(device)}

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    work = Path(tempfile.mkdtemp(prefix="precision-gpu-"))

    def timed(mode: str | None) -> float:
        (work / "c.st").unlink(missing_ok=True)
        sync()
        t = time.perf_counter()
        with torch.no_grad():
            if mode is None:
                model(**inputs)
            else:
                with precision.capture(model, work / "c.st", mode=mode):
                    model(**inputs)
        sync()
        return time.perf_counter() - t

    for mode in (None, "full", "stats"):
        timed(mode)  # warm up
    times: dict[str, list[float]] = {"plain": [], "full": [], "stats": []}
    for _ in range(rounds):
        for name, mode in (("plain", None), ("full", "full"), ("stats", "stats")):
            times[name].append(timed(mode))
    return {"model": "flan-t5-small shape, bf16, batch 8 x 256 / 64 tokens",
            "forward_s": round(statistics.median(times["plain"]), 4),
            **{f"capture_{m}_ratio": round(statistics.median(
                a / b for a, b in zip(times[m], times["plain"], strict=True)), 2)
               for m in ("full", "stats")}}


def jobs_scaling(work: Path, rounds: int = 3) -> dict[str, Any]:
    """compare's throughput on the bench pair (fp32 against fp16) at 1 to all cores."""
    import torch

    sys.path.insert(0, str(ROOT / "scripts"))
    from bench import bench_model

    import precision

    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(2, 32128, (4, 128), generator=g),
              "decoder_input_ids": torch.randint(2, 32128, (4, 32), generator=g)}
    paths = {dt: work / f"bench.{dt}.st" for dt in ("fp32", "fp16")}
    for dt, torch_dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        model = bench_model(torch_dtype)
        with torch.no_grad(), precision.capture(model, paths[dt]):
            model(**inputs)
    size = sum(p.stat().st_size for p in paths.values())
    cores = os.cpu_count() or 1
    counts = sorted({1, 2, 4, 8, cores} & set(range(1, cores + 1)))
    precision.compare(paths["fp32"], paths["fp16"], jobs=1)  # page cache warm
    times: dict[int, list[float]] = {n: [] for n in counts}
    for _ in range(rounds):
        for n in counts:
            t = time.perf_counter()
            precision.compare(paths["fp32"], paths["fp16"], jobs=n)
            times[n].append(time.perf_counter() - t)
    return {"input_mb": round(size / 1e6, 1), "cores": cores,
            "mb_per_s": {str(n): round(size / 1e6 / statistics.median(t), 1)
                         for n, t in times.items()}}


def tables(record: dict[str, Any]) -> str:
    """The Markdown tables docs/cuda.md shows for a recorded run (``docs/cuda/*.json``)."""
    lines = ["| model | fp16 | bf16 | fp32 |", "|---|---|---|---|"]
    for name, runs in record["pairs"].items():
        cells = [runs[d].get("summary", str(runs[d])).split(":")[0] + f" ({runs[d]['rows']} rows,"
                 f" {runs[d]['flagged']} flagged)" if "summary" in runs[d] else str(runs[d])
                 for d in ("fp16", "bf16", "fp32")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| check | verdict |", "|---|---|"]
    for name, found in record["faults"].items():
        summary = found.get("summary") or found.get("message") or str(found)
        lines.append(f"| {name} | {summary} |")
    lines += ["", "| bf16 training step, attention kernel | against the CPU bf16 reference |",
              "|---|---|"]
    for name, found in record["training_kernels"].items():
        if name.endswith("bf16"):
            text = found if isinstance(found, str) else found["with reference"]
            lines.append(f"| {name.removesuffix(' bf16')} | {text} |")
    over, jobs = record["overhead"], record["jobs"]
    lines += ["", f"Capture overhead on the GPU ({over['model']}; plain forward "
              f"{over['forward_s'] * 1000:.1f} ms): full {over['capture_full_ratio']}x, "
              f"stats {over['capture_stats_ratio']}x.", "",
              f"compare on the bench pair ({jobs['input_mb']} MB, {jobs['cores']} cores), MB/s "
              "by --jobs: " + ", ".join(f"{n}: {v}" for n, v in jobs["mb_per_s"].items()) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--models", type=Path, help="folder of real model folders")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--skip", nargs="*", default=(),
                    choices=["pairs", "faults", "overhead", "jobs"])
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="precision-gpu-check-"))
    import torch

    result: dict[str, Any] = {"torch": torch.__version__, "device": args.device,
                              "gpu": torch.cuda.get_device_name(0)
                              if torch.cuda.is_available() else None}
    import transformers

    result["transformers"] = transformers.__version__
    steps = {"pairs": lambda: pairs(args.models, args.device, work),
             "faults": lambda: faults(args.device, work),
             "overhead": lambda: overhead(args.device),
             "jobs": lambda: jobs_scaling(work)}
    for name, step in steps.items():
        if name in args.skip:
            continue
        t = time.perf_counter()
        try:
            result[name] = step()
        except Exception as e:  # record it and go on: one run, many checks
            result[name] = {"error": f"{type(e).__name__}: {e}"}
        result[f"{name}_s"] = round(time.perf_counter() - t, 1)
        print(f"== {name} done in {result[f'{name}_s']} s", flush=True)
        (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

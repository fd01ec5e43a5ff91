"""A real speech model in the verdicts' check set: Whisper fed two wav files, as a user would.

The model comes from ``$PRECISION_REAL_MODELS`` (scripts/get_real_models.py):
``whisper-tiny-en``, faster-whisper's tiny.en (OpenAI's Whisper, 4 encoder and 4 decoder
layers, width 384) converted by scripts/ct2_whisper.py; ``whisper-base`` (6 + 6 layers,
width 512, multilingual) when fetched by name. Two speech-like clips of different lengths
and sampling rates (:func:`write_wavs`: voiced syllables through vowel formants, noise
bursts for consonants; seeded) go through the CLI:

    precision capture --model DIR --audio a.wav --audio b.wav --expect fp16 --expect bf16 -o base.st
    precision capture --model DIR --dtype bf16 --replay base.st -o bf16.st
    precision compare base.st bf16.st            (and --no-reference: the fixed limits)

The feature extractor pads both clips to Whisper's 30 s window (the encoder has no attention
mask: the padding's silence is its input too), and the shorter transcript is padded after
its end of text. Targets the CLI cannot make are captured from Python on the baseline's
recorded inputs: another implementation of the same precision, ``bf16-eager``/``fp16-eager``
and ``fp32-eager`` (eager attention instead of sdpa) and ``bf16-fp32acc`` (every Linear
accumulated in fp32 and rounded once): on the CPU the CLI's bf16 and fp16 targets are the
very computation their references made; ``tf32`` (every Linear's inputs and weights rounded
to TF32's 10 bits); and faults: ``drift:F`` on top of the bf16-eager target (noise of F
times the rms of the ordinary channels added to one encoder layer's output, as
scripts/depth_cases.py plants it).

    python scripts/speech_cases.py [MODEL ...]      (prints one JSON line per case)
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from depth_cases import drift, linear_fp32_accumulate, summarise  # scripts/ is on the path
from get_real_models import default_dest
from verdict_cases import linear_in

import precision

REAL_MODELS = default_dest()
SPEECH = ("whisper-tiny-en",)
#: (seconds, sampling rate, voice pitch in Hz) of the two clips
CLIPS = ((2.3, 16000, 120.0), (3.7, 22050, 210.0))
#: formants F1-F3 (Hz) of five vowels, adult averages
VOWELS = ((730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480),
          (570, 840, 2410))
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16,
          "fp16": torch.float16}
HEALTHY = ("bf16", "fp16", "bf16-eager", "fp16-eager", "bf16-fp32acc", "fp32-eager", "tf32")


def available(names: tuple[str, ...] = SPEECH) -> tuple[str, ...]:
    return tuple(n for n in names if (REAL_MODELS / n / "config.json").is_file())


def speech_like(seconds: float, rate: int, pitch: float, seed: int) -> np.ndarray:
    """Syllables: a noise burst (a consonant), then a voiced vowel (glottal pulses at a
    wandering pitch, through three formant resonators), with short pauses; in [-0.6, 0.6]."""
    from scipy.signal import lfilter

    rng = np.random.default_rng(seed)
    out = np.zeros(int(seconds * rate))
    pos = int(0.15 * rate)
    while pos < len(out) - int(0.3 * rate):
        burst = lfilter([1.0, -0.95], [1.0], rng.standard_normal(int(rng.uniform(0.03, 0.08)
                                                                     * rate))) * 0.04
        n = int(rng.uniform(0.12, 0.25) * rate)
        t = np.arange(n) / rate
        f0 = pitch * (1 + 0.08 * np.sin(2 * np.pi * rng.uniform(2, 4) * t + rng.uniform(0, 6)))
        pulses = np.diff(np.floor(np.cumsum(f0) / rate), prepend=0.0)
        voiced = lfilter([1.0], [1.0, -0.97], pulses)  # the glottal source's falling spectrum
        for f, bandwidth in zip(VOWELS[rng.integers(len(VOWELS))], (80, 100, 150), strict=True):
            r, theta = np.exp(-np.pi * bandwidth / rate), 2 * np.pi * f / rate
            voiced = lfilter([1 - r], [1.0, -2 * r * np.cos(theta), r * r], voiced)
        voiced *= np.sin(np.pi * np.arange(n) / n) ** 0.5 * 0.5 / np.abs(voiced).max()
        syllable = np.concatenate([burst, voiced])[: len(out) - pos]
        out[pos:pos + len(syllable)] += syllable
        pos += len(syllable) + int(rng.uniform(0.02, 0.12) * rate)
    return out * 0.6 / np.abs(out).max()


def write_wavs(folder: Path) -> list[Path]:
    """The two clips (:data:`CLIPS`) as 16-bit wav files in ``folder``."""
    from scipy.io import wavfile

    paths = []
    for i, (seconds, rate, pitch) in enumerate(CLIPS):
        paths.append(folder / f"speech{i}.wav")
        signal = speech_like(seconds, rate, pitch, seed=i + 1)
        wavfile.write(paths[-1], rate, np.round(signal * 32767).astype(np.int16))
    return paths


def cli(*args: object) -> str:
    """``precision ARGS`` in this process; its output, or RuntimeError when it fails."""
    from click.testing import CliRunner

    from precision.cli import main

    done = CliRunner().invoke(main, [str(a) for a in args])
    if done.exit_code != 0:
        raise RuntimeError(f"precision {' '.join(map(str, args))}: {done.output}")
    return done.output


def base_of(model: str, work: Path) -> Path:
    """The CLI's fp32 baseline of the two clips, with its fp16 and bf16 references."""
    base = work / f"{model}-fp32.st"
    if not base.exists():
        a, b = write_wavs(work)
        cli("capture", "--model", REAL_MODELS / model, "--audio", a, "--audio", b,
            "--expect", "fp16", "--expect", "bf16", "-q", "-o", base)
    return base


def target_of(model: str, target: str, work: Path, fault: str = "", layer: int = 1) -> Path:
    """``target`` (:data:`HEALTHY`) on the baseline's inputs, ``fault`` (``drift:F``)
    planted in encoder layer ``layer``: bf16 and fp16 from the CLI (``--replay``), the rest
    from Python."""
    base = base_of(model, work)
    path = work / f"{model}-{target}{f'-{fault}@{layer}' if fault else ''}.st"
    if path.exists():
        return path
    if target in ("bf16", "fp16") and not fault:
        cli("capture", "--model", REAL_MODELS / model, "--dtype", target, "--replay", base,
            "-q", "-o", path)
        return path
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    dtype = DTYPES[target.split("-")[0]]
    net = transformers.WhisperForConditionalGeneration.from_pretrained(
        REAL_MODELS / model, dtype=dtype,
        attn_implementation="eager" if target.endswith("eager") else "sdpa").eval()
    recorded = precision.load(base)
    inputs = {k: torch.from_numpy(np.array(recorded[f"input:{k}"]))
              for k in ("input_features", "decoder_input_ids")}
    inputs["input_features"] = inputs["input_features"].to(dtype)
    handles = []
    if fault.startswith("drift:"):
        handles.append(drift(net.model.encoder.layers[layer], float(fault.split(":")[1])))
    elif fault:
        raise ValueError(f"unknown fault {fault!r}")
    kernels = (linear_in("tf32") if target == "tf32" else linear_fp32_accumulate()
               if target.endswith("fp32acc") else contextlib.nullcontext())
    with torch.no_grad(), kernels, precision.capture(net, path, force=True):
        net(**inputs)
    for h in handles:
        h.remove()
    return path


def run(model: str, target: str, work: Path, fault: str = "", layer: int = 1, *,
        reference: bool = True) -> precision.Report:
    """Compare ``target`` (with ``fault``) with the baseline, judged against the baseline's
    same-precision reference unless ``reference`` is False (the fixed limits)."""
    path = target_of(model, target, work, fault, layer)
    return precision.compare(base_of(model, work), path, jobs=1, auto_reference=reference,
                             profile="tf32" if target == "tf32" else None)


def reference_report(model: str, dtype: str, work: Path) -> precision.Report:
    """The baseline against its ``dtype`` reference: what that precision costs here."""
    from precision.dumps import reference_path

    base = base_of(model, work)
    return precision.compare(base, reference_path(base, dtype), jobs=1, auto_reference=False)


DRIFTS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32)


def smallest_drift(model: str, layer: int, work: Path) -> float | None:
    """The smallest ordinary-channel drift in bf16 found first in encoder layer ``layer``."""
    for f in DRIFTS:
        first = run(model, "bf16-eager", work, f"drift:{f}", layer).first_divergence
        if first is not None and first.key.startswith(f"model.encoder.layers.{layer}"):
            return f
    return None


def main() -> None:
    import tempfile

    models = available(tuple(sys.argv[1:]) or SPEECH)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for m in models:
            for target in HEALTHY:
                dtype = target.split("-")[0]
                ref = reference_report(m, dtype, work) if dtype in ("bf16", "fp16") else None
                out: dict[str, Any] = {"case": f"{m}-{target}"} | summarise(
                    run(m, target, work), ref)
                if ref is not None:
                    fixed = summarise(run(m, target, work, reference=False))
                    out |= {"fixed_" + k: v for k, v in fixed.items() if k != "summary"}
                print(json.dumps(out), flush=True)
            for layer in (1, 3):
                rep = run(m, "bf16-eager", work, "drift:0.25", layer)
                print(json.dumps({"case": f"{m}-bf16-drift:0.25@encoder.{layer}"}
                                 | summarise(rep)), flush=True)
                print(json.dumps({"case": f"{m}-bf16-smallest-drift@encoder.{layer}",
                                  "fraction": smallest_drift(m, layer, work)}), flush=True)
    if not models:
        print(f"no speech model in {REAL_MODELS}: run scripts/get_real_models.py",
              file=sys.stderr)


if __name__ == "__main__":
    main()

"""How well stats mode's count sketch estimates each record's error, on real deep decoders.

Stats mode judges ``||b - a||`` (target against the fp32 baseline) from count sketches,
against the same estimate for the same-precision reference (docs/verdicts.md, *Stats mode*).
This study captures the depth cases of scripts/depth_cases.py in full mode (so the exact
norms are known), computes every record's ratio ``||b - a|| / ||r - a||`` exactly and as
estimated by several statistics a capture could keep, and prints, per target, the worst
ratio over all records (healthy pairs: the closer to the exact worst, the better) and the
largest ratio in the planted block (faults), and for healthy pairs which record that worst
is. Floors as in ``reference_sketch``.

- ``exact``: the ratio itself, what a perfect estimate gives;
- ``sketch31``: the first format (bucket ``i mod 31``, sign ``σ(i)``);
- ``sketch1021``: the format now stored (:mod:`precision.dumps.sketch`);
- ``mom5x204``: five independent sketches of 204 buckets (the same storage), the median of
  their five estimates: robust to a few heavy buckets, at five multiplies per element;
- ``rowsign1021``: bucket ``i mod 1021``, one sign per row of 1021 elements (a plain
  matrix-vector product, no multiply pass: cheaper, but rows share their signs);
- ``l1bias``: not a norm: how far ``Σ|b| - Σ|a|`` is from zero in units of ``||b - a||``,
  over the reference's (floor 20): a truncating kernel shrinks every ``|b|``.

    python scripts/sketch_study.py [MODEL ...]     (prints one JSON line per target)
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import depth_cases as dc  # scripts/ is on the path
import numpy as np

import precision
from precision.dtypes import is_float
from precision.dumps.sketch import hash_sign, signs
from precision.judge.lineup.tokens import padding_of, real_elements

EPS = {"bf16": 2.0**-7, "fp16": 2.0**-10}
#: the ratio floor where the reference is nearly exact, as reference_sketch's (eps/4 / 3)
FLOOR = 1 / 12
BLOCKS = {"smollm2-135m": (2, 20), "gemma3-270m": (2, 14)}


def real_records(path: Path) -> dict[str, np.ndarray]:
    """Every float record of a full dump over real tokens, flat, in execution order."""
    d = precision.load(path)
    out = {}
    for e in d.entries:
        stored = d.resolve(e.key)
        if e.key.startswith("input:") or stored is None or not is_float(
                d.tensors[stored].dtype):
            continue
        x = np.asarray(d[stored], dtype=np.float64).reshape(-1)
        pad = padding_of(d, stored, tuple(d.tensors[stored].shape))
        out[e.key] = x if pad is None else np.concatenate(list(real_elements([x], pad)))
    return out


def count_sketch(d: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Bucket ``i mod k``; sign ``σ(i)`` (seed 0) or ``σ(i + seed x 2^30)``."""
    i = np.arange(d.size, dtype=np.int64)
    return np.bincount(i % k, weights=hash_sign(i + seed * (1 << 30)) * d, minlength=k)


def row_sketch(d: np.ndarray, k: int) -> np.ndarray:
    rows = -(-d.size // k)
    padded = np.zeros(rows * k)
    padded[:d.size] = d
    return hash_sign(np.arange(rows)) @ padded.reshape(rows, k)


#: name -> estimate of ||d|| from the difference d (every sketch is linear in the run)
ESTIMATES: dict[str, Callable[[np.ndarray], float]] = {
    "exact": lambda d: float(np.linalg.norm(d)),
    "sketch31": lambda d: float(np.linalg.norm(count_sketch(d, 31))),
    "sketch1021": lambda d: float(np.linalg.norm(np.bincount(
        np.arange(d.size) % 1021, weights=signs(0, d.size) * d, minlength=1021))),
    "mom5x204": lambda d: float(np.median([np.linalg.norm(count_sketch(d, 204, s))
                                           for s in range(1, 6)])),
    "rowsign1021": lambda d: float(np.linalg.norm(row_sketch(d, 1021))),
}


def l1_bias(a: np.ndarray, x: np.ndarray) -> float:
    """``(Σ|x| - Σ|a|) / ||x - a||``."""
    norm = float(np.linalg.norm(x - a))
    return float(np.abs(x).sum() - np.abs(a).sum()) / norm if norm else 0.0


def ratios(base: dict[str, np.ndarray], ref: dict[str, np.ndarray],
           target: dict[str, np.ndarray], eps: float) -> dict[str, list[tuple[str, float]]]:
    """Per estimate, (key, the target's estimate over the reference's) in execution order."""
    out: dict[str, list[tuple[str, float]]] = {name: [] for name in [*ESTIMATES, "l1bias"]}
    for key, a in base.items():
        if key not in ref or key not in target:
            continue
        floor = FLOOR * eps * float(np.linalg.norm(a))
        for name, estimate in ESTIMATES.items():
            t, r = estimate(target[key] - a), estimate(ref[key] - a)
            out[name].append((key, t / max(r, floor, 1e-300)))
        zt, zr = l1_bias(a, target[key]), l1_bias(a, ref[key])
        out["l1bias"].append((key, abs(zt) / max(abs(zr), 20.0)))
    return out


def main() -> None:
    models = dc.available(tuple(sys.argv[1:]) or dc.DEEP)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for m in models:
            base_path = dc.base_of(m, work)
            base = real_records(base_path)
            cases = [c for c in dc.healthy_cases(m) + dc.fault_cases(m, BLOCKS[m])
                     if c.dtype in EPS and not c.fault.startswith("drift")]
            refs: dict[str, dict[str, np.ndarray]] = {}
            for case in cases:
                if case.dtype not in refs:
                    refs[case.dtype] = real_records(dc.reference_of(m, case.dtype, work))
                target = work / f"{case.name}.st"
                dc._capture(m, case.dtype, "eager" if case.target.endswith("eager") else "sdpa",
                            target, fault=case.fault, block=case.block,
                            fp32acc=case.target.endswith("fp32acc"))
                rs = ratios(base, refs[case.dtype], real_records(target), EPS[case.dtype])
                line: dict[str, object] = {"case": case.name}
                for name, values in rs.items():
                    key, worst = max(values, key=lambda kv: kv[1])
                    line[name] = round(worst, 3)
                    if case.fault:
                        planted = [(k, v) for k, v in values
                                   if k.startswith((f"model.layers.{case.block}.",
                                                    f"model.layers.{case.block}:"))]
                        line[f"{name}_in_block"] = round(max(v for _, v in planted), 3)
                    else:
                        line[f"{name}_at"] = key
                print(json.dumps(line), flush=True)
                target.unlink()


if __name__ == "__main__":
    main()

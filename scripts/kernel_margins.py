"""How close healthy runs come to each verdict limit, under each CPU kernel level.

For the fixtures' healthy forward and training-step pairs (tiny Flan-T5 and Qwen3-style
decoder; fp16 and bf16 against an fp32 baseline with its same-precision reference, every run
captured under the same level), and with ``--real`` SmolLM2-135M's bf16 training step
(scripts/depth_cases.py), it prints per case and rule the worst row's *margin*: its measure
over the rule's limit (1.0 is where the rule flags). A healthy run must stay below 1 on every
level with room to spare; see docs/verdicts.md ("CPU kernels").

With ``--sets`` it measures instead what the fixed limits were calibrated on: the worst
healthy row's ``noise_rms`` and ``noise_max`` in eps, no reference, for every healthy pair
of the calibration and check sets (scripts/verdict_cases.py) and Whisper's bf16 and fp16
pairs (scripts/speech_cases.py), each under every level.

    python scripts/kernel_margins.py [--real | --sets] [--json FILE]

Each level runs in a process of its own (scripts/kernel_levels.py sets the environment
before torch loads). Margins computed here mirror the rules' formulas in
precision/judge/verdict/rules.py (a rule's exemptions only lower them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

#: (name, fixture, dtype, backward, target loss scale)
FIXTURE_CASES = [
    (f"{m}-{d}{'-step' if b else ''}", m, d, b, 1024.0 if (b and d == "fp16") else 1.0)
    for m in ("tiny-flan-t5", "tiny-qwen3") for d in ("fp16", "bf16") for b in (False, True)
]


def margins(base: Path, target: Path, ref: Path | None) -> dict[str, float]:
    """The worst row's measure over each rule's limit (precision/judge/verdict/rules.py)."""
    import precision
    from precision.dumps.keys import parse_key
    from precision.judge import profiles as P

    rep = precision.compare(base, target, auto_reference=False, jobs=1)
    refs = ({r.key: r for r in precision.compare(base, ref, auto_reference=False, jobs=1).rows}
            if ref is not None else {})
    prof, out = rep.profile, {"rows_flagged_fixed": float(not rep)}

    def worst(name: str, value: float) -> None:
        if math.isfinite(value):
            out[name] = max(out.get(name, 0.0), value)

    for row in rep.rows:
        m = row.metrics
        if m is None or m.compared == 0 or m.max_abs <= prof.atol:
            continue
        grad = parse_key(row.key).is_gradient
        if grad:
            n = math.sqrt(m.compared)
            worst("grad_norm (fixed)", m.rmse * n / (prof.grad_rel_l2 * m.norm_base
                                                     + prof.atol * n))
            worst("grad_outlier (fixed)", m.max_abs / (prof.grad_outlier * m.absmax_base
                                                       + prof.atol))
        else:
            worst("noise_rms (fixed)", m.noise_rms / prof.noise_rms)
            worst("noise_max (fixed)", m.noise_max / prof.noise_max)
        r = refs.get(row.key)
        rm = r.metrics if r is not None else None
        if rm is None or rm.compared == 0 or rm.new_nan or rm.new_inf or rm.saturated:
            continue
        if grad and len(row.shape) == 1 and parse_key(row.key).kind == "pgrad":
            worst("reference_gradient 1-D rel_l2", m.rel_l2 / max(
                P.REF_VECTOR_GRAD_RATIO * rm.rel_l2, P.REF_FLOOR_RMS_EPS * prof.eps))
        elif grad:
            worst("reference_gradient rel_l2", m.rel_l2 / max(
                P.REF_RMS_RATIO * rm.rel_l2, P.REF_FLOOR_RMS_EPS * prof.eps))
            w, rw = (x.max_abs / x.absmax_base if x.absmax_base else 0.0 for x in (m, rm))
            worst("reference_gradient outlier", w / max(P.REF_MAX_RATIO * rw,
                                                         P.REF_FLOOR_MAX_EPS * prof.eps))
        else:
            worst("reference_rms", m.noise_rms / max(P.REF_RMS_RATIO * rm.noise_rms,
                                                     P.REF_FLOOR_RMS_EPS * prof.eps))
            worst("reference_max", m.noise_max / max(P.REF_MAX_RATIO * rm.noise_max,
                                                     P.REF_FLOOR_MAX_EPS * prof.eps))
    out["flagged_with_reference"] = float(not precision.compare(base, target, reference=ref,
                                                               jobs=1)) if ref else 0.0
    return out


def fixture_case(work: Path, model: str, dtype: str, backward: bool,
                 scale: float) -> dict[str, float]:
    from precision.dumps import reference_path
    from precision.runtime.run.runner import CaptureOptions, run_capture

    fixture = str(ROOT / "fixtures" / model)
    common = {"model": fixture, "backward": backward, "max_new_tokens": 2, "force": True}
    tag = f"{model}{'-step' if backward else ''}"
    base = work / f"{tag}-fp32.st"
    if not base.exists():
        run_capture(CaptureOptions(output=str(base), expect=("fp16", "bf16"),
                                   **common))  # type: ignore[arg-type]
    target = work / f"{tag}-{dtype}.st"
    run_capture(CaptureOptions(output=str(target), dtype=dtype, replay=str(base),
                               loss_scale=scale, **common))  # type: ignore[arg-type]
    return margins(base, target, reference_path(base, dtype))


def real_case(work: Path) -> dict[str, float]:
    import depth_cases as dc

    from precision.dumps import reference_path

    case = dc.Case("smollm2-135m", "bf16-fp32acc", backward=True)
    dc.run(case, work)
    base = dc.base_of(case.model, work, backward=True)
    return margins(base, work / f"{case.name}.st", reference_path(base, "bf16"))


def fixed_noise(report: object) -> dict[str, float]:
    """The worst row's element-scaled rms and max error (in eps) and the flagged rows."""
    import verdict_cases as vc

    s = vc.summarise(report)  # type: ignore[arg-type]
    return {"noise_rms_eps": s["worst_noise_rms_eps"], "noise_max_eps": s["worst_noise_max_eps"],
            "flagged_fixed": float(len(s["flagged"]))}


def sets_level(work: Path) -> dict[str, dict[str, float]]:
    """The calibration and check sets' healthy pairs, and Whisper's, under the fixed limits."""
    import speech_cases as sc
    import verdict_cases as vc

    out = {}
    for case in vc.healthy_cases(vc.available(vc.CALIBRATION + vc.CHECK)):
        out[case.name] = fixed_noise(vc.run(case, work))
    for model in sc.available():
        for target in ("bf16", "fp16"):
            out[f"{model}-{target}"] = fixed_noise(sc.run(model, target, work, reference=False))
    return out


def one_level(real: bool, sets: bool = False) -> dict[str, dict[str, float]]:
    """Every case under this process's kernels."""
    import warnings

    warnings.filterwarnings("ignore")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if sets:
            return sets_level(work)
        for name, model, dtype, backward, scale in FIXTURE_CASES:
            out[name] = fixture_case(work, model, dtype, backward, scale)
        if real:
            out["smollm2-135m-bf16-step"] = real_case(work)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--real", action="store_true", help="also SmolLM2-135M's bf16 step")
    ap.add_argument("--sets", action="store_true",
                    help="the calibration and check sets' worst healthy noise instead")
    ap.add_argument("--json", help="write every margin here")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_level(args.real, args.sets)))
        return 0
    import kernel_levels

    results = {}
    for level in kernel_levels.chosen():
        cmd = ([sys.executable, __file__, "--one"] + (["--real"] if args.real else [])
               + (["--sets"] if args.sets else []))
        proc = subprocess.run(cmd, env=kernel_levels.environment(level), text=True,
                              capture_output=True, cwd=ROOT)
        if proc.returncode:
            sys.stderr.write(proc.stderr[-3000:])
            return 1
        results[level] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"· {level} done", file=sys.stderr, flush=True)
    rules = sorted({r for lv in results.values() for c in lv.values() for r in c})
    for case in next(iter(results.values())):
        print(f"\n{case}")
        for rule in rules:
            vals = [results[lv][case].get(rule) for lv in results]
            if any(v is not None for v in vals):
                cells = "  ".join(f"{lv}={v:.3f}" if v is not None else f"{lv}=-"
                                  for lv, v in zip(results, vals, strict=True))
                print(f"  {rule:28s} {cells}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())

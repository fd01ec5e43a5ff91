"""The verdict part of scripts/bench: false flags on healthy pairs and the smallest planted
drift each profile detects, for the calibration set and the check set (verdict_cases.py).

Drift is noise of a fraction of the ordinary channels' own rms, added after block 11 of a
synthetic stack with massive channels; the ladder doubles from the profile's eps.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import verdict_cases as vc  # scripts/ is on the path

EPS = {"bf16": 2.0**-7, "fp16": 2.0**-10, "tf32": 2.0**-10, "fp32-fp64acc": 2.0**-23}


def healthy(models: tuple[str, ...], work: Path) -> dict[str, Any]:
    """Every healthy pair of these models: its flagged rows (false flags) and worst noise."""
    out = {}
    for case in vc.healthy_cases(vc.available(models)):
        s = vc.summarise(vc.run(case, work))
        out[case.name] = {"rows": s["rows"], "false_flags": len(s["flagged"]),
                          "flagged": s["flagged"][:3],
                          "worst_noise_rms_eps": round(s["worst_noise_rms_eps"], 3),
                          "worst_noise_max_eps": round(s["worst_noise_max_eps"], 2),
                          "min_signature_bits": round(s["min_signature_bits"], 2)}
    return out


def smallest_drift(model: str, target: str, work: Path) -> float | None:
    """The smallest drift (fraction of the ordinary channels' rms), on the ladder
    ``eps x 2^k`` below 1, that is flagged first at the block where it was planted;
    bisection over the ladder (detection grows with the drift)."""
    ladder = [EPS[target] * 2.0**k for k in range(64) if EPS[target] * 2.0**k < 1.0]

    def found(fraction: float) -> bool:
        case = vc.Case(f"{model}-{target}-drift", model, target,
                       fault=f"drift:{fraction}", profile=vc.PROFILE_OF.get(target))
        first = vc.run(case, work).first_divergence
        return first is not None and first.key == "blocks.11:out"

    lo, hi = 0, len(ladder) - 1
    if not found(ladder[hi]):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if found(ladder[mid]):
            hi = mid
        else:
            lo = mid + 1
    return ladder[lo]


def run() -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="precision-verdicts-"))
    sets = {"calibration": vc.CALIBRATION, "check": vc.CHECK}
    result: dict[str, Any] = {}
    for name, models in sets.items():
        pairs = healthy(models, work)
        result[name] = {"models": list(vc.available(models)),
                        "false_flags": sum(p["false_flags"] for p in pairs.values()),
                        "pairs": pairs}
    result["smallest_detected_drift"] = {
        model: {t: smallest_drift(model, t, work) for t in EPS} for model in ("stack-a",
                                                                              "stack-b")}
    return result


if __name__ == "__main__":
    import json
    import sys

    json.dump(run(), sys.stdout, indent=1)
    print()

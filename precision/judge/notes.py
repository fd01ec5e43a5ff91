"""What a comparison's report says besides its rows: the warnings (the runs may not be
comparable as given: swapped arguments, different inputs, weights or dtypes a file cannot
state, incomplete dumps) and the notes (what the verdicts left out or judged against:
padding, records one run only has, the reference or the fixed limits, count sketches).

Each function here writes one kind of line from the runs and the judged rows;
:func:`precision.judge.compare.compare` puts them in the :class:`~precision.judge.report.Report`.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from ..dtypes import short
from ..dumps.dump import Dump
from ..dumps.keys import INPUT_PREFIX, parse_key
from ..dumps.sketch import BUCKETS, size_of
from ..engines.vllm import lineup as engine_lineup
from ..errors import given, option
from .lineup.align import (
    BASE,
    REFERENCE,
    TARGET,
    generation_only,
    one_sided_operations,
    outputs_only,
)
from .measure.generation import has_generation
from .measure.row import Row
from .profiles import REF_RMS_RATIO, Profile, precision_name


def report_warnings(b: Dump, t: Dump, rows: list[Row], stated: dict[str, str | None]
              ) -> list[str]:
    notes = _same_run(b, t)
    files = [d for d in (b, t) if d.meta.get("external")]
    if any(r.key.startswith(INPUT_PREFIX) and r.status == "MISMATCH" for r in rows):
        notes.append("the two runs saw different inputs: capture the target with "
                     f"--replay {b.path.name}")
    swapped = [r.key for r in rows if r.metrics and (r.metrics.base_only_inf
                                                      or r.metrics.base_only_nan
                                                      or r.metrics.saturated_base)]
    if swapped:
        notes.append(f"the baseline holds inf/NaN or clamped values where the target is finite "
                     f"in {len(swapped)} tensor(s), first {swapped[0]}: is the baseline the "
                     "low-precision run? The arguments may be swapped")
    dirty = [r.key for r in rows if r.metrics and (r.metrics.nan_base or r.metrics.inf_base)
             and r.key not in swapped]
    if dirty:
        notes.append(f"both runs hold NaN/inf at the same places in {len(dirty)} tensor(s), "
                     f"first {dirty[0]}: those elements are excluded")
    if has_generation(b) != has_generation(t) and not files:
        notes.append("only one dump holds a generation: capture the target with --replay "
                     "from a baseline taken with --max-new-tokens to compare generations")
    notes += _dtype_warnings(b, t, stated)
    wb, wt = (d.meta.get("model", {}).get("weights_fingerprint") for d in (b, t))
    if wb and wt and wb != wt:  # the same config, another checkpoint (a fine-tune?)
        notes.append(f"{b.path.name} and {t.path.name} come from different weights "
                     f"(fingerprint {wb} vs {wt}): differences show the weights, not only "
                     "the numerics")
    for d in (b, t):
        if not d.complete:
            notes.append(f"{d.path.name} is marked incomplete")
        if d.meta.get("foreign"):
            notes.append(f"{d.path.name} has no precision metadata: keys are matched by name")
    return notes


def _same_run(b: Dump, t: Dump) -> list[str]:
    """A warning when the two runs are one file: a run compared with itself passes whatever
    it holds. (Two captures are not told from copies by their contents: a deterministic
    run twice in one second makes the same bytes.)"""
    pb, pt = Path(displayed_path(b)), Path(displayed_path(t))
    try:
        same = pb.samefile(pt)
    except OSError:
        same = False
    return [f"{pb} and {pt} are the same file: a run compared with itself passes whatever it "
            "holds"] if same else []


def _dtype_warnings(b: Dump, t: Dump, stated: dict[str, str | None]) -> list[str]:
    """What a run's file cannot tell about its precision, and a stated dtype that
    contradicts what an engine's own config recorded (``meta.engine``)."""
    out = []
    for d, side in ((b, "base"), (t, "target")):
        other = t if d is b else b
        how = option(f"--{side}-dtype bf16", f"{side}_dtype='bf16'")
        if (d.meta.get("external") and not d.meta.get("msprobe") and stated[side] is None
                and (d.dtype or "float32") == "float32"
                and (other.dtype or "float32") == "float32"):
            name = _file_name(d)
            if d.dtype is None and has_generation(d):  # log-probabilities: no dtype at all
                out.append(f"{name} holds log-probabilities, which do not say what the engine "
                           "computed in, and is judged as an fp32 run: if it ran in bf16 or "
                           f"fp16, say so with {how} (or \"dtype\": \"bfloat16\" in the file, "
                           "docs/external.md)")
            else:
                out.append(f"{name} came from a file that stores float32 and is judged as an "
                           f"fp32 run: if it computed in bf16 or fp16, say so with {how}")
        engine = d.meta.get("engine")
        engine = engine if isinstance(engine, dict) else {}
        said = engine.get("dtype")
        if said and stated[side] and precision_name(str(stated[side])) != said:
            out.append(f"{_file_name(d)}: {engine.get('name', 'the engine')}'s own config says it "
                       f"computed in {short(str(said))}, but it is judged as "
                       f"{short(precision_name(str(stated[side])))} as stated "
                       f"({option(f'--{side}-dtype', f'{side}_dtype')})")
    return out


def unused_mapping_warnings(mapping: str | os.PathLike[str] | None,
                            lined: dict[str, engine_lineup.Lineup],
                            runs: dict[str, Dump]) -> list[str]:
    """A mapping file given where no run was lined up or renamed by it says so, rather
    than pass unseen."""
    mapped = {name: d.meta["msprobe"]["mapping"] for name, d in runs.items()
              if isinstance(d.meta.get("msprobe"), dict) and "mapping" in d.meta["msprobe"]}
    if mapping is None or lined or any(mapped.values()):  # module paths it renamed, per run
        return []
    if mapped:  # an msprobe dump read with the file, whose rules matched none of its names
        return [f"{given('--mapping', 'mapping', Path(mapping).name)} renamed nothing: "
                f"its module rules match none of the module names of "
                f"{', '.join(_file_name(runs[n]) for n in mapped)} (check them against "
                "`precision inspect`, docs/external.md)"]
    return [f"{given('--mapping', 'mapping', Path(mapping).name)} was not used: it maps "
            "an engine's records (capture --engine vllm) onto a Hugging Face capture's, or "
            "another framework's module names (msprobe dumps) onto Hugging Face's, and "
            "neither is compared here"]


#: above this share of records in one run only, a comparison warns that the runs recorded
#: different calls (its MISSING rows are not judged: a PASS would say nothing of them)
UNPAIRED_SHARE = 0.25
#: the Python spelling of ``--fail-on any``
FAIL_ANY = "fail_on='any'"


def unpaired_warnings(b: Dump, t: Dump, rows: list[Row]) -> list[str]:
    """Records that pair with nothing: gradients where one run holds none (a training step
    against a forward); for another tool's dump, mostly so, the two runs name
    their modules otherwise (another framework, another code base); for two of this tool's,
    more than :data:`UNPAIRED_SHARE`, they recorded different calls. A PASS on what pairs
    would say little of the rest."""
    grads = [r for r in rows if r.status == "MISSING" and parse_key(r.key).is_gradient]
    if not grads or len({any(parse_key(e.key).is_gradient for e in d.entries)
                         for d in (b, t)}) == 1:  # both runs hold gradients, or neither
        return _unpaired(b, t, rows)
    return [f"{len(grads)} gradient record(s) are in one run only (first {grads[0].key}, "
            f"{grads[0].reason}): a training step against a forward? Compare runs of one "
            "kind; those records are not judged",
            *_unpaired(b, t, [r for r in rows if all(r is not g for g in grads)])]


def _unpaired(b: Dump, t: Dump, rows: list[Row]) -> list[str]:
    """:func:`unpaired_warnings` of ``rows`` (the gradients left aside)."""
    missing = [r for r in rows if r.status == "MISSING"]
    if not missing:
        return []
    if any(isinstance(d.meta.get("msprobe"), dict) for d in (b, t)) and \
            len(missing) > len(rows) - len(missing):
        return [f"only {len(rows) - len(missing)} of {len(rows)} records pair between the "
                f"runs (first unpaired {missing[0].key}): do they name their modules alike? "
                f"Another framework's or code base's names line up with "
                f"{option('--mapping', 'mapping=')} FILE (docs/external.md)"]
    if len(missing) <= UNPAIRED_SHARE * len(rows):
        return []
    return [f"{len(missing)} of {len(rows)} records are in one run only (first "
            f"{missing[0].key}, {missing[0].reason}): the runs did not record the same module "
            "calls (other --include/--exclude or inputs, another number of forward calls, a "
            "generation of another length), and those records are not judged "
            f"({option('--fail-on any', FAIL_ANY)} fails on them)"]


def folded_notes(runs: dict[str, Dump], folded: dict[str, int]) -> list[str]:
    """One line per run that holds outputs only: the other run's records left out."""
    out = []
    for name, n in folded.items():
        d, other = runs[name], runs[TARGET if name == BASE else BASE]
        how = ("capture the engine too (precision capture --engine vllm, docs/vllm.md)"
               if generation_only(d) else "capture both runs")
        out.append(f"{_file_name(d)} holds {outputs_only(d)} only: {n} record(s) of "
                   f"{_file_name(other)} (layers, inputs) have nothing to pair with there and "
                   f"are left out; per layer, {how}")
    return out


def padding_notes(rows: list[Row]) -> list[str]:
    """What the verdicts left out: padded positions."""
    def padded(r: Row) -> tuple[int, int]:
        if r.metrics is not None:
            return r.metrics.padded, r.metrics.numel
        if r.stats_delta is None:
            return 0, 0
        return r.stats_delta.padded, r.stats_delta.recorded_elements

    left_out = [padded(r) for r in rows if padded(r)[0]]
    if not left_out:
        return []
    share = max(n / max(total, n) for n, total in left_out)  # a mask of zeros: all of it
    whole = " (a mask of zeros: nothing of those records was judged)" if share >= 1 else ""
    return [f"padding left out: {len(left_out)} record(s) judged on real tokens only (up to "
            f"{share:.0%} of a record is padding, per the recorded attention masks){whole}"]


def operation_notes(b: Dump, t: Dump) -> list[str]:
    """Operations (``--level ops``) that ran in one run only: a code path of one precision
    (T5's fp16 clamp), with nothing to compare them with."""
    notes = []
    for side, names in one_sided_operations(b, t).items():
        if names:
            counts = Counter(names)
            top = ", ".join(f"{n} x{c}" for n, c in counts.most_common(4))
            more = ", ..." if len(counts) > 4 else ""
            notes.append(f"{len(names)} operation(s) ran in the {side} only ({top}{more}): "
                         "a code path of its precision, with nothing to compare them with")
    return notes


def reference_notes(runs: dict[str, Dump], dtypes: dict[str, str], prof: Profile,
                    rows: Sequence[Row] = ()) -> list[str]:
    """What the noise verdicts judged against: the reference, or the fixed limits (for a
    stats-only comparison whose records hold no count sketch, the reference cannot help)."""
    if generation_only(runs[TARGET]):
        return []
    if REFERENCE in runs:
        ref = runs[REFERENCE]
        where = (ref.meta.get("device") or {}).get("name") or "its device"
        note = (f"judged against {ref.path.name}, the same inputs in "
                f"{short(dtypes[REFERENCE])} on {where}: a record drifts when its error is "
                f"beyond {REF_RMS_RATIO:g}x what that run shows on it (docs/verdicts.md)")
        stats = [r.stats_delta for r in rows if r.stats_delta is not None]
        if stats and not any(d.sketch_gap is not None for d in stats):
            note += (f"; but {len(stats)} stats-only record(s) hold no count sketch to weigh "
                     f"against it (another tool's summary), so fixed limits judge them "
                     f"({prof.in_eps(prof.noise_rms):g} eps rms)")
        return [note]
    half = next((dtypes[side] for side in (TARGET, BASE)
                 if dtypes[side] in ("float16", "bfloat16")), None)
    if half is not None:  # --expect takes the half precision, whichever run holds it
        return [f"no same-precision reference, so fixed limits ({prof.in_eps(prof.noise_rms):g} "
                "eps rms): for verdicts that hold at depth, capture the baseline with "
                f"--expect {short(half)}"]
    return []


def sketch_notes(runs: dict[str, Dump]) -> list[str]:
    """Stats records whose count sketches cannot be compared: runs that kept sketches of
    different sizes (a capture from before the 1021-bucket sketch keeps 31 numbers). A full
    dump's statistics, sketch included, are computed from its tensors by this version."""
    sizes = {}
    for name, d in runs.items():
        found = next((n for n in (size_of((e.stats or {}).get("sketch")) for e in d.entries)
                      if n is not None), BUCKETS if d.mode == "full" else None)
        if found is not None:
            sizes[name] = (d, found)
    if len({n for _, n in sizes.values()}) < 2:
        return []
    told = ", ".join(f"{d.path.name}: {n}" for d, n in sizes.values())
    return [f"count sketches of different sizes ({told} buckets): no error estimate from "
            f"them; capture the older run(s) again to get the {BUCKETS}-bucket sketch "
            "(docs/format.md)"]


def _file_name(d: Dump) -> str:
    """The name of the file or folder a user gave (:func:`displayed_path`)."""
    return Path(displayed_path(d)).name


def external_notes(runs: dict[str, Dump], rows: list[Row]) -> list[str]:
    """What another tool's dump held that was left out (``meta.left_out``, counted by its
    reader), which of its steps was read, and checksums that differ where statistics judge
    the row (msprobe's summary_mode md5: another dtype always differs in its bits)."""
    out = []
    for d in runs.values():
        left = d.meta.get("left_out")
        if isinstance(left, dict) and left:
            told = ", ".join(f"{n} {why}" for why, n in left.items())
            out.append(f"{_file_name(d)}: left out {sum(left.values())} tensor record(s): "
                       f"{told}")
        info = d.meta.get("msprobe")
        info = info if isinstance(info, dict) else {}
        if isinstance(info.get("names"), str):
            out.append(f"{_file_name(d)}: {info['names']}")
        steps = info.get("steps")
        if isinstance(steps, list) and len(steps) > 1:
            out.append(f"{_file_name(d)}: msprobe step {info.get('step')} compared, of steps "
                       f"{', '.join(map(str, steps))} (pass its step<N> folder for another)")
    sums = [r.stats_delta for r in rows if r.stats_delta is not None
            and r.stats_delta.has_statistics and r.stats_delta.same_checksum_kind]
    differ = sum(d.checksum_base != d.checksum_target for d in sums)
    if differ:
        out.append(f"checksums differ on {differ} of {len(sums)} record(s) holding both: "
                   "those tensors are not bit-identical, judged by their statistics")
    return out


def displayed_path(d: Dump) -> str:
    """The path a user gave for a run: another tool's file or folder, an engine's dump,
    not the temporary dump it was converted or translated into."""
    return str(d.meta.get("external") or d.meta.get("translated_from") or d.path)

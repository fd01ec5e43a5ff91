"""Local versus inherited error: re-run every module alone, in the target dtype, on the exact
arguments the model called it with.

A layer can look bad in a comparison because it is bad, or because what fed it already was.
:func:`isolate` separates the two for every module the model calls: leaves (projections,
norms, activations) and the modules around them (attention blocks, decoder layers called with
``hidden_states`` plus masks, ``position_embeddings=(cos, sin)``, ``position_ids``, caches and
flags; whole stacks).

How the calls are re-created, in three passes:

1. **Record** (fp32): load the model in fp32 and run it once on the baseline's own model
   inputs (its ``input:*`` records, which every capture keeps whole, stats mode included),
   caches off. A forward pre-hook (``with_kwargs=True``) on every module keeps each call's
   positional and keyword arguments as they were: tensors cloned to host memory (a tensor
   that several calls share, such as the mask or ``(cos, sin)``, once), tuples, ``None``,
   numbers and flags as they are, cache objects dropped. A forward hook keeps the call's
   fp32 outputs: the local reference.
2. **Probe** (target dtype): load the model in the target dtype under the ``keep_fp32``
   policy and run it once on the same inputs, noting only the dtype each floating argument of
   each call arrives in (before a kept module's upcast): what the target run holds it as.
3. **Re-run**: call each module alone on its recorded arguments rounded to those dtypes
   (integer and bool tensors as they are; additive masks at fp32's lowest value moved to the
   target's lowest, as the target run builds them; ``use_cache=False``), and measure each
   output against its fp32 output (padded positions left out, as compare does).

Passes 1 and 2 are :mod:`~precision.doctor.isolation.calls`, pass 3
:mod:`~precision.doctor.isolation.rerun`; :mod:`~precision.doctor.isolation.classify` gives the
verdicts below, and :mod:`~precision.doctor.isolation.report` holds the results.

Why not record module inputs in the dump (``capture --inputs``): every keyword argument of
every call (masks, ``position_embeddings``, flags) would have to be stored and described, and
calls whose arguments are not tensors could still not be re-created; running the model once
needs only the model inputs every capture records, and gives each module exactly the call
the model makes. The price: host memory for every call's arguments and fp32 outputs (about
what a full capture with ``--inputs '*'`` writes), and the model loaded twice, one after the
other.

Verdicts, per module output (worst first):

- ``culprit``: all its floating inputs are finite and fit the dtype they are held in, and
  alone it is beyond the profile (inf/NaN or values pinned near the dtype's max: OVERFLOW,
  NAN; or drift): the error is made here. Also a module whose inputs already overflowed, when
  alone it makes inf/NaN/pinned values where an fp32 copy of it on those same inputs stays
  finite: it adds an overflow of its own.
- ``encloses``: beyond the profile alone, but a module it calls is a culprit at least as
  severe (an overflow counts over drift): the error is made inside it. A decoder layer whose
  own residual add overflows while none of its submodules does is the culprit itself.
- ``inherited``: its inputs do not fit the target dtype (they overflowed upstream) and its
  output is no worse than that implies; or it is fine alone but flagged in the full run
  (``target``). The reason says which.
- ``unknown``: re-running it raised; the reason is the error's first line.
- ``ok``.

The report is falsy when there is a culprit, and whenever the full ``target`` run has an
OVERFLOW or NAN record: a run that overflows or turns to NaN never passes, even where no
module alone can be blamed (modules that could not be re-run, say).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace

from ...dtypes import canonical
from ...dumps import load
from ...dumps.dump import Dump
from ...dumps.keys import INPUT_PREFIX
from ...errors import InputError
from ...judge.compare import compare
from ...judge.measure.row import Row
from ...judge.profiles import profile_for
from ...runtime.models.load import TORCH_DTYPES, Policy, load_model
from .calls import probe_dtypes, record_calls
from .classify import RANGE_STATUSES, CallResult, mark_enclosing, verdict_with_full_run
from .report import VERDICTS, IsolateReport, IsolateRow
from .rerun import rerun_call

__all__ = ["VERDICTS", "IsolateReport", "IsolateRow", "isolate"]


def isolate(base: str | os.PathLike[str] | Dump, model: str, *, dtype: str = "fp16",
            device: str = "cpu", keep_fp32: str | Sequence[str] = ("none",),
            target: str | os.PathLike[str] | Dump | None = None) -> IsolateReport:
    """Local error of every module call, next to the accumulated error of ``target``."""
    b = base if isinstance(base, Dump) else load(base)
    if not any(k.startswith(INPUT_PREFIX) for k in b.tensors):
        raise InputError(f"{b.path.name} holds no model inputs (input:* records) to re-run "
                         "the model on: take the baseline with `precision capture`")
    dt = canonical(dtype)
    prof = profile_for("float32", dt)
    accumulated: dict[str, Row] = {}
    problems: tuple[Row, ...] = ()
    if target is not None:
        rows = compare(b, target).rows
        accumulated = {r.key: r for r in rows}
        problems = tuple(r for r in rows if r.status in RANGE_STATUSES)
    calls, notes = record_calls(b, model, device)
    loaded = load_model(model, dtype=dt, device=device, policy=Policy.parse(keep_fp32))
    held, probe_note = probe_dtypes(loaded.model, b, device, dt)
    notes += [probe_note] if probe_note else []
    modules = dict(loaded.model.named_modules())
    target_dtype = TORCH_DTYPES[dt]
    results: list[CallResult] = []
    skipped = 0
    for c in calls:
        if not c.outputs:
            skipped += 1
            continue
        results.append(rerun_call(b, c, modules[c.module], held.get((c.module, c.call), {}),
                                  target_dtype, device, prof))
    mark_enclosing(results)
    out: list[IsolateRow] = []
    for res in results:
        for r in res.rows:
            acc = accumulated.get(r.key)
            e = b.entry(r.key)
            out.append(replace(r, order=e.order if e is not None else -1, accumulated=acc,
                               verdict=verdict_with_full_run(r.verdict, acc)))
    return IsolateReport(prof, tuple(out), len(results), skipped, problems, tuple(notes))

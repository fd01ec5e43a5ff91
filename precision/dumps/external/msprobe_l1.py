"""msprobe L1 (API-level) dumps lined up with precision's operation records (``--level ops``).

msprobe names an API call ``<Family>.<api>.<n>`` (``Functional.softmax.0``,
``Tensor.__add__.3``) with no module, so its calls are paired with a capture's operation
records by name and call order (:func:`msprobe_pairs`, docs/external.md); ``compare`` lines
an msprobe L1 run up with an ops capture among its runs (:func:`line_up_runs`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from ...dtypes import is_float
from .. import load
from ..dump import Dump, Entry
from ..keys import entry_module, make_key, parse_key
from .guard import Converted
from .temporary import write_dump

_MSPROBE_API = re.compile(r"^(?P<family>[A-Za-z_]\w*)\.(?P<api>.+)\.(?P<n>\d+)$")
#: msprobe API names (a dunder without its underscores) that precision's ops level records
#: under another name; any other API is its name, a dunder's without its underscores
#: (``__matmul__`` -> ``matmul``, ``__rsub__`` -> ``rsub``), as
#: :func:`precision.runtime.capture.ops.op_name` names torch's functions
MSPROBE_OP_NAMES = {"radd": "add", "rmul": "mul", "truediv": "div", "rtruediv": "rdiv",
                    "iadd": "add_", "imul": "mul_", "isub": "sub_", "itruediv": "div_",
                    "idiv": "div_", "ipow": "pow_"}


def msprobe_op(api: str) -> str:
    """``__add__`` / ``add`` -> ``add``; ``__iadd__`` / ``add_`` -> ``add_`` (in place, as
    :func:`precision.runtime.capture.ops.op_name` names it); ``softmax`` -> ``softmax``."""
    bare = api[2:-2] if len(api) > 4 and api.startswith("__") and api.endswith("__") else api
    return MSPROBE_OP_NAMES.get(bare, bare)


def is_msprobe_l1(d: Dump) -> bool:
    """An msprobe dump holding API records (level L1, or mix)."""
    return bool(d.meta.get("msprobe")) and any(
        _msprobe_api(e.key) is not None for e in d.entries)


def _msprobe_api(key: str) -> str | None:
    """``Tensor.__add__.3:out.0`` -> ``add``; None for anything but an msprobe API record."""
    k = parse_key(key)
    if k.op or k.module.startswith("Module."):
        return None
    m = _MSPROBE_API.match(k.module)
    return msprobe_op(m["api"]) if m else None


def msprobe_pairs(ms: Dump, ops: Dump) -> tuple[dict[str, str], dict[str, tuple[int, int]]]:
    """msprobe key -> precision key for the API records of ``ms`` that line up with the
    operation records of ``ops`` (a ``--level ops`` capture), and the operations that could
    not be paired (name -> (msprobe calls, precision calls)).

    msprobe's names carry no module, so calls are paired by order: each side's calls with a
    floating-point output are listed per operation name in execution order (msprobe's
    ``dump.json`` order, in which its per-API counters ``<api>.<n>`` count up; precision's
    entry order), and the k-th ``softmax`` of one is the k-th ``softmax`` of the other. An
    operation whose call counts differ is not paired at all (order would not say which
    call is which); a pair whose floating-point outputs differ in number or shape is not
    renamed. Inputs are renamed with their call when precision recorded the same input
    (``:in.<i>``, ``--inputs``).
    """
    calls: dict[str, list[list[Entry]]] = {}
    groups: dict[tuple[str, int], list[Entry]] = {}
    for e in ops.entries:
        k = parse_key(e.key)
        if not k.op or k.kind != "out" or k.rank is not None or not is_float(e.dtype):
            continue
        group = groups.get((e.module, k.call))
        if group is None:
            group = groups[(e.module, k.call)] = []
            calls.setdefault(k.op, []).append(group)
        group.append(e)
    mine: dict[str, list[list[Entry]]] = {}
    records: dict[str, list[Entry]] = {}
    for e in ms.entries:
        op = _msprobe_api(e.key)
        if op is None:
            continue
        rec = records.get(e.module)
        if rec is None:
            rec = records[e.module] = []
            mine.setdefault(op, []).append(rec)
        rec.append(e)
    renamed: dict[str, str] = {}
    unpaired: dict[str, tuple[int, int]] = {}
    for op, recs in mine.items():
        recs = [r for r in recs if any(e.kind == "out" and is_float(e.dtype) for e in r)]
        theirs = calls.get(op, [])
        if not recs:
            continue
        if len(recs) != len(theirs):
            unpaired[op] = (len(recs), len(theirs))
            continue
        for rec, group in zip(recs, theirs, strict=True):
            outs = [e for e in rec if e.kind == "out" and is_float(e.dtype)]
            if [e.shape for e in outs] != [e.shape for e in group]:
                continue
            renamed.update((a.key, b.key) for a, b in zip(outs, group, strict=True))
            first = parse_key(group[0].key)
            for e in rec:
                if e.kind == "in":
                    theirs_in = make_key(group[0].module, "in", e.index, first.call)
                    other = ops.entry(theirs_in)
                    if other is not None and other.shape == e.shape:
                        renamed[e.key] = theirs_in
    return renamed, unpaired


def line_up_msprobe(ms: Dump, ops: Dump) -> Dump:
    """``ms`` (an msprobe L1 dump, see :func:`precision.dumps.external.open_any`) with its
    API records renamed to the operation records of ``ops`` they pair with
    (:func:`msprobe_pairs`); what was paired is in ``meta["msprobe"]["lineup"]``."""
    renamed, unpaired = msprobe_pairs(ms, ops)
    api = {e.module for e in ms.entries if _msprobe_api(e.key) is not None}
    computing = {e.module for e in ms.entries if e.module in api and e.kind == "out"
                 and is_float(e.dtype)}
    tensors: dict[str, np.ndarray] = {}
    stats: list[dict[str, Any]] = []
    for e in ms.entries:
        if e.module in api and e.module not in computing:
            continue  # integer and boolean bookkeeping: precision records none
        key = renamed.get(e.key, e.key)
        if e.key in ms.tensors:
            tensors[key] = np.asarray(ms[e.key])
        elif e.stats is not None:
            k = parse_key(key)
            stats.append({"key": key, "module": entry_module(key), "kind": k.kind or "out",
                          "index": k.index, "call": k.call, "shape": list(e.shape),
                          "dtype": e.dtype, "stats": e.stats})
    paired = {parse_key(k).module for k in renamed}
    kept = sorted({op for e in ms.entries if (op := _msprobe_api(e.key)) is not None
                   and e.module not in paired and e.kind == "out" and is_float(e.dtype)})
    info = dict(ms.meta.get("msprobe") or {}) | {"lineup": {
        "with": ops.path.name, "records": len(api), "paired": len(paired),
        "not_float": len(api - computing),
        "renamed": len(renamed), "unpaired": {op: list(n) for op, n in unpaired.items()},
        "kept": kept}}
    src = Path(str(ms.meta.get("external") or ms.path))
    return load(write_dump(src, Converted(tensors.items(), {"msprobe": info, "mode": ms.mode},
                                          stats)))


def line_up_runs(runs: dict[str, Dump]) -> dict[str, Dump]:
    """Each msprobe L1 run among ``runs`` lined up with the first ``--level ops`` capture
    among them (unchanged when there is none)."""
    ops = next((d for d in runs.values() if d.meta.get("level") == "ops"), None)
    if ops is None:
        return runs
    return {name: line_up_msprobe(d, ops) if is_msprobe_l1(d) else d
            for name, d in runs.items()}


def lineup_notes(runs: dict[str, Dump]) -> list[str]:
    """One line per msprobe run lined up with op records: how many of its API calls."""
    notes = []
    for d in runs.values():
        info = (d.meta.get("msprobe") or {}).get("lineup")
        if not info:
            continue
        line = (f"msprobe L1: {info['paired']} of {info['records']} API calls lined up with "
                f"the operation records of {info['with']} by call order")
        if info.get("not_float"):
            line += (f"; {info['not_float']} with no floating-point output left out (precision "
                     "records none)")
        if info["unpaired"]:
            line += "; not paired, as the call counts differ: " + ", ".join(
                f"{op} ({a} vs {b})" for op, (a, b) in sorted(info["unpaired"].items()))
        if info["kept"]:
            line += "; kept msprobe's names: " + ", ".join(info["kept"][:8]) + (
                ", ..." if len(info["kept"]) > 8 else "")
        notes.append(line)
    return notes

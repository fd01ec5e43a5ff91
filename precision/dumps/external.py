"""Logits that did not come from ``precision capture``, as either side of a comparison.

Accepted (see docs/external.md):

- ``.npy``: one array, the logits (``(..., vocab)``)
- ``.npz``: the array named ``logits``, or the only array
- ``.pt`` / ``.pth``: a tensor, or a dict with a ``logits`` tensor, read with
  ``torch.load(weights_only=True)``: nothing is unpickled beyond tensors and containers
- ``.safetensors`` / ``.st`` without precision metadata: the tensor named ``logits``
- msprobe dumps: a ``dump.json`` (or its folder) with the tensors it names under
  ``dump_tensor_data/`` (``.npy``, or ``.pt`` read with ``weights_only=True``); forward
  inputs and outputs. L0 module records (``Module.<path>.<Class>.forward.<n>``) take
  precision's keys (``<path>:out``), so they line up with a capture; API records keep their
  names. Without tensor files (msprobe statistics), Max/Min/Mean/Norm become stats records;
  msprobe keeps no NaN/inf counts, so an infinite or NaN Max/Min counts as one.
- ``.json``: top-k log-probabilities per generated token, as vLLM's
  ``SamplingParams(logprobs=k)`` gives them: a list with one object per sequence,
  ``{"token_ids": [...], "logprobs": [{"<id>": logprob | {"logprob": x}, ...}, ...]}``

Each is converted into a temporary precision dump: logits under the key ``logits`` (marked
as the dump's logits), top-k data under ``generation:*``, so the usual logits and
generation comparisons apply. Files are removed when the process exits.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..dtypes import SAFETENSORS_TO_NAME, canonical, is_float
from ..errors import DumpError
from . import load
from .dump import Dump, DumpWriter, Entry
from .keys import GEN_PREFIX, make_key, parse_key

LOGITS_KEY = "logits"
EXTERNAL_SUFFIXES = (".npy", ".npz", ".pt", ".pth", ".json")
_WORKDIR: Path | None = None


def open_any(path: str | os.PathLike[str], *, allow_partial: bool = False) -> Dump:
    """A precision dump, or external logits converted into one (see the module docstring)."""
    p = Path(path)
    if p.is_dir() and (p / "dump.json").is_file():
        p = p / "dump.json"
    if p.name == "dump.json":
        tensors, meta = _msprobe(p)
        return load(_write(p, tensors, meta))
    if p.suffix.lower() not in EXTERNAL_SUFFIXES:
        d = load(p, allow_partial=allow_partial)
        if d.meta.get("foreign") and LOGITS_KEY in d.tensors:
            d.meta["logits_key"] = LOGITS_KEY
        return d
    if not p.is_file():
        raise DumpError(f"{p}: no such file")
    reader = {".npy": _npy, ".npz": _npz, ".pt": _pt, ".pth": _pt, ".json": _vllm_json}
    tensors, meta = reader[p.suffix.lower()](p)
    return load(_write(p, tensors, meta))


def _write(src: Path, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    global _WORKDIR
    if _WORKDIR is None:
        _WORKDIR = Path(tempfile.mkdtemp(prefix="precision-external-"))
        atexit.register(shutil.rmtree, _WORKDIR, True)
    out = _WORKDIR / f"{len(list(_WORKDIR.iterdir()))}-{src.stem}.st"
    w = DumpWriter(out, force=True)
    entries = []
    for key, arr in tensors.items():
        a = np.ascontiguousarray(arr)
        name = "bfloat16" if a.dtype.name == "bfloat16" else a.dtype.name
        if name not in SAFETENSORS_TO_NAME.values():
            raise DumpError(f"{src}: {key} has dtype {a.dtype}, which a dump cannot hold")
        w.write(key, name, tuple(a.shape), a)
        k = parse_key(key)
        entries.append({"key": key, "module": _module(key), "kind": k.kind or "out",
                        "index": k.index, "call": k.call, "shape": list(a.shape),
                        "dtype": name})
    entries += meta.pop("extra_entries", [])
    w.close({"mode": "full", "external": str(src), "entries": entries,
             "model": {"class": "external"}} | meta)
    return out


def _module(key: str) -> str:
    """An entry's module as a capture writes it: an operation's with its name
    (``model.layers.0.self_attn/softmax``)."""
    k = parse_key(key)
    return k.module + (f"/{k.op}" if k.op else "")


def _logits_meta(arr: np.ndarray, src: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    if arr.ndim < 1 or not is_float("bfloat16" if arr.dtype.name == "bfloat16" else
                                    arr.dtype.name):
        raise DumpError(f"{src}: expected floating-point logits (..., vocab), got "
                        f"{arr.dtype} {list(arr.shape)}")
    dtype = "bfloat16" if arr.dtype.name == "bfloat16" else arr.dtype.name
    return {LOGITS_KEY: arr}, {"logits_key": LOGITS_KEY, "dtype": dtype}


def _npy(p: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    return _logits_meta(_npy_array(p), p)


def _npy_array(p: Path) -> np.ndarray:
    try:
        return np.load(p, allow_pickle=False)
    except ValueError as exc:
        raise DumpError(f"{p}: not a plain .npy array ({exc})") from None


def _npz(p: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    try:
        with np.load(p, allow_pickle=False) as z:
            names = list(z.keys())
            if LOGITS_KEY in names:
                return _logits_meta(z[LOGITS_KEY], p)
            if len(names) == 1:
                return _logits_meta(z[names[0]], p)
    except ValueError as exc:
        raise DumpError(f"{p}: not a plain .npz archive ({exc})") from None
    raise DumpError(f"{p}: holds {names}; name the logits array 'logits'")


def _pt(p: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    return _logits_meta(_pt_array(p), p)


def _pt_array(p: Path) -> np.ndarray:
    try:
        import torch
    except ImportError:
        raise DumpError(f"{p}: reading a .pt file needs torch (pip install torch), or save "
                        "the logits as .npy/.safetensors instead") from None

    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle payloads beyond tensors are refused here
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DumpError(f"{p}: not loadable with weights_only=True ({first})") from None
    if isinstance(obj, dict):
        obj = obj.get(LOGITS_KEY)
    if not isinstance(obj, torch.Tensor):
        raise DumpError(f"{p}: expected a tensor or a dict with a 'logits' tensor")
    t = obj.detach()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        arr = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    else:
        arr = t.numpy()
    return arr


def _vllm_json(p: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DumpError(f"{p}: not valid JSON ({exc})") from None
    seqs = doc.get("sequences", doc) if isinstance(doc, dict) else doc
    if not isinstance(seqs, list) or not seqs:
        raise DumpError(f"{p}: expected a list of sequences with token_ids and logprobs")
    try:
        tokens = [list(map(int, s["token_ids"])) for s in seqs]
        steps = [[_step(step) for step in s["logprobs"]] for s in seqs]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DumpError(f"{p}: sequence entries need 'token_ids' and 'logprobs' ({exc})") \
            from None
    n_steps = max(len(t) for t in tokens)
    k = max((len(s) for seq in steps for s in seq), default=1)
    tok = np.full((len(seqs), n_steps), -1, np.int64)
    ids = np.full((len(seqs), n_steps, k), -1, np.int64)
    lps = np.full((len(seqs), n_steps, k), -np.inf, np.float32)
    for r, (t, seq) in enumerate(zip(tokens, steps, strict=True)):
        tok[r, :len(t)] = t
        for s, pairs in enumerate(seq[:n_steps]):
            for j, (i, lp) in enumerate(pairs):
                ids[r, s, j], lps[r, s, j] = i, lp
    tensors: dict[str, np.ndarray] = {GEN_PREFIX + "tokens": tok, GEN_PREFIX + "topk_ids": ids,
                                      GEN_PREFIX + "topk_logprobs": lps}
    return tensors, {"generation": {"num_beams": 1, "steps": n_steps, "topk": k},
                     "logits_key": None}


def _step(entry: dict[str, Any]) -> list[tuple[int, float]]:
    """One step's {token id: logprob} as (id, logprob) pairs, most likely first."""
    pairs = []
    for key, value in entry.items():
        lp = value["logprob"] if isinstance(value, dict) else value
        pairs.append((int(key), float(lp)))
    return sorted(pairs, key=lambda kv: -kv[1])


# ----------------------------------------------------------------------------- msprobe

_MSPROBE_MODULE = re.compile(r"^Module\.(?P<path>.+)\.(?P<cls>[A-Za-z_]\w*)\.forward\.(?P<n>\d+)$")


def _msprobe_key(name: str, kind: str, index: int) -> str:
    """``Module.encoder.block.0.layer.1.DenseReluDense.wo.Linear.forward.0`` -> the precision
    key of that module's output (``encoder...wo:out``); API records keep their own names."""
    m = _MSPROBE_MODULE.match(name)
    if m:
        return make_key(m["path"], kind, str(index) if index else "", int(m["n"]))
    return make_key(name.removesuffix(".forward"), kind, str(index))


def _msprobe(p: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """msprobe's dump.json (+ dump_tensor_data/*.npy|.pt): forward inputs and outputs."""
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
        data = doc["data"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DumpError(f"{p}: not an msprobe dump.json ({exc})") from None
    folder = next((d for d in (p.parent / "dump_tensor_data", p.parent) if d.is_dir()), p.parent)
    tensors: dict[str, np.ndarray] = {}
    stats: list[dict[str, Any]] = []
    for name, record in data.items():
        if not name.endswith(".forward") and ".forward." not in name:
            continue  # backward records: gradients are issue 8's business
        parts = [("out", record.get("output") or [])]
        parts.append(("in", list(record.get("input_args") or [])
                      + list((record.get("input_kwargs") or {}).values())))
        for kind, items in parts:
            for i, item in enumerate(items if isinstance(items, list) else [items]):
                if not isinstance(item, dict) or "Tensor" not in str(item.get("type", "")):
                    continue
                key = _msprobe_key(name, kind, i)
                arr = _msprobe_tensor(folder, item.get("data_name"))
                if arr is not None:
                    tensors[key] = arr
                else:
                    stats.append(_msprobe_stats(key, item))
    if not tensors and not stats:
        raise DumpError(f"{p}: no forward tensors in this msprobe dump")
    return tensors, {"msprobe": {"task": doc.get("task"), "level": doc.get("level"),
                                 "framework": doc.get("framework")},
                     "mode": "full" if tensors else "stats", "extra_entries": stats}


def _msprobe_tensor(folder: Path, data_name: Any) -> np.ndarray | None:
    if not isinstance(data_name, str) or data_name in ("", "-1"):
        return None
    f = folder / data_name
    if not f.is_file():
        return None
    if f.suffix == ".pt" and importlib.util.find_spec("torch") is None:
        return None  # compare is torch-free: msprobe's statistics of it from dump.json
    arr = _npy_array(f) if f.suffix == ".npy" else _pt_array(f) if f.suffix == ".pt" else None
    if arr is None or (arr.dtype.name != "bfloat16"
                       and arr.dtype.name not in SAFETENSORS_TO_NAME.values()):
        return None  # a dtype a dump cannot hold: its statistics from dump.json instead
    return arr


def _msprobe_stats(key: str, item: dict[str, Any]) -> dict[str, Any]:
    """A stats-only record from msprobe's Max/Min/Mean/Norm (no std: msprobe has none)."""
    shape = [int(s) for s in item.get("shape") or []]
    numel = math.prod(shape)

    def num(name: str) -> float | None:
        v = item.get(name)
        try:
            return float(v) if v is not None else None
        except (TypeError, ValueError):
            return None

    raw = {k: num(k) for k in ("Min", "Max", "Mean", "Norm")}
    # msprobe keeps no counts: an infinite or NaN Max/Min says "at least one" (a NaN Mean
    # alone can come from +inf and -inf together)
    counts = {"nan": int(any(v is not None and math.isnan(v) for v in (raw["Max"], raw["Min"]))),
              "posinf": int(raw["Max"] == math.inf), "neginf": int(raw["Min"] == -math.inf)}
    fin = {k: (v if v is not None and math.isfinite(v) else None) for k, v in raw.items()}
    lo, hi = fin["Min"], fin["Max"]
    absmax = max(abs(lo), abs(hi)) if lo is not None and hi is not None else None
    k = parse_key(key)
    dtype = canonical(str(item.get("dtype", "float32")))
    return {"key": key, "module": _module(key), "kind": k.kind or "out", "index": k.index,
            "call": k.call, "shape": shape, "dtype": dtype,
            "stats": {"numel": numel, "min": lo, "max": hi, "mean": fin["Mean"],
                      "norm": fin["Norm"], "absmax": absmax} | counts}


# ------------------------------------------------------------- msprobe L1 against op records

_MSPROBE_API = re.compile(r"^(?P<family>[A-Za-z_]\w*)\.(?P<api>.+)\.(?P<n>\d+)$")
#: msprobe API names (a dunder without its underscores) that precision's ops level records
#: under another name; any other API is its name, a dunder's without its underscores
#: (``__matmul__`` -> ``matmul``, ``__rsub__`` -> ``rsub``), as
#: :func:`precision.runtime.ops.op_name` names torch's functions
MSPROBE_OP_NAMES = {"radd": "add", "rmul": "mul", "truediv": "div", "rtruediv": "rdiv",
                    "iadd": "add_", "imul": "mul_", "isub": "sub_", "itruediv": "div_",
                    "idiv": "div_", "ipow": "pow_"}


def msprobe_op(api: str) -> str:
    """``__add__`` / ``add`` -> ``add``; ``__iadd__`` / ``add_`` -> ``add_`` (in place, as
    :func:`precision.runtime.ops.op_name` names it); ``softmax`` -> ``softmax``."""
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
    """``ms`` (an msprobe L1 dump, see :func:`open_any`) with its API records renamed to the
    operation records of ``ops`` they pair with (:func:`msprobe_pairs`); what was paired is
    in ``meta["msprobe"]["lineup"]``."""
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
            stats.append({"key": key, "module": _module(key), "kind": k.kind or "out",
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
    return load(_write(src, tensors, {"msprobe": info, "mode": ms.mode,
                                      "extra_entries": stats}))


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

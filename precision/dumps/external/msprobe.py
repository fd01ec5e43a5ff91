"""msprobe dumps: ``dump.json`` and the tensor files it names under ``dump_tensor_data/``.

Forward records only, inputs (``input_args``, ``input_kwargs``) and outputs. L0 module records
(``Module.<path>.<Class>.forward.<n>``) take the keys a precision capture gives the same
module: a single output ``<path>:out``, tuple outputs ``<path>:out.0``..., positional inputs
``<path>:in.0``..., keyword inputs ``<path>:in.<name>``, call ``n`` as ``#n``. API records
(``Functional.relu.0.forward``) keep their names (``Functional.relu.0:out.0``).

Every record is checked as it is parsed: objects where objects belong, shapes of
non-negative integers, known dtypes, tensor files that exist and lie inside the dump's
folder (a ``data_name`` with ``../`` or an absolute path is refused, symlinks included).
Without a tensor file (``data_name`` absent or ``-1``: msprobe's statistics mode), a record's
``Max``/``Min``/``Mean``/``Norm`` become a stats record; msprobe keeps no NaN/inf counts, so
an infinite or NaN ``Max``/``Min`` counts as one. Tensor files are read one at a time while
the dump is written.
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ...dtypes import canonical
from ...errors import DumpError, InputError
from ..keys import GENERATION, INPUT, entry_module, make_key, parse_key
from .arrays import npy_file, pt_tensor
from .guard import Converted, is_int, is_number, parse_json, reading

WHAT = "msprobe dump.json"

MODULE_RECORD = re.compile(r"^Module\.(?P<path>.+)\.(?P<cls>[A-Za-z_]\w*)\.forward\.(?P<n>\d+)$")
_NAME = re.compile(r"[\w.\-]+")  # what a record name or an input's name may hold in a key
MAX_DEPTH = 16  # nested tuples/dicts of inputs or outputs, more than any module takes
_MAX_SIZE = 2**63 - 1
_FIELDS = (("output", "out", (list, dict)), ("input_args", "in", (list,)),
           ("input_kwargs", "in", (dict,)))


def read(p: Path) -> Converted:
    """The records of an msprobe ``dump.json`` as a dump (see the module docstring)."""
    doc = parse_json(p, WHAT)
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), dict):
        raise DumpError(f"{p}: not an msprobe dump.json (expected an object with a 'data' "
                        "object of records)")
    root = p.parent.resolve()
    folder = p.parent / "dump_tensor_data"
    folder = folder if folder.is_dir() else p.parent
    files: list[tuple[str, Path]] = []
    stats: list[dict[str, Any]] = []
    seen: dict[str, str] = {}  # key -> the record that gave it
    named: dict[Path, str] = {}  # tensor file -> the record that names it
    for name, record in doc["data"].items():
        if not name.endswith(".forward") and ".forward." not in name:
            continue  # backward records: gradients are issue 8's business
        if not isinstance(record, dict):
            raise DumpError(f"{p}: record {name!r} is a {_kind(record)}, not an object")
        if not _NAME.fullmatch(name):
            raise DumpError(f"{p}: record name {name!r} holds characters a key cannot")
        for key, item in _items(p, name, record):
            if key in seen:
                raise DumpError(f"{p}: records {seen[key]!r} and {name!r} both give {key!r}")
            seen[key] = name
            f = _tensor_file(p, root, folder, name, item.get("data_name"))
            if f is None or (f.suffix == ".pt" and not _have_torch()):
                # statistics mode; or a .pt file where torch is absent (compare is
                # torch-free): msprobe's statistics of it in dump.json
                stats.append(_stats(p, name, key, item))
            elif f in named:  # one file copied under many keys: a dump far larger than this
                raise DumpError(f"{p}: records {named[f]!r} and {name!r} name the same tensor "
                                f"file {item['data_name']}")
            else:
                named[f] = name
                files.append((key, f))
    if not files and not stats:
        raise DumpError(f"{p}: no forward tensors in this msprobe dump")
    info = {k: doc[k] for k in ("task", "level", "framework") if isinstance(doc.get(k), str)}
    return Converted(_tensors(files), {"msprobe": info, "mode": "full" if files else "stats"},
                     stats)


def _have_torch() -> bool:
    """Whether torch can be imported here (msprobe's .pt files need it)."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # blocked (sys.modules["torch"] = None)
        return False


def _tensors(files: list[tuple[str, Path]]) -> Iterator[tuple[str, np.ndarray]]:
    """Each record's tensor, read when the writer asks for it (one in memory at a time)."""
    for key, f in files:
        with reading(f, f"{f.suffix} tensor file"):
            arr = npy_file(f) if f.suffix == ".npy" else pt_tensor(f)
        yield key, arr


def _items(p: Path, name: str, record: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(key, tensor item)`` for every tensor among a record's outputs and inputs."""
    m = MODULE_RECORD.match(name)
    module, call = (m["path"], int(m["n"])) if m else (name.removesuffix(".forward"), 0)
    if module in (INPUT, GENERATION):
        raise DumpError(f"{p}: record {name!r} would stand for precision's own {module!r} "
                        "records")
    for field, kind, types in _FIELDS:
        value = record.get(field)
        if value is None:
            continue
        if not isinstance(value, types):
            raise DumpError(f"{p}: record {name!r}: {field} is a {_kind(value)}, expected "
                            + " or ".join("a list" if t is list else "an object" for t in types))
        if field == "output" and isinstance(value, list) and len(value) == 1:
            value = value[0]  # one output: <path>:out, as a capture keys a single tensor
        for path, item in _leaves(p, name, value, "", 0):
            index = path if m else (path or "0")
            if index and not _NAME.fullmatch(index):
                raise DumpError(f"{p}: record {name!r}: input name {index!r} holds "
                                "characters a key cannot")
            yield make_key(module, kind, index, call), item


def _leaves(p: Path, name: str, value: Any, prefix: str,
            depth: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """Tensor items inside nested lists and objects, with capture's paths (``1.0``)."""
    if depth > MAX_DEPTH:
        raise DumpError(f"{p}: record {name!r} nests its inputs or outputs more than "
                        f"{MAX_DEPTH} deep")
    if isinstance(value, dict) and "type" in value:  # one argument: a tensor, or not
        if not isinstance(value["type"], str):
            raise DumpError(f"{p}: record {name!r}: an item's type is a "
                            f"{_kind(value['type'])}, not a string")
        if "Tensor" in value["type"]:
            yield prefix, value
        return
    children = (value.items() if isinstance(value, dict) else enumerate(value)
                if isinstance(value, list) else ())
    for k, v in children:
        yield from _leaves(p, name, v, f"{prefix}.{k}" if prefix else str(k), depth + 1)


def _tensor_file(p: Path, root: Path, folder: Path, name: str, data_name: Any) -> Path | None:
    """The tensor file a record names, inside the dump's folder; None in statistics mode."""
    if data_name is None or data_name in ("", "-1"):
        return None
    if not isinstance(data_name, str):
        raise DumpError(f"{p}: record {name!r}: data_name is a {_kind(data_name)}, not a "
                        "file name")
    f = (folder / data_name).resolve()
    if not f.is_relative_to(root):
        raise DumpError(f"{p}: record {name!r}: data_name {data_name!r} lies outside the dump "
                        f"folder {root}: refused")
    if f.suffix not in (".npy", ".pt"):
        raise DumpError(f"{p}: record {name!r}: data_name {data_name!r} is neither .npy nor "
                        ".pt")
    if not f.is_file():
        raise DumpError(f"{p}: record {name!r}: its tensor file {data_name} is missing from "
                        f"{folder} (copied incompletely?)")
    return f


def _stats(p: Path, name: str, key: str, item: dict[str, Any]) -> dict[str, Any]:
    """A stats-only record from msprobe's Max/Min/Mean/Norm (no std: msprobe has none)."""
    shape = item.get("shape")
    if not isinstance(shape, list) or not all(is_int(s) and 0 <= s <= _MAX_SIZE for s in shape) \
            or math.prod(shape) > _MAX_SIZE:
        raise DumpError(f"{p}: record {name!r}: shape {str(shape)[:40]} is not a list of sizes")
    raw_dtype = item.get("dtype", "float32")
    try:
        dtype = canonical(raw_dtype) if isinstance(raw_dtype, str) else None
    except InputError:
        dtype = None
    if dtype is None:
        raise DumpError(f"{p}: record {name!r}: dtype {str(raw_dtype)[:40]!r} is not one a dump "
                        "holds")
    raw = {k: _number(item.get(k)) for k in ("Min", "Max", "Mean", "Norm")}
    # msprobe keeps no counts: an infinite or NaN Max/Min says "at least one" (a NaN Mean
    # alone can come from +inf and -inf together)
    counts = {"nan": int(any(v is not None and math.isnan(v) for v in (raw["Max"], raw["Min"]))),
              "posinf": int(raw["Max"] == math.inf), "neginf": int(raw["Min"] == -math.inf)}
    fin = {k: (v if v is not None and math.isfinite(v) else None) for k, v in raw.items()}
    lo, hi = fin["Min"], fin["Max"]
    if lo is not None and hi is not None and lo > hi:
        raise DumpError(f"{p}: record {name!r}: Min {lo} is above Max {hi}")
    if fin["Norm"] is not None and fin["Norm"] < 0:
        raise DumpError(f"{p}: record {name!r}: Norm {fin['Norm']} is negative")
    absmax = max(abs(lo), abs(hi)) if lo is not None and hi is not None else None
    k = parse_key(key)
    return {"key": key, "module": entry_module(key), "kind": k.kind or "out", "index": k.index,
            "call": k.call, "shape": shape, "dtype": dtype,
            "stats": {"numel": math.prod(shape), "min": lo, "max": hi, "mean": fin["Mean"],
                      "norm": fin["Norm"], "absmax": absmax} | counts}


def _number(value: Any) -> float | None:
    """A statistic as a float (a number, or text such as ``"inf"``); None when it is none."""
    if is_number(value):
        try:
            return float(value)
        except OverflowError:  # an integer beyond the float range: as good as infinite
            return math.copysign(math.inf, value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _kind(value: Any) -> str:
    """A JSON value's kind, for messages."""
    return {dict: "object", list: "list", str: "string", bool: "boolean",
            type(None): "null"}.get(type(value), "number")

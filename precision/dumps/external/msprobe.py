"""msprobe dumps: ``dump.json`` and the tensor files it names under ``dump_tensor_data/``.

Records, by name (PyTorch ``Module``, MindSpore ``Cell``, and API records such as
``Functional.relu.0``, ``Tensor.__add__.0``, ``Mint.linear.0``):

- forward (``Module.<path>.<Class>.forward.<n>``): a module's inputs and outputs take the
  keys a precision capture gives the same module: a single output ``<path>:out``, tuple
  outputs ``<path>:out.0``..., positional inputs ``<path>:in.0``..., keyword inputs
  ``<path>:in.<name>``, call ``n`` as ``#n``; an API record keeps its name
  (``Functional.relu.0:out.0``);
- backward (``...backward.<n>``): its ``input``, the gradient of the record's output, is
  precision's ``:grad`` (``<path>:grad``, ``Functional.linear.7:grad.0``);
- ``parameters_grad``: each parameter's gradient, ``<path>.<name>:pgrad``.

Left out, each counted in the dump's ``meta["left_out"]`` (the report's notes say how many
and why): module ``parameters`` (the weights, the same file on both sides), the gradients
of a record's inputs (backward ``output``: precision keys gradients by outputs), tensors of
dtypes a dump cannot hold (complex, float8), and records whose name says none of the above.

Module and cell paths are renamed to line up with the other run's (:mod:`.names`): a
``--mapping`` file's module rules (JSON prefixes, or msprobe's ``layer_mapping.yaml``), then
wrapper cells removed (MindSpore's ``network._backbone.``, DDP's ``module.``), then Meta's
Llama layout as Hugging Face names it (MindFormers: ``attention.wq`` is ``self_attn.q_proj``).
Dtypes are read as PyTorch (``torch.bfloat16``) or MindSpore (``BFloat16``) names them.
Every record is checked as it is parsed: objects where objects belong, shapes of
non-negative integers, tensor files that exist and lie inside the dump's folder (a
``data_name`` with ``../`` or an absolute path is refused, symlinks included). Without a
tensor file (``data_name`` absent or ``-1``: msprobe's statistics task), a record's
``Max``/``Min``/``Mean``/``Norm`` become a stats record; a statistic msprobe did not write
(``summary_mode`` xor, or a list of statistics) stays unknown, never 0, and the checksum of
``summary_mode`` md5 or xor (msprobe's ``md5`` field) is kept as ``checksum``. msprobe keeps
no NaN/inf counts, so an infinite or NaN ``Max``/``Min`` counts as one. Tensor files are
read one at a time while the dump is written.

A folder is read by :func:`dump_files`'s layout: ``dump.json`` in it, or msprobe's
``step<s>/rank<r>/dump.json`` (``proc<pid>`` where no rank was set): one step (the first,
unless the folder passed is a ``step<s>`` folder), every rank, ranks keyed ``rank<r>/`` as
precision's own sharded dumps are.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ...dtypes import canonical, is_float
from ...errors import DumpError, InputError
from ..keys import GENERATION, INPUT, entry_module, make_key, parse_key
from .arrays import npy_file, pt_tensor
from .guard import Converted, is_int, is_number, parse_json, reading
from .names import Names, names_for, renamed_by_user

WHAT = "msprobe dump.json"

#: a module's (PyTorch) or cell's (MindSpore) record: its path, class, direction and call
MODULE_RECORD = re.compile(r"^(?:Module|Cell)\.(?P<path>.+)\.(?P<cls>[A-Za-z_]\w*)\."
                           r"(?P<dir>forward|backward|parameters_grad)\.(?P<n>\d+)$")
#: an API call's record (``Functional.relu.0.forward``)
API_RECORD = re.compile(r"^(?P<name>.+\.\d+)\.(?P<dir>forward|backward)$")
_NAME = re.compile(r"[\w.\-]+")  # what a record name or an input's name may hold in a key
MAX_DEPTH = 16  # nested tuples/dicts of inputs or outputs, more than any module takes
_MAX_SIZE = 2**63 - 1
#: direction -> (field, precision's kind or None when left out, JSON types it may be), in
#: the order a call's records are numbered: its inputs before its outputs, as they were made
_FIELDS: dict[str, tuple[tuple[str, str | None, tuple[type, ...]], ...]] = {
    "forward": (("input_args", "in", (list,)), ("input_kwargs", "in", (dict,)),
                ("output", "out", (list, dict)), ("parameters", None, (dict,))),
    "backward": (("input", "grad", (list, dict)), ("output", None, (list, dict))),
}
#: why a field's tensors are left out, for the note
_LEFT_OUT = {"parameters": "module parameters (weights)",
             "output": "gradients of inputs (precision keys gradients by outputs)"}


class _Records:
    """What one ``dump.json`` gives: tensor files, stats records, and what was left out."""

    def __init__(self, p: Path, rank: int | None) -> None:
        self.p, self.rank = p, rank
        self.root = p.parent.resolve()
        folder = p.parent / "dump_tensor_data"
        self.folder = folder if folder.is_dir() else p.parent
        self.files: list[tuple[str, Path, Any]] = []  # key, file, dump.json's shape
        self.stats: list[dict[str, Any]] = []
        self.left_out: Counter[str] = Counter()
        self.output_dtypes: Counter[str] = Counter()  # float outputs' dtypes, as recorded
        self.seen: dict[str, str] = {}  # key -> the record that gave it
        self.named: dict[Path, str] = {}  # tensor file -> the record that names it

    def add(self, name: str, key: str, item: dict[str, Any]) -> None:
        """One tensor item under ``key``: its file, or its statistics."""
        dtype = _dtype(item.get("dtype", "float32"))
        if dtype is None:
            self.left_out[f"dtype {str(item.get('dtype'))[:24]}"] += 1
            return
        if is_float(dtype) and parse_key(key).kind == "out":
            self.output_dtypes[dtype] += 1
        if self.rank is not None:
            key = f"rank{self.rank}/{key}"
        if key in self.seen:
            raise DumpError(f"{self.p}: records {self.seen[key]!r} and {name!r} both give "
                            f"{key!r}")
        self.seen[key] = name
        f = _tensor_file(self.p, self.root, self.folder, name, item.get("data_name"))
        if f is None or (f.suffix == ".pt" and not _have_torch()):
            # statistics task; or a .pt file where torch is absent (compare is torch-free):
            # msprobe's statistics of it in dump.json
            self.stats.append(_stats(self.p, name, key, item, dtype))
        elif f in self.named:  # one file copied under many keys: a dump far larger than this
            raise DumpError(f"{self.p}: records {self.named[f]!r} and {name!r} name the same "
                            f"tensor file {item['data_name']}")
        else:
            self.named[f] = name
            self.files.append((key, f, item.get("shape")))


def read(p: Path, mapping: str | os.PathLike[str] | None = None) -> Converted:
    """The records of an msprobe ``dump.json``, or of every rank of one step of an msprobe
    folder, as a dump (see the module docstring), its module names as Hugging Face's
    (wrappers removed, a ``mapping`` file's module rules or a known layout:
    :mod:`.names`)."""
    if p.is_dir():
        step, steps, ranks = dump_files(p)
    else:
        step, steps, ranks = None, [], {None: p}
    docs = {rank: _document(f) for rank, f in ranks.items()}
    classes = {m["path"]: m["cls"] for doc in docs.values() for name in doc["data"]
               if isinstance(name, str) and (m := MODULE_RECORD.match(name))}
    names = names_for(classes, mapping)
    records = [_records(f, rank, docs[rank], names) for rank, f in ranks.items()]
    files = [x for r in records for x in r.files]
    stats = [x for r in records for x in r.stats]
    left_out = sum((r.left_out for r in records), Counter())
    if not files and not stats:
        what = ", ".join(f"{n} {why}" for why, n in left_out.items())
        raise DumpError(f"{p}: no tensor this tool can compare in this msprobe dump"
                        + (f" (left out: {what})" if what else ""))
    first = next(iter(docs.values()))
    info: dict[str, Any] = {k: first[k] for k in ("task", "level", "framework")
                            if isinstance(first.get(k), str)}
    if step is not None:
        info |= {"step": step, "steps": steps}
    if ranks and next(iter(ranks)) is not None:
        info["ranks"] = sorted(r for r in ranks if r is not None)
    renamed = None if names.user is None else renamed_by_user(names, classes)
    if names.describe(renamed_nothing=renamed == 0):
        info["names"] = names.describe(renamed_nothing=renamed == 0)
    if renamed is not None:  # how many module paths the user's mapping file renamed
        info["mapping"] = renamed
    meta: dict[str, Any] = {"msprobe": info, "mode": "full" if files else "stats",
                            "left_out": dict(left_out)}
    outputs = sum((r.output_dtypes for r in records), Counter())
    if outputs:  # what the run computed in: the dtype msprobe recorded for most outputs
        meta["dtype"] = outputs.most_common(1)[0][0]
    return Converted(_tensors(files), meta, stats)


def _document(p: Path) -> dict[str, Any]:
    doc = parse_json(p, WHAT)
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), dict):
        raise DumpError(f"{p}: not an msprobe dump.json (expected an object with a 'data' "
                        "object of records)")
    return doc


def _records(p: Path, rank: int | None, doc: dict[str, Any], names: Names) -> _Records:
    """Every record of one ``dump.json``, module paths renamed by ``names``."""
    out = _Records(p, rank)
    for name, record in doc["data"].items():
        if not isinstance(record, dict):
            raise DumpError(f"{p}: record {name!r} is a {_kind(record)}, not an object")
        if not _NAME.fullmatch(name):
            raise DumpError(f"{p}: record name {name!r} holds characters a key cannot")
        for key, item in _items(p, name, record, out.left_out, names):
            out.add(name, key, item)
    return out


def is_msprobe_json(p: Path) -> bool:
    """Whether a ``.json`` file is an msprobe ``dump.json`` under another name: msprobe writes
    an object (``{"task": ..., "data": {...}}``), vLLM's top-k JSON a list."""
    try:
        with p.open("rb") as f:
            head = f.read(4096).decode("utf-8", "replace").lstrip("\ufeff \t\r\n")
    except OSError:
        return False
    return head.startswith("{") and re.match(
        r'\{\s*"(task|level|framework|dump_data_dir|data)"\s*:', head) is not None


def dump_files(folder: Path) -> tuple[int | None, list[int], dict[int | None, Path]]:
    """The ``dump.json`` files of one step of an msprobe folder: ``(step, steps, {rank:
    file})``. A ``dump.json`` in the folder itself is the one file (rank ``None``); else
    ``step<s>/`` folders (the first step, or the folder is one) hold ``rank<r>/`` folders, or
    ``proc<pid>/`` where msprobe ran with no rank set (numbered in their order when there
    are several)."""
    if (folder / "dump.json").is_file():
        return None, [], {None: folder / "dump.json"}
    steps = _numbered(folder, "step")
    step: int | None = None
    if steps:
        step = min(steps)
        folder = steps[step]
    elif (m := re.fullmatch(r"step(\d+)", folder.name)) is not None:
        step = int(m.group(1))
    ranks: dict[int | None, Path] = {
        r: d / "dump.json" for r, d in _numbered(folder, "rank").items()
        if (d / "dump.json").is_file()}
    if not ranks:
        procs = [d / "dump.json" for _, d in sorted(_numbered(folder, "proc").items())
                 if (d / "dump.json").is_file()]
        ranks = dict(enumerate(procs)) if len(procs) > 1 else (
            {None: procs[0]} if procs else {})
    if not ranks:
        raise DumpError(f"{folder}: no msprobe dump.json here, nor under step*/rank*/ or "
                        "step*/proc*/")
    return step, sorted(steps), ranks


def _numbered(folder: Path, prefix: str) -> dict[int, Path]:
    """Sub-folders named ``<prefix><number>``, by number."""
    try:
        subs = list(folder.iterdir())
    except OSError:
        return {}
    return {int(m.group(1)): d for d in subs
            if d.is_dir() and (m := re.fullmatch(rf"{prefix}(\d+)", d.name)) is not None}


def _dtype(raw: Any) -> str | None:
    """A dtype as PyTorch (``torch.bfloat16``) or MindSpore (``BFloat16``) names it, in
    precision's names; None for one a dump cannot hold (complex, float8) or not a name."""
    if not isinstance(raw, str):
        return None
    name = raw.strip().removeprefix("torch.").removeprefix("mindspore.")
    try:
        return canonical(name if name in ("half", "float", "double") else name.lower())
    except InputError:
        return None


def _have_torch() -> bool:
    """Whether torch can be imported here (msprobe's .pt files need it)."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # blocked (sys.modules["torch"] = None)
        return False


def _tensors(files: list[tuple[str, Path, Any]]) -> Iterator[tuple[str, np.ndarray]]:
    """Each record's tensor, read when the writer asks for it (one in memory at a time),
    of the shape ``dump.json`` gives it (its dtype may differ: msprobe saves bf16 as fp32)."""
    for key, f, shape in files:
        with reading(f, f"{f.suffix} tensor file"):
            arr = npy_file(f) if f.suffix == ".npy" else pt_tensor(f)
        if isinstance(shape, list) and tuple(shape) != arr.shape:
            raise DumpError(f"{f}: holds a {list(arr.shape)} tensor, but dump.json gives "
                            f"{key!r} the shape {shape[:8]}: a file of another dump?")
        yield key, arr


def _items(p: Path, name: str, record: dict[str, Any], left_out: Counter[str],
           names: Names) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(key, tensor item)`` for every tensor a record gives, a module's path renamed by
    ``names``; what it leaves out is counted in ``left_out``."""
    m = MODULE_RECORD.match(name)
    api = None if m else API_RECORD.match(name)
    if m is None and api is None:
        left_out["records of unknown kinds"] += 1
        return
    if m is not None:
        module, call, direction = names.rename(m["path"]), int(m["n"]), m["dir"]
    else:
        module, call, direction = api["name"], 0, api["dir"]  # type: ignore[index]
    if module in (INPUT, GENERATION):
        raise DumpError(f"{p}: record {name!r} would stand for precision's own {module!r} "
                        "records")
    if direction == "parameters_grad":
        for pname, value in record.items():
            if not _NAME.fullmatch(pname):
                raise DumpError(f"{p}: record {name!r}: parameter name {pname!r} holds "
                                "characters a key cannot")
            for path, item in _leaves(p, name, value, "", 0):
                # a parameter's gradient, a single tensor (msprobe lists it alone)
                yield make_key(f"{module}.{pname}", "pgrad", path.removeprefix("0"),
                               call), item
        return
    for field, kind, types in _FIELDS[direction]:
        value = record.get(field)
        if value is None:
            continue
        if not isinstance(value, types):
            raise DumpError(f"{p}: record {name!r}: {field} is a {_kind(value)}, expected "
                            + " or ".join("a list" if t is list else "an object" for t in types))
        if kind is None:
            left_out[_LEFT_OUT[field]] += sum(1 for _ in _leaves(p, name, value, "", 0))
            continue
        if isinstance(value, list) and len(value) == 1 and field in ("output", "input"):
            value = value[0]  # one output (or its gradient): <path>:out, as a capture keys it
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


def _stats(p: Path, name: str, key: str, item: dict[str, Any], dtype: str) -> dict[str, Any]:
    """A stats-only record from msprobe's Max/Min/Mean/Norm (no std: msprobe has none); a
    statistic it did not write is None, and its md5/xor checksum is kept."""
    shape = item.get("shape")
    if not isinstance(shape, list) or not all(is_int(s) and 0 <= s <= _MAX_SIZE for s in shape) \
            or math.prod(shape) > _MAX_SIZE:
        raise DumpError(f"{p}: record {name!r}: shape {str(shape)[:40]} is not a list of sizes")
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
                      "norm": fin["Norm"], "absmax": absmax} | counts | _checksum(item)}


def _checksum(item: dict[str, Any]) -> dict[str, str]:
    """msprobe's checksum of the tensor (its ``md5`` field: a CRC-32 in summary_mode md5, an
    xor checksum in summary_mode xor), where it wrote one."""
    value = item.get("md5")
    return {"checksum": value} if isinstance(value, str) and _NAME.fullmatch(value) else {}


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

"""Files that did not come from ``precision capture``, as either side of a comparison.

Accepted (see docs/external.md):

- ``.npy``: one array, the logits (``(..., vocab)``); big-endian arrays are byte-swapped
- ``.npz``: the array named ``logits``, or the only array
- ``.pt`` / ``.pth``: a tensor, or a dict with a ``logits`` tensor, read with
  ``torch.load(weights_only=True)``: nothing is unpickled beyond tensors and containers
- ``.safetensors`` / ``.st`` without precision metadata: the tensor named ``logits``
- msprobe dumps: a ``dump.json`` (or its folder, or msprobe's ``step*/rank*/`` folders; a
  ``.json`` under another name is recognised by its content) with the tensors it names under
  ``dump_tensor_data/`` (:mod:`.msprobe`)
- ``.json``: vLLM's top-k log-probabilities per generated token (:mod:`.vllm`)

Each is converted into a temporary precision dump: logits under the key ``logits`` (marked
as the dump's logits), top-k data under ``generation:*``, so the usual logits and
generation comparisons apply. Files are removed when the process exits.

:func:`open_any` is the one place the readers are called: whatever a reader raises on a
malformed or hostile file becomes one :class:`~precision.errors.DumpError` line naming the
file (:func:`.guard.reading`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from ...dtypes import is_float
from ...errors import DumpError
from .. import load
from ..dump import Dump
from . import arrays, msprobe, vllm
from .guard import LOGITS_KEY, Converted, reading
from .temporary import write_dump

__all__ = ["EXTERNAL_SUFFIXES", "LOGITS_KEY", "open_any"]

EXTERNAL_SUFFIXES = (".npy", ".npz", ".pt", ".pth", ".json")


def _logits(read: Callable[[Path], np.ndarray]) -> Callable[[Path], Converted]:
    """A reader of one logits array, as a converter into a dump of that array."""
    def convert(p: Path) -> Converted:
        arr = read(p)
        dtype = arr.dtype.name
        if arr.ndim < 1 or not is_float(dtype):
            raise DumpError(f"{p}: expected floating-point logits (..., vocab), got "
                            f"{arr.dtype} {list(arr.shape)}")
        return Converted([(LOGITS_KEY, arr)], {"logits_key": LOGITS_KEY, "dtype": dtype})

    return convert


#: suffix -> (what the file is, for messages; its converter)
READERS: dict[str, tuple[str, Callable[[Path], Converted]]] = {
    ".npy": (".npy array", _logits(arrays.npy_file)),
    ".npz": (".npz archive", _logits(arrays.npz_logits)),
    ".pt": (".pt file", _logits(arrays.pt_logits)),
    ".pth": (".pt file", _logits(arrays.pt_logits)),
    ".json": (vllm.WHAT, vllm.read),
}


#: msprobe's files beside its dump.json, and what each holds
MSPROBE_SIDE_FILES = {"construct.json": "module tree", "stack.json": "call stacks"}


def open_any(path: str | os.PathLike[str], *, allow_partial: bool = False,
             mapping: str | os.PathLike[str] | None = None) -> Dump:
    """A precision dump, or another tool's file converted into one (see the module
    docstring); an msprobe dump's module names mapped by ``mapping``'s module rules
    (:mod:`.names`). Raises :class:`~precision.errors.DumpError`, one line naming the file,
    for anything it cannot read."""
    p = Path(path)
    convert: Callable[[Path], Converted]
    if p.name in ("construct.json", "stack.json") and (p.parent / "dump.json").is_file():
        raise DumpError(f"{p}: msprobe's {p.name} holds the {MSPROBE_SIDE_FILES[p.name]}, not "
                        f"data: pass its dump.json or the folder {p.parent}")
    if (p.is_dir() and _msprobe_folder(p)) or p.name == "dump.json" or (
            p.suffix.lower() == ".json" and msprobe.is_msprobe_json(p)):
        what, convert = msprobe.WHAT, partial(msprobe.read, mapping=mapping)
    elif p.suffix.lower() in READERS:
        what, convert = READERS[p.suffix.lower()]
    else:
        with reading(p, "dump or safetensors file"):
            d = load(p, allow_partial=allow_partial)
        if d.meta.get("foreign") and LOGITS_KEY in d.tensors:
            d.meta["logits_key"] = LOGITS_KEY
        return d
    if not p.exists():
        raise DumpError(f"{p}: no such file")
    with reading(p, what):
        return load(write_dump(p, convert(p)))


def _msprobe_folder(p: Path) -> bool:
    """A folder msprobe wrote: ``dump.json`` in it, or under its step, rank or process
    folders (``step0/rank0/dump.json``, ``step0/proc123/dump.json``, ``rank0/dump.json``)."""
    return any(next(p.glob(pattern), None) is not None
               for pattern in ("dump.json", "step*/*/dump.json", "rank*/dump.json",
                               "proc*/dump.json"))

"""Converted files as temporary dumps, removed when the process exits."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..dump import DumpWriter
from ..keys import entry_module, parse_key
from .guard import Converted

_WORKDIR: Path | None = None


def write_dump(src: Path, converted: Converted) -> Path:
    """Write a converted file as a temporary dump, one tensor at a time."""
    global _WORKDIR
    if _WORKDIR is None:
        _WORKDIR = Path(tempfile.mkdtemp(prefix="precision-external-"))
        atexit.register(shutil.rmtree, _WORKDIR, True)
    out = _WORKDIR / f"{len(list(_WORKDIR.iterdir()))}-{src.stem}.st"
    w = DumpWriter(out, force=True)
    try:
        entries = []
        for key, arr in converted.tensors:
            name = arr.dtype.name
            w.write(key, name, tuple(arr.shape), arr)
            k = parse_key(key)
            entries.append({"key": key, "module": entry_module(key), "kind": k.kind or "out",
                            "index": k.index, "call": k.call, "shape": list(arr.shape),
                            "dtype": name})
        meta: dict[str, Any] = {"mode": "full", "external": str(src), "model": {
            "class": "external"}} | converted.meta
        w.close(meta | {"entries": entries + converted.entries})
    except BaseException:
        w.abort()
        raise
    return out

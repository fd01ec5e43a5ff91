"""Directory dumps: one dump per rank plus ``index.json``, read as one logical dump.

A multi-process capture (``torchrun``) writes ``OUT/rank<r>.st`` from every rank, then rank 0
writes ``OUT/index.json`` last, so a run that died has no index and is not mistaken for a
finished one. Reading checks the index against the folder (every listed shard present, no
unlisted ``.st`` file) and merges the shards: keys are prefixed ``rank<r>/`` (ranks of a
data-parallel run see different inputs), each tensor is read from its own shard.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import DumpError
from .atomic import write_output
from .dump import Dump, Entry, load_file

INDEX = "index.json"
FORMAT = "precision-dump-dir"
VERSION = 1


def shard_name(rank: int) -> str:
    return f"rank{rank}.st"


def write_index(folder: Path, world_size: int, meta: dict[str, Any]) -> Path:
    """Write ``index.json`` (atomically) listing ``world_size`` shards."""
    doc = {"format": FORMAT, "format_version": VERSION, "world_size": world_size,
           "shards": [{"rank": r, "file": shard_name(r)} for r in range(world_size)],
           "meta": meta}
    return write_output(folder / INDEX, json.dumps(doc, indent=1), force=True)


def load_dir(folder: Path) -> Dump:
    """Open a directory dump as one :class:`Dump` (see the module docstring)."""
    index = folder / INDEX
    try:
        doc = json.loads(index.read_text(encoding="utf-8"))
        shards = [(int(s["rank"]), str(s["file"])) for s in doc["shards"]]
        world = int(doc["world_size"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
            ValueError, RecursionError):
        raise DumpError(f"{index}: not a precision dump index") from None
    if doc.get("format") != FORMAT or doc.get("format_version") != VERSION:
        raise DumpError(f"{index}: unsupported directory dump format "
                        f"{doc.get('format')} v{doc.get('format_version')}: upgrade precision")
    if sorted(r for r, _ in shards) != list(range(world)):
        raise DumpError(f"{index}: lists ranks {sorted(r for r, _ in shards)} for a world of "
                        f"{world}: corrupt index")
    listed = {name for _, name in shards}
    outside = sorted(name for name in listed if Path(name).name != name)
    if outside:
        raise DumpError(f"{index}: shard {outside[0]!r} is not a file in the dump's folder: "
                        "corrupt index")
    missing = [name for name in sorted(listed) if not (folder / name).is_file()]
    if missing:
        raise DumpError(f"{folder}: shard {missing[0]} listed in {INDEX} is missing "
                        f"({len(missing)} of {world}): copy the whole folder")
    extra = sorted(f.name for f in folder.glob("*.st") if f.name not in listed)
    if extra:
        raise DumpError(f"{folder}: {extra[0]} is not listed in {INDEX}: a shard of another "
                        "run? remove it or capture again")
    meta = doc.get("meta") or {}
    if not isinstance(meta, dict):
        raise DumpError(f"{index}: its 'meta' is not a JSON object: corrupt index")
    parts = [(r, load_file(folder / name)) for r, name in sorted(shards)]
    return _merge(folder, parts, meta)


def load_partial(folder: Path) -> Dump:
    """The shards an unfinished multi-rank capture left (no index), marked incomplete."""
    parts = []
    for f in sorted(folder.glob("rank*.st")):
        rank = f.stem.removeprefix("rank")
        if rank.isdigit():
            parts.append((int(rank), load_file(f)))
    d = _merge(folder, parts, {})
    d.meta["complete"] = False
    return d


def _merge(folder: Path, parts: list[tuple[int, Dump]], index_meta: dict[str, Any]) -> Dump:
    tensors = {}
    entries: list[Entry] = []
    logits = []
    for rank, d in parts:
        pre = f"rank{rank}/"
        for key, info in d.tensors.items():
            tensors[pre + key] = replace(info, file=d.path)
        for e in d.entries:
            entries.append(replace(e, key=pre + e.key, module=pre + e.module,
                                   order=len(entries),
                                   alias_of=pre + e.alias_of if e.alias_of else None))
        if d.meta.get("logits_key"):
            logits.append(pre + d.meta["logits_key"])
    meta = dict(parts[0][1].meta) | {"shards": len(parts), "index": index_meta,
                                      "logits_key": None, "logits_keys": logits}
    meta.pop("entries", None)
    return Dump(path=folder, meta=meta, tensors=tensors, entries=entries)

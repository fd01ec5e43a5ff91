"""Line up another implementation's dump with a Hugging Face capture (vLLM first).

A vLLM dump (:mod:`precision.runtime.vllm`) holds vLLM's module names and layouts: tokens
packed across sequences (``[tokens, ...]``), one call per engine step, fused projections.
:func:`translate` rewrites it as a dump in Hugging Face's key space and layout, which the
usual align/measure/judge then compare record by record:

- packed tokens are unpacked by the recorded positions into ``[batch, seq, ...]``: step
  ``c``'s segment ``s`` (from ``query_start_loc``) is the request whose tokens at those
  positions it ran (``input:input_ids``), so the prefill and every decode step land where a
  teacher-forced forward over the same tokens computes them; positions no step ran are
  padding (``input:attention_mask`` 0), which the verdicts leave out;
- each record is renamed, split or checked against its duplicate by the family's table
  (:mod:`precision.judge.implmap`);
- records no rule covers are listed in :attr:`Lineup.unmapped`, never dropped silently.
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..dumps.dump import Dump, DumpWriter, Entry
from ..dumps.keys import GEN_PREFIX, INPUT_PREFIX, make_key, parse_key
from ..errors import DumpError
from .implmap import Rule, Table, table_for

ENGINE = "engine"
_WORKDIR: Path | None = None


@dataclass(frozen=True)
class Lineup:
    """What :func:`translate` made of an engine's dump."""

    dump: Dump
    family: str
    #: engine key -> Hugging Face key(s) it became
    mapped: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: engine keys that hold the same values as another mapped record (checked)
    duplicates: dict[str, str] = field(default_factory=dict)
    #: engine keys no rule covers, with why
    unmapped: dict[str, str] = field(default_factory=dict)
    #: engine keys with no Hugging Face counterpart (the table's ``engine_only``), with why
    engine_only: dict[str, str] = field(default_factory=dict)
    table: Table | None = None

    @property
    def hf_keys(self) -> list[str]:
        return [k for ks in self.mapped.values() for k in ks]


def engine_of(d: Dump) -> str | None:
    """The engine a dump came from (``vllm``), None for a Hugging Face or plain capture."""
    engine = d.meta.get("engine")
    return str(engine.get("name")) if isinstance(engine, dict) and engine.get("name") else None


def translate(d: Dump, mapping: str | os.PathLike[str] | None = None) -> Lineup:
    """``d`` (an engine's dump) as a dump in Hugging Face's keys and layout."""
    if d.mode != "full":
        raise DumpError(f"{d.path.name}: a stats-mode engine dump cannot be unpacked into "
                        "tokens yet: capture the engine in full mode")
    config = d.meta.get("config") or {}
    table = table_for(config, mapping)
    steps = _steps(d)
    ids = np.asarray(d[INPUT_PREFIX + "input_ids"])
    mask = np.asarray(d[INPUT_PREFIX + "attention_mask"]) != 0
    where = [_scatter(d, c, ids, mask) for c in range(steps)]
    missing = mask & ~_filled(where, ids.shape)
    if missing.any():
        r, p = map(int, np.argwhere(missing)[0])
        raise DumpError(f"{d.path.name}: the engine ran no step for sequence {r}, position "
                        f"{p} (prefix caching? capture with enable_prefix_caching=False)")
    out = _new_path(d)
    writer = DumpWriter(out, force=True)
    entries: list[dict[str, Any]] = []
    mapped: dict[str, tuple[str, ...]] = {}
    duplicates: dict[str, str] = {}
    unmapped: dict[str, str] = {}
    internal: dict[str, str] = {}
    for key in (INPUT_PREFIX + "input_ids", INPUT_PREFIX + "attention_mask"):
        _write(writer, entries, key, np.asarray(d[key]))
    last = int(config.get("num_hidden_layers") or 0) - 1
    for e in d.entries:
        if e.call != 0 or e.module in (ENGINE, "input"):
            continue
        if e.kind == "generation" or e.key.startswith(GEN_PREFIX):
            _write(writer, entries, e.key, np.asarray(d[e.key]), kind="generation")
            continue
        reason = table.engine_only_reason(e.key)
        if reason is not None:
            internal[e.key] = reason
            continue
        found = table.find(e.key)
        if found is None:
            unmapped[e.key] = "no rule in the " + table.family + " table"
            continue
        rule, var = found
        names = _names(rule, var, last)
        if rule.same_as:
            why = _same(d, e, names[0], steps)
            if why:
                unmapped[e.key] = why
            else:
                duplicates[e.key] = names[0]
            continue
        whole = _unpack(d, e, steps, where, ids.shape)
        parts = _split(whole, rule, config, e.key)
        for name, part in zip(names, parts, strict=True):
            _write(writer, entries, name, part)
        mapped[e.key] = tuple(names)
    meta = {k: v for k, v in d.meta.items() if k != "entries"}
    meta |= {"entries": entries, "logits_key": "lm_head:out" if any(
        e["key"] == "lm_head:out" for e in entries) else None,
             "translated_from": str(d.path),
             "crossimpl": {"family": table.family, "mapped": len(mapped),
                           "duplicates": len(duplicates), "unmapped": unmapped,
                           "engine_only": internal}}
    writer.close(meta)
    from ..dumps import load

    return Lineup(load(out), table.family, mapped, duplicates, unmapped, internal, table)


def _names(rule: Rule, var: dict[str, int], last: int) -> list[str]:
    i = var.get("i", 0)
    fill = {"i": i, "prev": i - 1, "last": last}
    return [t.format(**fill) for t in (rule.hf or (rule.same_as,))]


def _steps(d: Dump) -> int:
    n = 0
    while make_key(ENGINE, "in", "positions", n) in d.tensors:
        n += 1
    if n == 0 or INPUT_PREFIX + "input_ids" not in d.tensors:
        raise DumpError(f"{d.path.name}: no engine positions or input ids recorded: was it "
                        "written by precision.vllm.capture with cap.record(outputs)?")
    return n


def _scatter(d: Dump, c: int, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Flat ``[batch * seq]`` index of each packed token of step ``c``: each segment of
    ``query_start_loc`` is the request whose tokens at those positions it ran."""
    eids = np.asarray(d[make_key(ENGINE, "in", "input_ids", c)]).reshape(-1)
    pos = np.asarray(d[make_key(ENGINE, "in", "positions", c)]).reshape(-1)
    starts = np.asarray(d[make_key(ENGINE, "in", "query_start_loc", c)]).reshape(-1)
    rows, width = ids.shape
    flat = np.full(eids.shape[0], -1, np.int64)
    taken: set[int] = set()
    for a, b in itertools.pairwise(starts):
        a, b = int(a), int(b)
        if b <= a:
            continue
        p = pos[a:b]
        if not np.array_equal(p, np.arange(p[0], p[0] + (b - a))) or p[-1] >= width:
            raise DumpError(f"{d.path.name}: step {c} holds positions {p.tolist()} that do "
                            "not follow one another")
        match = [r for r in range(rows) if r not in taken and mask[r, p].all()
                 and np.array_equal(ids[r, p], eids[a:b])]
        if not match:
            raise DumpError(f"{d.path.name}: step {c} ran tokens {eids[a:b].tolist()[:8]} at "
                            f"positions {int(p[0])}-{int(p[-1])} that no recorded request holds")
        taken.add(match[0])
        flat[a:b] = match[0] * width + p
    if (flat < 0).any():
        raise DumpError(f"{d.path.name}: step {c} ran {int((flat < 0).sum())} token(s) outside "
                        "every sequence (padding?)")
    return flat


def _filled(where: Iterable[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    got = np.zeros(int(np.prod(shape)), bool)
    for flat in where:
        got[flat] = True
    return got.reshape(shape)


def _call_key(key: str, c: int) -> str:
    k = parse_key(key)
    return make_key(k.module, k.kind, k.index, c)


def _unpack(d: Dump, e: Entry, steps: int, where: list[np.ndarray],
            shape: tuple[int, ...]) -> np.ndarray:
    """One record's calls, packed ``[tokens, ...]`` each, as ``[batch, seq, ...]``."""
    first = np.asarray(d[e.key])
    out = np.zeros((int(np.prod(shape)), *first.shape[1:]), first.dtype)
    for c in range(steps):
        part = first if c == 0 else np.asarray(d[_call_key(e.key, c)])
        if part.shape[0] != where[c].shape[0]:
            raise DumpError(f"{d.path.name}: {_call_key(e.key, c)} holds {part.shape[0]} "
                            f"tokens, step {c} ran {where[c].shape[0]}")
        out[where[c]] = part
    return out.reshape((*shape, *first.shape[1:]))


def _split(whole: np.ndarray, rule: Rule, config: dict[str, Any], key: str
           ) -> list[np.ndarray]:
    """A fused projection's output cut by the config's sizes (one piece when not fused)."""
    if not rule.split:
        return [whole]
    width = whole.shape[-1]
    if rule.split == "qkv":
        hd = int(config.get("head_dim") or 0)
        q = int(config.get("num_attention_heads") or 0) * hd
        kv = int(config.get("num_key_value_heads") or config.get("num_attention_heads")
                 or 0) * hd
        sizes = [q, kv, kv]
    else:
        inter = int(config.get("intermediate_size") or 0)
        sizes = [inter, inter]
    if sum(sizes) != width:
        raise DumpError(f"{key}: {width} columns, but the config's sizes give {sizes} "
                        f"({rule.split}); a tensor-parallel shard? capture with one worker")
    return np.split(whole, np.cumsum(sizes)[:-1], axis=-1)


def _same(d: Dump, e: Entry, other: str, steps: int) -> str | None:
    """Why ``e`` is not the same values as ``other`` in every step (None when it is)."""
    for c in range(steps):
        a, b = _call_key(e.key, c), _call_key(other, c)
        if a not in d or b not in d:
            return f"said to equal {other}, which is not recorded"
        if not np.array_equal(np.asarray(d[a]), np.asarray(d[b]), equal_nan=True):
            return f"said to equal {other}, but differs from it in step {c}"
    return None


def _write(writer: DumpWriter, entries: list[dict[str, Any]], key: str, arr: np.ndarray,
           kind: str | None = None) -> None:
    a = np.ascontiguousarray(arr)
    name = "bfloat16" if a.dtype.name == "bfloat16" else a.dtype.name
    writer.write(key, name, tuple(a.shape), a)
    k = parse_key(key)
    entries.append({"key": key, "module": k.module, "kind": kind or k.kind or "out",
                    "index": k.index, "call": k.call, "shape": list(a.shape), "dtype": name})


def _new_path(d: Dump) -> Path:
    global _WORKDIR
    if _WORKDIR is None:
        _WORKDIR = Path(tempfile.mkdtemp(prefix="precision-crossimpl-"))
        atexit.register(shutil.rmtree, _WORKDIR, True)
    return _WORKDIR / f"{len(list(_WORKDIR.iterdir()))}-{d.path.stem}.hf.st"


def line_up(runs: dict[str, Dump], mapping: str | os.PathLike[str] | None = None
            ) -> dict[str, Lineup]:
    """Translate, in place in ``runs``, each engine's dump compared with a Hugging Face one;
    returns what was made of each, by run name."""
    if not any(engine_of(d) for d in runs.values()) or all(engine_of(d) for d in runs.values()):
        return {}
    done: dict[str, Lineup] = {}
    for name, d in list(runs.items()):
        if engine_of(d):
            done[name] = translate(d, mapping)
            runs[name] = done[name].dump
    return done


def engine_lacks(lined: dict[str, Lineup], key: str) -> bool:
    """A Hugging Face record the engine never computes (its table's ``hf_only``)."""
    return any(ln.table is not None and ln.table.hf_only_reason(key) is not None
               for ln in lined.values())


def notes(lined: dict[str, Lineup], keys: list[str]) -> list[str]:
    """One line per translated run: what was lined up, and what was not."""
    out = []
    for ln in lined.values():
        src = Path(str(ln.dump.meta.get("translated_from", ""))).name
        engine = engine_of(ln.dump) or "engine"
        out.append(f"{src}: {engine}'s records lined up with Hugging Face's by the {ln.family} "
                   f"table: {len(ln.mapped)} mapped onto {len(ln.hf_keys)} keys, "
                   f"{len(ln.duplicates)} duplicate(s) of them checked equal, "
                   f"{len(ln.unmapped)} unmapped")
        if ln.unmapped:
            first = next(iter(ln.unmapped.items()))
            out.append(f"unmapped {engine} records (not compared): "
                       f"{', '.join(list(ln.unmapped)[:6])}"
                       f"{' ...' if len(ln.unmapped) > 6 else ''} (first: {first[1]})")
        if ln.engine_only:
            reasons = sorted(set(ln.engine_only.values()))
            out.append(f"{len(ln.engine_only)} {engine} record(s) have no Hugging Face "
                       "counterpart (not compared): " + "; ".join(reasons))
        if ln.table is not None and ln.table.hf_only:
            reasons = sorted({r for _, r in ln.table.hf_only})
            out.append(f"Hugging Face records {engine} does not compute were left out: "
                       + "; ".join(reasons))
    return out

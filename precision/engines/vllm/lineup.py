"""Line up another implementation's dump with a Hugging Face capture (vLLM first).

A vLLM dump (:mod:`precision.engines.vllm.capture`) holds vLLM's module names and layouts: tokens
packed across sequences (``[tokens, ...]``), one call per engine step, fused projections.
:func:`translate` rewrites it as a dump in Hugging Face's key space and layout, which the
usual align/measure/judge then compare record by record:

- packed tokens are unpacked by the recorded positions (:mod:`precision.engines.vllm.unpack`):
  step ``c``'s segment ``s`` (from ``query_start_loc``) is the request whose tokens at those
  positions it ran, laid out as the Hugging Face side ran them (``meta.engine_replay``):
  the prefill of the left-padded prompts and one decode step per generated token fed back
  (``#t``), or one teacher-forced forward over prompt and generated tokens; padded
  positions are left out by the verdicts;
- a tensor-parallel engine's ranks (a directory dump) are put together first, and a module
  shared between layers is told apart by name;
- each record is renamed, split, scaled or checked against its duplicate by the family's
  table (:mod:`precision.engines.vllm.mapping`);
- records no rule covers are listed in :attr:`Lineup.unmapped`, never dropped silently.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...dumps.dump import Dump, DumpWriter
from ...dumps.keys import GEN_PREFIX, make_key, parse_key
from ...errors import DumpError
from .mapping import Rule, Table, table_for
from .stats import NoStats, is_stats
from .stats import record as stats_record
from .unpack import (
    LAYOUTS,
    RanksDiffer,
    call_key,
    engine_records,
    engine_steps,
    place_tokens,
    rank_views,
    shaped,
    unpack,
)

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
    #: how the Hugging Face side ran the tokens (:data:`LAYOUTS`)
    layout: str = "forward"

    @property
    def hf_keys(self) -> list[str]:
        return [k for ks in self.mapped.values() for k in ks]


def engine_of(d: Dump) -> str | None:
    """The engine a dump came from (``vllm``), None for a Hugging Face or plain capture."""
    engine = d.meta.get("engine")
    return str(engine.get("name")) if isinstance(engine, dict) and engine.get("name") else None


def translate(d: Dump, mapping: str | os.PathLike[str] | None = None,
              layout: str = "forward") -> Lineup:
    """``d`` (an engine's dump) as a dump in Hugging Face's keys and layout: ``layout``
    ``forward`` for a teacher-forced Hugging Face forward over the same tokens, ``steps``
    for one that replayed them step by step from its KV cache (see :data:`LAYOUTS`)."""
    if d.mode == "stats" and layout != "forward":
        raise DumpError(f"{d.path.name}: a stats-mode engine dump lines up with one "
                        "teacher-forced Hugging Face forward only (an engine step can mix "
                        "prefill and decode tokens), not with a step-by-step replay: capture "
                        f"the reference with --replay {d.path.name} itself, which replays it "
                        "as one forward")
    if layout not in LAYOUTS:
        raise DumpError(f"unknown engine layout {layout!r}: one of {', '.join(LAYOUTS)}")
    config = d.meta.get("config") or {}
    table = table_for(config, mapping)
    views = rank_views(d)
    d = views[0]  # the requests' tokens, the steps and the generation: on every rank
    steps = engine_steps(d)
    lay = place_tokens(d, steps, layout)
    out = _new_path(d)
    writer = DumpWriter(out, force=True)
    entries: list[dict[str, Any]] = []
    mapped: dict[str, tuple[str, ...]] = {}
    duplicates: dict[str, str] = {}
    unmapped: dict[str, str] = {}
    internal: dict[str, str] = {}
    for key, arr in lay.inputs.items():
        _write(writer, entries, key, arr)
    last = int(config.get("num_hidden_layers") or 0) - 1
    records, unsplit = engine_records(d, steps)
    for key, why in unsplit.items():
        reason = table.engine_only_reason(key)
        if reason is not None:
            internal[key] = reason
        else:
            unmapped[key] = why
    for e in d.entries:
        if e.call == 0 and (e.kind == "generation" or e.key.startswith(GEN_PREFIX)):
            _write(writer, entries, e.key, np.asarray(d[e.key]), kind="generation")
    for key, physical in records.items():
        reason = table.engine_only_reason(key)
        if reason is not None:
            internal[key] = reason
            continue
        found = table.find(key)
        if found is None:
            unmapped[key] = "no rule in the " + table.family + " table"
            continue
        rule, var = found
        names = _names(rule, var, last)
        if rule.same_as:
            differs = _same(d, records, key, names[0])
            if differs:
                unmapped[key] = differs
            else:
                duplicates[key] = names[0]
            continue
        if is_stats(d, physical[0]):  # over every step and rank: the forward's real tokens
            if rule.split and key + ".part0" in records:
                internal[key] = ("a fused projection's statistics as a whole: its parts' "
                                 "statistics are compared")
                continue
            try:
                st, width, dtype = stats_record(views, physical, rule, config, key)
            except (NoStats, RanksDiffer) as exc:
                unmapped[key] = str(exc)
                continue
            shape = [*lay.shapes[0], *width]
            if rule.swap:
                a, b = rule.swap
                shape[a], shape[b] = shape[b], shape[a]
            for name in names:
                _stats_entry(entries, name, tuple(shape), dtype, st)
            mapped[key] = tuple(names)
            continue
        try:
            unpacked = unpack(views, physical, lay, rule, config)
        except RanksDiffer as exc:
            unmapped[key] = str(exc)
            continue
        for call, whole in unpacked.items():
            for name, part in zip(names, shaped(whole, rule, config, key), strict=True):
                _write(writer, entries, call_key(name, call), part)
        mapped[key] = tuple(call_key(n, c) for c in sorted(lay.shapes) for n in names)
    meta = {k: v for k, v in d.meta.items() if k != "entries"}
    meta |= {"entries": entries, "logits_key": "lm_head:out" if any(
        e["key"] == "lm_head:out" for e in entries) else None,
             "translated_from": str(d.path),
             "crossimpl": {"family": table.family, "layout": layout, "mapped": len(mapped),
                           "duplicates": len(duplicates), "unmapped": unmapped,
                           "engine_only": internal}}
    writer.close(meta)
    from ...dumps import load

    return Lineup(load(out), table.family, mapped, duplicates, unmapped, internal, table,
                  layout)


def _names(rule: Rule, var: dict[str, int], last: int) -> list[str]:
    i = var.get("i", 0)
    fill = {"i": i, "prev": i - 1, "last": last}
    return [t.format(**fill) for t in (rule.hf or (rule.same_as,))]


def _same(d: Dump, records: dict[str, list[str]], key: str, other: str) -> str | None:
    """Why record ``key`` is not the same values as ``other`` in every step (None when it
    is)."""
    if other not in records:
        return f"said to equal {other}, which is not recorded"
    for c, (a, b) in enumerate(zip(records[key], records[other], strict=True)):
        if is_stats(d, a) or is_stats(d, b):  # the same values have the same statistics
            same = _same_stats(_stats_of(d, a), _stats_of(d, b))
        else:
            same = np.array_equal(np.asarray(d[a]), np.asarray(d[b]), equal_nan=True)
        if not same:
            return f"said to equal {other}, but differs from it in step {c}"
    return None


def _same_stats(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Two records' statistics are equal, their count sketches (arrays) value by value."""
    if a is None or b is None or a.keys() != b.keys():
        return a is None and b is None
    return all(np.array_equal(np.asarray(v), np.asarray(b[k])) if isinstance(v, np.ndarray)
               or isinstance(b[k], np.ndarray) else v == b[k] for k, v in a.items())


def _stats_of(d: Dump, key: str) -> dict[str, Any] | None:
    e = d.entry(key)
    return None if e is None or e.stats is None else dict(e.stats)


def _stats_entry(entries: list[dict[str, Any]], key: str, shape: tuple[int, ...],
                 dtype: str, stats: dict[str, Any]) -> None:
    k = parse_key(key)
    entries.append({"key": key, "module": k.module, "kind": k.kind or "out", "index": k.index,
                    "call": k.call, "shape": list(shape), "dtype": dtype, "stats": stats})


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


def replay_layout(d: Dump) -> str | None:
    """How a Hugging Face capture replayed an engine's tokens (:data:`LAYOUTS`), None when
    it did not replay an engine's dump."""
    found = d.meta.get("engine_replay")
    return str(found.get("layout")) if isinstance(found, dict) else None


def line_up(runs: dict[str, Dump], mapping: str | os.PathLike[str] | None = None
            ) -> dict[str, Lineup]:
    """Translate, in place in ``runs``, each engine's dump compared with a Hugging Face one
    (in the layout the Hugging Face runs replayed it in); returns what was made of each, by
    run name."""
    if not any(engine_of(d) for d in runs.values()) or all(engine_of(d) for d in runs.values()):
        return {}
    layouts = {replay_layout(d) or "forward" for d in runs.values() if not engine_of(d)}
    if len(layouts) > 1:
        raise DumpError("the Hugging Face runs replayed the engine's tokens in different ways "
                        f"({', '.join(sorted(layouts))}): capture them alike")
    done: dict[str, Lineup] = {}
    for name, d in list(runs.items()):
        if engine_of(d):
            done[name] = translate(d, mapping, layouts.pop() if layouts else "forward")
            layouts = {done[name].layout}
            runs[name] = done[name].dump
    return done


def engine_lacks(lined: dict[str, Lineup], key: str) -> bool:
    """A Hugging Face record the engine never computes (its table's ``hf_only``), in any
    call."""
    k = parse_key(key)
    plain = make_key(k.module, k.kind, k.index) if k.kind else key
    return any(ln.table is not None and ln.table.hf_only_reason(plain) is not None
               for ln in lined.values())


def notes(lined: dict[str, Lineup], keys: list[str]) -> list[str]:
    """One line per translated run: what was lined up, and what was not."""
    out = []
    for ln in lined.values():
        src = Path(str(ln.dump.meta.get("translated_from", ""))).name
        engine = engine_of(ln.dump) or "engine"
        how = ("prefill against the prefill, each decode step against the same step "
               "from the KV cache" if ln.layout == "steps" else
               "prefill and decode steps against one teacher-forced forward")
        out.append(f"{src}: {engine}'s records lined up with Hugging Face's by the {ln.family} "
                   f"table: {len(ln.mapped)} mapped onto {len(ln.hf_keys)} keys, "
                   f"{len(ln.duplicates)} duplicate(s) of them checked equal, "
                   f"{len(ln.unmapped)} unmapped; {how}")
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

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..dumps.dump import Dump, DumpWriter
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
    #: how the Hugging Face side ran the tokens (:data:`LAYOUTS`)
    layout: str = "forward"

    @property
    def hf_keys(self) -> list[str]:
        return [k for ks in self.mapped.values() for k in ks]


def engine_of(d: Dump) -> str | None:
    """The engine a dump came from (``vllm``), None for a Hugging Face or plain capture."""
    engine = d.meta.get("engine")
    return str(engine.get("name")) if isinstance(engine, dict) and engine.get("name") else None


#: how the Hugging Face side ran the engine's tokens (its ``meta.engine_replay.layout``):
#: ``forward`` one teacher-forced forward over prompt and generated tokens; ``steps`` the
#: prompt's prefill, then one decode step per generated token fed back, from its KV cache
LAYOUTS = ("forward", "steps")


@dataclass(frozen=True)
class Layout:
    """Where the engine's packed tokens go in the Hugging Face records: per Hugging Face call
    (0 the forward or the prefill, ``t`` decode step ``t``) the ``(rows, seq)`` it holds, and
    per engine step, each packed token's call and flat index in that call's rows x seq."""

    name: str
    shapes: dict[int, tuple[int, int]]
    calls: list[np.ndarray]
    flat: list[np.ndarray]
    inputs: dict[str, np.ndarray]


def translate(d: Dump, mapping: str | os.PathLike[str] | None = None,
              layout: str = "forward") -> Lineup:
    """``d`` (an engine's dump) as a dump in Hugging Face's keys and layout: ``layout``
    ``forward`` for a teacher-forced Hugging Face forward over the same tokens, ``steps``
    for one that replayed them step by step from its KV cache (see :data:`LAYOUTS`)."""
    if d.mode != "full":
        raise DumpError(f"{d.path.name}: a stats-mode engine dump cannot be unpacked into "
                        "tokens yet: capture the engine in full mode")
    if layout not in LAYOUTS:
        raise DumpError(f"unknown engine layout {layout!r}: one of {', '.join(LAYOUTS)}")
    config = d.meta.get("config") or {}
    table = table_for(config, mapping)
    steps = _steps(d)
    lay = _layout(d, steps, layout)
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
    records, unsplit = _records(d, steps)
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
        for call, whole in _unpack(d, physical, lay).items():
            for name, part in zip(names, _shaped(whole, rule, config, key), strict=True):
                _write(writer, entries, _call_key(name, call), part)
        mapped[key] = tuple(_call_key(n, c) for c in sorted(lay.shapes) for n in names)
    meta = {k: v for k, v in d.meta.items() if k != "entries"}
    meta |= {"entries": entries, "logits_key": "lm_head:out" if any(
        e["key"] == "lm_head:out" for e in entries) else None,
             "translated_from": str(d.path),
             "crossimpl": {"family": table.family, "layout": layout, "mapped": len(mapped),
                           "duplicates": len(duplicates), "unmapped": unmapped,
                           "engine_only": internal}}
    writer.close(meta)
    from ..dumps import load

    return Lineup(load(out), table.family, mapped, duplicates, unmapped, internal, table,
                  layout)


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


def _records(d: Dump, steps: int) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Each engine record (its key at call 0, under the name of the module that made it)
    and its key in each engine step; and the records whose steps cannot be told apart, with
    why. A module shared by ``n`` names (``meta.engine.shared_modules``) runs ``n`` times a
    step, once per name in order: its ``k``-th call is name ``k % n`` in step ``k // n``."""
    engine = d.meta.get("engine")
    shared = (engine or {}).get("shared_modules") or {} if isinstance(engine, dict) else {}
    out: dict[str, list[str]] = {}
    bad: dict[str, str] = {}
    for e in d.entries:
        if e.call != 0 or e.module in (ENGINE, "input") or e.kind == "generation" \
                or e.key.startswith(GEN_PREFIX):
            continue
        names = shared.get(e.module) or [e.module]
        n = len(names)
        calls = 0
        while _call_key(e.key, calls) in d.tensors:
            calls += 1
        if calls != steps * n:
            bad[e.key] = (f"{calls} call(s) in {steps} engine step(s)"
                          + (f" of a module shared by {n} names" if n > 1 else ""))
            continue
        k = parse_key(e.key)
        for j, name in enumerate(names):
            out[make_key(name, k.kind, k.index)] = [_call_key(e.key, s * n + j)
                                                    for s in range(steps)]
    return out, bad


def _layout(d: Dump, steps: int, layout: str) -> Layout:
    """Where each engine step's tokens go (:class:`Layout`): each segment of a step's
    ``query_start_loc`` is the request whose tokens at those positions it ran."""
    ids = np.asarray(d[INPUT_PREFIX + "input_ids"])
    mask = np.asarray(d[INPUT_PREFIX + "attention_mask"]) != 0
    placed = [_scatter(d, c, ids, mask) for c in range(steps)]
    got = np.zeros(ids.shape, bool)
    for rows, pos in placed:
        got[rows, pos] = True
    missing = mask & ~got
    if missing.any():
        r, p = map(int, np.argwhere(missing)[0])
        raise DumpError(f"{d.path.name}: the engine ran no step for sequence {r}, position "
                        f"{p} (prefix caching? capture with enable_prefix_caching=False)")
    if layout == "forward":
        width = ids.shape[1]
        return Layout(layout, {0: ids.shape}, [np.zeros(r.shape, np.int64) for r, _ in placed],
                      [r * width + p for r, p in placed],
                      {INPUT_PREFIX + "input_ids": ids, INPUT_PREFIX + "attention_mask":
                       np.asarray(d[INPUT_PREFIX + "attention_mask"])})
    if GEN_PREFIX + "prompt_mask" not in d.tensors:
        raise DumpError(f"{d.path.name}: no prompts recorded (generation:prompt_ids): was "
                        "it written by precision.vllm.capture with cap.record(outputs)?")
    pids = np.asarray(d[GEN_PREFIX + "prompt_ids"])
    pmask = np.asarray(d[GEN_PREFIX + "prompt_mask"]).astype(np.int64)
    plen = pmask.sum(axis=1)
    width = pids.shape[1]
    fed = mask.sum(axis=1) - plen  # generated tokens fed back, per request
    alive = {t: np.flatnonzero(fed >= t) for t in range(1, int(fed.max(initial=0)) + 1)}
    shapes = {0: (pids.shape[0], width)} | {t: (len(rs), 1) for t, rs in alive.items()}
    slot = {t: {int(r): i for i, r in enumerate(rs)} for t, rs in alive.items()}
    calls, flat = [], []
    for rows, pos in placed:
        t = np.maximum(pos - plen[rows] + 1, 0)
        prefill = rows * width + width - plen[rows] + pos
        decode = np.array([slot[int(c)][int(r)] if c else 0 for r, c in zip(rows, t, strict=True)],
                          np.int64)
        calls.append(t)
        flat.append(np.where(t == 0, prefill, decode))
    return Layout(layout, shapes, calls, flat, {
        INPUT_PREFIX + "input_ids": pids, INPUT_PREFIX + "attention_mask": pmask,
        INPUT_PREFIX + "position_ids": prompt_positions(pmask)})


def prompt_positions(mask: np.ndarray) -> np.ndarray:
    """Position ids of left-padded prompts (as Hugging Face's generate makes them: 1 at
    padding)."""
    pos = np.cumsum(mask, axis=1) - 1
    return np.where(mask == 0, 1, pos).astype(np.int64)


def _scatter(d: Dump, c: int, ids: np.ndarray, mask: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
    """Request and position of each packed token of step ``c``: each segment of
    ``query_start_loc`` is the request whose tokens at those positions it ran."""
    eids = np.asarray(d[make_key(ENGINE, "in", "input_ids", c)]).reshape(-1)
    pos = np.asarray(d[make_key(ENGINE, "in", "positions", c)]).reshape(-1)
    starts = np.asarray(d[make_key(ENGINE, "in", "query_start_loc", c)]).reshape(-1)
    n_rows, width = ids.shape
    rows = np.full(eids.shape[0], -1, np.int64)
    taken: set[int] = set()
    for a, b in itertools.pairwise(starts):
        a, b = int(a), int(b)
        if b <= a:
            continue
        p = pos[a:b]
        if not np.array_equal(p, np.arange(p[0], p[0] + (b - a))) or p[-1] >= width:
            raise DumpError(f"{d.path.name}: step {c} holds positions {p.tolist()} that do "
                            "not follow one another")
        match = [r for r in range(n_rows) if r not in taken and mask[r, p].all()
                 and np.array_equal(ids[r, p], eids[a:b])]
        if not match:
            raise DumpError(f"{d.path.name}: step {c} ran tokens {eids[a:b].tolist()[:8]} at "
                            f"positions {int(p[0])}-{int(p[-1])} that no recorded request holds")
        taken.add(match[0])
        rows[a:b] = match[0]
    if (rows < 0).any():
        raise DumpError(f"{d.path.name}: step {c} ran {int((rows < 0).sum())} token(s) outside "
                        "every sequence (padding?)")
    return rows, pos.astype(np.int64)


def _call_key(key: str, c: int) -> str:
    k = parse_key(key)
    return make_key(k.module, k.kind, k.index, c)


def _unpack(d: Dump, physical: list[str], lay: Layout) -> dict[int, np.ndarray]:
    """One record's engine steps, packed ``[tokens, ...]`` each, as ``[rows, seq, ...]`` per
    Hugging Face call of the layout."""
    first = np.asarray(d[physical[0]])
    rest = first.shape[1:]
    out = {call: np.zeros((rows * seq, *rest), first.dtype)
           for call, (rows, seq) in lay.shapes.items()}
    for c, key in enumerate(physical):
        part = first if c == 0 else np.asarray(d[key])
        if part.shape[0] != lay.flat[c].shape[0]:
            raise DumpError(f"{d.path.name}: {key} holds {part.shape[0]} tokens, step {c} "
                            f"ran {lay.flat[c].shape[0]}")
        for call in np.unique(lay.calls[c]):
            sel = lay.calls[c] == call
            out[int(call)][lay.flat[c][sel]] = part[sel]
    return {call: arr.reshape((*lay.shapes[call], *rest)) for call, arr in out.items()}


def _shaped(whole: np.ndarray, rule: Rule, config: dict[str, Any], key: str
            ) -> list[np.ndarray]:
    """An unpacked record as Hugging Face holds it: scaled, axes swapped, and a fused
    projection's output cut by the config's sizes (one piece when not fused)."""
    factor = rule.factor(config)
    if factor is not None:  # in the record's dtype, as the engine multiplies
        whole = (whole.astype(np.float32) * np.asarray(factor, whole.dtype).astype(np.float32)
                 ).astype(whole.dtype) if whole.dtype != np.float64 else whole * factor
    if rule.swap:
        a, b = rule.swap
        if max(a, b) >= whole.ndim:
            raise DumpError(f"{key}: {whole.ndim} axes unpacked, the rule swaps {a} and {b}")
        whole = np.swapaxes(whole, a, b)
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


def _same(d: Dump, records: dict[str, list[str]], key: str, other: str) -> str | None:
    """Why record ``key`` is not the same values as ``other`` in every step (None when it
    is)."""
    if other not in records:
        return f"said to equal {other}, which is not recorded"
    for c, (a, b) in enumerate(zip(records[key], records[other], strict=True)):
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

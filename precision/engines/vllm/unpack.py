"""An engine's packed records as Hugging Face's tensors (for :mod:`.crossimpl`).

vLLM runs the tokens of all requests packed (``[tokens, ...]``), one engine step at a time,
and with tensor parallelism each rank holds its share of some records. Here:

- which request and position each packed token of a step is (from the step's recorded
  positions and ``query_start_loc``, against the requests' tokens);
- where it lands in the Hugging Face records of a layout (:data:`LAYOUTS`): one
  teacher-forced forward over prompt and generated tokens, or the prefill of the
  left-padded prompts then one decode step per generated token fed back;
- each engine record's key in every step, a module shared between layers told apart by
  name again, and its tensor-parallel ranks' pieces put together (:func:`merge_ranks`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ...dumps.dump import Dump
from ...dumps.keys import GEN_PREFIX, INPUT_PREFIX, make_key, parse_key
from ...errors import DumpError
from .mapping import Rule

ENGINE = "engine"

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



def engine_steps(d: Dump) -> int:
    n = 0
    while make_key(ENGINE, "in", "positions", n) in d.tensors:
        n += 1
    if n == 0 or INPUT_PREFIX + "input_ids" not in d.tensors:
        raise DumpError(f"{d.path.name}: no engine positions or input ids recorded: was it "
                        "written by precision.vllm.capture with cap.record(outputs)?")
    return n


def engine_records(d: Dump, steps: int) -> tuple[dict[str, list[str]], dict[str, str]]:
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
        while d.entry(call_key(e.key, calls)) is not None:
            calls += 1
        if calls != steps * n:
            bad[e.key] = (f"{calls} call(s) in {steps} engine step(s)"
                          + (f" of a module shared by {n} names" if n > 1 else ""))
            continue
        k = parse_key(e.key)
        for j, name in enumerate(names):
            out[make_key(name, k.kind, k.index)] = [call_key(e.key, s * n + j)
                                                    for s in range(steps)]
    return out, bad


def place_tokens(d: Dump, steps: int, layout: str) -> Layout:
    """Where each engine step's tokens go (:class:`Layout`): each segment of a step's
    ``query_start_loc`` is the request whose tokens at those positions it ran."""
    ids = np.asarray(d[INPUT_PREFIX + "input_ids"])
    mask = np.asarray(d[INPUT_PREFIX + "attention_mask"]) != 0
    placed = [scatter(d, c, ids, mask) for c in range(steps)]
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


def scatter(d: Dump, c: int, ids: np.ndarray, mask: np.ndarray
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


def call_key(key: str, c: int) -> str:
    k = parse_key(key)
    return make_key(k.module, k.kind, k.index, c)


def rank_views(d: Dump) -> list[Dump]:
    """Each rank's records of a tensor-parallel engine's directory dump (keys without their
    ``rank<r>/``), as dumps; the dump itself when it has one rank."""
    n = int(d.meta.get("shards") or 0)
    if n < 2:
        return [d]
    views = []
    for r in range(n):
        pre = f"rank{r}/"
        cut = len(pre)
        tensors = {k[cut:]: info for k, info in d.tensors.items() if k.startswith(pre)}
        entries = [replace(e, key=e.key[cut:], module=e.module[cut:],
                           alias_of=e.alias_of[cut:] if e.alias_of else None)
                   for e in d.entries if e.key.startswith(pre)]
        views.append(Dump(path=d.path, meta=d.meta, tensors=tensors, entries=entries))
    return views


class RanksDiffer(Exception):
    """A record every rank should hold whole differs between ranks."""


def unpack(views: list[Dump], physical: list[str], lay: Layout, rule: Rule,
            config: dict[str, Any]) -> dict[int, np.ndarray]:
    """One record's engine steps, packed ``[tokens, ...]`` each (its ranks' pieces put
    together: :func:`merge_ranks`), as ``[rows, seq, ...]`` per Hugging Face call of the
    layout."""
    out: dict[int, np.ndarray] = {}
    for c, key in enumerate(physical):
        part = merge_ranks([np.asarray(v[key]) for v in views if key in v], rule, config,
                            key, c)
        if not out:
            out = {call: np.zeros((rows * seq, *part.shape[1:]), part.dtype)
                   for call, (rows, seq) in lay.shapes.items()}
        if part.shape[0] != lay.flat[c].shape[0]:
            raise DumpError(f"{views[0].path.name}: {key} holds {part.shape[0]} tokens, "
                            f"step {c} ran {lay.flat[c].shape[0]}")
        for call in np.unique(lay.calls[c]):
            sel = lay.calls[c] == call
            out[int(call)][lay.flat[c][sel]] = part[sel]
    return {call: arr.reshape((*lay.shapes[call], *arr.shape[1:])) for call, arr in out.items()}


def merge_ranks(parts: list[np.ndarray], rule: Rule, config: dict[str, Any], key: str,
                 step: int) -> np.ndarray:
    """A record as one engine worker would hold it, from each tensor-parallel rank's: a split
    record's parts concatenated part by part, a ``cols`` one along its last axis, a
    ``heads`` one along axis 1, a whole one checked equal on every rank."""
    if len(parts) == 1:
        return parts[0]
    if rule.split:
        sizes = split_sizes(rule, config)
        if any(s % len(parts) for s in sizes):
            raise DumpError(f"{key}: {sizes} ({rule.split}) do not divide among "
                            f"{len(parts)} ranks (KV heads replicated across ranks?)")
        share = [s // len(parts) for s in sizes]
        if any(p.shape[-1] != sum(share) for p in parts):
            raise DumpError(f"{key}: ranks hold {[p.shape[-1] for p in parts]} columns, "
                            f"{sum(share)} expected from the config")
        pieces = [np.split(p, np.cumsum(share)[:-1], axis=-1) for p in parts]
        return np.concatenate([np.concatenate([pc[j] for pc in pieces], axis=-1)
                               for j in range(len(share))], axis=-1)
    if rule.tp:
        return np.concatenate(parts, axis=-1 if rule.tp == "cols" else 1)
    for r, p in enumerate(parts[1:], start=1):
        if p.shape != parts[0].shape or not np.array_equal(p, parts[0], equal_nan=True):
            raise RanksDiffer(f"rank {r} differs from rank 0 in step {step}, where every "
                               "rank should hold it whole")
    return parts[0]


def shaped(whole: np.ndarray, rule: Rule, config: dict[str, Any], key: str
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
    sizes = split_sizes(rule, config)
    if sum(sizes) != width:
        raise DumpError(f"{key}: {width} columns, but the config's sizes give {sizes} "
                        f"({rule.split})")
    return np.split(whole, np.cumsum(sizes)[:-1], axis=-1)


def split_sizes(rule: Rule, config: dict[str, Any]) -> list[int]:
    """The widths of a fused projection's parts, from the config."""
    if rule.split == "qkv":
        hd = int(config.get("head_dim") or 0)
        q = int(config.get("num_attention_heads") or 0) * hd
        kv = int(config.get("num_key_value_heads") or config.get("num_attention_heads")
                 or 0) * hd
        return [q, kv, kv]
    inter = int(config.get("intermediate_size") or 0)
    return [inter, inter]

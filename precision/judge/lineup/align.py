"""Align runs: which records of two dumps are the same record, and what each run computed in.

Rows follow the first run's execution order; keys only the second run has come last (as
MISSING once measured). Aliases (a module output that is the very tensor of an earlier
record) are not compared twice, unless only one side aliases: T5's block output is its FF
layer's output in fp32 but a new, clamped tensor in fp16, and that clamp is worth a row.

A report may hold several comparisons between named runs (``base->target``, and with a
same-precision reference ``base->reference``): :func:`comparisons` lists them and
:func:`align` pairs the records of each.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ...dumps.dump import Dump, Entry
from ...dumps.keys import CAST_PREFIX, GEN_PREFIX, parse_key
from ...errors import DumpError, option
from ..profiles import effective_precision, precision_name

#: the runs by name: the baseline every comparison measures against, the target a report
#: judges, and the optional same-precision reference (its comparison with the baseline is
#: :data:`precision.judge.verdict.rules.REFERENCE_COMPARISON`)
BASE, TARGET, REFERENCE = "base", "target", "reference"


@dataclass(frozen=True)
class Comparison:
    """One measured pair of runs, by name: ``base->target``."""

    base: str
    target: str

    @property
    def name(self) -> str:
        return f"{self.base}->{self.target}"


@dataclass(frozen=True)
class Pair:
    """One aligned record of a comparison: its entry in each run (None where absent) and
    the key whose data holds it (itself, or what it aliases)."""

    order: int
    key: str
    base: Entry | None
    target: Entry | None
    base_key: str | None
    target_key: str | None
    is_logits: bool

    @property
    def cost(self) -> float:
        """Relative work: its elements, thrice for logits (top-k, log-softmax, KL)."""
        e = self.base or self.target
        assert e is not None
        return math.prod(e.shape) * (3 if self.is_logits else 1)


def comparisons(runs: Mapping[str, Dump]) -> list[Comparison]:
    """What to measure: ``base->target``, and ``base->reference`` when a reference is given
    (the error the same precision makes on a trusted backend, which rules compare with)."""
    out = [Comparison(BASE, TARGET)]
    if REFERENCE in runs:
        out.append(Comparison(BASE, REFERENCE))
    return out


def check_same_model(b: Dump, t: Dump, allow: bool) -> None:
    """Refuse two dumps of different models (config hashes), unless ``allow``."""
    hb, ht = b.config_hash, t.config_hash
    if hb and ht and hb != ht and not allow:
        raise DumpError(f"{b.path.name} and {t.path.name} come from different models "
                        f"(config hash {hb} vs {ht}); pass "
                        f"{option('--allow-different-models', 'allow_different_models=True')} to "
                        "compare them anyway")


def reference_differs(b: Dump, r: Dump) -> str | None:
    """Why ``r`` is no reference for ``b``: it comes from other weights, or the first model
    input (``input:*``) whose shape or values differ, or that one run alone recorded; None
    when neither says so (runs that record no inputs cannot tell). Integer inputs (ids,
    masks) must be equal; float ones (pixels, audio features, embeddings) must be the
    baseline's cast to the reference's dtype, within ``2^-7`` relative (as a capture casts
    them: subnormals, values beyond fp16 and masks of the float32 minimum included)."""
    wb, wr = (d.meta.get("model", {}).get("weights_fingerprint") for d in (b, r))
    if wb and wr and wb != wr:
        return f"it comes from other weights (fingerprint {wr}, the baseline's {wb})"
    mine = {e.key: e for e in b.entries if e.module == "input"}
    theirs = {e.key: e for e in r.entries if e.module == "input"}
    if not mine or not theirs:
        return None
    for key in [*mine, *(k for k in theirs if k not in mine)]:
        eb, er = mine.get(key), theirs.get(key)
        if eb is None or er is None:
            return f"{key} is in {'the baseline' if er is None else 'the reference'} only"
        if eb.shape != er.shape:
            return f"{key} has shape {list(er.shape)}, the baseline's {list(eb.shape)}"
        if key not in b.tensors or key not in r.tensors:
            continue
        x, y = b[key], r[key]
        if x.dtype.kind in "biu" and y.dtype.kind in "biu":
            same = bool(np.array_equal(x, y))
        else:
            with np.errstate(over="ignore", invalid="ignore"):  # beyond fp16: inf, as cast
                cast = x.astype(y.dtype).astype(np.float64)
            same = bool(np.allclose(y.astype(np.float64), cast, rtol=2.0**-7, atol=0.0,
                                    equal_nan=True))
        if not same:
            return f"{key} holds other values"
    return None


def run_precision(d: Dump, stated: str | None) -> str:
    """What a run computed in: as stated (``--base-dtype``), else its recorded dtype (TF32/HF32
    when its recorded matmul settings say so), else its most common float dtype."""
    if stated is not None:
        return precision_name(stated)
    return effective_precision(d.dtype or d.common_float_dtype or "float32",
                               d.compute)


def _stored_key(d: Dump, e: Entry) -> str | None:
    """The key whose data holds this entry: itself, or what it aliases (if stored)."""
    if e.key in d.tensors or e.stats is not None:
        return e.key
    if e.alias_of:
        return e.alias_of
    return None


def _optional(e: Entry) -> bool:
    """Module inputs recorded on request (``--inputs``) and operations (a run in another
    precision casts elsewhere, and takes code paths of its own: T5's fp16 clamp), absent on
    the other side, are no rows (:func:`one_sided_operations` counts them); generation
    records get a row of their own."""
    return ((e.kind == "in" and e.module != "input") or e.kind == "generation"
            or bool(parse_key(e.key).op))


def one_sided_operations(b: Dump, t: Dump) -> dict[str, list[str]]:
    """Operation outputs found in one run only, by side (``base``/``target``): their
    operation names, casts (``cast_<from>_<to>``) left out."""
    def ops(d: Dump, other: Dump) -> list[str]:
        keys = (parse_key(e.key) for e in d.entries
                if e.kind == "out" and other.entry(e.key) is None)
        return [k.op for k in keys if k.op and not k.op.startswith(CAST_PREFIX)]

    return {BASE: ops(b, t), TARGET: ops(t, b)}


def same_positions(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Logits (batch, seq, vocab) against (batch*seq, vocab): the same rows, flattened."""
    return bool(a) and bool(b) and a[-1] == b[-1] and math.prod(a) == math.prod(b)


def repaired_calls(b: Dump, t: Dump) -> dict[str, str]:
    """Base key -> target key for calls of one module made in another order on each side.

    A module called several times with different plain arguments (Gemma 3's rotary embedding,
    once per layer type, in the order of a ``set``) can be called in another order in
    another process: the k-th call with a signature on one side is paired with the k-th call
    with the same signature on the other, when both sides hold the same signatures.
    """
    def calls(d: Dump) -> dict[tuple[str, str, str], list[Entry]]:
        groups: dict[tuple[str, str, str], list[Entry]] = {}
        for e in d.entries:
            if e.signature is not None:
                groups.setdefault((e.module, e.kind, e.index), []).append(e)
        return groups

    mapped: dict[str, str] = {}
    theirs = calls(t)
    for group, ours in calls(b).items():
        other = theirs.get(group, [])
        signatures = [e.signature for e in ours]
        if len(ours) < 2 or signatures == [e.signature for e in other] or sorted(
                signatures, key=str) != sorted((e.signature for e in other), key=str):
            continue
        pending: dict[str | None, list[Entry]] = {}
        for e in other:
            pending.setdefault(e.signature, []).append(e)
        for e in ours:
            match = pending[e.signature].pop(0)
            if match.key != e.key:
                mapped[e.key] = match.key
    return mapped


def outputs_only(d: Dump) -> str | None:
    """What a run holds when it holds outputs only (logits, generated tokens: a logits
    array, vLLM's logprobs JSON), so that another run's layers have nothing to pair with;
    None when it holds any other record, or none at all."""
    logits = ({d.meta.get("logits_key")} | set(d.meta.get("logits_keys", ()))) - {None}
    held: set[str] = set()
    for e in d.entries:
        if e.kind == "generation" or GEN_PREFIX in e.key:
            held.add("top-k log-probabilities" if "topk_logprobs" in e.key
                     else "generated tokens")
        elif e.key in logits:
            held.add("logits")
        elif e.module != "input":
            return None
    order = ("logits", "generated tokens", "top-k log-probabilities")
    return " and ".join(h for h in order if h in held) or None


def generation_only(d: Dump) -> bool:
    """A run that holds generated tokens (and log-probabilities) but no tensor to judge."""
    held = outputs_only(d)
    return held is not None and "logits" not in held


def align(b: Dump, t: Dump) -> list[Pair]:
    """The records of two runs paired by key, in ``b``'s execution order. A key both runs
    hold as an alias of the same record has no pair of its own (:func:`shared_aliases`)."""
    logits = ({b.meta.get("logits_key"), t.meta.get("logits_key")}
              | set(b.meta.get("logits_keys", ())) | set(t.meta.get("logits_keys", ()))) - {None}
    # logits stored under different names (a capture's lm_head:out, an external 'logits')
    renamed = _renamed(b, t)
    pairs: list[Pair] = []
    seen = set(renamed.values())
    for e in b.entries:
        te = t.entry(renamed.get(e.key, e.key))
        if e.alias_of and (te is None or te.alias_of == e.alias_of):
            # the same tensor as an earlier record on both sides, or a key the other run
            # lacks whose values are an earlier record's (msprobe and engine runs store no
            # aliases): compared there, no MISSING row for a name alone
            continue
        if e.kind == "generation" or (te is None and _optional(e)):
            continue
        seen.add(e.key)
        pairs.append(Pair(len(pairs), e.key, e, te, _stored_key(b, e),
                          _stored_key(t, te) if te else None, e.key in logits))
    for e in t.entries:
        if (e.key not in seen and not e.alias_of and b.entry(e.key) is None
                and not _optional(e)):
            pairs.append(Pair(len(pairs), e.key, None, e, None, _stored_key(t, e), False))
    return pairs


def _renamed(b: Dump, t: Dump) -> dict[str, str]:
    """Base key -> target key where the two name one record differently: calls made in
    another order (:func:`repaired_calls`), logits stored under different names (a
    capture's ``lm_head:out``, an external ``logits``)."""
    renamed = repaired_calls(b, t)
    lb, lt = b.meta.get("logits_key"), t.meta.get("logits_key")
    if lb and lt and lb != lt:
        renamed[lb] = lt
    return renamed


def shared_aliases(b: Dump, t: Dump) -> dict[str, str]:
    """Keys both runs hold as an alias of the same record: key -> the record it aliases.

    :func:`align` gives them no pair: the two runs' data for such a key *is* that record's,
    so the comparison's measurement of the record is its measurement of the key. A third
    run needs it: where a same-precision reference aliases a key as the baseline does (an
    MLP returning ``down_proj``'s tensor) and the target made a new tensor for it (a fused
    or faulty kernel for the whole MLP), the target's row of that key is judged against
    the reference's measurement of the tensor the key holds.
    """
    renamed = _renamed(b, t)
    out = {}
    for e in b.entries:
        te = t.entry(renamed.get(e.key, e.key))
        if e.alias_of and te is not None and te.alias_of == e.alias_of:
            out[e.key] = e.alias_of
    return out

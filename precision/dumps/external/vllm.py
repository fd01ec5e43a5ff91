"""vLLM top-k log-probabilities (``.json``), as ``SamplingParams(logprobs=k)`` gives them.

A list with one object per sequence (or ``{"sequences": [...]}``)::

    {"token_ids": [412, 98], "logprobs": [{"412": -0.11, "98": -2.6}, {"98": {"logprob": -0.02}}]}

Log-probabilities do not say what the engine computed in; ``{"dtype": "bfloat16",
"sequences": [...]}`` states it (vLLM's ``model_config.dtype``), and the comparison is then
judged for that precision, as ``--target-dtype`` would.

Everything JSON hands back is checked before it is used: token ids are non-negative integers
below 2**63 (``-1`` is the padding the arrays use, so a negative id would pass as padding),
log-probabilities are numbers, not NaN or +inf, and every sequence has one ``logprobs`` entry
per token. The padded arrays (sequences x steps x top-k) must stay within
:data:`DENSE_LIMIT` times the file's size: a few kilobytes of JSON cannot ask for gigabytes.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from ...dtypes import canonical, is_float
from ...errors import DumpError, InputError
from ..keys import GEN_PREFIX
from .guard import Converted, is_int, is_number, parse_json

#: the padded arrays may take at most this many times the JSON file's size (plus 1 MiB)
DENSE_LIMIT = 16
_SLACK = 1 << 20
_ID = re.compile(r"[0-9]{1,19}")
_MAX_ID = 2**63 - 1
WHAT = "vLLM logprobs JSON"


def read(p: Path) -> Converted:
    """``generation:tokens``, ``generation:topk_ids`` and ``generation:topk_logprobs``."""
    doc = parse_json(p, WHAT)
    seqs = doc.get("sequences", doc) if isinstance(doc, dict) else doc
    if not isinstance(seqs, list) or not seqs:
        raise DumpError(f"{p}: expected a list of sequences with token_ids and logprobs")
    tokens: list[list[int]] = []
    steps: list[list[list[tuple[int, float]]]] = []
    for n, seq in enumerate(seqs):
        if not isinstance(seq, dict) or not isinstance(seq.get("token_ids"), list) \
                or not isinstance(seq.get("logprobs"), list):
            raise DumpError(f"{p}: sequence {n} needs 'token_ids' and 'logprobs' lists")
        ids, lps = seq["token_ids"], seq["logprobs"]
        if len(ids) != len(lps):
            raise DumpError(f"{p}: sequence {n} has {len(ids)} token_ids but {len(lps)} "
                            "logprobs entries (one per generated token)")
        tokens.append([_token(p, n, t) for t in ids])
        steps.append([_step(p, n, s, entry) for s, entry in enumerate(lps)])
    n_steps = max(len(t) for t in tokens)
    k = max((len(pairs) for seq_steps in steps for pairs in seq_steps), default=1) or 1
    _check_size(p, len(seqs), n_steps, k)
    tok = np.full((len(seqs), n_steps), -1, np.int64)
    ids_arr = np.full((len(seqs), n_steps, k), -1, np.int64)
    lps_arr = np.full((len(seqs), n_steps, k), -np.inf, np.float32)
    for r, (t, seq_steps) in enumerate(zip(tokens, steps, strict=True)):
        tok[r, :len(t)] = t
        for s, pairs in enumerate(seq_steps):
            for j, (i, lp) in enumerate(pairs):
                ids_arr[r, s, j], lps_arr[r, s, j] = i, lp
    tensors: list[tuple[str, np.ndarray]] = [
        (GEN_PREFIX + "tokens", tok), (GEN_PREFIX + "topk_ids", ids_arr),
        (GEN_PREFIX + "topk_logprobs", lps_arr)]
    meta: dict[str, Any] = {"generation": {"num_beams": 1, "steps": n_steps, "topk": k},
                            "logits_key": None}
    if isinstance(doc, dict) and "dtype" in doc:
        meta["dtype"] = _dtype(p, doc["dtype"])
    return Converted(tensors, meta)


def _dtype(p: Path, value: Any) -> str:
    """The ``dtype`` a file states (``bfloat16``, ``torch.bfloat16``, ``bf16``...)."""
    try:
        name = canonical(value) if isinstance(value, str) else ""
    except InputError:
        name = ""
    if not is_float(name):
        raise DumpError(f"{p}: 'dtype' {value!r} is not a floating-point dtype (give e.g. "
                        "\"bfloat16\", what vLLM's model_config.dtype says)")
    return name


def _check_size(p: Path, n_seqs: int, n_steps: int, k: int) -> None:
    """Refuse padded arrays far larger than the file (ragged lengths or one very wide step)."""
    dense = n_seqs * n_steps * (8 + k * 12)  # tokens int64, ids int64 + logprobs float32
    limit = DENSE_LIMIT * p.stat().st_size + _SLACK
    if dense > limit:
        raise DumpError(f"{p}: {n_seqs} sequences of up to {n_steps} tokens with up to {k} "
                        f"log-probabilities a step pad to {dense} bytes, more than "
                        f"{DENSE_LIMIT}x the file: split it, or give every step the same top-k")


def _token(p: Path, n: int, value: Any) -> int:
    if not is_int(value) or not 0 <= value <= _MAX_ID:
        raise DumpError(f"{p}: sequence {n} has token id {_show(value)}: token ids are "
                        f"integers from 0 to {_MAX_ID}")
    return int(value)


def _step(p: Path, n: int, s: int, entry: Any) -> list[tuple[int, float]]:
    """One step's ``{token id: logprob}`` as ``(id, logprob)`` pairs, most likely first."""
    if not isinstance(entry, dict):
        raise DumpError(f"{p}: sequence {n}, step {s}: expected an object of token id -> "
                        f"logprob, got {type(entry).__name__}")
    pairs = []
    for key, value in entry.items():
        if not _ID.fullmatch(key) or int(key) > _MAX_ID:
            raise DumpError(f"{p}: sequence {n}, step {s}: token id {_show(key)} is not an "
                            f"integer from 0 to {_MAX_ID}")
        lp = value.get("logprob") if isinstance(value, dict) else value
        x = _logprob(lp)
        if x is None:
            raise DumpError(f"{p}: sequence {n}, step {s}, token {key}: logprob {_show(lp)} "
                            "is not a finite number (or -Infinity)")
        pairs.append((int(key), x))
    return sorted(pairs, key=lambda kv: -kv[1])


def _logprob(value: Any) -> float | None:
    """A log-probability: a finite number or -inf; None for anything else."""
    if not is_number(value):
        return None
    try:
        x = float(value)
    except OverflowError:  # an integer beyond the float range
        return None
    return None if math.isnan(x) or x == math.inf else x


def _show(value: Any) -> str:
    """A JSON value for a message, cut short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."

"""Compare what two runs generated (numpy only).

Each dump of a generating capture holds ``generation:tokens`` (rows x steps; -1 marks steps
after a sequence ended, as external top-k files have them) and, for greedy decoding, each
step's top-K token ids and log-probabilities. Per sequence:

- identical, or the first step where the tokens differ;
- ``top1_per_step``/``topk_per_step``: per step, over the sequences still on the same
  prefix, the share whose tokens agree and their mean top-k overlap;
- until that step both runs saw the same prefix, so their top-k sets are comparable:
  ``topk_overlap`` is the mean share of the baseline's top-k (``k``, default 5) that the
  target also ranks in its top-k, over those steps;
- ``max_logprob_diff``: the largest log-probability difference on tokens both runs rank in
  their top-K, over the same steps (all a top-k logprob file allows instead of a KL);
- the vLLM check at the first difference: each run's token must be in the other run's
  top-N (``top_n``, default 5) at that step. Greedy decoding follows different paths after
  a flip, so later steps are not compared;
- a *near-tie*: the baseline's log-probability gap between its token and the target's token
  is within what the dtype pair is expected to move two log-probabilities,
  ``2 noise (1 + |log p_base|)``, with ``noise`` the profile's element-scaled rms limit
  (the rule used for logits flips; without the logits, their bulk scale is taken as one
  nat). The allowance never grows with the observed difference.

A sequence that diverges fails only when the vLLM check fails; a divergence after a
near-tie is reported as such. Beam search keeps no per-step scores here: only sequence
identity is compared, and a divergence cannot be explained, so it counts as DRIFT.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...dumps.dump import Dump
from ...dumps.keys import GEN_PREFIX as PREFIX
from .logits import DEFAULT_TIE_NOISE


@dataclass(frozen=True)
class Divergence:
    """Where one sequence's tokens first differ, and whether that is explained."""

    row: int
    step: int
    base_token: int
    target_token: int
    vllm_ok: bool | None
    near_tie: bool | None
    margin: float | None


@dataclass(frozen=True)
class GenerationMetrics:
    """Generation comparison of all sequences."""

    sequences: int
    identical: int
    topk_overlap: float | None
    max_logprob_diff: float | None = None
    divergences: list[Divergence] = field(default_factory=list)
    top1_per_step: list[float] = field(default_factory=list)
    topk_per_step: list[float | None] = field(default_factory=list)

    @property
    def failed(self) -> list[Divergence]:
        """Divergences the vLLM check does not explain, or cannot (beam search)."""
        return [d for d in self.divergences if not d.vllm_ok]

    def as_dict(self) -> dict[str, Any]:
        return {"sequences": self.sequences, "identical": self.identical,
                "topk_overlap": self.topk_overlap, "max_logprob_diff": self.max_logprob_diff,
                "top1_per_step": self.top1_per_step, "topk_per_step": self.topk_per_step,
                "divergences": [vars(d) for d in self.divergences]}


def generation_prefixes(d: Dump) -> list[str]:
    """Where a dump's generations live: ``[""]`` for a single dump, ``["rank0/", ...]`` for
    a directory dump (each rank generated from its own prompts)."""
    ending = PREFIX + "tokens"
    return sorted(k[:-len(ending)] for k in d.tensors if k.endswith(ending))


def has_generation(d: Dump) -> bool:
    return bool(generation_prefixes(d))


def compare_generation(b: Dump, t: Dump, *, k: int = 5, top_n: int = 5,
                       prefix: str = "", tie_noise: float = DEFAULT_TIE_NOISE
                       ) -> GenerationMetrics:
    """Compare the generations stored in two dumps (see the module docstring); ``prefix``
    picks one rank's of a directory dump (``rank1/``); ``tie_noise`` is the profile's."""
    pre = prefix + PREFIX
    tb, tt = b[pre + "tokens"], t[pre + "tokens"]
    rows = min(tb.shape[0], tt.shape[0])
    scored = all(pre + n in d.tensors for d in (b, t) for n in ("topk_ids", "topk_logprobs"))
    ids_b = b[pre + "topk_ids"] if scored else None
    ids_t = t[pre + "topk_ids"] if scored else None
    lp_b = b[pre + "topk_logprobs"] if scored else None
    lp_t = t[pre + "topk_logprobs"] if scored else None
    identical = 0
    overlaps: list[float] = []
    lp_diff: float | None = None
    divergences = []
    # generation stops when every row has ended, so if the runs' lengths differ some row
    # differs within the common steps; a row equal over them ended the same way in both
    steps = min(tb.shape[1], tt.shape[1])
    for r in range(rows):
        ended = np.flatnonzero((tb[r, :steps] < 0) | (tt[r, :steps] < 0))  # -1: no more tokens
        upto_r = int(ended[0]) if ended.size else steps
        diff = np.flatnonzero(tb[r, :upto_r] != tt[r, :upto_r])
        first = int(diff[0]) if diff.size else None
        if first is None:
            identical += 1
        upto = steps if first is None else first
        if scored:
            assert ids_b is not None and ids_t is not None
            kk = min(k, ids_b.shape[-1])
            overlaps += [len(set(ids_b[r, s, :kk]) & set(ids_t[r, s, :kk])) / kk
                         for s in range(upto)]
            assert lp_b is not None and lp_t is not None
            for s in range(upto):
                d = _shared_diffs(ids_b[r, s], lp_b[r, s], ids_t[r, s], lp_t[r, s])
                if d:
                    lp_diff = max(lp_diff or 0.0, max(abs(x) for x in d))
        if first is not None:
            divergences.append(_divergence(r, first, tb, tt, ids_b, ids_t, lp_b, lp_t, top_n,
                                           tie_noise))
    overlap = float(np.mean(overlaps)) if overlaps else None
    top1, topk = _per_step(tb[:rows, :steps], tt[:rows, :steps], ids_b, ids_t, k)
    return GenerationMetrics(rows, identical, overlap, lp_diff, divergences, top1, topk)


def _per_step(tb: np.ndarray, tt: np.ndarray, ids_b: np.ndarray | None,
              ids_t: np.ndarray | None, k: int) -> tuple[list[float], list[float | None]]:
    """Per step, over the sequences whose prefixes still match (and have not ended): the
    share whose tokens agree, and their mean top-k overlap (None without scores)."""
    top1: list[float] = []
    topk: list[float | None] = []
    alive = np.ones(tb.shape[0], bool)
    for s in range(tb.shape[1]):
        alive &= (tb[:, s] >= 0) & (tt[:, s] >= 0)
        rows = np.flatnonzero(alive)
        if rows.size == 0:
            break
        same = tb[rows, s] == tt[rows, s]
        top1.append(float(same.mean()))
        if ids_b is not None and ids_t is not None:
            kk = min(k, ids_b.shape[-1])
            topk.append(float(np.mean([len(set(ids_b[r, s, :kk]) & set(ids_t[r, s, :kk])) / kk
                                       for r in rows])))
        else:
            topk.append(None)
        alive[rows[~same]] = False  # diverged: later steps follow other prefixes
    return top1, topk


def _shared_diffs(ib: np.ndarray, lb: np.ndarray, it: np.ndarray,
                  lt: np.ndarray) -> list[float]:
    """Baseline minus target log-probability for every token both top-k lists hold."""
    target = {int(i): float(v) for i, v in zip(it, lt, strict=True) if i >= 0}
    return [float(v) - target[int(i)] for i, v in zip(ib, lb, strict=True)
            if i >= 0 and int(i) in target]


def _divergence(r: int, s: int, tb: np.ndarray, tt: np.ndarray, ids_b: np.ndarray | None,
                ids_t: np.ndarray | None, lp_b: np.ndarray | None, lp_t: np.ndarray | None,
                top_n: int, tie_noise: float) -> Divergence:
    base_tok, tgt_tok = int(tb[r, s]), int(tt[r, s])
    if ids_b is None or ids_t is None or lp_b is None or lp_t is None:
        return Divergence(r, s, base_tok, tgt_tok, None, None, None)
    nb, nt = list(ids_b[r, s]), list(ids_t[r, s])
    vllm_ok = tgt_tok in nb[:top_n] and base_tok in nt[:top_n]
    lb = dict(zip(nb, lp_b[r, s].tolist(), strict=True))
    margin = lb[base_tok] - lb[tgt_tok] if tgt_tok in lb and base_tok in lb else None
    near_tie = None if margin is None else margin <= 2 * tie_noise * (1 + abs(lb[base_tok]))
    return Divergence(r, s, base_tok, tgt_tok, vllm_ok, near_tie, margin)


def summarise(g: GenerationMetrics) -> tuple[str, str]:
    """Status (OK or DRIFT) and a one-line reason."""
    if not g.divergences:
        return "OK", f"all {g.sequences} sequences identical"
    diverge = f"{len(g.divergences)} of {g.sequences} sequences diverge"
    if g.failed:
        d = g.failed[0]
        if d.vllm_ok is None:
            return "DRIFT", (f"{diverge}; first at sequence {d.row} step {d.step} (tokens "
                             f"{d.base_token} vs {d.target_token}); no per-step scores to tell "
                             "a near-tie (beam search): compare greedy runs for that")
        return "DRIFT", (f"{diverge}; vLLM check fails at sequence {d.row} step {d.step}: "
                         f"tokens {d.base_token} vs {d.target_token} not in each other's top-N")
    ties = sum(bool(d.near_tie) for d in g.divergences)
    return "OK", (f"{diverge}, each within the other run's top-N at the first difference"
                  + (f" ({ties} after a near-tie)" if ties else ""))

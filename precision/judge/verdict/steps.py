"""Decoding steps after the generations diverged (``capture --capture-steps``).

With the layers recorded per decoding step, the call ``#k`` of a module is step ``k`` of the
generation. When greedy decoding picks another token at step ``s`` in some sequence, every
call from ``s + 1`` on reads other tokens there: its records differ because the inputs do,
not because the precision does (an embedding lookup of another token "drifts" by the whole
vector). Where every divergence is explained (within the other run's top-N: a near tie), the
DRIFT rows of those steps are not judged; an unexplained divergence leaves them as they are,
and the generation row fails on its own. NaN and OVERFLOW rows always stand.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from ...dumps.keys import parse_key
from ...errors import InputError
from ..measure.row import Row


def per_step(meta: dict[str, Any]) -> bool:
    """Whether a dump holds its layers per decoding step (``--capture-steps``)."""
    generation = meta.get("generation")
    return isinstance(generation, dict) and bool(generation.get("layers_per_step"))


def check_same_layout(base: Any, target: Any) -> None:
    """Refuse two runs that recorded their layers differently: per decoding step
    (``--capture-steps``) against one teacher-forced forward, whose records share names
    but not what they hold (a prompt's step 0 against the whole sequence: MISMATCH rows and
    MISSING steps, not a comparison). ``base``/``target``: dumps."""
    sides = [d.meta.get("generation") for d in (base, target)]
    if not all(isinstance(g, dict) for g in sides) or any(
            d.meta.get("engine") or d.meta.get("engine_replay") for d in (base, target)):
        return  # an engine's steps are lined up by its own rules (engines/vllm/lineup)
    steps = [per_step(d.meta) for d in (base, target)]
    if steps[0] != steps[1]:
        per, whole = (base, target) if steps[0] else (target, base)
        raise InputError(f"{per.path.name} recorded its layers per decoding step "
                         f"(--capture-steps) and {whole.path.name} in one forward: capture both "
                         "alike to compare them")


def after_divergence(rows: Sequence[Row], base_meta: dict[str, Any],
                     target_meta: dict[str, Any]) -> tuple[list[Row], list[str]]:
    """``rows`` with the DRIFT rows of decoding steps after an explained divergence left
    unjudged (status OK, the reason saying why), and a note counting them."""
    if not (per_step(base_meta) and per_step(target_meta)):
        return list(rows), []
    divergences = [d for r in rows if r.generation is not None for d in r.generation.divergences]
    if not divergences or not all(d.vllm_ok for d in divergences):
        return list(rows), []
    first = min(d.step for d in divergences) + 1  # the first call that read another token
    out, left = [], 0
    for r in rows:
        if r.status == "DRIFT" and r.generation is None and parse_key(r.key).call >= first:
            left += 1
            r = replace(r, status="OK", score=0.0, reason=(
                f"not judged: from decoding step {first} the runs read other tokens (their "
                f"generations diverged at step {first - 1}, within each other's top-N)"))
        out.append(r)
    if not left:
        return out, []
    return out, [f"{left} DRIFT record(s) of decoding steps {first} and later are not judged: "
                 f"the generations diverged at step {first - 1} (a near tie, within each "
                 "other's top-N), so those steps read other tokens"]

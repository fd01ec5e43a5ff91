"""Replay an engine's tokens through a Hugging Face model step by step, from its KV cache.

An engine (vLLM) computes each request's prompt in a prefill and every generated token fed
back in a decode step that reads the keys and values it cached. ``precision capture
--replay ENGINE.st`` does the same with a Hugging Face causal LM (see
:func:`precision.runtime.run.runner.run_capture`): one prefill of the left-padded prompts (the
captured forward, call 0, as Hugging Face's ``generate`` runs it), then decode step ``t``
(call ``#t``) runs the ``t``-th generated token of each request still running, at its
position, from the cache. Requests that ended are dropped from the batch, so step ``t``
holds exactly the requests the engine ran a ``t``-th decode token for, in request order.
:mod:`precision.engines.vllm.lineup` lays the engine's records out the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ...dumps.dump import Dump
from ...dumps.keys import GEN_PREFIX, INPUT_PREFIX
from ...errors import InputError

#: ``meta.engine_replay.layout`` of a step-by-step replay (crossimpl's ``steps`` layout)
STEPS = "steps"


@dataclass(frozen=True)
class StepPlan:
    """The prompts (left-padded ids and mask) and, per request, the generated tokens the
    engine fed back (all but the last one it generated)."""

    prompt_ids: np.ndarray
    prompt_mask: np.ndarray
    fed: tuple[tuple[int, ...], ...]

    @property
    def decode_steps(self) -> int:
        return max((len(f) for f in self.fed), default=0)

    def prompt_inputs(self, device: str) -> dict[str, torch.Tensor]:
        """The prefill's inputs: ids, mask and position ids (1 at padding, as generate)."""
        mask = torch.from_numpy(self.prompt_mask.astype(np.int64))
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        return {"input_ids": torch.from_numpy(self.prompt_ids.astype(np.int64)).to(device),
                "attention_mask": mask.to(device), "position_ids": pos.to(device)}


def plan_of(base: Dump) -> StepPlan:
    """What an engine's dump (``precision.vllm``) ran: its prompts and the tokens fed back."""
    need = [GEN_PREFIX + "prompt_ids", GEN_PREFIX + "prompt_mask", INPUT_PREFIX + "input_ids",
            INPUT_PREFIX + "attention_mask"]
    lacking = [k for k in need if k not in base.tensors]
    if lacking:
        raise InputError(f"--replay {base.path.name}: an engine's dump without "
                         f"{', '.join(lacking)}: was cap.record(outputs) called?")
    pids = np.asarray(base[need[0]])
    pmask = np.asarray(base[need[1]]) != 0
    ids = np.asarray(base[need[2]])
    mask = np.asarray(base[need[3]]) != 0
    fed = []
    for r in range(ids.shape[0]):
        prompt = pids[r][pmask[r]]
        ran = ids[r][mask[r]]
        if not np.array_equal(ran[:prompt.size], prompt):
            raise InputError(f"--replay {base.path.name}: request {r}'s tokens do not start "
                             "with its prompt")
        fed.append(tuple(int(x) for x in ran[prompt.size:]))
    return StepPlan(pids, pmask.astype(np.int64), tuple(fed))


def replay(model: torch.nn.Module, plan: StepPlan, device: str) -> None:
    """The prefill (the model's next call), then one decode step per token fed back."""
    inputs = plan.prompt_inputs(device)
    out: Any = model(**inputs, use_cache=True)
    cache: Any = _cache_of(out)
    if cache is None and plan.decode_steps:
        raise InputError("the model returned no KV cache: it cannot replay decode steps "
                         "(capture with the teacher-forced layout)")
    plen = plan.prompt_mask.sum(axis=1)
    rows = list(range(plan.prompt_ids.shape[0]))
    mask = inputs["attention_mask"]
    for t in range(1, plan.decode_steps + 1):
        alive = [r for r in range(len(plan.fed)) if len(plan.fed[r]) >= t]
        if alive != rows:
            keep = torch.tensor([rows.index(r) for r in alive], device=device)
            cache.reorder_cache(keep)
            mask, rows = mask[keep], alive
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        ids = torch.tensor([[plan.fed[r][t - 1]] for r in rows], device=device)
        pos = torch.tensor([[int(plen[r]) + t - 1] for r in rows], device=device)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos,
                    use_cache=True, **{_cache_argument(model): cache})
        cache = _cache_of(out)


def _cache_of(out: Any) -> Any:
    """The KV cache a forward returned (``cache`` from transformers 5.2x on, before it
    ``past_key_values``)."""
    found = getattr(out, "cache", None)
    return found if found is not None else getattr(out, "past_key_values", None)


def _cache_argument(model: torch.nn.Module) -> str:
    """The name under which the model's forward takes the cache."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"

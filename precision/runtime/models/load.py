"""Load Hugging Face models and tokenizers, apply a dtype policy, build inputs (torch needed).

Dtype policy (``--keep-fp32``):

- ``auto``: load exactly as transformers does for the dtype (``from_pretrained(dtype=...)``);
  for T5 that keeps every ``wo`` in fp32 under fp16 (``_keep_in_fp32_modules``).
- ``none``: load in fp32 and cast every module to the dtype.
- globs (``'*.DenseReluDense.wo'``): modules whose names match stay in fp32, on top of
  ``auto`` when it is given too and of ``none`` otherwise. Kept modules get their floating
  inputs upcast to fp32 and hand their outputs on in the model's compute dtype, or in fp32
  with a ``:fp32`` suffix (``'model.layers.*:fp32'``: a residual stream in fp32);
  :mod:`precision.runtime.models.keep` states the whole contract.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...errors import InputError, ModelError
from .keep import keep_fp32, split_pattern

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

DEFAULT_PROMPTS = (
    "translate English to German: The house is wonderful.",
    "summarize: The quick brown fox jumps over the lazy dog. The dog does not react.",
    "question: What is the capital of France? context: France is in Europe and Paris is "
    "its capital.",
)


@dataclass(frozen=True)
class Policy:
    """Which modules stay in fp32: ``base`` is ``auto`` or ``none``, plus ``globs``."""

    base: str = "auto"
    globs: tuple[str, ...] = ()

    @classmethod
    def parse(cls, values: str | Sequence[str]) -> Policy:
        """From ``--keep-fp32`` values: ``auto``, ``none`` and globs, in any combination (one
        string given alone from Python, ``keep_fp32="none"``, is one value, not letters)."""
        vals = [v.strip() for v in ((values,) if isinstance(values, str) else values)
                if v.strip()]
        words = {v for v in vals if v in ("auto", "none")}
        if words == {"auto", "none"}:
            raise InputError("--keep-fp32 auto and none contradict each other: choose one")
        globs = tuple(v for v in vals if v not in ("auto", "none"))
        for g in globs:
            split_pattern(g)  # a bad ':SUFFIX' fails here, before the model loads
        base = words.pop() if words else ("none" if globs else "auto")
        return cls(base, globs)

    def as_meta(self) -> dict[str, Any]:
        return {"base": self.base, "globs": list(self.globs)}


def read_device_map(value: str) -> str | dict[str, Any]:
    """``--device-map``: a strategy name transformers knows, or a JSON file mapping module
    names to devices (``0``, ``"cuda:1"``, ``"npu:0"``, ``"cpu"``, ``"disk"``)."""
    if value in DEVICE_MAP_STRATEGIES:
        return value
    p = Path(value)
    if not p.is_file():
        raise InputError(f"--device-map {value}: not one of {', '.join(DEVICE_MAP_STRATEGIES)} "
                         "and not a JSON file")
    try:
        mapping = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"--device-map {p} is not readable JSON: {exc}") from None
    if not isinstance(mapping, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, str)) for k, v in mapping.items()):
        raise InputError(f"--device-map {p} must map module names to devices, e.g. "
                         '{"encoder": 0, "decoder": 1, "lm_head": 1}')
    return mapping


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass
class LoadedModel:
    """A model ready to run, with what is needed to feed it and to describe it.

    ``kind`` is ``encoder-decoder`` or ``causal-lm`` (models that generate) or ``encoder``
    (one forward: BERT, ViT, classifiers). ``loading`` is what the dump records of the load
    (:func:`precision.runtime.models.checkpoint.load_checked`, plus the weights' fingerprint:
    :func:`precision.runtime.models.identity.weights_fingerprint`).
    ``tokenizer`` is ``None`` for a model without one (an image classifier).
    """

    model: torch.nn.Module
    tokenizer: Any
    kind: str
    path: Path
    kept_fp32: list[str] = field(default_factory=list)
    loading: dict[str, Any] = field(default_factory=dict)
    #: how many Gated DeltaNet layers it has (:mod:`precision.runtime.models.hybrid`)
    linear_attention: int = 0


def read_config(path: Path) -> dict[str, Any]:
    """A model directory's ``config.json`` as a dict; one-line errors when it is not one."""
    if not path.exists():
        raise ModelError(f"model directory {path} does not exist")
    cfg_file = path / "config.json"
    if not path.is_dir() or not cfg_file.is_file():
        raise ModelError(f"{path} is not a Hugging Face model directory (no config.json)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{cfg_file} is not readable JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{cfg_file} is not a JSON object")
    return cfg


def kind_of(model: Any) -> str:
    """``encoder-decoder``/``causal-lm`` for a model that generates, else ``encoder``."""
    can = getattr(model, "can_generate", None)
    if not (callable(can) and can()):
        return "encoder"
    config = getattr(model, "config", None)
    return "encoder-decoder" if getattr(config, "is_encoder_decoder", False) else "causal-lm"


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type's name)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_model(path: str | Path, *, dtype: str, device: str, policy: Policy,
               device_map: str | dict[str, Any] | None = None,
               offload_folder: str | None = None, model_class: str | None = None,
               attention: str | None = None, delta_rule: str | None = None,
               log: Callable[[str], None] = lambda _msg: None) -> LoadedModel:
    """Load the model and tokenizer at ``path`` in ``dtype`` on ``device`` under ``policy``.

    The class is the checkpoint's own (``model_class`` overrides it; see
    :mod:`precision.runtime.models.checkpoint`); no weight is ever newly initialised.
    ``device_map`` (``auto``, ``balanced``, ``sequential`` or a module -> device dict, as
    transformers takes it) spreads the model over devices with accelerate instead; modules
    mapped to ``disk`` are offloaded to ``offload_folder``. ``attention`` picks transformers'
    attention implementation (``eager``, ``sdpa``...; None: the model's default), and
    ``delta_rule`` the form of a hybrid linear-attention model's delta rule (``chunked``,
    ``recurrent``; None: the model's own; :mod:`precision.runtime.models.hybrid`). ``log``
    gets the fallback note.
    """
    import transformers

    from .checkpoint import load_checked
    from .hybrid import instrument
    from .identity import weights_fingerprint

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    p = Path(path)
    read_config(p)
    target = TORCH_DTYPES[dtype]
    load_dtype = target if policy.base == "auto" else torch.float32
    dtype_kw = "dtype" if _version_tuple(transformers.__version__) >= (4, 56) else "torch_dtype"
    extra: dict[str, Any] = {dtype_kw: load_dtype}
    if attention is not None:
        extra["attn_implementation"] = attention
    if device_map is not None:
        if policy != Policy():
            raise InputError("--device-map works with --keep-fp32 auto only: modules placed "
                             "by accelerate cannot be recast after loading")
        try:
            import accelerate  # noqa: F401  (transformers needs it for device_map)
        except ImportError:
            raise ModelError("--device-map needs the accelerate package: "
                             "pip install accelerate") from None
        extra |= {"device_map": device_map, "offload_folder": offload_folder}
        import logging

        logging.getLogger("accelerate").setLevel(logging.ERROR)  # "parameters on meta" notes
    try:
        config = transformers.AutoConfig.from_pretrained(p, local_files_only=True)
        model, loading = load_checked(p, config, model_class, **extra)
    except (InputError, ModelError):
        raise
    except Exception as exc:  # transformers raises many types; the user needs one line
        raise ModelError(f"cannot load the model in {p}: {one_line(exc)}") from None
    if loading["fallback"]:
        log(loading["fallback"])
    loading["weights_fingerprint"] = weights_fingerprint(p)
    tokenizer = load_tokenizer(p)
    if policy.base == "none":
        model.to(target)
    kept = keep_fp32(model, policy.globs) if policy.globs else []
    if device_map is None:
        model.to(device)
    model.eval()
    linear = instrument(model, delta_rule)
    if delta_rule is not None and not linear:
        raise InputError(f"--delta-rule {delta_rule}: {p} has no gated delta rule layer "
                         "(a hybrid linear-attention model's: Qwen3.5, Qwen3-Next)")
    kind = kind_of(model)
    if tokenizer is not None and kind == "causal-lm":  # generation appends on the right
        tokenizer.padding_side = "left"
    if tokenizer is not None and tokenizer.pad_token is None and kind != "encoder":
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, kind, p, kept, loading, linear)


def load_tokenizer(path: Path) -> Any:
    """The tokenizer saved with the model, or ``None`` when it has none (ViT, Whisper's
    feature extractor alone)."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:  # no tokenizer files, or a model type without a tokenizer
        return None


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def read_prompts(prompts: Sequence[str], prompts_file: str | None) -> list[str]:
    """Prompts from ``--prompt`` values and a ``--prompts`` file (one per non-empty line)."""
    out = list(prompts)
    if prompts_file:
        f = Path(prompts_file)
        if not f.is_file():
            raise InputError(f"prompts file {f} does not exist")
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InputError(f"prompts file {f} is not UTF-8 text: convert it "
                             "(iconv -t UTF-8)") from None
        lines = [ln.strip() for ln in text.splitlines()]
        lines = [ln for ln in lines if ln]
        if not lines:
            raise InputError(f"prompts file {f} holds no prompt (it is empty)")
        out += lines
    return out or list(DEFAULT_PROMPTS)


@dataclass(frozen=True)
class Generation:
    """What ``generate`` produced.

    ``sequences`` feed a teacher-forced forward (encoder-decoder: start token plus generated
    tokens; causal LM: prompt plus generated tokens). ``tokens`` are the generated tokens
    alone, (rows, steps). For greedy decoding, ``topk_ids``/``topk_logprobs`` hold each
    step's K most likely tokens and their log-probabilities, (rows, steps, K): enough for
    top-k agreement and the vLLM-style check, at a fraction of the full logits' size. They
    rank the scores the decoder chose from, after the model's logits processors: Whisper
    suppresses tokens (``" ("``, ``" ["``) that top its raw logits, and a near-tie between
    two allowed tokens ranked below them failed the check. A token a processor ruled out
    (``-inf``) has id -1.
    """

    sequences: torch.Tensor
    tokens: torch.Tensor
    num_beams: int
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None


GENERATION_TOPK = 20


def generate(loaded: LoadedModel, inputs: dict[str, torch.Tensor], max_new_tokens: int,
             num_beams: int = 1) -> Generation:
    """Deterministic generation (greedy, or beam search with ``num_beams`` > 1), KV cache on."""
    model: Any = loaded.model
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             num_beams=num_beams, output_scores=num_beams == 1,
                             return_dict_in_generate=True, use_cache=True)
    seq = out.sequences
    if num_beams == 1 and out.scores:  # one row of scores per generated token
        start = seq.shape[1] - len(out.scores)
    else:  # decoders start from one token (Whisper's forced ones come as score steps)
        start = 1 if loaded.kind == "encoder-decoder" else inputs["input_ids"].shape[1]
    tokens = seq[:, start:]
    if num_beams > 1 or not out.scores:
        return Generation(seq, tokens, num_beams)
    steps = torch.stack([s.float() for s in out.scores], dim=1)  # (rows, steps, vocab)
    logprobs = torch.log_softmax(steps, dim=-1)
    top = torch.topk(logprobs, min(GENERATION_TOPK, logprobs.shape[-1]), dim=-1)
    ids = top.indices.masked_fill(torch.isneginf(top.values), -1)  # ruled out
    return Generation(seq, tokens, num_beams, ids, top.values)

"""Size a capture before running it (``precision capture --dry-run``; torch needed).

The model is built from its ``config.json`` on PyTorch's ``meta`` device: no weights are
read and no memory is allocated, yet every module runs and yields outputs of the right
shape and dtype, so the capture hooks see exactly the records a real capture would make
(aliases included) and count the bytes instead of writing them. Planning flan-t5-xxl
(11B parameters) takes seconds on a laptop.

Inputs have the shapes a real capture would use: the prompts tokenized and padded as
``capture`` does, then ``max_new_tokens + 1`` decoder ids for an encoder-decoder (the start
token and the generated tokens) or ``max_new_tokens`` more tokens for a causal LM (generation
may stop early, so these are upper bounds). Attention masks are left out: shapes do not
depend on them, and transformers reads mask values, which meta tensors do not have.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...dtypes import itemsize
from ...dumps.atomic import format_bytes
from ...dumps.sketch import BUCKETS
from ...errors import InputError, ModelError
from ..capture.recorder import Capture, header_reserve
from ..models.checkpoint import choose_class
from ..models.inputs import build
from ..models.load import (
    TORCH_DTYPES,
    Policy,
    keep_fp32,
    kind_of,
    load_tokenizer,
    one_line,
    read_config,
)
from .runner import (
    AUTO_STATS_PARAMS,
    CaptureOptions,
    capture_prompts,
    check_options,
    count_text,
    sources,
)

#: header JSON per record, without and with statistics, and per stored tensor's line
#: (measured on the fixtures: 195-209, 331-490 and 90-119 bytes; a stats record's line is
#: escaped once more inside the metadata string), plus the rest of the metadata; the header
#: is padded to Capture.header_reserve when smaller. A stats record's count sketch is a row
#: of 1021 float32 values with the tensors (precision.dumps.dump.SKETCHES_KEY)
RECORD_JSON_BYTES = 210
STATS_RECORD_JSON_BYTES = 540
SKETCH_ROW_BYTES = 4 * BUCKETS
TENSOR_JSON_BYTES = 120
META_JSON_BYTES = 8192


@dataclass(frozen=True)
class Plan:
    """What a capture would record and store; sizes in bytes (headers estimated)."""

    model: str
    parameters: int
    dtype: str
    inputs: dict[str, list[int]]
    records: int
    tensors: int
    full_bytes: int
    stats_bytes: int
    auto_mode: str
    largest: list[tuple[str, list[int], str, int]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "parameters": self.parameters, "dtype": self.dtype,
                "inputs": self.inputs, "records": self.records, "tensors": self.tensors,
                "full_bytes": self.full_bytes, "stats_bytes": self.stats_bytes,
                "auto_mode": self.auto_mode,
                "largest": [{"key": k, "shape": s, "dtype": d, "bytes": b}
                            for k, s, d, b in self.largest]}


def plan_forward(model: torch.nn.Module, model_inputs: dict[str, torch.Tensor], *,
                 dtype: str = "float32", **capture: Any) -> Plan:
    """Run ``model(**model_inputs)`` under a dry-run capture (``capture`` takes
    :class:`~precision.runtime.capture.recorder.Capture`'s selection options) and size what it
    records."""
    with torch.no_grad(), Capture(model, dry_run=True, **capture) as cap:
        try:
            model(**model_inputs)
        except (RuntimeError, NotImplementedError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise InputError(f"--dry-run: the model cannot run on the meta device ({first}); "
                             "capture a few prompts in stats mode to size it instead") from None
    entries = cap.entries
    stored = [e for e in entries if "alias_of" not in e]

    modules = cap.module_count

    def header(mode: str, per_record: int, tensors: int) -> int:
        text = META_JSON_BYTES + per_record * len(entries) + TENSOR_JSON_BYTES * tensors
        return 8 + max(header_reserve(mode, modules), text)

    nbytes = [(e, _nbytes(e)) for e in stored]
    n = sum(p.numel() for p in model.parameters())
    return Plan(
        model=type(model).__name__, parameters=n, dtype=dtype,
        inputs={k: list(v.shape) for k, v in model_inputs.items()}, records=len(entries),
        tensors=len(stored),
        full_bytes=cap.planned["full"] + header("full", RECORD_JSON_BYTES, len(stored)),
        stats_bytes=cap.planned["stats"] + header("stats", STATS_RECORD_JSON_BYTES,
                                                   cap.planned["stats_tensors"])
        + SKETCH_ROW_BYTES * len(stored),
        auto_mode="stats" if n > AUTO_STATS_PARAMS else "full",
        largest=[(e["key"], e["shape"], e["dtype"], b)
                 for e, b in sorted(nbytes, key=lambda x: -x[1])[:5]])


def plan_model(opts: CaptureOptions) -> Plan:
    """The plan for ``precision capture`` with these options, from the config alone."""
    import transformers

    dtype = check_options(opts)
    unsized = [flag for flag, used in (("--backward", opts.backward),
                                       ("--capture-steps", opts.capture_steps),
                                       ("--steps", opts.steps is not None),
                                       ("--replay", bool(opts.replay))) if used]
    if unsized:
        raise InputError(f"--dry-run sizes one teacher-forced forward: it cannot size "
                         f"{' and '.join(unsized)}; leave {'them' if len(unsized) > 1 else 'it'} "
                         "out to plan the forward")
    path = opts.model  # (--device-map is checked, then ignored: placement changes no size)
    read_config(Path(path))
    prompts = capture_prompts(opts)
    transformers.logging.set_verbosity_error()
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # transformers raises many types; the user needs one line
        raise ModelError(f"cannot read the config in {path}: {one_line(exc)}") from None
    choice = choose_class(config, opts.model_class)
    try:
        with torch.device("meta"):
            model = _from_config(choice.cls, config).to(TORCH_DTYPES[dtype]).eval()
    except Exception as exc:  # an architecture transformers cannot build for this task
        raise ModelError(f"cannot build the model in {path} from its config: "
                         f"{one_line(exc)}") from None
    _keep_like_transformers(model, dtype, opts.keep_fp32)
    kind = kind_of(model)
    tokenizer = load_tokenizer(Path(path))
    if tokenizer is not None and tokenizer.pad_token is None and kind != "encoder":
        tokenizer.pad_token = tokenizer.eos_token
    src = sources(opts, prompts)
    fed = build(model, tokenizer, Path(path), src, generates=kind != "encoder")
    shapes = {k: (tuple(v.shape), v.dtype if not v.is_floating_point() else TORCH_DTYPES[dtype])
              for k, v in fed.items() if k != "attention_mask"}
    new = max(1, opts.max_new_tokens)
    if kind == "encoder-decoder":
        rows = next(iter(shapes.values()))[0][0]
        shapes["decoder_input_ids"] = ((rows, new + 1), torch.long)
    elif kind == "causal-lm" and "input_ids" in shapes:
        (rows, length), _ = shapes["input_ids"]
        shapes["input_ids"] = ((rows, length + new), torch.long)
    on_meta = {k: torch.zeros(s, dtype=d, device="meta") for k, (s, d) in shapes.items()}
    return plan_forward(model, on_meta, dtype=dtype, include=opts.include, exclude=opts.exclude,
                        every=opts.every, inputs=opts.inputs, full=opts.full)


def _from_config(cls: Any, config: Any) -> torch.nn.Module:
    """A model of class ``cls`` (an auto-class or a model class) built from ``config``."""
    if hasattr(cls, "_model_mapping"):
        return cls.from_config(config)
    return cls._from_config(config)


def _keep_like_transformers(model: torch.nn.Module, dtype: str, keep: Any) -> None:
    """What ``from_pretrained`` would keep in fp32 (T5's ``wo`` under fp16), plus globs."""
    policy = Policy.parse(keep)
    globs = list(policy.globs)
    if policy.base == "auto" and dtype in ("float16", "bfloat16"):
        names = list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
        if dtype == "float16":
            names += getattr(model, "_keep_in_fp32_modules", None) or []
        modules = [n for n, _ in model.named_modules()]
        globs += [g for g in (f"*.{name}" for name in names)
                  if any(fnmatch.fnmatchcase(m, g) for m in modules)]
    if globs:
        keep_fp32(model, globs)


def _nbytes(entry: dict[str, Any]) -> int:
    n = 1
    for s in entry["shape"]:
        n *= int(s)
    return n * itemsize(entry["dtype"])


def render(plan: Plan) -> str:
    """The dry run's report, as plain text lines."""
    size = format_bytes

    shapes = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in plan.inputs.items())
    lines = [
        f"dry run: {plan.model}, {count_text(plan.parameters)} parameters, {plan.dtype}; "
        f"inputs {shapes}",
        f"  records     {plan.records} ({plan.tensors} stored, the rest aliases)",
        f"  full mode   {size(plan.full_bytes)}",
        f"  stats mode  {size(plan.stats_bytes)}",
        f"  --mode auto would choose {plan.auto_mode}",
        "  largest records:",
    ]
    lines += [f"    {key}  {'x'.join(map(str, shape))} {dt}  {size(b)}"
              for key, shape, dt, b in plan.largest]
    return "\n".join(lines)


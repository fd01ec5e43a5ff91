"""The hybrid linear-attention fixture (``fixtures/tiny-qwen3.5``): healthy kernel pairs and
planted delta-rule faults, judged against the same-precision reference.

Every run reads the same left-padded batch of :data:`PROMPTS` (one longer than a 64-token
chunk, so the chunked form carries its state across chunks), one forward with the cache on
(so each Gated DeltaNet layer hands its final state to the cache, and it is recorded):

- **base**: fp32, the model's own delta rule (chunked over a prompt);
- **reference**: the target's precision, nothing else changed (``capture --expect``);
- **healthy targets** ``DTYPE-FORM``: ``fp32-recurrent`` (fp32, the recurrent form: no
  reference, fixed limits), ``bf16-chunked``/``fp16-chunked`` (the CLI's target, the very
  computation of its reference on a CPU), ``bf16-recurrent``/``fp16-recurrent`` (the other
  kernel, as eager attention is to sdpa);
- **faults**, planted in layer :data:`LAYER`'s linear attention of a bf16 (or fp16) target:
  ``state-bf16`` (the delta rule keeps its recurrent state in bf16 between tokens: the
  recurrent form, its state rounded to bf16 before each token's update, as a kernel whose
  state buffer is bf16), ``gate-lowprec`` (the decay gate ``g = -exp(A_log) softplus(a +
  dt_bias)`` computed in bf16 from bf16 operands, where transformers computes it in fp32).

A case may run the **long-memory** variant (``memory``): layer :data:`LAYER`'s heads set to
decay by :data:`LONG_MEMORY` per token (the fixture's decay at most 0.98: it forgets within
about 50 tokens), base, reference and target alike; and one prompt of ``tokens`` tokens of
the corpus instead of the batch (:func:`sweep`: the faults' error against the prompt's
length, in bf16); and the **wide-head** variant (``wide``, :func:`wide_model`): the
fixture's config with the real Qwen3.5's 128-dimensional linear-attention keys and values
(:data:`WIDE_HEADS`), seeded weights built in memory, the fixture's tokenizer.

    python scripts/hybrid_cases.py          (prints one JSON line per case)
    python scripts/hybrid_cases.py --sweep  (one per fault, heads, memory and prompt length)
    python scripts/hybrid_cases.py --steps  (the state carried over decoding steps)
    python scripts/hybrid_cases.py --rule   (a bf16 state in the delta rule alone)
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import precision
from precision.dumps import reference_path
from precision.runtime.models.hybrid import DELTA_CHILD, FORMS, instrument

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import SEED, draw_decays

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "fixtures" / "tiny-qwen3.5"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LAYER = 1
#: the prompts: two short ones and a long one (the corpus's first :data:`LONG` lines)
LONG = 12
PROMPTS = [
    "translate English to German: The house is wonderful.",
    " ".join((ROOT / "fixtures" / "corpus.txt").read_text(encoding="utf-8").splitlines()[:LONG]),
    "summarize: rain",
]
HEALTHY = ("fp32-recurrent", "bf16-chunked", "bf16-recurrent", "fp16-chunked",
           "fp16-recurrent")
FAULTS = ("state-bf16", "gate-lowprec")
#: the long-memory variant's decay per token (at ``a = 0``) of layer :data:`LAYER`'s heads:
#: a long memory (``0.999 ** 1000`` is 0.37) whose decay bf16 cannot hold (it rounds to 1)
LONG_MEMORY = 0.999
#: the prompt lengths :func:`sweep` measures
SWEEP_TOKENS = (299, 1024, 4096)
#: the wide-head variant's linear attention: Qwen3.5's 128-dimensional keys and values (as
#: Qwen3.5-0.8B's 16 key and 16 value heads have), in one key head and two value heads
WIDE_HEADS = {"linear_num_key_heads": 1, "linear_num_value_heads": 2,
              "linear_key_head_dim": 128, "linear_value_head_dim": 128}
#: the prompt length ``main`` runs the wide-head long-memory variant at: a bf16 state shows
#: there (:func:`sweep`: not at 299 tokens, from 1024 on)
WIDE_TOKENS = 1024


@dataclass(frozen=True)
class Case:
    """A ``target`` run (``bf16-recurrent``...) with ``fault`` planted in layer ``LAYER``."""

    target: str
    fault: str = ""
    #: layer :data:`LAYER`'s heads decay by :data:`LONG_MEMORY` per token
    memory: bool = False
    #: one prompt of this many corpus tokens (0: the batch of :data:`PROMPTS`)
    tokens: int = 0
    #: the wide-head variant (:func:`wide_model`): 128-dimensional keys and values
    wide: bool = False

    @property
    def name(self) -> str:
        return self.target + (f"-{self.fault}" if self.fault else "") + self.variant

    @property
    def variant(self) -> str:
        """What base, reference and target share: ``-wide-heads``, ``-long-memory``,
        ``-4096-tokens``."""
        return ("-wide-heads" if self.wide else "") + (
            "-long-memory" if self.memory else "") + (
            f"-{self.tokens}-tokens" if self.tokens else "")

    @property
    def dtype(self) -> str:
        return self.target.split("-")[0]

    @property
    def form(self) -> str | None:
        form = self.target.split("-")[1] if "-" in self.target else None
        return form if form in FORMS else None


def load(dtype: str, form: str | None = None, memory: bool = False, tokens: int = 0,
         wide: bool = False) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The fixture (its wide-head variant where ``wide``) in ``dtype``, its delta rule in
    ``form`` (layer :data:`LAYER`'s memory long where ``memory``), and the left-padded
    prompts (or one of ``tokens`` tokens)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    tok = transformers.AutoTokenizer.from_pretrained(FIXTURE)
    tok.padding_side = "left"
    if tokens:
        corpus = (ROOT / "fixtures" / "corpus.txt").read_text(encoding="utf-8").split("\n")
        ids = []
        while len(ids) < tokens:
            ids += tok(" ".join(corpus))["input_ids"]
        inputs = {"input_ids": torch.tensor([ids[:tokens]]),
                  "attention_mask": torch.ones(1, tokens, dtype=torch.long)}
    else:
        inputs = dict(tok(PROMPTS, return_tensors="pt", padding=True))
    if wide:
        model = wide_model().to(DTYPES[dtype])
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(FIXTURE,
                                                                  dtype=DTYPES[dtype]).eval()
    if memory:
        long_memory(model)
    instrument(model, form)
    return model, inputs


def wide_model() -> nn.Module:
    """The wide-head variant in fp32: the fixture's config with :data:`WIDE_HEADS`, weights
    drawn as scripts/make_fixtures.py draws the fixture's (transformers' initialisation after
    ``torch.manual_seed``, each linear-attention layer's ``dt_bias`` so that ``dt`` is
    log-uniform in ``make_fixtures.QWEN35_DT``), built in memory; it reads the fixture's
    tokenizer."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(FIXTURE)
    for name, value in WIDE_HEADS.items():
        setattr(config, name, value)
    torch.manual_seed(SEED)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    draw_decays(model)
    return model.eval()


def long_memory(model: nn.Module, decay: float = LONG_MEMORY, layer: int = LAYER) -> None:
    """Set layer ``layer``'s ``dt_bias`` so that each head decays by ``decay`` per token at
    ``a = 0``: ``exp(-exp(A_log) softplus(dt_bias)) = decay``, ``softplus^-1(x) = x +
    log(1 - exp(-x))``."""
    attn = model.model.layers[layer].linear_attn
    with torch.no_grad():
        dt = -math.log(decay) / attn.A_log.float().exp()
        attn.dt_bias.copy_((dt + torch.log(-torch.expm1(-dt))).to(attn.dt_bias.dtype))


def state_in_bf16(recurrent: Callable[..., Any]) -> Callable[..., Any]:
    """A delta rule that holds its recurrent state in bf16: transformers' recurrent form one
    token at a time, the state rounded to bf16 before each token's update."""

    def rule(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, g: torch.Tensor,
             beta: torch.Tensor, initial_state: torch.Tensor | None = None,
             output_final_state: bool = False, **kwargs: Any) -> Any:
        kwargs.pop("chunk_size", None)
        state, outs = initial_state, []
        for t in range(query.shape[1]):
            held = None if state is None else state.to(torch.bfloat16)
            out, state = recurrent(query[:, t:t + 1], key[:, t:t + 1], value[:, t:t + 1],
                                   g=g[:, t:t + 1], beta=beta[:, t:t + 1], initial_state=held,
                                   output_final_state=True, **kwargs)
            outs.append(out)
        final = None if state is None else state.to(torch.bfloat16).float()
        return torch.cat(outs, dim=1), final if output_final_state else None

    return rule


def plant(model: nn.Module, fault: str, layer: int = LAYER) -> list[Any]:
    """Plant ``fault`` in layer ``layer``'s linear attention; returns the hook handles."""
    attn = model.model.layers[layer].linear_attn
    child = getattr(attn, DELTA_CHILD)
    if fault == "state-bf16":
        code = sys.modules[type(attn).__module__]
        recurrent = code._precision_originals[FORMS["recurrent"]]

        def swap(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            return (state_in_bf16(recurrent), *args[1:]), kwargs

        return [child.register_forward_pre_hook(swap, with_kwargs=True)]
    if fault == "gate-lowprec":
        seen: dict[str, torch.Tensor] = {}

        def keep_a(_m: nn.Module, _args: Any, out: torch.Tensor) -> None:
            seen["a"] = out

        def low_gate(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            low = torch.bfloat16
            a = seen["a"].to(low)
            g = -attn.A_log.to(low).exp() * F.softplus(a + attn.dt_bias.to(low))
            return args, kwargs | {"g": g.exp().log().float()}

        return [attn.in_proj_a.register_forward_hook(keep_a),
                child.register_forward_pre_hook(low_gate, with_kwargs=True)]
    raise ValueError(f"unknown fault {fault!r}")


def capture(dtype: str, path: Path, form: str | None = None, fault: str = "",
            level: str = "modules", memory: bool = False, tokens: int = 0,
            wide: bool = False) -> Path:
    """One forward of the fixture in ``dtype`` (cache on), recorded at ``path``."""
    model, inputs = load(dtype, form, memory, tokens, wide)
    handles = plant(model, fault) if fault else []
    with torch.no_grad(), precision.capture(model, path, force=True, level=level):
        model(**inputs, use_cache=True)
    for h in handles:
        h.remove()
    return path


def base_of(work: Path, level: str = "modules", case: Case = Case("fp32")) -> Path:
    """The fp32 baseline (the model's own delta rule), captured once per folder, level and
    ``case``'s variant (wide heads, long memory, prompt length)."""
    base = work / f"base{case.variant}-{level}.st"
    if not base.exists():
        capture("fp32", base, level=level, memory=case.memory, tokens=case.tokens,
                wide=case.wide)
    return base


def run(case: Case, work: Path, level: str = "modules") -> precision.Report:
    """Capture ``case``'s target under ``work`` and compare it with the baseline (and, for a
    low precision, the reference: the same inputs in that precision, the model's own form)."""
    base = base_of(work, level, case)
    if case.dtype != "fp32":
        ref = reference_path(base, case.dtype)
        if not ref.exists():
            capture(case.dtype, ref, level=level, memory=case.memory, tokens=case.tokens,
                    wide=case.wide)
    target = capture(case.dtype, work / f"{case.name}-{level}.st", case.form, case.fault,
                     level, case.memory, case.tokens, case.wide)
    return precision.compare(base, target, jobs=1)


def summarise(report: precision.Report) -> dict[str, Any]:
    """The verdict, the first divergence and why, and the flagged rows' keys."""
    first = report.first_divergence
    return {"summary": report.summary.split(";")[0], "flagged": len(report.flagged),
            "first": first.key if first else None, "why": first.reason if first else None}


def against_reference(report: precision.Report, dtype: str,
                      keys: tuple[str, ...]) -> dict[str, float]:
    """Each of ``keys``' element-scaled rms error over the ``dtype`` reference's (the ratio
    the reference rules hold to ``REF_RMS_RATIO``): ``noise_rms(target) /
    noise_rms(reference)`` against the same baseline."""
    base = Path(report.base)
    ref = precision.compare(base, reference_path(base, dtype), jobs=1)
    ours = {r.key: r.metrics.noise_rms for r in report.rows if r.metrics}
    theirs = {r.key: r.metrics.noise_rms for r in ref.rows if r.metrics}
    return {k: round(ours[k] / theirs[k], 2) for k in keys}


#: the records :func:`sweep` reports: the planted layer's delta rule
SWEPT = tuple(f"model.layers.{LAYER}.linear_attn.delta_rule:out.{i}" for i in ("state",
                                                                                "output"))


def sweep(work: Path) -> None:
    """bf16 faults against the prompt's length, in the fixture and the wide-head variant,
    each with and without long memory: the verdict, the first divergence and the planted
    layer's state and output error over the reference's."""
    for wide in (False, True):
        for memory in (False, True):
            for tokens in SWEEP_TOKENS:
                for fault in FAULTS:
                    case = Case("bf16", fault, memory, tokens, wide)
                    report = run(case, work)
                    ratios = against_reference(report, case.dtype, SWEPT)
                    first = report.first_divergence
                    print(json.dumps({"case": case.name,
                                      "verdict": report.summary.split(":")[0],
                                      "first": first.key if first else None,
                                      "state": ratios[SWEPT[0]],
                                      "output": ratios[SWEPT[1]]}), flush=True)


def steps(work: Path, prompt: int = 299, n: int = 64) -> None:
    """bf16 faults over ``n`` decoding steps after a ``prompt``-token prompt, teacher-forced
    as ``--replay`` feeds them (one-token forwards with the cache): the planted layer's
    state at steps 0 (the prompt's), 1, ``n // 2`` and ``n`` over the reference's."""
    state = SWEPT[0]

    def capture_steps(dtype: str, path: Path, fault: str, memory: bool) -> Path:
        model, inputs = load(dtype, memory=memory, tokens=prompt + n)
        ids = inputs["input_ids"]
        handles = plant(model, fault) if fault else []
        with torch.no_grad(), precision.capture(model, path, force=True,
                                                include=[state.split(":")[0]]):
            cache = model(input_ids=ids[:, :prompt], use_cache=True).past_key_values
            for t in range(prompt, prompt + n):
                cache = model(input_ids=ids[:, t:t + 1], past_key_values=cache,
                              use_cache=True).past_key_values
        for h in handles:
            h.remove()
        return path

    picks = [state] + [f"{state}#{i}" for i in (1, n // 2, n)]
    for memory in (False, True):
        case = Case("bf16", memory=memory)
        base = capture_steps("fp32", work / f"steps-base{case.variant}.st", "", memory)
        capture_steps("bf16", reference_path(base, "bf16"), "", memory)
        for fault in FAULTS:
            target = work / f"steps-{fault}{case.variant}.st"
            report = precision.compare(base, capture_steps("bf16", target, fault, memory),
                                       jobs=1)
            print(json.dumps({"case": Case("bf16", fault, memory).name,
                              "verdict": report.summary.split(":")[0]}
                             | {k.split(":")[1]: v for k, v in
                                against_reference(report, "bf16", tuple(picks)).items()}),
                  flush=True)


def rule_alone(heads: int = 2, v_dim: int = 16) -> None:
    """A bf16 state in the delta rule alone, outside the model: random unit keys and
    queries, normal values, ``beta = sigmoid(normal)``, a constant decay; the inputs rounded
    to bf16 (the reference: chunked form in fp32 on them) or also the state before every
    token (the fault); relative rms error ``||x - x32|| / ||x32||`` in bf16 eps, over the
    fp32 run on the unrounded inputs, the fault's over the reference's."""
    code = sys.modules[type(load("fp32")[0].model.layers[0].linear_attn).__module__]
    chunk, recurrent = (code._precision_originals[FORMS[f]] for f in ("chunked", "recurrent"))
    torch.manual_seed(0)

    def err(x: torch.Tensor, ref: torch.Tensor) -> float:
        return float((x.float() - ref).norm() / ref.norm()) / 2 ** -8

    for k_dim in (16, 128):
        for decay in (0.98, 0.999):
            for n in (299, 2048):
                q, k = (F.normalize(torch.randn(1, n, heads, k_dim), dim=-1) for _ in "qk")
                v, beta = torch.randn(1, n, heads, v_dim), torch.randn(1, n, heads).sigmoid()
                g = torch.full((1, n, heads), math.log(decay))
                low = [x.bfloat16() for x in (q, k, v, beta)]
                kw: dict[str, Any] = {"output_final_state": True,
                                      "use_qk_l2norm_in_kernel": False}
                o32, s32 = chunk(q, k, v, g=g, beta=beta, **kw)
                o_ref, s_ref = chunk(*low[:3], g=g, beta=low[3], **kw)
                o_bad, s_bad = state_in_bf16(recurrent)(*low[:3], g=g, beta=low[3], **kw)
                print(json.dumps({"k_dim": k_dim, "decay": decay, "tokens": n,
                                  "state": round(err(s_bad, s32) / err(s_ref, s32), 2),
                                  "output": round(err(o_bad, o32) / err(o_ref, o32), 2)}),
                      flush=True)


def cases() -> list[Case]:
    """The cases ``main`` runs: the healthy pairs, the faults in bf16 and fp16; the long-
    memory variant's healthy low-precision pairs and bf16 faults; the same on the wide-head
    long-memory variant over one prompt of :data:`WIDE_TOKENS` tokens, its faults in fp16
    too."""
    return ([Case(t) for t in HEALTHY] + [Case(d, f) for d in ("bf16", "fp16") for f in FAULTS]
            + [Case(t, memory=True) for t in HEALTHY if not t.startswith("fp32")]
            + [Case("bf16", f, memory=True) for f in FAULTS]
            + [wide_case(t) for t in HEALTHY]
            + [wide_case(d, f) for d in ("bf16", "fp16") for f in FAULTS])


def wide_case(target: str, fault: str = "") -> Case:
    """``target`` (with ``fault``) on the wide-head long-memory variant, one prompt of
    :data:`WIDE_TOKENS` tokens."""
    return Case(target, fault, memory=True, tokens=WIDE_TOKENS, wide=True)


def main() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "--sweep" in sys.argv[1:]:
            sweep(work)
            return
        if "--steps" in sys.argv[1:]:
            steps(work)
            return
        if "--rule" in sys.argv[1:]:
            rule_alone()
            return
        for case in cases():
            print(json.dumps({"case": case.name} | summarise(run(case, work))), flush=True)


if __name__ == "__main__":
    main()

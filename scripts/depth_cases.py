"""Real deep decoders: healthy runs against a same-precision reference, and faults at depth.

The models come from ``$PRECISION_REAL_MODELS`` (scripts/get_real_models.py):
``smollm2-135m`` (SmolLM2-135M-Instruct, Llama architecture, 30 layers) and ``gemma3-270m``
(Gemma 3 270M, 18 layers). Every run reads the same left-padded batch of prompts of
different lengths, as ``precision capture`` feeds a decoder.

- **base**: fp32 with PyTorch's sdpa attention;
- **reference**: the target's precision (bf16 or fp16), sdpa, nothing else changed: what
  that precision costs on this model, record by record (``capture --expect``);
- **healthy targets**: ``bf16-eager``/``fp16-eager`` (another attention kernel),
  ``bf16-fp32acc`` (every Linear accumulated in fp32 and rounded once, as a device kernel
  with a wider accumulator does), ``fp32-eager`` (fp32, another attention kernel), ``tf32``
  (every Linear's inputs and weights rounded to TF32's 10 bits, judged by the tf32 profile);
- **faults**, planted in one block on top of the bf16 (or fp16) target, each a kernel
  that skips a step a correct one takes: ``norm-lowprec`` (the block's input RMSNorm sums
  its squares in the low precision, one addition at a time, instead of in fp32),
  ``rotary-lowprec`` (the block's rotary angles from positions held in the low precision:
  the batch continues a cached prefix at position ``POSITION0``, where bf16 holds only
  even integers; Llama only), ``linear-truncate`` (the block's MLP down projection adds
  its partial sums, 32 products each, in the low precision, truncating instead of
  rounding), ``drift:F`` (noise of F times the rms of the ordinary channels added to the
  block's output, the massive channels left alone), ``mlp-noise:F`` (relative noise of
  F on each element of the block's MLP output, a new tensor where a capture of a healthy
  run stores the MLP's output as an alias of ``down_proj``'s).

    python scripts/depth_cases.py [MODEL ...]      (prints one JSON line per case)
    python scripts/depth_cases.py --whole-mlp [MODEL ...]   (mlp-noise:0.08 at block 2 only)
"""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from get_real_models import default_dest  # scripts/ is on the path
from torch import nn
from torch.nn import functional as F
from verdict_cases import linear_in

import precision
from precision.dumps import reference_path

ROOT = Path(__file__).resolve().parents[1]
REAL_MODELS = default_dest()
DEEP = ("smollm2-135m", "gemma3-270m")
PROMPTS = ["The capital of France is",
           "Write a short poem about the sea, the wind and the sailors who cross it.",
           "2 + 2 =",
           "Explain in one sentence why the sky looks blue during the day but red at sunset."]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: every run's first position: the batch continues a cached prefix of this many tokens
POSITION0 = 300


def available(names: tuple[str, ...] = DEEP) -> tuple[str, ...]:
    return tuple(n for n in names if (REAL_MODELS / n / "config.json").is_file())


def load(name: str, dtype: str, attn: str = "sdpa") -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The model in ``dtype`` with attention ``attn``, and the left-padded prompts."""
    import transformers

    transformers.logging.set_verbosity_error()
    folder = REAL_MODELS / name
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    inputs = dict(tok(PROMPTS, return_tensors="pt", padding=True))
    seq = inputs["input_ids"].shape[1]
    inputs["position_ids"] = torch.arange(POSITION0, POSITION0 + seq).expand(len(PROMPTS), -1)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=DTYPES[dtype], attn_implementation=attn).eval()
    return model, inputs


def layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers  # type: ignore[no-any-return]


@contextlib.contextmanager
def linear_fp32_accumulate() -> Iterator[None]:
    """Every nn.Linear computes in fp32 and rounds its result once to its own dtype."""
    original = nn.Linear.forward

    def forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)

    nn.Linear.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Linear.forward = original  # type: ignore[method-assign]


def _truncate(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 ``x`` to ``dtype`` rounded toward zero (dropping the bits below its mantissa)."""
    if dtype == torch.bfloat16:
        bits = x.float().contiguous().view(torch.int32)
        return ((bits >> 16) << 16).view(torch.float32).to(dtype)
    rounded = x.to(dtype)  # fp16: step back one ulp where rounding went away from zero
    up = rounded.float().abs() > x.float().abs()
    return torch.where(up, torch.nextafter(rounded, torch.zeros_like(rounded)), rounded)


def _sum_low(terms: torch.Tensor, add: Any) -> torch.Tensor:
    """Sum the last axis one term at a time, each partial sum through ``add``."""
    total = terms[..., 0]
    for i in range(1, terms.shape[-1]):
        total = add(total, terms[..., i])
    return total


def plant(model: nn.Module, fault: str, block: int) -> list[Any]:
    """Plant ``fault`` in layer ``block``; returns the hook handles to remove."""
    layer = layers(model)[block]
    if fault == "norm-lowprec":
        norm = layer.input_layernorm
        gemma = "Gemma" in type(norm).__name__

        def low(_m: nn.Module, args: tuple[torch.Tensor, ...], _out: Any) -> torch.Tensor:
            x = args[0]
            eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
            squares = x.pow(2)
            var = _sum_low(squares, lambda s, t: (s + t).to(x.dtype)) / x.shape[-1]
            normed = x * torch.rsqrt(var[..., None] + eps)
            return normed * (1.0 + norm.weight) if gemma else norm.weight * normed

        return [norm.register_forward_hook(low)]
    if fault == "rotary-lowprec":
        rotary = model.model.rotary_emb

        def angles(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            cos, _sin = kwargs["position_embeddings"]
            dtype = cos.dtype
            seq = cos.shape[-2]
            pos = torch.arange(POSITION0, POSITION0 + seq).to(dtype).float()  # held in dtype
            freqs = pos[:, None] * rotary.inv_freq.float()[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            new = ((emb.cos() * rotary.attention_scaling).to(dtype)[None].expand_as(cos),
                   (emb.sin() * rotary.attention_scaling).to(dtype)[None].expand_as(cos))
            return args, kwargs | {"position_embeddings": new}

        return [layer.self_attn.register_forward_pre_hook(angles, with_kwargs=True)]
    if fault == "linear-truncate":
        down = layer.mlp.down_proj

        def trunc(m: nn.Module, args: tuple[torch.Tensor, ...], _out: Any) -> torch.Tensor:
            x = args[0]
            k = x.shape[-1] // 32 * 32
            parts = torch.einsum("...gk,ngk->...ng", x[..., :k].float().unflatten(-1, (-1, 32)),
                                 m.weight[:, :k].float().unflatten(-1, (-1, 32)))
            total = _sum_low(parts, lambda s, t: _truncate(s.float() + t.float(), x.dtype))
            rest = F.linear(x[..., k:].float(), m.weight[:, k:].float())
            return _truncate(total.float() + rest, x.dtype)

        return [down.register_forward_hook(trunc)]
    if fault.startswith("grad-drift:"):
        fraction = float(fault.split(":")[1])
        gen = torch.Generator().manual_seed(11)

        def noisy(_m: nn.Module, grad_input: Any, _grad_output: Any) -> Any:
            g = grad_input[0]
            scale = g.float().pow(2).mean().sqrt()
            moved = g + (torch.randn(g.shape, generator=gen) * fraction * scale).to(g.dtype)
            return (moved, *grad_input[1:])

        return [layer.register_full_backward_hook(noisy)]
    if fault.startswith("drift:"):
        return [drift(layer, float(fault.split(":")[1]))]
    if fault.startswith("mlp-noise:"):
        return [mlp_noise(layer.mlp, float(fault.split(":")[1]))]
    raise ValueError(f"unknown fault {fault!r}")


def drift(layer: nn.Module, fraction: float) -> Any:
    """Noise of ``fraction`` times the rms of the ordinary channels added to ``layer``'s
    output (``(batch, seq, channels)``, or the first of a tuple), the massive channels left
    alone; returns the hook's handle."""
    gen = torch.Generator().manual_seed(7)

    def hook(_m: nn.Module, _args: Any, out: Any) -> Any:
        h = out[0] if isinstance(out, tuple) else out
        x = h.float()
        width = x.abs().amax(dim=(0, 1))
        ordinary = width <= 8 * width.median()  # the massive channels are left alone
        scale = x[..., ordinary].pow(2).mean().sqrt()
        noise = torch.randn(x.shape, generator=gen) * fraction * scale * ordinary
        moved = (x + noise).to(h.dtype)
        return (moved, *out[1:]) if isinstance(out, tuple) else moved

    return layer.register_forward_hook(hook)


def mlp_noise(mlp: nn.Module, fraction: float) -> Any:
    """Relative noise of ``fraction`` on each element of ``mlp``'s output (``x (1 + F n)``,
    ``n`` standard normal), as a new tensor: a fused or faulty kernel for the whole MLP.
    Healthy, the MLP returns its ``down_proj``'s tensor, which a capture stores once (the
    MLP's record an alias of it); here ``down_proj``'s output stays healthy and the MLP's
    is a tensor of its own. Returns the hook's handle."""
    gen = torch.Generator().manual_seed(5)

    def hook(_m: nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(out.shape, generator=gen)
        return (out.float() * (1 + fraction * noise)).to(out.dtype)

    return mlp.register_forward_hook(hook)


@dataclass(frozen=True)
class Case:
    """``model``'s ``target`` run (``bf16-eager``, ...), with ``fault`` planted at ``block``."""

    model: str
    target: str
    fault: str = ""
    block: int = 0
    #: ``full`` or ``stats`` (every run of the case: base, reference and target)
    mode: str = "full"
    #: one training step (next-token loss over real tokens, backward) instead of a forward
    backward: bool = False

    @property
    def name(self) -> str:
        return (f"{self.model}-{self.target}" + (f"-{self.fault}@{self.block}" if self.fault
                                                 else "")
                + ("-stats" if self.mode == "stats" else "")
                + ("-step" if self.backward else ""))

    @property
    def dtype(self) -> str:
        return self.target.split("-")[0]


def _capture(name: str, dtype: str, attn: str, path: Path, *, fault: str = "",
             block: int = 0, fp32acc: bool = False, mode: str = "full",
             backward: bool = False) -> Path:
    model, inputs = load(name, "fp32" if dtype == "tf32" else dtype, attn)
    handles = plant(model, fault, block) if fault else []
    ctx = (linear_fp32_accumulate() if fp32acc else linear_in("tf32") if dtype == "tf32"
           else contextlib.nullcontext())
    with ctx, warnings.catch_warnings(), precision.capture(model, path, force=True, mode=mode,
                                                          backward=backward) as cap:
        warnings.filterwarnings("ignore", message=".*backward hook.*")
        if not backward:
            with torch.no_grad():
                model(**inputs)
        else:
            logits = model(**inputs).logits
            ids, mask = inputs["input_ids"], inputs["attention_mask"]
            targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                            targets.reshape(-1)).backward()
            cap.add_parameter_grads()
    for h in handles:
        h.remove()
    return path


def base_of(model: str, work: Path, mode: str = "full", backward: bool = False) -> Path:
    """The fp32 baseline (sdpa), captured once per ``work`` folder, mode and kind of run."""
    base = work / (f"{model}-fp32{'-stats' if mode == 'stats' else ''}"
                   f"{'-step' if backward else ''}.st")
    if not base.exists():
        _capture(model, "fp32", "sdpa", base, mode=mode, backward=backward)
    return base


def reference_of(model: str, dtype: str, work: Path, mode: str = "full",
                 backward: bool = False) -> Path:
    """The baseline's same-precision reference, where ``compare`` finds it by itself."""
    ref = reference_path(base_of(model, work, mode, backward), dtype)
    if not ref.exists():
        _capture(model, dtype, "sdpa", ref, mode=mode, backward=backward)
    return ref


def run(case: Case, work: Path, *, reference: bool = True) -> precision.Report:
    """Capture ``case``'s target under ``work`` and compare it with the baseline (and, for
    a low-precision target, the reference unless ``reference`` is False)."""
    base = base_of(case.model, work, case.mode, case.backward)
    if case.dtype not in ("fp32", "tf32") and reference:
        reference_of(case.model, case.dtype, work, case.mode, case.backward)
    target = work / f"{case.name}.st"
    attn = "eager" if case.target.endswith("eager") else "sdpa"
    _capture(case.model, case.dtype, attn, target, fault=case.fault, block=case.block,
             fp32acc=case.target.endswith("fp32acc"), mode=case.mode, backward=case.backward)
    return precision.compare(base, target, jobs=1, auto_reference=reference,
                             profile="tf32" if case.dtype == "tf32" else None)


HEALTHY = ("bf16-eager", "bf16-fp32acc", "fp16-eager", "fp32-eager", "tf32")
FAULTS = ("norm-lowprec", "rotary-lowprec", "linear-truncate", "drift:0.25")


def healthy_cases(model: str) -> list[Case]:
    """Gemma 3 overflows fp16 (its residual stream passes 65504 at layer 7): no healthy fp16."""
    return [Case(model, t) for t in HEALTHY if not (model.startswith("gemma") and "fp16" in t)]


def fault_cases(model: str, blocks: tuple[int, ...] = (2, 20)) -> list[Case]:
    depth = 30 if model.startswith("smollm") else 18
    out = []
    for block in blocks:
        for fault in FAULTS:
            if fault == "rotary-lowprec" and model.startswith("gemma"):
                continue  # Gemma's local and global rotary embeddings: not planted here
            out.append(Case(model, "bf16-eager", fault, min(block, depth - 4)))
    return out


def ratios(report: precision.Report, reference: precision.Report) -> dict[str, list[float]]:
    """Per record, the target's element-scaled error (rms and max) over the reference's, as
    the reference rules compute them (floors included, a key the baseline and the
    reference alias measured as the record it aliases); in stats mode the count-sketch
    error estimates' ratio (``sketch``); for the logits, the mean KL's ratio (``kl``)."""
    from precision.judge.lineup.align import shared_aliases
    from precision.judge.profiles import (
        REF_FLOOR_MAX_EPS,
        REF_FLOOR_RMS_EPS,
        REF_MAX_RATIO,
        REF_RMS_RATIO,
        REF_SKETCH_RATIO,
    )

    eps = report.profile.eps
    ref = {r.key: r for r in reference.rows}
    # keys the baseline and the reference both alias: the record they alias (as compare)
    for key, record in shared_aliases(precision.load(reference.base),
                                      precision.load(reference.target)).items():
        if record in ref:
            ref.setdefault(key, ref[record])
    out: dict[str, list[float]] = {"rms": [], "max": [], "sketch": [], "kl": []}
    for r in report.rows:
        other = ref.get(r.key)
        if other is None:
            continue
        if r.logits is not None and other.logits is not None and other.logits.kl_mean > 0:
            out["kl"].append(r.logits.kl_mean / other.logits.kl_mean)
        m, rm = r.metrics, other.metrics
        if m is not None and rm is not None and m.max_abs > report.profile.atol:
            out["rms"].append(m.noise_rms / max(rm.noise_rms,
                                                REF_FLOOR_RMS_EPS * eps / REF_RMS_RATIO))
            out["max"].append(m.noise_max / max(rm.noise_max,
                                                REF_FLOOR_MAX_EPS * eps / REF_MAX_RATIO))
        d, rd = r.stats_delta, other.stats_delta
        if d and rd and d.sketch_gap is not None and rd.sketch_gap is not None:
            floor = eps / 4 * d.norm_base / REF_SKETCH_RATIO
            out["sketch"].append(d.sketch_gap / max(rd.sketch_gap, floor, 1e-300))
    return out


def summarise(report: precision.Report, reference: precision.Report | None = None
              ) -> dict[str, Any]:
    """Flagged rows, the first divergence, the worst noise, and the worst ratios to the
    reference (``reference``: the baseline against it)."""
    eps = report.profile.eps
    rows = [r for r in report.rows if r.metrics is not None]
    out = {"summary": report.summary.split(";")[0], "flagged": len(report.flagged),
           "first": report.first_divergence.key if report.first_divergence else None,
           "worst_noise_rms_eps": round(max((r.metrics.noise_rms / eps for r in rows
                                             if r.metrics), default=0.0), 2)}
    if reference is not None:
        rs = ratios(report, reference)
        out |= {f"max_ratio_{k}": round(max(v), 3) for k, v in rs.items() if v}
    return out


DRIFTS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32)


def smallest_drift(model: str, dtype: str, block: int, work: Path, mode: str = "full"
                   ) -> float | None:
    """The smallest ordinary-channel drift (fraction of their rms) found first where planted."""
    for f in DRIFTS:
        rep = run(Case(model, f"{dtype}-eager", f"drift:{f}", block, mode), work)
        first = rep.first_divergence
        if first is not None and first.key.startswith(f"model.layers.{block}"):
            return f
    return None


def whole_mlp(model: str, work: Path, fraction: float = 0.08, block: int = 2
              ) -> Iterator[dict[str, Any]]:
    """``mlp-noise`` at ``block``, per mode: the MLP's row (a new tensor in the target, an
    alias of ``down_proj``'s in the baseline and the reference) judged against the
    reference and by the fixed limits alone, and each report's first divergence."""
    key = f"model.layers.{block}.mlp:out"
    for mode in ("full", "stats"):
        case = Case(model, "bf16-eager", f"mlp-noise:{fraction}", block, mode)
        rep = run(case, work)
        fixed = precision.compare(base_of(model, work, mode), work / f"{case.name}.st",
                                  auto_reference=False, jobs=1)
        out: dict[str, Any] = {"case": case.name}
        for name, r in (("reference", rep), ("fixed", fixed)):
            row = next(x for x in r.rows if x.key == key)
            m = row.metrics
            out[name] = {"first": r.first_divergence.key if r.first_divergence else None,
                         "status": row.status, "reason": row.reason} | (
                {"rel_l2": round(m.rel_l2, 4), "growth": round(row.growth or 0.0, 1),
                 "noise_rms_eps": round(m.noise_rms / r.profile.eps, 2)} if m else {})
        yield out


def main() -> None:
    import tempfile

    mlp = sys.argv[1:2] == ["--whole-mlp"]
    models = available(tuple(sys.argv[1 + mlp:]) or DEEP)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for m in models if mlp else ():
            for line in whole_mlp(m, work):
                print(json.dumps(line), flush=True)
        for m in () if mlp else models:
            stats = [Case(c.model, c.target, c.fault, c.block, "stats")
                     for c in healthy_cases(m) + fault_cases(m) if c.dtype not in ("fp32", "tf32")]
            for case in healthy_cases(m) + fault_cases(m) + stats:
                rep = run(case, work)
                ref = (precision.compare(base_of(m, work, case.mode),
                                         reference_of(m, case.dtype, work, case.mode),
                                         auto_reference=False, jobs=1)
                       if case.dtype not in ("fp32", "tf32") else None)
                print(json.dumps({"case": case.name} | summarise(rep, ref)), flush=True)
            deep = 20 if m.startswith("smollm") else 14
            for mode in ("full", "stats"):
                for dtype in ("bf16", "fp16") if m.startswith("smollm") else ("bf16",):
                    found = {b: smallest_drift(m, dtype, b, work, mode) for b in (2, deep)}
                    print(json.dumps({"case": f"{m}-{dtype}-{mode}-smallest-drift",
                                      "by_block": found}), flush=True)
    if not models:
        print(f"no deep model in {REAL_MODELS}: run scripts/get_real_models.py", file=sys.stderr)


if __name__ == "__main__":
    main()

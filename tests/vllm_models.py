"""Tiny seeded decoders of the families precision lines up with vLLM (tests/test_vllm.py).

Each has the tiny fixtures' shape (width 64, 4 query / 2 KV heads) with head_dim 32 (vLLM's
CPU attention takes 32 and up; Qwen2 width 128, as vLLM reads its head size as width / heads),
four layers, the fixtures' tokenizer, and its family's own
features: Qwen2's q/k/v biases, Qwen3's per-head q/k norms, Mistral's sliding-window
config, Gemma 3's (1 + weight) norms, GELU-tanh MLP, scaled embedding, pre/post feedforward
norms, q/k norms and sliding-window layers narrower than the prompts.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma3")


def _shape() -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import make_fixtures as mf
    finally:
        sys.path.pop(0)
    return mf.decoder_shape(num_hidden_layers=4) | {"head_dim": 32}


def build(family: str, out: Path) -> Path:
    """Save a seeded tiny ``family`` model (and the fixtures' tokenizer) in ``out``."""
    import torch
    import transformers as tf

    shape = _shape()
    if family == "gemma3":
        # query_pre_attn_scalar: Gemma scales scores by it (the head size in Gemma 3 1B)
        config: Any = tf.Gemma3TextConfig(
            **shape, query_pre_attn_scalar=32, sliding_window=4,
            layer_types=["sliding_attention", "full_attention"] * 2,
            hidden_activation="gelu_pytorch_tanh")
        config.architectures = ["Gemma3ForCausalLM"]
        cls: Any = tf.Gemma3ForCausalLM
    else:
        # vLLM's Qwen2 takes head_dim = hidden_size / heads (its config's head_dim unread)
        extra = {"qwen2": {"use_sliding_window": False, "hidden_size": 128,
                           "intermediate_size": 256},
                 "mistral": {"sliding_window": None}}.get(family, {})
        config, cls = {
            "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
            "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
            "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
            "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        }[family]
        config = config(**(shape | extra))
    torch.manual_seed(0)
    model = cls(config).float().eval()
    with torch.no_grad():  # what starts at zero (Gemma's 1 + weight norms, Qwen2's q/k/v
        for name, p in model.named_parameters():  # biases) drawn, so that it counts
            if (family == "gemma3" and name.endswith("norm.weight")) or name.endswith(".bias"):
                p.normal_(0.0, 0.3)
    model.save_pretrained(out)
    fixture = ROOT / "fixtures" / "tiny-llama-overflow"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(fixture / name, out / name)
    return out


if __name__ == "__main__":
    for fam in sys.argv[2:] or FAMILIES:
        print(build(fam, Path(sys.argv[1]) / fam))

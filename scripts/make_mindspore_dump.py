"""Write real msprobe dumps of one tiny Llama in PyTorch (Hugging Face) and in MindSpore
(MindFormers' layout), for tests/data/msprobe/:

- ``llama-torch-float32``: the Hugging Face ``LlamaForCausalLM`` (a seeded 2-layer config),
  forward, msprobe statistics at L0;
- ``llama-mindspore-float32``, ``llama-mindspore-float16`` (MindSpore's CPU build has no bf16
  matmul), and ``llama-mindspore-float16-fault`` (one output channel of layer 1's
  ``feed_forward.w2`` scaled by 8): the same weights in a MindSpore
  network written here in MindFormers' layout (``model.tok_embeddings``,
  ``model.layers.<i>.attention.wq``, ``feed_forward.w1``, ``attention_norm``,
  ``model.norm_out``, ``lm_head``), called through ``nn.WithLossCell`` as training code
  does (so its cells are dumped under ``_backbone.``), forward in PyNative mode on the CPU,
  msprobe statistics at L0, computed in fp32 (``precision: high``: MindSpore's CPU build
  reduces no bf16 tensor), and MindSpore's CPU build has no kernel for the norm msprobe
  takes: ``mint.norm`` is replaced by the same 2-norm from kernels it has.

Neither MindSpore nor msprobe is a dependency of precision: install them apart, e.g.::

    pip install --target /tmp/mssite --no-deps mindstudio-probe ...   (scripts/make_msprobe_dump.py)
    python3 -m venv /tmp/msvenv && /tmp/msvenv/bin/pip install mindspore pandas pyyaml \\
        einops openpyxl tqdm rich matplotlib
    PYTHONPATH=/tmp/mssite:. .venv/bin/python scripts/make_mindspore_dump.py \\
        --mindspore-python /tmp/msvenv/bin/python

The PyTorch side runs in this interpreter; the MindSpore side in ``--mindspore-python``, given
the weights as a safetensors file written by the first.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
OUT = ROOT / "tests" / "data" / "msprobe"
CONFIG = {"vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
          "tie_word_embeddings": False}
IDS = [[5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 300, 2]]


def _msprobe_config(tmp: Path, dump: Path, precision: str = "low") -> Path:
    config = tmp / "config.json"
    config.write_text(json.dumps({
        "task": "statistics", "dump_path": str(dump), "rank": [], "step": [], "level": "L0",
        "precision": precision,
        "statistics": {"scope": [], "list": [], "data_mode": ["all"],
                       "summary_mode": "statistics"}}))
    return config


def _keep(dump: Path, name: str) -> None:
    """msprobe's ``step0/<rank or proc>/`` as ``tests/data/msprobe/<name>/step0/proc0``."""
    from make_msprobe_dump import keep_dump, report_size

    found = sorted(dump.rglob("dump.json"))
    if len(found) != 1:
        sys.exit(f"expected one dump.json, found {found}")
    out = OUT / name
    shutil.rmtree(out, ignore_errors=True)
    keep_dump(found[0], out / "step0" / "proc0")
    report_size(out)


def torch_side(weights: Path) -> None:
    """The Hugging Face model: its weights saved for MindSpore, its forward dumped."""
    import torch
    from msprobe.pytorch import PrecisionDebugger
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG, attn_implementation="eager")).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    with tempfile.TemporaryDirectory() as tmp:
        debugger = PrecisionDebugger(config_path=str(_msprobe_config(Path(tmp),
                                                                     Path(tmp) / "dump")))
        debugger.start(model)
        with torch.no_grad():
            model(input_ids=torch.tensor(IDS))
        debugger.stop()
        debugger.step()
        _keep(Path(tmp) / "dump", "llama-torch-float32")


def mindspore_side(weights: Path, dtype_name: str, fault: bool = False) -> None:
    """The same Llama in MindSpore, MindFormers' names, run through ``nn.WithLossCell``;
    ``fault``: one output channel of layer 1's ``feed_forward.w2`` eight times too large."""
    import mindspore as ms
    import numpy as np
    from mindspore import mint, nn, ops

    # MindSpore's CPU build has no kernel for the norm msprobe's statistics take
    # (LinalgVectorNorm): the same 2-norm from kernels it has, set before msprobe saves the
    # functions it calls
    def norm(x: Any) -> Any:
        y = x.astype(ms.float32)
        return ops.sqrt((y * y).sum())

    mint.norm = norm
    from msprobe.mindspore import PrecisionDebugger
    from safetensors.numpy import load_file

    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_device("CPU")
    dtype = {"float32": ms.float32, "bfloat16": ms.bfloat16, "float16": ms.float16}[dtype_name]
    c = CONFIG
    heads, kv, dim = c["num_attention_heads"], c["num_key_value_heads"], c["hidden_size"]
    head_dim = dim // heads

    class RMSNorm(nn.Cell):
        def __init__(self) -> None:
            super().__init__()
            self.weight = ms.Parameter(ms.Tensor(np.ones(dim), dtype))

        def construct(self, x: Any) -> Any:
            h = x.astype(ms.float32)
            h = h * ops.rsqrt((h * h).mean(-1, keep_dims=True) + c["rms_norm_eps"])
            return self.weight * h.astype(x.dtype)

    def rotate_half(x: Any) -> Any:
        half = x.shape[-1] // 2
        return ops.cat((-x[..., half:], x[..., :half]), -1)

    class Attention(nn.Cell):
        def __init__(self) -> None:
            super().__init__()
            self.wq = nn.Dense(dim, heads * head_dim, has_bias=False, dtype=dtype)
            self.wk = nn.Dense(dim, kv * head_dim, has_bias=False, dtype=dtype)
            self.wv = nn.Dense(dim, kv * head_dim, has_bias=False, dtype=dtype)
            self.wo = nn.Dense(heads * head_dim, dim, has_bias=False, dtype=dtype)

        def construct(self, x: Any, cos: Any, sin: Any, mask: Any) -> Any:
            b, s, _ = x.shape
            q = self.wq(x).reshape(b, s, heads, head_dim).transpose(0, 2, 1, 3)
            k = self.wk(x).reshape(b, s, kv, head_dim).transpose(0, 2, 1, 3)
            v = self.wv(x).reshape(b, s, kv, head_dim).transpose(0, 2, 1, 3)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            k = ops.repeat_interleave(k, heads // kv, 1)
            v = ops.repeat_interleave(v, heads // kv, 1)
            scores = ops.matmul(q, k.transpose(0, 1, 3, 2)) * head_dim ** -0.5 + mask
            probs = ops.softmax(scores.astype(ms.float32), -1).astype(q.dtype)
            out = ops.matmul(probs, v).transpose(0, 2, 1, 3).reshape(b, s, heads * head_dim)
            return self.wo(out)

    class FeedForward(nn.Cell):
        def __init__(self) -> None:
            super().__init__()
            hidden = c["intermediate_size"]
            self.w1 = nn.Dense(dim, hidden, has_bias=False, dtype=dtype)
            self.w3 = nn.Dense(dim, hidden, has_bias=False, dtype=dtype)
            self.w2 = nn.Dense(hidden, dim, has_bias=False, dtype=dtype)

        def construct(self, x: Any) -> Any:
            return self.w2(ops.silu(self.w1(x)) * self.w3(x))

    class DecodeLayer(nn.Cell):
        def __init__(self) -> None:
            super().__init__()
            self.attention_norm, self.ffn_norm = RMSNorm(), RMSNorm()
            self.attention, self.feed_forward = Attention(), FeedForward()

        def construct(self, x: Any, cos: Any, sin: Any, mask: Any) -> Any:
            h = x + self.attention(self.attention_norm(x), cos, sin, mask)
            return h + self.feed_forward(self.ffn_norm(h))

    class LlamaModel(nn.Cell):
        def __init__(self) -> None:
            super().__init__()
            # a table in fp32 (Embedding's dtype is its indices'), holding the values in the
            # run's dtype; its output cast, as MindFormers' LlamaEmbedding does
            self.tok_embeddings = nn.Embedding(c["vocab_size"], dim)
            self.layers = nn.CellList([DecodeLayer() for _ in range(c["num_hidden_layers"])])
            self.norm_out = RMSNorm()

        def construct(self, ids: Any) -> Any:
            s = ids.shape[1]
            inv = 1.0 / (c["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim))
            freqs = np.outer(np.arange(s), inv)
            emb = np.concatenate([freqs, freqs], -1)
            cos, sin = (ms.Tensor(f(emb), ms.float32).astype(dtype) for f in (np.cos, np.sin))
            mask = ms.Tensor(np.triu(np.full((s, s), -1e9 if dtype == ms.float32 else -3e38),
                                     1), ms.float32).astype(dtype)
            h = self.tok_embeddings(ids).astype(dtype)
            for layer in self.layers:
                h = layer(h, cos, sin, mask)
            return self.norm_out(h)

    class LlamaForCausalLM(nn.Cell):
        def __init__(self) -> None:
            super().__init__()
            self.model = LlamaModel()
            self.lm_head = nn.Dense(dim, c["vocab_size"], has_bias=False, dtype=dtype)

        def construct(self, ids: Any) -> Any:
            return self.lm_head(self.model(ids))

    net = LlamaForCausalLM()
    hf = load_file(str(weights))
    names = {"model.embed_tokens.weight": "model.tok_embeddings.embedding_table",
             "model.norm.weight": "model.norm_out.weight", "lm_head.weight": "lm_head.weight"}
    for i in range(c["num_hidden_layers"]):
        pre = f"model.layers.{i}"
        for hf_name, ms_name in (("self_attn.q_proj", "attention.wq"),
                                 ("self_attn.k_proj", "attention.wk"),
                                 ("self_attn.v_proj", "attention.wv"),
                                 ("self_attn.o_proj", "attention.wo"),
                                 ("mlp.gate_proj", "feed_forward.w1"),
                                 ("mlp.up_proj", "feed_forward.w3"),
                                 ("mlp.down_proj", "feed_forward.w2"),
                                 ("input_layernorm", "attention_norm"),
                                 ("post_attention_layernorm", "ffn_norm")):
            names[f"{pre}.{hf_name}.weight"] = f"{pre}.{ms_name}.weight"
    params = dict(net.parameters_and_names())
    if fault:
        hf["model.layers.1.mlp.down_proj.weight"][7] *= 8
    for hf_name, ms_name in names.items():
        param = params[ms_name]
        param.set_data(ms.Tensor(hf[hf_name], ms.float32).astype(dtype).astype(param.dtype))

    class Loss(nn.Cell):  # cross-entropy of the next token, in fp32
        def construct(self, logits: Any, labels: Any) -> Any:
            logits = logits[:, :-1].astype(ms.float32).reshape(-1, c["vocab_size"])
            return ops.cross_entropy(logits, labels[:, 1:].reshape(-1))

    step = nn.WithLossCell(net, Loss())
    ids = ms.Tensor(np.array(IDS), ms.int32)
    with tempfile.TemporaryDirectory() as tmp:
        debugger = PrecisionDebugger(config_path=str(_msprobe_config(
            Path(tmp), Path(tmp) / "dump", "high")))
        debugger.start(step)
        step(ids, ids)
        debugger.stop()
        debugger.step()
        _keep(Path(tmp) / "dump", f"llama-mindspore-{dtype_name}" + ("-fault" if fault else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mindspore-python", default="/tmp/msvenv/bin/python")
    parser.add_argument("--side", choices=("mindspore",), help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--fault", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "mindspore":
        mindspore_side(Path(args.weights), args.dtype, args.fault)
        return
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "llama.safetensors"
        torch_side(weights)
        for dtype, fault in (("float32", []), ("float16", []), ("float16", ["--fault"])):
            subprocess.run([args.mindspore_python, __file__, "--side", "mindspore",
                            "--weights", str(weights), "--dtype", dtype, *fault], check=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Build tiny, deterministic Hugging Face model fixtures under ``fixtures/``.

Creates six offline model directories from a fixed seed and the bundled
``fixtures/corpus.txt``:

* ``tiny-flan-t5``: T5 v1.1 / Flan-T5 style encoder-decoder (gated-gelu, no decoder
  output scaling, ``lm_head`` tied to the embedding so that it loads quietly), with a BPE
  tokenizer trained on the corpus that appends ``</s>``.
* ``tiny-flan-t5-overflow``: the same model, but the feed-forward output
  projection ``wo`` of encoder block ``OVERFLOW_BLOCK`` is multiplied by
  ``OVERFLOW_SCALE`` so that its output exceeds the fp16 range (inf under a
  wholesale ``.half()``) while staying finite in fp32 and bf16.
* ``tiny-qwen3``: a decoder-only Qwen3 (GQA, RoPE, RMSNorm) using the same
  vocabulary, with a tokenizer that does not append ``</s>``.
* ``tiny-qwen3.5``: a hybrid linear-attention Qwen3.5 text decoder (``Qwen3_5ForCausalLM``):
  three Gated DeltaNet layers, then one gated full-attention layer, the same vocabulary,
  embeddings tied to the head (as Qwen3.5-0.8B's).
* ``tiny-qwen3.5-vl``: the same text decoder (its weights copied, bit for bit) inside Qwen3.5's
  multimodal wrapper (``Qwen3_5ForConditionalGeneration``) with a one-block vision encoder;
  text-only (no image tokens in the vocabulary).
* ``tiny-llama-overflow``: a decoder-only Llama (8 layers) whose residual stream grows with
  depth, as trained decoders' does: one "massive" channel gains about 14,000 in every
  layer's MLP, so the decoder layer outputs exceed the fp16 range from layer
  ``RESIDUAL_OVERFLOW_LAYER`` on while no submodule's output comes near it: in fp16 the
  overflow is made by the residual add in the layer's own forward.

Running the script twice produces byte-identical files (tests/test_fixtures.py rebuilds
them into a temporary folder and compares). Usage::

    .venv/bin/python scripts/make_fixtures.py [OUT_DIR]     # default: fixtures/
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen3_5Config,
    Qwen3_5ForCausalLM,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5TextConfig,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
CORPUS = FIXTURES / "corpus.txt"

SEED = 0
VOCAB_SIZE = 800
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 (T5 convention)
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2

OVERFLOW_BLOCK = 2  # encoder block whose FFN ``wo`` overflows in fp16
OVERFLOW_SCALE = 65536.0  # 2**16: exact in fp32/bf16/fp16, keeps max |wo weight| < 65504
FP16_MAX = torch.finfo(torch.float16).max  # 65504

# tiny-llama-overflow: channel MASSIVE_CHANNEL of the residual stream is set to 1 by every
# token's embedding; in every layer one MLP unit (MASSIVE_UNIT) reads it (gate and up weights
# 1, after the RMSNorm it is about 8) and writes MASSIVE_DOWN (224) times silu(8) * 8, about
# 14,300, back into it. The stream's channel grows by that much per layer (maxima over the
# corpus): 13,849 after layer 0, 56,843 after layer 3, 71,174 after layer 4 (> 65504),
# 114,168 after layer 7.
LLAMA_LAYERS = 8
MASSIVE_CHANNEL = 0
MASSIVE_UNIT = 0
MASSIVE_DOWN = 224.0  # exact in fp16 and bf16
RESIDUAL_OVERFLOW_LAYER = 4  # the first decoder layer whose output exceeds 65504
SUBMODULE_LIMIT = 30000.0  # no submodule output comes above this (fp32)


def train_tokenizer(lines: list[str]) -> Tokenizer:
    """Train a deterministic BPE tokenizer with a T5-like Metaspace pre-tokenizer."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
            pre_tokenizers.Punctuation(),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    tok.train_from_iterator(lines, trainer=trainer)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [PAD_ID, EOS_ID, UNK_ID]
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    return tok


def write_json(path: Path, obj: dict) -> None:
    """Write ``obj`` as stable, pretty-printed JSON."""
    path.write_text(
        json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8"
    )


def save_tokenizer(tok: Tokenizer, out: Path, *, append_eos: bool) -> None:
    """Save ``tok`` so that ``AutoTokenizer.from_pretrained(out)`` works offline.

    With ``append_eos`` (seq2seq / T5 style) every encoded sequence ends in ``</s>``;
    otherwise (causal LM) nothing is added and padding happens on the left.
    """
    tok = Tokenizer.from_str(tok.to_str())  # copy: post-processor differs per model
    if append_eos:
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", EOS_ID)]
        )
    tok.save(str(out / "tokenizer.json"))
    special = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    write_json(out / "special_tokens_map.json", special)
    write_json(
        out / "tokenizer_config.json",
        {
            **special,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": 512,
            "padding_side": "right" if append_eos else "left",
            "clean_up_tokenization_spaces": False,
        },
    )


def build_t5() -> T5ForConditionalGeneration:
    """Seeded Flan-T5 (T5 v1.1) architecture, its ``lm_head`` tied to the shared embedding."""
    config = T5Config(
        vocab_size=VOCAB_SIZE,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=4,
        num_decoder_layers=4,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=PAD_ID,
    )
    torch.manual_seed(SEED)
    model = T5ForConditionalGeneration(config).float().eval()
    # transformers 5.x always ties lm_head to the shared embedding (T5Config forces
    # tie_word_embeddings=True) and warns on every load of a checkpoint whose lm_head differs.
    # So the head stays tied, and the checkpoint stores only ``shared.weight``: the fixtures
    # load quietly. ``tie_word_embeddings: false`` in config.json keeps Flan-T5's unscaled
    # decoder output (``scale_decoder_outputs`` is derived from it).
    assert model.lm_head.weight is model.shared.weight
    model.config.tie_word_embeddings = False
    return model


def decoder_shape(num_hidden_layers: int) -> dict[str, Any]:
    """The tiny decoders' shared config: width 64, GQA 4 query / 2 kv heads, RoPE; like
    Qwen, bos == eos and the tokenizer adds neither."""
    return {"vocab_size": VOCAB_SIZE, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": num_hidden_layers, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 512,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "tie_word_embeddings": False, "pad_token_id": PAD_ID, "bos_token_id": EOS_ID,
            "eos_token_id": EOS_ID}


def build_qwen3() -> Qwen3ForCausalLM:
    """Seeded tiny Qwen3 decoder-only model (GQA 4 query / 2 kv heads, RoPE, RMSNorm)."""
    config = Qwen3Config(**decoder_shape(num_hidden_layers=4))
    torch.manual_seed(SEED)
    return Qwen3ForCausalLM(config).float().eval()


#: tiny-qwen3.5's layers: Qwen3.5's pattern (three linear-attention layers, then one full)
QWEN35_LAYERS = ["linear_attention"] * 3 + ["full_attention"]
#: the range of the delta rule's time step dt = softplus(a + dt_bias) at a = 0, drawn
#: log-uniformly as FLA (and Mamba 2) initialise a Gated DeltaNet: decays exp(-A dt) from
#: about 0.2 to nearly 1, long memories as trained models keep (transformers' own
#: initialisation, dt_bias = 1, makes dt about 1.3 and every head forget within a few tokens)
QWEN35_DT = (0.001, 0.1)


def build_qwen3_5() -> Qwen3_5ForCausalLM:
    """Seeded tiny Qwen3.5 text decoder: Gated DeltaNet layers with 2 key and 4 value heads
    of 16 (grouped), a causal convolution of width 4, then one gated attention layer
    (GQA 4/2, rotary on a quarter of each head); embeddings tied to the head."""
    shape = decoder_shape(num_hidden_layers=len(QWEN35_LAYERS))
    shape["rope_parameters"] = shape["rope_parameters"] | {"partial_rotary_factor": 0.25}
    config = Qwen3_5TextConfig(**shape | {
        "tie_word_embeddings": True, "layer_types": QWEN35_LAYERS,
        "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
        "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4})
    torch.manual_seed(SEED)
    model = Qwen3_5ForCausalLM(config).float().eval()
    draw_decays(model)
    return model


def draw_decays(model: torch.nn.Module) -> None:
    """Each linear-attention layer's ``dt_bias`` so that ``dt = softplus(dt_bias)`` is
    log-uniform in :data:`QWEN35_DT` (from torch's generator as seeded; ``softplus^-1(x) =
    x + log(1 - exp(-x))``): shared by the fixture and scripts/hybrid_cases.py's variant."""
    lo, hi = (torch.tensor(x).log() for x in QWEN35_DT)
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer, "linear_attn"):
                dt = (torch.rand(layer.linear_attn.dt_bias.shape) * (hi - lo) + lo).exp()
                layer.linear_attn.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))


#: tiny-qwen3.5-vl's vision encoder: one block of width 32 (2 heads), 8-pixel patches over
#: two frames, 2x2 patches merged into one token of the text decoder's width (64)
QWEN35_VISION = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                 "patch_size": 8, "spatial_merge_size": 2, "temporal_patch_size": 2,
                 "out_hidden_size": 64, "num_position_embeddings": 64}


def build_qwen3_5_vl(text: Qwen3_5ForCausalLM) -> Qwen3_5ForConditionalGeneration:
    """Seeded tiny Qwen3.5 multimodal wrapper: ``text``'s decoder (weights copied) under
    ``model.language_model``, a seeded :data:`QWEN35_VISION` encoder under ``model.visual``,
    the head tied to the embeddings."""
    config = Qwen3_5Config(text_config=text.config.to_dict(), vision_config=QWEN35_VISION,
                           tie_word_embeddings=True)
    torch.manual_seed(SEED)
    model = Qwen3_5ForConditionalGeneration(config).float().eval()
    model.model.language_model.load_state_dict(text.model.state_dict())
    return model


def build_llama_overflow() -> LlamaForCausalLM:
    """Seeded tiny Llama decoder whose residual stream grows by about 14,300 per layer in one
    channel (a massive activation), written by the MLPs: its layer outputs pass 65504 from
    layer ``RESIDUAL_OVERFLOW_LAYER`` on, its submodules' outputs stay below 15,000."""
    config = LlamaConfig(**decoder_shape(num_hidden_layers=LLAMA_LAYERS))
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).float().eval()
    c, u = MASSIVE_CHANNEL, MASSIVE_UNIT
    with torch.no_grad():
        model.model.embed_tokens.weight[:, c] = 1.0
        for layer in model.model.layers:
            mlp = layer.mlp
            for proj in (mlp.gate_proj, mlp.up_proj):  # unit u reads channel c alone
                proj.weight[u] = 0.0
                proj.weight[u, c] = 1.0
            mlp.down_proj.weight[:, u] = 0.0  # and writes channel c alone
            mlp.down_proj.weight[c, u] = MASSIVE_DOWN
    return model


def save_model(model: PreTrainedModel, out: Path) -> None:
    """Save fp32 safetensors weights, config and generation config."""
    assert all(p.dtype == torch.float32 for p in model.parameters())
    model.save_pretrained(out, safe_serialization=True)


def encoder_wo_max(model: T5ForConditionalGeneration, prompts: list[torch.Tensor]) -> list[float]:
    """Max |output| of every encoder block's FFN ``wo`` over ``prompts`` (model's own dtype)."""
    maxima = [0.0] * len(model.encoder.block)
    hooks = [
        block.layer[1].DenseReluDense.wo.register_forward_hook(
            lambda _m, _i, out, i=i: maxima.__setitem__(i, max(maxima[i], out.abs().max().item()))
        )
        for i, block in enumerate(model.encoder.block)
    ]
    with torch.no_grad():
        for ids in prompts:
            model.encoder(input_ids=ids)
    for hook in hooks:
        hook.remove()
    return maxima


def nonfinite_modules(model: PreTrainedModel, **inputs: torch.Tensor) -> list[str]:
    """Names of the modules (in execution order) whose output holds inf/NaN."""
    names = {m: n for n, m in model.named_modules()}
    found: list[str] = []

    def hook(module: torch.nn.Module, _inp: object, out: object) -> None:
        tensor = out[0] if isinstance(out, tuple) else out
        if isinstance(tensor, torch.Tensor) and not torch.isfinite(tensor).all():
            found.append(names[module])

    hooks = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model(**inputs)
    for h in hooks:
        h.remove()
    return found


def first_nonfinite_module(model: PreTrainedModel, ids: torch.Tensor) -> str | None:
    """Name of the first module (in execution order) whose output holds inf/NaN, if any."""
    found = nonfinite_modules(model, input_ids=ids, decoder_input_ids=model._shift_right(ids))
    assert "lm_head" not in found, "logits must stay finite"
    return found[0] if found else None


def output_maxima(model: PreTrainedModel, prompts: list[torch.Tensor]) -> dict[str, list[float]]:
    """Max |output| of every module with a tensor output, per prompt (model's own dtype)."""
    names = {m: n for n, m in model.named_modules()}
    maxima: dict[str, list[float]] = {}

    def hook(module: torch.nn.Module, _inp: object, out: object) -> None:
        tensor = out[0] if isinstance(out, tuple) else out
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            maxima.setdefault(names[module], []).append(tensor.abs().max().item())

    hooks = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
    with torch.no_grad():
        for ids in prompts:
            model(input_ids=ids)
    for h in hooks:
        h.remove()
    return maxima


def check_t5(path: Path, prompts: list[torch.Tensor], *, overflow: bool) -> None:
    """Check a saved T5 fixture: fp32/bf16 finite, expected fp16 behaviour, generate works."""
    wo_name = f"encoder.block.{OVERFLOW_BLOCK}.layer.1.DenseReluDense.wo"
    model = AutoModelForSeq2SeqLM.from_pretrained(path).eval()
    maxima = encoder_wo_max(model, prompts)
    print(f"{path.name}: fp32 max |wo out| per encoder block: {[f'{m:.1f}' for m in maxima]}")
    for dtype in (torch.float32, torch.bfloat16):
        assert all(first_nonfinite_module(model.to(dtype), ids) is None for ids in prompts), dtype
    model.half()
    firsts = {first_nonfinite_module(model, ids) for ids in prompts}
    if overflow:
        assert all(m < FP16_MAX for i, m in enumerate(maxima) if i != OVERFLOW_BLOCK)
        assert firsts == {wo_name}, firsts
        fp16_loaded = AutoModelForSeq2SeqLM.from_pretrained(path, dtype=torch.float16).eval()
        assert fp16_loaded.get_submodule(wo_name).weight.dtype == torch.float32  # kept fp32
        assert max(encoder_wo_max(fp16_loaded, prompts)) < float("inf")
    else:
        assert max(maxima) < FP16_MAX / 100 and firsts == {None}, firsts
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(["translate English to German: The house is wonderful."], return_tensors="pt")
    generated = model.float().generate(**batch, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(generated[0], skip_special_tokens=True)
    print(f"{path.name}: greedy generate -> {text!r}")


def check_qwen3(path: Path) -> None:
    """Load a Qwen fixture via Auto classes and run a finite forward plus greedy generate."""
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(
        ["question: What is the capital of France?", "summarize: rain"],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()
    generated = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=PAD_ID)
    text = tokenizer.decode(generated[0], skip_special_tokens=True)
    print(f"{path.name}: greedy generate -> {text!r}")


def check_qwen3_5_vl(path: Path, text_path: Path) -> None:
    """The wrapper loads through the Auto classes as ``Qwen3_5ForConditionalGeneration`` and
    gives the text decoder's logits exactly; greedy generate works."""
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    assert type(model).__name__ == "Qwen3_5ForConditionalGeneration", type(model)
    text = AutoModelForCausalLM.from_pretrained(text_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(["question: What is the capital of France?"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, text(**batch).logits)
    generated = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=PAD_ID)
    text_out = tokenizer.decode(generated[0], skip_special_tokens=True)
    print(f"{path.name}: greedy generate -> {text_out!r}")


def check_llama_overflow(path: Path, prompts: list[torch.Tensor]) -> None:
    """The residual stream (decoder layer outputs) passes 65504 from layer K on while every
    submodule stays below SUBMODULE_LIMIT; fp32 and bf16 stay finite; under ``.half()`` the
    first inf is layer K's output (its residual add) on every prompt."""
    k = RESIDUAL_OVERFLOW_LAYER
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    maxima = output_maxima(model, prompts)
    layers = [f"model.layers.{i}" for i in range(LLAMA_LAYERS)]
    top = [max(maxima[n]) for n in layers]
    print(f"{path.name}: fp32 max |decoder layer output|: {[f'{m:.0f}' for m in top]}")
    assert all(max(maxima[n]) < 0.95 * FP16_MAX for n in layers[:k])
    assert all(min(maxima[n]) > FP16_MAX for n in layers[k:])  # every prompt
    sub = {n: max(v) for n, v in maxima.items() if n not in (*layers, "model")}
    worst = max(sub, key=sub.__getitem__)
    print(f"{path.name}: largest submodule output {worst} {sub[worst]:.0f}")
    assert sub[worst] < SUBMODULE_LIMIT
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        assert all(not nonfinite_modules(model, input_ids=ids) for ids in prompts), dtype
    model.half()
    for ids in prompts:
        found = nonfinite_modules(model, input_ids=ids)
        assert found[0] == layers[k], found[:3]
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(["question: What is the capital of France?", "summarize: rain"],
                      return_tensors="pt", padding=True)
    generated = model.float().generate(**batch, max_new_tokens=8, do_sample=False,
                                       pad_token_id=PAD_ID)
    text = tokenizer.decode(generated[0], skip_special_tokens=True)
    print(f"{path.name}: greedy generate -> {text!r}")


def main(out_root: Path = FIXTURES) -> None:
    """Build all fixtures under ``out_root`` (default ``fixtures/``), then verify them."""
    torch.use_deterministic_algorithms(True)
    lines = [line for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
    tokenizer = train_tokenizer(lines)
    prompts = [torch.tensor([[*tokenizer.encode(line).ids, EOS_ID]]) for line in lines]

    names = ("tiny-flan-t5", "tiny-flan-t5-overflow", "tiny-qwen3", "tiny-llama-overflow",
             "tiny-qwen3.5", "tiny-qwen3.5-vl")
    t5_dir, overflow_dir, qwen_dir, llama_dir, qwen35_dir, vl_dir = (out_root / name
                                                                    for name in names)
    for out in (t5_dir, overflow_dir, qwen_dir, llama_dir, qwen35_dir, vl_dir):
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)

    t5 = build_t5()
    save_model(t5, t5_dir)
    save_tokenizer(tokenizer, t5_dir, append_eos=True)

    with torch.no_grad():
        t5.encoder.block[OVERFLOW_BLOCK].layer[1].DenseReluDense.wo.weight.mul_(OVERFLOW_SCALE)
    save_model(t5, overflow_dir)
    save_tokenizer(tokenizer, overflow_dir, append_eos=True)

    save_model(build_qwen3(), qwen_dir)
    save_tokenizer(tokenizer, qwen_dir, append_eos=False)

    save_model(build_llama_overflow(), llama_dir)
    save_tokenizer(tokenizer, llama_dir, append_eos=False)

    qwen35 = build_qwen3_5()
    save_model(qwen35, qwen35_dir)
    save_tokenizer(tokenizer, qwen35_dir, append_eos=False)

    save_model(build_qwen3_5_vl(qwen35), vl_dir)
    save_tokenizer(tokenizer, vl_dir, append_eos=False)

    check_t5(t5_dir, prompts, overflow=False)
    check_t5(overflow_dir, prompts, overflow=True)
    check_qwen3(qwen_dir)
    check_qwen3(qwen35_dir)
    check_qwen3_5_vl(vl_dir, qwen35_dir)
    check_llama_overflow(llama_dir, [ids[:, :-1] for ids in prompts])  # no </s>, as fed


if __name__ == "__main__":
    import sys

    main(Path(sys.argv[1]) if len(sys.argv) > 1 else FIXTURES)

"""Tiny seeded models of each family, built from configs into a folder (no committed binaries).

Each builder saves a Hugging Face model directory as ``from_pretrained`` reads it, with what
feeds it (tokenizer, image processor or feature extractor), and returns the extra CLI
arguments a capture of it needs (an image, a wav file).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
QWEN = ROOT / "fixtures" / "tiny-qwen3"
#: the tiny-qwen3 fixture's word-piece tokenizer (800 tokens, pad 0, eos 1) serves the
#: text models that need no tokenizer of their own
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "house", "is",
         "wonderful", "what", "capital", "of", "france", "paris", "europe", "question",
         "context", "summarize", "translate", "english", "to", "german"]


def _seed() -> None:
    import torch

    torch.manual_seed(0)


def _qwen_tokenizer(folder: Path) -> None:
    for name in TOKENIZER_FILES:
        shutil.copy(QWEN / name, folder / name)


def bert(folder: Path) -> list[str]:
    """A BERT-style encoder (``BertModel``) with its own WordPiece tokenizer."""
    import transformers

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *".,:?"]
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizerFast(str(folder / "vocab.txt"), model_max_length=64)
    tok.save_pretrained(folder)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=64)
    _seed()
    transformers.BertModel(cfg).save_pretrained(folder)
    return []


def headless(folder: Path) -> list[str]:
    """A sentence-embedding checkpoint: BertModel's weights, a config naming
    BertForMaskedLM (whose head the checkpoint lacks)."""
    import json

    bert(folder)
    cfg_file = folder / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["architectures"] = ["BertForMaskedLM"]
    cfg_file.write_text(json.dumps(cfg, indent=2))
    return []


def vit(folder: Path) -> list[str]:
    """A ViT image classifier, its image processor, and a PNG to feed it."""
    import transformers

    # weights drawn wider than the default 0.02 give logits of a trained classifier's size
    # (units, not hundredths: a random head's near-zero logits are all cancellation)
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, num_labels=5, initializer_range=0.2)
    _seed()
    transformers.ViTForImageClassification(cfg).save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return ["--image", _png(folder)]


def _png(folder: Path) -> str:
    """A seeded 48x40 RGB noise picture beside ``folder``: ``<name>-cat.png``."""
    from PIL import Image

    rng = np.random.default_rng(0)
    image = folder.parent / f"{folder.name}-cat.png"
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(image)
    return str(image)


def whisper(folder: Path) -> list[str]:
    """A Whisper-style speech-to-text model (1 s windows), its feature extractor, a wav."""
    import transformers
    from scipy.io import wavfile

    cfg = transformers.WhisperConfig(
        vocab_size=800, num_mel_bins=80, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_source_positions=50, max_target_positions=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=1, decoder_start_token_id=1,
        begin_suppress_tokens=None, suppress_tokens=None)
    _seed()
    model = transformers.WhisperForConditionalGeneration(cfg)
    model.generation_config.forced_decoder_ids = None
    model.save_pretrained(folder)
    transformers.WhisperFeatureExtractor(feature_size=80, chunk_length=1).save_pretrained(folder)
    t = np.arange(8000) / 8000  # 1 s at 8 kHz: the capture resamples it to 16 kHz
    wav = folder.parent / f"{folder.name}-tone.wav"
    wavfile.write(wav, 8000, (np.sin(2 * np.pi * 440 * t) * 12000).astype(np.int16))
    return ["--audio", str(wav)]


def bart(folder: Path) -> list[str]:
    """A BART seq2seq model with the fixtures' tokenizer."""
    import transformers

    cfg = transformers.BartConfig(
        vocab_size=800, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
        eos_token_id=1, decoder_start_token_id=1, forced_eos_token_id=None)
    _seed()
    transformers.BartForConditionalGeneration(cfg).save_pretrained(folder)
    _qwen_tokenizer(folder)
    return []


def moe(folder: Path) -> list[str]:
    """A Mixtral-style mixture-of-experts decoder with the fixtures' tokenizer."""
    import transformers

    cfg = transformers.MixtralConfig(
        vocab_size=800, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
        eos_token_id=1)
    _seed()
    transformers.MixtralForCausalLM(cfg).save_pretrained(folder)
    _qwen_tokenizer(folder)
    return []


def llava(folder: Path) -> list[str]:
    """A LLaVA-style vision-language model (CLIP vision tower, Llama text model), its
    processor (image processor, the fixtures' tokenizer with an ``<image>`` token), a PNG."""
    import transformers

    tok = transformers.PreTrainedTokenizerFast.from_pretrained(QWEN)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    # weights drawn wider than the default 0.02, as for ViT: logits of units, not hundredths
    vision = transformers.CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, projection_dim=32, initializer_range=0.2)
    text = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=1, initializer_range=0.2)
    cfg = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids(
            "<image>"), vision_feature_select_strategy="default", vision_feature_layer=-1,
        initializer_range=0.2)
    _seed()
    transformers.LlavaForConditionalGeneration(cfg).save_pretrained(folder)
    images = transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                             crop_size={"height": 32, "width": 32})
    # 16 patches: one <image> token each (the CLS token is dropped: "default" strategy)
    transformers.LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=8,
                                vision_feature_select_strategy="default",
                                num_additional_image_tokens=1).save_pretrained(folder)
    return ["--image", _png(folder), "--prompt", "<image> describe the fox"]


#: family name -> builder
FAMILIES: dict[str, Callable[[Path], list[str]]] = {
    "bert": bert, "headless": headless, "vit": vit, "whisper": whisper, "bart": bart,
    "moe": moe, "llava": llava,
}

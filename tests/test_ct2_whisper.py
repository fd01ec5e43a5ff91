"""scripts/ct2_whisper.py: CTranslate2's model.bin read with struct and numpy, refusals, and
the Whisper name mapping (the real checkpoints are converted by scripts/get_real_models.py)."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import ct2_whisper as ct2

IDS = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2,
       np.dtype(np.float16): 4}


def _string(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<H", len(raw) + 1) + raw + b"\0"


def model_bin(variables: dict[str, np.ndarray], aliases: dict[str, str] | None = None,
              spec: str = "WhisperSpec", version: int = 6) -> bytes:
    """A model.bin in CTranslate2's layout (the module docstring's)."""
    out = struct.pack("<I", version) + _string(spec) + struct.pack("<II", 3, len(variables))
    for name, a in variables.items():
        out += _string(name) + struct.pack("<B", a.ndim)
        out += b"".join(struct.pack("<I", d) for d in a.shape)
        out += struct.pack("<BI", IDS[a.dtype], a.nbytes) + a.tobytes()
    out += struct.pack("<I", len(aliases or {}))
    for alias, target in (aliases or {}).items():
        out += _string(alias) + _string(target)
    return out


def tiny_whisper(width: int = 8, ffn: int = 16, vocab: int = 12) -> dict[str, np.ndarray]:
    """One encoder and one decoder layer of random fp16 weights, named as CTranslate2 does."""
    rng = np.random.default_rng(0)

    def r(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float16)

    v: dict[str, np.ndarray] = {"encoder/num_heads": np.array(2, np.int16),
                                "decoder/num_heads": np.array(2, np.int16)}
    for side in ("encoder", "decoder"):
        layer = f"{side}/layer_0"
        qkv_bias = r(3 * width)
        qkv_bias[width:2 * width] = 0  # k has no bias
        v |= {f"{layer}/self_attention/linear_0/weight": r(3 * width, width),
              f"{layer}/self_attention/linear_0/bias": qkv_bias}
        names = ["self_attention/linear_1", "ffn/linear_0", "ffn/linear_1"]
        if side == "decoder":
            kv_bias = r(2 * width)
            kv_bias[:width] = 0
            v |= {f"{layer}/attention/linear_1/weight": r(2 * width, width),
                  f"{layer}/attention/linear_1/bias": kv_bias}
            names += ["attention/linear_0", "attention/linear_2"]
        for n in names:
            rows = ffn if n == "ffn/linear_0" else width
            cols = ffn if n == "ffn/linear_1" else width
            v |= {f"{layer}/{n}/weight": r(rows, cols), f"{layer}/{n}/bias": r(rows)}
        for n in ("self_attention/layer_norm", "ffn/layer_norm", "layer_norm") + (
                ("attention/layer_norm",) if side == "decoder" else ()):
            scope = f"{side}/{n}" if n == "layer_norm" else f"{layer}/{n}"
            v |= {f"{scope}/gamma": r(width), f"{scope}/beta": r(width)}
        v[f"{side}/position_encodings/encodings"] = r(6, width)
    for conv, cin in (("conv1", 4), ("conv2", width)):
        v |= {f"encoder/{conv}/weight": r(width, cin, 3), f"encoder/{conv}/bias": r(width)}
    v["decoder/embeddings/weight"] = r(vocab, width)
    return v


def test_model_bin_is_read_and_mapped_to_transformers_names() -> None:
    variables = tiny_whisper()
    data = model_bin(variables, aliases={"decoder/projection/weight": "decoder/embeddings/weight"})
    read = ct2.read_model_bin(data)
    assert set(read) == {*variables, "decoder/projection/weight"}
    assert all(np.array_equal(read[k], a) and read[k].dtype == a.dtype
               for k, a in variables.items())
    assert read["decoder/projection/weight"] is read["decoder/embeddings/weight"]
    sd = ct2.state_dict(read)
    qkv = variables["encoder/layer_0/self_attention/linear_0/weight"]
    assert np.array_equal(sd["model.encoder.layers.0.self_attn.q_proj.weight"], qkv[:8])
    assert np.array_equal(sd["model.encoder.layers.0.self_attn.k_proj.weight"], qkv[8:16])
    assert np.array_equal(sd["model.encoder.layers.0.self_attn.v_proj.weight"], qkv[16:])
    assert "model.encoder.layers.0.self_attn.k_proj.bias" not in sd
    kv = variables["decoder/layer_0/attention/linear_1/weight"]
    assert np.array_equal(sd["model.decoder.layers.0.encoder_attn.v_proj.weight"], kv[8:])
    assert np.array_equal(sd["model.decoder.layers.0.encoder_attn.q_proj.weight"],
                          variables["decoder/layer_0/attention/linear_0/weight"])
    assert np.array_equal(sd["model.decoder.layers.0.fc1.weight"],
                          variables["decoder/layer_0/ffn/linear_0/weight"])
    assert "proj_out.weight" not in sd  # tied to the token embedding
    assert ct2.layer_count(read, "encoder") == ct2.layer_count(read, "decoder") == 1


def test_a_whisper_model_matches_the_mapping() -> None:
    """Every weight of transformers' Whisper of that shape is produced, no other."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.WhisperConfig(
        vocab_size=12, num_mel_bins=4, d_model=8, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16,
        decoder_ffn_dim=16, max_source_positions=6, max_target_positions=6,
        pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=1)
    model = transformers.WhisperForConditionalGeneration(cfg)
    sd = ct2.state_dict(ct2.read_model_bin(model_bin(tiny_whisper())))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in sd.items()} == {k: s for k, s in expected.items()
                                                   if k != "proj_out.weight"}


@pytest.mark.parametrize(("change", "message"), [
    ({"encoder/layer_0/ffn/linear_0/weight": np.ones((16, 8), np.int8)}, "quantized"),
    ({"encoder/layer_0/ffn/linear_0/weight_scale": np.ones(16, np.float32)}, "quantized"),
])
def test_a_quantized_checkpoint_is_refused(change: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ct2.read_model_bin(model_bin(tiny_whisper() | change))


def test_other_files_are_refused() -> None:
    good = model_bin(tiny_whisper())
    with pytest.raises(ValueError, match="bytes after"):
        ct2.read_model_bin(good + b"\0")
    with pytest.raises(ValueError, match="ends early"):
        ct2.read_model_bin(good[:-3])
    with pytest.raises(ValueError, match="not a Whisper"):
        ct2.read_model_bin(model_bin(tiny_whisper(), spec="TransformerSpec"))
    with pytest.raises(ValueError, match="version 4"):
        ct2.read_model_bin(model_bin(tiny_whisper(), version=4))
    broken = tiny_whisper()
    broken["encoder/layer_0/self_attention/linear_0/bias"][8] = 1  # a k bias
    with pytest.raises(ValueError, match="nonzero bias"):
        ct2.state_dict(ct2.read_model_bin(model_bin(broken)))

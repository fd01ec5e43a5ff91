"""Which model a capture ran: what two captures of the same model share whatever dtype,
device or engine ran them, and the check that a dump to replay is of this model.

- the config hash (:func:`config_hash`): a SHA-256 prefix of a Hugging Face config without
  dtype, paths and versions; for other modules, of their parameter names and shapes
  (:func:`model_identity`). Two dumps of different hashes are of different models.
- the weights fingerprint (:func:`weights_fingerprint`): sampled bytes of the checkpoint's
  weight files (not the loaded values), so captures in fp32, bf16 or on another device of
  the same checkpoint share it, and a fine-tune of the same config does not.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from ...dumps.dump import Dump
from ...errors import InputError

#: weight files whose bytes the fingerprint samples
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack")
#: bytes read per sampled chunk, and chunks per file (evenly spaced, ends included)
CHUNK_BYTES = 4096
CHUNKS_PER_FILE = 64


def model_identity(model: torch.nn.Module) -> dict[str, Any]:
    """Class name and a hash that two captures of the same model share.

    For Hugging Face models the hash covers the config (minus dtype, paths and versions, in
    nested configs too: a vision-language model's ``text_config``); for other modules it
    covers parameter names and shapes.
    """
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        return {"class": type(model).__name__, "config_hash": config_hash(config)}
    basis = json.dumps([(n, list(p.shape)) for n, p in model.named_parameters()])
    return {"class": type(model).__name__,
            "config_hash": hashlib.sha256(basis.encode()).hexdigest()[:16]}


def config_hash(config: Any) -> str:
    """A SHA-256 prefix of a Hugging Face config without dtype, paths and versions (in nested
    configs too: a vision-language model's ``text_config``): equal for two captures of the
    same model, whichever dtype, device or engine (:mod:`precision.engines.vllm.capture`) ran it."""
    skip = ("torch_dtype", "dtype", "_name_or_path", "transformers_version", "_commit_hash",
            "_attn_implementation_autoset", "use_cache")

    def strip(d: dict[str, Any]) -> dict[str, Any]:
        return {k: strip(v) if isinstance(v, dict) else v for k, v in d.items() if k not in skip}

    basis = json.dumps(strip(config.to_dict()), sort_keys=True, default=str)
    return hashlib.sha256(basis.encode()).hexdigest()[:16]


def require_same_model(dump: Dump, model: torch.nn.Module, what: str) -> None:
    """Raise :class:`InputError` when ``dump`` was captured from another model's config."""
    theirs = dump.config_hash
    ours = model_identity(model)["config_hash"]
    if theirs and theirs != ours:
        raise InputError(f"{what} was captured from a different model "
                         f"({dump.meta['model'].get('path', '?')}, config hash {theirs}; "
                         f"this one is {ours})")


def weights_fingerprint(path: Path) -> str | None:
    """A hash of sampled bytes of the weight files in ``path`` (names, sizes, and
    :data:`CHUNKS_PER_FILE` chunks of :data:`CHUNK_BYTES` each, ends included); ``None``
    when the folder holds no weight file. Reads about 256 KiB per file."""
    files = sorted(f for f in path.iterdir()
                   if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES)) if path.is_dir() else []
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            step = max(1, (size - CHUNK_BYTES) // max(1, CHUNKS_PER_FILE - 1))
            for i in range(CHUNKS_PER_FILE):
                fh.seek(min(i * step, max(0, size - CHUNK_BYTES)))
                h.update(fh.read(CHUNK_BYTES))
    return h.hexdigest()[:16]

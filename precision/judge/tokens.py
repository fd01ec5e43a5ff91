"""Which positions are real tokens, from the attention masks a capture recorded.

Padded positions carry no signal: attention kernels fill them as they like, and averaging
over them dilutes every per-token measure by the pad share. The verdicts, the plots and the
report all ask this one module which positions to leave out.
"""

from __future__ import annotations

import numpy as np

from ..dumps.dump import Dump
from ..dumps.keys import INPUT_PREFIX


def real_tokens(d: Dump, shape: tuple[int, ...]) -> np.ndarray | None:
    """Which rows of a ``(..., positions, vocab)`` logits tensor are real tokens (flat bool).

    The recorded attention mask of the positions the logits belong to:
    ``decoder_attention_mask`` for an encoder-decoder (one with ``decoder_input_ids``), else
    ``attention_mask``, when its shape is the logits' leading shape; else None (all rows).
    """
    positions = tuple(shape[:-1])
    has_decoder = INPUT_PREFIX + "decoder_input_ids" in d.tensors
    key = INPUT_PREFIX + ("decoder_attention_mask" if has_decoder else "attention_mask")
    if key not in d.tensors or tuple(d.tensors[key].shape) != positions:
        return None
    return np.asarray(d[key]).reshape(-1) != 0

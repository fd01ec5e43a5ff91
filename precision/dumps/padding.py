"""Which axis of a record is its token axis, and which recorded mask says which tokens are real.

Shared by the numpy side (compare leaves padded positions out of full tensors) and the
torch side (a stats-mode capture computes its statistics over real tokens only), so both
agree on every record.
"""

from __future__ import annotations

from collections.abc import Mapping

from .keys import STATE, parse_key

#: the masks a capture records among the model's inputs (``input:attention_mask`` ...)
MASKS = ("attention_mask", "decoder_attention_mask")


def token_axis(key: str, shape: tuple[int, ...], masks: Mapping[str, tuple[int, ...]],
               encoder_decoder: bool) -> tuple[str, int] | None:
    """``(mask name, axis)`` for a record with a token axis, or None.

    The token axis is axis 1 (``(batch, seq, hidden)``), or axis 2 (``(batch, heads, seq,
    head_dim)``, attention's layout) when axis 1 is not, of the shape of the mask of the
    record's stack: ``decoder_attention_mask`` for an encoder-decoder's ``decoder.*``
    records, ``attention_mask`` for its ``encoder.*`` records, and for every record of a
    model with one input stream (decoder-only, encoder-only). Records of an encoder-decoder
    outside its two stacks (a shared embedding, the head) have none: which stream they saw
    cannot be told from the shape alone. A state carried between calls (index ``state``: a
    recurrent or convolution state) has none either. ``masks``: the recorded masks' shapes
    by name.
    """
    if len(shape) < 2 or parse_key(key).index.rpartition(".")[2] == STATE:
        return None
    if encoder_decoder:
        name = {"encoder": "attention_mask",
                "decoder": "decoder_attention_mask"}.get(parse_key(key).stack)
    else:
        name = "attention_mask"
    mask_shape = masks.get(name) if name else None
    if mask_shape is None or len(mask_shape) != 2 or shape[0] != mask_shape[0]:
        return None
    axis = next((a for a in (1, 2) if a < len(shape) and shape[a] == mask_shape[1]), None)
    return None if axis is None or name is None else (name, axis)

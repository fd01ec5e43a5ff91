"""Which positions are real tokens, from the attention masks a capture recorded.

Padded positions carry no signal: attention kernels fill them as they like, and averaging
over them dilutes every per-token measure by the pad share. The verdicts, the plots and the
report all ask this one module which positions to leave out.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from ..dumps.dump import Dump
from ..dumps.keys import INPUT_PREFIX, parse_key


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


@dataclass(frozen=True)
class Padding:
    """Where a record's padded positions are: ``valid`` (batch x seq, True at real tokens)
    and the record's layout around its token axis, ``(batch, heads, seq, width)``, with
    ``heads`` the elements between batch and token axes (1 for ``(batch, seq, hidden)``,
    the head count for ``(batch, heads, seq, head_dim)``) and ``width`` those after it."""

    valid: np.ndarray
    heads: int
    width: int

    @property
    def padded_elements(self) -> int:
        return int(np.count_nonzero(~self.valid)) * self.heads * self.width

    def keep(self, first_row: int, rows: int) -> np.ndarray:
        """Which of ``rows`` consecutive rows (``width`` elements each) from ``first_row``
        are real tokens."""
        r = np.arange(first_row, first_row + rows)
        seq = self.valid.shape[1]
        return self.valid[r // (self.heads * seq), r % seq]


def padding_of(d: Dump, key: str, shape: tuple[int, ...]) -> Padding | None:
    """For a record with a token axis, where its padded positions are; None when it has no
    token axis or nothing is padded.

    The token axis is axis 1 (``(batch, seq, hidden)``), or axis 2 (``(batch, heads, seq,
    head_dim)``, attention's layout) when axis 1 is not, of the shape of the mask of its
    stack: ``decoder_attention_mask`` for an encoder-decoder's ``decoder.*`` records,
    ``attention_mask`` for its ``encoder.*`` records, and for every record of a model with
    one input stream (decoder-only, encoder-only). Records of an encoder-decoder outside its
    two stacks (a shared embedding, the head) are left whole: which stream they saw cannot
    be told from the shape alone.
    """
    if len(shape) < 2:
        return None
    stack = parse_key(key).stack
    if INPUT_PREFIX + "decoder_input_ids" in d.tensors:
        names = {"encoder": "attention_mask", "decoder": "decoder_attention_mask"}
        name = names.get(stack)
    else:
        name = "attention_mask"
    mask_key = INPUT_PREFIX + name if name else ""
    mask_shape = tuple(d.tensors[mask_key].shape) if mask_key in d.tensors else ()
    if len(mask_shape) != 2 or shape[0] != mask_shape[0]:
        return None
    seq = mask_shape[1]
    axis = next((a for a in (1, 2) if a < len(shape) and shape[a] == seq), None)
    if axis is None:
        return None
    valid = np.asarray(d[mask_key]) != 0
    if valid.all():
        return None
    return Padding(valid, int(np.prod(shape[1:axis], dtype=np.int64)),
                   int(np.prod(shape[axis + 1:], dtype=np.int64)))


def real_chunks(pairs: Iterable[tuple[np.ndarray, np.ndarray]], pad: Padding
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Chunk pairs of whole rows (``pad.width`` elements each, in order) with the padded
    positions left out."""
    start = 0
    for x, y in pairs:
        rows = x.size // pad.width
        keep = pad.keep(start, rows)
        start += rows
        if keep.any():
            yield keep_rows(x, y, keep, pad.width)


def keep_rows(x: np.ndarray, y: np.ndarray, keep: np.ndarray, width: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """The elements of the rows ``keep`` marks, of a chunk of whole rows."""
    if keep.all():
        return x, y
    rows = keep.size
    return x.reshape(rows, width)[keep].reshape(-1), y.reshape(rows, width)[keep].reshape(-1)

"""Which positions are real tokens, from the attention masks a capture recorded.

Padded positions carry no signal: attention kernels fill them as they like, and averaging
over them dilutes every per-token measure by the pad share. The verdicts, the plots and the
report all ask this one module which positions to leave out.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from ...dumps.dump import Dump
from ...dumps.keys import INPUT_PREFIX
from ...dumps.padding import MASKS, token_axis


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
    """For a record with a token axis (:func:`precision.dumps.padding.token_axis`), where
    its padded positions are; None when it has none or nothing is padded."""
    masks = {n: tuple(d.tensors[INPUT_PREFIX + n].shape) for n in MASKS
             if INPUT_PREFIX + n in d.tensors}
    found = token_axis(key, shape, masks,
                       encoder_decoder=INPUT_PREFIX + "decoder_input_ids" in d.tensors)
    if found is None:
        return None
    name, axis = found
    valid = np.asarray(d[INPUT_PREFIX + name]) != 0
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
            yield keep_rows(x, keep, pad.width), keep_rows(y, keep, pad.width)


def real_elements(chunks: Iterable[np.ndarray], pad: Padding) -> Iterator[np.ndarray]:
    """Chunks of whole rows of one tensor with the padded positions left out."""
    for x, _ in real_chunks(((c, c) for c in chunks), pad):
        yield x


def keep_rows(x: np.ndarray, keep: np.ndarray, width: int) -> np.ndarray:
    """The elements of the rows ``keep`` marks, of a chunk of whole rows."""
    if keep.all():
        return x
    return x.reshape(keep.size, width)[keep].reshape(-1)

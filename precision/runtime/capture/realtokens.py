"""Stats mode's real tokens: a record's elements at the tokens the attention mask keeps
(torch needed). Statistics describe what a comparison judges, so padding is left out of
them (:func:`precision.dumps.padding.token_axis` finds a record's token axis)."""

from __future__ import annotations

from typing import Any

import torch

from ...dumps.padding import MASKS, token_axis


class RealTokens:
    """The model's recorded attention masks (True at real tokens) and what they select.

    ``gather=True`` selects without waiting for the device: the flat indices of a shape's
    real elements are found once per shape and forward (``nonzero``, one wait each), then
    :func:`torch.take` gathers them; boolean indexing (``gather=False``, the CPU's direct
    path) would wait on every record.
    """

    def __init__(self, *, gather: bool = False) -> None:
        self.gather = gather
        self._masks: dict[str, torch.Tensor] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._all_real: dict[str, bool] = {}
        self._index: dict[tuple[Any, ...], torch.Tensor] = {}
        self._encoder_decoder = False

    def set_inputs(self, named: dict[str, Any]) -> None:
        """Take the masks from the model's named inputs (a new forward): one read per mask
        of whether all its tokens are real."""
        self._masks = {n: named[n].detach() != 0 for n in MASKS
                       if n in named and named[n].dim() == 2}
        self._shapes = {n: tuple(m.shape) for n, m in self._masks.items()}
        self._all_real = {n: bool(m.all()) for n, m in self._masks.items()}
        self._index.clear()
        self._encoder_decoder = "decoder_input_ids" in named

    def select(self, key: str, t: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``t`` at real tokens only (flattened over batch and tokens, in element order) for
        a record with a token axis, and how many elements were left out."""
        if all(self._all_real.values()):  # no mask, or none leaves a token out
            return t, 0
        found = token_axis(key, tuple(t.shape), self._shapes, self._encoder_decoder)
        if found is None or self._all_real[found[0]]:
            return t, 0
        name, axis = found
        if self.gather:
            index = self._index_of(name, axis, t)
            return torch.take(t.detach(), index), t.numel() - index.numel()
        real = t.detach()[self._expanded(name, axis, t)]
        return real, t.numel() - real.numel()

    def _expanded(self, name: str, axis: int, t: torch.Tensor) -> torch.Tensor:
        mask = self._masks[name]
        shape = [mask.shape[0]] + [1] * (t.dim() - 1)
        shape[axis] = mask.shape[1]
        return mask.to(t.device).view(shape).expand(t.shape)

    def _index_of(self, name: str, axis: int, t: torch.Tensor) -> torch.Tensor:
        key = (name, axis, tuple(t.shape), str(t.device))
        index = self._index.get(key)
        if index is None:
            index = self._index[key] = self._expanded(name, axis, t).reshape(-1).nonzero().view(-1)
        return index

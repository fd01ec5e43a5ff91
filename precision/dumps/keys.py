"""Record keys: the one parser and the one formatter of the package.

A key names one record of a dump::

    [rank<r>/]module[/op]:kind[.index][#call]

- ``rank<r>/``: the shard of a directory dump the record comes from (``rank1/``);
- ``module``: the module's path (``encoder.block.0.layer.1.DenseReluDense.wo``), a parameter's
  path for parameter gradients (``shared.weight:pgrad``), ``input`` for the model's inputs
  and ``generation`` for what a generating capture recorded;
- ``op``: an operation inside the module's own forward (reserved for operator records);
- ``kind``: ``out``, ``in`` (module inputs), ``grad`` (gradient of the output), ``pgrad``
  (parameter gradient); records of ``input`` are ``in``, of ``generation`` ``generation``;
- ``index``: the position in a tuple output (``out.0``), or an input's or a generation
  record's name (``input:attention_mask``, ``generation:tokens``);
- ``call``: the module's n-th call (``#2``; the first call has none).

A key without ``:`` (a plain safetensors file's tensor name) is a module's only output:
``kind`` is empty and the key formats back to the name.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

INPUT = "input"
GENERATION = "generation"
INPUT_PREFIX = INPUT + ":"
GEN_PREFIX = GENERATION + ":"
GRADIENT_KINDS = frozenset({"grad", "pgrad"})
_RANK = re.compile(r"rank(\d+)/")
#: operator records of casts are named ``cast_<from>_<to>`` (``MODULE/cast_bfloat16_float32``):
#: recorded only where the dtype changes, so a run in another precision has other ones
CAST_PREFIX = "cast_"
#: the index of a state a module hands to its next call (``linear_attn.delta_rule:out.state``,
#: a Gated DeltaNet's recurrent state): it has no token axis, whatever its shape
STATE = "state"


@dataclass(frozen=True)
class Key:
    """A parsed record key (see the module docstring)."""

    module: str
    kind: str = "out"
    index: str = ""
    call: int = 0
    op: str = ""
    rank: int | None = None

    def __str__(self) -> str:
        return format_key(self)

    @property
    def stack(self) -> str:
        """The module path's first component: ``encoder``/``decoder``/``model``/``input``."""
        return self.module.split(".", 1)[0]

    @property
    def is_input(self) -> bool:
        """One of the model's recorded inputs (``input:attention_mask``)."""
        return self.module == INPUT

    @property
    def is_gradient(self) -> bool:
        """A ``--backward`` record: an output's (``:grad``) or a parameter's (``:pgrad``)."""
        return self.kind in GRADIENT_KINDS


@functools.lru_cache(maxsize=1 << 16)
def parse_key(text: str) -> Key:
    """``"rank1/encoder.block.0:out.1#2"`` -> ``Key("encoder.block.0", "out", "1", 2, rank=1)``."""
    rank = None
    body = text
    m = _RANK.match(text)
    if m:
        rank, body = int(m.group(1)), text[m.end():]
    head, colon, rest = body.partition(":")
    module, _, op = head.partition("/")
    if not colon:
        return Key(module, "", "", 0, op, rank)
    if module in (INPUT, GENERATION):
        return Key(module, "in" if module == INPUT else GENERATION, rest, 0, op, rank)
    call = 0
    kind_index, hash_, tail = rest.rpartition("#")
    if hash_ and tail.isdigit():
        rest, call = kind_index, int(tail)
    kind, _, index = rest.partition(".")
    return Key(module, kind, index, call, op, rank)


def format_key(key: Key) -> str:
    """The text of a key; ``parse_key(format_key(k)) == k`` for every key it makes."""
    head = f"rank{key.rank}/" if key.rank is not None else ""
    module = key.module + (f"/{key.op}" if key.op else "")
    if not key.kind:
        return head + module
    if key.module in (INPUT, GENERATION):
        return f"{head}{module}:{key.index}"
    return head + make_key(module, key.kind, key.index, key.call)


def entry_module(key: str) -> str:
    """An entry's ``module`` as a capture writes it: the module's path, an operation's with
    its name (``model.layers.0.self_attn/softmax``)."""
    k = parse_key(key)
    return k.module + (f"/{k.op}" if k.op else "")


def make_key(module: str, kind: str, index: str = "", call: int = 0) -> str:
    """``encoder.block.0.layer.1.DenseReluDense.wo:out``, ``...:out.1#2``: what
    ``format_key(Key(module, kind, index, call))`` gives, without making the ``Key`` (a
    capture makes one key a record, inside the forward)."""
    if module in (INPUT, GENERATION):
        return f"{module}:{index or kind}"
    if not kind:
        return module
    text = f"{module}:{kind}.{index}" if index else f"{module}:{kind}"
    return f"{text}#{call}" if call else text

"""Module names of another framework's or another code base's dump, renamed so that its
records line up with the other run's.

A MindSpore network trained with MindSpore's wrappers is dumped under the wrappers' cell
names (``network._backbone.model.layers.0...``: ``TrainOneStepCell.network``,
``WithLossCell._backbone``), and a PyTorch one trained under DDP or Megatron under
``module.``. Llama ports written in Meta's layout (MindFormers' Llama and Qwen, Meta's
reference code, torchtitan) name the same modules otherwise: ``attention.wq`` for
``self_attn.q_proj``, ``feed_forward.w1`` for ``mlp.gate_proj``. Three steps, in this order,
rename a dump's module paths:

1. **a user mapping** (``--mapping FILE``, :func:`read_names`), on the paths as the dump
   names them:

   - JSON ``{"modules": {FROM: TO}}``: module path prefixes (whole segments; ``{i}`` stands
     for a layer number), the longest matching prefix first;
   - msprobe's own ``layer_mapping.yaml`` (``-lm`` of msprobe's compare): per class, each
     child's name on this side and on the other (``ParallelTransformerLayer: {attention:
     self_attention}``; ``TopLayer`` is the root). Its entries for API calls inside a cell
     (``logical_or: __or__``, dotted names) are not used: API records keep their names;

2. **wrappers**: leading segments among :data:`WRAPPERS` under which most of the dump's
   module records lie are removed (``network._backbone.`` of MindSpore's
   ``TrainOneStepCell(WithLossCell(net))``; the loss cell beside ``_backbone`` keeps its name);
3. **Meta's Llama layout** (:data:`META_LLAMA`), when no user mapping is given and the dump's
   paths hold its projections (``attention.wq``, ``feed_forward.w1``...): Hugging Face's
   names.

API records (``Functional.linear.0``, MindSpore's ``Mint.linear.0``) keep their names: they
are named by each framework's functions.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import InputError

#: cell and module attributes that wrap a whole network: MindSpore's TrainOneStepCell
#: (``network``), WithLossCell (``_backbone``), WithEvalCell (``_network``), PyTorch's
#: DistributedDataParallel and Megatron's Float16Module (``module``)
WRAPPERS = frozenset({"network", "_backbone", "backbone", "_network", "module"})
#: the root's class in msprobe's layer mapping
TOP_LAYER = "TopLayer"

#: Meta's Llama layout (MindFormers' Llama and Qwen2, Meta's reference code) as Hugging Face's
#: Llama names it: prefixes, ``{i}`` a layer number
META_LLAMA: Mapping[str, str] = {
    "tok_embeddings": "model.embed_tokens",
    "model.tok_embeddings": "model.embed_tokens",
    "layers.{i}": "model.layers.{i}",
    "norm": "model.norm",
    "norm_out": "model.norm",
    "model.norm_out": "model.norm",
    "output": "lm_head",
    **{f"{root}layers.{{i}}.{a}": f"model.layers.{{i}}.{b}"
       for root in ("", "model.") for a, b in (
           ("attention", "self_attn"),
           ("attention.wq", "self_attn.q_proj"),
           ("attention.wk", "self_attn.k_proj"),
           ("attention.wv", "self_attn.v_proj"),
           ("attention.wo", "self_attn.o_proj"),
           ("feed_forward", "mlp"),
           ("feed_forward.w1", "mlp.gate_proj"),
           ("feed_forward.w2", "mlp.down_proj"),
           ("feed_forward.w3", "mlp.up_proj"),
           ("attention_norm", "input_layernorm"),
           ("ffn_norm", "post_attention_layernorm"))},
}
_META_LLAMA_SIGN = re.compile(r"(?:^|\.)layers\.\d+\.(?:attention\.w[qkvo]|feed_forward\.w[123])$")
_PATH = re.compile(r"[\w\-]+(?:\.[\w\-]+)*")
_SEGMENT = re.compile(r"[\w\-]+")


@dataclass(frozen=True)
class Prefix:
    """One rule: a module path prefix (whole segments, ``{i}`` a layer number) and what it
    becomes."""

    source: str
    target: str

    def __post_init__(self) -> None:
        for side in (self.source, self.target):
            if side.count("{i}") > 1 or not _PATH.fullmatch(side.replace("{i}", "0")):
                raise InputError(f"module mapping {self.source!r}: {self.target!r}: a module "
                                 "path, e.g. 'layers.{i}.attention.wq'")
        if ("{i}" in self.target) and ("{i}" not in self.source):
            raise InputError(f"module mapping {self.source!r}: {self.target!r}: {{i}} in the "
                             "target needs {i} in the source")

    @property
    def regex(self) -> re.Pattern[str]:
        return re.compile("^" + re.escape(self.source).replace(r"\{i\}", r"(?P<i>\d+)")
                          + r"(?=\.|$)")


@dataclass(frozen=True)
class UserMapping:
    """A user's mapping file: prefix rules (JSON) or msprobe's per-class child names (YAML)."""

    name: str
    prefixes: tuple[Prefix, ...] = ()
    #: class -> {child's name here: its name in the other run}
    children: Mapping[str, Mapping[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Names:
    """How one dump's module paths are renamed (see the module docstring)."""

    user: UserMapping | None = None
    #: module path -> its class, as the dump's records name them (for ``user.children``)
    classes: Mapping[str, str] = field(default_factory=dict)
    wrapper: str = ""
    layout: tuple[Prefix, ...] = ()
    layout_name: str = ""

    def rename(self, path: str) -> str:
        """``path`` as the other run names it."""
        if self.user is not None:
            path = _prefixed(self.user.prefixes, _children(self.user.children, self.classes,
                                                           path))
        return _prefixed(self.layout, self.unwrapped(path))

    def unwrapped(self, path: str) -> str:
        """``path`` without the wrapper prefix (already renamed by the user's mapping)."""
        return path.removeprefix(self.wrapper + ".") if self.wrapper else path

    def describe(self, *, renamed_nothing: bool = False) -> str:
        """What was done, for the report's notes; empty when nothing (a user's mapping that
        ``renamed_nothing`` is left to the report's warning)."""
        done = []
        if self.user is not None and not renamed_nothing:
            done.append(f"module names mapped by --mapping {self.user.name}")
        if self.wrapper:
            done.append(f"wrapper prefix {self.wrapper!r} removed")
        if self.layout:
            done.append(f"module names mapped by {self.layout_name}")
        return "; ".join(done)


def _prefixed(rules: tuple[Prefix, ...], path: str) -> str:
    """``path`` renamed by its longest matching prefix rule."""
    best: tuple[int, str] | None = None
    for rule in rules:
        m = rule.regex.match(path)
        if m and (best is None or m.end() > best[0]):
            best = (m.end(), rule.target.replace("{i}", m["i"]) if "i" in m.groupdict()
                    else rule.target)
    return path if best is None else best[1] + path[best[0]:]


def _children(children: Mapping[str, Mapping[str, str]], classes: Mapping[str, str],
              path: str) -> str:
    """``path`` with each segment renamed by its parent's class's rule (msprobe's layer
    mapping); a parent whose class no record states (a list of layers) renames nothing."""
    if not children:
        return path
    segments = path.split(".")
    out = []
    for k, segment in enumerate(segments):
        parent = TOP_LAYER if k == 0 else classes.get(".".join(segments[:k]), "")
        out.append(children.get(parent, {}).get(segment, segment))
    return ".".join(out)


def read_names(path: str | os.PathLike[str]) -> UserMapping | None:
    """The module rules of a mapping file, or None when it has none (an engine's mapping
    table, :mod:`precision.engines.vllm.mapping`): JSON ``{"modules": {FROM: TO}}``, or
    msprobe's ``layer_mapping.yaml`` (``.yaml``/``.yml``). A file that cannot be read, or
    whose rules cannot hold, raises one :class:`~precision.errors.InputError` line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"--mapping {p}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--mapping {p}: not a mapping file ({exc})") from None
    if p.suffix.lower() in (".yaml", ".yml"):
        return UserMapping(p.name, children=_layer_mapping(p, text))
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"--mapping {p}: not a mapping file ({exc})") from None
    except RecursionError:
        raise InputError(f"--mapping {p}: not a mapping file (nested too deep)") from None
    if not isinstance(doc, dict) or "modules" not in doc:
        return None
    modules = doc["modules"]
    if not isinstance(modules, dict) or not all(isinstance(v, str) for v in modules.values()):
        raise InputError(f"--mapping {p}: 'modules' must be an object of module path -> "
                         "module path")
    try:
        return UserMapping(p.name, prefixes=tuple(Prefix(str(a), b) for a, b in modules.items()))
    except InputError as exc:
        raise InputError(f"--mapping {p}: {exc}") from None


def _layer_mapping(p: Path, text: str) -> dict[str, dict[str, str]]:
    """msprobe's ``layer_mapping.yaml``: ``{class: {child: other run's name}}``, read with
    YAML's safe loader; entries whose child is dotted (an API inside a cell) are skipped."""
    import yaml  # only for this file kind

    try:
        doc: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InputError(f"--mapping {p}: not YAML ({str(exc).splitlines()[0]})") from None
    except RecursionError:
        raise InputError(f"--mapping {p}: not an msprobe layer mapping (nested too deep)"
                         ) from None
    if not isinstance(doc, dict) or not all(
            isinstance(c, str) and isinstance(rules, dict) for c, rules in doc.items()):
        raise InputError(f"--mapping {p}: not an msprobe layer mapping (expected class: "
                         "{child: name} entries)")
    out: dict[str, dict[str, str]] = {}
    for cls, rules in doc.items():
        for child, name in rules.items():
            if not isinstance(child, str) or not isinstance(name, str) \
                    or not _PATH.fullmatch(name):
                raise InputError(f"--mapping {p}: {cls}: {child!r}: {name!r} is not a name")
            if _SEGMENT.fullmatch(child):
                out.setdefault(cls, {})[child] = name
    return out


def engine_rules_in(path: str | os.PathLike[str]) -> bool:
    """Whether a mapping file also holds an engine's table (``rules``): JSON only."""
    p = Path(path)
    if p.suffix.lower() in (".yaml", ".yml"):
        return False
    doc = json.loads(p.read_text(encoding="utf-8"))
    return isinstance(doc, dict) and "rules" in doc


def names_for(classes: Mapping[str, str], mapping: str | os.PathLike[str] | None = None
              ) -> Names:
    """The renaming for a dump whose module records are ``classes`` (path -> class): the
    user's mapping file's module rules when it has any, its wrapper prefix, and Meta's Llama
    layout when no mapping file is given and the paths are in it."""
    user = read_names(mapping) if mapping is not None else None
    first = Names(user, classes)
    renamed = [first.rename(p) for p in classes]
    wrapper = _wrapper(renamed)
    inner = [p.removeprefix(wrapper + ".") if wrapper else p for p in renamed]
    if user is None and any(_META_LLAMA_SIGN.search(p) for p in inner):
        return Names(user, classes, wrapper, tuple(Prefix(a, b) for a, b in META_LLAMA.items()),
                     "Meta's Llama layout (attention.wq -> self_attn.q_proj, ...)")
    return Names(user, classes, wrapper)


def renamed_by_user(names: Names, paths: Iterable[str]) -> int:
    """How many of ``paths`` the user's mapping file renamed."""
    if names.user is None:
        return 0
    bare = Names(None, names.classes)
    return sum(Names(names.user, names.classes).rename(p) != bare.rename(p) for p in paths)


def _wrapper(paths: list[str]) -> str:
    """The leading wrapper segments that hold the network: each a segment of
    :data:`WRAPPERS` under which more than half of the (remaining) module paths lie. The
    wrappers' own records (``network``, ``network._backbone``) and their other children (a
    loss cell beside ``_backbone``, an optimiser beside ``network``) keep their names."""
    split = [p.split(".") for p in paths]
    total = sum(not set(s) <= WRAPPERS for s in split)  # the wrappers' own records aside
    prefix: list[str] = []
    while True:
        inner = [s[len(prefix):] for s in split
                 if len(s) > len(prefix) + 1 and s[:len(prefix)] == prefix]
        heads = Counter(s[0] for s in inner)
        if not heads:
            break
        head, n = heads.most_common(1)[0]
        if head not in WRAPPERS or 2 * n <= total:
            break
        prefix.append(head)
    return ".".join(prefix)

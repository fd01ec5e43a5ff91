"""Which record of another implementation is which Hugging Face record: mapping tables.

A table is found from the dump's recorded config (``model_type``); a user mapping file
(JSON, same fields, see docs/vllm.md) adds a family or replaces one. Each rule names a
record of the engine (``{i}`` a layer number) and the Hugging Face key(s) it holds
(``{prev}`` is layer i-1, ``{last}`` the last layer):

- one target: the same tensor under another name (``attn:out`` is what Hugging Face feeds
  ``o_proj``: ``o_proj:in.0``);
- several targets with a ``split``: a fused projection cut along its last axis by the
  config's sizes (``qkv``: query, key and value heads; ``gate_up``: two intermediate halves);
- ``same_as``: another engine record holding the same values (checked when lined up);
- ``scale``: a factor the engine applies outside the module, multiplied in (in the record's
  dtype, as the engine does): a number or ``sqrt(FIELD)`` of a config field (Gemma's
  embedding, scaled by ``sqrt(hidden_size)`` in vLLM's model, inside the module in Hugging
  Face's);
- ``swap``: two axes of the unpacked ``[batch, seq, ...]`` record to exchange (Gemma's q/k
  norms run on ``[batch, heads, seq, head_dim]`` in Hugging Face);
- ``tp``: how a tensor-parallel engine's ranks hold the record: ``""`` whole on every rank
  (after the all-reduce of a row-parallel layer; checked equal), ``cols`` each rank its
  share of the last axis (a column-parallel layer's output, attention's heads), ``heads``
  each rank its share of axis 1 (per-head records ``[tokens, heads, head_dim]``); a
  ``split`` record is column-parallel per part (each rank holds its q, k and v heads).

``hf_only`` lists Hugging Face records the engine never computes, with the reason.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import InputError

SPLITS = ("", "qkv", "gate_up")
TP_STYLES = ("", "cols", "heads")
_PART = re.compile(r"^(?P<whole>.+)\.part(?P<j>\d+)$")
_SCALE = re.compile(r"^(?:sqrt\((?P<field>\w+)\)|\d+(?:\.\d*)?(?:e-?\d+)?)$")


@dataclass(frozen=True)
class Rule:
    """One engine record (a key pattern) and what it is on the Hugging Face side."""

    engine: str
    hf: tuple[str, ...] = ()
    split: str = ""
    same_as: str = ""
    scale: str = ""
    swap: tuple[int, ...] = ()
    tp: str = ""

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise InputError(f"mapping rule {self.engine}: split {self.split!r} is not one of "
                             f"{', '.join(s for s in SPLITS if s)}")
        if bool(self.hf) == bool(self.same_as):
            raise InputError(f"mapping rule {self.engine}: give either hf keys or same_as "
                             "(one of the two)")
        if self.split and len(self.hf) not in (2, 3):
            raise InputError(f"mapping rule {self.engine}: a split needs 2 or 3 hf keys")
        if self.tp not in TP_STYLES:
            raise InputError(f"mapping rule {self.engine}: tp {self.tp!r} is not one of "
                             "cols, heads (or empty: whole on every rank)")
        if self.swap and (len(self.swap) != 2 or min(self.swap) < 0):
            raise InputError(f"mapping rule {self.engine}: swap takes two axes, e.g. [1, 2]")
        if self.scale and not _SCALE.match(self.scale):
            raise InputError(f"mapping rule {self.engine}: scale {self.scale!r} is not a "
                             "number or sqrt(FIELD)")

    def factor(self, config: Mapping[str, Any]) -> float | None:
        """The ``scale`` factor for a recorded config (None when the rule has none)."""
        if not self.scale:
            return None
        m = _SCALE.match(self.scale)
        assert m is not None
        if m["field"] is None:
            return float(self.scale)
        value = config.get(m["field"])
        if not isinstance(value, int | float) or value <= 0:
            raise InputError(f"mapping rule {self.engine}: the config has no positive "
                             f"{m['field']} for its scale")
        return float(value) ** 0.5

    @property
    def regex(self) -> re.Pattern[str]:
        return re.compile("^" + re.escape(self.engine).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


@dataclass(frozen=True)
class Table:
    """The rules of one architecture family, and the Hugging Face records without a
    counterpart (glob-free regexes on keys, with the reason)."""

    family: str
    rules: tuple[Rule, ...]
    hf_only: tuple[tuple[str, str], ...] = ()
    #: engine records with no Hugging Face module counterpart (regex, reason): listed, not
    #: compared
    engine_only: tuple[tuple[str, str], ...] = ()

    def find(self, key: str) -> tuple[Rule, dict[str, int]] | None:
        """The rule for an engine key (without its call suffix), and its layer number. A
        part of a split record (``:out.0.part<j>``, a stats-mode capture's statistics of
        each part) is the split's ``j``-th Hugging Face key, column-parallel."""
        for rule in self.rules:
            m = rule.regex.match(key)
            if m:
                return rule, ({"i": int(m["i"])} if "i" in m.groupdict() else {})
        part = _PART.match(key)
        if part:
            found = self.find(part["whole"])
            j = int(part["j"])
            if found is not None and found[0].split and j < len(found[0].hf):
                rule, var = found
                return Rule(key, (rule.hf[j],), tp="cols"), var
        return None

    def engine_only_reason(self, key: str) -> str | None:
        for pattern, reason in self.engine_only:
            if re.match(pattern, key):
                return reason
        return None

    def hf_only_reason(self, key: str) -> str | None:
        for pattern, reason in self.hf_only:
            if re.match(pattern, key):
                return reason
        return None


def _decoder_rules(*, qk_norm: bool = False) -> tuple[Rule, ...]:
    """vLLM's Llama-style decoder (Llama, Mistral, Qwen2, Qwen3): fused qkv and gate_up,
    SiluAndMul, RMSNorm with the residual add fused in (returning normed, sum)."""
    layer, attn, mlp = "model.layers.{i}", "model.layers.{i}.self_attn", "model.layers.{i}.mlp"
    rules = [
        Rule("model.embed_tokens:out", ("model.embed_tokens:out",)),
        Rule(f"{layer}.input_layernorm:out", (f"{layer}.input_layernorm:out",)),
        Rule(f"{layer}.input_layernorm:out.0", (f"{layer}.input_layernorm:out",)),
        Rule(f"{layer}.input_layernorm:out.1", ("model.layers.{prev}:out",)),
        Rule(f"{attn}.qkv_proj:out.0", (f"{attn}.q_proj:out", f"{attn}.k_proj:out",
                                        f"{attn}.v_proj:out"), split="qkv"),
        Rule(f"{attn}.attn:out", (f"{attn}.o_proj:in.0",), tp="cols"),
        Rule(f"{attn}.o_proj:out.0", (f"{attn}.o_proj:out",)),
        Rule(f"{attn}:out", same_as=f"{attn}.o_proj:out.0"),
        Rule(f"{layer}.post_attention_layernorm:out.0", (f"{layer}.post_attention_layernorm:out",)),
        Rule(f"{layer}.post_attention_layernorm:out.1",
             (f"{layer}.post_attention_layernorm:in.0",)),
        Rule(f"{mlp}.gate_up_proj:out.0", (f"{mlp}.gate_proj:out", f"{mlp}.up_proj:out"),
             split="gate_up"),
        Rule(f"{mlp}.act_fn:out", (f"{mlp}.down_proj:in.0",), tp="cols"),
        Rule(f"{mlp}.down_proj:out.0", (f"{mlp}.down_proj:out",)),
        Rule(f"{mlp}:out", same_as=f"{mlp}.down_proj:out.0"),
        Rule(f"{layer}:out.0", same_as=f"{mlp}.down_proj:out.0"),
        Rule(f"{layer}:out.1", same_as=f"{layer}.post_attention_layernorm:out.1"),
        Rule("model.norm:out.0", ("model.norm:out",)),
        Rule("model.norm:out.1", ("model.layers.{last}:out",)),
        Rule("root:out", same_as="model.norm:out.0"),
        Rule("logits_processor:out", ("lm_head:out",)),
    ]
    if qk_norm:  # Qwen3: RMSNorm over each head of q and k, before RoPE
        rules += [Rule(f"{attn}.q_norm:out", (f"{attn}.q_norm:out",), tp="heads"),
                  Rule(f"{attn}.k_norm:out", (f"{attn}.k_norm:out",), tp="heads")]
    return tuple(rules)


_ROPE_HF = (r"^model\.rotary_emb:out\.\d+$", "RoPE's cos/sin tables: vLLM keeps them inside "
             "each layer's rotary_emb")
_HF_ONLY = (
    _ROPE_HF,
    (r"^model\.layers\.\d+\.mlp\.act_fn:out$", "silu(gate) alone: vLLM's SiluAndMul computes "
     "silu(gate) * up in one op (compared as down_proj's input)"),
)


_ENGINE_ONLY = (
    (r"^model\.layers\.\d+\.self_attn\.rotary_emb:out\.\d+$", "q and k after RoPE: Hugging "
     "Face applies RoPE in a function, which no module records (vLLM also shares one "
     "rotary_emb between layers)"),
)


def _decoder_table(family: str, *, qk_norm: bool = False) -> Table:
    return Table(family, _decoder_rules(qk_norm=qk_norm), _HF_ONLY, _ENGINE_ONLY)


def _gemma3_rules() -> tuple[Rule, ...]:
    """vLLM's Gemma 3 text decoder: the embedding scaled by sqrt(hidden) outside the module,
    GemmaRMSNorm (1 + weight) with the residual add fused into input_layernorm and
    pre_feedforward_layernorm only, post-attention and post-feedforward norms, per-head q/k
    norms (on ``[tokens, heads, head_dim]``; Hugging Face's on ``[batch, heads, seq,
    head_dim]``), GeluAndMul (one module shared by every layer)."""
    layer, attn, mlp = "model.layers.{i}", "model.layers.{i}.self_attn", "model.layers.{i}.mlp"
    pre_ff = f"{layer}.pre_feedforward_layernorm"
    return (
        Rule("model.embed_tokens:out", ("model.embed_tokens:out",), scale="sqrt(hidden_size)"),
        Rule(f"{layer}.input_layernorm:out", (f"{layer}.input_layernorm:out",)),
        Rule(f"{layer}.input_layernorm:out.0", (f"{layer}.input_layernorm:out",)),
        Rule(f"{layer}.input_layernorm:out.1", ("model.layers.{prev}:out",)),
        Rule(f"{attn}.qkv_proj:out.0", (f"{attn}.q_proj:out", f"{attn}.k_proj:out",
                                        f"{attn}.v_proj:out"), split="qkv"),
        Rule(f"{attn}.q_norm:out", (f"{attn}.q_norm:out",), swap=(1, 2), tp="heads"),
        Rule(f"{attn}.k_norm:out", (f"{attn}.k_norm:out",), swap=(1, 2), tp="heads"),
        Rule(f"{attn}.attn:out", (f"{attn}.o_proj:in.0",), tp="cols"),
        Rule(f"{attn}.o_proj:out.0", (f"{attn}.o_proj:out",)),
        Rule(f"{attn}:out", same_as=f"{attn}.o_proj:out.0"),
        Rule(f"{layer}.post_attention_layernorm:out", (f"{layer}.post_attention_layernorm:out",)),
        Rule(f"{pre_ff}:out.0", (f"{pre_ff}:out",)),
        Rule(f"{pre_ff}:out.1", (f"{pre_ff}:in.0",)),
        Rule(f"{mlp}.gate_up_proj:out.0", (f"{mlp}.gate_proj:out", f"{mlp}.up_proj:out"),
             split="gate_up"),
        Rule(f"{mlp}.act_fn:out", (f"{mlp}.down_proj:in.0",), tp="cols"),
        Rule(f"{mlp}.down_proj:out.0", (f"{mlp}.down_proj:out",)),
        Rule(f"{mlp}:out", same_as=f"{mlp}.down_proj:out.0"),
        Rule(f"{layer}.post_feedforward_layernorm:out",
             (f"{layer}.post_feedforward_layernorm:out",)),
        Rule(f"{layer}:out.0", same_as=f"{layer}.post_feedforward_layernorm:out"),
        Rule(f"{layer}:out.1", same_as=f"{pre_ff}:out.1"),
        Rule("model.norm:out.0", ("model.norm:out",)),
        Rule("model.norm:out.1", ("model.layers.{last}:out",)),
        Rule("root:out", same_as="model.norm:out.0"),
        Rule("logits_processor:out", ("lm_head:out",)),
    )


_GEMMA_HF_ONLY = (
    _ROPE_HF,
    (r"^model\.layers\.\d+\.mlp\.act_fn:out$", "gelu(gate) alone: vLLM's GeluAndMul computes "
     "gelu(gate) * up in one op (compared as down_proj's input)"),
)


#: model_type -> table (the vLLM module layouts of those families)
TABLES: dict[str, Table] = {
    "llama": _decoder_table("llama"),
    "mistral": _decoder_table("mistral"),
    "qwen2": _decoder_table("qwen2"),
    "qwen3": _decoder_table("qwen3", qk_norm=True),
    "gemma3_text": Table("gemma3_text", _gemma3_rules(), _GEMMA_HF_ONLY, _ENGINE_ONLY),
}


def table_for(config: Mapping[str, Any], mapping: str | os.PathLike[str] | None = None
              ) -> Table:
    """The table for a recorded config: the mapping file's when given, else the family's."""
    if mapping is not None:
        return read_mapping(mapping)
    family = str(config.get("model_type") or "")
    if family not in TABLES:
        raise InputError(f"no mapping table for model type {family or '?'} (known: "
                         f"{', '.join(sorted(TABLES))}): give one with --mapping FILE "
                         "(docs/vllm.md)")
    return TABLES[family]


def read_mapping(path: str | os.PathLike[str]) -> Table:
    """A user mapping file: ``{"family": ..., "rules": [{"engine": KEY, "hf": [KEYS],
    "split": "qkv"|"gate_up"|"", "same_as": KEY, "scale": "sqrt(FIELD)"|NUMBER,
    "swap": [AXIS, AXIS], "tp": "cols"|"heads"|""}], "hf_only": [[REGEX, REASON]],
    "engine_only": [[REGEX, REASON]],
    }`` (the Hugging Face capture records the inputs the engine's dump asks for in
    ``meta.reference_inputs``)."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
        rules = tuple(Rule(str(r["engine"]), tuple(map(str, r.get("hf", ()))),
                           str(r.get("split", "")), str(r.get("same_as", "")),
                           str(r.get("scale", "")), tuple(int(a) for a in r.get("swap", ())),
                           str(r.get("tp", "")))
                      for r in doc["rules"])
        hf_only = tuple((str(a), str(b)) for a, b in doc.get("hf_only", ()))
        engine_only = tuple((str(a), str(b)) for a, b in doc.get("engine_only", ()))
        for pattern, _ in hf_only + engine_only:
            re.compile(pattern)
    except FileNotFoundError:
        raise InputError(f"--mapping {p}: no such file") from None
    except InputError as exc:  # a rule that cannot hold (Rule's own checks)
        raise InputError(f"--mapping {p}: {exc}") from None
    except re.error as exc:
        raise InputError(f"--mapping {p}: {exc.pattern!r} is not a regular expression "
                         f"({exc})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
            ValueError, AttributeError) as exc:
        raise InputError(f"--mapping {p}: not a mapping file ({exc})") from None
    return Table(str(doc.get("family", p.stem)), rules, hf_only, engine_only)

"""Which record of another implementation is which Hugging Face record: mapping tables.

A table is found from the dump's recorded config (``model_type``); a user mapping file
(JSON, same fields, see docs/vllm.md) adds a family or replaces one. Each rule names a
record of the engine (``{i}`` a layer number) and the Hugging Face key(s) it holds
(``{prev}`` is layer i-1, ``{last}`` the last layer):

- one target: the same tensor under another name (``attn:out`` is what Hugging Face feeds
  ``o_proj``: ``o_proj:in.0``);
- several targets with a ``split``: a fused projection cut along its last axis by the
  config's sizes (``qkv``: query, key and value heads; ``gate_up``: two intermediate halves);
- ``same_as``: another engine record holding the same values (checked when lined up).

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

from ..errors import InputError

SPLITS = ("", "qkv", "gate_up")


@dataclass(frozen=True)
class Rule:
    """One engine record (a key pattern) and what it is on the Hugging Face side."""

    engine: str
    hf: tuple[str, ...] = ()
    split: str = ""
    same_as: str = ""

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise InputError(f"mapping rule {self.engine}: split {self.split!r} is not one of "
                             f"{', '.join(s for s in SPLITS if s)}")
        if bool(self.hf) == bool(self.same_as):
            raise InputError(f"mapping rule {self.engine}: give either hf keys or same_as "
                             "(one of the two)")
        if self.split and len(self.hf) not in (2, 3):
            raise InputError(f"mapping rule {self.engine}: a split needs 2 or 3 hf keys")

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
        """The rule for an engine key (without its call suffix), and its layer number."""
        for rule in self.rules:
            m = rule.regex.match(key)
            if m:
                return rule, ({"i": int(m["i"])} if "i" in m.groupdict() else {})
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
        Rule(f"{attn}.attn:out", (f"{attn}.o_proj:in.0",)),
        Rule(f"{attn}.o_proj:out.0", (f"{attn}.o_proj:out",)),
        Rule(f"{attn}:out", same_as=f"{attn}.o_proj:out.0"),
        Rule(f"{layer}.post_attention_layernorm:out.0", (f"{layer}.post_attention_layernorm:out",)),
        Rule(f"{layer}.post_attention_layernorm:out.1",
             (f"{layer}.post_attention_layernorm:in.0",)),
        Rule(f"{mlp}.gate_up_proj:out.0", (f"{mlp}.gate_proj:out", f"{mlp}.up_proj:out"),
             split="gate_up"),
        Rule(f"{mlp}.act_fn:out", (f"{mlp}.down_proj:in.0",)),
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
        rules += [Rule(f"{attn}.q_norm:out", (f"{attn}.q_norm:out",)),
                  Rule(f"{attn}.k_norm:out", (f"{attn}.k_norm:out",))]
    return tuple(rules)


_HF_ONLY = (
    (r"^model\.rotary_emb:out\.\d+$", "RoPE's cos/sin tables: vLLM keeps them inside each "
     "layer's rotary_emb"),
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


#: model_type -> table (the vLLM module layouts of those families)
TABLES: dict[str, Table] = {
    "llama": _decoder_table("llama"),
    "mistral": _decoder_table("mistral"),
    "qwen2": _decoder_table("qwen2"),
    "qwen3": _decoder_table("qwen3", qk_norm=True),
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
    "split": "qkv"|"gate_up"|"", "same_as": KEY}], "hf_only": [[REGEX, REASON]],
    "engine_only": [[REGEX, REASON]],
    }`` (the Hugging Face capture records the inputs the engine's dump asks for in
    ``meta.reference_inputs``)."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
        rules = tuple(Rule(str(r["engine"]), tuple(map(str, r.get("hf", ()))),
                           str(r.get("split", "")), str(r.get("same_as", "")))
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

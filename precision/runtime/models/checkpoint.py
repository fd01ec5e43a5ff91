"""Which class to load a Hugging Face checkpoint as, and proof that no weight was invented.

The class is, in order: ``--class NAME`` (a transformers class or auto-class name); the
first of the config's ``architectures`` that transformers has; the first task auto-class
whose mapping knows the config (by model type, see :data:`TASKS`); ``AutoModel``.

A class whose head the checkpoint lacks (a sentence-embedding checkpoint whose config names
``BertForMaskedLM``) would get a randomly initialised head: the base model is loaded instead
and the fallback is reported. Weights still missing after that refuse the load, by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import InputError, ModelError

#: task auto-classes tried when the config names no class transformers has, in order;
#: ``encoder-decoder`` configs try the first list, the others the second
TASKS = (
    ("AutoModelForSeq2SeqLM", "AutoModelForSpeechSeq2Seq", "AutoModelForImageTextToText"),
    ("AutoModelForImageTextToText", "AutoModelForMaskedLM", "AutoModelForCausalLM",
     "AutoModelForImageClassification", "AutoModelForAudioClassification",
     "AutoModelForCTC", "AutoModelForSequenceClassification"),
)


@dataclass(frozen=True)
class Choice:
    """The class to load, and why: ``--class``, ``config``, ``task`` or ``default``."""

    cls: Any
    name: str
    reason: str


def choose_class(config: Any, override: str | None = None) -> Choice:
    """The transformers class for ``config`` (see the module docstring for the order)."""
    import transformers

    if override:
        cls = getattr(transformers, override, None)
        if cls is None or not hasattr(cls, "from_pretrained"):
            raise InputError(f"--class {override}: transformers {transformers.__version__} has "
                             "no such model class (e.g. BertModel, AutoModelForMaskedLM)")
        return Choice(cls, override, "--class")
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, str(name), None)
        if cls is not None and hasattr(cls, "from_pretrained"):
            return Choice(cls, str(name), "config")
    # a decoder-only model type (gpt2, llama) is a causal LM before anything else
    tasks = list(TASKS[0] if getattr(config, "is_encoder_decoder", False) else TASKS[1])
    causal = transformers.AutoModelForCausalLM._model_mapping
    masked = transformers.AutoModelForMaskedLM._model_mapping
    if type(config) in causal and type(config) not in masked:
        tasks.insert(0, "AutoModelForCausalLM")
    for name in tasks:
        auto = getattr(transformers, name, None)
        if auto is not None and type(config) in auto._model_mapping:
            return Choice(auto, name, "task")
    return Choice(transformers.AutoModel, "AutoModel", "default")


def from_pretrained(cls: Any, path: Path, **kwargs: Any) -> tuple[Any, list[str]]:
    """``cls.from_pretrained`` and the weights it had to initialise (missing or resized)."""
    model, info = cls.from_pretrained(path, local_files_only=True, output_loading_info=True,
                                      **kwargs)
    missing = sorted(set(info.get("missing_keys") or ()))
    missing += sorted({str(k[0]) if isinstance(k, tuple) else str(k)
                       for k in info.get("mismatched_keys") or ()})
    return model, missing


def load_checked(path: Path, config: Any, override: str | None,
                 **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """Load the checkpoint at ``path`` with every weight from the checkpoint.

    Returns the model and what to record: ``class`` (asked for), ``reason``, ``loaded``
    (the class loaded) and ``fallback`` (a one-line note, or ``None``). Refuses with the
    missing weights' names when neither the chosen class nor the base model has them all.
    """
    import transformers

    choice = choose_class(config, override)
    model, missing = from_pretrained(choice.cls, path, **kwargs)
    record: dict[str, Any] = {"class": choice.name, "reason": choice.reason,
                              "loaded": type(model).__name__, "fallback": None}
    if not missing:
        return model, record
    asked = lacking = type(model).__name__
    base_missing = missing
    if override is None and choice.cls is not transformers.AutoModel:
        del model
        base, base_missing = from_pretrained(transformers.AutoModel, path, **kwargs)
        lacking = type(base).__name__
        if not base_missing:
            record["loaded"] = type(base).__name__
            record["fallback"] = (f"the checkpoint lacks the weights of {asked}'s head "
                                  f"({_names(missing)}): capturing its base model "
                                  f"{type(base).__name__}")
            return base, record
    hint = ("" if override else ": pass --class with a class the checkpoint has all the "
            "weights of (e.g. its base model)")
    raise ModelError(f"{path} lacks {len(base_missing)} weight(s) of {lacking}, which would "
                     f"be newly initialised: {_names(base_missing)}{hint}")


def _names(keys: list[str], most: int = 4) -> str:
    shown = ", ".join(keys[:most])
    return shown + (f" and {len(keys) - most} more" if len(keys) > most else "")


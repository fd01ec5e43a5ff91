"""Options declared once for the commands that share them.

The comparison options, for ``precision compare`` and ``precision report``:
:func:`comparison_options` adds them to a command and calls it with the
:class:`~precision.judge.options.CompareOptions` they make; :class:`ComparisonCommand` lists
them in ``--help`` after the command's own options (its outputs), under their groups: what
to compare, how to judge, how to run.

The model's inputs (:func:`input_options`: ``--prompt``, ``--prompts``, ``--image``,
``--audio``, ``--feed``) and ``--engine-arg`` (:data:`ENGINE_ARG`), for ``precision capture``
and ``precision port``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import fields
from typing import Any, TypeVar, cast

import click

from ..judge.options import CompareOptions
from ..judge.profiles import PROFILE_NAMES
from .common import ByteSize

F = TypeVar("F", bound=Callable[..., Any])

WHAT, JUDGE, RUN = "What to compare", "How to judge", "How to run"
#: the heading of a command's own options (its outputs), before the groups
OWN = "Options"
DEFAULTS = CompareOptions()


class ComparisonOption(click.Option):
    """A flag that sets one field of :class:`CompareOptions` (its name), shown under
    ``group`` in ``--help``."""

    def __init__(self, *args: Any, group: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group = group


def _option(group: str, flag: str, field: str, **attrs: Any) -> Callable[[F], F]:
    return click.option(flag, field, cls=ComparisonOption, group=group, **attrs)


#: the comparison options in --help order, each named after the CompareOptions field it sets
OPTIONS = (
    _option(WHAT, "--reference", "reference", metavar="REF.st",
            help="The same inputs in the target's precision on a trusted backend (the CPU): "
                 "each record is judged against the error that run makes. Default: BASE's "
                 "sibling BASE.<precision>-reference.st when it exists (capture --expect)."),
    _option(WHAT, "--no-reference", "auto_reference", is_flag=True, flag_value=False,
            default=DEFAULTS.auto_reference,
            help="Judge by the fixed noise limits even when a reference exists."),
    _option(WHAT, "--mapping", "mapping", metavar="FILE.json",
            help="Which record is which Hugging Face record (JSON). 'rules': an engine's "
                 "records (capture --engine vllm) of a family without a built-in table "
                 "(docs/vllm.md, 'Alignment'); 'modules': module path prefixes of another "
                 "framework's or code base's msprobe dump, e.g. {\"modules\": "
                 "{\"net.blocks.{i}\": \"model.layers.{i}\"}} (docs/external.md)."),
    _option(WHAT, "--allow-different-models", "allow_different_models", is_flag=True,
            help="Compare dumps whose model configs differ."),
    _option(WHAT, "--allow-partial", "allow_partial", is_flag=True,
            help="Read the shards of an unfinished multi-rank dump (no index.json)."),
    _option(JUDGE, "--rtol", "rtol", type=float,
            help="Override the diffuse-drift limit, as a fraction (0.01 is 1%): DRIFT when "
                 "the element-scaled rms error exceeds it, with a reference too (default: 5 eps "
                 "of the pair's coarser format, 0.039 for bf16, 0.0049 for fp16; "
                 "docs/verdicts.md)."),
    _option(JUDGE, "--atol", "atol", type=float,
            help="Errors within this absolute value are never DRIFT."),
    _option(JUDGE, "--profile", "profile", type=click.Choice(PROFILE_NAMES),
            help="Judge as fp32 vs this precision instead of what the dumps record."),
    _option(JUDGE, "--base-dtype", "base_dtype", type=click.Choice(PROFILE_NAMES),
            help="What the baseline computed in, for a file that cannot say (.npy logits "
                 "saved as fp32 from a bf16 run)."),
    _option(JUDGE, "--target-dtype", "target_dtype", type=click.Choice(PROFILE_NAMES),
            help="What the target computed in, likewise."),
    _option(JUDGE, "--fail-on", "fail_on", default=DEFAULTS.fail_on, show_default=True,
            type=click.Choice(["drift", "overflow", "nan", "any", "never"]),
            help="Exit 1 when a row has such a status. drift: DRIFT/OVERFLOW/NAN/MISMATCH; "
                 "overflow: OVERFLOW/NAN; any: also MISSING."),
    _option(JUDGE, "--topk", "topk", default=DEFAULTS.topk, show_default=True, type=int,
            help="k for the logits top-k overlap."),
    _option(RUN, "--jobs", "jobs", type=click.IntRange(min=1), metavar="N",
            help="Worker processes sharing the tensors (default: the usable cores)."),
    _option(RUN, "--max-memory", "max_memory", type=ByteSize(), metavar="SIZE",
            help="Cap the work buffers of all jobs together, e.g. 256M or 2G: chunks shrink, "
                 "then fewer jobs run. Default: about 10 MiB per job (a logits chunk holds "
                 "at least one vocabulary row)."),
)


def comparison_options(command: F) -> F:
    """Add the comparison options to ``command`` and call it with ``options``, the
    :class:`CompareOptions` they make, in their place. Put it under the command's
    ``@guard``."""
    names = [f.name for f in fields(CompareOptions)]

    @functools.wraps(command)
    def with_options(*args: Any, **kwargs: Any) -> Any:
        chosen = {name: kwargs.pop(name) for name in names}
        return command(*args, options=CompareOptions(**chosen), **kwargs)

    for option in reversed(OPTIONS):
        with_options = option(with_options)
    return cast(F, with_options)


class ComparisonCommand(click.Command):
    """A command that takes :func:`comparison_options`: its ``--help`` lists its own
    options, then the comparison options under their groups, in one column layout."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {OWN: [], WHAT: [], JUDGE: [], RUN: []}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx) if isinstance(param, click.Option) else None
            if record is not None:
                sections[getattr(param, "group", OWN)].append(record)
        width = min(30, max(len(term) for rows in sections.values() for term, _ in rows))
        for title, rows in sections.items():
            if rows:
                with formatter.section(title):
                    formatter.write_dl([(term.ljust(width), text) for term, text in rows])


#: what a model runs on, as ``precision capture`` and ``precision port`` take it (the
#: parameters ``prompts``, ``prompts_file``, ``images``, ``audio``, ``feed``)
INPUTS = (
    click.option("--prompt", "prompts", multiple=True, metavar="TEXT",
                 help="A prompt (repeat for a batch). Default: three built-in Flan-style "
                      "prompts."),
    click.option("--prompts", "prompts_file", metavar="FILE",
                 help="File with one prompt per line."),
    click.option("--image", "images", multiple=True, metavar="FILE",
                 help="An image for the model's image processor (repeat for a batch)."),
    click.option("--audio", "audio", multiple=True, metavar="FILE.wav",
                 help="A wav file for the model's feature extractor (repeat for a batch)."),
    click.option("--feed", metavar="FILE",
                 help="A .safetensors or .npz file of named tensors passed to the model's "
                      "forward as they are (any model, any preprocessing)."),
)

#: ``--engine-arg``: an argument for ``vllm.LLM`` (capture's and port's ``--engine vllm``)
ENGINE_ARG = click.option(
    "--engine-arg", "engine_args", multiple=True, metavar="KEY=VALUE",
    help="With --engine vllm: an argument for vllm.LLM (repeatable; VALUE read as JSON when "
         "it is), e.g. max_model_len=512, kv_cache_memory_bytes=1073741824 (on a CPU vLLM "
         "otherwise reserves most of the memory), trust_remote_code=true.")


def input_options(command: F) -> F:
    """Add :data:`INPUTS` to ``command``, in their order, where this decorator stands."""
    for option in reversed(INPUTS):
        command = option(command)
    return command

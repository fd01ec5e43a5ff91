"""``precision capture`` and ``precision inspect``: record a model, show a dump."""

from __future__ import annotations

import os

import click

from ..engines.vllm.launch import TOPK
from .common import (
    CONTEXT,
    guard,
    stderr_log,
)
from .options import ENGINE_ARG, input_options


@click.command(context_settings=CONTEXT)
@click.option("--model", "model", required=True, metavar="DIR",
              help="Hugging Face model directory (config.json, weights, tokenizer).")
@click.option("--device", default="cpu", show_default=True, metavar="DEV",
              help="cpu, cuda, cuda:N, npu or npu:N.")
@click.option("--device-map", metavar="auto|balanced|sequential|MAP.json",
              help="Spread a model too big for one device over all of them (needs "
                   "accelerate), or place modules as MAP.json says: "
                   '{"encoder": 0, "decoder": 1, "lm_head": "cpu"}; "disk" offloads.')
@click.option("--dtype", default="fp32", show_default=True,
              type=click.Choice(["fp32", "fp16", "bf16"]), help="Compute dtype of the model.")
@input_options
@click.option("--class", "model_class", metavar="NAME",
              help="Load the model as this transformers class (e.g. BertModel) instead of "
                   "the one its config names.")
@click.option("--attention", metavar="IMPL",
              help="transformers' attention implementation: eager (its own matmul, softmax "
                   "and mask add, each an operation --level ops records) or sdpa (PyTorch's "
                   "fused kernel). Default: the model's own choice.")
@click.option("--delta-rule", "delta_rule", type=click.Choice(["chunked", "recurrent"]),
              help="Hybrid linear-attention models (Qwen3.5, Qwen3-Next): run every call of "
                   "the gated delta rule in transformers' chunked form or its recurrent "
                   "(token by token) form. Default: the model's own choice (chunked over a "
                   "prompt, recurrent for one new token).")
@click.option("--mode", default="auto", show_default=True,
              type=click.Choice(["auto", "full", "stats"]),
              help="full: store every tensor. stats: per-tensor statistics only (small). "
                   "auto: stats above 1B parameters, else full.")
@click.option("--full", "full_globs", multiple=True, metavar="GLOB",
              help="In stats mode, still store whole the outputs of modules whose name "
                   "matches (repeatable), e.g. lm_head for the logits metrics.")
@click.option("--include", multiple=True, metavar="GLOB",
              help="Capture only modules whose name matches (repeatable), e.g. 'encoder.*'.")
@click.option("--exclude", multiple=True, metavar="GLOB",
              help="Skip modules whose name matches (repeatable), e.g. '*.dropout'.")
@click.option("--level", default="modules", show_default=True,
              type=click.Choice(["modules", "ops"]),
              help="modules: each module's outputs. ops: also the torch operations each "
                   "module's own forward calls (softmax, a residual add, a cast), keyed "
                   "MODULE/OP:out#N (docs/format.md); --inputs then records their inputs.")
@click.option("--ops", "ops_include", multiple=True, metavar="GLOB",
              help="With --level ops: record only operations whose name matches "
                   "(repeatable), e.g. softmax, 'add*'.")
@click.option("--skip-ops", "ops_exclude", multiple=True, metavar="GLOB",
              help="With --level ops: skip operations whose name matches (repeatable).")
@click.option("--backward", is_flag=True,
              help="One training step: also record each module's output gradient (:grad) "
                   "and every parameter's gradient (:pgrad), unscaled, in fp32.")
@click.option("--loss-scale", default=1.0, show_default=True, type=float,
              help="Multiply the loss before backward (fp16 training uses e.g. 65536).")
@click.option("--every", default=1, show_default=True, type=int, metavar="K",
              help="Capture only every K-th block (blocks 0, K, 2K, ...) of large models.")
@click.option("--inputs", "input_globs", multiple=True, metavar="GLOB",
              help="Also record the inputs of modules whose name matches (repeatable). "
                   "Always recorded: T5's relative_attention_bias bucket ids.")
@click.option("--keep-fp32", multiple=True, default=("auto",), show_default=True,
              metavar="auto|none|GLOB[:fp32]",
              help="auto: as transformers loads (T5 keeps wo in fp32 under fp16). none: cast "
                   "every module. GLOB: keep matching modules in fp32 (repeatable; GLOBs alone "
                   "start from none: add auto to keep transformers' own as well): they "
                   "compute in fp32 on upcast inputs and hand their outputs back in the "
                   "model's dtype. GLOB:fp32 hands them on in fp32 instead, for a residual "
                   "stream that needs fp32's range (e.g. 'model.layers.*:fp32'; the modules "
                   "after them still compute in fp16/bf16). GLOB:compute always hands back.")
@click.option("--replay", metavar="BASE.st",
              help="Reuse the exact token ids, masks and decoder ids of an earlier dump.")
@click.option("--expect", "expect", multiple=True, type=click.Choice(["fp16", "bf16"]),
              help="Also capture the same inputs in this precision here, as OUT's "
                   "same-precision reference (OUT.bf16-reference.st): compare then judges a "
                   "target in that precision against what it costs on this model, layer by "
                   "layer. One more forward and dump per precision (repeatable).")
@click.option("--max-new-tokens", default=8, show_default=True, type=int,
              help="Tokens to generate greedily before the captured forward "
                   "(gives encoder-decoders their decoder ids).")
@click.option("--capture-steps", is_flag=True,
              help="Also record every layer at each decoding step of the generation "
                   "(call indices #0, #1, ...); the teacher-forced forward comes after.")
@click.option("--steps", "steps_spec", metavar="LIST",
              help="Like --capture-steps, for these decoding steps only: e.g. 0,3,5-7 "
                   "(0 is the first; an encoder runs in step 0).")
@click.option("--num-beams", default=1, show_default=True, type=int,
              help="Beam search width for the generation (1: greedy, with per-step top-k "
                   "log-probabilities recorded).")
@click.option("-o", "--output", metavar="OUT.st", help="Dump file to write (required unless "
              "--dry-run).")
@click.option("--dry-run", is_flag=True,
              help="Write nothing: run the model on the meta device (config and tokenizer "
                   "only, no weights read) and print the records and dump sizes a capture "
                   "with these options would make.")
@click.option("--force", is_flag=True, help="Overwrite OUT.st if it exists.")
@click.option("--fsync", is_flag=True,
              help="Force the dump to disk before renaming it into place (power-loss safe).")
@click.option("--engine", default="hf", show_default=True, type=click.Choice(["hf", "vllm"]),
              help="hf: run the model with Hugging Face transformers. vllm: run it in a vLLM "
                   "engine (pip install 'precision[vllm]'), eager, no prefix caching, greedy "
                   f"with the top {TOPK} log-probabilities, and record vLLM's own modules; "
                   "compare lines them up with a Hugging Face capture that replays this dump "
                   "(docs/vllm.md). Takes --model, --dtype, --prompt(s), --max-new-tokens, "
                   "--mode, -o, --force, -q and --engine-arg only.")
@ENGINE_ARG
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@guard
def capture(model: str, device: str, device_map: str | None, dtype: str,
            prompts: tuple[str, ...],
            prompts_file: str | None, images: tuple[str, ...], audio: tuple[str, ...],
            feed: str | None, model_class: str | None, attention: str | None,
            delta_rule: str | None, mode: str,
            full_globs: tuple[str, ...],
            include: tuple[str, ...],
            exclude: tuple[str, ...], level: str, ops_include: tuple[str, ...],
            ops_exclude: tuple[str, ...], backward: bool, loss_scale: float, every: int,
            input_globs: tuple[str, ...],
            keep_fp32: tuple[str, ...], replay: str | None, expect: tuple[str, ...],
            max_new_tokens: int, capture_steps: bool, steps_spec: str | None,
            num_beams: int, output: str | None, dry_run: bool,
            force: bool, fsync: bool, engine: str, engine_args: tuple[str, ...],
            quiet: bool) -> None:
    """Run a model and dump its per-layer outputs and logits.

    \b
    Examples:
      precision capture --model fixtures/tiny-flan-t5 --dtype fp32 -o base.st
      precision capture --model fixtures/tiny-flan-t5 --dtype fp16 --replay base.st -o fp16.st
      precision capture --model ./qwen --device cuda --dtype bf16 --mode stats -o q.st
      precision capture --model ./qwen --dtype fp32 --expect bf16 -o base.st

    \b
    vLLM bf16 against Hugging Face fp32, layer by layer (docs/vllm.md):
      precision capture --engine vllm --model ./qwen --dtype bf16 -o vllm.st
      precision capture --model ./qwen --dtype fp32 --replay vllm.st --expect bf16 -o hf.st
      precision compare hf.st vllm.st
    """
    if engine == "vllm":
        _capture_vllm(model=model, dtype=dtype, prompts=prompts, prompts_file=prompts_file,
                      max_new_tokens=max_new_tokens, mode=mode, output=output, force=force,
                      engine_args=engine_args, quiet=quiet)
        return
    if engine_args:
        raise click.UsageError("--engine-arg goes with --engine vllm")
    from ..runtime.capture.recorder import DEFAULT_INPUT_GLOBS
    from ..runtime.run.runner import CaptureOptions, parse_steps, run_capture

    if not output and not dry_run:
        raise click.UsageError("Missing option '-o' / '--output' (or give --dry-run).")
    if replay:
        _refuse_with_replay(replay, max_new_tokens, num_beams)
    opts = CaptureOptions(model=model, output=output or "", device=device, device_map=device_map,
                          dtype=dtype, full=full_globs,
                          steps=parse_steps(steps_spec) if steps_spec else None,
                          prompts=prompts, prompts_file=prompts_file, mode=mode,
                          include=include, exclude=exclude, keep_fp32=keep_fp32,
                          inputs=DEFAULT_INPUT_GLOBS + input_globs, every=every,
                          backward=backward, loss_scale=loss_scale, level=level,
                          ops_include=ops_include, ops_exclude=ops_exclude,
                          replay=replay, expect=expect, max_new_tokens=max_new_tokens,
                          num_beams=num_beams,
                          capture_steps=capture_steps, force=force, fsync=fsync,
                          images=images, audio=audio, feed=feed, model_class=model_class,
                          attention=attention, delta_rule=delta_rule)
    if dry_run:
        from ..runtime.run.plan import plan_model, render

        click.echo(render(plan_model(opts)))
        return
    path = run_capture(opts, stderr_log(quiet or os.environ.get("RANK", "0") != "0"))
    if not quiet and os.environ.get("RANK", "0") == "0":  # one report for a torchrun job
        from ..dumps import load, reference_path
        from ..dumps.atomic import format_bytes

        for written in (path, *(reference_path(path, e) for e in expect)):
            d = load(written)
            click.echo(f"wrote {written}: {len(d.entries)} records, {len(d.tensors)} tensors, "
                       f"{format_bytes(d.file_bytes)} ({d.mode} mode)")

#: what ``--replay`` takes from the baseline: its inputs
REPLAYED = {"prompts": "--prompt", "prompts_file": "--prompts", "images": "--image",
            "audio": "--audio", "feed": "--feed"}


def _refuse_with_replay(replay: str, max_new_tokens: int, num_beams: int) -> None:
    """``--replay`` runs the baseline's inputs and generates as many tokens as it did, with
    as many beams: an input, another length or another beam count given beside it would be
    dropped, so it is refused (the baseline's own, given again, is fine)."""
    from click.core import ParameterSource

    from ..dumps import load

    ctx = click.get_current_context()
    given = [flag for name, flag in REPLAYED.items()
             if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE]
    if given:
        raise click.UsageError(f"--replay runs the baseline's own inputs: {', '.join(given)} "
                               "cannot go with it")
    if ctx.get_parameter_source("max_new_tokens") == ParameterSource.COMMANDLINE:
        made = load(replay).meta.get("max_new_tokens")
        if isinstance(made, int) and made != max_new_tokens:
            raise click.UsageError(f"--max-new-tokens {max_new_tokens}: --replay generates as "
                                   f"many tokens as the baseline did ({made})")
    if ctx.get_parameter_source("num_beams") == ParameterSource.COMMANDLINE:
        beams = (load(replay).meta.get("generation") or {}).get("num_beams", 1)
        if isinstance(beams, int) and beams != num_beams:
            raise click.UsageError(f"--num-beams {num_beams}: --replay searches with as many "
                                   f"beams as the baseline did ({beams})")


#: what ``capture --engine vllm`` takes; every other option is Hugging Face's alone
VLLM_PARAMS = ("model", "dtype", "prompts", "prompts_file", "max_new_tokens", "mode", "output",
               "force", "engine", "engine_args", "quiet")


def _capture_vllm(*, model: str, dtype: str, prompts: tuple[str, ...],
                  prompts_file: str | None, max_new_tokens: int, mode: str,
                  output: str | None, force: bool, engine_args: tuple[str, ...],
                  quiet: bool) -> None:
    """``capture --engine vllm``: refuse Hugging Face's options, run the engine, report."""
    from click.core import ParameterSource

    from ..engines.vllm.launch import (
        EngineOptions,
        parse_engine_args,
        require_vllm,
        run_vllm_capture,
    )

    ctx = click.get_current_context()
    given = [p for p in ctx.command.params if p.name and p.name not in VLLM_PARAMS
             and ctx.get_parameter_source(p.name) not in (ParameterSource.DEFAULT, None)]
    if given:
        flag = max(given[0].opts, key=len)
        raise click.UsageError(f"{flag} is a Hugging Face capture option; --engine vllm takes "
                               "--model, --dtype, --prompt(s), --max-new-tokens, --mode, -o, "
                               "--force and --engine-arg (replay the vLLM dump with a Hugging "
                               "Face capture for the rest)")
    if not output:
        raise click.UsageError("Missing option '-o' / '--output'.")
    require_vllm()
    opts = EngineOptions(model=model, output=output, dtype=dtype, prompts=prompts,
                         prompts_file=prompts_file, max_new_tokens=max_new_tokens,
                         mode="full" if mode == "auto" else mode,
                         engine_args=parse_engine_args(engine_args), force=force, quiet=quiet)
    run_vllm_capture(opts, stderr_log(quiet))
    if not quiet:
        from ..dumps import load
        from ..dumps.atomic import format_bytes

        d = load(output)
        click.echo(f"wrote {output}: {len(d.entries)} records, {len(d.tensors)} tensors, "
                   f"{format_bytes(d.file_bytes)} ({d.mode} mode, vLLM "
                   f"{d.meta.get('engine', {}).get('version', '?')}, "
                   f"{d.meta.get('engine', {}).get('steps', '?')} engine steps)")


@click.command(context_settings=CONTEXT)
@click.argument("dump", metavar="DUMP.st")
@click.option("--all", "show_all", is_flag=True, help="List every record, aliases included.")
@guard
def inspect(dump: str, show_all: bool) -> None:
    """Show what a dump holds: metadata, then its records in execution order.

    An unfinished multi-rank dump (shards, no index.json) is shown as INCOMPLETE. Another
    tool's files open as compare opens them (an msprobe folder, logits arrays, vLLM's
    JSON), with what was left out of them.
    """
    from ..dumps.external import open_any
    from ..outputs.render import print_inspect

    print_inspect(open_any(dump, allow_partial=True), show_all=show_all)

"""``precision port``: one command from a model to a signed-off port report."""

from __future__ import annotations

import sys

import click

from .common import CONTEXT, INTERRUPTED, guard, stderr_log
from .options import ENGINE_ARG, input_options


@click.command(context_settings=CONTEXT)
@click.option("--model", required=True, metavar="DIR",
              help="Hugging Face model directory (config.json, weights, tokenizer).")
@click.option("--device", default="cpu", show_default=True, metavar="DEV",
              help="The target: cpu, cuda, cuda:N, npu or npu:N.")
@click.option("--dtype", default="fp16", show_default=True,
              type=click.Choice(["fp32", "fp16", "bf16"]), help="The target's compute dtype.")
@click.option("--baseline-device", default="cpu", show_default=True, metavar="DEV",
              help="Where the fp32 baseline runs, where the CPU is too slow or too small "
                   "(the report says what that costs the verdict).")
@click.option("--engine", default="hf", show_default=True, type=click.Choice(["hf", "vllm"]),
              help="Run the target with Hugging Face transformers or in a vLLM engine "
                   "(docs/vllm.md; no keep-fp32 fix search then).")
@ENGINE_ARG
@input_options
@click.option("--mode", default="full", show_default=True, type=click.Choice(["full", "stats"]),
              help="Capture mode of every run (stats for models too big to dump whole).")
@click.option("--backward", is_flag=True,
              help="One training step: gradients recorded and compared too.")
@click.option("--max-new-tokens", default=8, show_default=True, type=int,
              help="Tokens generated greedily (the generations compared).")
@click.option("--keep-fp32", multiple=True, default=("auto",), show_default=True,
              metavar="auto|none|GLOB[:fp32]", help="The target's dtype policy, as for capture.")
@click.option("--repeat", default=3, show_default=True, type=int,
              help="Target runs in all for the self-consistency check (bitwise).")
@click.option("--budget", default=8, show_default=True, type=int,
              help="Most modules the fix search keeps in fp32 (as for suggest).")
@click.option("-o", "--output", default="port", show_default=True, metavar="DIR",
              help="The port folder: dumps, stamps, report.html, port.json, PORT.md.")
@click.option("--force", is_flag=True, help="Redo every stage (else a stage whose inputs are "
              "unchanged is reused).")
@click.option("-q", "--quiet", is_flag=True, help="Print only the verdict line.")
@guard
def port(model: str, device: str, dtype: str, baseline_device: str, engine: str,
         engine_args: tuple[str, ...], prompts: tuple[str, ...], prompts_file: str | None,
         images: tuple[str, ...], audio: tuple[str, ...], feed: str | None, mode: str,
         backward: bool, max_new_tokens: int, keep_fp32: tuple[str, ...], repeat: int,
         budget: int, output: str, force: bool, quiet: bool) -> None:
    """Port a model to a device and dtype, checked end to end, with a report to sign off.

    \b
    Stages (one progress line each on stderr, with its time or "reused"):
      baseline     fp32 on the CPU, with its same-precision reference
      target       DEV in DTYPE, replaying the baseline's inputs
      compare      layer by layer, logits, generations (compare.html)
      consistency  the target --repeat times in all, bitwise
      scan, isolate, suggest, fix
                   only when compare flags something: the overflow, its culprit, a
                   keep-fp32 policy, and the target again with it, compared again
    Writes report.html, port.json (docs/json-schema.md) and PORT.md in the port folder and
    prints PORT.md. A second run reuses every stage whose inputs (model fingerprint, options,
    device, library and precision versions, the files of the stages before it) are
    unchanged and whose own files are as it left them; --force redoes all.
      precision port --model ./qwen --device npu --dtype bf16 -o port/
    Exit codes: 0 passes; 1 fails, or passes only with the fix (the verdict line says which),
    or a stage failed while running; 2 bad input (an unavailable device, a missing model),
    before any stage runs or in the stage that refused it. A stage that fails ends the port
    with one line naming it; the stages before it are kept.
    """
    from ..errors import PrecisionError
    from ..workflows.port import PortOptions, StageError, run_port

    opts = PortOptions(model=model, output=output, device=device, dtype=dtype,
                       baseline_device=baseline_device, engine=engine, engine_args=engine_args,
                       prompts=prompts, prompts_file=prompts_file, images=images, audio=audio,
                       feed=feed, mode=mode, backward=backward, max_new_tokens=max_new_tokens,
                       keep_fp32=keep_fp32, repeat=repeat, budget=budget, force=force,
                       log=stderr_log(quiet))
    try:
        result = run_port(opts)
    except StageError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except PrecisionError:
        raise
    except KeyboardInterrupt:  # the stages that finished are on disk, stamped: not lost
        click.echo(f"error: interrupted; the stages that finished are kept in {output}: run "
                   "again to resume", err=True)
        sys.exit(INTERRUPTED)
    if not quiet:
        click.echo(result.to_markdown(), nl=False)
        click.echo()
    click.echo(f"{result.verdict.upper()}: {result.message}")
    sys.exit(result.exit_code)

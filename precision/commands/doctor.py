"""``precision scan``, ``suggest``, ``isolate`` and ``consistency``: run a model and judge it."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from .common import (
    CONTEXT,
    check_outputs,
    guard,
    stderr_log,
    write_text,
)
from .options import INPUTS

if TYPE_CHECKING:
    from ..dumps.dump import Dump
    from ..judge.consistency import ConsistencyReport


def _model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--model/--device/--dtype/--prompt/--prompts/--keep-fp32/--max-new-tokens."""
    options = [
        click.option("--model", "model", metavar="DIR", help="Hugging Face model directory."),
        click.option("--device", default="cpu", show_default=True, metavar="DEV",
                     help="cpu, cuda, cuda:N, npu or npu:N."),
        click.option("--dtype", default="fp16", show_default=True,
                     type=click.Choice(["fp32", "fp16", "bf16"]), help="Compute dtype."),
        *INPUTS[:2],  # --prompt, --prompts, as capture takes them
        click.option("--max-new-tokens", default=8, show_default=True, type=int,
                     help="Tokens generated greedily before the measured forward."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn

@click.command(context_settings=CONTEXT)
@click.argument("dump", metavar="[DUMP.st]", required=False)
@_model_options
@click.option("--keep-fp32", multiple=True, default=("auto",), show_default=True,
              metavar="auto|none|GLOB[:fp32]", help="Dtype policy, as for capture.")
@click.option("--against", type=click.Choice(["fp16", "bf16"]),
              help="Format whose limits to measure against (default: the run's dtype if "
                   "fp16/bf16, else fp16).")
@click.option("--json", "json_out", metavar="FILE", help="Write the scan as JSON.")
@click.option("--top", type=int, metavar="N", help="Show only the N worst rows.")
@click.option("-o", "--output", metavar="OUT.st", help="Keep the stats dump the scan took.")
@click.option("--force", is_flag=True, help="Overwrite the --json and -o files.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the summary line.")
@guard
def scan(dump: str | None, model: str | None, device: str, dtype: str,
         prompts: tuple[str, ...], prompts_file: str | None, max_new_tokens: int,
         keep_fp32: tuple[str, ...], against: str | None, json_out: str | None,
         top: int | None, output: str | None, force: bool, quiet: bool) -> None:
    """Headroom scan: how close each layer comes to overflowing fp16 (or bf16).

    \b
    Scan an existing dump, or run a model (stats capture with module inputs):
      precision scan fp16.st
      precision scan --model ./flan-t5-base --dtype fp32     # would it overflow in fp16?
      precision scan --model ./flan-t5-base --dtype fp16 --keep-fp32 none
    Per layer: largest magnitude, headroom in bits (log2(65504/|x|max)), NaN/inf counts and
    whether the layer produces them or passes them on, values pinned near the max, and the
    share of values fp16 flushes to zero. Exit code 1 when a layer overflows,
    saturates or turns NaN. The flush column is the share of all values that are nonzero
    but round to zero in fp16.
    """

    from ..judge.scan import scan as run_scan
    from ..outputs.render import print_scan

    if (dump is None) == (model is None):
        raise click.UsageError("give either a DUMP.st or --model DIR")
    check_outputs(force, json_out, output, inputs=(dump,))
    if dump is not None:
        report = run_scan(dump, against=against)
    else:
        from ..doctor.checks import scan_model
        from ..runtime.run.runner import CaptureOptions

        assert model is not None
        opts = CaptureOptions(model=model, output=output or "", device=device, dtype=dtype,
                              prompts=prompts, prompts_file=prompts_file,
                              keep_fp32=keep_fp32, max_new_tokens=max_new_tokens,
                              force=force)
        report = scan_model(opts, against=against, log=stderr_log(quiet))
    if quiet:
        click.echo(report.summary)
    else:
        print_scan(report, top=top)
    if json_out:
        write_text(json_out, report.to_json(), force)
    sys.exit(0 if report else 1)

@click.command(context_settings=CONTEXT)
@_model_options
@click.option("--keep-fp32", "base_policy", default="auto", show_default=True,
              type=click.Choice(["auto", "none"]),
              help="Policy to start from, as for capture: auto (as transformers loads) or "
                   "none (cast everything, like a wholesale .half()).")
@click.option("--replay", metavar="BASE.st",
              help="Run on the exact inputs of an earlier dump instead of prompts (then no "
                   "prompts are held back).")
@click.option("--mode", default="full", show_default=True, type=click.Choice(["full", "stats"]),
              help="Capture mode of the runs (stats for models too big to dump whole).")
@click.option("--include", multiple=True, metavar="GLOB",
              help="Capture only modules whose name matches (repeatable), as for capture.")
@click.option("--exclude", multiple=True, metavar="GLOB",
              help="Skip modules whose name matches (repeatable), as for capture.")
@click.option("--budget", default=8, show_default=True, type=int,
              help="Most modules to keep in fp32 before giving up.")
@click.option("--json", "json_out", metavar="FILE",
              help="Write the result as JSON (the verified capture arguments included); "
                   "'-' for stdout.")
@click.option("--force", is_flag=True, help="Overwrite the --json file.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the result line.")
@guard
def suggest(model: str | None, device: str, dtype: str, prompts: tuple[str, ...],
            prompts_file: str | None, max_new_tokens: int, base_policy: str,
            replay: str | None, mode: str, include: tuple[str, ...], exclude: tuple[str, ...],
            budget: int, json_out: str | None, force: bool, quiet: bool) -> None:
    """Find, apply and verify the smallest set of modules to keep in fp32.

    \b
    Runs an fp32 baseline and the target dtype, keeps the first module that overflows (or
    the first divergence) in fp32, runs again, and repeats until the comparison is clean or
    the budget is spent. A third of the prompts (at least one, given two or more) are held
    back and the policy is checked on them too. Prints a before/after table and exactly the
    --keep-fp32 arguments it verified, for `precision capture` (or
    `precision.keep_fp32(model, [...])`).
      precision suggest --model ./flan-t5-base --dtype fp16 --keep-fp32 none
    Exit code 1 when no policy within the budget fixes the model (held-back prompts
    included).
    """
    import json

    from ..doctor.checks import suggest as run_suggest
    from ..outputs.render import print_suggestion

    if model is None:
        raise click.UsageError("--model DIR is required")
    if budget < 0:
        raise click.BadParameter("must be 0 or more", param_hint="--budget")
    check_outputs(force, json_out)
    result = run_suggest(model, dtype=dtype, device=device, prompts=prompts,
                         prompts_file=prompts_file, keep_fp32=base_policy, budget=budget,
                         max_new_tokens=max_new_tokens, replay=replay, mode=mode,
                         include=include, exclude=exclude, log=stderr_log(quiet))
    if json_out == "-":
        click.echo(json.dumps(result.to_dict(), indent=1))
    elif quiet:
        click.echo(result.message + (f": {result.cli_flags}" if result.fixed else ""))
    else:
        print_suggestion(result)
    if json_out and json_out != "-":
        write_text(json_out, json.dumps(result.to_dict(), indent=1) + "\n", force)
    sys.exit(0 if result.fixed else 1)

@click.command(context_settings=CONTEXT)
@click.argument("base", metavar="BASE.st")
@click.option("--model", required=True, metavar="DIR", help="The model BASE.st was taken from.")
@click.option("--dtype", default="fp16", show_default=True,
              type=click.Choice(["fp32", "fp16", "bf16"]), help="Dtype to re-run modules in.")
@click.option("--device", default="cpu", show_default=True, metavar="DEV",
              help="cpu, cuda, cuda:N, npu or npu:N.")
@click.option("--keep-fp32", multiple=True, default=("none",), show_default=True,
              metavar="auto|none|GLOB[:fp32]",
              help="Dtype policy for the re-run, as for capture.")
@click.option("--target", metavar="TARGET.st",
              help="A full run in the target dtype, for the accumulated error column; when it "
                   "overflows or turns NaN, the result is never a pass.")
@click.option("--only-flagged", is_flag=True, help="Show only the rows that are not ok.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the summary line.")
@guard
def isolate(base: str, model: str, dtype: str, device: str, keep_fp32: tuple[str, ...],
            target: str | None, only_flagged: bool, quiet: bool) -> None:
    """Local vs inherited error: re-run every module alone on the baseline's inputs.

    \b
    Any capture of the model will do as BASE.st (it needs only the model inputs):
      precision capture --model DIR --dtype fp32 -o base.st
      precision capture --model DIR --dtype fp16 --keep-fp32 none --replay base.st -o t.st
      precision isolate base.st --model DIR --dtype fp16 --target t.st
    The model runs once in fp32 on BASE.st's inputs, keeping every module call's arguments
    (decoder layers with their masks, position embeddings and flags included; caches off),
    then each module runs alone on them in --dtype and is measured against its fp32 output.
    Verdicts: culprit (inputs finite and in range, alone beyond the profile: the overflow or
    error is made here), encloses (a module it calls is the culprit), inherited (its inputs
    already overflowed and its output is no worse than that implies, or it is only bad in the
    full run), unknown (re-running it raised), ok. Exit code 1 when there is a culprit, or
    when the --target run has an OVERFLOW or NAN record.
    """
    from ..doctor.isolation import isolate as run_isolate
    from ..dtypes import canonical
    from ..outputs.render import print_isolate
    from ..runtime.devices import resolve

    resolve(device, canonical(dtype))
    report = run_isolate(base, model, dtype=dtype, device=device, keep_fp32=keep_fp32,
                         target=target)
    if quiet:
        click.echo(report.summary)
    else:
        print_isolate(report, only_flagged=only_flagged)
    sys.exit(0 if report else 1)

@click.command(context_settings=CONTEXT)
@click.argument("runs", metavar="[RUN.st]...", nargs=-1)
@_model_options
@click.option("--repeat", default=3, show_default=True, type=int, help="Number of runs.")
@click.option("--mode", default="full", show_default=True, type=click.Choice(["full", "stats"]),
              help="full compares every tensor bitwise; stats only statistics and tokens.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the summary line.")
@guard
def consistency(runs: tuple[str, ...], model: str | None, device: str, dtype: str,
                prompts: tuple[str, ...], prompts_file: str | None, max_new_tokens: int,
                repeat: int, mode: str, quiet: bool) -> None:
    """Run the same inputs several times on one device and check the runs are identical.

    \b
    Every run after the first replays its inputs and generates freely, so the generated
    tokens and every layer are compared bitwise with the first run; where they are not
    identical, the largest deviation per layer is shown.
      precision consistency --model ./qwen --device npu --dtype bf16 --repeat 3
    Or give dumps of runs already taken (any engine: two vLLM captures of the same prompts):
      precision consistency vllm-1.st vllm-2.st
    Exit code 1 when the runs are not bitwise identical.
    """
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from ..doctor.checks import consistency as run_consistency

    if runs:
        report = _consistency_of_dumps(runs, model)
    elif model is None:
        raise click.UsageError("give --model DIR, or the dumps of two or more runs")
    else:
        report = run_consistency(model, repeat=repeat, dtype=dtype, device=device,
                                 prompts=prompts, prompts_file=prompts_file,
                                 max_new_tokens=max_new_tokens, mode=mode,
                                 log=stderr_log(quiet))
    click.echo(report.summary)
    for note in report.notes:
        click.echo(f"note: {note}")
    if report.deviations and not quiet:
        table = Table("#", "tensor", "runs differing", "elements", "max |deviation|",
                      box=None, header_style="bold")
        for d in report.deviations[:40]:
            table.add_row(str(d.order), escape(d.key), str(d.runs_differing),
                          str(d.elements_differing), f"{d.max_abs:.3g}")
        Console(highlight=False).print(table)
    sys.exit(0 if report else 1)


@click.command(context_settings=CONTEXT)
@click.argument("dump", metavar="DUMP.st")
@click.option("--json", "json_out", metavar="FILE",
              help="Write every checked operation as JSON; '-' for stdout.")
@click.option("--only-flagged", is_flag=True, help="Show only the operations not OK.")
@click.option("--top", type=int, metavar="N", help="Show only the N operations with the "
              "largest error over the CPU's.")
@click.option("--force", is_flag=True, help="Overwrite the --json file.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the summary line.")
@guard
def check(dump: str, json_out: str | None, only_flagged: bool, top: int | None, force: bool,
          quiet: bool) -> None:
    """Run each recorded operation again on the CPU on the inputs the device gave it.

    Local error only: every operation whose inputs were recorded (capture --level ops
    --inputs GLOB) runs in float64 (the golden output) and in its own dtype on the CPU; the
    device's output is judged against the golden by what the dtype costs there (DRIFT beyond
    3x the CPU's relative L2 error or 8x its worst element; OVERFLOW where the golden is
    finite). No baseline run or model needed; needs torch.

    \b
    Example:
      precision capture --model ./t5 --device npu --dtype fp16 --level ops \\
                        --inputs '*' -o npu.st
      precision check npu.st --only-flagged
    """
    import json
    from dataclasses import asdict

    from ..doctor.opcheck import check as run_check
    from ..outputs.render import print_check

    check_outputs(force, json_out)
    report = run_check(dump, log=stderr_log(quiet))
    if json_out:
        def plain(value: Any) -> Any:  # JSON has no NaN: a figure not measured is null
            return None if isinstance(value, float) and value != value else value

        ops = [{k: plain(v) for k, v in (asdict(o) | {"ratio": o.ratio}).items()}
               for o in report.ops]
        text = json.dumps({"summary": report.summary, "passed": bool(report),
                           "operations": ops}, indent=1, allow_nan=False)
        if json_out == "-":
            click.echo(text)
        else:
            write_text(json_out, text, force)
    if quiet:
        click.echo(report.summary)
    elif json_out != "-":
        print_check(report, only_flagged=only_flagged, top=top)
    sys.exit(0 if report else 1)


def _consistency_of_dumps(runs: tuple[str, ...], model: str | None) -> ConsistencyReport:
    """``consistency RUN.st...``: runs already taken, of one model, compared bitwise."""
    from pathlib import Path

    from ..dtypes import short
    from ..dumps import load
    from ..engines.vllm.lineup import engine_of
    from ..errors import InputError
    from ..judge.consistency import consistency_of
    from ..judge.lineup.align import check_same_model

    if model is not None:
        raise click.UsageError("give --model DIR to run the model, or dumps of runs already "
                               "taken, not both")
    if len(runs) < 2:
        raise click.UsageError("give the dumps of two or more runs to compare")
    seen: dict[Path, str] = {}
    for r in runs:  # one file twice is identical to itself: that proves nothing
        same = seen.setdefault(Path(r).resolve(), r)
        if same != r or runs.count(r) > 1:
            raise click.UsageError(f"{r} is given twice{f' (as {same})' if same != r else ''}:"
                                   " give the dumps of separate runs")
    dumps = [load(r) for r in runs]

    def setup(d: Dump) -> str:
        return f"{engine_of(d) or 'Hugging Face'} in {short(d.dtype or '?')}"

    for d in dumps[1:]:
        check_same_model(dumps[0], d, allow=False)
        if setup(d) != setup(dumps[0]):
            raise InputError(f"{d.path.name} ran {setup(d)}, {dumps[0].path.name} "
                             f"{setup(dumps[0])}: "
                             "consistency compares repeated runs of one setup (compare "
                             "judges two setups)")
    return consistency_of(dumps)

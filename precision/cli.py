"""The ``precision`` command line: capture, inspect, compare.

Exit codes: 0 success (nothing flagged that you asked to fail on), 1 flagged,
2 bad input or usage. Errors print one line, never a traceback. Heavy libraries (torch,
transformers) are imported only by ``capture``, so ``compare`` starts fast.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import click

from ._version import __version__
from .errors import PrecisionError, command_line

#: what only the capture side needs; the install's [capture] extra brings them
MODEL_SIDE = ("torch", "transformers", "accelerate")
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
INTERRUPTED = 130  #: exit code after Ctrl-C, as shells report a SIGINT (128 + 2)


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def _guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn known errors into one-line messages with exit code 2."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with command_line():  # advice in errors names --flags, not keyword arguments
                return fn(*args, **kwargs)
        except PrecisionError as exc:
            _fail(str(exc))
        except ModuleNotFoundError as exc:
            top = (exc.name or "").split(".")[0]
            if top not in MODEL_SIDE:
                raise
            _fail(f"this command runs a model and needs {top}, which is not installed: "
                  "pip install 'precision[capture]' (inspect, compare and report do not)")
        except KeyboardInterrupt:
            click.echo("error: interrupted; no output was written", err=True)
            sys.exit(INTERRUPTED)
        except OSError as exc:
            _fail(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))
        except MemoryError:
            _fail("out of memory: capture fewer modules (--include/--exclude) or use --mode stats")

    return wrapper


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar on an interactive terminal; nothing in CI, pipes or with -q."""
    if not (enabled and sys.stderr.isatty() and not os.environ.get("CI")):
        yield None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("comparing", total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _check_outputs(force: bool, *paths: str | None) -> None:
    """Refuse, before any work, outputs that exist (without --force) or have no folder."""
    from pathlib import Path

    from .dumps.dump import check_output_path

    for p in paths:
        if p and p != "-":
            check_output_path(Path(p), force=force)


def _write_text(path: str, text: str, force: bool) -> None:
    """Write a text output atomically (temporary file, then rename)."""
    from pathlib import Path

    _check_outputs(force, path)
    out = Path(path)
    tmp = out.with_name(f".{out.name}.partial")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)


class ByteSize(click.ParamType):
    """A size in bytes: ``1048576``, ``512K``, ``256M``, ``2G`` (powers of 1024)."""

    name = "size"
    _UNITS: ClassVar[dict[str, int]] = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().upper().removesuffix("IB").removesuffix("B")
        unit = text[-1:] if text[-1:] in self._UNITS else ""
        try:
            number = float(text[:len(text) - len(unit)])
        except ValueError:
            self.fail(f"{value!r} is not a size: use e.g. 512M or 2G", param, ctx)
        if not (number > 0 and math.isfinite(number)):
            self.fail(f"{value!r}: a size must be positive and finite", param, ctx)
        return int(number * (1 << self._UNITS[unit]))


def _log(quiet: bool) -> Callable[[str], None]:
    def log(message: str) -> None:
        if not quiet:
            click.echo(f"· {message}", err=True)

    return log


class _Main(click.Group):
    """The command group, with usage errors on one line (``error: ...``) and Ctrl-C exit 130."""

    def main(self, args: Any = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except click.ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} -h')" if ctx is not None else ""
            click.echo(f"error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:  # Ctrl-C or end of input while click itself was reading
            click.echo("error: interrupted", err=True)
            sys.exit(INTERRUPTED)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_Main, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="precision")
def main() -> None:
    """Find where and why a model's numbers change between devices and dtypes.

    \b
    Typical session (baseline on CPU fp32, target on an accelerator in fp16):
      precision capture --model ./flan-t5-base --device cpu --dtype fp32 -o base.st
      precision capture --model ./flan-t5-base --device npu --dtype fp16 \\
                        --replay base.st -o npu.st
      precision compare base.st npu.st
    """


@main.command(context_settings=CONTEXT)
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
@click.option("--prompt", "prompts", multiple=True, metavar="TEXT",
              help="A prompt (repeat for a batch). Default: three built-in Flan-style prompts.")
@click.option("--prompts", "prompts_file", metavar="FILE", help="File with one prompt per line.")
@click.option("--image", "images", multiple=True, metavar="FILE",
              help="An image for the model's image processor (repeat for a batch).")
@click.option("--audio", "audio", multiple=True, metavar="FILE.wav",
              help="A wav file for the model's feature extractor (repeat for a batch).")
@click.option("--feed", metavar="FILE", help="A .safetensors or .npz file of named tensors "
              "passed to the model's forward as they are (any model, any preprocessing).")
@click.option("--class", "model_class", metavar="NAME",
              help="Load the model as this transformers class (e.g. BertModel) instead of "
                   "the one its config names.")
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
              metavar="auto|none|GLOB",
              help="auto: as transformers loads (T5 keeps wo in fp32 under fp16). none: cast "
                   "every module. GLOB: keep matching modules in fp32 (repeatable).")
@click.option("--replay", metavar="BASE.st",
              help="Reuse the exact token ids, masks and decoder ids of an earlier dump.")
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
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@_guard
def capture(model: str, device: str, device_map: str | None, dtype: str,
            prompts: tuple[str, ...],
            prompts_file: str | None, images: tuple[str, ...], audio: tuple[str, ...],
            feed: str | None, model_class: str | None, mode: str, full_globs: tuple[str, ...],
            include: tuple[str, ...],
            exclude: tuple[str, ...], backward: bool, loss_scale: float, every: int,
            input_globs: tuple[str, ...],
            keep_fp32: tuple[str, ...], replay: str | None,
            max_new_tokens: int, capture_steps: bool, steps_spec: str | None,
            num_beams: int, output: str | None, dry_run: bool,
            force: bool, fsync: bool, quiet: bool) -> None:
    """Run a model and dump its per-layer outputs and logits.

    \b
    Examples:
      precision capture --model fixtures/tiny-flan-t5 --dtype fp32 -o base.st
      precision capture --model fixtures/tiny-flan-t5 --dtype fp16 --replay base.st -o fp16.st
      precision capture --model ./qwen --device cuda --dtype bf16 --mode stats -o q.st
    """
    from .runtime.recorder import DEFAULT_INPUT_GLOBS
    from .runtime.runner import CaptureOptions, parse_steps, run_capture

    if not output and not dry_run:
        raise click.UsageError("Missing option '-o' / '--output' (or give --dry-run).")
    opts = CaptureOptions(model=model, output=output or "", device=device, device_map=device_map,
                          dtype=dtype, full=full_globs,
                          steps=parse_steps(steps_spec) if steps_spec else None,
                          prompts=prompts, prompts_file=prompts_file, mode=mode,
                          include=include, exclude=exclude, keep_fp32=keep_fp32,
                          inputs=DEFAULT_INPUT_GLOBS + input_globs, every=every,
                          backward=backward, loss_scale=loss_scale,
                          replay=replay, max_new_tokens=max_new_tokens, num_beams=num_beams,
                          capture_steps=capture_steps, force=force, fsync=fsync,
                          images=images, audio=audio, feed=feed, model_class=model_class)
    if dry_run:
        from .runtime.plan import plan_model, render

        click.echo(render(plan_model(opts)))
        return
    path = run_capture(opts, _log(quiet or os.environ.get("RANK", "0") != "0"))
    if not quiet and os.environ.get("RANK", "0") == "0":  # one report for a torchrun job
        from .dumps import load
        from .dumps.dump import format_bytes

        d = load(path)
        click.echo(f"wrote {path}: {len(d.entries)} records, {len(d.tensors)} tensors, "
                   f"{format_bytes(d.file_bytes)} ({d.mode} mode)")


@main.command(context_settings=CONTEXT)
@click.argument("dump", metavar="DUMP.st")
@click.option("--all", "show_all", is_flag=True, help="List every record, aliases included.")
@_guard
def inspect(dump: str, show_all: bool) -> None:
    """Show what a dump holds: metadata, then its records in execution order.

    An unfinished multi-rank dump (shards, no index.json) is shown as INCOMPLETE.
    """
    from .dumps import load
    from .outputs.render import print_inspect

    print_inspect(load(dump, allow_partial=True), show_all=show_all)


@main.command(context_settings=CONTEXT)
@click.argument("base", metavar="BASE.st")
@click.argument("target", metavar="TARGET.st")
@click.option("--json", "json_out", metavar="FILE", help="Write the full report as JSON "
              "(schema: docs/json-schema.md); '-' for stdout.")
@click.option("--markdown", "md_out", metavar="FILE", help="Write a Markdown summary "
              "(flagged rows) for a pull-request comment.")
@click.option("--only-flagged", is_flag=True, help="Show only rows that are not OK.")
@click.option("--top", type=int, metavar="N", help="Show only the N worst rows.")
@click.option("--rtol", type=float, help="Override the diffuse-drift limit: DRIFT when the "
              "element-scaled rms error exceeds it (default: 5 eps of the pair's coarser "
              "format; docs/verdicts.md).")
@click.option("--atol", type=float, help="Errors within this absolute value are never DRIFT.")
@click.option("--profile", type=click.Choice(["fp32", "tf32", "hf32", "fp16", "bf16"]),
              help="Judge as fp32 vs this precision instead of what the dumps record.")
@click.option("--base-dtype", type=click.Choice(["fp32", "tf32", "hf32", "fp16", "bf16"]),
              help="What the baseline computed in, for a file that cannot say (.npy logits "
                   "saved as fp32 from a bf16 run).")
@click.option("--target-dtype", type=click.Choice(["fp32", "tf32", "hf32", "fp16", "bf16"]),
              help="What the target computed in, likewise.")
@click.option("--fail-on", default="drift", show_default=True,
              type=click.Choice(["drift", "overflow", "nan", "any", "never"]),
              help="Exit 1 when a row has such a status. drift: DRIFT/OVERFLOW/NAN/MISMATCH; "
                   "overflow: OVERFLOW/NAN; any: also MISSING.")
@click.option("--topk", default=5, show_default=True, type=int,
              help="k for the logits top-k overlap.")
@click.option("--jobs", type=click.IntRange(min=1), metavar="N",
              help="Worker processes sharing the tensors (default: the usable cores).")
@click.option("--max-memory", type=ByteSize(), metavar="SIZE",
              help="Cap the work buffers of all jobs together, e.g. 256M or 2G: chunks shrink, "
                   "then fewer jobs run. Default: about 10 MiB per job (a logits chunk holds "
                   "at least one vocabulary row).")
@click.option("--allow-different-models", is_flag=True,
              help="Compare dumps whose model configs differ.")
@click.option("--allow-partial", is_flag=True,
              help="Read the shards of an unfinished multi-rank dump (no index.json).")
@click.option("--force", is_flag=True, help="Overwrite the --json/--markdown files.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the summary line.")
@_guard
def compare(base: str, target: str, json_out: str | None, md_out: str | None,
            only_flagged: bool, top: int | None, rtol: float | None, atol: float | None,
            profile: str | None, base_dtype: str | None, target_dtype: str | None,
            fail_on: str, topk: int, jobs: int | None,
            max_memory: int | None, allow_different_models: bool, allow_partial: bool,
            force: bool, quiet: bool) -> None:
    """Compare two dumps layer by layer and say where the numbers go wrong.

    \b
    Status per layer:
      OK        within the noise expected for the dtype pair (see docs/verdicts.md)
      DRIFT     error beyond that noise (norm or outliers), or logits KL/top-1 off
      OVERFLOW  inf, or values pinned near the dtype max, where the baseline is finite
      NAN       NaN where the baseline is finite
      MISMATCH  shapes, dtype kinds or inputs differ
      MISSING   the key is in one dump only
    Exit code: 0 nothing to fail on, 1 something flagged (see --fail-on), 2 bad input.
    """
    from .judge.compare import compare as run_compare
    from .outputs.render import print_report

    if top is not None and top < 1:
        raise click.BadParameter("must be at least 1", param_hint="--top")
    _check_outputs(force, json_out, md_out)
    with _progress(enabled=not quiet and json_out != "-") as progress:
        report = run_compare(base, target, rtol=rtol, atol=atol, profile=profile,
                             fail_on=fail_on, topk=topk, jobs=jobs, max_memory=max_memory,
                             allow_different_models=allow_different_models,
                             allow_partial=allow_partial, base_dtype=base_dtype,
                             target_dtype=target_dtype, progress=progress)
    if json_out == "-":
        click.echo(report.to_json())
    else:
        if quiet:
            click.echo(report.summary)
        else:
            print_report(report, only_flagged=only_flagged, top=top)
        if json_out:
            _write_text(json_out, report.to_json(), force)
    if md_out:
        _write_text(md_out, report.to_markdown(), force)
    sys.exit(0 if report else 1)


def _model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--model/--device/--dtype/--prompt/--prompts/--keep-fp32/--max-new-tokens."""
    options = [
        click.option("--model", "model", metavar="DIR", help="Hugging Face model directory."),
        click.option("--device", default="cpu", show_default=True, metavar="DEV",
                     help="cpu, cuda, cuda:N, npu or npu:N."),
        click.option("--dtype", default="fp16", show_default=True,
                     type=click.Choice(["fp32", "fp16", "bf16"]), help="Compute dtype."),
        click.option("--prompt", "prompts", multiple=True, metavar="TEXT",
                     help="A prompt (repeatable)."),
        click.option("--prompts", "prompts_file", metavar="FILE",
                     help="File with one prompt per line."),
        click.option("--max-new-tokens", default=8, show_default=True, type=int,
                     help="Tokens generated greedily before the measured forward."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@main.command(context_settings=CONTEXT)
@click.argument("dump", metavar="[DUMP.st]", required=False)
@_model_options
@click.option("--keep-fp32", multiple=True, default=("auto",), show_default=True,
              metavar="auto|none|GLOB", help="Dtype policy, as for capture.")
@click.option("--against", type=click.Choice(["fp16", "bf16"]),
              help="Format whose limits to measure against (default: the run's dtype if "
                   "fp16/bf16, else fp16).")
@click.option("--json", "json_out", metavar="FILE", help="Write the scan as JSON.")
@click.option("--top", type=int, metavar="N", help="Show only the N worst rows.")
@click.option("-o", "--output", metavar="OUT.st", help="Keep the stats dump the scan took.")
@click.option("--force", is_flag=True, help="Overwrite the --json and -o files.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the summary line.")
@_guard
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

    from .dumps import load
    from .judge.scan import scan as run_scan
    from .outputs.render import print_scan

    if (dump is None) == (model is None):
        raise click.UsageError("give either a DUMP.st or --model DIR")
    _check_outputs(force, json_out, output)
    if dump is not None:
        report = run_scan(load(dump), against=against)
    else:
        from .doctor.checks import scan_model
        from .runtime.runner import CaptureOptions

        assert model is not None
        opts = CaptureOptions(model=model, output=output or "", device=device, dtype=dtype,
                              prompts=prompts, prompts_file=prompts_file,
                              keep_fp32=keep_fp32, max_new_tokens=max_new_tokens,
                              force=force)
        report = scan_model(opts, against=against, log=_log(quiet))
    if quiet:
        click.echo(report.summary)
    else:
        print_scan(report, top=top)
    if json_out:
        _write_text(json_out, report.to_json(), force)
    sys.exit(0 if report else 1)


@main.command(context_settings=CONTEXT)
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
@_guard
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

    from .doctor.checks import suggest as run_suggest
    from .outputs.render import print_suggestion

    if model is None:
        raise click.UsageError("--model DIR is required")
    if budget < 0:
        raise click.BadParameter("must be 0 or more", param_hint="--budget")
    _check_outputs(force, json_out)
    result = run_suggest(model, dtype=dtype, device=device, prompts=prompts,
                         prompts_file=prompts_file, base_policy=base_policy, budget=budget,
                         max_new_tokens=max_new_tokens, replay=replay, mode=mode,
                         include=include, exclude=exclude, log=_log(quiet))
    if json_out == "-":
        click.echo(json.dumps(result.to_dict(), indent=1))
    elif quiet:
        click.echo(result.message + (f": {result.cli_flags}" if result.fixed else ""))
    else:
        print_suggestion(result)
    if json_out and json_out != "-":
        _write_text(json_out, json.dumps(result.to_dict(), indent=1) + "\n", force)
    sys.exit(0 if result.fixed else 1)


@main.command(context_settings=CONTEXT)
@click.argument("base", metavar="BASE.st")
@click.option("--model", required=True, metavar="DIR", help="The model BASE.st was taken from.")
@click.option("--dtype", default="fp16", show_default=True,
              type=click.Choice(["fp32", "fp16", "bf16"]), help="Dtype to re-run modules in.")
@click.option("--device", default="cpu", show_default=True, metavar="DEV",
              help="cpu, cuda, cuda:N, npu or npu:N.")
@click.option("--keep-fp32", multiple=True, default=("none",), show_default=True,
              metavar="auto|none|GLOB", help="Dtype policy for the re-run, as for capture.")
@click.option("--target", metavar="TARGET.st",
              help="A full run in the target dtype, for the accumulated error column.")
@click.option("--only-flagged", is_flag=True, help="Show only culprits and inherited rows.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the summary line.")
@_guard
def isolate(base: str, model: str, dtype: str, device: str, keep_fp32: tuple[str, ...],
            target: str | None, only_flagged: bool, quiet: bool) -> None:
    """Local vs inherited error: re-run each module alone on the baseline's inputs.

    \b
    BASE.st must hold module inputs (capture it with --inputs '*'):
      precision capture --model DIR --dtype fp32 --inputs '*' -o base.st
      precision capture --model DIR --dtype fp16 --keep-fp32 none --replay base.st -o t.st
      precision isolate base.st --model DIR --dtype fp16 --target t.st
    A module whose error alone is beyond the profile is a culprit; one that is only bad in
    the full run inherited its error. Exit code 1 when there is a culprit.
    """
    from .doctor.isolation import isolate as run_isolate
    from .dtypes import canonical
    from .outputs.render import print_isolate
    from .runtime.devices import resolve

    resolve(device, canonical(dtype))
    report = run_isolate(base, model, dtype=dtype, device=device, keep_fp32=keep_fp32,
                         target=target)
    if quiet:
        click.echo(report.summary)
    else:
        print_isolate(report, only_flagged=only_flagged)
    sys.exit(0 if report else 1)


@main.command(context_settings=CONTEXT)
@click.argument("base", metavar="BASE.st")
@click.argument("target", metavar="TARGET.st")
@click.option("-o", "--output", required=True, metavar="REPORT.html",
              help="HTML file to write (self-contained: opens offline).")
@click.option("--markdown", "md_out", metavar="FILE",
              help="Also write a Markdown summary for a pull-request comment.")
@click.option("--rtol", type=float, help="Override the norm tolerance (see compare).")
@click.option("--atol", type=float, help="Override the absolute floor (see compare).")
@click.option("--profile", type=click.Choice(["fp32", "tf32", "hf32", "fp16", "bf16"]),
              help="Judge as fp32 vs this dtype.")
@click.option("--force", is_flag=True, help="Overwrite REPORT.html if it exists.")
@click.option("--allow-different-models", is_flag=True,
              help="Compare dumps whose model configs differ.")
@_guard
def report(base: str, target: str, output: str, md_out: str | None, rtol: float | None,
           atol: float | None, profile: str | None, force: bool,
           allow_different_models: bool) -> None:
    """Write a self-contained HTML report of a comparison.

    \b
    Verdict and first divergence, error versus depth (encoder and decoder apart, flagged
    layers marked), headroom to the fp16 limit, logits per position (KL, top-k, argmax
    flips), T5's relative position bias difference per bucket and head, and the full table
    (click a header to sort, filter by name or to flagged rows).
      precision report base.st npu.st -o report.html
    Exit code as for compare with --fail-on drift.
    """
    from pathlib import Path

    from .dumps import load
    from .dumps.dump import check_output_path, format_bytes
    from .judge.compare import compare as run_compare
    from .outputs.htmlreport import build

    out = Path(output)
    check_output_path(out, force=force)
    _check_outputs(force, md_out)
    b, t = load(base), load(target)
    rep = run_compare(b, t, rtol=rtol, atol=atol, profile=profile,
                      allow_different_models=allow_different_models)
    tmp = out.with_name(f".{out.name}.partial")
    tmp.write_text(build(rep, b, t), encoding="utf-8")
    tmp.replace(out)
    if md_out:
        _write_text(md_out, rep.to_markdown(), force)
    click.echo(f"{rep.summary}\nwrote {out} ({format_bytes(out.stat().st_size)})")
    sys.exit(0 if rep else 1)


@main.command(context_settings=CONTEXT)
@_model_options
@click.option("--repeat", default=3, show_default=True, type=int, help="Number of runs.")
@click.option("--mode", default="full", show_default=True, type=click.Choice(["full", "stats"]),
              help="full compares every tensor bitwise; stats only statistics and tokens.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the summary line.")
@_guard
def consistency(model: str | None, device: str, dtype: str, prompts: tuple[str, ...],
                prompts_file: str | None, max_new_tokens: int, repeat: int, mode: str,
                quiet: bool) -> None:
    """Run the same inputs several times on one device and check the runs are identical.

    \b
    Every run after the first replays its inputs and generates freely, so the generated
    tokens and every layer are compared bitwise with the first run; where they are not
    identical, the largest deviation per layer is shown.
      precision consistency --model ./qwen --device npu --dtype bf16 --repeat 3
    Exit code 1 when the runs are not bitwise identical.
    """
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from .doctor.checks import consistency as run_consistency

    if model is None:
        raise click.UsageError("--model DIR is required")
    report = run_consistency(model, repeat=repeat, dtype=dtype, device=device,
                             prompts=prompts, prompts_file=prompts_file,
                             max_new_tokens=max_new_tokens, mode=mode, log=_log(quiet))
    click.echo(report.summary)
    if report.deviations and not quiet:
        table = Table("#", "tensor", "runs differing", "elements", "max |deviation|",
                      box=None, header_style="bold")
        for d in report.deviations[:40]:
            table.add_row(str(d.order), escape(d.key), str(d.runs_differing),
                          str(d.elements_differing), f"{d.max_abs:.3g}")
        Console(highlight=False).print(table)
    sys.exit(0 if report else 1)


if __name__ == "__main__":
    main()

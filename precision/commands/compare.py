"""``precision compare`` and ``precision report``: judge two dumps, in a table or a page."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from ..judge.profiles import PROFILE_NAMES
from .common import (
    CONTEXT,
    ByteSize,
    check_outputs,
    guard,
    progress_bar,
    write_text,
)

F = TypeVar("F", bound=Callable[..., Any])


def reference_options(command: F) -> F:
    """``--reference REF.st`` and ``--no-reference``, as compare and report take them."""
    command = click.option("--no-reference", is_flag=True,
                           help="Judge by the fixed noise limits even when a reference "
                                "exists.")(command)
    return click.option("--reference", metavar="REF.st",
                        help="The same inputs in the target's precision on a trusted backend "
                             "(the CPU): each record is judged against the error that run "
                             "makes. Default: BASE's sibling BASE.<precision>-reference.st "
                             "when it exists (capture --expect).")(command)


def mapping_option(command: F) -> F:
    """``--mapping FILE``: how an engine's records map onto Hugging Face's."""
    return click.option("--mapping", metavar="FILE.json",
                        help="For a run captured in an engine (capture --engine vllm) of a "
                             "model family without a built-in table: which of its records is "
                             "which Hugging Face record (docs/vllm.md, 'Alignment'). Replaces "
                             "the family's table.")(command)


def check_mapping(mapping: str | None) -> None:
    """Read a ``--mapping`` file before any work: a bad one is one line, exit 2."""
    if mapping is not None:
        from ..engines.vllm.mapping import read_mapping

        read_mapping(mapping)


@click.command(context_settings=CONTEXT)
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
@click.option("--profile", type=click.Choice(PROFILE_NAMES),
              help="Judge as fp32 vs this precision instead of what the dumps record.")
@click.option("--base-dtype", type=click.Choice(PROFILE_NAMES),
              help="What the baseline computed in, for a file that cannot say (.npy logits "
                   "saved as fp32 from a bf16 run).")
@click.option("--target-dtype", type=click.Choice(PROFILE_NAMES),
              help="What the target computed in, likewise.")
@reference_options
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
@mapping_option
@click.option("--allow-different-models", is_flag=True,
              help="Compare dumps whose model configs differ.")
@click.option("--allow-partial", is_flag=True,
              help="Read the shards of an unfinished multi-rank dump (no index.json).")
@click.option("--force", is_flag=True, help="Overwrite the --json/--markdown files.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the summary line.")
@guard
def compare(base: str, target: str, json_out: str | None, md_out: str | None,
            only_flagged: bool, top: int | None, rtol: float | None, atol: float | None,
            profile: str | None, base_dtype: str | None, target_dtype: str | None,
            reference: str | None, no_reference: bool, fail_on: str, topk: int,
            jobs: int | None, max_memory: int | None, mapping: str | None,
            allow_different_models: bool, allow_partial: bool,
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
    from ..judge.compare import compare as run_compare
    from ..outputs.render import print_report

    if top is not None and top < 1:
        raise click.BadParameter("must be at least 1", param_hint="--top")
    check_outputs(force, json_out, md_out)
    check_mapping(mapping)
    with progress_bar(enabled=not quiet and json_out != "-") as progress:
        report = run_compare(base, target, reference=reference,
                             auto_reference=not no_reference, rtol=rtol, atol=atol,
                             profile=profile,
                             fail_on=fail_on, topk=topk, jobs=jobs, max_memory=max_memory,
                             allow_different_models=allow_different_models,
                             allow_partial=allow_partial, base_dtype=base_dtype,
                             target_dtype=target_dtype, mapping=mapping, progress=progress)
    if json_out == "-":
        click.echo(report.to_json())
    else:
        if quiet:
            click.echo(report.summary)
        else:
            print_report(report, only_flagged=only_flagged, top=top)
        if json_out:
            write_text(json_out, report.to_json(), force)
    if md_out:
        write_text(md_out, report.to_markdown(), force)
    sys.exit(0 if report else 1)

@click.command(context_settings=CONTEXT)
@click.argument("base", metavar="BASE.st")
@click.argument("target", metavar="TARGET.st")
@click.option("-o", "--output", required=True, metavar="REPORT.html",
              help="HTML file to write (self-contained: opens offline).")
@click.option("--markdown", "md_out", metavar="FILE",
              help="Also write a Markdown summary for a pull-request comment.")
@click.option("--rtol", type=float, help="Override the diffuse-drift limit (see compare).")
@click.option("--atol", type=float, help="Errors within this absolute value are never DRIFT.")
@click.option("--profile", type=click.Choice(PROFILE_NAMES),
              help="Judge as fp32 vs this dtype.")
@reference_options
@mapping_option
@click.option("--force", is_flag=True, help="Overwrite REPORT.html if it exists.")
@click.option("--allow-different-models", is_flag=True,
              help="Compare dumps whose model configs differ.")
@guard
def report(base: str, target: str, output: str, md_out: str | None, rtol: float | None,
           atol: float | None, profile: str | None, reference: str | None,
           no_reference: bool, mapping: str | None, force: bool,
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

    from ..dumps.atomic import check_output_path, format_bytes
    from ..dumps.external import open_any
    from ..judge.compare import compare as run_compare
    from ..outputs.htmlreport import build

    out = Path(output)
    check_output_path(out, force=force)
    check_outputs(force, md_out)
    check_mapping(mapping)
    b, t = open_any(base), open_any(target)
    rep = run_compare(b, t, reference=reference, auto_reference=not no_reference,
                      rtol=rtol, atol=atol, profile=profile, mapping=mapping,
                      allow_different_models=allow_different_models)
    write_text(output, build(rep, b, t), force)
    if md_out:
        write_text(md_out, rep.to_markdown(), force)
    click.echo(f"{rep.summary}\nwrote {out} ({format_bytes(out.stat().st_size)})")
    sys.exit(0 if rep else 1)

"""``precision compare`` and ``precision report``: judge two dumps, in a table or a page."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import click

from .common import (
    CONTEXT,
    check_outputs,
    guard,
    progress_bar,
    write_text,
)
from .options import ComparisonCommand, comparison_options

if TYPE_CHECKING:
    from ..judge.options import CompareOptions


def check_mapping(mapping: str | os.PathLike[str] | None) -> None:
    """Read a ``--mapping`` file before any work: a bad one is one line, exit 2. It holds
    an engine's table (``rules``), module renames for another framework's dump
    (``modules``), or both."""
    if mapping is not None:
        from ..dumps.external.names import engine_rules_in, read_names
        from ..engines.vllm.mapping import read_mapping

        modules = read_names(mapping)  # None: the file has no module renames
        if modules is None or engine_rules_in(mapping):
            read_mapping(mapping)


@click.command(cls=ComparisonCommand, context_settings=CONTEXT)
@click.argument("base", metavar="BASE.st")
@click.argument("target", metavar="TARGET.st")
@click.option("--json", "json_out", metavar="FILE", help="Write the full report as JSON "
              "(schema: docs/json-schema.md); '-' for stdout.")
@click.option("--markdown", "md_out", metavar="FILE", help="Write a Markdown summary "
              "(flagged rows) for a pull-request comment; '-' for stdout.")
@click.option("--only-flagged", is_flag=True, help="Show only rows that are not OK.")
@click.option("--top", type=int, metavar="N", help="Show only the N worst rows.")
@click.option("--force", is_flag=True, help="Overwrite the --json/--markdown files.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the summary line.")
@guard
@comparison_options
def compare(base: str, target: str, json_out: str | None, md_out: str | None,
            only_flagged: bool, top: int | None, force: bool, quiet: bool,
            options: CompareOptions) -> None:
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
    if json_out == "-" and md_out == "-":
        raise click.UsageError("--json - and --markdown - both want stdout: send one to a file")
    check_outputs(force, json_out, md_out, inputs=_inputs(base, target, options))
    check_mapping(options.mapping)
    with progress_bar(enabled=not quiet and "-" not in (json_out, md_out)) as progress:
        report = run_compare(base, target, options, progress=progress)
    if json_out == "-":
        click.echo(report.to_json())
    elif md_out == "-":
        click.echo(report.to_markdown(top=top or 20), nl=False)
        if json_out:
            write_text(json_out, report.to_json(), force)
    else:
        if quiet:
            click.echo(report.summary)
        else:
            print_report(report, only_flagged=only_flagged, top=top)
        if json_out:
            write_text(json_out, report.to_json(), force)
    if md_out and md_out != "-":
        write_text(md_out, report.to_markdown(top=top or 20), force)
    sys.exit(0 if report else 1)


@click.command(cls=ComparisonCommand, context_settings=CONTEXT)
@click.argument("base", metavar="BASE.st")
@click.argument("target", metavar="TARGET.st")
@click.option("-o", "--output", required=True, metavar="REPORT.html",
              help="HTML file to write (self-contained: opens offline).")
@click.option("--markdown", "md_out", metavar="FILE",
              help="Also write a Markdown summary for a pull-request comment.")
@click.option("--force", is_flag=True, help="Overwrite REPORT.html if it exists.")
@guard
@comparison_options
def report(base: str, target: str, output: str, md_out: str | None, force: bool,
           options: CompareOptions) -> None:
    """Write a self-contained HTML report of a comparison.

    \b
    Verdict and first divergence, error versus depth (encoder and decoder apart, flagged
    layers marked), headroom to the fp16 limit, logits per position (KL, top-k, argmax
    flips), T5's relative position bias difference per bucket and head, and the full table
    (click a header to sort, filter by name or to flagged rows).
      precision report base.st npu.st -o report.html
    Exit code as for compare: 0 nothing to fail on, 1 something flagged (see --fail-on),
    2 bad input.
    """
    from pathlib import Path

    from ..dumps.atomic import format_bytes
    from ..dumps.external import open_any
    from ..judge.compare import compare as run_compare
    from ..outputs.htmlreport import build

    out = Path(output)
    check_outputs(force, output, md_out, inputs=_inputs(base, target, options))
    check_mapping(options.mapping)
    b = open_any(base, allow_partial=options.allow_partial, mapping=options.mapping)
    t = open_any(target, allow_partial=options.allow_partial, mapping=options.mapping)
    rep = run_compare(b, t, options)
    write_text(output, build(rep, b, t), force)
    if md_out:
        write_text(md_out, rep.to_markdown(), force)
    click.echo(f"{rep.summary}\nwrote {out} ({format_bytes(out.stat().st_size)})")
    sys.exit(0 if rep else 1)


def _inputs(base: str, target: str, options: CompareOptions) -> list[object]:
    """What a comparison reads: its runs, and the reference given or found beside the
    baseline (``BASE.<precision>-reference.st``), which no output may replace."""
    from ..dumps import reference_siblings

    found = reference_siblings(base) if options.reference is None and \
        options.auto_reference else []
    return [base, target, options.reference, *found]

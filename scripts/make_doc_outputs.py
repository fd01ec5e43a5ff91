#!/usr/bin/env python3
"""Rewrite the command outputs quoted in README.md and docs/*.md by running the commands.

A quoted output is a code block right after a marker line naming it::

    <!-- make_doc_outputs: overflow-scan -->
    ```
    $ precision scan ...
    FAIL [fp16]: ...
    ```

:data:`BLOCKS` says what each name runs: its commands, each shown after ``$ `` and followed
by its standard output (cut to ``keep`` lines, then ``...``). Commands run in-process on the
CPU, in a scratch folder per group (``fixtures/`` linked in), blocks of one group in order,
so a later block reuses the dumps an earlier one wrote. ``tests/test_docs.py`` fails when a
quoted block differs from what the code prints now; run this script to update the docs::

    .venv/bin/python scripts/make_doc_outputs.py
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
MARKER = re.compile(r"^<!-- make_doc_outputs: ([\w-]+) -->\n```\n(.*?)```\n", re.M | re.S)
OVERFLOW = "fixtures/tiny-flan-t5-overflow"
RESIDUAL = "fixtures/tiny-llama-overflow"


@dataclass(frozen=True)
class Block:
    """Commands whose outputs one quoted block shows; ``keep`` lines of output per command
    (``None``: all), in the scratch folder ``group``."""

    group: str
    commands: tuple[str, ...]
    keep: tuple[int | None, ...] = ()

    def limit(self, i: int) -> int | None:
        return self.keep[i] if i < len(self.keep) else None


BLOCKS: dict[str, Block] = {
    # docs/fp16-overflow.md, in its order (later blocks reuse base.st and fp16.st)
    "overflow-scan": Block("overflow", (
        f"precision scan --model {OVERFLOW} --dtype fp32 --top 4",)),
    "overflow-compare": Block("overflow", (
        f"precision capture --model {OVERFLOW} --dtype fp32 -o base.st",
        f"precision capture --model {OVERFLOW} --dtype fp16 --keep-fp32 none "
        "--replay base.st -o fp16.st",
        "precision compare base.st fp16.st --only-flagged --top 6"), keep=(1, 1, 6)),
    "overflow-isolate": Block("overflow", (
        f"precision isolate base.st --model {OVERFLOW} --dtype fp16 --target fp16.st "
        "--only-flagged",), keep=(12,)),
    "overflow-suggest": Block("overflow", (
        f"precision suggest --model {OVERFLOW} --dtype fp16 --keep-fp32 none",)),
    # docs/fp16-overflow.md, section 5: a residual stream beyond fp16's range
    "residual-compare": Block("residual", (
        f"precision capture --model {RESIDUAL} --dtype fp32 -o base.st",
        f"precision capture --model {RESIDUAL} --dtype fp16 --keep-fp32 none "
        "--replay base.st -o fp16.st",
        "precision compare base.st fp16.st --only-flagged --top 3"), keep=(1, 1, 6)),
    "residual-fixed": Block("residual", (
        f"precision capture --model {RESIDUAL} --dtype fp16 --keep-fp32 none "
        "--keep-fp32 'model.layers.*' --replay base.st -o layers.st",
        "precision compare base.st layers.st -q",
        f"precision capture --model {RESIDUAL} --dtype bf16 --replay base.st -o bf16.st",
        "precision compare base.st bf16.st -q",
        f"precision capture --model {RESIDUAL} --dtype fp16 --keep-fp32 none "
        "--keep-fp32 'model.layers.*:fp32' --replay base.st -o layers32.st",
        "precision compare base.st layers32.st -q",
        f"precision capture --model {RESIDUAL} --dtype fp16 --keep-fp32 none "
        "--keep-fp32 'model.embed_tokens:fp32' --replay base.st -o residual32.st",
        "precision compare base.st residual32.st -q"), keep=(1, 1, 1, 1, 1, 1, 1, 1)),
    "residual-suggest": Block("residual", (
        "precision scan --model fixtures/tiny-llama-overflow --dtype fp32 --top 2",
        "precision suggest --model fixtures/tiny-llama-overflow --dtype fp16 "
        "--keep-fp32 none")),
    # README.md: step 3 on the same dumps
    "readme-compare": Block("overflow", (
        "precision compare base.st fp16.st --only-flagged --top 3",)),
    # docs/quickstart.md
    "quickstart-overflow": Block("quickstart", (
        f"precision capture --model {OVERFLOW} --dtype fp32 -o base.st",
        f"precision capture --model {OVERFLOW} --dtype fp16 --keep-fp32 none "
        "--replay base.st -o fp16.st",
        "precision compare base.st fp16.st -q",
        f"precision capture --model {OVERFLOW} --dtype fp16 --replay base.st -o fixed.st",
        "precision compare base.st fixed.st -q")),
    # docs/verdicts.md: a decoder's left-padded batch, judged against its bf16 reference
    "verdicts-reference": Block("reference", (
        "precision capture --model fixtures/tiny-qwen3 --dtype fp32 --expect bf16 "
        "--prompt 'hi' --prompt 'a longer prompt, padded on the left' -o q32.st",
        "precision capture --model fixtures/tiny-qwen3 --dtype bf16 --replay q32.st "
        "-o qbf16.st -q",
        "precision compare q32.st qbf16.st --top 2")),
    # docs/operators.md: the operations inside modules, and each checked on its own inputs
    "ops-compare": Block("ops", (
        f"precision capture --model {OVERFLOW} --dtype fp32 --level ops -o base.st",
        f"precision capture --model {OVERFLOW} --dtype fp16 --keep-fp32 none --level ops "
        "--inputs 'encoder.*' --replay base.st -o fp16.st",
        "precision compare base.st fp16.st --only-flagged --top 4"), keep=(1, 1, 8)),
    "ops-check": Block("ops", (
        "precision check fp16.st --top 6",), keep=(10,)),
    # docs/seed-workflows.md
    "seed-qwen-bf16": Block("seed", (
        "precision capture --model fixtures/tiny-qwen3 --dtype fp32 --max-new-tokens 8 "
        "-o q32.st",
        "precision capture --model fixtures/tiny-qwen3 --dtype bf16 --replay q32.st "
        "-o qbf16.st",
        "precision compare q32.st qbf16.st -q")),
    "seed-beams": Block("seed", (
        "precision capture --model fixtures/tiny-flan-t5 --dtype fp32 --max-new-tokens 8 "
        "--num-beams 4 -o b32.st",
        "precision capture --model fixtures/tiny-flan-t5 --dtype fp16 --replay b32.st "
        "-o b16.st",
        "precision compare b32.st b16.st -q")),
    "seed-consistency": Block("seed", (
        "precision consistency --model fixtures/tiny-qwen3 --dtype bf16 --repeat 3",)),
    "seed-backward": Block("seed", (
        "precision capture --model fixtures/tiny-flan-t5 --backward -o step32.st",
        "precision capture --model fixtures/tiny-flan-t5 --dtype fp16 --backward "
        "--loss-scale 1024 --replay step32.st -o step16.st",
        "precision compare step32.st step16.st -q")),
}


def run(command: str) -> str:
    """A ``precision`` command's standard output, run in-process; exit codes 0 and 1 only."""
    from click.testing import CliRunner

    from precision.cli import main

    args = shlex.split(command)
    assert args[0] == "precision", command
    result = CliRunner().invoke(main, args[1:], prog_name="precision")
    if result.exit_code not in (0, 1) or (result.exception is not None
                                          and not isinstance(result.exception, SystemExit)):
        raise RuntimeError(f"{command!r} exited {result.exit_code}: "
                           f"{result.stderr or result.exception!r}")
    return result.stdout


@contextlib.contextmanager
def chdir(folder: Path) -> Iterator[None]:
    """Run the block inside ``folder`` (contextlib.chdir needs Python 3.11)."""
    old = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(old)


def render(name: str, block: Block, folder: Path) -> str:
    """The text of one quoted block: each command after ``$ ``, then its output."""
    lines: list[str] = []
    with chdir(folder):
        for i, command in enumerate(block.commands):
            lines.append(f"$ {command}")
            out = [ln.rstrip() for ln in run(command).splitlines()]
            keep = block.limit(i)
            lines += out if keep is None or len(out) <= keep else [*out[:keep], "..."]
    return "\n".join(lines) + "\n"


def outputs(names: set[str] | None = None) -> dict[str, str]:
    """Every block's text (or those in ``names``), running the commands group by group."""
    texts: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="precision-docs-") as tmp:
        for name, block in BLOCKS.items():
            if names is not None and name not in names:
                continue
            folder = Path(tmp) / block.group
            if not folder.exists():
                folder.mkdir()
                (folder / "fixtures").symlink_to(ROOT / "fixtures")
            texts[name] = render(name, block, folder)
    return texts


def marked(text: str) -> list[str]:
    """The block names marked in a document, in order."""
    return [m.group(1) for m in MARKER.finditer(text)]


def rewrite(text: str, texts: dict[str, str]) -> str:
    """``text`` with each marked block replaced by its generated output."""
    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in BLOCKS:
            raise KeyError(f"unknown block {name!r}: add it to BLOCKS in {Path(__file__).name}")
        return f"<!-- make_doc_outputs: {name} -->\n```\n{texts[name]}```\n"

    return MARKER.sub(sub, text)


def main() -> int:
    """Regenerate every marked block; print which documents changed."""
    docs = {p: p.read_text(encoding="utf-8") for p in DOCS}
    used = {name for text in docs.values() for name in marked(text)}
    unused = set(BLOCKS) - used
    if unused:
        print(f"blocks no document marks: {', '.join(sorted(unused))}", file=sys.stderr)
    texts = outputs(used)
    for path, text in docs.items():
        new = rewrite(text, texts)
        if new != text:
            path.write_text(new, encoding="utf-8")
            print(f"updated {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("CI", "1")  # no progress bars
    sys.exit(main())

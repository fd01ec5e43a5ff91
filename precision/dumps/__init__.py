"""The dump format: writer, reader, directory dumps (shards) and external formats.

Numpy and safetensors only: never imports torch or transformers.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

from ..dtypes import canonical, short
from ..errors import DumpError, option
from .dump import Dump, load_file
from .shards import INDEX, load_dir, load_partial


def load(path: str | os.PathLike[str], *, allow_partial: bool = False) -> Dump:
    """Open a dump (or any safetensors file) for reading, checking its header against the file.

    Raises :class:`~precision.errors.DumpError` with a one-line reason for a missing,
    truncated or corrupt file. A directory dump whose index was never written (a multi-rank
    run that died) is refused unless ``allow_partial``; it then reads as incomplete. Plain
    safetensors files without precision metadata load too: every tensor becomes an entry,
    in file order.
    """
    p = Path(path)
    if p.is_dir():
        if (p / INDEX).is_file():
            return load_dir(p)
        shards = any(p.glob("rank*.st"))
        if allow_partial and shards:
            return load_partial(p)
        if (p / "config.json").is_file() and not shards:
            raise DumpError(f"{p} is a model directory, not a dump: capture it first, e.g. "
                            f"precision capture --model {p} -o base.st")
        if not shards:
            raise DumpError(f"{p} is a directory with no {INDEX} and no rank shards: not a "
                            "dump (msprobe's folders are read by compare, inspect and scan)")
        raise DumpError(f"{p} is a directory without {INDEX}: an unfinished multi-rank "
                        "capture (compare and report read the shards it has with "
                        f"{option('--allow-partial', 'allow_partial=True')})")
    return load_file(p)


def reference_siblings(base: str | os.PathLike[str]) -> list[Path]:
    """The references beside ``base`` that compare may take on its own (:func:`reference_path`
    of each precision): inputs an output must not replace."""
    p = Path(base)
    if not p.is_file():
        return []
    return sorted(p.parent.glob(f"{glob.escape(p.stem)}.*-reference{p.suffix or '.st'}"))


def reference_path(base: str | os.PathLike[str], precision: str) -> Path:
    """Where ``capture --expect PRECISION`` puts the same-precision reference of a baseline,
    and where ``compare`` looks for it: ``base.st`` -> ``base.bf16-reference.st``."""
    p = Path(base)
    return p.with_name(f"{p.stem}.{short(canonical(precision))}-reference{p.suffix or '.st'}")

"""What every reader of another tool's files shares: the one place their failures become
one-line :class:`~precision.errors.DumpError` messages, and what a dump can hold.

A reader checks what it parses and raises ``DumpError`` with a precise reason where it can;
:func:`reading` turns everything else a parser of hostile bytes can raise (numpy's header
errors, a bad zip CRC, a deflate error, JSON nested a thousand deep, an int too large for a
float, an empty file's ``EOFError``) into one line naming the file.
"""

from __future__ import annotations

import contextlib
import json
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...dtypes import NAME_TO_SAFETENSORS
from ...errors import DumpError
from ..dump import DuplicateKey, no_duplicates

#: the key external logits are stored under (marked as the dump's logits)
LOGITS_KEY = "logits"

#: what a parser of hostile input may raise besides DumpError (RecursionError and the
#: ``NotImplementedError`` of an unknown zip compression are RuntimeErrors)
READ_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, TypeError, KeyError, IndexError, AttributeError, ArithmeticError, EOFError,
    RuntimeError, OSError, MemoryError, zipfile.BadZipFile, zlib.error)


@dataclass
class Converted:
    """Another tool's file, ready to be written as a dump: ``tensors`` (an iterable of
    ``(key, array)``, consumed once while writing, so one tensor is in memory at a time),
    the dump's ``meta`` and records without tensors (``entries``, stats-only records)."""

    tensors: Iterable[tuple[str, np.ndarray]]
    meta: dict[str, Any]
    entries: list[dict[str, Any]] = field(default_factory=list)


def one_line(exc: BaseException, *, first_line: bool = False) -> str:
    """An exception's message on one line (or only its first line), at most 200 characters,
    never empty."""
    text = str(exc).strip()
    if first_line:
        text = text.split("\n", 1)[0]
    text = " ".join(text.split())
    if isinstance(exc, KeyError) or not text:
        text = f"{type(exc).__name__} {text}".strip()
    return text if len(text) <= 200 else text[:197] + "..."


@contextlib.contextmanager
def reading(path: Path | str, what: str) -> Iterator[None]:
    """Inside, any failure of parsing ``path`` (a ``what``: ``.npy array``...) is a DumpError
    naming the file; a DumpError raised inside passes unchanged."""
    try:
        yield
    except DumpError:
        raise
    except RecursionError:
        raise DumpError(f"{path}: not a readable {what}: nested too deeply") from None
    except EOFError:
        raise DumpError(f"{path}: not a readable {what}: the file ends too early "
                        "(empty or truncated)") from None
    except MemoryError:
        raise DumpError(f"{path}: not a readable {what}: it does not fit in memory") from None
    except READ_ERRORS as exc:
        raise DumpError(f"{path}: not a readable {what} ({one_line(exc)})") from None


def parse_json(path: Path, what: str) -> Any:
    """The JSON document in ``path``; a file that is not UTF-8 JSON, or that gives one key
    twice in an object (a reader would silently take the last), is a one-line error."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=no_duplicates)
    except DuplicateKey as exc:
        raise DumpError(f"{path}: not a {what}: it gives {exc.args[0]!r} twice in one object "
                        "(a reader would silently take the last)") from None
    except UnicodeDecodeError:
        raise DumpError(f"{path}: not a {what}: the file is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise DumpError(f"{path}: not a {what}: not valid JSON ({one_line(exc)})") from None


def storable(arr: np.ndarray, src: str) -> np.ndarray:
    """``arr`` in native byte order, when a dump can hold its dtype; else a one-line error.

    A big-endian ``.npy`` (``>f4``) is byte-swapped here: its dtype *name* is ``float32``,
    and written as it is its bytes would read back as other numbers.
    """
    if arr.dtype.hasobject:
        raise DumpError(f"{src}: holds Python objects, which are never unpickled")
    if arr.dtype.name not in NAME_TO_SAFETENSORS:
        raise DumpError(f"{src}: dtype {arr.dtype} ({arr.dtype.str}) cannot be held by a dump: "
                        "save it as float32, float16, bfloat16, an integer type or bool")
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


def is_int(value: Any) -> bool:
    """A JSON integer (not a bool, which Python counts as one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A JSON number (int or float, not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)

"""Outputs written whole or not at all: every file precision writes goes through here.

An :class:`AtomicFile` writes to a hidden ``.<name>.partial<tag>`` file in the output's own
folder and renames it into place when it is complete. Whatever fails on the way (a write,
the flush when the file is closed, the rename, Ctrl-C), the temporary file is removed and the
file already at the output path, if any, is left as it was. A full disk (``ENOSPC``,
``EDQUOT``) becomes an :class:`~precision.errors.OutputError` that names the path, the bytes
the output needed and the bytes free.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from ..errors import DumpError, OutputError, option

#: errors that mean "no room": the disk is full, or the user's quota is spent
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def format_bytes(n: int) -> str:
    """A size as every command prints it: decimal units, 3 significant digits (``1.37 MB``)."""
    unit, scale = next((u, k) for u, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3), ("B", 1))
                       if n >= k or k == 1)
    return f"{n / scale:.3g} {unit}" if scale > 1 else f"{n} B"


def check_output_path(path: Path, *, force: bool) -> None:
    """Refuse an output in a missing folder, a folder itself, or an existing file without force."""
    if not path.parent.is_dir():
        raise DumpError(f"output folder {path.parent} does not exist: create it first")
    if path.is_dir():
        raise DumpError(f"output {path} is a directory: give a file name (in it or elsewhere)")
    if path.exists() and not path.is_file():  # a device, a FIFO, a socket: never replaced
        raise DumpError(f"output {path} exists and is not a regular file: refused, even with "
                        f"{option('--force', 'force=True')} (give a file name)")
    if path.exists() and not force:
        raise DumpError(f"output {path} already exists: pass {option('--force', 'force=True')} "
                        "to overwrite it")


def check_outputs_apart(inputs: Iterable[Any], outputs: Iterable[Any]) -> None:
    """Refuse an output path that is one of the inputs, a file an input reads (a file in an
    input folder, an msprobe ``dump.json``'s tensors beside it), or a path given for two
    outputs: a ``--force`` would overwrite a run being read, or one output the other (paths
    only: an input given as an opened dump is left out)."""
    seen: dict[Path, str] = {}
    given = [Path(i).resolve() for i in inputs
             if isinstance(i, (str, os.PathLike)) and str(i) != "-"]
    for out in outputs:
        if not isinstance(out, (str, os.PathLike)) or str(out) == "-":
            continue
        where = Path(out).resolve()
        if where in given:
            raise DumpError(f"output {out} is one of the inputs: refused (it would overwrite "
                            "the run it reads)")
        read_by = next((i for i in given if _reads(i, where)), None)
        if read_by is not None:
            raise DumpError(f"output {out} is a file that input {read_by} reads: refused (it "
                            "would overwrite part of a run; write it elsewhere)")
        if where in seen:
            raise DumpError(f"output {out} is given for two outputs ({seen[where]} and this "
                            "one): refused, one would overwrite the other")
        seen[where] = str(out)


#: the files a folder input's readers open: a directory dump's index and shards, msprobe's
#: dump.json, its side files and tensors
READ_IN_FOLDERS = (frozenset({"index.json", "dump.json", "construct.json", "stack.json"}),
                   frozenset({".st", ".safetensors", ".npy", ".pt"}))


def _reads(source: Path, where: Path) -> bool:
    """Whether reading the input ``source`` may read the existing file ``where``: one of
    :data:`READ_IN_FOLDERS` in ``source``'s folder tree (a folder input; msprobe's
    ``dump.json`` reads the tensors under its own folder). A report written there before
    is no input: ``--force`` may replace it."""
    names, suffixes = READ_IN_FOLDERS
    if not where.is_file() or not (where.name in names or where.suffix.lower() in suffixes):
        return False  # a new file, or one no reader opens
    folder = source if source.is_dir() else (
        source.parent if source.name == "dump.json" else None)
    return folder is not None and folder in where.parents


def disk_full(path: Path, needed: int) -> OutputError:
    """The one message for a full disk: the path, what the output needed, what is free."""
    try:
        free = f"{format_bytes(shutil.disk_usage(path.parent).free)} free"
    except OSError:
        free = "free space unknown"
    return OutputError(f"no space left on the device for {path}: it needs at least "
                       f"{format_bytes(needed)} ({needed} bytes), {free} there; nothing was "
                       "written (free some space or write elsewhere)")


def _open(path: Path) -> IO[bytes]:
    """Open the temporary file (a seam: the tests swap it for a file on a 'full disk')."""
    return open(path, "w+b")  # closed by commit() or discard()


class AtomicFile:
    """A new file at ``path``, written under a temporary name and renamed into place.

    Write through :attr:`file` inside :meth:`guard` (``needed``: the bytes the whole output
    takes, for a disk-full message), then :meth:`commit`; :meth:`discard` drops it. Used as a
    context manager it commits on success and discards on any exception.
    """

    def __init__(self, path: str | os.PathLike[str], *, force: bool = False, tag: str = "",
                 fsync: bool = False) -> None:
        self.path = Path(path)
        check_output_path(self.path, force=force)
        self.tmp = self.path.with_name(f".{self.path.name}.partial{tag}")
        self._fsync = fsync
        self._done = self._committed = False
        self._needed = 0  # the largest size the output was said to need
        self.file = _open(self.tmp)

    @contextlib.contextmanager
    def guard(self, needed: int) -> Iterator[None]:
        """On any exception inside: remove the temporary file; a full disk is re-raised as an
        :class:`~precision.errors.OutputError` naming the path and the sizes."""
        self._needed = max(self._needed, needed)
        try:
            yield
        except BaseException as exc:
            self.discard()
            if isinstance(exc, OSError) and exc.errno in DISK_FULL:
                raise disk_full(self.path, self._needed) from None
            raise

    def write(self, data: bytes | memoryview, *, needed: int | None = None) -> None:
        """Write ``data``; ``needed`` is the whole output's size (default: what was written so
        far plus ``data``)."""
        with self.guard(needed if needed is not None else self.file.tell() + len(data)):
            self.file.write(data)

    def commit(self, needed: int | None = None) -> Path:
        """Flush (``fsync`` if asked), close and rename into place; returns the path.
        ``needed``: the output's size, when more than was said while writing."""
        if self._done:
            if not self._committed:
                raise OutputError(f"{self.path}: the output was discarded, not written")
            return self.path
        with self.guard(needed or 0):
            self.file.flush()
            if self._fsync:
                os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
        self._done = self._committed = True
        return self.path

    def discard(self) -> None:
        """Close and remove the temporary file; never raises (a close that fails to flush,
        a full disk, still closes the file)."""
        self._done = True
        with contextlib.suppress(OSError, ValueError):
            self.file.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: Any) -> None:
        if exc_type is not None:
            self.discard()
        elif not self._done:
            self.commit()


def write_output(path: str | os.PathLike[str], data: str | bytes, *, force: bool) -> Path:
    """Write a whole output (a JSON, Markdown or HTML report) atomically; returns its path."""
    blob = data.encode("utf-8") if isinstance(data, str) else data
    with AtomicFile(path, force=force) as out:
        out.write(blob, needed=len(blob))
    return out.path

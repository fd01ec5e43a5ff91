"""A full disk while writing any output: one line naming the path, the bytes needed and the
bytes free, exit 2, no temporary file left, the old file at the path intact.

No real full filesystem is needed: :func:`precision.dumps.atomic._open` (where every output's
temporary file is opened) is swapped for a file with ``room`` bytes of space. ``lazy`` makes
the failure come late, as a buffered file's does: the writes seem to succeed and the flush at
close raises ENOSPC (what once made ``DumpWriter.abort()`` skip removing the file).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from precision import OutputError
from precision.cli import main
from precision.dumps import atomic
from precision.dumps.dump import DumpWriter

from .conftest import T5, write_dump

FREE = 4096
MESSAGE = re.compile(r"^error: no space left on the device for (?P<path>\S+): it needs at "
                     r"least \S+ \w?B \((?P<needed>\d+) bytes\), 4\.1 kB free there")


class FullDisk:
    """A temporary file on a disk with ``room`` bytes free (see the module docstring)."""

    def __init__(self, path: Path, room: int, lazy: bool) -> None:
        self._f = open(path, "w+b")  # noqa: SIM115 - closed by close()
        self._room, self._lazy, self._pending = room, lazy, False

    def write(self, data: Any) -> int:
        n = memoryview(data).nbytes
        if self._f.tell() + n > self._room:
            if not self._lazy:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self._pending = True  # "buffered": fails when flushed
            return n
        return self._f.write(data)

    def flush(self) -> None:
        if self._pending:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._f.flush()

    def close(self) -> None:
        """Like a buffered file's close: the flush fails, the file is closed all the same."""
        try:
            self.flush()
        finally:
            self._pending = False
            self._f.close()

    def __getattr__(self, name: str) -> Any:  # seek, tell, truncate, fileno, closed
        return getattr(self._f, name)


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """``full_disk(room, lazy=False)``: outputs opened from now on land on a full disk."""
    usage = shutil.disk_usage("/")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=FREE))

    def fill(room: int, lazy: bool = False) -> None:
        monkeypatch.setattr(atomic, "_open", lambda p: FullDisk(p, room, lazy))

    return fill


def _assert_full_disk(result: Any, out: Path) -> None:
    """One line naming ``out`` and the sizes; the folder holds the old file only."""
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    m = MESSAGE.match(lines[0])
    assert m and m["path"] == str(out), lines[0]
    assert int(m["needed"]) > 0
    assert sorted(os.listdir(out.parent)) == [out.name]  # no .partial file
    assert out.read_text() == "keep"


@pytest.fixture
def dumps(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    folder = tmp_path / "dumps"
    folder.mkdir()
    return (write_dump(folder / "a.st", {"m:out": x}),
            write_dump(folder / "b.st", {"m:out": x.astype(np.float16)}, dtype="float16"))


@pytest.mark.parametrize("lazy", [False, True], ids=["write", "close"])
@pytest.mark.parametrize("command", ["compare --json", "compare --markdown", "report -o",
                                     "scan --json"])
def test_report_outputs_on_a_full_disk(command: str, lazy: bool, dumps: tuple[Path, Path],
                                       tmp_path: Path, full_disk: Callable[..., None]) -> None:
    out = tmp_path / "out" / "result"
    out.parent.mkdir()
    out.write_text("keep")
    full_disk(room=100, lazy=lazy)
    name, flag = command.split()
    args = [str(dumps[0])] if name == "scan" else [str(dumps[0]), str(dumps[1])]
    result = CliRunner().invoke(main, [name, *args, flag, str(out), "--force", "-q"]
                                if name != "report" else
                                [name, *args, flag, str(out), "--force"])
    _assert_full_disk(result, out)


@pytest.mark.parametrize("lazy", [False, True], ids=["write", "close"])
def test_capture_on_a_full_disk(lazy: bool, tmp_path: Path,
                                full_disk: Callable[..., None]) -> None:
    out = tmp_path / "run.st"
    out.write_text("keep")
    full_disk(room=200_000, lazy=lazy)
    result = CliRunner().invoke(main, ["capture", "-q", "--model", str(T5), "--prompt", "hi",
                                       "--max-new-tokens", "1", "-o", str(out), "--force"])
    _assert_full_disk(result, out)


@pytest.mark.parametrize("reserve", [64 * 1024, 16], ids=["header-in-place", "header-rewrite"])
def test_dump_writer_close_on_a_full_disk(reserve: int, tmp_path: Path,
                                          full_disk: Callable[..., None]) -> None:
    """The close fails (flushing, or writing the rewritten file): the error names the sizes,
    and neither temporary file is left."""
    out = tmp_path / "d.st"
    out.write_text("keep")
    full_disk(room=reserve + 1000, lazy=True)
    w = DumpWriter(out, force=True, reserve=reserve)
    w.write("a:out", "float32", (1000,), np.zeros(1000, np.float32))
    with pytest.raises(OutputError, match=r"needs .* \(\d+ bytes\), 4.1 kB free"):
        w.close({"entries": []})
    assert os.listdir(tmp_path) == ["d.st"] and out.read_text() == "keep"
    w.abort()  # after a failed close: nothing left to do, and no error


def test_dump_writer_abort_removes_the_file_when_close_fails(
        tmp_path: Path, full_disk: Callable[..., None]) -> None:
    """abort() once called close(), which re-raised ENOSPC while flushing: the partial file,
    as large as the free space, stayed. Now it never raises and always removes the file."""
    full_disk(room=10, lazy=True)
    w = DumpWriter(tmp_path / "d.st", force=True)
    w.write("a:out", "float32", (1000,), np.zeros(1000, np.float32))
    assert len(os.listdir(tmp_path)) == 1  # the hidden partial file
    w.abort()
    assert os.listdir(tmp_path) == []


def test_write_output_keeps_the_old_file_on_any_failure(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Not only a full disk: a rename that fails (or Ctrl-C) leaves the old file and no
    temporary one."""
    out = tmp_path / "r.json"
    out.write_text("keep")

    def no_rename(src: object, dst: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "replace", no_rename)
    with pytest.raises(KeyboardInterrupt):
        atomic.write_output(out, "{}", force=True)
    assert os.listdir(tmp_path) == ["r.json"] and out.read_text() == "keep"

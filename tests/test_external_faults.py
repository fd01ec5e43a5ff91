"""Malformed and hostile external inputs: one ``error:`` line naming the file, exit code 2,
no traceback, nothing written, through ``compare``, ``report`` and the Python API alike.

The corpus is :mod:`tests.hostile` (issue 22's inventory). A few cases run as real
processes: what a warning, an ``EOFError`` or a multi-line message did there (an extra line,
exit 130) only shows outside pytest's own capture.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from click.testing import CliRunner

import precision
from precision import DumpError
from precision.cli import main

from .hostile import CASES

ROOT = Path(__file__).resolve().parents[1]


def _one_error_line(result: object, path: Path, match: str) -> str:
    """Exit 2 through sys.exit, one stderr line ``error: ...`` naming the file."""
    assert result.exit_code == 2, (result.exit_code, result.output,  # type: ignore[attr-defined]
                                   result.exception)  # type: ignore[attr-defined]
    assert isinstance(result.exception, SystemExit)  # type: ignore[attr-defined]
    lines = result.stderr.splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "Traceback" not in result.output  # type: ignore[attr-defined]
    assert match in lines[0], lines[0]
    named = path.name if path.is_file() else "dump.json"
    assert named in lines[0] or path.name in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input_is_one_line(name: str, tmp_path: Path) -> None:
    build, match = CASES[name]
    src = tmp_path / "in"
    src.mkdir()
    path = build(src)
    out = tmp_path / "out"
    out.mkdir()
    for args in (["compare", path, path, "--jobs", "1", "--json", out / "r.json"],
                 ["report", path, path, "-o", out / "r.html"]):
        result = CliRunner().invoke(main, [str(a) for a in args])
        _one_error_line(result, path, match)
    assert os.listdir(out) == []  # nothing written, no temporary file left
    with pytest.raises(DumpError) as exc:  # the API: a DumpError, one line
        precision.compare(path, path)
    assert "\n" not in str(exc.value) and match in str(exc.value)


PROCESS_CASES = ["npy_empty", "npz_empty", "npy_huge_header", "pt_quantized",
                 "msprobe_tensor_file_empty"]


@pytest.mark.parametrize("name", PROCESS_CASES)
def test_hostile_input_in_a_real_process(name: str, tmp_path: Path) -> None:
    """An empty file (numpy's EOFError, once taken for Ctrl-C: exit 130), numpy's three-line
    header message and torch's UserWarning on a quantized tensor: one line, exit 2."""
    build, match = CASES[name]
    path = build(tmp_path)
    code = "import sys; from precision.cli import main; sys.argv[0] = 'precision'; main()"
    proc = subprocess.run([sys.executable, "-W", "default", "-c", code, "compare", str(path),
                           str(path)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], lines
    assert proc.stdout == ""


def test_vllm_amplification_is_refused_before_allocating(tmp_path: Path) -> None:
    """40 kB of JSON once cost 1.2 GB (padded to 22 x 3000 x 1499); now refused having
    allocated about what parsing the JSON takes."""
    build, match = CASES["vllm_amplification"]
    path = build(tmp_path)
    tracemalloc.start()
    try:
        with pytest.raises(DumpError, match=match):
            precision.compare(path, path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100 * path.stat().st_size, peak


def test_npy_header_shape_is_checked_before_allocating(tmp_path: Path) -> None:
    """A 200-byte .npy whose header claims 4 TB is refused without allocating it."""
    build, _ = CASES["npy_shape_lies"]
    path = build(tmp_path)
    tracemalloc.start()
    try:
        with pytest.raises(DumpError, match="4000000000000 bytes"):
            precision.compare(path, path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10_000_000


def test_an_end_of_file_anywhere_is_bad_input_not_ctrl_c(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """click takes an EOFError for Ctrl-D (exit 130, "interrupted"): one that a reader does not
    catch is still bad input, exit 2, one line."""
    import precision.judge.compare

    def truncated(*args: object, **kwargs: object) -> None:
        raise EOFError("Ran out of input")

    monkeypatch.setattr(precision.judge.compare, "compare", truncated)
    a = tmp_path / "a.npy"
    a.write_bytes(b"")
    result = CliRunner().invoke(main, ["compare", str(a), str(a)])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert result.stderr == "error: a file ends too early (empty or truncated): Ran out of input\n"

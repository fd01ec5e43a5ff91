"""CLI bad input: one-line ``error:`` messages, exit code 2, no traceback, no files left behind."""

from __future__ import annotations

import importlib
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from precision.cli import main

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
T5 = FIXTURES / "tiny-flan-t5"
QWEN = FIXTURES / "tiny-qwen3"
PRECISION_BIN = Path(sys.executable).parent / "precision"


def _run(*args: object) -> Result:
    """Invoke the click group in-process with stderr kept apart."""
    return CliRunner().invoke(main, [str(a) for a in args])


def _capture(*args: object) -> Result:
    """``precision capture -q ...``: quiet, so stderr holds nothing but errors."""
    return _run("capture", "-q", *args)


def _assert_error(result: Result, match: str = "") -> str:
    """Exit 2 through sys.exit, exactly one stderr line ``error: ...``, nothing on stdout."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.output
    assert result.stdout == ""
    assert match.lower() in lines[0].lower(), lines[0]
    return lines[0]


def _files(folder: Path) -> list[str]:
    """Everything in ``folder``, hidden temporary files included."""
    return sorted(os.listdir(folder))


def _block_torch_npu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import torch_npu`` fail even where it is installed."""
    real = importlib.import_module

    def fake(name: str, package: str | None = None) -> object:
        if name == "torch_npu":
            raise ImportError("No module named 'torch_npu'")
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", fake)


def _block_scipy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``scipy.*`` imports through importlib fail, as where scipy is not installed."""
    real = importlib.import_module

    def fake(name: str, package: str | None = None) -> object:
        if name == "scipy" or name.startswith("scipy."):
            raise ImportError(f"No module named {name!r}")
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", fake)


@pytest.fixture(scope="module")
def dumps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small valid fp32 dumps of two different models (captured once for this module)."""
    folder = tmp_path_factory.mktemp("dumps")
    out = {}
    for name, model in (("qwen", QWEN), ("t5", T5)):
        path = folder / f"{name}.st"
        result = _capture("--model", model, "--max-new-tokens", 1, "--prompt", "hi",
                          "-o", path)
        assert result.exit_code == 0, result.output
        out[name] = path
    assert _files(folder) == ["qwen.st", "t5.st"]
    return out


@pytest.fixture
def corrupt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file of random bytes named like a dump (outside the test's output folder)."""
    path = tmp_path_factory.mktemp("corrupt") / "corrupt.st"
    path.write_bytes(random.Random(1234).randbytes(4096))
    return path


# --------------------------------------------------------------------------- capture


def test_capture_missing_model_dir(tmp_path: Path) -> None:
    _assert_error(_capture("--model", tmp_path / "no-such-model", "-o", tmp_path / "o.st"),
                  "does not exist")
    assert _files(tmp_path) == []


def test_capture_dir_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "notamodel").mkdir()
    (tmp_path / "notamodel" / "weights.bin").write_bytes(b"x")
    _assert_error(_capture("--model", tmp_path / "notamodel", "-o", tmp_path / "o.st"),
                  "config.json")
    assert _files(tmp_path) == ["notamodel"]


def test_capture_model_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"x")
    _assert_error(_capture("--model", tmp_path / "model.bin", "-o", tmp_path / "o.st"))
    assert _files(tmp_path) == ["model.bin"]


def test_capture_empty_prompts_file(tmp_path: Path) -> None:
    (tmp_path / "prompts.txt").write_text("\n   \n\n")
    _assert_error(_capture("--model", T5, "--prompts", tmp_path / "prompts.txt",
                           "-o", tmp_path / "o.st"), "empty")
    assert _files(tmp_path) == ["prompts.txt"]


def test_capture_missing_prompts_file(tmp_path: Path) -> None:
    _assert_error(_capture("--model", T5, "--prompts", tmp_path / "nope.txt",
                           "-o", tmp_path / "o.st"), "nope.txt")
    assert _files(tmp_path) == []


def test_capture_output_in_missing_folder(tmp_path: Path) -> None:
    _assert_error(_capture("--model", T5, "-o", tmp_path / "missing" / "o.st"),
                  "does not exist")
    assert _files(tmp_path) == []


def test_capture_output_is_directory(tmp_path: Path) -> None:
    (tmp_path / "out.st").mkdir()
    _assert_error(_capture("--model", T5, "--force", "-o", tmp_path / "out.st"), "directory")
    assert _files(tmp_path) == ["out.st"]


def test_capture_existing_output_without_force(tmp_path: Path) -> None:
    """The existing file is refused and left unchanged byte for byte."""
    out = tmp_path / "o.st"
    old = random.Random(7).randbytes(1000)
    out.write_bytes(old)
    _assert_error(_capture("--model", T5, "-o", out), "--force")
    assert out.read_bytes() == old
    assert _files(tmp_path) == ["o.st"]


def test_capture_device_npu_without_torch_npu(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _block_torch_npu(monkeypatch)
    _assert_error(_capture("--model", T5, "--device", "npu", "--dtype", "fp16",
                           "-o", tmp_path / "o.st"), "torch_npu")
    assert _files(tmp_path) == []


def test_audio_without_scipy_is_one_line(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """scipy comes with the capture extra, not the compare side: where it is missing,
    reading --audio stops with one line naming the install command (the CLI prints an
    InputError as ``error: ...``). Blocked here, not in a whole capture: transformers,
    seeing scipy installed, would import it too."""
    from precision.errors import InputError
    from precision.runtime.models.inputs import read_wav

    _block_scipy(monkeypatch)
    with pytest.raises(InputError) as info:
        read_wav(tmp_path / "clip.wav")
    assert str(info.value) == ("--audio reads wav files with scipy, which is not installed: "
                               "pip install 'precision[capture]'")


def test_capture_device_cuda_without_cuda(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    _assert_error(_capture("--model", T5, "--device", "cuda", "-o", tmp_path / "o.st"), "CUDA")
    assert _files(tmp_path) == []


@pytest.mark.parametrize("device", ["bogus", "gpu", "cuda:x", "cpu:1"])
def test_capture_bad_device_name(tmp_path: Path, device: str) -> None:
    _assert_error(_capture("--model", T5, "--device", device, "-o", tmp_path / "o.st"), device)
    assert _files(tmp_path) == []


def test_capture_negative_max_new_tokens(tmp_path: Path) -> None:
    _assert_error(_capture("--model", T5, "--max-new-tokens", -1, "-o", tmp_path / "o.st"),
                  "max-new-tokens")
    assert _files(tmp_path) == []


def test_capture_replay_missing_file(tmp_path: Path) -> None:
    _assert_error(_capture("--model", T5, "--replay", tmp_path / "base.st",
                           "-o", tmp_path / "o.st"), "base.st")
    assert _files(tmp_path) == []


def test_capture_replay_corrupt_file(tmp_path: Path, corrupt: Path) -> None:
    _assert_error(_capture("--model", T5, "--replay", corrupt, "-o", tmp_path / "o.st"),
                  "corrupt.st")
    assert _files(tmp_path) == []


def test_capture_replay_truncated_dump(tmp_path: Path, dumps: dict[str, Path]) -> None:
    cut = tmp_path / "cut.st"
    cut.write_bytes(dumps["t5"].read_bytes()[:-5])
    _assert_error(_capture("--model", T5, "--replay", cut, "-o", tmp_path / "o.st"), "cut.st")
    assert _files(tmp_path) == ["cut.st"]


def test_capture_replay_without_inputs(tmp_path: Path) -> None:
    """A plain safetensors file holds no input ids to replay."""
    import numpy as np
    from safetensors.numpy import save_file

    plain = tmp_path / "plain.st"
    save_file({"w": np.ones(3, dtype=np.float32)}, str(plain))
    _assert_error(_capture("--model", T5, "--replay", plain, "-o", tmp_path / "o.st"),
                  "input ids")
    assert _files(tmp_path) == ["plain.st"]


def test_capture_replay_from_different_model(tmp_path: Path, dumps: dict[str, Path]) -> None:
    _assert_error(_capture("--model", T5, "--replay", dumps["qwen"], "-o", tmp_path / "o.st"),
                  "different model")
    assert _files(tmp_path) == []


def test_capture_keep_fp32_auto_and_none(tmp_path: Path) -> None:
    _assert_error(_capture("--model", T5, "--keep-fp32", "auto", "--keep-fp32", "none",
                           "-o", tmp_path / "o.st"), "contradict")
    assert _files(tmp_path) == []


def test_capture_keep_fp32_matches_nothing(tmp_path: Path) -> None:
    _assert_error(_capture("--model", T5, "--dtype", "fp16", "--keep-fp32", "*.nomatch",
                           "-o", tmp_path / "o.st"), "*.nomatch")
    assert _files(tmp_path) == []


# --------------------------------------------------------------------------- compare, inspect


def test_compare_missing_file(tmp_path: Path, dumps: dict[str, Path]) -> None:
    _assert_error(_run("compare", tmp_path / "missing.st", dumps["t5"]), "missing.st")
    _assert_error(_run("compare", dumps["t5"], tmp_path / "missing.st"), "missing.st")
    assert _files(tmp_path) == []


def test_compare_corrupt_file(tmp_path: Path, corrupt: Path, dumps: dict[str, Path]) -> None:
    """A corrupt input fails before any report file is written."""
    _assert_error(_run("compare", dumps["t5"], corrupt, "--json", tmp_path / "r.json",
                       "--markdown", tmp_path / "r.md"), "corrupt.st")
    assert _files(tmp_path) == []


def test_compare_different_models(tmp_path: Path, dumps: dict[str, Path]) -> None:
    _assert_error(_run("compare", dumps["t5"], dumps["qwen"], "--json", tmp_path / "r.json"),
                  "different models")
    assert _files(tmp_path) == []


def test_inspect_corrupt_file(corrupt: Path) -> None:
    _assert_error(_run("inspect", corrupt), "corrupt.st")


def _doctored_dump(path: Path, meta: dict) -> Path:
    """A precision dump with no tensors whose ``meta`` JSON is ``meta``."""
    import json
    import struct

    md = {"format": "precision-dump", "format_version": "1", "meta": json.dumps(meta)}
    blob = json.dumps({"__metadata__": md}).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob)
    return path


@pytest.mark.parametrize("meta", [{"entries": 5}, {"model": "x", "entries": []}],
                         ids=["entries-int", "model-str"])
@pytest.mark.parametrize("command", ["inspect", "compare"])
def test_malformed_metadata_is_one_line_error(tmp_path: Path, meta: dict, command: str) -> None:
    bad = _doctored_dump(tmp_path / "bad.st", meta)
    args = [bad] if command == "inspect" else [bad, bad]
    _assert_error(_run(command, *args), "bad.st")


def test_valid_dump_compares_with_itself(dumps: dict[str, Path]) -> None:
    """Sanity check of the fixtures: a dump compared with itself passes."""
    result = _run("compare", "-q", dumps["t5"], dumps["t5"])
    assert result.exit_code == 0, result.output


# --------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", [[], ["capture"], ["inspect"], ["compare"]])
def test_help(command: list[str]) -> None:
    for flag in ("--help", "-h"):
        result = _run(*command, flag)
        assert result.exit_code == 0, result.output
        assert "Usage:" in result.stdout


@pytest.mark.parametrize("command", [[], ["compare"]])
def test_help_does_not_import_torch_or_ml_dtypes(command: list[str]) -> None:
    """`precision --help` and `precision compare --help` stay light: neither torch nor
    ml_dtypes (half a second to import; loaded when a bf16 array needs it) is imported."""
    code = ("import sys\n"
            "from precision.cli import main\n"
            "try:\n"
            f"    main({[*command, '--help']!r})\n"
            "except SystemExit:\n"
            "    pass\n"
            "print('LOADED', sorted(m for m in ('torch', 'transformers', 'ml_dtypes', 'scipy',\n"
            "                                   'matplotlib', 'rich', 'safetensors')\n"
            "                       if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert "Usage:" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "LOADED []"


# --------------------------------------------------------------------------- real processes


def _subprocess(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the installed ``precision`` script (or the same entry point through python)."""
    if PRECISION_BIN.exists():
        cmd = [str(PRECISION_BIN)]
    else:
        cmd = [sys.executable, "-c", "import sys; from precision.cli import main; "
               "sys.argv[0] = 'precision'; main()"]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True,
                          timeout=180, cwd=cwd)


def _assert_process_error(proc: subprocess.CompletedProcess[str], match: str) -> None:
    """Exit 2, the last stderr line is the only ``error:`` line, progress lines aside."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.splitlines()
    assert lines and lines[-1].startswith("error: "), proc.stderr
    assert match in lines[-1]
    assert [ln for ln in lines if ln.startswith("error:")] == [lines[-1]]
    assert all(ln.startswith("· ") for ln in lines[:-1]), proc.stderr


def test_process_capture_replay_different_model(tmp_path: Path, dumps: dict[str, Path]) -> None:
    """A real `precision capture` failing late (after loading) prints no traceback."""
    proc = _subprocess("capture", "--model", T5, "--replay", dumps["qwen"], "-o", "o.st",
                       cwd=tmp_path)
    _assert_process_error(proc, "different model")
    assert _files(tmp_path) == []


def test_process_compare_corrupt(tmp_path: Path, corrupt: Path) -> None:
    """A real `precision compare` of a corrupt file prints one line, no traceback."""
    proc = _subprocess("compare", corrupt, corrupt, "--json", "r.json", cwd=tmp_path)
    _assert_process_error(proc, "corrupt.st")
    assert proc.stderr.count("\n") == 1
    assert _files(tmp_path) == []


def test_model_that_fails_to_run_is_one_line(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """A forward that raises (say, an op without a half kernel) is an error line, not a trace."""
    import transformers

    def broken(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'Half'\nmore detail")

    monkeypatch.setattr(transformers.T5ForConditionalGeneration, "forward", broken)
    out = tmp_path / "x.st"
    result = CliRunner().invoke(main, ["capture", "--model", str(T5), "--dtype", "fp16",
                                       "-o", str(out), "-q"])
    assert result.exit_code == 2
    assert "failed to run in fp16" in result.output and "addmm_impl_cpu_" in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_report_outputs_are_never_overwritten_without_force(tmp_path, t5_runs):  # type: ignore[no-untyped-def]
    """--json/--markdown of compare and scan refuse existing files, before any work."""
    base, fp16 = str(t5_runs["base"]), str(t5_runs["fp16"])
    for name in ("r.json", "r.md"):
        (tmp_path / name).write_text("keep")
    runner = CliRunner()
    for args in (["compare", base, fp16, "--json", str(tmp_path / "r.json")],
                 ["compare", base, fp16, "--markdown", str(tmp_path / "r.md")],
                 ["scan", base, "--json", str(tmp_path / "r.json")]):
        r = runner.invoke(main, args)
        assert r.exit_code == 2 and "--force" in r.output, args
    assert (tmp_path / "r.json").read_text() == "keep" == (tmp_path / "r.md").read_text()
    r = runner.invoke(main, ["compare", base, fp16, "--json", str(tmp_path / "r.json"),
                             "--force", "-q"])
    assert r.exit_code == 0 and (tmp_path / "r.json").read_text().startswith("{")
    assert not list(tmp_path.glob(".*partial*"))


def _two_dumps(tmp_path: Path) -> tuple[Path, Path]:
    import numpy as np

    from .conftest import write_dump

    x = {"a:out": np.linspace(-1, 1, 8, dtype=np.float32)}
    return write_dump(tmp_path / "a.st", x), write_dump(tmp_path / "b.st", x)


def test_force_never_replaces_an_input_a_device_or_another_output(tmp_path: Path) -> None:
    """--force overwrote whatever the path held: the baseline it was comparing (--json
    a.st), one output with another (--json X --markdown X), a FIFO or a device node."""
    a, b = _two_dumps(tmp_path)
    before = a.read_bytes()
    _assert_error(_run("compare", a, b, "--json", a, "--force"), "is one of the inputs")
    _assert_error(_run("report", a, b, "-o", b, "--force"), "is one of the inputs")
    _assert_error(_run("compare", a, b, "--json", tmp_path / "x", "--markdown",
                       tmp_path / "x", "--force"), "given for two outputs")
    _assert_error(_run("scan", a, "--json", a, "--force"), "is one of the inputs")
    assert a.read_bytes() == before and not (tmp_path / "x").exists()
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    _assert_error(_run("compare", a, b, "--json", fifo, "--force"),
                  "exists and is not a regular file: refused, even with --force")
    _assert_error(_capture("--model", T5, "--replay", a, "-o", a, "--force"),
                  "is one of the inputs")
    assert a.read_bytes() == before


def test_force_never_replaces_a_file_an_input_reads(tmp_path: Path) -> None:
    """Outputs are refused where they would replace what compare reads without its being
    named: the baseline's reference sibling, a file in an input folder (a directory dump's
    shard, an msprobe folder's dump.json) or beside an msprobe dump.json."""
    a, b = _two_dumps(tmp_path)
    sibling = tmp_path / "a.fp16-reference.st"
    sibling.write_bytes(a.read_bytes())
    ms = tmp_path / "ms" / "step0" / "rank0"
    ms.mkdir(parents=True)
    (ms / "dump.json").write_text("{}")
    (ms / "dump_tensor_data").mkdir()
    npy = ms / "dump_tensor_data" / "x.npy"
    npy.write_text("keep")
    _assert_error(_run("compare", a, b, "--json", sibling, "--force"),
                  f"output {sibling} is one of the inputs: refused")
    _assert_error(_run("compare", tmp_path / "ms", b, "--markdown", ms / "dump.json",
                       "--force"), "is a file that input")
    _assert_error(_run("compare", ms / "dump.json", b, "--json", npy, "--force"),
                  "is a file that input")
    assert sibling.read_bytes() == a.read_bytes() and npy.read_text() == "keep"
    assert (ms / "dump.json").read_text() == "{}"
    other = tmp_path / "a.notes.st"  # not a reference's name: a report may replace it
    other.write_text("old")
    assert _run("compare", a, b, "--json", other, "--force", "-q").exit_code == 0
    assert other.read_text().startswith("{")
    from precision.dumps.atomic import check_outputs_apart
    from precision.errors import DumpError

    report = ms / "report.json"  # a report refreshed inside an input folder: no input
    report.write_text("old")
    check_outputs_apart([tmp_path / "ms", ms / "dump.json"], [report])
    with pytest.raises(DumpError, match="is a file that input"):
        check_outputs_apart([tmp_path / "ms"], [ms / "dump.json"])


def test_a_pipe_given_as_a_dump_is_refused_not_read_forever(tmp_path: Path) -> None:
    fifo = tmp_path / "ff.st"
    os.mkfifo(fifo)
    done = subprocess.run([sys.executable, "-c", "import sys; from precision.cli import main; "
                           "sys.argv[0] = 'precision'; main()", "inspect", str(fifo)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and done.stderr.strip() == (
        f"error: {fifo}: not a regular file (a pipe or a device): give a dump file")


def test_markdown_to_stdout_and_replay_with_inputs_refused(tmp_path: Path) -> None:
    a, b = _two_dumps(tmp_path)
    result = _run("compare", a, b, "--markdown", "-")
    assert result.exit_code == 0 and result.stdout.startswith("**precision**: PASS")
    assert not (Path.cwd() / "-").exists()
    usage = _run("compare", a, b, "--markdown", "-", "--json", "-")
    assert usage.exit_code == 2 and "both want stdout" in usage.stderr
    refused = _capture("--model", T5, "--replay", a, "--prompt", "hi", "-o", tmp_path / "r.st")
    assert refused.exit_code == 2 and "--prompt cannot go with it" in refused.stderr
    base = tmp_path / "base.st"
    assert _capture("--model", T5, "--max-new-tokens", "2", "-o", base).exit_code == 0
    refused = _capture("--model", T5, "--replay", base, "--max-new-tokens", "3", "-o",
                       tmp_path / "r.st")
    assert refused.exit_code == 2 and "--max-new-tokens 3: --replay generates as many tokens " \
        "as the baseline did (2)" in refused.stderr
    assert not (tmp_path / "r.st").exists()
    same = _capture("--model", T5, "--replay", base, "--max-new-tokens", "2", "-o",
                    tmp_path / "r.st")
    assert same.exit_code == 0, same.output


def test_expect_refuses_an_existing_reference_before_the_model_runs(tmp_path: Path) -> None:
    """The reference's path was checked after the main dump was written: the run stopped
    half done, the main dump written and the reference refused."""
    (tmp_path / "x.fp16-reference.st").write_bytes(b"old")
    _assert_error(_capture("--model", QWEN, "--expect", "fp16", "--max-new-tokens", "1",
                           "-o", tmp_path / "x.st"), "x.fp16-reference.st already exists")
    assert _files(tmp_path) == ["x.fp16-reference.st"]


@pytest.mark.parametrize("ids", [[[5, 1_000_000, 7]], [[5, -3, 7]]])
def test_token_ids_outside_the_vocabulary_are_one_line(tmp_path: Path, ids: list[list[int]]
                                                       ) -> None:
    import numpy as np

    feed = tmp_path / "feed.npz"
    np.savez(feed, input_ids=np.array(ids, dtype=np.int64))
    _assert_error(_capture("--model", QWEN, "--feed", feed, "--max-new-tokens", "0", "-o",
                           tmp_path / "x.st"), "a token id is outside its embedding table")
    assert not (tmp_path / "x.st").exists()


def test_an_empty_or_scalar_feed_is_refused(tmp_path: Path) -> None:
    """An empty .npz ran the built-in prompts without a word; a 0-d input_ids raised
    IndexError deep in the model."""
    import numpy as np

    empty, scalar = tmp_path / "empty.npz", tmp_path / "scalar.npz"
    np.savez(empty)
    np.savez(scalar, input_ids=np.array(5, dtype=np.int64))
    _assert_error(_capture("--model", QWEN, "--feed", empty, "-o", tmp_path / "x.st"),
                  "holds no tensor")
    _assert_error(_capture("--model", QWEN, "--feed", scalar, "-o", tmp_path / "x.st"),
                  "input_ids has shape []: give a batch of ids (batch x length)")


@pytest.mark.parametrize(("meta", "said"), [
    ({"logits_key": ["a:out"]}, "field 'logits_key' has type list"),
    ({"dtype": 7}, "field 'dtype' has type int"),
    ({"dtype": "float99"}, "field 'dtype' is 'float99', no dtype this reader knows"),
    ({"policy": {"base": 3}}, "field 'policy' is malformed"),
    ({"mode": "partial"}, "field 'mode' is 'partial'"),
    ({"logits_key": "nope:out"}, "names 'nope:out' as the logits, a record the dump does not "
                                 "hold"),
])
def test_metadata_of_the_wrong_type_is_one_line(tmp_path: Path, meta: dict[str, object],
                                               said: str) -> None:
    """Hand-edited metadata gave tracebacks (a list as logits_key: unhashable) or odd
    output (fp32->7) in compare and inspect."""
    import numpy as np

    from .conftest import write_dump

    path = write_dump(tmp_path / "m.st", {"a:out": np.ones(4, np.float32)}, meta=meta)
    _assert_error(_run("inspect", path), said)
    _assert_error(_run("compare", path, path), said)


@pytest.mark.parametrize("numel", [-5, 1.5, 1e300])
def test_stats_counts_out_of_range_are_one_line(tmp_path: Path, numel: float) -> None:
    """A stats record's counts are whole numbers, 0 or more (-5 gave a math domain error in
    compare, 10**400 an OverflowError); a record listed twice was counted twice."""
    import numpy as np

    from .conftest import write_dump

    doctored = write_dump(tmp_path / "d.st", {}, stats={"a:out": {"numel": numel, "nan": 0}},
                          stats_shapes={"a:out": (4,)}, meta={"mode": "stats"})
    _assert_error(_run("compare", doctored, doctored), "record list in the dump metadata is "
                                                       "malformed")
    twice = write_dump(tmp_path / "t.st", {"a:out": np.ones(4, np.float32)},
                       aliases={"a:out": "a:out"})
    _assert_error(_run("inspect", twice), "'a:out' listed twice")


def test_a_model_folder_without_its_tokenizer_is_refused(tmp_path: Path) -> None:
    """model.save_pretrained(DIR) alone (seed 000's snippet) leaves T5 without tokenizer
    files; transformers then builds an empty one that turns every word into <unk>, and the
    capture ran the model on nothing, exit 0 (port said PASS)."""
    import shutil

    bare = tmp_path / "bare-t5"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(T5 / name, bare / name)
    _assert_error(_capture("--model", bare, "-o", tmp_path / "x.st"),
                  "every prompt comes out of T5Tokenizer as mostly unknown tokens (<unk>)")
    assert not (tmp_path / "x.st").exists()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(T5 / name, bare / name)
    assert _capture("--model", bare, "-o", tmp_path / "x.st").exit_code == 0

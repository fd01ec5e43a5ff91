"""Regressions for bugs found in review: each test failed before its fix."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import precision
from precision.cli import main
from precision.dumps.dump import DumpWriter
from precision.outputs.htmlreport import build
from precision.runtime.run.runner import CaptureOptions, run_capture

from .conftest import T5, write_dump


def test_stats_capture_of_a_float_mask_closes_cleanly(tmp_path: Path) -> None:
    class Masked(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.masked_fill(x < 0, torch.finfo(torch.float32).min)

    model = nn.Sequential(nn.Identity(), Masked())
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), precision.capture(model, tmp_path / "s.st", mode="stats") as cap:
        model(x)
    st = cap.dump.entry("1:out").stats
    # the mask is counted and kept out of the moments, as compare does in full mode
    assert st["masked"] == int((x < 0).sum()) > 1000
    assert st["min"] >= 0.0 and st["norm"] == pytest.approx(float(x.clamp(min=0).norm()))
    assert all(v is None or np.isfinite(v) for v in st.values())


def test_in_place_change_after_a_record_is_not_an_alias(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(inplace=True))
    x = torch.randn(16, 8)
    expected = model[0](x).detach().clone()
    with torch.no_grad(), precision.capture(model, tmp_path / "a.st") as cap:
        model(x)
    d = cap.dump
    assert d.entry("1:out").alias_of is None
    np.testing.assert_allclose(d["0:out"], expected.numpy())
    assert d["0:out"].min() < 0 and d["1:out"].min() >= 0


def test_report_with_mismatched_bias_shapes(tmp_path: Path) -> None:
    key, ids = "e.relative_attention_bias:out", "e.relative_attention_bias:in.0"
    a = write_dump(tmp_path / "a.st", {key: np.zeros((8, 8, 4), np.float32),
                                       ids: np.zeros((8, 8), np.int64)})
    b = write_dump(tmp_path / "b.st", {key: np.zeros((5, 5, 4), np.float32),
                                       ids: np.zeros((5, 5), np.int64)})
    da, db = precision.load(a), precision.load(b)
    page = build(precision.compare(da, db), da, db)
    assert "MISMATCH" in page


def test_isolate_from_a_bf16_baseline(tmp_path: Path) -> None:
    base = run_capture(CaptureOptions(model=str(T5), output=str(tmp_path / "bf.st"),
                                      dtype="bf16", inputs=("*",), max_new_tokens=2))
    report = precision.isolate(base, str(T5), dtype="fp16")
    assert report.rows and not report.culprits


def test_prompts_file_that_is_not_utf8(tmp_path: Path) -> None:
    f = tmp_path / "p16.txt"
    f.write_bytes("translate English to German: hi\n".encode("utf-16"))
    r = CliRunner().invoke(main, ["capture", "--model", str(T5), "--prompts", str(f),
                                  "-o", str(tmp_path / "x.st")])
    assert r.exit_code == 2 and "not UTF-8" in r.output and "Traceback" not in r.output


def _rewrite_meta(path: Path, change: dict[str, object]) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = json.loads(header["__metadata__"]["meta"])
    for k, v in change.items():
        meta["entries"][0][k] = v
    header["__metadata__"]["meta"] = json.dumps(meta)
    blob = json.dumps(header).encode().ljust(n)
    assert len(blob) == n
    path.write_bytes(raw[:8] + blob + raw[8 + n:])


@pytest.mark.parametrize("change", [{"key": 5}, {"shape": [3, 3]}, {"stats": {"norm": "abc"}},
                                    {"dtype": "complex64"}])
def test_malformed_records_are_dump_errors(tmp_path: Path, change: dict[str, object]) -> None:
    p = write_dump(tmp_path / "a.st", {"x:out": np.ones(4, np.float32)})
    _rewrite_meta(p, change)
    with pytest.raises(precision.DumpError, match=r"malformed|corrupt"):
        precision.load(p)
    r = CliRunner().invoke(main, ["compare", str(p), str(p)])
    assert r.exit_code == 2 and r.output.startswith("error:")


def test_header_copy_falls_back_without_copy_file_range(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_a: object, **_k: object) -> int:
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    w = DumpWriter(tmp_path / "big.st", reserve=16)
    arrays = {f"t{i}:out": np.full(7, i, np.float32) for i in range(50)}
    for k, v in arrays.items():
        w.write(k, "float32", (7,), v)
    w.close({"entries": []})
    d = precision.load(tmp_path / "big.st")
    for k, v in arrays.items():
        np.testing.assert_array_equal(d[k], v)


def test_duplicate_header_keys_are_refused(tmp_path: Path) -> None:
    spec = '{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    blob = ('{"x:out":' + spec + ',"x:out":' + spec + "}").encode()
    p = tmp_path / "dup.st"
    p.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0\0\0\0")
    with pytest.raises(precision.DumpError, match="twice"):
        precision.load(p)

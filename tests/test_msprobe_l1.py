"""A real msprobe L1 dump (tests/data/msprobe-l1-qwen3, scripts/make_msprobe_dump.py) lined up
with precision's operation records of the same model and token ids."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import precision
from precision.dumps.external import open_any
from precision.dumps.external.msprobe_l1 import msprobe_op, msprobe_pairs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from make_msprobe_dump import IDS, OUT, load_model  # noqa: E402


@pytest.fixture(scope="module")
def ops_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("msprobe") / "ops.st"
    model = load_model()
    with torch.no_grad(), precision.capture(model, path, level="ops"):
        model(input_ids=torch.tensor(IDS))
    return path


def test_api_names() -> None:
    assert [msprobe_op(a) for a in ("softmax", "__add__", "__radd__", "__iadd__", "add",
                                    "add_", "__matmul__", "matmul", "__truediv__", "__rsub__",
                                    "linear")] == [
        "softmax", "add", "add", "add_", "add", "add_", "matmul", "matmul", "div", "rsub",
        "linear"]


def test_real_l1_dump_lines_up_with_op_records(ops_run: Path) -> None:
    report = precision.compare(ops_run, OUT)
    ops = [r for r in report.rows if "/" in r.key]
    assert len(ops) == 61 and all(r.status == "OK" for r in ops)
    # the dump was written on another CPU: fp32 kernels that accumulate in another order
    # (3.3e-7 on an AVX-512/AMX Xeon against the AVX-512 machine that wrote it), not exact
    assert all(r.metrics is not None and r.metrics.rel_l2 <= 32 * 2.0**-23 for r in ops)
    keys = {r.key for r in ops}
    assert {"model.layers.0.self_attn/softmax:out", "model.layers.0.self_attn/matmul:out#1",
            "model.layers.0/add:out#1", "lm_head/linear:out",
            "model.layers.0.mlp.act_fn/silu:out"} <= keys
    assert not any(r.key.startswith(("Tensor.", "Functional.", "Torch.")) for r in report.rows)
    assert report.first_divergence is None
    assert any("61 of 65 API calls lined up" in n and "4 with no floating-point output" in n
               for n in report.notes)


def test_pairs_follow_call_order(ops_run: Path) -> None:
    renamed, unpaired = msprobe_pairs(open_any(OUT), precision.load(ops_run))
    assert not unpaired
    assert renamed["Functional.softmax.0:out.0"] == "model.layers.0.self_attn/softmax:out"
    assert renamed["Torch.matmul.0:out.0"] == "model.layers.0.self_attn/matmul:out"
    assert renamed["Torch.matmul.1:out.0"] == "model.layers.0.self_attn/matmul:out#1"
    assert renamed["Functional.linear.7:out.0"] == "lm_head/linear:out"


def test_a_bf16_run_against_msprobe_fp32(tmp_path: Path) -> None:
    """msprobe's fp32 dump as the baseline of a bf16 ops capture: the rows are operations."""
    path = tmp_path / "bf16.st"
    model = load_model().to(torch.bfloat16)
    with torch.no_grad(), precision.capture(model, path, level="ops"):
        model(input_ids=torch.tensor(IDS))
    report = precision.compare(OUT, path)
    statuses = Counter(r.status for r in report.rows if "/" in r.key)
    assert sum(statuses.values()) >= 55 and "MISSING" not in statuses


def test_different_call_counts_are_not_paired(tmp_path: Path) -> None:
    path = tmp_path / "nosoftmax.st"
    model = load_model()
    with torch.no_grad(), precision.capture(model, path, level="ops",
                                            ops_exclude=("softmax",)):
        model(input_ids=torch.tensor(IDS))
    renamed, unpaired = msprobe_pairs(open_any(OUT), precision.load(path))
    assert unpaired == {"softmax": (1, 0)}
    assert "Functional.softmax.0:out.0" not in renamed
    report = precision.compare(path, OUT)
    assert any("softmax (1 vs 0)" in n for n in report.notes)

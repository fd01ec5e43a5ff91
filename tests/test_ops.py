"""Operator level (``--level ops``): the operations inside modules, captured and compared."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import precision
from precision.cli import main
from precision.dumps.keys import parse_key

from .conftest import FIXTURES, QWEN, T5, T5_OVERFLOW

pytestmark = pytest.mark.slow

WO = "encoder.block.2.layer.1.DenseReluDense.wo"


def cli(*args: object) -> tuple[int, str]:
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


class Block(nn.Module):
    """A residual block whose own forward adds, scales and casts: no submodule does."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x).view(2, 2, 4).reshape(4, 4)  # views: not recorded
        y = torch.softmax(x + h, dim=-1) * 2.0
        y = y.float()  # a cast that keeps the dtype: not recorded
        return y.to(torch.float64).to(torch.float32)  # two that change it: recorded


def test_operations_are_recorded_under_the_module_that_calls_them(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x = Block(), torch.randn(4, 4)
    with torch.no_grad(), precision.capture(model, tmp_path / "o.st", level="ops") as cap:
        out = model(x)
    d = precision.load(cap.path)
    ops = [e.key for e in d.entries if parse_key(e.key).op]
    assert ops == ["lin/linear:out", "root/add:out", "root/softmax:out", "root/mul:out",
                   "root/cast_float32_float64:out", "root/cast_float64_float32:out"], ops
    # each is its value, copied when it was made
    h = model.lin(x)
    assert torch.equal(torch.from_numpy(d["root/add:out"]), x + h)
    assert torch.equal(torch.from_numpy(d["root/mul:out"]), torch.softmax(x + h, -1) * 2.0)
    assert d.entry("root/cast_float32_float64:out").dtype == "float64"
    assert torch.equal(torch.from_numpy(d["root/cast_float64_float32:out"]), out)
    assert d.meta["level"] == "ops"
    assert d.entry("lin:out").alias_of == "lin/linear:out"  # stored once


def test_operation_globs_and_module_level_default(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x = Block(), torch.randn(4, 4)
    with torch.no_grad(), precision.capture(model, tmp_path / "a.st", level="ops",
                                            ops_include=["soft*", "add"],
                                            ops_exclude=["add"]) as cap:
        model(x)
    assert [e.key for e in precision.load(cap.path).entries
            if parse_key(e.key).op] == ["root/softmax:out"]
    with torch.no_grad(), precision.capture(model, tmp_path / "m.st") as cap:
        model(x)
    assert not any(parse_key(e.key).op for e in precision.load(cap.path).entries)


def test_t5_softmax_position_bias_add_and_ffn_residual_add(tmp_path: Path) -> None:
    """With eager attention T5's attention is matmul, + position bias, softmax."""
    out = tmp_path / "t5.st"
    code, text = cli("capture", "--model", T5, "--attention", "eager", "--level", "ops",
                     "-q", "-o", out)
    assert code == 0, text
    d = precision.load(out)
    keys = {e.key for e in d.entries}
    attn = "encoder.block.0.layer.0.SelfAttention"
    assert {f"{attn}/matmul:out", f"{attn}/add:out", f"{attn}/softmax:out",
            "encoder.block.0.layer.1/add:out"} <= keys, sorted(keys)[:40]
    assert d.meta["attention"] == "eager"


def test_the_planted_wo_overflow_is_traced_to_its_operation(tmp_path: Path) -> None:
    base, half = tmp_path / "b.st", tmp_path / "h.st"
    assert cli("capture", "--model", T5_OVERFLOW, "--level", "ops", "-q", "-o", base)[0] == 0
    assert cli("capture", "--model", T5_OVERFLOW, "--dtype", "fp16", "--keep-fp32", "none",
               "--level", "ops", "--replay", base, "-q", "-o", half)[0] == 0
    report = precision.compare(base, half)
    first = report.first_divergence
    assert first is not None and (first.key, first.status) == (f"{WO}/linear:out", "OVERFLOW")
    # the FFN's residual add hands the inf on; T5's fp16-only clamp is no row, but a note
    add = next(r for r in report.rows if r.key == "encoder.block.2.layer.1/add:out")
    assert add.status == "OVERFLOW"
    assert not any("/clamp:" in r.key for r in report.rows)
    assert any("ran in the target only" in n and "clamp x" in n for n in report.notes)


@pytest.mark.kernels
@pytest.mark.parametrize("model", [T5, QWEN], ids=lambda p: p.name)
@pytest.mark.parametrize("mode", ["full", "stats"])
def test_healthy_half_runs_pass_at_operator_level(tmp_path: Path, model: Path,
                                                  mode: str) -> None:
    base = tmp_path / "b.st"
    code, text = cli("capture", "--model", model, "--level", "ops", "--mode", mode,
                     "--expect", "bf16", "-q", "-o", base)
    assert code == 0, text
    target = tmp_path / "t.st"
    assert cli("capture", "--model", model, "--level", "ops", "--mode", mode, "--dtype",
               "bf16", "--replay", base, "-q", "-o", target)[0] == 0
    report = precision.compare(base, target)
    assert report, report.summary
    ops = [r for r in report.rows if parse_key(r.key).op]
    assert len(ops) > 20 and all(r.status == "OK" for r in ops)


def test_ops_options_need_the_ops_level(tmp_path: Path) -> None:
    code, text = cli("capture", "--model", FIXTURES / "tiny-qwen3", "--ops", "softmax",
                     "-o", tmp_path / "x.st")
    assert code == 2 and "--level ops" in text and "Traceback" not in text


def test_an_in_place_operation_records_the_input_it_read(tmp_path: Path) -> None:
    """``a += b`` is ``add_``, and with its inputs recorded, input 0 is ``a`` before the add."""

    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.lin(x)
            h += x
            return h

    torch.manual_seed(0)
    model, x = InPlace(), torch.randn(2, 4)
    with torch.no_grad(), precision.capture(model, tmp_path / "i.st", level="ops",
                                            inputs=["root"]) as cap:
        model(x)
    d = precision.load(cap.path)
    h = model.lin(x).detach()
    assert torch.equal(torch.from_numpy(d["root/add_:in.0"]), h)
    assert torch.equal(torch.from_numpy(d["root/add_:out"]), h + x)
    from precision.doctor.opcheck import check

    report = check(cap.path)
    assert report and [o.key for o in report.ops] == ["root/add_:out"], report.summary


def test_report_nests_operations_under_their_module_and_the_plot_leaves_them_out(
        tmp_path: Path) -> None:
    import re

    from precision.outputs import plots

    base, half = tmp_path / "b.st", tmp_path / "h.st"
    assert cli("capture", "--model", T5_OVERFLOW, "--level", "ops", "-q", "-o", base)[0] == 0
    assert cli("capture", "--model", T5_OVERFLOW, "--dtype", "fp16", "--keep-fp32", "none",
               "--level", "ops", "--replay", base, "-q", "-o", half)[0] == 0
    page = tmp_path / "r.html"
    code, text = cli("report", base, half, "-o", page)
    assert code == 1, text
    html = page.read_text()
    assert "id='ops'" in html
    rows = re.findall(r"<tr([^>]*)><td[^>]*>\d+</td><td class=\"layer\" data-v=\"([^\"]+)\"",
                      html)
    ops = {key: attrs for attrs, key in rows if "/" in key}
    assert ops and all('class="' in a and "op" in a for a in ops.values())
    flagged_op = ops[f"{WO}/linear:out"]
    assert "hidden" not in flagged_op and "flagged" in flagged_op  # flagged: always shown
    assert any("hidden" in a for a in ops.values())  # the others start folded away
    report = precision.compare(base, half)
    drawn = [label.split("\n")[0].split(" ", 1)[1] for hit in
             plots.error_vs_depth(report).__dict__[plots.HITS_ATTR] for label in hit[3]]
    assert drawn and not any("/" in k for k in drawn)
    drawn = [label.split("\n")[0].split(" ", 1)[1] for hit in
             plots.error_vs_depth(report, operations=True).__dict__[plots.HITS_ATTR]
             for label in hit[3]]
    assert any("/" in k for k in drawn)


def test_a_training_step_records_the_gradients_of_operations(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x = Block(), torch.randn(4, 4)
    with precision.capture(model, tmp_path / "g.st", level="ops", backward=True) as cap:
        out = model(x)
        out.sum().backward()
    d = precision.load(cap.path)
    # d(sum(2 softmax(z)))/d softmax = 2 everywhere; the cast back to fp32 passes 1s on
    assert np.array_equal(d["root/softmax:grad"], np.full((4, 4), 2.0, np.float32))
    assert np.array_equal(d["root/cast_float64_float32:grad"], np.ones((4, 4), np.float32))
    assert "lin/linear:grad" in d and "lin:grad.0" in d
    # the forward's records are there as without --backward
    assert "root/softmax:out" in d


def test_dtypes_a_dump_cannot_hold_do_not_break_an_ops_capture(tmp_path: Path) -> None:
    """A float8 cast inside a forward (FP8 models): the float8 tensor is not recorded (a dump
    holds no float8), the cast back is, and its inputs leave it unreplayable, not broken."""

    class Fp8(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.to(torch.float8_e4m3fn).to(torch.float32) * 2

    model, x = Fp8(), torch.randn(3, 4)
    with torch.no_grad(), precision.capture(model, tmp_path / "f.st", level="ops",
                                            inputs=["root"]) as cap:
        model(x)
    d = precision.load(cap.path)
    keys = [e.key for e in d.entries if parse_key(e.key).op and e.kind == "out"]
    assert keys == ["root/cast_float8_e4m3fn_float32:out", "root/mul:out"], keys
    assert "op_call" in next(e for e in d.meta["entries"] if e["key"] == "root/mul:out")

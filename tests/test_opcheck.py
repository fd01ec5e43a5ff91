"""``precision check``: each recorded operation run again on the CPU on its recorded inputs."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import precision
from precision.cli import main
from precision.doctor.opcheck import check, resolve
from precision.errors import InputError

from .conftest import QWEN, T5, real_model, write_dump

pytestmark = pytest.mark.slow


def cli(*args: object) -> tuple[int, str]:
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(64, 64)
        self.o = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = torch.matmul(self.q(x), x.transpose(-1, -2)) * 0.5
        return self.o(torch.matmul(torch.softmax(scores, dim=-1), x)) + x


def toy() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(Attention(), Attention()).half()
    return model, (torch.randn(2, 16, 64) * 2).half()


@contextlib.contextmanager
def faulty(name: str, kernel: Callable[..., torch.Tensor]) -> Iterator[None]:
    """``torch.<name>`` replaced by ``kernel``, seen by the capture as one ``name`` call: a
    device's faulty kernel for that operation."""
    original = getattr(torch, name)

    def op(*args: Any, **kwargs: Any) -> Any:
        tensors = tuple(a for a in args if isinstance(a, torch.Tensor))
        if torch.overrides.has_torch_function(tensors):
            return torch.overrides.handle_torch_function(op, tensors, *args, **kwargs)
        return kernel(*args, **kwargs)

    op.__name__, op.__module__ = name, "torch"
    setattr(torch, name, op)
    try:
        yield
    finally:
        setattr(torch, name, original)


def softmax_without_max(t: torch.Tensor, dim: int) -> torch.Tensor:
    e = t.exp()
    return e / e.sum(dim, keepdim=True)


def matmul_in_fp16(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Every product added to an fp16 accumulator one at a time (no wider accumulator)."""
    acc = torch.zeros(*a.shape[:-1], b.shape[-1], dtype=a.dtype)
    for k in range(a.shape[-1]):
        acc = acc + a[..., k:k + 1] * b[..., k:k + 1, :]
    return acc


def capture_toy(path: Path, *plants: tuple[str, Callable[..., torch.Tensor]],
                scale: float = 1.0) -> Path:
    model, x = toy()
    with contextlib.ExitStack() as stack:
        for name, kernel in plants:
            stack.enter_context(faulty(name, kernel))
        with torch.no_grad(), precision.capture(model, path, level="ops", inputs=["*"]):
            model(x * scale)
    return path


def test_a_healthy_run_names_nothing(tmp_path: Path) -> None:
    report = check(capture_toy(tmp_path / "ok.st"))
    assert report, report.summary
    assert {o.status for o in report.ops} == {"OK"} and len(report.ops) >= 12
    # the golden is float64, and the CPU's fp16 run is the one recorded (up to the order
    # its kernel sums in): the same error
    for o in report.ops:
        assert o.device_err == pytest.approx(o.cpu_err, rel=0.05, abs=1e-9), o


def test_a_softmax_without_the_max_subtracted_is_named(tmp_path: Path) -> None:
    report = check(capture_toy(tmp_path / "s.st", ("softmax", softmax_without_max),
                               scale=8.0))
    first = report.first
    assert first is not None and first.key == "0/softmax:out", report.summary
    assert first.status == "OVERFLOW" and "the device's kernel" in first.reason


def test_a_matmul_accumulating_in_fp16_is_named(tmp_path: Path) -> None:
    report = check(capture_toy(tmp_path / "m.st", ("matmul", matmul_in_fp16)))
    first = report.first
    assert first is not None and (first.key, first.status) == ("0/matmul:out", "DRIFT")
    assert first.ratio > 3, first
    assert all(o.status == "OK" for o in report.ops if "matmul" not in o.key)


def test_an_add_that_overflows_is_the_formats_range(tmp_path: Path) -> None:
    report = check(capture_toy(tmp_path / "a.st", scale=3000.0))
    first = report.first
    assert first is not None and first.status == "OVERFLOW", report.summary
    assert "the format's range" in first.reason


@pytest.mark.kernels
@pytest.mark.parametrize("model", [T5, QWEN], ids=lambda p: p.name)
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_healthy_fixture_dumps_pass_from_the_cli(tmp_path: Path, model: Path,
                                                 dtype: str) -> None:
    out = tmp_path / "o.st"
    code, text = cli("capture", "--model", model, "--dtype", dtype, "--level", "ops",
                     "--inputs", "*", "-q", "-o", out)
    assert code == 0, text
    code, text = cli("check", out, "--json", tmp_path / "c.json")
    assert code == 0, text
    result = json.loads((tmp_path / "c.json").read_text())
    statuses = {o["status"] for o in result["operations"]}
    assert result["passed"] and statuses <= {"OK", "SKIPPED"}, text
    assert sum(o["status"] == "OK" for o in result["operations"]) > 20


def test_a_real_model_dump_passes(tmp_path: Path) -> None:
    folder = real_model("rxnmapper-albert")
    from safetensors.torch import save_file

    ids = torch.randint(5, 30, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0
    save_file({"input_ids": ids, "attention_mask": mask}, str(tmp_path / "feed.safetensors"))
    out = tmp_path / "o.st"
    code, text = cli("capture", "--model", folder, "--class", "AlbertForMaskedLM", "--feed",
                     tmp_path / "feed.safetensors", "--dtype", "fp16", "--level", "ops", "--inputs",
                     "*", "-q", "-o", out)
    assert code == 0, text
    code, text = cli("check", out, "-q")
    assert code == 0 and text.startswith("PASS"), text


def test_bad_dumps_get_one_line(tmp_path: Path, make_dump: Callable[..., Path]) -> None:
    stats = tmp_path / "s.st"
    assert cli("capture", "--model", QWEN, "--mode", "stats", "--level", "ops", "-q", "-o",
               stats)[0] == 0
    plain = make_dump("p.st", {"lin:out": np.ones(3, np.float32)})
    for dump, words in ((stats, "stats-mode"), (plain, "--level ops --inputs"),
                        (tmp_path / "none.st", "")):
        code, text = cli("check", dump)
        assert code == 2 and text.startswith("error:") and words in text, text
        assert len(text.strip().splitlines()) == 1


def test_a_dump_cannot_name_what_check_runs(tmp_path: Path) -> None:
    for path in ("os.system", "builtins.eval", "torch.load", "torch.save",
                 "Tensor.__reduce_ex__", "torch.nn.functional.../x", "torch.hub.load"):
        with pytest.raises(InputError):
            resolve(path)
    assert resolve("torch.nn.functional.softmax") is torch.nn.functional.softmax
    assert resolve("Tensor.add_") is torch.Tensor.add_
    entries = [{"key": "m/softmax:out", "module": "m/softmax", "kind": "out", "index": "",
                "call": 0, "shape": [2], "dtype": "float32",
                "op_call": {"func": "os.system", "args": ["echo no"], "kwargs": {}}}]
    path = write_dump(tmp_path / "evil.st", {"m/softmax:out": np.ones(2, np.float32)},
                      meta={"entries": entries})
    code, text = cli("check", path)
    assert code == 2 and "not a torch function" in text, text


def test_check_without_torch_says_so_in_one_line(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['torch'] = None; from precision.cli import main; "
            f"sys.argv = ['precision', 'check', {str(tmp_path / 'x.st')!r}]; main()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().startswith("error:") and "torch" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1

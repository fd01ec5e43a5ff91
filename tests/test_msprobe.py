"""msprobe dumps as msprobe writes them: tests/data/msprobe (real mindstudio-probe 26.2
statistics dumps of the Qwen3 fixture, scripts/make_msprobe_dump.py) and synthetic folders for
what that run did not write (MindSpore names, ranks, odd dtypes)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from precision.dumps.external import msprobe, open_any
from precision.errors import DumpError

DATA = Path(__file__).parent / "data" / "msprobe"


def _tensor(dtype: str = "torch.float32", **stats: Any) -> dict[str, Any]:
    return {"type": "torch.Tensor", "dtype": dtype, "shape": [2, 3], "Max": 1.0, "Min": -1.0,
            "Mean": 0.0, "Norm": 2.0} | stats


def _write(folder: Path, data: dict[str, Any], framework: str = "pytorch") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dump.json").write_text(json.dumps(
        {"task": "statistics", "level": "L0", "framework": framework, "data": data}))
    return folder


def test_training_step_records_keyed_as_a_capture_keys_them() -> None:
    d = open_any(DATA / "fp32-train")
    keys = {e.key for e in d.entries}
    # forward outputs, the gradient of a module's output, a parameter's gradient
    assert {"model.layers.1.mlp:out", "model.layers.1.mlp:grad",
            "model.layers.1.mlp.down_proj.weight:pgrad", "lm_head:grad"} <= keys
    assert {k: d.meta["msprobe"][k] for k in ("task", "level", "step", "steps")} == {
        "task": "statistics", "level": "L0", "step": 0, "steps": [0, 1]}
    # what has no precision counterpart is counted, never silently dropped
    assert d.meta["left_out"] == {"module parameters (weights)": 47,
                                  "gradients of inputs (precision keys gradients by outputs)": 58}
    grad = d.entry("model.layers.1.mlp.down_proj.weight:pgrad")
    assert grad is not None and grad.stats is not None and grad.stats["norm"] > 0


def test_a_step_folder_reads_that_step() -> None:
    first, second = open_any(DATA / "fp32-train"), open_any(DATA / "fp32-train" / "step1")
    assert second.meta["msprobe"]["step"] == 1
    a, b = (d.entry("lm_head.weight:pgrad") for d in (first, second))
    assert a is not None and b is not None and a.stats != b.stats  # one optimiser-free step on


def test_statistics_msprobe_did_not_write_stay_unknown() -> None:
    md5 = open_any(DATA / "fp32-md5").entry("model.layers.0.mlp:out")
    xor = open_any(DATA / "fp32-xor").entry("model.layers.0.mlp:out")
    assert md5 is not None and md5.stats is not None and xor is not None and xor.stats is not None
    assert md5.stats["norm"] > 0 and len(md5.stats["checksum"]) == 8  # CRC-32 beside the stats
    assert xor.stats["norm"] is None and xor.stats["max"] is None  # never 0
    assert xor.stats["checksum"].startswith("0x")


def test_the_runs_dtype_is_what_msprobe_recorded() -> None:
    assert open_any(DATA / "bf16-train").dtype == "bfloat16"
    assert open_any(DATA / "fp32-train").dtype == "float32"


def test_mindspore_names_and_dtypes(tmp_path: Path) -> None:
    folder = _write(tmp_path / "ms", {
        "Cell.network.dense.Dense.forward.0": {"input_args": [_tensor("Float32")],
                                               "output": [_tensor("BFloat16")]},
        "Cell.network.dense.Dense.backward.0": {"input": [_tensor("Float32")]},
        "Mint.add.0.forward": {"input_args": [_tensor("Int64")], "output": [_tensor("Float16")]},
    }, framework="mindspore")
    d = open_any(folder)
    dtypes = {e.key: e.dtype for e in d.entries}
    assert dtypes == {"network.dense:in.0": "float32", "network.dense:out": "bfloat16",
                      "network.dense:grad": "float32", "Mint.add.0:in.0": "int64",
                      "Mint.add.0:out.0": "float16"}


def test_one_odd_record_is_left_out_not_the_dump(tmp_path: Path) -> None:
    folder = _write(tmp_path / "odd", {
        "Module.rope.Rotary.forward.0": {"output": [_tensor("torch.complex64")]},
        "Module.fc.Linear.forward.0": {"output": [_tensor("torch.float8_e4m3fn"), _tensor()]},
        "Distributed.all_reduce.0.forward": {"output": [_tensor()]},
        "Module.fc.Linear.recompute.0": {"output": [_tensor()]},
    })
    d = open_any(folder)
    assert {e.key for e in d.entries} == {"fc:out.1", "Distributed.all_reduce.0:out.0"}
    assert d.meta["left_out"] == {"dtype torch.complex64": 1, "dtype torch.float8_e4m3fn": 1,
                                  "records of unknown kinds": 1}


def test_ranks_line_up_as_a_sharded_capture(tmp_path: Path) -> None:
    for rank in (0, 1):
        _write(tmp_path / "run" / "step0" / f"rank{rank}", {
            "Module.fc.Linear.forward.0": {"output": [_tensor(Norm=2.0 + rank)]}})
    d = open_any(tmp_path / "run")
    assert {e.key for e in d.entries} == {"rank0/fc:out", "rank1/fc:out"}
    assert d.meta["msprobe"]["ranks"] == [0, 1]


def test_a_renamed_dump_json_is_read_as_msprobe(tmp_path: Path) -> None:
    src = DATA / "fp32-md5" / "step0" / "proc0" / "dump.json"
    renamed = tmp_path / "npu_fp16_dump.json"
    shutil.copy(src, renamed)
    assert len(open_any(renamed).entries) == len(open_any(src).entries)


def test_a_folder_without_an_msprobe_dump_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "step0" / "rank0").mkdir(parents=True)
    with pytest.raises(DumpError, match=r"no msprobe dump\.json here"):
        msprobe.dump_files(tmp_path / "step0")

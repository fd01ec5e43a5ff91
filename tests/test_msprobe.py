"""msprobe dumps as msprobe writes them: tests/data/msprobe (real mindstudio-probe 26.2
statistics dumps of the Qwen3 fixture, scripts/make_msprobe_dump.py) and synthetic folders for
what that run did not write (MindSpore names, ranks, odd dtypes)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import precision
from precision.cli import main
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
    # TrainOneStepCell's ``network.`` wraps every cell: removed, so names line up with a
    # PyTorch model's
    assert dtypes == {"dense:in.0": "float32", "dense:out": "bfloat16",
                      "dense:grad": "float32", "Mint.add.0:in.0": "int64",
                      "Mint.add.0:out.0": "float16"}
    assert d.meta["msprobe"]["names"] == "wrapper prefix 'network' removed"


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


# ------------------------------------------------------------------ judged
def test_healthy_bf16_training_step_passes_and_a_planted_fault_is_found_first() -> None:
    healthy = precision.compare(DATA / "fp32-train", DATA / "bf16-train")
    assert healthy and not healthy.warnings
    assert any("left out 105 tensor record(s)" in n for n in healthy.notes)
    assert any("step 0 compared, of steps 0, 1" in n for n in healthy.notes)
    grads = [r for r in healthy.rows if r.key.endswith((":grad", ":pgrad"))]
    assert len(grads) > 50 and all(r.stats_delta is not None for r in grads)  # judged too
    faulty = precision.compare(DATA / "fp32-train", DATA / "bf16-fault-train")
    assert not faulty and faulty.first_divergence is not None
    assert faulty.first_divergence.key == "model.layers.1.mlp.down_proj:out"


def test_a_real_decoders_healthy_bf16_statistics_pass() -> None:
    """SmolLM2-135M (30 layers) in bf16 against fp32, both dumped by msprobe: msprobe's own
    compare marks 1272 of its 1463 rows 'error' (docs/external.md)."""
    report = precision.compare(DATA / "smollm2-135m-float32", DATA / "smollm2-135m-bfloat16")
    assert report, report.first_divergence
    assert sum(r.stats_delta is not None and r.stats_delta.has_statistics
               for r in report.rows) > 700


def test_checksums_alone_never_pass_a_difference() -> None:
    differs = precision.compare(DATA / "fp32-xor", DATA / "bf16-xor")
    assert not differs and differs.first_divergence is not None
    assert "checksums differ" in differs.first_divergence.reason
    same = precision.compare(DATA / "fp32-xor", DATA / "fp32-xor-again")
    assert same and any(r.reason == "bit-identical (checksums agree)" for r in same.rows)
    md5 = precision.compare(DATA / "fp32-md5", DATA / "bf16-md5")  # statistics judge it
    assert md5 and any(n.startswith("checksums differ on 157 of 157") for n in md5.notes)


@pytest.mark.parametrize("order", [("fp32-md5", "fp32-xor"), ("fp32-xor", "fp32-md5")])
def test_checksums_of_different_kinds_are_never_compared(order: tuple[str, str]) -> None:
    """summary_mode md5 writes a CRC-32, xor an xor: the same tensor's two checksums never
    agree, so an md5 run against an xor run of one fp32 forward is nothing to compare (it was
    157 DRIFT rows, 'checksums differ'), not a FAIL."""
    from precision.judge.measure.statsdiff import checksum_kind

    with pytest.raises(DumpError, match=r"hold checksums of different kinds \(8-digit, xor: "
                                        r"msprobe's summary_mode md5 and xor\), which never "
                                        r"agree, and no statistic in common"):
        precision.compare(DATA / order[0], DATA / order[1])
    assert checksum_kind("0x832d6682813426d5") == "xor" != checksum_kind("ecf00eb7")


def _stats_pair(tmp_path: Path, base: dict[str, Any], target: dict[str, Any]) -> list[Path]:
    out = []
    for name, stats in (("a", base), ("b", target)):
        out.append(_write(tmp_path / name, {
            "Module.fc.Linear.forward.0": {"output": [_tensor("torch.bfloat16" if name == "b"
                                                              else "torch.float32") | stats]}}))
    return out


@pytest.mark.parametrize(("target", "flagged"), [
    ({"Max": 9.0}, True),            # the case: Max 1.44 -> 9.0, norm not written
    ({"Max": 1.4401}, False),        # within what bf16 can move it
    ({"Min": -6.0}, True),
    ({"Mean": 0.9}, True),           # sqrt(6) x 0.9 against 2 x 5 eps x sqrt(6) x 1.44
    ({"Mean": 0.01}, False),
])
def test_max_min_mean_are_judged_without_a_norm(tmp_path: Path, target: dict[str, Any],
                                                flagged: bool) -> None:
    base = {"Max": 1.44, "Min": -1.0, "Mean": 0.0, "Norm": None}
    a, b = _stats_pair(tmp_path, base, base | target)
    report = precision.compare(a, b)
    row = next(r for r in report.rows if r.key == "fc:out")
    assert row.stats_delta is not None and row.stats_delta.norm_base is None  # unknown, not 0
    assert row.flagged is flagged, row.reason
    if not flagged:
        assert row.reason == "stats only: max, min, mean agree (no norm recorded)"


def test_unrelated_dumps_are_an_error_not_a_pass(tmp_path: Path) -> None:
    a = _write(tmp_path / "a", {"Module.fc.Linear.forward.0": {"output": [_tensor()]}})
    b = _write(tmp_path / "b", {"Module.head.Linear.forward.0": {"output": [_tensor()]}})
    with pytest.raises(DumpError, match="nothing to compare: 0 record"):
        precision.compare(a, b)
    result = CliRunner().invoke(main, ["compare", str(a), str(b)])
    assert result.exit_code == 2 and "nothing to compare" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_dumps_of_two_models_are_an_error_not_a_fail() -> None:
    """Real dumps of two models (SmolLM2-135M and the Qwen3 fixture's training step): most
    records pair with nothing and the 151 that pair by name differ in shape. That is one
    line and exit 2, as for unrelated dumps, not a FAIL of 151 MISMATCH rows; dumps of one
    model with different inputs (every shape differs, every record pairs) stay a FAIL."""
    result = CliRunner().invoke(main, ["compare", str(DATA / "smollm2-135m-float32"),
                                       str(DATA / "fp32-train")])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: nothing to compare: 151 record(s) paired, the "
                                    "151 that pair differ in shape")
    assert len(result.output.strip().splitlines()) == 1


def test_the_report_names_the_users_folders() -> None:
    report = precision.compare(DATA / "fp32-md5", DATA / "bf16-md5")
    assert (report.base, report.target) == (str(DATA / "fp32-md5"), str(DATA / "bf16-md5"))


def test_inspect_opens_an_msprobe_folder() -> None:
    result = CliRunner().invoke(main, ["inspect", str(DATA / "fp32-train")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == str(DATA / "fp32-train")  # the user's folder, not a temporary dump
    assert "msprobe pytorch statistics L0, step 0 of 0, 1" in result.output
    assert "left out 47 module parameters (weights), 58 gradients of inputs" in result.output
    assert "model.layers.1.mlp.down_proj.weight:pgrad" in result.output


def test_a_real_two_rank_torchrun_dump_lines_up_rank_by_rank() -> None:
    """mindstudio-probe under ``torchrun --nproc_per_node 2`` (gloo) on the DDP-wrapped
    fixture, one training step, each rank its half of the batch: msprobe's ``step0/rank<r>``
    folders, records named under DDP's ``module.``."""
    d = open_any(DATA / "ddp2-fp32")
    assert d.meta["msprobe"]["ranks"] == [0, 1]
    assert d.meta["msprobe"]["names"] == "wrapper prefix 'module' removed"
    keys = {e.key for e in d.entries}
    assert {"rank0/model.layers.1.mlp:out", "rank1/model.layers.1.mlp:out",
            "rank1/model.layers.1.mlp.down_proj.weight:pgrad"} <= keys
    a, b = (d.entry(f"rank{r}/model.layers.1.mlp:out") for r in (0, 1))
    assert a is not None and b is not None and a.stats != b.stats  # each its own half
    report = precision.compare(DATA / "ddp2-fp32", DATA / "ddp2-bf16")
    assert report and not report.warnings, report.first_divergence
    assert all(r.status == "OK" for r in report.rows) and len(report.rows) == len(keys)


def test_the_html_report_of_msprobe_folders(tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    result = CliRunner().invoke(main, ["report", str(DATA / "fp32-train"),
                                       str(DATA / "bf16-fault-train"), "-o", str(out)])
    assert result.exit_code == 1, result.output  # the planted fault
    page = out.read_text()
    assert str(DATA / "bf16-fault-train") in page and "precision-external" not in page
    assert "model.layers.1.mlp.down_proj:out" in page


def test_different_inputs_between_summaries_are_the_first_divergence() -> None:
    """Two ranks fed different token ids: their integer inputs' statistics differ, and the
    first divergence is those inputs (a call's inputs are numbered before its outputs), not
    the embedding's output; runs fed the same ids say their statistics agree."""
    other = precision.compare(DATA / "ddp2-fp32/step0/rank0", DATA / "ddp2-bf16/step0/rank1")
    first = other.first_divergence
    assert first is not None and first.key == "model.embed_tokens:in.0"
    assert first.status == "DRIFT" and first.reason == (
        "integer inputs differ (min 3 vs 2, by their statistics): were the runs fed the same "
        "inputs? (else the model computed other indices)")
    embed = next(r for r in other.rows if r.key == "model.embed_tokens:out")
    assert embed.order > first.order
    same = precision.compare(DATA / "fp32-md5", DATA / "bf16-md5")
    ints = [r for r in same.rows if not r.base_dtype.startswith(("float", "bfloat"))]
    assert ints and all(r.status == "OK" and r.reason.endswith("statistics agree")
                        for r in ints)


def test_scan_reads_an_msprobe_summary_as_compare_does() -> None:
    """scan opened msprobe's folders as precision dumps and refused them (naming a flag it
    does not have); it reads them as compare and inspect do."""
    from click.testing import CliRunner

    from precision.cli import main

    report = precision.scan(DATA / "bf16-md5")
    assert report and report.against == "bfloat16" and len(report.rows) > 50
    result = CliRunner().invoke(main, ["scan", str(DATA / "bf16-md5"), "--top", "3"])
    assert result.exit_code == 0 and result.output.startswith("PASS [bf16]: no layer overflows")


def test_an_inf_in_a_bf16_summary_speaks_of_inf_alone(tmp_path: Path) -> None:
    """msprobe keeps no counts: a Max of inf is 'more inf' in a bf16 run, with no word of
    fp16's max (its counts are unknown, and fp16 did not run); an fp16 run still hears of
    values pinned near its max."""
    base, target = _stats_pair(tmp_path, {}, {"Max": "inf"})
    report = precision.compare(base, target)
    row = next(r for r in report.rows if r.key.endswith(":out"))
    assert row.status == "OVERFLOW" and row.reason == "1 more inf than the baseline"
    from precision.judge.measure.statsdiff import stats_delta
    from precision.judge.profiles import profile_for
    from precision.judge.verdict.rules import Context, stats_non_finite

    finite = {"numel": 6, "nan": 0, "posinf": 0, "neginf": 0, "beyond_fp16": 0,
              "near_fp16_max": 0, "norm": 2.0}
    pinned = finite | {"near_fp16_max": 3}
    row = report.rows[0]
    for dtype, counts, reason in (("float16", pinned, "0 more inf, 3 more values near the "
                                                      "fp16 max than the baseline"),
                                  ("float16", finite, None), ("bfloat16", pinned, None)):
        ctx = Context(profile_for("float32", dtype), {"target": dtype}, [], {})
        found = stats_non_finite(replace(row, stats_delta=stats_delta(finite, counts)), ctx)
        assert (found and found.reason) == reason


def test_msprobe_side_files_point_to_the_dump() -> None:
    """construct.json beside a dump.json was read as a vLLM generations file ('expected a
    list of sequences'); it names what it holds and what to pass instead."""
    folder = DATA / "fp32-md5" / "step0" / "proc0"
    with pytest.raises(DumpError, match=r"construct.json: msprobe's construct.json holds the "
                                        r"module tree, not data: pass its dump.json or the "
                                        r"folder .*proc0$"):
        precision.compare(folder / "construct.json", folder)


def test_the_reference_note_says_when_summaries_cannot_use_it(
        make_dump: Any) -> None:
    """A reference weighs a stats record's count sketch; msprobe's summaries hold none, so
    their rows are judged by the fixed limits, and the note says so rather than claim the
    reference judged them."""
    import numpy as np

    from precision.judge.lineup.align import BASE, REFERENCE, TARGET
    from precision.judge.measure.row import Row
    from precision.judge.measure.statsdiff import stats_delta
    from precision.judge.notes import reference_notes
    from precision.judge.profiles import profile_for

    x = {"a:out": np.ones(4, np.float32)}
    runs = {name: precision.load(make_dump(f"{name}.st", x)) for name in (BASE, REFERENCE,
                                                                           TARGET)}
    dtypes = {BASE: "float32", REFERENCE: "bfloat16", TARGET: "bfloat16"}
    prof = profile_for("float32", "bfloat16")
    st = {"numel": 4, "norm": 2.0, "max": 1.0, "min": 1.0, "mean": 1.0}
    summary = Row(0, "a:out", "OK", "", (4,), "float32", "bfloat16",
                  stats_delta=stats_delta(st, st))
    (note,) = reference_notes(runs, dtypes, prof, [summary])
    assert note.startswith("judged against reference.st") and note.endswith(
        "but 1 stats-only record(s) hold no count sketch to weigh against it (another tool's "
        "summary), so fixed limits judge them (5 eps rms)")
    sketched = np.ones(1021)
    with_sketch = Row(0, "a:out", "OK", "", (4,), "float32", "bfloat16", stats_delta=stats_delta(
        st | {"sketch": sketched}, st | {"sketch": sketched}))
    (plain,) = reference_notes(runs, dtypes, prof, [with_sketch])
    assert "fixed limits" not in plain


def test_a_forward_against_a_training_step_names_the_gradients() -> None:
    """A forward's summary against a training step's: the training step's gradient records
    pair with nothing, and the warning says so (it asked whether the runs name their modules
    alike and pointed to --mapping), while the forward records are judged."""
    report = precision.compare(DATA / "fp32-md5", DATA / "bf16-fault-train")
    assert report.warnings == (
        "111 gradient record(s) are in one run only (first lm_head.weight:pgrad, only in the "
        "target): a training step against a forward? Compare runs of one kind; those records "
        "are not judged",)
    first = report.first_divergence
    assert first is not None and first.key == "model.layers.1.mlp.down_proj:out"


def test_integer_statistics_agree_to_float32_sums_and_extrema_exactly() -> None:
    """A million token ids summed in float32 in two orders differ by about 7e-6 in their
    norm: that is agreement; one id more at the top is not (the maximum moved), nor is one
    checksum of a kind against another of the same kind."""
    from precision.judge.measure.pairs import _integers_moved

    ids = {"numel": 1 << 20, "min": 2.0, "max": 150000.0, "mean": 75000.0, "norm": 8.7e7}
    assert _integers_moved(ids, ids | {"norm": 8.7e7 * (1 + 7.3e-6)}) == ""
    assert _integers_moved(ids, ids | {"norm": 8.7e7 * (1 + 1e-3)}) == "norm 87000000 vs 87087000"
    assert _integers_moved(ids, ids | {"max": 150001.0}) == "max 150000 vs 150001"
    assert _integers_moved(ids | {"checksum": "0x01"}, ids | {"checksum": "0x02"}) == \
        "checksums differ"
    assert _integers_moved({"checksum": "0x01"}, {"checksum": "0a0b0c0d"}) is None


def test_summaries_with_a_third_of_their_records_in_one_run_only_say_so(
        tmp_path: Path) -> None:
    """Fewer than half unpaired keeps msprobe's --mapping advice out, but more than a
    quarter is still a warning, as for two of this tool's dumps."""
    calls = {f"Module.fc{i}.Linear.forward.0": {"output": [_tensor()]} for i in range(3)}
    base = _write(tmp_path / "a", calls)
    target = _write(tmp_path / "b", dict(list(calls.items())[:2]))
    (warning,) = precision.compare(base, target).warnings
    assert warning.startswith("1 of 3 records are in one run only (first fc2:out, only in the "
                              "baseline)"), warning


def test_a_record_given_twice_in_dump_json_is_refused(tmp_path: Path) -> None:
    """json.loads keeps the last of two records of one name: a doctored or merged dump.json
    was read as the second alone (DRIFT, 'max moved from 1 to 999')."""
    name = "Module.fc.Linear.forward.0"
    one = json.dumps({"output": [_tensor()]})
    two = json.dumps({"output": [_tensor(Max=999.0)]})
    ok = _write(tmp_path / "ok", {name: {"output": [_tensor()]}})
    open_any(ok)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "dump.json").write_text('{"task": "statistics", "level": "L0", "framework": '
                                   f'"pytorch", "data": {{"{name}": {one}, "{name}": {two}}}}}')
    with pytest.raises(DumpError, match=f"gives '{name}' twice in one object"):
        open_any(bad)


def test_a_tensor_file_of_another_shape_than_dump_json_says_is_refused(tmp_path: Path) -> None:
    import numpy as np

    folder = tmp_path / "npy"
    (folder / "dump_tensor_data").mkdir(parents=True)
    np.save(folder / "dump_tensor_data" / "fc.npy", np.ones((2, 3), np.float32))
    for shape, fine in (([2, 3], True), ([2, 4], False)):
        item = _tensor(shape=shape, data_name="fc.npy")
        (folder / "dump.json").write_text(json.dumps({
            "task": "tensor", "level": "L0", "framework": "pytorch",
            "data": {"Module.fc.Linear.forward.0": {"output": [item]}}}))
        if fine:
            assert open_any(folder)["fc:out"].shape == (2, 3)
        else:
            with pytest.raises(DumpError, match=r"holds a \[2, 3\] tensor, but dump.json gives "
                                                r"'fc:out' the shape \[2, 4\]"):
                open_any(folder)

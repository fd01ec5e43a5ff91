"""Big models and training set-ups: device_map/accelerate, DDP under torchrun, ZeRO-3 grads."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import precision
from precision.cli import main
from precision.errors import ModelError
from precision.runtime.models.load import Policy, load_model

from .conftest import T5

SCRIPTS = Path(__file__).parent / "scripts"
#: encoder block 1 offloaded to disk: accelerate loads its weights at each forward
DISK_MAP = {"shared": "cpu", "encoder.embed_tokens": "cpu", "encoder.block.0": "cpu",
            "encoder.block.1": "disk", "encoder.block.2": "cpu", "encoder.block.3": "cpu",
            "encoder.final_layer_norm": "cpu", "encoder.dropout": "cpu", "decoder": "cpu",
            "lm_head": "cpu"}


def cli(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.output


@pytest.mark.slow
def test_device_map_with_disk_offload_records_the_same_numbers(tmp_path: Path) -> None:
    pytest.importorskip("accelerate")
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps(DISK_MAP))
    base, spread = tmp_path / "base.st", tmp_path / "spread.st"
    assert cli("capture", "--model", str(T5), "-q", "--max-new-tokens", "2", "-o",
               str(base))[0] == 0
    code, out = cli("capture", "--model", str(T5), "-q", "--device-map", str(mapping),
                    "--replay", str(base), "-o", str(spread))
    assert code == 0, out
    d = precision.load(spread)
    assert d.meta["device_map"]["encoder.block.1"] == "disk"
    assert Counter(d.meta["device_map"].values()) == {"cpu": 9, "disk": 1}
    assert [e.key for e in d.entries] == [e.key for e in precision.load(base).entries]
    report = precision.compare(base, spread)
    compared = [r for r in report.rows if r.metrics is not None]
    assert report and len(compared) > 100
    assert all(r.metrics.max_abs == 0 for r in compared)  # same CPU fp32 arithmetic
    code, out = cli("inspect", str(spread))
    assert "9 module(s) on cpu, 1 module(s) on disk" in out


@pytest.mark.parametrize(("content", "message"), [
    (None, "not one of auto, balanced"),
    ("{not json", "not readable JSON"),
    ('["encoder", 0]', "must map module names to devices"),
    ('{"encoder": [0, 1]}', "must map module names to devices"),
])
def test_bad_device_maps_are_one_line_errors(tmp_path: Path, content: str | None,
                                             message: str) -> None:
    mapping = tmp_path / "map.json"
    if content is not None:
        mapping.write_text(content)
    code, out = cli("capture", "--model", str(T5), "--device-map", str(mapping), "-o",
                    str(tmp_path / "x.st"))
    assert code == 2 and message in out and "Traceback" not in out
    assert not (tmp_path / "x.st").exists()


def test_device_map_refusals(tmp_path: Path) -> None:
    code, out = cli("capture", "--model", str(T5), "--device-map", "auto", "-o",
                    str(tmp_path / "x.st"))
    assert code == 2 and "with --device cpu leave it out" in out
    tied = tmp_path / "tied.json"  # the decoder's embedding is tied to the shared one
    tied.write_text(json.dumps({"shared": "cpu", "encoder": "cpu", "decoder": "disk",
                                "lm_head": "cpu"}))
    code, out = cli("capture", "--model", str(T5), "-q", "--device-map", str(tied), "-o",
                    str(tmp_path / "x.st"))
    assert code == 2 and out.startswith("error:") and "Traceback" not in out
    assert len(out.strip().splitlines()) == 1 and "keep them together" in out


def test_device_map_refuses_recasting_policies(tmp_path: Path) -> None:
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps(DISK_MAP))
    code, out = cli("capture", "--model", str(T5), "--device-map", str(mapping),
                    "--keep-fp32", "none", "-o", str(tmp_path / "x.st"))
    assert code == 2 and "--keep-fp32 auto only" in out


def test_device_map_without_accelerate_says_what_to_install(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "accelerate", None)  # import fails as if absent
    with pytest.raises(ModelError, match="pip install accelerate"):
        load_model(T5, dtype="float32", device="cpu", policy=Policy(), device_map="auto")


# ---------------------------------------------------------------- wrappers and training


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_a_wrapped_model_records_the_keys_of_the_model_inside(tmp_path: Path) -> None:
    model = Tiny()
    x = torch.randn(3, 4)
    with torch.no_grad(), precision.capture(model, tmp_path / "plain.st") as plain:
        model(x)
    wrapped = nn.DataParallel(model)  # on CPU it just calls the module
    with torch.no_grad(), precision.capture(wrapped, tmp_path / "wrapped.st") as cap:
        wrapped(x)
    assert [e.key for e in cap.dump.entries] == [e.key for e in plain.dump.entries]
    assert not any(k.startswith("module.") for k in cap.dump.tensors)
    assert cap.dump.meta["wrapped_in"] == "DataParallel"
    assert "wrapped_in" not in plain.dump.meta
    assert plain.dump.meta["distributed"] is None  # no process group in this test
    assert precision.compare(tmp_path / "plain.st", tmp_path / "wrapped.st")


def test_data_parallel_over_several_devices_is_refused() -> None:
    from precision.errors import InputError

    class DataParallel(nn.Module):  # stands for torch's, as built over two GPUs
        def __init__(self) -> None:
            super().__init__()
            self.module = Tiny()
            self.device_ids = [0, 1]

    with pytest.raises(InputError, match="DataParallel over 2 devices"):
        precision.capture(DataParallel(), dry_run=True)


def test_partitioned_gradients_come_through_grad_of(tmp_path: Path) -> None:
    """ZeRO-3 keeps no full ``param.grad``; ``grad_of`` fetches it (here from a dict)."""
    model = Tiny()
    loss = model(torch.randn(5, 4)).square().sum()
    loss.backward()
    held = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)  # what a partitioned optimizer leaves behind
    with pytest.warns(UserWarning, match="holds no records"), \
            precision.capture(model, tmp_path / "none.st") as cap:
        assert cap.add_parameter_grads() == 0
    with precision.capture(model, tmp_path / "full.st", loss_scale=4.0) as cap:
        stored = cap.add_parameter_grads(grad_of=lambda name, p: held.get(name))
    assert stored == len(held) == 4
    d = cap.dump
    for name, grad in held.items():
        assert torch.equal(torch.from_numpy(d[f"{name}:pgrad"]), grad / 4.0)


@pytest.mark.slow
def test_ddp_step_gradients_match_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                           "2", str(SCRIPTS / "ddp_step.py"), str(T5), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-1500:]
    for rank in (0, 1):
        d = precision.load(tmp_path / f"rank{rank}.st")
        assert d.meta["wrapped_in"] == "DistributedDataParallel"
        assert d.meta["distributed"] == {"rank": rank, "world_size": 2, "local_rank": rank,
                                         "backend": "gloo", "group_ranks": [0, 1]}
        assert not any(k.startswith("module.") for k in d.tensors)

    def pgrad_statuses(other: str) -> Counter[str]:
        report = precision.compare(tmp_path / "single.st", tmp_path / other)
        return Counter(r.status for r in report.rows if r.key.endswith(":pgrad"))

    n_params = sum(1 for e in precision.load(tmp_path / "single.st").entries
                   if e.kind == "pgrad")
    assert n_params > 50
    # DDP averaged the two halves' gradients: the whole batch's, up to rounding
    assert pgrad_statuses("rank0.st") == {"OK": n_params}
    assert pgrad_statuses("rank1.st") == {"OK": n_params}
    # control: one half's own gradients are not the whole batch's
    assert pgrad_statuses("half.st")["DRIFT"] == n_params
    # the per-rank files, indexed as the docs say, read as one directory dump
    from precision.dumps.shards import write_index

    folder = tmp_path / "step"
    folder.mkdir()
    for rank in (0, 1):
        (tmp_path / f"rank{rank}.st").rename(folder / f"rank{rank}.st")
    write_index(folder, 2, {})
    both = precision.load(folder)
    assert both.meta["shards"] == 2 and "rank1/shared.weight:pgrad" in both.tensors


# ---------------------------------------------------------------- what a large capture keeps


def _calls(d: precision.Dump, module: str) -> list[int]:
    return sorted({e.call for e in d.entries if e.module == module and e.kind == "out"})


@pytest.mark.slow
def test_steps_records_layers_only_at_the_chosen_decoding_steps(tmp_path: Path) -> None:
    chosen, every = tmp_path / "chosen.st", tmp_path / "every.st"
    assert cli("capture", "--model", str(T5), "-q", "--max-new-tokens", "4", "--steps", "0,2",
               "-o", str(chosen))[0] == 0
    assert cli("capture", "--model", str(T5), "-q", "--max-new-tokens", "4",
               "--capture-steps", "-o", str(every))[0] == 0
    c, e = precision.load(chosen), precision.load(every)
    dec, enc = "decoder.block.0.layer.1.EncDecAttention", "encoder.block.0.layer.0"
    assert _calls(e, dec) == [0, 1, 2, 3, 4]  # 4 steps, then the teacher-forced forward
    assert _calls(c, dec) == [0, 2, 4]  # the call numbers stay those of every step
    assert _calls(c, enc) == _calls(e, enc) == [0, 1]  # the encoder runs in step 0
    assert c.meta["generation"]["layer_steps"] == [0, 2]
    # the logits are the teacher-forced forward's (call 4), not a single-token step's
    assert c.meta["logits_key"] == e.meta["logits_key"] == "lm_head:out#4"
    assert {x.key for x in c.entries} < {x.key for x in e.entries}
    report = precision.compare(every, chosen)
    assert all(r.status in ("OK", "MISSING") for r in report.rows)
    assert all(r.metrics.max_abs == 0 for r in report.rows if r.metrics)
    assert {r.key.rsplit("#", 1)[-1] for r in report.rows if r.status == "MISSING"
            and r.key.startswith(dec)} == {"1", "3"}
    assert [r.key for r in report.rows if r.logits is not None] == ["lm_head:out#4"]
    later = tmp_path / "later.st"  # step 0 left out: the logits are still found
    assert cli("capture", "--model", str(T5), "-q", "--steps", "1", "--replay", str(every),
               "-o", str(later))[0] == 0
    assert precision.load(later).meta["logits_key"] == "lm_head:out#4"


@pytest.mark.parametrize(("spec", "message"), [("a", "step numbers and ranges"),
                                               ("3-1", "not a range"), ("-2", "step numbers"),
                                               ("1,,2", "step numbers"), (" ", "needs step"),
                                               ("0-9999999999", "at most")])
def test_bad_steps_are_one_line_errors(spec: str, message: str, tmp_path: Path) -> None:
    code, out = cli("capture", "--model", str(T5), "--steps", spec, "-o",
                    str(tmp_path / "x.st"))
    assert code == 2 and message in out and "Traceback" not in out


def test_an_empty_step_list_from_python_is_refused(tmp_path: Path) -> None:
    from precision.errors import InputError
    from precision.runtime.run.runner import CaptureOptions, run_capture

    with pytest.raises(InputError, match="at least one step"):
        run_capture(CaptureOptions(model=str(T5), output=str(tmp_path / "x.st"), steps=[]))


def test_a_full_glob_that_matches_nothing_is_an_error(tmp_path: Path) -> None:
    code, out = cli("capture", "--model", str(T5), "--mode", "stats", "--full", "lm_haed",
                    "-o", str(tmp_path / "x.st"))
    assert code == 2 and "--full lm_haed matches no module" in out
    assert not (tmp_path / "x.st").exists()


def test_full_globs_say_what_they_do_in_each_mode(tmp_path: Path) -> None:
    """--full names the records stats mode stores whole; in full mode, where every record is
    whole, the capture says it has nothing to do (it was silently ignored)."""
    code, out = cli("capture", "--model", str(T5), "--mode", "full", "--full", "lm_head",
                    "--max-new-tokens", "0", "-o", str(tmp_path / "f.st"))
    assert code == 0 and "(full mode; --full is for stats mode: every record is whole " \
        "here)" in out, out
    code, out = cli("capture", "--model", str(T5), "--mode", "stats", "--full", "lm_head",
                    "--max-new-tokens", "0", "-o", str(tmp_path / "s.st"))
    assert code == 0 and "(stats mode, whole tensors for lm_head)" in out, out


def test_steps_spec_parses_lists_and_ranges() -> None:
    from precision.runtime.run.runner import parse_steps

    assert parse_steps("5-7,0, 2,6") == [0, 2, 5, 6, 7]
    assert parse_steps("3") == [3]


@pytest.mark.slow
def test_auto_mode_keeps_small_models_whole_and_large_ones_as_stats(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small = tmp_path / "small.st"
    assert cli("capture", "--model", str(T5), "-q", "--max-new-tokens", "2", "-o",
               str(small))[0] == 0
    d = precision.load(small)
    assert d.mode == "full" and d.meta["mode_reason"].startswith("auto: 0.")
    # the same model judged "large": stats, except the modules asked for with --full
    monkeypatch.setattr("precision.runtime.run.runner.AUTO_STATS_PARAMS", 1000)
    large = tmp_path / "large.st"
    code, out = cli("capture", "--model", str(T5), "-q", "--replay", str(small), "--full",
                    "lm_head", "-o", str(large))
    assert code == 0, out
    s = precision.load(large)
    assert s.mode == "stats" and s.meta["mode_reason"].endswith("parameters > 0.001M")
    whole = {k for k in s.tensors if not k.startswith(("input:", "generation:"))}
    assert whole - {k for k in whole if k.endswith("relative_attention_bias:in.0")} == {
        "lm_head:out"}  # bucket ids (integers) are kept whole in stats mode anyway
    assert s.entry("encoder.block.0.layer.1:out").stats is not None
    report = precision.compare(small, large)
    logits = next(r for r in report.rows if r.key == "lm_head:out")
    assert logits.logits is not None and logits.metrics.max_abs == 0
    assert report.rows[5].stats_delta is not None  # the rest compare as statistics
    assert cli("capture", "--model", str(T5), "-q", "--replay", str(small), "--mode", "full",
               "-o", str(tmp_path / "asked.st"))[0] == 0
    assert precision.load(tmp_path / "asked.st").meta["mode_reason"] == "asked"


# ---------------------------------------------------------------- sizing a capture first


@pytest.mark.slow
def test_dry_run_predicts_the_dump_a_real_capture_writes(tmp_path: Path) -> None:
    from precision.runtime.run.plan import plan_model
    from precision.runtime.run.runner import CaptureOptions, run_capture

    opts = CaptureOptions(model=str(T5), output=str(tmp_path / "full.st"), max_new_tokens=8)
    plan = plan_model(opts)
    full = precision.load(run_capture(opts))
    stats_path = run_capture(CaptureOptions(model=str(T5), output=str(tmp_path / "stats.st"),
                                            max_new_tokens=8, mode="stats"))
    model_records = [e for e in full.entries if e.kind != "generation"
                     and e.key != "input:attention_mask"]  # the dry run has no mask
    assert plan.records == len(model_records)
    assert plan.tensors == sum(1 for e in model_records if not e.alias_of)
    real = (tmp_path / "full.st").stat().st_size
    assert abs(plan.full_bytes - real) < 0.02 * real
    real_stats = stats_path.stat().st_size
    assert abs(plan.stats_bytes - real_stats) < 0.10 * real_stats
    assert plan.largest[0][0] == "lm_head:out" and plan.auto_mode == "full"
    # selection shrinks the plan as it would shrink the capture
    fewer = plan_model(CaptureOptions(model=str(T5), output="", max_new_tokens=8, every=2))
    assert fewer.records < plan.records and fewer.full_bytes < plan.full_bytes


def test_dry_run_in_fp16_keeps_t5_wo_in_fp32_like_transformers(tmp_path: Path) -> None:
    from precision.runtime.run.plan import plan_model
    from precision.runtime.run.runner import CaptureOptions

    half = plan_model(CaptureOptions(model=str(T5), output="", dtype="fp16"))
    full = plan_model(CaptureOptions(model=str(T5), output="", dtype="fp32"))
    assert half.records == full.records and half.full_bytes < 0.7 * full.full_bytes
    code, out = cli("capture", "--model", str(T5), "--dtype", "fp16", "--dry-run")
    assert code == 0 and "dry run: T5ForConditionalGeneration" in out and "float16" in out
    assert "--mode auto would choose full" in out and not list(tmp_path.iterdir())


def test_a_model_that_cannot_run_on_meta_is_a_one_line_error() -> None:
    from precision.errors import InputError
    from precision.runtime.run.plan import plan_forward

    class DataDependent(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * float(x.sum())  # needs values: meta tensors have none

    with pytest.raises(InputError, match="cannot run on the meta device"):
        plan_forward(DataDependent(), {"x": torch.zeros(3, device="meta")})


@pytest.mark.parametrize("flag", [["--backward"], ["--capture-steps"], ["--steps", "1"],
                                  ["--replay", "base.st"]])
def test_dry_run_refuses_what_it_cannot_size(flag: list[str]) -> None:
    code, out = cli("capture", "--model", str(T5), "--dry-run", *flag)
    assert code == 2 and "--dry-run sizes one teacher-forced forward" in out


def test_dry_run_of_an_image_model_asks_for_an_image(tmp_path: Path) -> None:
    import shutil

    for f in T5.iterdir():
        if "tok" in f.name:
            shutil.copy(f, tmp_path / f.name)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    code, out = cli("capture", "--model", str(tmp_path), "--dry-run")
    assert code == 2 and "takes pixel_values: give --image" in out and "Traceback" not in out


def test_capture_without_output_needs_dry_run() -> None:
    code, out = cli("capture", "--model", str(T5))
    assert code == 2 and "--dry-run" in out

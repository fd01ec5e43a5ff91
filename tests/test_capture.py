"""Capture: hooks, keys, aliases, call indices, stats, metadata, replay and dtype policies."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import precision
from precision.cli import main
from precision.runtime.capture.streaming import HostRing
from precision.runtime.capture.trees import flatten
from precision.runtime.models.load import Policy, load_model
from precision.runtime.run.runner import CaptureOptions, run_capture

from .conftest import QWEN, T5, T5_OVERFLOW


@pytest.fixture(scope="module")
def t5() -> object:
    return load_model(T5, dtype="float32", device="cpu", policy=Policy())


def t5_inputs(loaded: object) -> dict[str, torch.Tensor]:
    tok = loaded.tokenizer  # type: ignore[attr-defined]
    enc = tok(["translate English to German: The house is wonderful.", "summarize: hi"],
              return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "decoder_input_ids": torch.tensor([[0, 5, 9], [0, 7, 7]])}


def test_t5_records_in_execution_order_with_aliases_and_buckets(t5: object,
                                                               tmp_path: Path) -> None:
    model = t5.model  # type: ignore[attr-defined]
    inputs = t5_inputs(t5)
    with torch.no_grad(), precision.capture(model, tmp_path / "a.st") as cap:
        out = model(**inputs)
    d = cap.dump
    keys = [e.key for e in d.entries]
    assert keys[:3] == ["input:input_ids", "input:attention_mask", "input:decoder_input_ids"]
    assert keys.index("encoder.final_layer_norm:out") < keys.index("decoder.embed_tokens:out")
    # logits: found through the model output and equal to it bit for bit
    assert d.meta["logits_key"] == "lm_head:out"
    np.testing.assert_array_equal(d["lm_head:out"], out.logits.numpy())
    # eval-mode dropout returns its input: stored once, recorded as an alias
    drop = d.entry("encoder.dropout:out")
    assert drop is not None and drop.alias_of == "encoder.embed_tokens:out"
    assert "encoder.dropout:out" not in d.tensors
    # position bias: computed by block 0, passed on to the others, stored once
    pb0 = "encoder.block.0.layer.0.SelfAttention:out.1"
    assert pb0 in d.tensors
    assert d.entry("encoder.block.1.layer.0.SelfAttention:out.1").alias_of == pb0
    # the integer bucket ids fed to relative_attention_bias
    ids = d["encoder.block.0.layer.0.SelfAttention.relative_attention_bias:in.0"]
    assert ids.dtype == np.int64 and ids.shape == (inputs["input_ids"].shape[1],) * 2
    assert d.meta["model"]["class"] == "T5ForConditionalGeneration"
    assert d.meta["module_dtypes"]["encoder.block.0.layer.1.DenseReluDense.wo"] == "float32"
    assert d.meta["env"]["torch"] == torch.__version__


def test_environment_names_the_libraries_this_process_runs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A library the process has not imported is not recorded, and not imported to find its
    version (seconds for transformers, a search of the path for an absent torch_npu)."""
    from precision.runtime.capture.compute import environment

    monkeypatch.delitem(sys.modules, "transformers", raising=False)
    monkeypatch.setitem(sys.modules, "torch_npu", types.SimpleNamespace(__version__="2.1.0"))
    env = environment()
    assert env["torch"] == torch.__version__ and env["numpy"] == np.__version__
    assert env["torch_npu"] == "2.1.0"
    assert "transformers" not in env and "transformers" not in sys.modules


@pytest.mark.parametrize(("layer", "has_conv"), [(nn.Conv1d(2, 2, 1), True),
                                                  (nn.Linear(2, 2), False)])
def test_the_dump_says_whether_the_model_convolves(layer: nn.Module, has_conv: bool,
                                                   tmp_path: Path) -> None:
    """cuDNN's TF32 switch matters to an fp32 run only where the model convolves."""
    model = nn.Sequential(nn.Identity(), nn.Sequential(layer))
    with torch.no_grad(), precision.capture(model, tmp_path / "a.st") as cap:
        model(torch.ones(1, 2, 2))
    assert cap.dump.meta["compute"]["has_conv"] is has_conv
    assert cap.dump.meta["module_dtypes"] == {"1.0": "float32"}


def test_call_index_when_a_module_runs_twice(t5: object, tmp_path: Path) -> None:
    model = t5.model  # type: ignore[attr-defined]
    inputs = t5_inputs(t5)
    with torch.no_grad(), precision.capture(model, tmp_path / "a.st",
                                            include=["lm_head"]) as cap:
        first = model(**inputs).logits
        second = model(**inputs).logits
    d = cap.dump
    assert {"lm_head:out", "lm_head:out#1"} <= set(d.tensors)
    np.testing.assert_array_equal(d["lm_head:out#1"], second.numpy())
    np.testing.assert_array_equal(d["lm_head:out"], first.numpy())


class Toy(nn.Module):
    """Tuple and dict outputs, an in-place change after the hook, and a non-tensor leaf."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.pair = Pair()

    def forward(self, x: torch.Tensor) -> dict[str, object]:
        h = self.lin(x)
        y, z = self.pair(h)
        h.mul_(0)  # the captured value must be the one at hook time
        return {"y": y, "z": z, "note": "text"}


class Pair(nn.Module):
    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, None]]:
        return h * 2, (h + 1, None)


def test_generic_module_flattening_and_copy_at_hook_time(tmp_path: Path) -> None:
    torch.manual_seed(0)
    toy = Toy()
    x = torch.randn(3, 4)
    expected = toy.lin(x).detach().clone()
    with torch.no_grad(), precision.capture(toy, tmp_path / "t.st") as cap:
        toy(x)
    d = cap.dump
    np.testing.assert_allclose(d["lin:out"], expected.numpy())
    np.testing.assert_allclose(d["pair:out.0"], 2 * expected.numpy())
    np.testing.assert_allclose(d["pair:out.1.0"], expected.numpy() + 1)
    assert d.entry("root:out.y").alias_of == "pair:out.0"
    assert d.meta["model"]["class"] == "Toy" and len(d.meta["model"]["config_hash"]) == 16
    assert [k for k, _ in flatten({"a": (1, torch.ones(1)), "b": None})] == ["a.1"]


def test_stats_mode_matches_numpy_and_counts_nonfinite(tmp_path: Path) -> None:
    class Spiky(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x.clone()
            y[0] = float("inf")
            y[1] = float("nan")
            y[2] = 65000.0
            return y

    model = nn.Sequential(nn.Identity(), Spiky())
    x = torch.randn(1000, dtype=torch.float32)
    with torch.no_grad(), precision.capture(model, tmp_path / "s.st", mode="stats") as cap:
        y = model(x)
    d = cap.dump
    assert d.mode == "stats" and not d.tensors.keys() - {"input:input"}
    st = d.entry("1:out").stats
    finite = y[torch.isfinite(y)].double().numpy()
    assert (st["nan"], st["posinf"], st["neginf"], st["near_fp16_max"]) == (1, 1, 0, 1)
    assert st["mean"] == pytest.approx(finite.mean(), rel=1e-6)
    assert st["norm"] == pytest.approx(np.linalg.norm(finite), rel=1e-6)
    assert st["absmax"] == pytest.approx(65000.0)
    clean = d.entry("input:input").stats
    assert clean["std"] == pytest.approx(x.double().std(unbiased=False).item(), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_device_statistics_match_float64_numpy_in_every_dtype(dtype: torch.dtype) -> None:
    """On the CPU a half-precision tensor is staged in float32 (the sketch's product then
    written over it) and extrema come from numpy: the numbers are numpy's float64 ones on
    the same values, twice in a row (the staging buffer is reused), and the tensor itself is
    left as it was."""
    from precision.dumps.sketch import count_sketch, decode
    from precision.runtime.capture.tensorstats import tensor_stats

    for seed in (0, 1):
        x = (torch.randn(3, 1500, generator=torch.Generator().manual_seed(seed)) * 3 + 1).to(dtype)
        kept = x.clone()
        st = tensor_stats(x)
        assert torch.equal(x, kept)
        v = x.double().numpy().ravel()
        assert (st["min"], st["max"], st["absmax"]) == (v.min(), v.max(), np.abs(v).max())
        assert st["mean"] == pytest.approx(v.mean(), rel=1e-6)
        assert st["std"] == pytest.approx(v.std(), rel=1e-6)
        assert st["norm"] == pytest.approx(np.linalg.norm(v), rel=1e-6)
        np.testing.assert_allclose(decode(st["sketch"]), count_sketch([v]), rtol=0,
                                   atol=1e-6 * np.linalg.norm(v))


def test_include_exclude_and_no_match(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad(), precision.capture(model, tmp_path / "a.st", include=["*"],
                                            exclude=["1"]) as cap:
        model(torch.ones(1, 2))
    assert {e.module for e in cap.dump.entries} == {"input", "0", "2", "root"}
    with pytest.raises(precision.InputError, match="no module matches"):
        precision.capture(model, tmp_path / "b.st", include=["nothing*"])


def test_exception_inside_capture_leaves_no_file(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    out = tmp_path / "a.st"
    with pytest.raises(RuntimeError), precision.capture(model, out):
        model(torch.ones(1, 3))  # wrong width
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_small_ring_buffer_gives_identical_dumps(t5: object, tmp_path: Path) -> None:
    model = t5.model  # type: ignore[attr-defined]
    inputs = t5_inputs(t5)
    with torch.no_grad(), precision.capture(model, tmp_path / "big.st") as big:
        model(**inputs)
    with torch.no_grad(), precision.capture(model, tmp_path / "tiny.st", buffer_mb=0) as tiny:
        model(**inputs)
    assert big.dump.keys() == tiny.dump.keys()
    for k in big.dump.tensors:
        np.testing.assert_array_equal(big.dump[k], tiny.dump[k])


def test_host_ring_wraps_and_frees_in_order() -> None:
    ring = HostRing(256, pin=False)
    offs = [ring.alloc(64), ring.alloc(64), ring.alloc(64)]
    assert offs == [0, 64, 128]
    ring.free()
    ring.free()
    assert ring.alloc(64) == 192  # room left at the end
    assert ring.alloc(100) == 0  # wraps to the freed start
    ring.free()
    ring.free()
    ring.free()
    assert ring.alloc(256) == 0


def test_temporary_capture_then_save(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    with torch.no_grad(), precision.capture(model) as cap:
        model(torch.ones(1, 2))
    dest = cap.save(tmp_path / "kept.st")
    assert dest.exists() and precision.load(dest).entries


# ---------------------------------------------------------------- CLI path: policies, replay


def capture(tmp: Path, name: str, **kw: object) -> precision.Dump:
    opts = {"model": str(T5_OVERFLOW), "output": str(tmp / name)} | kw
    return precision.load(run_capture(CaptureOptions(**opts)))  # type: ignore[arg-type]


def test_dtype_policies_record_effective_dtypes(tmp_path: Path) -> None:
    wo = "encoder.block.2.layer.1.DenseReluDense.wo"
    auto = capture(tmp_path, "auto.st", dtype="fp16", max_new_tokens=1)
    none = capture(tmp_path, "none.st", dtype="fp16", keep_fp32=("none",), max_new_tokens=1)
    glob = capture(tmp_path, "glob.st", dtype="fp16", keep_fp32=("*.DenseReluDense.wo",),
                   replay=str(none.path))
    assert auto.meta["module_dtypes"][wo] == "float32"
    assert none.meta["module_dtypes"][wo] == "float16"
    assert glob.meta["module_dtypes"][wo] == "float32"
    assert glob.meta["module_dtypes"]["encoder.block.2.layer.1.DenseReluDense.wi_0"] == "float16"
    assert wo in glob.meta["policy"]["kept_fp32"] and glob.meta["policy"]["base"] == "none"
    assert np.isinf(none[wo + ":out"]).any() and np.isfinite(glob[wo + ":out"]).all()


def test_replay_reuses_the_exact_inputs(tmp_path: Path) -> None:
    base = capture(tmp_path, "base.st", dtype="fp32", prompts=("question: why?",))
    again = capture(tmp_path, "bf16.st", dtype="bf16", replay=str(base.path))
    for k in ("input:input_ids", "input:attention_mask", "input:decoder_input_ids"):
        np.testing.assert_array_equal(base[k], again[k])
    assert again.meta["replayed_from"] == str(base.path) and again.meta["dtype"] == "bfloat16"
    assert base.meta["device"]["type"] == "cpu" and base.meta["prompts"] == ["question: why?"]


def test_causal_lm_generation_and_stats_mode(tmp_path: Path) -> None:
    d = precision.load(run_capture(CaptureOptions(
        model=str(QWEN), output=str(tmp_path / "q.st"), dtype="bf16", mode="stats",
        prompts=("hello world", "the house"), max_new_tokens=3)))
    assert d.meta["model"]["kind"] == "causal-lm" and d.mode == "stats"
    ids = d["input:input_ids"]  # ids stay whole in stats mode, for replay
    assert ids.shape[0] == 2 and ids.shape[1] >= 3
    assert d.meta["logits_key"] == "lm_head:out"
    assert d.entry("lm_head:out").stats["numel"] > 0


def test_module_inputs_on_request(tmp_path: Path) -> None:
    d = capture(tmp_path, "in.st", dtype="fp32", max_new_tokens=1,
                inputs=("*relative_attention_bias", "encoder.block.2.layer.1.DenseReluDense.wo"))
    wo = "encoder.block.2.layer.1.DenseReluDense.wo"
    assert d[wo + ":in.0"].shape[-1] == 128  # d_ff: the input of the FFN output projection
    assert "encoder.block.1.layer.1.DenseReluDense.wo:in.0" not in d


def test_healthy_t5_path_and_fixture_roundtrip(tmp_path: Path) -> None:
    d = precision.load(run_capture(CaptureOptions(model=str(T5), output=str(tmp_path / "x.st"),
                                                  dtype="fp16", max_new_tokens=2)))
    assert d.meta["policy"] == {"base": "auto", "globs": [], "kept_fp32": []}
    assert d["input:decoder_input_ids"].shape[1] == 3  # start token + 2 generated


def test_aliases_read_through(t5: object, tmp_path: Path) -> None:
    model = t5.model  # type: ignore[attr-defined]
    with torch.no_grad(), precision.capture(model, tmp_path / "a.st") as cap:
        model(**t5_inputs(t5))
    d = cap.dump
    assert "encoder.dropout:out" in d and "encoder.dropout:out" not in d.tensors
    np.testing.assert_array_equal(d["encoder.dropout:out"], d["encoder.embed_tokens:out"])


def test_every_kth_block(tmp_path: Path) -> None:
    d = capture(tmp_path, "every.st", dtype="fp32", max_new_tokens=1, every=2)
    modules = {e.module for e in d.entries}
    assert "encoder.block.2.layer.1.DenseReluDense.wo" in modules
    assert not any(m.startswith(("encoder.block.1.", "encoder.block.3.")) for m in modules)
    assert {"lm_head", "encoder.final_layer_norm"} <= modules  # outside the blocks: kept
    with pytest.raises(precision.InputError, match=r"^every must be 1 or more$"):
        capture(tmp_path, "bad.st", dtype="fp32", every=0)  # from Python: the keyword
    result = CliRunner().invoke(main, ["capture", "--model", str(T5), "--every", "0", "-o",
                                       str(tmp_path / "bad.st")])
    assert result.exit_code == 2 and "error: --every must be 1 or more" in result.output


def test_stats_mode_sketch_and_real_tokens_match_numpy(tmp_path: Path) -> None:
    """A stats record of a left-padded batch covers real tokens only, in element order, and
    its count sketch is the one numpy computes on the same elements."""
    from precision.dumps.sketch import PERIOD, count_sketch, decode
    from precision.runtime.capture.tensorstats import sketch

    class Heads(nn.Module):
        def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
            b, s, _ = hidden.shape
            return hidden * 2, hidden.view(b, s, 2, 3).transpose(1, 2)  # (b, heads, s, d)

    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 6)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    model = Heads()
    with torch.no_grad(), precision.capture(model, tmp_path / "s.st", mode="stats") as cap:
        flat, heads = model(hidden, attention_mask=mask)
    d = cap.dump
    real = flat[mask.bool()].double().numpy().ravel()
    st = d.entry("root:out.0").stats
    assert st["numel"] == real.size and st["padded"] == 2 * 6
    assert st["norm"] == pytest.approx(np.linalg.norm(real), rel=1e-6)
    # the CPU sums in float32 (docs: about 1e-6 of ||x||)
    np.testing.assert_allclose(decode(st["sketch"]), count_sketch([real]), rtol=0,
                               atol=1e-5 * np.linalg.norm(real))
    in_order = heads[mask.bool()[:, None, :, None].expand(heads.shape)].double().numpy()
    st2 = d.entry("root:out.1").stats
    assert st2["numel"] == in_order.size
    np.testing.assert_allclose(decode(st2["sketch"]), count_sketch([in_order]), rtol=0,
                               atol=1e-5 * np.linalg.norm(in_order))
    # past one period of signs (flipped by the period's sign), in float64 (kept: within
    # float32 storage) and in bf16 (float32 products and sums); a small tensor after them
    # reads the start of the grown sign table and work buffer
    big = torch.randn(PERIOD + 1000, dtype=torch.float64)
    np.testing.assert_allclose(decode(sketch(big)), count_sketch([big.numpy()]), rtol=2.0**-23,
                               atol=1e-9)
    half = big.to(torch.bfloat16)
    exact = count_sketch([half.double().numpy()])
    np.testing.assert_allclose(decode(sketch(half)), exact, rtol=0,
                               atol=1e-5 * np.linalg.norm(half.double().numpy()))
    small = torch.randn(3, 700, dtype=torch.float16)
    np.testing.assert_allclose(decode(sketch(small)), count_sketch([small.double().numpy()]),
                               rtol=2.0**-23, atol=1e-5 * float(small.double().norm()))


class Rotary(nn.Module):
    """Like Gemma 3's rotary embedding: one module, called once per kind of layer."""

    def forward(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        return x * (2.0 if kind == "global" else 0.5)


class SetOrdered(nn.Module):
    """Calls ``rot`` per layer kind in the order given: Gemma 3 takes it from a ``set``, whose
    order changes with ``PYTHONHASHSEED`` from one process to the next."""

    def __init__(self, order: tuple[str, ...]) -> None:
        super().__init__()
        self.order = order
        self.rot = Rotary()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        emb = {kind: self.rot(x, kind) for kind in self.order}
        return self.lin(emb["global"] + emb["local"])


def test_calls_made_in_another_order_are_paired_by_their_arguments(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 4)
    paths = []
    for n, order in enumerate((("global", "local"), ("local", "global"))):
        model = SetOrdered(order)
        torch.manual_seed(1)
        model.lin.reset_parameters()
        paths.append(tmp_path / f"{n}.st")
        with torch.no_grad(), precision.capture(model, paths[-1]):
            model(x)
    entries = {e.key: e.signature for e in precision.load(paths[1]).entries}
    assert entries["rot:out"] == "'local'" and entries["rot:out#1"] == "'global'"
    report = precision.compare(paths[0], paths[1])
    assert report, [(r.key, r.status) for r in report.rows]
    assert {r.key for r in report.rows} >= {"rot:out", "rot:out#1", "lin:out"}
    assert all(r.metrics is not None and r.metrics.max_abs == 0 for r in report.rows)


def test_outputs_a_dump_cannot_hold_are_counted_and_left_out(tmp_path: Path) -> None:
    """A complex, a meta-device or a sparse output raised deep in the capture (or blamed a
    dtype the user never chose); each is left out, counted in the dump, and compare says so."""
    class Odd(nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"c": torch.complex(x, x), "m": torch.empty(2, device="meta"),
                    "s": x.to_sparse(), "ok": x * 2}

    model = Odd()
    path = tmp_path / "odd.st"
    with torch.no_grad(), precision.capture(model, path):
        model(torch.ones(2, 2))
    dump = precision.load(path)
    assert [e.key for e in dump.entries] == ["input:x", "root:out.ok"]
    assert dump.meta["left_out"] == {"complex64 tensors": 1, "meta-device tensors": 1,
                                     "sparse_coo tensors": 1}
    other = tmp_path / "other.st"
    with torch.no_grad(), precision.capture(model, other):
        model(torch.ones(2, 2))
    assert "odd.st: left out 3 tensor record(s): 1 complex64 tensors, 1 meta-device tensors, " \
           "1 sparse_coo tensors" in precision.compare(path, other).notes


def test_dict_keys_with_separators_make_distinct_parseable_keys(tmp_path: Path) -> None:
    """{'a.b': x, 'a': {'b': y}} gave two records keyed root:out.a.b; 'a:b#1' read as
    another kind and call, and '' as the plain output's key."""
    from precision.dumps.keys import parse_key

    class Keys(nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, object]:
            return {"a.b": x, "a": {"b": x + 1}, "a:b#1": x + 2, "": x + 3}

    assert [p for p, _ in flatten(Keys()(torch.ones(2)))] == ["a_b", "a.b", "a_b_1", "_"]
    path = tmp_path / "k.st"
    model = Keys()
    with torch.no_grad(), precision.capture(model, path, mode="stats"):
        model(torch.ones(2))
    keys = [e.key for e in precision.load(path).entries if e.module == "root"]
    assert keys == ["root:out.a_b", "root:out.a.b", "root:out.a_b_1", "root:out._"]
    assert all(parse_key(k).call == 0 and parse_key(k).kind == "out" for k in keys)

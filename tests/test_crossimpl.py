"""Lining an engine's records up with Hugging Face's (precision/judge/crossimpl.py) on
synthetic engine dumps: where each packed token lands in either layout, modules shared
between layers told apart again, rules that scale and swap axes. The real engine is in
tests/test_vllm.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import precision
from precision.dumps.dump import DumpWriter
from precision.dumps.keys import parse_key
from precision.judge import crossimpl
from precision.judge.implmap import Rule

ACT = "model.layers.0.mlp.act_fn"
#: two requests: prompt [5, 6, 7] then generated 10 (fed back) and 11; prompt [8, 9] then 12
STEPS = [  # (input ids, positions, query_start_loc) of each engine step
    ([5, 6, 7, 8, 9], [0, 1, 2, 0, 1], [0, 3, 5]),  # both prefills
    ([10], [3], [0, 1]),  # request 0's one decode token
]
ROWS = [[0, 0, 0, 1, 1], [0]]


def _engine_dump(path: Path, *, drop: str | None = None, rank: int | None = None,
                 norm_shift: float = 0.0) -> Path:
    """A two-layer Llama's engine dump whose GeluAndMul-like ``act_fn`` is one module shared
    by both layers: its ``k``-th call is layer ``k % 2`` of step ``k // 2``; each value
    encodes ``1000 * layer + 100 * request + position`` (+ 0.5 in its second column), and
    ``model.norm:out.0`` is ``position``. With ``rank`` (of 2), the shard of that
    tensor-parallel rank: its column of ``act_fn``, ``model.norm:out.0`` whole (plus
    ``norm_shift``)."""
    tensors: dict[str, np.ndarray] = {
        "input:input_ids": np.array([[5, 6, 7, 10], [8, 9, 0, 0]]),
        "input:attention_mask": np.array([[1, 1, 1, 1], [1, 1, 0, 0]]),
        "generation:prompt_ids": np.array([[5, 6, 7], [0, 8, 9]]),
        "generation:prompt_mask": np.array([[1, 1, 1], [0, 1, 1]]),
        "generation:tokens": np.array([[10, 11], [12, -1]]),
    }
    call = 0
    for s, (ids, pos, starts) in enumerate(STEPS):
        suffix = f"#{s}" if s else ""
        tensors[f"engine:in.input_ids{suffix}"] = np.array(ids)
        tensors[f"engine:in.positions{suffix}"] = np.array(pos)
        tensors[f"engine:in.query_start_loc{suffix}"] = np.array(starts)
        for layer in (0, 1):
            value = 1000 * layer + 100 * np.array(ROWS[s]) + np.array(pos)
            both = np.stack([value, value + 0.5], axis=1).astype(np.float32)
            tensors[f"{ACT}:out" + (f"#{call}" if call else "")] = (
                both if rank is None else both[:, rank:rank + 1])
            call += 1
        tensors["model.norm:out.0" + suffix] = (np.array(pos, np.float32)[:, None]
                                               + np.float32(norm_shift if rank else 0))
    w = DumpWriter(path, force=True)
    entries: list[dict[str, Any]] = []
    for key, arr in tensors.items():
        if key == drop:
            continue
        a = np.ascontiguousarray(arr)
        w.write(key, a.dtype.name, a.shape, a)
        k = parse_key(key)
        entries.append({"key": key, "module": k.module, "kind": k.kind, "index": k.index,
                        "call": k.call, "shape": list(a.shape), "dtype": a.dtype.name})
    w.close({"mode": "full", "dtype": "float32", "entries": entries, "complete": True,
             "model": {"class": "LlamaForCausalLM", "config_hash": "x"},
             "engine": {"name": "vllm", "steps": 2, "rank": rank,
                        "shared_modules": {ACT: [ACT, "model.layers.1.mlp.act_fn"]}},
             "config": {"model_type": "llama", "num_hidden_layers": 2,
                        "intermediate_size": 2}})
    return path


def test_steps_layout_places_prefill_left_padded_and_each_decode_step(tmp_path: Path) -> None:
    lined = crossimpl.translate(precision.load(_engine_dump(tmp_path / "e.st")),
                                layout="steps")
    d = lined.dump
    assert lined.unmapped == {}
    down1 = d["model.layers.1.mlp.down_proj:in.0"][..., 0]  # layer 1: its 2nd call a step
    assert down1.tolist() == [[1000, 1001, 1002], [0, 1100, 1101]]
    assert d["model.layers.0.mlp.down_proj:in.0#1"][..., 0].tolist() == [[3]]
    assert d["model.layers.1.mlp.down_proj:in.0#1"][..., 0].tolist() == [[1003]]
    assert d["input:position_ids"].tolist() == [[0, 1, 2], [1, 0, 1]]
    assert d["input:attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]


def test_forward_layout_places_every_token_at_its_position(tmp_path: Path) -> None:
    lined = crossimpl.translate(precision.load(_engine_dump(tmp_path / "e.st")))
    d = lined.dump
    assert d["model.layers.1.mlp.down_proj:in.0"][..., 0].tolist() == [
        [1000, 1001, 1002, 1003], [1100, 1101, 0, 0]]
    assert not [k for k in d.tensors if "#" in k]


def test_a_shared_module_with_a_call_missing_is_listed_not_guessed(tmp_path: Path) -> None:
    """Three calls of a module shared by two layers in two steps cannot be told apart."""
    lined = crossimpl.translate(precision.load(_engine_dump(tmp_path / "e.st",
                                                            drop=f"{ACT}:out#3")))
    assert lined.unmapped == {f"{ACT}:out": "3 call(s) in 2 engine step(s) of a module "
                                            "shared by 2 names"}
    assert list(lined.mapped) == ["model.norm:out.0"]


def _tp_dump(folder: Path, norm_shift: float = 0.0) -> Path:
    from precision.dumps.shards import write_index

    folder.mkdir()
    for r in (0, 1):
        _engine_dump(folder / f"rank{r}.st", rank=r, norm_shift=norm_shift)
    write_index(folder, 2, {"engine": "vllm"})
    return folder


def test_tensor_parallel_ranks_are_put_together(tmp_path: Path) -> None:
    """Two ranks' shards: a column-parallel record concatenated in rank order, a whole one
    taken once."""
    lined = crossimpl.translate(precision.load(_tp_dump(tmp_path / "tp")), layout="steps")
    assert lined.unmapped == {}
    d = lined.dump
    assert d["model.layers.1.mlp.down_proj:in.0#1"].tolist() == [[[1003.0, 1003.5]]]
    assert d["model.norm:out"][..., 0].tolist() == [[0, 1, 2], [0, 0, 1]]


def test_a_whole_record_that_differs_between_ranks_is_listed(tmp_path: Path) -> None:
    lined = crossimpl.translate(precision.load(_tp_dump(tmp_path / "tp", norm_shift=1.0)))
    assert lined.unmapped == {"model.norm:out.0": "rank 1 differs from rank 0 in step 0, "
                                                  "where every rank should hold it whole"}


def test_hugging_face_runs_replayed_alike(tmp_path: Path) -> None:
    """One Hugging Face run replayed step by step and another as one forward: refused."""
    from .conftest import write_dump

    engine = precision.load(_engine_dump(tmp_path / "e.st"))
    x = {"x:out": np.ones((2, 2), np.float32)}
    a = precision.load(write_dump(tmp_path / "a.st", x, meta={"engine_replay": {
        "layout": "steps"}}))
    b = precision.load(write_dump(tmp_path / "b.st", x, meta={"engine_replay": {
        "layout": "forward"}}))
    with pytest.raises(precision.DumpError, match="replayed the engine's tokens in different"):
        crossimpl.line_up({"base": a, "target": engine, "reference": b})


def test_rules_scale_in_the_records_dtype_and_refuse_bad_options() -> None:
    rule = Rule("e:out", ("h:out",), scale="sqrt(hidden_size)")
    assert rule.factor({"hidden_size": 64}) == 8.0
    assert Rule("e:out", ("h:out",), scale="2.5").factor({}) == 2.5
    with pytest.raises(precision.InputError, match="no positive hidden_size"):
        rule.factor({})
    with pytest.raises(precision.InputError, match="not a number or sqrt"):
        Rule("e:out", ("h:out",), scale="hidden_size")
    with pytest.raises(precision.InputError, match="swap takes two axes"):
        Rule("e:out", ("h:out",), swap=(1,))


def test_merged_statistics_are_the_statistics_of_the_whole() -> None:
    """Parts of different sizes and spreads (a NaN in one): merged as one array's, against
    the float64 statistics of the concatenation."""
    from precision.judge.enginestats import merge_stats
    from precision.judge.statsdiff import array_stats

    rng = np.random.default_rng(0)
    parts = [rng.normal(3.0, 1.0, 50), rng.normal(-2.0, 5.0, 7), np.array([np.nan, 1e3])]
    merged = merge_stats([array_stats([p]) for p in parts])
    whole = array_stats([np.concatenate(parts)])
    for k in ("numel", "nan", "posinf", "masked"):
        assert merged[k] == whole[k], k
    for k in ("min", "max", "mean", "std", "norm", "absmax"):
        assert merged[k] == pytest.approx(whole[k], rel=1e-12), k


def test_a_stats_mode_engine_dump_lines_up_with_one_forward_only(tmp_path: Path) -> None:
    d = precision.load(_engine_dump(tmp_path / "e.st"))
    d.meta["mode"] = "stats"
    with pytest.raises(precision.DumpError, match="one teacher-forced Hugging Face forward"):
        crossimpl.translate(d, layout="steps")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_a_scale_rounds_as_the_engine_multiplies(dtype: str) -> None:
    """Gemma's sqrt(hidden) in the model's dtype times the embedding, rounded once: as torch
    computes ``embed * normalizer.to(dtype)`` (vLLM) and Hugging Face's scaled embedding."""
    torch = pytest.importorskip("torch")
    from precision.dtypes import numpy_dtype
    from precision.judge.unpack import shaped

    rng = np.random.default_rng(1)
    x = rng.normal(0, 0.05, (2, 3, 64)).astype(np.float32)
    tdt = getattr(torch, dtype)
    want = (torch.from_numpy(x).to(tdt) * torch.tensor(1152 ** 0.5).to(tdt)).float().numpy()
    ours = x.astype(numpy_dtype(dtype))
    rule = Rule("e:out", ("h:out",), scale="sqrt(hidden_size)")
    got = shaped(ours, rule, {"hidden_size": 1152}, "e:out")[0]
    assert got.dtype == ours.dtype
    np.testing.assert_array_equal(got.astype(np.float32), want)

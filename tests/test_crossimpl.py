"""Lining an engine's records up with Hugging Face's (precision/engines/vllm/lineup.py) on
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
from precision.dumps.shards import write_index
from precision.engines.vllm import lineup
from precision.engines.vllm.mapping import TABLES, Rule

from .conftest import stats_of, write_dump

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
    lined = lineup.translate(precision.load(_engine_dump(tmp_path / "e.st")),
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
    lined = lineup.translate(precision.load(_engine_dump(tmp_path / "e.st")))
    d = lined.dump
    assert d["model.layers.1.mlp.down_proj:in.0"][..., 0].tolist() == [
        [1000, 1001, 1002, 1003], [1100, 1101, 0, 0]]
    assert not [k for k in d.tensors if "#" in k]


def test_a_shared_module_with_a_call_missing_is_listed_not_guessed(tmp_path: Path) -> None:
    """Three calls of a module shared by two layers in two steps cannot be told apart."""
    lined = lineup.translate(precision.load(_engine_dump(tmp_path / "e.st",
                                                            drop=f"{ACT}:out#3")))
    assert lined.unmapped == {f"{ACT}:out": "3 call(s) in 2 engine step(s) of a module "
                                            "shared by 2 names"}
    assert list(lined.mapped) == ["model.norm:out.0"]


def _tp_dump(folder: Path, norm_shift: float = 0.0) -> Path:
    folder.mkdir()
    for r in (0, 1):
        _engine_dump(folder / f"rank{r}.st", rank=r, norm_shift=norm_shift)
    write_index(folder, 2, {"engine": "vllm"})
    return folder


def test_tensor_parallel_ranks_are_put_together(tmp_path: Path) -> None:
    """Two ranks' shards: a column-parallel record concatenated in rank order, a whole one
    taken once."""
    lined = lineup.translate(precision.load(_tp_dump(tmp_path / "tp")), layout="steps")
    assert lined.unmapped == {}
    d = lined.dump
    assert d["model.layers.1.mlp.down_proj:in.0#1"].tolist() == [[[1003.0, 1003.5]]]
    assert d["model.norm:out"][..., 0].tolist() == [[0, 1, 2], [0, 0, 1]]


def test_a_whole_record_that_differs_between_ranks_is_listed(tmp_path: Path) -> None:
    lined = lineup.translate(precision.load(_tp_dump(tmp_path / "tp", norm_shift=1.0)))
    assert lined.unmapped == {"model.norm:out.0": "rank 1 differs from rank 0 in step 0, "
                                                  "where every rank should hold it whole"}


def test_hugging_face_runs_replayed_alike(tmp_path: Path) -> None:
    """One Hugging Face run replayed step by step and another as one forward: refused."""
    engine = precision.load(_engine_dump(tmp_path / "e.st"))
    x = {"x:out": np.ones((2, 2), np.float32)}
    a = precision.load(write_dump(tmp_path / "a.st", x, meta={"engine_replay": {
        "layout": "steps"}}))
    b = precision.load(write_dump(tmp_path / "b.st", x, meta={"engine_replay": {
        "layout": "forward"}}))
    with pytest.raises(precision.DumpError, match="replayed the engine's tokens in different"):
        lineup.line_up({"base": a, "target": engine, "reference": b})


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
    from precision.engines.vllm.stats import merge_stats
    from precision.judge.measure.statsdiff import array_stats

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
        lineup.translate(d, layout="steps")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_a_scale_rounds_as_the_engine_multiplies(dtype: str) -> None:
    """Gemma's sqrt(hidden) in the model's dtype times the embedding, rounded once: as torch
    computes ``embed * normalizer.to(dtype)`` (vLLM) and Hugging Face's scaled embedding."""
    torch = pytest.importorskip("torch")
    from precision.dtypes import numpy_dtype
    from precision.engines.vllm.unpack import shaped

    rng = np.random.default_rng(1)
    x = rng.normal(0, 0.05, (2, 3, 64)).astype(np.float32)
    tdt = getattr(torch, dtype)
    want = (torch.from_numpy(x).to(tdt) * torch.tensor(1152 ** 0.5).to(tdt)).float().numpy()
    ours = x.astype(numpy_dtype(dtype))
    rule = Rule("e:out", ("h:out",), scale="sqrt(hidden_size)")
    got = shaped(ours, rule, {"hidden_size": 1152}, "e:out")[0]
    assert got.dtype == ours.dtype
    np.testing.assert_array_equal(got.astype(np.float32), want)


# ------------------------------------------- fused q/k/v and gate/up, split without vLLM

ATTN, MLP = "model.layers.0.self_attn", "model.layers.0.mlp"
#: head counts: grouped-query (q wider than k and v) and multi-head (q, k and v the same
#: width, so a q/k or k/v swap shows in the values only)
FUSED_CONFIGS = {"gqa": {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 2,
                         "intermediate_size": 4},
                 "mha": {"num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 3,
                         "intermediate_size": 4}}
FUSED_IDS = np.array([[5, 6, 7], [8, 9, 0]])  # two requests of 3 and 2 tokens
FUSED_MASK = np.array([[1, 1, 1], [1, 1, 0]])


def _hf_projections(config: dict[str, int]) -> dict[str, np.ndarray]:
    """What Hugging Face's separate projections hold (``[batch, seq, width]``; 0 at the
    padded position): distinct random values in every part."""
    rng = np.random.default_rng(7)
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    widths = {f"{ATTN}.q_proj:out": q, f"{ATTN}.k_proj:out": kv, f"{ATTN}.v_proj:out": kv,
              f"{MLP}.gate_proj:out": config["intermediate_size"],
              f"{MLP}.up_proj:out": config["intermediate_size"]}
    return {k: (rng.standard_normal((2, 3, w)) * FUSED_MASK[..., None]).astype(np.float32)
            for k, w in widths.items()}


def _fused_engine_dump(path: Path, config: dict[str, int], hf: dict[str, np.ndarray],
                       ranks: int = 1, mode: str = "full", family: str = "llama") -> Path:
    """A one-layer decoder's engine dump (``family``: its table) of one step (both
    prefills packed), its fused projections the concatenation of ``hf``'s parts as vLLM's
    ``QKVParallelLinear`` and ``MergedColumnParallelLinear`` make them: ``[q, k, v]`` and
    ``[gate, up]`` per token, and with ``ranks`` tensor-parallel ranks (a directory dump),
    rank ``r`` holding its share of each part's heads (or columns), ``[q_r, k_r, v_r]``.
    In stats mode, each part's statistics (``:out.0.part<j>``, as the worker records them)
    instead."""
    real = FUSED_MASK.astype(bool)  # row-major: request 0's tokens, then request 1's

    def packed(key: str, r: int) -> np.ndarray:
        x = hf[key][real]
        share = x.shape[-1] // ranks
        return x[:, r * share:(r + 1) * share]

    fused = {f"{ATTN}.qkv_proj:out.0": [f"{ATTN}.{p}_proj:out" for p in "qkv"],
             f"{MLP}.gate_up_proj:out.0": [f"{MLP}.gate_proj:out", f"{MLP}.up_proj:out"]}
    inputs = {"input:input_ids": FUSED_IDS, "input:attention_mask": FUSED_MASK,
              "engine:in.input_ids": np.array([5, 6, 7, 8, 9]),
              "engine:in.positions": np.array([0, 1, 2, 0, 1]),
              "engine:in.query_start_loc": np.array([0, 3, 5])}
    meta = {"model": {"class": "LlamaForCausalLM", "config_hash": "synthetic"},
            "config": {"model_type": family, "num_hidden_layers": 1, **config}}
    for r in range(ranks):
        parts = {whole: [packed(k, r) for k in keys] for whole, keys in fused.items()}
        engine = {"name": "vllm", "steps": 1, "rank": r if ranks > 1 else None}
        file = path / f"rank{r}.st" if ranks > 1 else path
        if mode == "full":
            write_dump(file, inputs | {whole: np.concatenate(p, axis=-1)
                                       for whole, p in parts.items()},
                       meta=meta | {"engine": engine})
            continue
        each = {f"{whole}.part{j}": p for whole, ps in parts.items() for j, p in enumerate(ps)}
        write_dump(file, inputs, meta=meta | {"engine": engine, "mode": "stats"},
                   stats={k: stats_of(p) for k, p in each.items()},
                   stats_shapes={k: p.shape for k, p in each.items()})
    if ranks > 1:
        write_index(path, ranks, {"engine": "vllm"})
    return path


@pytest.mark.parametrize("family", sorted(TABLES))
@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("heads", list(FUSED_CONFIGS))
def test_fused_qkv_and_gate_up_split_into_hugging_faces_projections(
        tmp_path: Path, heads: str, ranks: int, family: str) -> None:
    """vLLM's fused ``qkv_proj`` output is ``[q, k, v]`` and ``gate_up_proj``'s ``[gate,
    up]`` (with tensor parallelism, each rank its share of each part): lined up by every
    family's table, each part is exactly Hugging Face's q_proj, k_proj, v_proj, gate_proj
    and up_proj output at every real token, and compare judges them identical. The real
    engine's split is checked against the checkpoint's weights in tests/test_vllm.py."""
    config = FUSED_CONFIGS[heads]
    hf = _hf_projections(config)
    path = tmp_path / ("tp" if ranks > 1 else "e.st")
    if ranks > 1:
        path.mkdir()
    engine = precision.load(_fused_engine_dump(path, config, hf, ranks, family=family))
    lined = lineup.translate(engine)
    assert lined.unmapped == {}
    assert lined.mapped == {f"{ATTN}.qkv_proj:out.0": tuple(list(hf)[:3]),
                            f"{MLP}.gate_up_proj:out.0": tuple(list(hf)[3:])}
    real = FUSED_MASK.astype(bool)
    for key, want in hf.items():
        np.testing.assert_array_equal(lined.dump[key][real], want[real], err_msg=key)
    base = write_dump(tmp_path / "hf.st",
                      {"input:input_ids": FUSED_IDS, "input:attention_mask": FUSED_MASK} | hf,
                      meta={"model": {"class": "LlamaForCausalLM", "config_hash": "synthetic"}})
    report = precision.compare(base, path, jobs=1)
    rows = {r.key: r for r in report.rows if r.key in hf}
    assert report and set(rows) == set(hf)
    for key, r in rows.items():
        assert r.status == "OK" and r.metrics is not None and r.metrics.rel_l2 == 0, key


@pytest.mark.parametrize("ranks", [1, 2])
def test_fused_parts_statistics_are_hugging_faces_projections(tmp_path: Path,
                                                              ranks: int) -> None:
    """Stats mode: the worker records each part of a fused projection apart
    (``:out.0.part<j>``, per rank); lined up, part ``j`` is the ``j``-th projection, its
    ranks' shares merged."""
    from precision.judge.measure.statsdiff import array_stats

    config = FUSED_CONFIGS["mha"]  # q, k and v of one width: told apart by values only
    hf = _hf_projections(config)
    path = tmp_path / ("tp" if ranks > 1 else "e.st")
    if ranks > 1:
        path.mkdir()
    lined = lineup.translate(precision.load(_fused_engine_dump(path, config, hf, ranks,
                                                                  mode="stats")))
    assert lined.unmapped == {}
    real = FUSED_MASK.astype(bool)
    for key, x in hf.items():
        e = lined.dump.entry(key)
        assert e is not None and e.stats is not None, key
        want = array_stats([x[real]])
        for stat in ("numel", "mean", "norm", "min", "max"):
            assert e.stats[stat] == pytest.approx(want[stat], rel=1e-6), (key, stat)


def test_records_said_to_be_the_same_compare_their_sketches_by_value() -> None:
    """Statistics with count sketches (arrays, as a dump hands them out) are the same when
    every number and every bucket is; one bucket or one statistic apart, they differ."""
    y = np.arange(1021, dtype=np.float32)
    a = {"numel": 4, "norm": 2.0, "sketch": y}
    assert lineup._same_stats(a, dict(a) | {"sketch": y.copy()})
    assert lineup._same_stats(None, None)
    other = y.copy()
    other[7] += 1
    assert not lineup._same_stats(a, dict(a) | {"sketch": other})
    assert not lineup._same_stats(a, dict(a) | {"norm": 2.5})
    assert not lineup._same_stats(a, {k: v for k, v in a.items() if k != "sketch"})
    assert not lineup._same_stats(a, None)

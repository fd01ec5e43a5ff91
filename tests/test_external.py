"""Logits and top-k logprobs from elsewhere compare against a capture."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import precision
from precision import DumpError

LOGITS = "lm_head:out"


def vllm_json(d: precision.Dump, path: Path, *, change: tuple[int, int, int] | None = None,
              k: int = 5) -> Path:
    """The capture's generation written the way a vLLM run with logprobs=k would give it."""
    tokens, ids, lps = (d[f"generation:{n}"] for n in ("tokens", "topk_ids", "topk_logprobs"))
    seqs = []
    for r in range(tokens.shape[0]):
        toks = tokens[r].tolist()
        steps = [{str(int(i)): {"logprob": float(v), "rank": j + 1}
                  for j, (i, v) in enumerate(zip(ids[r, s, :k], lps[r, s, :k], strict=True))}
                 for s in range(tokens.shape[1])]
        seqs.append({"token_ids": toks, "logprobs": steps})
    if change is not None:
        r, s, tok = change
        seqs[r]["token_ids"][s] = tok
    path.write_text(json.dumps(seqs))
    return path


def test_npy_npz_pt_and_safetensors_logits(t5_runs: dict[str, Path], tmp_path: Path) -> None:
    base = precision.load(t5_runs["base"])
    logits = base[LOGITS]
    flat = logits.reshape(-1, logits.shape[-1])  # (positions, vocab): rows line up
    np.save(tmp_path / "l.npy", flat.astype(np.float16))
    np.savez(tmp_path / "l.npz", logits=flat, other=np.zeros(3))
    torch.save({"logits": torch.from_numpy(flat).bfloat16()}, tmp_path / "l.pt")
    save_file({"logits": flat}, str(tmp_path / "l.safetensors"))
    for name, status in (("l.npy", "OK"), ("l.npz", "OK"), ("l.pt", "OK"),
                         ("l.safetensors", "OK")):
        report = precision.compare(t5_runs["base"], tmp_path / name)
        row = next(r for r in report.rows if r.key == LOGITS)
        assert row.status == status, (name, row.reason)
        assert row.logits is not None and row.logits.positions == flat.shape[0]
    same = next(r for r in precision.compare(t5_runs["base"], tmp_path / "l.npz").rows
                if r.key == LOGITS)
    assert same.metrics.max_abs == 0.0 and same.logits.kl_max == 0.0
    bf = next(r for r in precision.compare(t5_runs["base"], tmp_path / "l.pt").rows
              if r.key == LOGITS)
    expected = np.abs(flat.astype(ml_dtypes.bfloat16).astype(np.float64) - flat).max()
    assert bf.metrics.max_abs == pytest.approx(expected, rel=1e-12)


def test_refused_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (print, ("unpickled!",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"logits": Evil()}, protocol=2))
    with pytest.raises(DumpError, match="weights_only"):
        precision.compare(tmp_path / "evil.pt", tmp_path / "evil.pt")
    assert "unpickled!" not in capsys.readouterr().out  # the payload never ran
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DumpError, match=r"not a plain \.npy"):
        precision.compare(tmp_path / "obj.npy", tmp_path / "obj.npy")
    np.savez(tmp_path / "two.npz", a=np.zeros(2), b=np.ones(2))
    with pytest.raises(DumpError, match="name the logits array"):
        precision.compare(tmp_path / "two.npz", tmp_path / "two.npz")
    np.save(tmp_path / "ints.npy", np.arange(4))
    with pytest.raises(DumpError, match="floating-point logits"):
        precision.compare(tmp_path / "ints.npy", tmp_path / "ints.npy")
    (tmp_path / "bad.json").write_text('[{"token_ids": [1]}]')
    with pytest.raises(DumpError, match="token_ids' and 'logprobs'"):
        precision.compare(tmp_path / "bad.json", tmp_path / "bad.json")
    with pytest.raises(DumpError, match="no such file"):
        precision.compare(tmp_path / "missing.json", tmp_path / "bad.json")


def test_vllm_topk_logprobs_against_a_capture(t5_runs: dict[str, Path], tmp_path: Path) -> None:
    base = precision.load(t5_runs["base"])
    same = vllm_json(base, tmp_path / "same.json")
    report = precision.compare(t5_runs["base"], same)
    row = report.rows[-1]
    assert row.key == "generation:tokens" and row.status == "OK"
    assert row.generation.identical == 3 and row.generation.max_logprob_diff == 0.0
    # a token the baseline does not rank in its top-5 at that step: the vLLM check fails
    outside = int(base["generation:topk_ids"][0, 1, -1])
    bad = vllm_json(base, tmp_path / "bad.json", change=(0, 1, outside))
    row = precision.compare(t5_runs["base"], bad).rows[-1]
    assert row.status == "DRIFT" and row.generation.divergences[0].step == 1
    # and two vLLM files against each other
    assert precision.compare(same, same).rows[-1].status == "OK"


WO = "encoder.block.2.layer.1.DenseReluDense.wo"


def msprobe_dir(d: precision.Dump, root: Path, *, with_data: bool = True) -> Path:
    """A capture written the way msprobe lays out an L0 npy dump (dump.json + .npy files)."""
    (root / "dump_tensor_data").mkdir(parents=True)
    data: dict[str, object] = {}
    for module, cls in ((WO, "Linear"), ("lm_head", "Linear")):
        name = f"Module.{module}.{cls}.forward.0"
        record: dict[str, object] = {"input_args": [], "input_kwargs": {}, "output": []}
        for kind, key in (("input_args", f"{module}:in.0"), ("output", f"{module}:out")):
            if key not in d:
                continue
            arr = d[key]
            with np.errstate(invalid="ignore", over="ignore"):  # msprobe records inf too
                item = {"type": "torch.Tensor", "dtype": f"torch.{arr.dtype.name}",
                        "shape": list(arr.shape), "Max": float(arr.max()),
                        "Min": float(arr.min()), "Mean": float(arr.mean()),
                        "Norm": float(np.linalg.norm(arr))}
            if with_data:
                fname = f"{name}.{'input' if kind == 'input_args' else 'output'}.0.npy"
                np.save(root / "dump_tensor_data" / fname, arr)
                item["data_name"] = fname
            record[kind].append(item)  # type: ignore[attr-defined]
        data[name] = record
    data["Functional.relu.0.forward"] = {"input_args": [], "output": [
        {"type": "torch.Tensor", "dtype": "torch.float32", "shape": [2], "Max": 1.0, "Min": 0.0,
         "Mean": 0.5, "Norm": 1.0, "data_name": "-1"}]}
    (root / "dump.json").write_text(json.dumps({"task": "tensor", "level": "L0",
                                                "framework": "pytorch", "data": data}))
    return root


def test_msprobe_dump_against_a_capture(t5_runs: dict[str, Path], tmp_path: Path) -> None:
    fp16 = precision.load(t5_runs["ofp16_none"])
    folder = msprobe_dir(fp16, tmp_path / "msprobe")
    report = precision.compare(t5_runs["obase"], folder)
    rows = {r.key: r for r in report.rows}
    assert rows[WO + ":out"].status == "OVERFLOW"  # the planted overflow, found through msprobe
    assert rows["lm_head:out"].logits is not None
    ours = next(r for r in precision.compare(t5_runs["obase"], fp16).rows
                if r.key == WO + ":out")
    assert rows[WO + ":out"].metrics.new_inf == ours.metrics.new_inf
    d = precision.load(next(Path(p) for p in [report.target]))
    assert d.meta["msprobe"]["level"] == "L0" and "Functional.relu.0:out.0" in {
        e.key for e in d.entries}


def test_msprobe_statistics_only(t5_runs: dict[str, Path], tmp_path: Path) -> None:
    base = precision.load(t5_runs["obase"])
    folder = msprobe_dir(precision.load(t5_runs["ofp16_none"]), tmp_path / "stats",
                         with_data=False)
    target = precision.compare(base, folder / "dump.json")
    row = next(r for r in target.rows if r.key == WO + ":out")
    assert row.stats_delta is not None and row.status == "OVERFLOW"  # Max of +inf: new inf
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "dump.json").write_text("{}")
    with pytest.raises(DumpError, match=r"not an msprobe dump\.json"):
        precision.compare(base, bad)

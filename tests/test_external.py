"""Logits and top-k logprobs from elsewhere compare against a capture."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import save_file

import precision
from precision import DumpError
from precision.cli import main
from precision.dumps.external import LOGITS_KEY, open_any

from .conftest import NO_TORCH

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
    with pytest.raises(DumpError, match=r"weights_only=True\) reads \(it holds a pickled "
                                        r"print, not tensors\)") as err:
        precision.compare(tmp_path / "evil.pt", tmp_path / "evil.pt")
    assert "unpickled!" not in capsys.readouterr().out  # the payload never ran
    assert "False" not in str(err.value) and "trust" not in str(err.value)  # no unsafe advice
    (tmp_path / "text.pt").write_bytes(b"garbage")
    with pytest.raises(DumpError, match=r"\(not a torch file: .+\); precision unpickles "
                                        r"nothing else$"):
        precision.compare(tmp_path / "text.pt", tmp_path / "text.pt")
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
    assert report.target == str(folder)  # the user's folder, not the temporary dump
    d = open_any(folder)
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


def test_big_endian_npy_reads_the_same_numbers(tmp_path: Path) -> None:
    """A big-endian float32 .npy was read without byte-swapping and judged all NaN."""
    flat = np.random.default_rng(1).standard_normal((4, 32)).astype(np.float32)
    np.save(tmp_path / "little.npy", flat)
    np.save(tmp_path / "big.npy", flat.astype(">f4"))
    np.savez(tmp_path / "big.npz", logits=flat.astype(">f4"))
    for name in ("big.npy", "big.npz"):
        assert np.array_equal(open_any(tmp_path / name)[LOGITS_KEY], flat)
        row = precision.compare(tmp_path / "little.npy", tmp_path / name).rows[0]
        assert row.status == "OK" and row.metrics is not None and row.metrics.max_abs == 0


def test_vllm_ragged_sequences_pad_and_refuse_negative_ids(tmp_path: Path) -> None:
    """Sequences of different lengths pad with -1 internally; a -1 (or any negative id) in
    the file would pass as padding, so it is refused."""
    seqs = [{"token_ids": [5, 7, 9], "logprobs": [{"5": -0.1, "6": -2.0}, {"7": -0.2},
                                                   {"9": -0.3, "1": -4.0, "2": -5.0}]},
            {"token_ids": [3], "logprobs": [{"3": -0.5}]}]
    (tmp_path / "ok.json").write_text(json.dumps(seqs))
    d = open_any(tmp_path / "ok.json")
    assert d["generation:tokens"].tolist() == [[5, 7, 9], [3, -1, -1]]
    assert d["generation:topk_ids"][0, 2].tolist() == [9, 1, 2]
    assert precision.compare(tmp_path / "ok.json", tmp_path / "ok.json").rows[-1].status == "OK"
    seqs[1]["token_ids"] = [-1]
    (tmp_path / "neg.json").write_text(json.dumps(seqs))
    with pytest.raises(DumpError, match="sequence 1 has token id -1"):
        precision.compare(tmp_path / "ok.json", tmp_path / "neg.json")


def test_a_logprobs_file_against_a_capture_folds_its_layers_and_says_what_it_cannot_tell(
        t5_runs: dict[str, Path], tmp_path: Path) -> None:
    """vLLM's logprobs JSON against a capture (issue 24): the capture's records have nothing
    to pair with and fold into one note, not a MISSING row each; the file cannot say what
    the engine computed in, and a warning says how to state it; a file that states it is
    judged for that precision."""
    from precision.judge.lineup.align import align

    base = precision.load(t5_runs["base"])
    path = vllm_json(base, tmp_path / "vllm_bf16.json")
    unpaired = sum(p.target is None for p in align(base, open_any(path)))
    assert unpaired > 100
    report = precision.compare(base, path, jobs=1, fail_on="any")
    assert report, report.summary  # folded records are not MISSING, even for --fail-on any
    assert [r.key for r in report.rows] == ["generation:tokens"]
    assert report.counts()["MISSING"] == 0 and report.profile.name == "fp32->fp32"
    folded = [n for n in report.notes if n.startswith(
        "vllm_bf16.json holds generated tokens and top-k log-probabilities only: "
        f"{unpaired} record(s) of base.st (layers, inputs) have nothing to pair with")]
    assert len(folded) == 1 and "capture --engine vllm" in folded[0], report.notes
    assert [w for w in report.warnings if w.startswith("vllm_bf16.json holds log-probabilities, "
                                                      "which do not say what the engine computed")
            and "target_dtype='bf16'" in w], report.warnings
    # the terminal, the markdown, the JSON and the HTML carry the one line, no MISSING rows
    md, js, page = tmp_path / "r.md", tmp_path / "r.json", tmp_path / "r.html"
    result = CliRunner().invoke(main, ["compare", str(base.path), str(path), "--markdown",
                                       str(md), "--json", str(js)])
    assert result.exit_code == 0, result.output
    assert "MISSING" not in result.output and "--target-dtype bf16" in result.output
    assert result.output.count("holds generated tokens and top-k log-probabilities only") == 1
    assert "holds generated tokens" in md.read_text() and "MISSING" not in md.read_text()
    assert len(json.loads(js.read_text())["rows"]) == 1
    assert CliRunner().invoke(main, ["report", str(base.path), str(path), "-o",
                                     str(page)]).exit_code == 0
    assert "note: vllm_bf16.json holds generated tokens" in page.read_text()
    # the file states what the engine computed in (vLLM's model_config.dtype)
    stated = tmp_path / "stated.json"
    stated.write_text(json.dumps({"dtype": "torch.bfloat16",
                                  "sequences": json.loads(path.read_text())}))
    rep = precision.compare(base, stated, jobs=1)
    assert rep.profile.name == "fp32->bf16" and rep, rep.summary
    assert not any("do not say" in w for w in rep.warnings), rep.warnings
    for bad in ("int8", "nonsense", 16):
        stated.write_text(json.dumps({"dtype": bad, "sequences": json.loads(path.read_text())}))
        with pytest.raises(DumpError, match="'dtype'"):
            precision.compare(base, stated)
    # generations alone: no reference is looked for or asked for (no row could use one)
    asked = precision.compare(base, path, target_dtype="bf16", jobs=1)
    assert asked.profile.name == "fp32->bf16"
    assert not [n for n in asked.notes if "reference" in n], asked.notes
    # a logits array folds the same way: the logits row alone
    logits = base[LOGITS]
    np.save(tmp_path / "l.npy", logits.reshape(-1, logits.shape[-1]))
    rep = precision.compare(base, tmp_path / "l.npy", jobs=1)
    assert [r.key for r in rep.rows] == [LOGITS] and rep.counts()["MISSING"] == 0
    assert any(n.startswith("l.npy holds logits only: ") and n.endswith("capture both runs")
               for n in rep.notes), rep.notes


def test_a_stated_dtype_against_an_engines_own_config_is_warned(make_dump) -> None:  # type: ignore[no-untyped-def]
    """A run captured in vLLM records vLLM's own dtype; stating another one is allowed but
    said."""
    x = np.linspace(-1, 1, 64, dtype=np.float32)
    a = make_dump("a.st", {"x:out": x}, meta={"engine": {"name": "vllm", "dtype": "float32"}})
    b = make_dump("b.st", {"x:out": x}, dtype="bfloat16",
                  meta={"engine": {"name": "vllm", "dtype": "bfloat16"}})
    said = precision.compare(a, b, target_dtype="fp16", jobs=1)
    assert said.profile.name == "fp32->fp16"
    warned = [w for w in said.warnings if "own config" in w]
    assert warned == ["b.st: vllm's own config says it computed in bf16, but it is judged as "
                      "fp16 as stated (target_dtype)"]
    assert not [w for w in precision.compare(a, b, target_dtype="bf16", jobs=1).warnings
                if "own config" in w]


BIAS = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias"


def test_msprobe_inputs_integers_and_scalars_line_up(t5_runs: dict[str, Path],
                                                     tmp_path: Path) -> None:
    """Input 0 of a module is <path>:in.0 (it was <path>:in and never lined up), integer
    tensors (T5's bucket ids, input_ids) and 0-d tensors are ordinary records."""
    base = precision.load(t5_runs["obase"])
    folder = tmp_path / "msprobe"
    (folder / "dump_tensor_data").mkdir(parents=True)

    def item(name: str, arr: np.ndarray) -> dict[str, object]:
        np.save(folder / "dump_tensor_data" / name, arr)
        return {"type": "torch.Tensor", "dtype": f"torch.{arr.dtype}", "shape": list(arr.shape),
                "data_name": name}

    data = {f"Module.{BIAS}.Embedding.forward.0": {
        "input_args": [item("bias.in.0.npy", base[BIAS + ":in.0"])], "input_kwargs": {},
        "output": [item("bias.out.0.npy", base[BIAS + ":out"])]},
        "Functional.mul.0.forward": {
            "input_args": [item("mul.in.0.npy", np.float32(2.5))],
            "input_kwargs": {"steps": item("mul.steps.npy", np.int64(3))},
            "output": [item("mul.out.0.npy", np.array(7.5, np.float32))]}}
    (folder / "dump.json").write_text(json.dumps({"task": "tensor", "level": "mix",
                                                  "data": data}))
    d = open_any(folder)
    assert {e.key: (e.dtype, e.shape) for e in d.entries} == {
        BIAS + ":out": ("float32", base[BIAS + ":out"].shape),
        BIAS + ":in.0": ("int64", base[BIAS + ":in.0"].shape),
        "Functional.mul.0:out.0": ("float32", ()), "Functional.mul.0:in.0": ("float32", ()),
        "Functional.mul.0:in.steps": ("int64", ())}
    rows = {r.key: r for r in precision.compare(base, folder).rows}
    assert rows[BIAS + ":in.0"].status == "OK" and rows[BIAS + ":out"].status == "OK"
    assert rows[BIAS + ":out"].metrics.max_abs == 0


def test_report_accepts_what_compare_accepts(t5_runs: dict[str, Path], tmp_path: Path) -> None:
    """report opened its inputs with load(), refusing .npy, vLLM JSON and msprobe folders."""
    base = precision.load(t5_runs["obase"])
    logits = base[LOGITS]
    np.save(tmp_path / "l.npy", logits.reshape(-1, logits.shape[-1]))
    inputs = [tmp_path / "l.npy", vllm_json(base, tmp_path / "v.json"),
              msprobe_dir(precision.load(t5_runs["ofp16_none"]), tmp_path / "msprobe")]
    for n, target in enumerate(inputs):
        out = tmp_path / f"r{n}.html"
        result = CliRunner().invoke(main, ["report", str(t5_runs["obase"]), str(target),
                                           "-o", str(out)])
        assert result.exit_code in (0, 1), (target, result.output)
        assert out.stat().st_size > 10_000




def test_external_inputs_without_torch(tmp_path: Path) -> None:
    """compare stays torch-free: .npy compares, a .pt says in one line that it needs torch."""
    np.save(tmp_path / "l.npy", np.ones((2, 8), np.float32))
    torch.save(torch.ones(2, 8), tmp_path / "l.pt")
    run = [sys.executable, "-c", NO_TORCH, "compare", "-q"]
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    ok = subprocess.run([*run, "l.npy", "l.npy"], cwd=tmp_path, capture_output=True, text=True,
                        timeout=120, env=env)
    assert ok.returncode == 0, ok.stderr
    pt = subprocess.run([*run, "l.npy", "l.pt"], cwd=tmp_path, capture_output=True, text=True,
                        timeout=120, env=env)
    assert pt.returncode == 2 and pt.stderr.count("\n") == 1, pt.stderr
    assert pt.stderr.startswith("error: l.pt: reading a .pt file needs torch")

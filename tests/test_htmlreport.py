"""`precision report`: a self-contained HTML page, checked as text and in a real browser."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

import precision
from precision.cli import main
from precision.outputs.htmlreport import build

from .conftest import OVERFLOW_WO

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def page(t5_runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report.html"
    result = CliRunner().invoke(main, ["report", str(t5_runs["obase"]),
                                       str(t5_runs["ofp16_none"]), "-o", str(out)])
    assert result.exit_code == 1, result.output  # the overflow is flagged
    return out


def test_page_holds_summary_plots_and_every_row(page: Path, t5_runs: dict[str, Path]) -> None:
    text = page.read_text()
    report = precision.compare(t5_runs["obase"], t5_runs["ofp16_none"])
    assert "first divergence at " + OVERFLOW_WO in text
    assert text.count("<svg") == 4  # error vs depth, headroom, logits, position bias
    body = text.split("<tbody>", 1)[1]
    assert body.count("<tr") == len(report.rows)
    assert body.count('<tr class="flagged"') == len(report.flagged)
    # self-contained: nothing is fetched (the SVG namespace is a name, not a request)
    assert not re.search(r"""(src|href)=["']?https?:""", text)
    assert "<link" not in text and "@import" not in text


def test_healthy_page_and_refusals(t5_runs: dict[str, Path], tmp_path: Path) -> None:
    b, t = precision.load(t5_runs["base"]), precision.load(t5_runs["fp16"])
    text = build(precision.compare(b, t), b, t)
    assert "verdict PASS" in text and "no divergence" in text
    out = tmp_path / "r.html"
    out.write_text("keep me")
    r = CliRunner().invoke(main, ["report", str(t5_runs["base"]), str(t5_runs["fp16"]),
                                  "-o", str(out), "--markdown", str(tmp_path / "pr.md")])
    assert r.exit_code == 2 and out.read_text() == "keep me"
    r = CliRunner().invoke(main, ["report", str(t5_runs["base"]), str(t5_runs["fp16"]),
                                  "-o", str(out), "--force", "--markdown", str(tmp_path / "m.md")])
    assert r.exit_code == 0 and out.read_text().startswith("<!doctype html>")
    assert "PASS" in (tmp_path / "m.md").read_text()


def test_report_plot_figure(t5_runs: dict[str, Path]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    fig = precision.compare(t5_runs["obase"], t5_runs["ofp16_none"]).plot()
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and "first divergence" in " ".join(
        t.get_text() for t in ax.texts)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed")
def test_page_in_headless_chromium(page: Path, tmp_path: Path) -> None:
    """The page loads with no console errors, its script runs, and the screenshot has plots."""
    assert CHROMIUM is not None
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={tempfile.mkdtemp()}", "--enable-logging=stderr",
             "--v=0"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True,
                         text=True, timeout=120)
    assert 'data-ready="1"' in dom.stdout, dom.stderr[-2000:]  # the script ran to its end
    console = [ln for ln in dom.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert not console, console
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, "--window-size=1280,1800", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[0] >= 1000 and pixels.std() > 0.05  # not a blank page
    # the red verdict banner and plot colours are there: some strongly red pixels
    red = (pixels[..., 0] > 0.7) & (pixels[..., 1] < 0.3) & (pixels[..., 2] < 0.3)
    assert red.sum() > 100

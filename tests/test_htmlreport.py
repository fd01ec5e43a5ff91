"""`precision report`: a self-contained HTML page, checked as text and in a real browser."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

import precision
from precision.cli import main
from precision.outputs import plots
from precision.outputs.htmlreport import build

from .conftest import OVERFLOW_WO

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--enable-logging=stderr",
                 "--v=0"]
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed")


def _browser(*args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run([CHROMIUM, *BROWSER_FLAGS, f"--user-data-dir={tempfile.mkdtemp()}",
                           *args], capture_output=True, text=True, timeout=120)


def _svgs(text: str) -> list[str]:
    return re.findall(r"<svg.*?</svg>", text, re.S)


def _titles(svg: str) -> list[str]:
    return [html.unescape(t) for t in re.findall(r"<title>(.*?)</title>", svg, re.S)]


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
    # the banner names the first divergence and links to its row
    assert f'first divergence at <a href="#first-divergence">{OVERFLOW_WO}</a>' in text
    assert text.count("<svg") == 4  # error vs depth, headroom, logits, position bias
    body = text.split("<tbody>", 1)[1]
    assert body.count("<tr") == len(report.rows)
    assert body.count('<tr class="flagged') == len(report.flagged)
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


def test_precision_plot_figure(t5_runs: dict[str, Path]) -> None:
    """precision.plot(report): a new figure, or the figure of the axes it is given."""
    import matplotlib
    from matplotlib.figure import Figure

    matplotlib.use("Agg")
    report = precision.compare(t5_runs["obase"], t5_runs["ofp16_none"])
    fig = precision.plot(report)
    ax = fig.axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert ax.get_yscale() == "log" and f"first divergence: {OVERFLOW_WO}" in legend
    given = Figure().subplots()
    assert precision.plot(report, given) is given.figure and given.get_yscale() == "log"


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


PROBE = """<script>
const t=document.getElementById('rows'), rows=[...t.tBodies[0].rows];
const only=document.getElementById('flagged');
const hit=document.querySelector('svg .hits circle');
hit.scrollIntoView({block:'center'});
const box=hit.getBoundingClientRect();
const under=document.elementFromPoint(box.x+box.width/2, box.y+box.height/2);
const out={why:t.tHead.rows[0].cells[3].getBoundingClientRect().width,
  whyHead:t.tHead.rows[0].cells[3].textContent,
  right:t.getBoundingClientRect().right, width:document.documentElement.clientWidth,
  firstShown:(rows.find(r=>!r.hidden)||{}).id, hidden:rows.filter(r=>r.hidden).length,
  checked:only.checked, hover:under===hit, link:!!document.querySelector(
  'a[href="#first-divergence"]')};
only.checked=false; only.dispatchEvent(new Event('change'));
out.hiddenAfterToggle=rows.filter(r=>r.hidden).length;
document.body.dataset.probe=JSON.stringify(out);
</script>"""


def _probe(page: Path, tmp_path: Path, width: int) -> dict[str, Any]:
    """Load a copy of ``page`` with :data:`PROBE` appended in headless chromium at ``width``
    px; the layout and state it measured."""
    copy = tmp_path / "probe.html"
    copy.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom = _browser(f"--window-size={width},1600", "--dump-dom", copy.as_uri())
    found = re.search(r'data-probe="([^"]*)"', dom.stdout)
    assert found, dom.stderr[-2000:]
    result: dict[str, Any] = json.loads(html.unescape(found.group(1)))
    return result


@needs_chromium
def test_table_layout_flagged_first_and_hover_in_chromium(page: Path, tmp_path: Path,
                                                          t5_runs: dict[str, Path]) -> None:
    """At 1400 px the table fits and its "why" column is wide; the table opens on the flagged
    rows with the first divergence on top; a plot point is what the mouse finds."""
    report = precision.compare(t5_runs["obase"], t5_runs["ofp16_none"])
    got = _probe(page, tmp_path, 1400)
    assert got["whyHead"] == "why" and got["why"] >= 280, got
    assert got["right"] <= got["width"], got  # nothing cut off on the right
    assert got["checked"] and got["firstShown"] == "first-divergence" and got["link"], got
    assert got["hidden"] == len(report.rows) - len(report.flagged) > 0
    assert got["hiddenAfterToggle"] == 0  # unticking "only flagged" shows every row
    assert got["hover"], got  # the hover circle is on top, so its <title> shows


def test_table_opens_on_flagged_rows_with_first_divergence_marked(
        page: Path, t5_runs: dict[str, Path]) -> None:
    report = precision.compare(t5_runs["obase"], t5_runs["ofp16_none"])
    assert report.first_divergence is not None
    body = page.read_text().split("<tbody>", 1)[1]
    rows = re.findall(r"<tr([^>]*)>(.*?)</tr>", body, re.S)
    shown = [(attrs, cells) for attrs, cells in rows if " hidden" not in attrs]
    assert len(shown) == len(report.flagged)
    attrs, cells = shown[0]
    assert 'id="first-divergence"' in attrs and "first" in attrs.split('"')[1].split()
    assert f'data-v="{report.first_divergence.key}"' in cells and "◀ first" in cells
    assert "type='checkbox' id='flagged' checked" in page.read_text()
    assert body.count('id="first-divergence"') == 1


def test_error_vs_depth_one_metric_per_axis_and_overflow_on_top(
        t5_runs: dict[str, Path]) -> None:
    """Two labelled log axes, a short self-explaining legend, and the OVERFLOW rows (whose
    rel_l2 leaves the infs out, so they sit low) drawn above everything else, starred first."""
    report = precision.compare(t5_runs["obase"], t5_runs["ofp16_none"])
    first = report.first_divergence
    assert first is not None and first.status == "OVERFLOW"
    fig = plots.error_vs_depth(report)
    top, bottom = fig.axes
    labels = [top.get_ylabel(), bottom.get_ylabel()]
    assert len(set(labels)) == 2 and all(lbl and lbl != "error" for lbl in labels)
    legend = [t.get_text() for t in top.get_legend().get_texts()]
    assert len(legend) <= 7 and not any("1-cos" in t or "model" in t for t in legend), legend
    assert any(t.startswith("DRIFT limit") for t in legend)
    lines = {ln.get_label(): ln for ln in top.lines}
    over = lines[next(t for t in legend if t.startswith("OVERFLOW/NAN"))]
    blown = sorted(r.order for r in report.rows if r.status in ("OVERFLOW", "NAN")
                   and r.metrics is not None and r.metrics.compared)
    assert sorted(over.get_xdata()) == blown and first.order in blown
    fig.canvas.draw()

    def screen_y(line: Any) -> np.ndarray:
        xy = np.column_stack([line.get_xdata(), line.get_ydata()]).astype(float)
        return np.asarray(line.get_transform().transform(xy)[:, 1])

    others = [ln for name, ln in lines.items() if not name.startswith(("OVERFLOW", "first"))]
    assert screen_y(over).min() > max(screen_y(ln).max() for ln in others)
    star = lines[f"first divergence: {first.key}"]
    assert list(star.get_xdata()) == [first.order]
    assert screen_y(star)[0] == pytest.approx(screen_y(over).max())


def test_headroom_uses_the_limit_of_the_dtype_that_ran(t5_runs: dict[str, Path]) -> None:
    for target, name, limit in (("ofp16_none", "fp16", 65504.0),
                                ("obf16", "bf16", 3.3895313892515355e38)):
        ax = plots.headroom(precision.compare(t5_runs["obase"], t5_runs[target])).axes[0]
        assert f"the {name} limit" in ax.get_title()
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert f"{name} max {limit:.6g}" in legend, legend
        hlines = [ln.get_ydata()[0] for ln in ax.lines if ln.get_label().startswith(name)]
        assert hlines == [pytest.approx(limit)]


def test_logits_panel_shows_sequences_and_leaves_padding_out(
        make_dump: Callable[..., Path]) -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 16)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=np.int64)  # left padding
    noisy = logits + rng.normal(scale=1e-3, size=logits.shape).astype(np.float32)
    b = make_dump("b.st", {"input:attention_mask": mask, "lm_head:out": logits},
                  logits_key="lm_head:out")
    t = make_dump("t.st", {"input:attention_mask": mask, "lm_head:out": noisy},
                  logits_key="lm_head:out")
    report = precision.compare(b, t)
    fig = plots.logits_panel(report, precision.load(b))
    kl_ax = fig.axes[0]
    assert len(kl_ax.lines[0].get_xdata()) == int(mask.sum()) == 8
    assert [t.get_text() for t in kl_ax.get_xticklabels()] == ["seq 0", "seq 1"]
    bounds = [ln.get_xdata()[0] for ln in kl_ax.lines if ln.get_linestyle() == ":"]
    assert bounds == [4.5]  # between the 5 tokens of seq 0 and the 3 of seq 1
    titles = _titles(plots.to_svg(fig))
    assert any(t.startswith("sequence 1, position 2:") for t in titles)
    assert not any(t.startswith(("sequence 1, position 0", "sequence 1, position 1"))
                   for t in titles)
    # without the mask (no base dump) every position is drawn
    assert len(plots.logits_panel(report).axes[0].lines[0].get_xdata()) == 10


class _Shifted:
    """A dump whose ``key`` tensor is replaced by ``value``."""

    def __init__(self, dump: Any, key: str, value: np.ndarray) -> None:
        self.dump, self.key, self.value, self.tensors = dump, key, value, dump.tensors

    def __getitem__(self, key: str) -> np.ndarray:
        return self.value if key == self.key else np.asarray(self.dump[key])


def test_position_bias_against_expected_noise_on_one_scale(t5_runs: dict[str, Path]) -> None:
    b, t = precision.load(t5_runs["obase"]), precision.load(t5_runs["ofp16_none"])
    profile = precision.compare(b, t).profile
    fig = plots.position_bias_heatmap(b, t, profile)
    heat_axes = [ax for ax in fig.axes if ax.get_xlabel() == "bucket"]
    norms = {(ax.images[0].norm.vmin, ax.images[0].norm.vmax) for ax in heat_axes}
    assert len(heat_axes) == 2 and len(norms) == 1  # encoder and decoder, one scale
    assert len(fig.axes) == 3  # and one colour bar
    assert "eps" in fig.axes[2].get_ylabel() and "DRIFT" in fig.axes[2].get_ylabel()
    limit = profile.noise_max
    limit_eps = limit / profile.eps
    healthy = heat_axes[0].images[0].get_array()
    assert np.nanmax(healthy) < limit_eps  # healthy rounding stays under the limit
    # plant a moved bucket: bucket 3 takes bucket 4's values on the target
    key = next(k for k in b.tensors if k.endswith("relative_attention_bias:out"))
    ids = b[key.replace(":out", ":in.0")]
    bias = np.array(b[key], dtype=np.float32)
    moved = bias.copy()
    moved[ids == 3] = bias[ids == 4][0]
    shifted = plots.position_bias_heatmap(b, _Shifted(t, key, moved), profile)  # type: ignore[arg-type]
    heat = shifted.axes[0].images[0].get_array()
    assert heat[:, 3].max() > limit_eps and np.nanmax(np.delete(heat, 3, axis=1)) < limit_eps


def test_points_name_their_layer(page: Path, t5_runs: dict[str, Path]) -> None:
    """Every plotted layer has a hover <title> on a circle centred on its drawn marker."""
    report = precision.compare(t5_runs["obase"], t5_runs["ofp16_none"])
    depth = _svgs(page.read_text())[0]
    titles = _titles(depth)
    plotted = [r for r in report.rows if r.metrics is not None and r.metrics.compared
               and (r.metrics.absmax_base or r.metrics.absmax_target)]
    for r in plotted:
        assert any(t.startswith(f"#{r.order} {r.key}\n") for t in titles), r.key
    markers = np.array(re.findall(r'<use [^>]*?x="([-\d.]+)" y="([-\d.]+)"', depth), float)
    hits = np.array(re.findall(r'<circle cx="([-\d.]+)" cy="([-\d.]+)"', depth), float)
    assert len(hits) == 2 * len(plotted)  # two panels
    gap = np.abs(hits[:, None, :] - markers[None, :, :]).max(axis=2).min(axis=1)
    assert gap.max() < 0.05
    heat = _svgs(page.read_text())[3]
    cells = re.findall(r'<rect x="[^"]*" y="[^"]*" width="[^"]*" height="[^"]*"><title>', heat)
    b = precision.load(t5_runs["obase"])
    keys = [k for k in b.tensors if k.endswith("relative_attention_bias:out")]
    assert len(cells) == sum(b.tensors[k].shape[-1] * (int(b[k.replace(":out", ":in.0")].max())
                                                       + 1) for k in keys)


def test_stats_only_reports_plot_the_sketch_estimate_and_mark_what_blew_up(
        tmp_path: Path) -> None:
    """A comparison of stats dumps (no tensors) draws each layer's rel_l2 as the count sketch
    estimates it, within a few percent of what the full dumps of the same runs measure; a
    NaN layer sits on top, starred first; the headroom plot has every layer too (both were
    empty axes)."""
    import torch

    def runs(perturb: float, nan: bool) -> dict[str, Path]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                    torch.nn.Linear(64, 64), torch.nn.Tanh(),
                                    torch.nn.Linear(64, 64))
        x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(perturb * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
            if nan:
                model[4].weight[0, 0] = float("nan")
        out = {}
        for mode in ("stats", "full"):
            out[mode] = tmp_path / f"{perturb}-{nan}-{mode}.st"
            with torch.no_grad(), precision.capture(model, out[mode], mode=mode):
                model(x)
        return out

    base, target, broken = runs(0.0, False), runs(1e-3, False), runs(0.0, True)
    stats = precision.compare(base["stats"], target["stats"])
    full = {r.key: r for r in precision.compare(base["full"], target["full"]).rows}
    assert plots.stats_only(stats) and not plots.stats_only(
        precision.compare(base["full"], target["full"]))
    fig = plots.error_vs_depth(stats)
    (ax,) = fig.axes
    assert "count sketch" in ax.get_ylabel()
    layers = next(ln for ln in ax.lines if ln.get_label() == "layers")
    by_order = {r.order: r for r in stats.rows}
    drawn = dict(zip(layers.get_xdata(), layers.get_ydata(), strict=True))
    assert len(drawn) >= 5
    for order, value in drawn.items():
        truth = full[by_order[order].key].metrics
        assert truth is not None and value == pytest.approx(truth.rel_l2, rel=0.1), order
    assert len(plots.headroom(stats).axes[0].lines[0].get_xdata()) == len(drawn)
    from precision.judge.table import columns

    (absmax,) = columns(("absmax_target",))
    for row in stats.rows:  # the table's absmax column reads the record's statistics
        truth = full[row.key].metrics
        assert truth is not None and absmax.value(row) == pytest.approx(truth.absmax_target)
    failed = precision.compare(base["stats"], broken["stats"])
    first = failed.first_divergence
    assert first is not None and first.status == "NAN"
    lines = {ln.get_label(): ln for ln in plots.error_vs_depth(failed).axes[0].lines}
    blown = next(ln for name, ln in lines.items() if name.startswith("OVERFLOW/NAN"))
    assert first.order in list(blown.get_xdata())
    assert list(lines[f"first divergence: {first.key}"].get_xdata()) == [first.order]


def test_a_report_with_tensors_draws_no_stats_estimate_beside_them(tmp_path: Path) -> None:
    """A stats capture that stores one module whole (--full): its rows with tensors are
    measured, the rest only estimated; the panels labelled as measures draw only the
    measured rows (an estimate would pass for one)."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8))
    x = torch.randn(4, 8)
    paths = []
    for name, scale in (("a", 1.0), ("b", 1.01)):
        with torch.no_grad():
            model[2].weight.mul_(scale)
            paths.append(tmp_path / f"{name}.st")
            with precision.capture(model, paths[-1], mode="stats", full=["0"]):
                model(x)
    report = precision.compare(*paths)
    assert not plots.stats_only(report)
    measured = {r.order for r in report.rows if r.metrics is not None and r.metrics.compared}
    estimated = {r.order for r in report.rows if r.stats_delta is not None}
    assert measured and estimated
    for ax in plots.error_vs_depth(report).axes:
        drawn = {x for ln in ax.lines if ln.get_label() == "layers" for x in ln.get_xdata()}
        assert drawn and drawn <= measured, (drawn, measured)

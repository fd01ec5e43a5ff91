"""Matplotlib figures of a comparison (matplotlib is imported here, on first use).

Every function draws on a given ``Axes`` or makes a new ``Figure`` without pyplot, so the
HTML report has no global state; :func:`precision.plot` uses pyplot for notebooks.

Points can carry hover labels (:func:`add_hits`): :func:`to_svg` lays a transparent circle
or rectangle with an SVG ``<title>`` over each, so a browser names the layer under the mouse
with no script and no network.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from ..dtypes import FORMATS, float_format, is_float, short
from ..dumps.keys import parse_key
from ..judge.lineup.tokens import real_tokens

if TYPE_CHECKING:
    from ..dumps.dump import Dump
    from ..judge.measure.metrics import TensorMetrics
    from ..judge.measure.row import Row
    from ..judge.profiles import Profile
    from ..judge.report import Report

FLOOR = 1e-12  # log axes: exact zeros are drawn at this floor
STACK_COLOURS = {"encoder": "#0969da", "decoder": "#8250df"}
RED, AMBER, GREY = "#cf222e", "#9a6700", "#6e7781"
BLOWN_UP = ("OVERFLOW", "NAN")  # rows whose metrics leave out inf/NaN: drawn off the scale
HITS_ATTR = "_precision_hits"


def _figure(width: float = 11.0, height: float = 3.4) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")  # 72 pt/in in the SVG


def stack_of(key: str) -> str:
    """``encoder``/``decoder`` for T5-style keys, ``model`` for everything else."""
    head = parse_key(key).stack
    return head if head in STACK_COLOURS else "model"


def _m(r: Row) -> TensorMetrics:
    assert r.metrics is not None
    return r.metrics


def _absmax(r: Row, side: str) -> float | None:
    """The largest finite ``|x|`` of the ``base`` or ``target`` side of a row: from its
    metrics, or from a stats-only row's records (None where they hold none)."""
    if r.metrics is not None:
        return float(getattr(r.metrics, f"absmax_{side}"))
    value = None if r.stats_delta is None else getattr(r.stats_delta, f"absmax_{side}")
    return None if value is None else float(value)


def _error(r: Row, metric: str) -> float | None:
    """The plotted error of a row: its ``metric``; for a stats-only row (no tensors), only
    ``rel_l2``, estimated by the count sketch as ``sketch_gap / ||a||``, or where a run has
    no sketch the norms' gap ``norm_gap_rel`` (a lower bound); None where nothing says."""
    if r.metrics is not None:
        return float(getattr(r.metrics, metric)) if r.metrics.compared else None
    d = r.stats_delta
    if d is None or metric != "rel_l2" or not d.norm_base:
        return None
    if d.sketch_gap is not None:
        return float(d.sketch_gap) / float(d.norm_base)
    return None if d.norm_gap_rel is None else float(d.norm_gap_rel)


def stats_only(report: Report) -> bool:
    """Whether the report's rows come from statistics alone (stats dumps, msprobe
    summaries): no tensor metrics, only what the records' statistics say."""
    return not any(r.metrics is not None for r in report.rows) and any(
        r.stats_delta is not None for r in report.rows)


def _float_rows(report: Report) -> list[Row]:
    """Rows with float metrics (or a stats-only row's statistics), less all-zero pairs
    (e.g. T5's cross-attention bias), which a log axis could only draw at its floor."""
    stats = stats_only(report)  # else a stats row's estimate would pass for a measure
    return [r for r in report.rows
            if ((r.metrics is not None and r.metrics.compared)
                or (stats and r.stats_delta is not None))
            and (_absmax(r, "base") or _absmax(r, "target"))]


def add_hits(ax: Any, xs: Iterable[float], ys: Iterable[float], labels: Iterable[str], *,
             transform: Any = None, size: tuple[float, float] | None = None) -> None:
    """Hover labels for points (or, with ``size`` in data units, cells centred on them)
    drawn on ``ax`` with ``transform`` (default: data coordinates); see :func:`to_svg`."""
    hits = ax.figure.__dict__.setdefault(HITS_ATTR, [])
    hits.append((transform if transform is not None else ax.transData,
                 list(xs), list(ys), list(labels), size))


def _row_label(r: Row) -> str:
    head = f"#{r.order} {r.key}\n{r.status}: {r.reason}\n"
    if r.metrics is None:  # a stats-only row
        error, lo, hi = _error(r, "rel_l2"), _absmax(r, "base"), _absmax(r, "target")
        return head + ", ".join(
            [f"rel_l2 about {error:.3g}" if error is not None else "rel_l2 unknown"]
            + ([f"|x|max {lo:.3g} -> {hi:.3g}"] if lo is not None and hi is not None else []))
    m = r.metrics
    return (head + f"rel_l2 {m.rel_l2:.3g}, 1-cos {m.one_minus_cos:.3g}, "
            f"|x|max {m.absmax_base:.3g} -> {m.absmax_target:.3g}")


def panels(report: Report) -> list[tuple[str, float, str, float | None]]:
    """The error-vs-depth panels: (metric attribute, unit, axis label, DRIFT limit or None).

    First the metric the DRIFT verdict judges, with its limit: the element-scaled rms error
    in units of eps (``noise_rms``); then ``rel_l2`` for information. A stats-only report
    has one: ``rel_l2`` as the records' statistics estimate it (:func:`_error`), without a
    limit line (its rules weigh each record against the reference run's own estimate).
    """
    prof = report.profile
    if stats_only(report):
        return [("rel_l2", 1.0, "rel_l2 ≈ ‖b − a‖ / ‖a‖ (count sketch;\nelse the norms' gap, "
                 "a lower bound)", None)]
    return [("noise_rms", prof.eps, "error / eps (rms, element-scaled)",
             prof.noise_rms / prof.eps),
            ("rel_l2", 1.0, "rel_l2 = ‖b − a‖ / ‖a‖", None)]


def error_vs_depth(report: Report, ax: Any = None, *, operations: bool = False) -> Any:
    """Error per layer in execution order, one metric per axis (log scale, :func:`panels`).

    Operation records (``capture --level ops``) are left out unless ``operations``: the
    modules' outputs alone give the depth axis its meaning.

    With no ``ax``: two panels sharing the layer axis, the verdict's metric with its DRIFT
    limit above ``rel_l2``; with ``ax``: the verdict's metric on it. Encoder and decoder in
    their own colours, DRIFT rows circled in red; OVERFLOW/NAN rows, whose metrics leave the
    inf/NaN values out, as red triangles along the top of the axis; the first divergence
    starred. Every point carries a hover label (:func:`add_hits`).
    """
    specs = panels(report)
    if ax is not None:
        _error_axis(report, ax, specs[0], legend=True, operations=operations)
        return ax.figure
    if len(specs) == 1:
        fig = _figure(height=3.4)
        _error_axis(report, fig.add_subplot(), specs[0], legend=True, operations=operations)
        return fig
    fig = _figure(height=5.4)
    top, bottom = fig.subplots(2, 1, sharex=True)
    _error_axis(report, top, specs[0], legend=True, operations=operations)
    _error_axis(report, bottom, specs[1], legend=False, operations=operations)
    top.set_xlabel("")
    return fig


def _error_axis(report: Report, ax: Any, spec: tuple[str, float, str, float | None], *,
                legend: bool, operations: bool = False) -> None:
    from matplotlib.transforms import blended_transform_factory

    metric, unit, ylabel, limit = spec
    rows = [r for r in _float_rows(report) if operations or not parse_key(r.key).op]
    errors = {r.order: _error(r, metric) for r in rows}
    blown = [r for r in rows if r.status in BLOWN_UP
             or (errors[r.order] is not None and not math.isfinite(errors[r.order] or 0.0))]
    off_scale = {r.order for r in blown}
    finite = [r for r in rows if r.order not in off_scale and errors[r.order] is not None]

    def value(r: Row) -> float:
        return max((errors.get(r.order) or 0.0) / unit, FLOOR)

    stacks = list(dict.fromkeys(stack_of(r.key) for r in rows))
    for stack in stacks:
        part = [r for r in finite if stack_of(r.key) == stack]
        label = ("layers" if stacks == ["model"] else
                 "other layers" if stack == "model" else f"{stack} layers")
        ax.plot([r.order for r in part], [value(r) for r in part], ".-",
                color=STACK_COLOURS.get(stack, "#1f2328"), lw=0.8, ms=3, label=label)
    drift = [r for r in finite if r.flagged]
    if drift:
        ax.plot([r.order for r in drift], [value(r) for r in drift], "o", mfc="none",
                mec=RED, ms=7, label="DRIFT: beyond the expected noise")
    values = [value(r) for r in finite]
    add_hits(ax, [r.order for r in finite], values, [_row_label(r) for r in finite])
    if limit is not None:
        ax.axhline(limit, color=AMBER, ls="--", lw=0.9,
                   label=f"DRIFT limit {limit:.3g} [{report.profile.name}]")
        values.append(limit)
    lo, hi = (min(values), max(values)) if values else (1e-6, 1.0)
    ax.set_yscale("log")
    ax.set_ylim(lo / 3, hi * 3 * (hi / lo) ** 0.12)  # room above the data for the band
    top = blended_transform_factory(ax.transData, ax.transAxes)
    if blown:
        ax.plot([r.order for r in blown], [0.95] * len(blown), "^", color=RED, ms=7,
                transform=top, label="OVERFLOW/NAN: inf or NaN (off the scale)")
        add_hits(ax, [r.order for r in blown], [0.95] * len(blown),
                 [_row_label(r) for r in blown], transform=top)
    first = report.first_divergence
    if first is not None and (first.order in off_scale or any(r is first for r in finite)):
        at_top = first.order in off_scale
        ax.plot([first.order], [0.95 if at_top else value(first)], "*", color=RED, ms=13,
                mec="#1f2328", mew=0.6, transform=top if at_top else ax.transData,
                label=f"first divergence: {first.key}", zorder=5)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_xlabel("layer (execution order)")
    if legend:
        ax.set_title(f"Error versus depth [{report.profile.name}]", fontsize=10)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def _limit_format(report: Report) -> str:
    """The float format whose limit the run faced: the narrower-ranged of the two sides'
    dtypes (so ``bfloat16`` for a bf16 run, never fp16's 65504 unless fp16 ran)."""
    names = [s.get("dtype") for s in (report.info.get("base", {}), report.info.get("target", {}))]
    names += [r.target_dtype for r in report.rows
              if r.metrics is not None or r.stats_delta is not None][:1]
    floats = [n for n in names if isinstance(n, str) and is_float(n)]
    return min(floats, key=lambda n: float_format(n).max) if floats else "float32"


def headroom(report: Report, ax: Any = None) -> Any:
    """Each layer's largest |value| in the baseline and the target against the largest
    finite value of the dtype that ran (fp16 65504, bf16 3.39e38, ...)."""
    fig = None
    if ax is None:
        fig = _figure()
        ax = fig.add_subplot()
    fmt = float_format(_limit_format(report))
    name = short(fmt.name)
    def high(r: Row, side: str) -> float:
        return max(_absmax(r, side) or 0.0, FLOOR)

    rows = _float_rows(report)
    x = [r.order for r in rows]
    ax.semilogy(x, [high(r, "base") for r in rows], ".", ms=3,
                color=GREY, label="baseline |x|max")
    target = [high(r, "target") for r in rows]
    ax.semilogy(x, target, ".", ms=3, color="#0969da", label="target |x|max")
    over = [r for r in rows if r.status in BLOWN_UP]
    if over:
        ax.semilogy([r.order for r in over], [high(r, "target") for r in over],
                    "o", mfc="none", mec=RED, ms=7, label="OVERFLOW/NAN")
    ax.axhline(fmt.max, color=RED, ls="--", lw=0.8, label=f"{name} max {fmt.max:.6g}")
    add_hits(ax, x, target, [_row_label(r) for r in rows])
    title = f"Headroom to the {name} limit ({fmt.max:.6g})"
    finite = [r for r in rows if r.status not in BLOWN_UP and (_absmax(r, "target") or 0) > 0]
    if finite:
        close = max(finite, key=lambda r: high(r, "target"))
        title += (f"\nclosest healthy layer: {close.key} at {high(close, 'target'):.3g} "
                  f"({fmt.max / high(close, 'target'):.3g}x below)")
    ax.set_xlabel("layer (execution order)")
    ax.set_ylabel("largest |value|")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig if fig is not None else ax.figure


def token_mask(dump: Dump | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """Which logits rows are real tokens: the rows the verdict judged
    (:func:`precision.judge.lineup.tokens.real_tokens`); None when all are."""
    if dump is None or len(shape) < 2:
        return None
    return real_tokens(dump, shape)


def logits_panel(report: Report, base: Dump | None = None) -> Any:
    """Per-token KL(base || target) and top-k overlap of the logits row, argmax flips marked.

    Tokens run sequence after sequence, with a line at each sequence start; positions that
    the recorded attention mask of ``base`` marks as padding are left out.
    """
    row = next((r for r in report.rows if r.logits is not None), None)
    if row is None or row.logits is None or not row.logits.kl_per_position:
        return None
    lg = row.logits
    n = len(lg.kl_per_position)
    shape = row.shape if len(row.shape) >= 2 else (n, 1)
    per_seq = int(np.prod(shape[1:-1])) if len(shape) > 2 else n
    if per_seq <= 0 or n % per_seq:
        per_seq = n
    mask = token_mask(base, shape)
    keep = mask if mask is not None and mask.size == n else np.ones(n, dtype=bool)
    idx = np.flatnonzero(keep)
    kl = np.asarray(lg.kl_per_position, dtype=np.float64)[idx]
    overlap = np.asarray(lg.overlap_per_position, dtype=np.float64)[idx]
    seq, pos = np.divmod(idx, per_seq)
    x = np.arange(idx.size)
    flips = {f[0]: f for f in lg.flips}
    labels = [f"sequence {s}, position {p}: KL {k:.3g}, top-{lg.k} overlap {o:.0%}"
              + (f"\nargmax flip {flips[i][1]} -> {flips[i][2]}"
                 + (" (near-tie)" if flips[i][4] else "") if i in flips else "")
              for i, s, p, k, o in zip(idx.tolist(), seq, pos, kl, overlap, strict=True)]
    fig = _figure(height=3.2)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.semilogy(x, np.maximum(kl, FLOOR), ".", ms=3, color="#0969da", label="token")
    ax1.axhline(report.profile.kl_mean, color=AMBER, ls="--", lw=0.8,
                label=f"mean-KL limit {report.profile.kl_mean:g}")
    fx = [j for j, i in enumerate(idx.tolist()) if i in flips]
    if fx:
        ax1.semilogy(fx, np.maximum(kl[fx], FLOOR), "x", color=RED, label="argmax flip")
    ax2.plot(x, overlap, ".", ms=3, color="#1a7f37")
    ax2.set_ylim(-0.05, 1.05)
    starts = [j for j in range(idx.size) if j == 0 or seq[j] != seq[j - 1]]
    for ax in (ax1, ax2):
        for j in starts[1:]:
            ax.axvline(j - 0.5, color=GREY, lw=0.7, ls=":")
        ax.set_xticks(starts, [f"seq {seq[j]}" for j in starts], fontsize=7)
        ax.set_xlabel("token (sequences in turn, padding left out)"
                      if idx.size < n else "token (sequences in turn)")
    add_hits(ax1, x, np.maximum(kl, FLOOR), labels)
    add_hits(ax2, x, overlap, labels)
    mean = float(kl.mean()) if kl.size else 0.0
    ax1.set_title(f"KL per token (mean {mean:.2g} over {idx.size} tokens)", fontsize=10)
    ax1.legend(fontsize=7)
    ax2.set_title(f"top-{lg.k} overlap (mean {overlap.mean() if overlap.size else 1:.1%}), "
                  f"top-1 {lg.top1_agreement:.1%}", fontsize=10)
    return fig


def _bias_noise(a: np.ndarray, eps: float) -> float:
    """The expected error of one bias value: ``eps`` times the RMS of the baseline bias
    ``a`` (a lookup table is only rounded), never zero."""
    rms = float(np.sqrt(np.mean(a * a))) if a.size else 0.0
    return max(eps * rms, FORMATS["float32"].eps * 1e-30)


def position_bias_heatmap(base: Dump, target: Dump, profile: Profile | None = None) -> Any:
    """T5: max |bias difference| per relative-position bucket and head, for each stack, in
    units of the expected rounding error (eps x RMS of the baseline bias, eps the profile's),
    on one shared logarithmic colour scale with the profile's outlier (DRIFT) limit on it.

    Uses the ``relative_attention_bias`` outputs (query x key x heads) and the bucket ids fed
    to it; a bucket whose ids moved on the target shows up as a bright cell.
    """
    from matplotlib.colors import LogNorm

    keys = [k for k in base.tensors if k.endswith("relative_attention_bias:out")
            and k in target.tensors and k.replace(":out", ":in.0") in base.tensors
            and base.tensors[k].shape == target.tensors[k].shape]
    if not keys:
        return None
    eps = profile.eps if profile is not None else max(
        float_format(base.tensors[keys[0]].dtype).eps,
        float_format(target.tensors[keys[0]].dtype).eps)
    # the profile's outlier limit (element-scaled) in eps
    outlier = profile.noise_max / profile.eps if profile is not None else None
    heats, noises = [], []
    for key in keys:
        a = base[key].astype(np.float64)
        b = target[key].astype(np.float64)
        buckets = base[key.replace(":out", ":in.0")]
        n_buckets = int(buckets.max()) + 1
        heat = np.full((a.shape[-1], n_buckets), np.nan)
        diff = np.abs(b - a).reshape(-1, a.shape[-1])
        flat = buckets.reshape(-1)
        for bucket in range(n_buckets):
            sel = diff[flat == bucket]
            if sel.size:
                heat[:, bucket] = sel.max(axis=0)
        noises.append(_bias_noise(a, eps))
        heats.append(heat)
    ratios = [h / nz for h, nz in zip(heats, noises, strict=True)]
    top = max([float(np.nanmax(r)) for r in ratios if np.isfinite(r).any()] + [1.0])
    vmax = max(10 ** math.ceil(math.log10(top)), (outlier or 0) * 4, 100.0)
    norm = LogNorm(vmin=0.1, vmax=vmax)
    fig = _figure(height=2.6 + 0.2 * len(keys))
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    image = None
    for ax, key, heat, ratio, noise in zip(axes, keys, heats, ratios, noises, strict=True):
        cmap = _bias_cmap()
        image = ax.imshow(np.clip(ratio, 0.1, None), aspect="auto", cmap=cmap, norm=norm,
                          interpolation="nearest")
        stack = parse_key(key).stack
        ax.set_yticks(range(heat.shape[0]))
        ax.set_title(f"{stack}: worst |diff| {np.nanmax(heat):.2g} = "
                     f"{np.nanmax(ratio):.2g}x expected", fontsize=9)
        ax.set_xlabel("bucket")
        ax.set_ylabel("head")
        heads, buckets = np.indices(heat.shape)
        add_hits(ax, buckets.ravel(), heads.ravel(),
                 [f"{stack} head {h} bucket {k}: " + (
                     "no position uses this bucket" if math.isnan(heat[h, k]) else
                     f"max |diff| {heat[h, k]:.3g} = {ratio[h, k]:.3g}x the expected "
                     f"{noise:.3g}") for h, k in zip(heads.ravel(), buckets.ravel(),
                                                     strict=True)],
                 size=(1.0, 1.0))
    bar = fig.colorbar(image, ax=list(axes), shrink=0.9)
    label = "max |diff| / (eps × rms of the bias)"
    if outlier:
        bar.ax.axhline(outlier, color=RED, lw=2)
        label += f"\nred line: DRIFT limit ({outlier:g})"
    bar.set_label(label, fontsize=8)
    return fig


def _bias_cmap() -> Any:
    import matplotlib

    return matplotlib.colormaps["magma"].with_extremes(bad="#d0d7de")


def to_svg(fig: Any) -> str:
    """Inline SVG text of a figure (text kept as text, so it stays small), with a hover
    ``<title>`` over every point registered by :func:`add_hits` (group ``class="hits"``)."""
    import io

    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig.savefig(buf, format="svg")  # draws: the layout is final from here on
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    hits = fig.__dict__.get(HITS_ATTR, [])
    if not hits:
        return text
    scale = 72.0 / fig.dpi  # display pixels -> SVG points
    height = fig.bbox.height * scale
    shapes = []
    for transform, xs, ys, labels, size in hits:
        if not xs:
            continue
        centre = transform.transform(np.column_stack([xs, ys]).astype(np.float64))
        if size is not None:
            corner = transform.transform(np.column_stack([xs, ys]).astype(np.float64)
                                         + np.array(size) / 2)
        for j, ((px, py), label) in enumerate(zip(centre, labels, strict=True)):
            title = f"<title>{html.escape(label)}</title>"
            if size is None:
                shapes.append(f'<circle cx="{px * scale:.2f}" cy="{height - py * scale:.2f}" '
                              f'r="5">{title}</circle>')
            else:
                w, h = np.abs(corner[j] - (px, py)) * scale
                shapes.append(f'<rect x="{px * scale - w:.2f}" y="{height - py * scale - h:.2f}"'
                              f' width="{2 * w:.2f}" height="{2 * h:.2f}">{title}</rect>')
    overlay = ('<g class="hits" fill="#000" fill-opacity="0" pointer-events="all">'
               + "".join(shapes) + "</g>")
    cut = text.rindex("</svg>")
    return text[:cut] + overlay + text[cut:]

"""Matplotlib figures of a comparison (matplotlib is imported here, on first use).

Every function draws on a given ``Axes`` or makes a new ``Figure`` without pyplot, so the
HTML report has no global state; :meth:`Report.plot` uses pyplot for notebooks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..dtypes import FORMATS

if TYPE_CHECKING:
    from ..dumps.dump import Dump
    from ..judge.metrics import TensorMetrics
    from ..judge.report import Report, Row

FLOOR = 1e-12  # log axes: exact zeros are drawn at this floor
STACK_COLOURS = {"encoder": "#0969da", "decoder": "#8250df"}


def _figure(width: float = 9.0, height: float = 3.4) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def stack_of(key: str) -> str:
    """``encoder``/``decoder`` for T5-style keys, ``model`` for everything else."""
    head = key.split(".", 1)[0].split(":", 1)[0]
    return head if head in STACK_COLOURS else "model"


def _m(r: Row) -> TensorMetrics:
    assert r.metrics is not None
    return r.metrics


def _float_rows(report: Report) -> list[Row]:
    """Rows with float metrics, less all-zero pairs (e.g. T5's cross-attention bias), which
    a log axis could only draw at its floor."""
    return [r for r in report.rows if r.metrics is not None and _m(r).compared
            and (_m(r).absmax_base or _m(r).absmax_target)]


def error_vs_depth(report: Report, ax: Any = None) -> Any:
    """Norm-relative error and 1-cos per layer in execution order (log scale); encoder and
    decoder in their own colours, flagged rows circled in red, the first divergence named."""
    fig = None
    if ax is None:
        fig = _figure()
        ax = fig.add_subplot()
    rows = _float_rows(report)
    for stack in dict.fromkeys(stack_of(r.key) for r in rows):
        part = [r for r in rows if stack_of(r.key) == stack]
        x = [r.order for r in part]
        colour = STACK_COLOURS.get(stack, "#1f2328")
        ax.plot(x, [max(_m(r).rel_l2, FLOOR) for r in part], ".-", color=colour,
                lw=0.8, ms=3, label=f"{stack} rel_l2")
        ax.plot(x, [max(_m(r).one_minus_cos, FLOOR) for r in part], ".", color=colour,
                alpha=0.45, ms=3, label=f"{stack} 1-cos")
    bad = [r for r in rows if r.flagged]
    ax.plot([r.order for r in bad], [max(_m(r).rel_l2, FLOOR) for r in bad], "o",
            mfc="none", mec="#cf222e", ms=7, label="flagged")
    ax.axhline(report.profile.rel_l2, color="#9a6700", ls="--", lw=0.8,
               label=f"rel_l2 limit {report.profile.rel_l2:.3g}")
    first = report.first_divergence
    if first is not None and first.metrics is not None:
        ax.annotate(f"first divergence\n{first.key}", (first.order, max(_m(first).rel_l2,
                    FLOOR)), xytext=(10, 18), textcoords="offset points", fontsize=7,
                    color="#cf222e", arrowprops={"arrowstyle": "->", "color": "#cf222e"})
    ax.set_yscale("log")
    ax.set_xlabel("layer (execution order)")
    ax.set_ylabel("error")
    ax.set_title(f"Error versus depth [{report.profile.name}]", fontsize=10)
    ax.legend(fontsize=7, ncol=3, loc="lower right")
    return fig if fig is not None else ax.figure


def headroom(report: Report, ax: Any = None) -> Any:
    """Each layer's largest |value| in the baseline and the target against the fp16 limit."""
    fig = None
    if ax is None:
        fig = _figure()
        ax = fig.add_subplot()
    rows = _float_rows(report)
    x = [r.order for r in rows]
    ax.semilogy(x, [max(_m(r).absmax_base, FLOOR) for r in rows], ".", ms=3,
                color="#6e7781", label="baseline |x|max")
    ax.semilogy(x, [max(_m(r).absmax_target, FLOOR) for r in rows], ".", ms=3,
                color="#0969da", label="target |x|max")
    over = [r for r in rows if r.status == "OVERFLOW"]
    ax.semilogy([r.order for r in over], [max(_m(r).absmax_target, FLOOR) for r in over],
                "o", mfc="none", mec="#cf222e", ms=7, label="overflow / saturation")
    limit = FORMATS["float16"].max
    ax.axhline(limit, color="#cf222e", ls="--", lw=0.8, label="fp16 max 65504")
    ax.set_xlabel("layer (execution order)")
    ax.set_ylabel("largest |value|")
    ax.set_title("Headroom to the fp16 limit", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    return fig if fig is not None else ax.figure


def logits_panel(report: Report) -> Any:
    """Per-position KL(base || target) and top-k overlap of the logits row, flips marked."""
    row = next((r for r in report.rows if r.logits is not None), None)
    if row is None or row.logits is None or not row.logits.kl_per_position:
        return None
    lg = row.logits
    fig = _figure(height=3.0)
    ax1, ax2 = fig.subplots(1, 2)
    pos = np.arange(lg.positions)
    ax1.semilogy(pos, np.maximum(lg.kl_per_position, FLOOR), ".", ms=3, color="#0969da")
    ax1.axhline(report.profile.kl_mean, color="#9a6700", ls="--", lw=0.8,
                label=f"mean-KL limit {report.profile.kl_mean:g}")
    flips = [f[0] for f in lg.flips]
    ax1.semilogy(flips, [max(lg.kl_per_position[i], FLOOR) for i in flips], "x",
                 color="#cf222e", label="argmax flip")
    ax1.set_title(f"KL per position (mean {lg.kl_mean:.2g})", fontsize=10)
    ax1.set_xlabel("position")
    ax1.legend(fontsize=7)
    ax2.plot(pos, lg.overlap_per_position, ".", ms=3, color="#1a7f37")
    ax2.set_ylim(-0.05, 1.05)
    ax2.set_title(f"top-{lg.k} overlap (mean {lg.topk_overlap:.1%}), top-1 "
                  f"{lg.top1_agreement:.1%}", fontsize=10)
    ax2.set_xlabel("position")
    return fig


def position_bias_heatmap(base: Dump, target: Dump) -> Any:
    """T5: max |bias difference| per relative-position bucket and head, for each stack.

    Uses the ``relative_attention_bias`` outputs (query x key x heads) and the bucket ids fed
    to it; a bucket whose ids moved on the target shows up as a bright cell.
    """
    keys = [k for k in base.tensors if k.endswith("relative_attention_bias:out")
            and k in target.tensors and k.replace(":out", ":in.0") in base.tensors
            and base.tensors[k].shape == target.tensors[k].shape]
    if not keys:
        return None
    fig = _figure(height=2.6 + 0.2 * len(keys))
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys, strict=True):
        a = base[key].astype(np.float64)
        b = target[key].astype(np.float64)
        buckets = base[key.replace(":out", ":in.0")]
        n_buckets = int(buckets.max()) + 1
        heat = np.zeros((a.shape[-1], n_buckets))
        diff = np.abs(b - a).reshape(-1, a.shape[-1])
        flat = buckets.reshape(-1)
        for bucket in range(n_buckets):
            sel = diff[flat == bucket]
            if sel.size:
                heat[:, bucket] = sel.max(axis=0)
        im = ax.imshow(heat, aspect="auto", cmap="magma", interpolation="nearest")
        ax.set_yticks(range(heat.shape[0]))
        ax.set_title(key.split(".block")[0] + " position bias |diff|", fontsize=9)
        ax.set_xlabel("bucket")
        ax.set_ylabel("head")
        fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def to_svg(fig: Any) -> str:
    """Inline SVG text of a figure (text kept as text, so it stays small)."""
    import io

    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig.savefig(buf, format="svg")
    text = buf.getvalue()
    return text[text.index("<svg"):]

"""Figures: one place that sets the plotly renderer and the house layout.

Rendering has to work in three places:
- the built Jupyter Book, offline: figures are emitted as an HTML `<div>` without plotly.js, which
  the book serves once from `_static/plotly.min.js` (see `_config.yml`), instead of 4.8 MB per page;
- JupyterLab / VS Code: the same output also carries plotly's own mime type, which they render;
- Colab: plotly's `colab` renderer.
circuitsvis is shown through its inlined build (`local_src`), since its default points at a CDN.
"""

from __future__ import annotations

import shutil
import re
import sys
import textwrap
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio
from plotly.io._base_renderers import MimetypeRenderer

TEMPLATE = "plotly_white"
COLORS = {"trained": "#1f77b4", "untrained": "#7f7f7f",  # a family and its untrained control
          "universal": "#d62728", "other": "#7f7f7f"}  # a neuron set and the rest
MEMBER_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]


class BookRenderer(MimetypeRenderer):
    """plotly mime bundle + an HTML div that relies on a page-level plotly.js."""

    def to_mimebundle(self, fig_dict):
        fig_dict = wrap_titles(fig_dict)
        html = pio.to_html(fig_dict, include_plotlyjs=False, full_html=False, config={"responsive": True})
        return {"application/vnd.plotly.v1+json": {"data": fig_dict.get("data", []), "layout": fig_dict.get("layout", {})},
                "text/html": html}


# Titles longer than this many characters are broken into lines: the book's column is about 700 px,
# a 17 px title font fits about 80 characters and a 14 px axis title about 90 (y: the figure's height).
TITLE_CHARS, AXIS_CHARS = 80, 90


def _wrap(text: str, width: int) -> str:
    if not text or len(re.sub(r"<[^>]+>", "", text)) <= width or "<br>" in text:
        return text
    return "<br>".join(textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False))


def wrap_titles(fig_dict: dict) -> dict:
    """A copy of a figure (as a dict) whose figure, subplot and axis titles are broken into lines that
    fit the book's column, so that no title is cut by the figure's frame. Titles with explicit `<br>`
    are left as they are."""
    import copy

    fig = copy.deepcopy(fig_dict)
    layout = fig.setdefault("layout", {})
    height = layout.get("height") or 450

    def fix(holder: dict, width: int) -> None:
        title = holder.get("title")
        if isinstance(title, dict) and isinstance(title.get("text"), str):
            title["text"] = _wrap(title["text"], width)
        elif isinstance(title, str):
            holder["title"] = {"text": _wrap(title, width)}

    fix(layout, TITLE_CHARS)
    for key, axis in layout.items():
        if isinstance(axis, dict) and re.fullmatch(r"[xy]axis\d*", key):
            # a subplot's x-axis spans only its share (`domain`) of the figure's width
            lo, hi = axis.get("domain") or (0.0, 1.0)
            fix(axis, max(20, int(AXIS_CHARS * (hi - lo))) if key.startswith("x") else max(20, int(height / 8)))
    for ann in layout.get("annotations", ()):  # subplot titles are annotations
        if isinstance(ann.get("text"), str) and ann.get("yref") == "paper" and ann.get("showarrow") is False:
            ann["text"] = _wrap(ann["text"], TITLE_CHARS // 2)
    return fig


def setup() -> None:
    """Select the renderer for the current environment."""
    if "google.colab" in sys.modules:
        pio.renderers.default = "colab"
    else:
        pio.renderers["book"] = BookRenderer()
        pio.renderers.default = "book"
    pio.templates.default = TEMPLATE


def style(fig: go.Figure, title: str, x: str | None = None, y: str | None = None, height: int = 420, legend: str | None = None) -> go.Figure:
    """House layout: a title naming the paper's figure, axis titles with units, a legend title."""
    fig.update_layout(title=title, height=height, template=TEMPLATE, margin=dict(l=60, r=20, t=60, b=50),
                      legend_title_text=legend)
    if x is not None:
        fig.update_xaxes(title_text=x)
    if y is not None:
        fig.update_yaxes(title_text=y)
    return fig


def plotly_js_path() -> Path:
    import plotly

    return Path(plotly.__file__).parent / "package_data" / "plotly.min.js"


def install_plotly_js(static_dir: str | Path) -> Path:
    """Copy the installed plotly.min.js into the book's static folder (done by the book build)."""
    static_dir = Path(static_dir)
    static_dir.mkdir(parents=True, exist_ok=True)
    target = static_dir / "plotly.min.js"
    shutil.copyfile(plotly_js_path(), target)
    return target


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def show_html(html: str) -> None:
    from IPython.display import HTML, display

    display(HTML(html))


def show_circuitsvis(obj) -> None:
    """Display a circuitsvis object with its inlined JavaScript (renders offline)."""
    show_html(obj.local_src)


def training_curves(curves) -> go.Figure:
    """Training loss (smoothed line) and validation loss (markers) of every member against tokens.

    `curves`: long table with columns member, kind ('train'/'validation'), tokens, loss.
    """
    fig = go.Figure()
    for i, (member, df) in enumerate(curves.groupby("member", sort=True)):
        color = MEMBER_COLORS[i % len(MEMBER_COLORS)]
        tr, va = df[df.kind == "train"], df[df.kind == "validation"]
        fig.add_scatter(x=tr.tokens, y=tr.loss.rolling(5, min_periods=1).mean(), mode="lines", name=f"{member} train",
                        line=dict(color=color, width=1), opacity=0.6)
        fig.add_scatter(x=va.tokens.clip(lower=1), y=va.loss, mode="markers+lines", name=f"{member} validation",
                        line=dict(color=color, dash="dot"), marker=dict(size=8))
    fig.update_xaxes(type="log")
    return style(fig, "Training curves of the five seeds", x="training tokens (log scale; init shown at 1)",
                 y="cross-entropy (nats/token)", legend="seed")


def quantile_boxes(long, x: str, y: str, color: str, whiskers: tuple[float, float] = (0.01, 0.99)) -> go.Figure:
    """Box plot from precomputed quantiles (quartiles, whiskers at the given quantiles) of `y` per
    (`x`, `color`) group: the page stores five numbers per box instead of every neuron's value."""
    fig = go.Figure()
    for i, (name, part) in enumerate(long.groupby(color, sort=False)):
        q = part.groupby(x, sort=False)[y].quantile([whiskers[0], 0.25, 0.5, 0.75, whiskers[1]]).unstack()
        fig.add_trace(go.Box(x=list(q.index), q1=q[0.25], median=q[0.5], q3=q[0.75], lowerfence=q[whiskers[0]],
                             upperfence=q[whiskers[1]], name=str(name), marker_color=MEMBER_COLORS[i % len(MEMBER_COLORS)]))
    fig.update_layout(boxmode="group")
    return fig


def faceted_boxes(boxes, ranges: dict | None = None, facet: str = "metric", x: str = "layer", color: str = "set",
                  cols: int = 4, facet_order: list | None = None, height: int = 650) -> go.Figure:
    """One panel per `facet` value of box plots drawn from precomputed statistics (`boxes`: columns
    `facet`, `x`, `color`, `q1`, `median`, `q3`, `lo`, `hi`, as `properties.per_layer_boxes` gives),
    so the boxes rest on every value; `ranges` (facet value -> (low, high)) only clips each panel's
    y-axis."""
    from plotly.subplots import make_subplots

    order = facet_order or list(dict.fromkeys(boxes[facet]))
    rows = -(-len(order) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[str(f) for f in order], horizontal_spacing=0.06,
                        vertical_spacing=0.12)
    groups = list(dict.fromkeys(boxes[color]))
    for i, f in enumerate(order):
        r, c = divmod(i, cols)
        part = boxes[boxes[facet] == f]
        for j, g in enumerate(groups):
            b = part[part[color] == g]
            fig.add_trace(go.Box(x=list(b[x]), q1=list(b.q1), median=list(b["median"]), q3=list(b.q3),
                                 lowerfence=list(b.lo), upperfence=list(b.hi), name=str(g), legendgroup=str(g),
                                 showlegend=i == 0, marker_color=MEMBER_COLORS[j % len(MEMBER_COLORS)]),
                          row=r + 1, col=c + 1)
        if ranges and f in ranges:
            lo, hi = ranges[f]
            pad = 0.02 * (hi - lo) if hi > lo else 1.0
            fig.update_yaxes(range=[lo - pad, hi + pad], row=r + 1, col=c + 1)
    fig.update_layout(boxmode="group", height=height)
    return fig


def baseline_vs_prediction(points, extra=None, title: str = "Rotation baseline: measured vs predicted from the spectrum") -> go.Figure:
    """Measured baseline median against the prediction from each layer's covariance spectrum
    (`helpers.correlations.dimensionality.layer_dimensionality` rows: `label`, `member`, `layer`,
    `predicted_median`, `measured_median`, `pr_corr`, `d`). `extra`: more rows of the same shape
    (e.g. the sweep's configurations), drawn the same way with their own labels."""
    import pandas as pd
    import plotly.express as px

    df = pd.concat([points] + ([extra] if extra is not None and len(extra) else []), ignore_index=True)
    df = df.assign(layer=df.layer.astype(str))
    fig = px.scatter(df, x="predicted_median", y="measured_median", color="label", symbol="layer",
                     hover_data=[c for c in ("member", "pr_corr", "pr_cov", "d", "n_tokens") if c in df])
    lo = float(min(df.predicted_median.min(), df.measured_median.min(), 0.0))
    fig.add_scatter(x=[lo, 1], y=[lo, 1], mode="lines", line=dict(dash="dot", color="gray"), name="measured = predicted")
    return style(fig, title, x="predicted median max correlation with the layer's rotated units",
                 y="measured median baseline (same layer)", legend="model · layer")


# ---- chapter 06: attention (de)activation neurons -------------------------------------------


def score_histograms(hists: dict, title: str, log_y: bool = True) -> go.Figure:
    """Fig 8a: step histograms of h_n over all (neuron, later head) pairs against the random-vector
    baseline. `hists` {model label: `attention.score_histogram` table (center, neurons, random)}."""
    fig = go.Figure()
    for i, (label, h) in enumerate(hists.items()):
        color = MEMBER_COLORS[i % len(MEMBER_COLORS)]
        fig.add_scatter(x=h.center, y=h.neurons, mode="lines", line=dict(shape="hvh", color=color), name=f"{label}: neurons w_out")
        fig.add_scatter(x=h.center, y=h.random, mode="lines", line=dict(shape="hvh", color=color, dash="dot"),
                        name=f"{label}: random unit vectors")
    if log_y:
        fig.update_yaxes(type="log")
    return style(fig, title, x="heuristic score h_n = w_out·W_Q k_BOS / sqrt(d_head)", y="pairs" + (" (log scale)" if log_y else ""),
                 legend="directions")


def ablation_scatter(records, pairs, pair_ids, title: str, max_points: int = 1500, seed: int = 0) -> go.Figure:
    """Figs 8b,c and 26: per pair (one row each), the neuron's activation against the change of the
    head's BOS attention and the % change of its output norm when the neuron's write is removed
    from the head's query, with the least-squares line and Pearson r over ALL sampled tokens (the
    points drawn are a random subset of at most `max_points`)."""
    import numpy as np
    from plotly.subplots import make_subplots

    pair_ids = list(pair_ids)
    titles = []
    for pid in pair_ids:
        p = pairs.set_index("pair").loc[pid]
        titles += [f"L{int(p.neuron_layer)}.{int(p.neuron)} → L{int(p.head_layer)}.H{int(p['head'])} (h_n {p.score:+.2f}): r {p.r_bos:+.2f}",
                   f"… norm: r {p.r_norm:+.2f}"]
    fig = make_subplots(rows=len(pair_ids), cols=2, subplot_titles=titles, vertical_spacing=0.25 / max(len(pair_ids), 1))
    rng = np.random.default_rng(seed)
    for i, pid in enumerate(pair_ids):
        g = records[records.pair == pid]
        shown = g.iloc[rng.permutation(len(g))[:max_points]] if len(g) > max_points else g
        p = pairs.set_index("pair").loc[pid]
        xs = np.linspace(float(g.act.min()), float(g.act.max()), 2)
        for c, (col, slope, icpt) in enumerate([("d_bos", "slope_bos", None), ("d_norm_pct", "slope_norm", None)]):
            fig.add_scatter(x=shown.act, y=shown[col], mode="markers", marker=dict(size=3, opacity=0.4, color=MEMBER_COLORS[0]),
                            showlegend=False, row=i + 1, col=c + 1)
            b, a = np.polyfit(g.act, g[col], 1) if g.act.std() > 0 else (0.0, float(g[col].mean()))
            fig.add_scatter(x=xs, y=a + b * xs, mode="lines", line=dict(color=COLORS["universal"]), showlegend=False,
                            row=i + 1, col=c + 1)
        fig.update_xaxes(title_text="neuron activation", row=i + 1)
        fig.update_yaxes(title_text="Δ p(BOS) (ablated − clean)", row=i + 1, col=1)
        fig.update_yaxes(title_text="Δ ‖W_O z‖ (%)", row=i + 1, col=2)
    return style(fig, title, height=300 * len(pair_ids) + 100)


def heuristic_vs_effect(summary, title: str) -> go.Figure:
    """Across pairs: the heuristic's prediction h_n · mean activation against the measured mean
    contribution of the neuron to the head's BOS attention (clean − ablated), per model and choice."""
    import plotly.express as px

    fig = px.scatter(summary, x="predicted", y="effect_bos", color="model", symbol="why",
                     hover_data=["neuron_layer", "neuron", "head_layer", "head", "score", "mean_act"])
    fig.add_hline(y=0, line_color="gray", line_dash="dot")
    fig.add_vline(x=0, line_color="gray", line_dash="dot")
    return style(fig, title, x="w_out score × mean activation (predicted BOS-logit shift)",
                 y="mean contribution to p(BOS): clean − ablated", legend="model, pairs", height=480)
def percentile_bands(long, x: str = "layer", value: str = "value", group: str = "percentile", member: str = "member",
                     dashed=None, x_title: str | None = None) -> go.Figure:
    """Fig 6a,b: one line per `group` value (e.g. the 5/10/50/90/95th percentile) of the mean over
    `member`s of `value` against `x`, with the min-max band over members shaded. `dashed`: a second
    long table of the same shape (e.g. the untrained control) drawn as dashed mean lines."""
    fig = go.Figure()
    for i, (g, part) in enumerate(long.groupby(group, sort=True)):
        color = MEMBER_COLORS[i % len(MEMBER_COLORS)]
        agg = part.groupby(x)[value].agg(["mean", "min", "max"]).reset_index()
        fig.add_scatter(x=agg[x], y=agg["max"], mode="lines", line=dict(width=0, color=color), showlegend=False,
                        hoverinfo="skip", legendgroup=str(g))
        fig.add_scatter(x=agg[x], y=agg["min"], mode="lines", line=dict(width=0, color=color), fill="tonexty",
                        opacity=0.25, showlegend=False, hoverinfo="skip", legendgroup=str(g))
        fig.add_scatter(x=agg[x], y=agg["mean"], mode="lines+markers", line=dict(color=color), name=f"{g}th",
                        legendgroup=str(g))
        if dashed is not None:
            d = dashed[dashed[group] == g].groupby(x)[value].mean().reset_index()
            fig.add_scatter(x=d[x], y=d[value], mode="lines", line=dict(color=color, dash="dot"), name=f"{g}th (control)",
                            legendgroup=str(g))
    return fig


def split_quantile_boxes(df, x: str, side: str, title: str, y: str, names: dict | None = None) -> go.Figure:
    """Boxes drawn from precomputed quantiles (`q5`, `q25`, `q50`, `q75`, `q95` columns; whiskers at
    the 5th and 95th percentiles), one per `x` value and `side` value (Fig 24)."""
    fig = go.Figure()
    for i, (s, part) in enumerate(df.groupby(side, sort=True)):
        fig.add_trace(go.Box(x=list(part[x]), q1=list(part.q25), median=list(part.q50), q3=list(part.q75),
                             lowerfence=list(part.q5), upperfence=list(part.q95),
                             name=(names or {}).get(s, str(s)), marker_color=MEMBER_COLORS[i % len(MEMBER_COLORS)]))
    fig.update_layout(boxmode="group")
    return style(fig, title, x=x, y=y, legend=side)
ROLE_COLORS = {"entropy": "#d62728", "anti-entropy": "#1f77b4", "candidate 2": "#ff7f0e", "candidate 3": "#9467bd",
               "random": "#b0b0b0"}
INTERVENTION_METRICS = {"scale": "final normalisation scale", "rr": "reciprocal rank of the true token",
                        "entropy": "next-token entropy (nats)", "loss": "loss (nats)"}


def intervention_curves(curves, nominal, title: str, metrics=("scale", "rr", "entropy", "loss"), mode: str = "total",
                        letters: str = "cdef", height: int = 640) -> go.Figure:
    """Figs 7c-f / 1f: each metric's token mean against the fixed activation (in the paper's grid
    units), one line per neuron coloured by role (random neurons thin grey), the unintervened mean
    as a dashed line. `curves` from `interventions.curves`, `nominal` from `interventions.nominal`."""
    from plotly.subplots import make_subplots

    n = len(metrics)
    cols = 2 if n > 1 else 1
    rows = (n + cols - 1) // cols
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"({letters[i]}) {INTERVENTION_METRICS[m]}" for i, m in enumerate(metrics)])
    c = curves[curves["mode"] == mode]
    shown = set()
    for i, m in enumerate(metrics):
        r, col = i // cols + 1, i % cols + 1
        for (layer, neuron, role), g in c.groupby(["layer", "neuron", "role"]):
            g = g.sort_values("grid")
            first = role not in shown
            shown.add(role)
            fig.add_trace(go.Scatter(x=g.grid, y=g[m], mode="lines+markers" if role != "random" else "lines",
                                     line=dict(color=ROLE_COLORS.get(role, "#333"), width=1 if role == "random" else 2.5),
                                     name=role if role == "random" else f"{role} L{int(layer)}.{int(neuron)}",
                                     legendgroup=role if role == "random" else f"{role}{layer}{neuron}",
                                     showlegend=(i == 0 and (first or role != "random")),
                                     hovertemplate=f"L{int(layer)}.{int(neuron)} ({role})<br>grid %{{x}}<br>{m} %{{y:.4f}}"),
                          row=r, col=col)
        fig.add_hline(y=float(nominal[m]), line_dash="dash", line_color="black", row=r, col=col)
        fig.update_xaxes(title_text="fixed activation (grid units: 6 = 1.5 × its natural-side percentile; "
                                    "< 0: the other sign)", row=r, col=col)
        fig.update_yaxes(title_text=INTERVENTION_METRICS[m], row=r, col=col)
    return style(fig, title, height=height, legend="neuron (dashed: unintervened)")


def total_vs_direct(curves, nominal, title: str, metric: str = "entropy") -> go.Figure:
    """The total effect (solid) and the direct effect with the final scale frozen (dashed) on `metric`
    for every non-random neuron; the gap is the part that goes through the final normalisation."""
    fig = go.Figure()
    c = curves[(curves.role != "random") & curves["mode"].isin(["total", "direct"])]
    for (layer, neuron, role, mode), g in c.groupby(["layer", "neuron", "role", "mode"]):
        g = g.sort_values("grid")
        fig.add_trace(go.Scatter(x=g.grid, y=g[metric], mode="lines+markers", name=f"{role} L{int(layer)}.{int(neuron)} · {mode}",
                                 line=dict(color=ROLE_COLORS.get(role, "#333"), dash="solid" if mode == "total" else "dash")))
    fig.add_hline(y=float(nominal[metric]), line_dash="dot", line_color="black")
    return style(fig, title, x="fixed activation (grid units, natural direction positive)", y=INTERVENTION_METRICS[metric],
                 legend="neuron · effect (dotted: unintervened)")


def show_all(figs) -> None:
    """Show several figures in order (a notebook cell holds no loops)."""
    for fig in figs:
        fig.show()


def l2_histogram(late, marked, title: str) -> go.Figure:
    """Fig 7a: histogram of the L2 penalty of `late` neurons (columns `l2_penalty`), with the neurons of
    `marked` (`layer`, `neuron`, `role`, `l2_penalty`) as vertical lines coloured by role."""
    fig = go.Figure(go.Histogram(x=late.l2_penalty, nbinsx=80, marker_color="#7f7f7f", name="late neurons"))
    for r in marked.itertuples():
        fig.add_vline(x=float(r.l2_penalty), line_color=ROLE_COLORS.get(r.role, "#333"), annotation_text=f"{r.role} L{r.layer}.{r.neuron}",
                      annotation_textangle=-90)
    fig.update_yaxes(type="log")
    return style(fig, title, x="‖w_in‖² + ‖w_out‖²", y="neurons (log)")


def null_fraction_scatter(late, random_fraction: float, title: str) -> go.Figure:
    """Every late neuron's share of ‖w_out‖² in W_U's null space (`null_frac`) against ‖w_out‖
    (`w_out_norm`), coloured by `role`; dotted: a random direction's share."""
    import plotly.express as px

    fig = px.scatter(late, x="w_out_norm", y="null_frac", color="role", opacity=0.7, hover_data=["layer", "neuron"],
                     color_discrete_map={**ROLE_COLORS, "other": "#dddddd"}, log_y=True)
    fig.add_hline(y=random_fraction, line_dash="dot", line_color="gray")
    return style(fig, title, x="‖w_out‖", y="share of ‖w_out‖² in W_U's null space (log)", legend="neuron")


def density_histogram(df, x: str, color: str, facet_col: str | None = None, nbins: int = 120, color_map: dict | None = None,
                      height: int = 380) -> go.Figure:
    """An overlaid probability-density histogram computed here (numpy) and drawn as bars: the page
    carries `nbins` numbers per curve instead of every value (a vocabulary-sized sample per neuron
    would put megabytes of raw data into the book). Bins are shared within a facet."""
    import numpy as np
    import pandas as pd
    import plotly.express as px

    parts = []
    for facet, fd in (df.groupby(facet_col, sort=False) if facet_col else [(None, df)]):
        vals = fd[x].to_numpy(dtype=float)
        edges = np.histogram_bin_edges(vals[np.isfinite(vals)], bins=nbins)
        for key, g in fd.groupby(color, sort=False):
            dens, _ = np.histogram(g[x].to_numpy(dtype=float), bins=edges, density=True)
            parts.append(pd.DataFrame({x: (edges[:-1] + edges[1:]) / 2, "density": dens, color: key,
                                       **({facet_col: facet} if facet_col else {})}))
    out = pd.concat(parts, ignore_index=True)
    fig = px.bar(out, x=x, y="density", color=color, facet_col=facet_col, barmode="overlay", opacity=0.6,
                 color_discrete_map=color_map, height=height)
    fig.update_layout(bargap=0)
    return fig

"""Plotly figure builders: plain numbers in, `go.Figure` out; no tensors, no models.

Every figure sets `uirevision` so that a viewer's zoom and pan survive live updates.
"""

import statistics

import plotly.graph_objects as go
from plotly.subplots import make_subplots

LEFT_COLOR, RIGHT_COLOR = "#636efa", "#ef553b"
HEAT_SCALE = "Viridis"


def _layout(fig: go.Figure, title: str, key: str, height: int = 300) -> go.Figure:
    fig.update_layout(
        title=dict(text=title, font=dict(size=14)),
        height=height,
        uirevision=key,
        margin=dict(l=50, r=20, t=60, b=40),
        template="plotly_white",
        legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="right", x=1),
    )
    return fig


def layer_heatmap(z: list[list[float]], x_title: str, title: str, key: str, **trace) -> go.Figure:
    """A share per layer (rows) and column, on a fixed 0..1 colour scale; trace: Heatmap styling."""
    fig = go.Figure(go.Heatmap(z=z, zmin=0.0, zmax=1.0, **trace))
    fig.update_xaxes(title_text=x_title)
    fig.update_yaxes(title_text="layer", dtick=1)
    return _layout(fig, title, key, height=260)


def activity_heatmap(active: list[list[float]], title: str, key: str) -> go.Figure:
    """Share of FFN neurons active, layers (rows) x generated tokens (columns).

    active[t][l] is token t's share at layer l; both panes use the same colour scale.
    """
    z = [list(col) for col in zip(*active)] if active else [[]]
    hover = "token %{x}, layer %{y}: %{z:.1%} active<extra></extra>"
    return layer_heatmap(
        z, "generated token", title, key, colorscale=HEAT_SCALE, colorbar=dict(title="active"), hovertemplate=hover
    )


def rolling(values: list[float], window: int = 5) -> list[float]:
    """Mean over the last `window` values at each position."""
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


UNSTEADY = 2.0  # a step slower than this many times its side's median is not steady state


def unsteady_steps(times: list[float], factor: float = UNSTEADY) -> list[int]:
    """Indices of the steps that took more than `factor` x the median step: stalls (another
    process on the CPU, a first call), not the model's steady speed."""
    limit = factor * statistics.median(times)
    return [i for i, t in enumerate(times) if t > limit]


def runs_of(indices: list[int]) -> list[tuple[int, int]]:
    """Sorted indices -> (first, last) of each run of consecutive ones."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def speed_figure(series: dict[str, list[float]]) -> go.Figure:
    """Tokens/s over the run for each labelled side (step times in seconds): one trace each, a
    5-step rolling mean of 1 / step time. The headline's median is a dotted line per side, and
    the steps that were not steady state (over UNSTEADY x the side's median step) are shaded in
    the side's colour (layout shapes, so the traces stay one per side)."""
    fig = go.Figure()
    marked = 0
    for (label, times), color in zip(series.items(), (LEFT_COLOR, RIGHT_COLOR)):
        times = [t for t in times if t > 0]
        rates = rolling([1.0 / t for t in times])
        fig.add_trace(
            go.Scatter(y=rates, x=list(range(1, len(rates) + 1)), mode="lines", name=label, line=dict(color=color))
        )
        if not times:
            continue
        fig.add_hline(y=1.0 / statistics.median(times), line=dict(color=color, dash="dot", width=1))
        slow = unsteady_steps(times)
        marked += len(slow)
        for first, last in runs_of(slow):  # step i is drawn at x = i + 1
            fig.add_vrect(x0=first + 0.5, x1=last + 1.5, fillcolor=color, opacity=0.15, line_width=0, layer="below")
    fig.update_xaxes(title_text="generated token")
    fig.update_yaxes(title_text="tokens/s", rangemode="tozero")
    title = "Decoding speed (each step timed alone, after untimed warm-up steps; dotted: median"
    title += f"; shaded: {marked} steps over {UNSTEADY:g}x the median, not steady state)" if marked else ")"
    return _layout(fig, title, "speed")


def memory_figure(
    rss_mb: float, weights_mb: dict[str, float], ffn_read_mb: dict[str, tuple[float, float, float | None]]
) -> go.Figure:
    """Left: process RSS and each side's weights (MB). Right: FFN MB read per token, vs dense
    (for a MoE side: a dense FFN of all its experts) and, for MoE sides, vs a dense MoE.

    weights_mb and ffn_read_mb ((read, dense, dense MoE or None)) are keyed by short side
    names ("left", "right").
    """
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Memory (MB)", "FFN weights read per token (MB)"))
    labels = ["process RSS"] + [f"{side} weights" for side in weights_mb]
    fig.add_trace(
        go.Bar(
            x=labels,
            y=[rss_mb, *weights_mb.values()],
            showlegend=False,
            marker_color=["#7f7f7f", LEFT_COLOR, RIGHT_COLOR][: len(labels)],
        ),
        1,
        1,
    )
    sides = list(ffn_read_mb)
    fig.add_trace(go.Bar(x=sides, y=[ffn_read_mb[s][1] for s in sides], name="dense FFN", marker_color="#c7c7c7"), 1, 2)
    if any(ffn_read_mb[s][2] for s in sides):  # a MoE side: what a dense MoE reads (router + k experts)
        routed = [ffn_read_mb[s][2] or 0.0 for s in sides]
        fig.add_trace(go.Bar(x=sides, y=routed, name="dense MoE", marker_color="#9edae5"), 1, 2)
    fig.add_trace(
        go.Bar(x=sides, y=[ffn_read_mb[s][0] for s in sides], name="actually read", marker_color=RIGHT_COLOR), 1, 2
    )
    fig = _layout(fig, "", "memory")
    fig.update_layout(barmode="group", legend=dict(yanchor="top", y=-0.15, xanchor="right", x=1))
    return fig


def recall_figure(recall: dict[str, list[float]]) -> go.Figure:
    """Mean predictor recall per layer (share of truly active neurons that were computed)."""
    fig = go.Figure()
    for label, values in recall.items():
        fig.add_trace(
            go.Bar(
                x=list(range(len(values))),
                y=values,
                name=label,
                hovertemplate="layer %{x}: recall %{y:.3f}<extra></extra>",
            )
        )
    fig.update_xaxes(title_text="layer", dtick=1)
    fig.update_yaxes(title_text="recall", range=[0, 1.02])
    title = "Predictor recall per layer" if recall else "Predictor recall: no side runs a predictor"
    return _layout(fig, title, "recall")


def firing_figure(firing: list[list[float]], title: str, key: str, blocks: int = 1) -> go.Figure:
    """Firing frequency (share of decode steps) per layer x neuron, neurons sorted hot to cold
    within each layer, or within each of a layer's `blocks` equal runs of neurons (a MoE
    layer's experts, left to right)."""
    size = len(firing[0]) // blocks if firing else 0
    z = [[v for b in range(blocks) for v in sorted(row[b * size : (b + 1) * size], reverse=True)] for row in firing]
    z = z or [[]]
    hover = "layer %{y}, rank %{x}: fires in %{z:.0%} of the decode steps<extra></extra>"
    return layer_heatmap(
        z,
        "neurons, hot to cold",
        title,
        key,
        colorscale="Hot",
        reversescale=True,
        colorbar=dict(title="fires"),
        hovertemplate=hover,
    )


def histogram_figure(hists: dict[str, dict]) -> go.Figure:
    """Gate, up and combined activation histograms (log counts), one trace per side.

    hists[label][kind] = {"centers", "counts", "zeros", "total"}; exact zeros are in the legend.
    """
    kinds = ("gate", "up", "combined")
    fig = make_subplots(rows=1, cols=3, subplot_titles=("gate: W_gate x", "up: W_up x", "combined h"))
    for (label, per_kind), color in zip(hists.items(), (LEFT_COLOR, RIGHT_COLOR)):
        for col, kind in enumerate(kinds, start=1):
            h = per_kind[kind]
            zero_share = h["zeros"] / max(1, h["total"])
            name = f"{label} ({zero_share:.0%} exactly 0)" if kind == "combined" else label
            fig.add_trace(
                go.Scatter(
                    x=h["centers"],
                    y=h["counts"],
                    mode="lines",
                    name=name,
                    line=dict(color=color, shape="hvh"),
                    showlegend=kind == "combined",
                ),
                1,
                col,
            )
    fig.update_yaxes(type="log")
    title = "Activation distributions: the model's own dense forward over this run's tokens"
    fig = _layout(fig, title, "hist", height=340)
    fig.update_layout(legend=dict(yanchor="top", y=-0.15, xanchor="center", x=0.5))
    return fig


def training_figure(steps: list[dict], title: str) -> go.Figure:
    """Sparsity and held-out loss over training tokens, from a training_log.json."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    tokens = [s["tokens"] for s in steps]
    fig.add_trace(
        go.Scatter(x=tokens, y=[s["sparsity"] for s in steps], name="FFN sparsity", line=dict(color=RIGHT_COLOR)),
        secondary_y=False,
    )
    val = [s for s in steps if "val_loss" in s]
    fig.add_trace(
        go.Scatter(
            x=[s["tokens"] for s in val],
            y=[s["val_loss"] for s in val],
            name="held-out loss",
            mode="lines+markers",
            line=dict(color=LEFT_COLOR),
        ),
        secondary_y=True,
    )
    fig.update_xaxes(title_text="training tokens")
    fig.update_yaxes(title_text="sparsity", range=[0, 1], secondary_y=False)
    fig.update_yaxes(title_text="loss", secondary_y=True)
    return _layout(fig, title, "training", height=320)

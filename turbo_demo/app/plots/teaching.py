"""Plot builders of the "Why dReLU" tab: plain numbers in, `go.Figure` out (as plots.py)."""

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from turbo_demo.app.plots.compare import _layout

SWEEP_COLORS = ("#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a")


def sweep_figure(curves: dict[str, tuple[list[float], list[float]]], title: str, key: str, paper=None) -> go.Figure:
    """Perplexity against top-k sparsity, each curve relative to its own perplexity at 0% (log
    axis, so that a 4x blow-up and a 1% rise both read), absolute values on hover; `paper`
    curves (same form) dashed in grey. A curve without a 0% point is drawn relative to its first."""
    fig = go.Figure()
    drawn = [(label, curve, False) for label, curve in curves.items()]
    drawn += [(label, curve, True) for label, curve in (paper or {}).items()]
    for i, (label, (sparsity, ppl), is_paper) in enumerate(drawn):
        base = ppl[0]
        fig.add_trace(
            go.Scatter(
                x=[100 * s for s in sparsity],
                y=[p / base for p in ppl],
                customdata=ppl,
                mode="lines+markers",
                name=label,
                line=dict(dash="dash", color="#7f7f7f" if "dReLU" in label else "#c7c7c7")
                if is_paper
                else dict(color=SWEEP_COLORS[i % len(SWEEP_COLORS)]),
                hovertemplate="%{x:.0f}% pruned: perplexity %{customdata:.2f} (x%{y:.3f})<extra>" + label + "</extra>",
            )
        )
    fig.update_xaxes(title_text="top-k sparsity: share of FFN neurons zeroed per token (%)", range=[-2, 100])
    fig.update_yaxes(title_text="perplexity / perplexity at 0%", type="log")
    return _layout(fig, title, key, height=360)


def plane_figure(plane: dict) -> go.Figure:
    """One panel per FFN variant: h over the (gate, up) plane (white where exactly 0, on one
    colour scale per panel), the measured pairs on top, and in each title the share of exact
    zeros of that variant's h on each side's measured pairs.

    plane = {"axis": [...], "h": {variant: [[h at (axis[g], axis[u])] for each u]},
             "points": {label: (gates, ups)}, "zeros": {variant: {label: share}}}
    """
    names = list(plane["h"])
    titles = []
    for name in names:
        shares = ", ".join(f"{share:.0%}" for share in plane["zeros"][name].values())
        titles.append(f"{name}<br><sub>exact zeros on the run's pairs: {shares or '–'}</sub>")
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=titles, horizontal_spacing=0.06)
    axis = plane["axis"]
    for col, name in enumerate(names, start=1):
        z = plane["h"][name]
        top = max((abs(v) for row in z for v in row), default=1.0) or 1.0
        fig.add_trace(
            go.Heatmap(
                x=axis,
                y=axis,
                z=z,
                zmin=-top,
                zmax=top,
                colorscale="RdBu",
                showscale=False,
                hovertemplate="gate %{x:.2f}, up %{y:.2f}: h = %{z:.3f}<extra></extra>",
            ),
            1,
            col,
        )
        for i, (label, (gates, ups)) in enumerate(plane["points"].items()):
            fig.add_trace(
                go.Scattergl(
                    x=gates,
                    y=ups,
                    mode="markers",
                    name=label,
                    legendgroup=label,
                    showlegend=col == 1,
                    marker=dict(size=3, opacity=0.35, color=("#111111", "#ff7f0e", "#2ca02c")[i % 3]),
                    hoverinfo="skip",
                ),
                1,
                col,
            )
        fig.update_xaxes(title_text="gate: W_gate x", range=[axis[0], axis[-1]], row=1, col=col)
        fig.update_yaxes(range=[axis[0], axis[-1]], row=1, col=col)
    fig.update_yaxes(title_text="up: W_up x", row=1, col=1)
    title = "Why dReLU: h over the (gate, up) plane, the last run's measured pairs on top"
    fig = _layout(fig, title, "plane", height=420)
    fig.update_layout(margin=dict(t=110), legend=dict(yanchor="top", y=-0.2, xanchor="center", x=0.5))
    return fig


MODE_COLORS = {"transformers": "#7f7f7f", "dense": "#636efa", "exact": "#00cc96", "predictor": "#ef553b"}


def speed_limit_figure(limits: dict, paper: dict[str, float], paper_sparsity: float) -> go.Figure:
    """FFN time per token against sparsity, one panel per shape: each mode measured (solid) and
    its bandwidth limit, bytes / measured bandwidth (dashed, same colour), on a log axis. On the
    first panel, the paper's end-to-end speed-ups over dense drawn as times from our dense
    FFN's at the paper's sparsity (stars).

    limits = paper.speed_limits(): {"gbps": float, "shapes": {shape: {mode: {"sparsity",
    "ms", "limit_ms"}}}}; paper = {machine: speed-up}."""
    shapes = list(limits.get("shapes", {}))
    if not shapes:
        return _layout(go.Figure(), "No bench.json: run `python -m turbo_demo bench --json`", "limits")
    fig = make_subplots(rows=1, cols=len(shapes), subplot_titles=[f"FFN {s} (hidden x intermediate)" for s in shapes])
    for col, shape in enumerate(shapes, start=1):
        for mode, curve in limits["shapes"][shape].items():
            x = [100 * s for s in curve["sparsity"]]
            color, first = MODE_COLORS.get(mode, "#000000"), col == 1
            lines = [("ms", "measured", "lines+markers", None)]
            if mode != "transformers":  # its limit is dense's: drawn once
                lines.append(("limit_ms", "bandwidth limit", "lines", "dash"))
            for key, what, style, dash in lines:
                fig.add_trace(
                    go.Scatter(
                        x=x,
                        y=curve[key],
                        name=f"{mode}: {what}",
                        legendgroup=mode,
                        showlegend=first,
                        mode=style,
                        line=dict(color=color, dash=dash),
                    ),
                    1,
                    col,
                )
        dense = limits["shapes"][shape].get("dense")
        if col == 1 and dense and paper:
            at = min(range(len(dense["sparsity"])), key=lambda i: abs(dense["sparsity"][i] - paper_sparsity))
            fig.add_trace(
                go.Scatter(
                    x=[100 * paper_sparsity] * len(paper),
                    y=[dense["ms"][at] / v for v in paper.values()],
                    text=[f"paper, {m}: {v:.2f}x" for m, v in paper.items()],
                    name="paper: its end-to-end speed-up over dense, from our dense time",
                    mode="markers",
                    marker=dict(symbol="star", size=12, color="#111111"),
                    hovertemplate="%{text}<extra></extra>",
                ),
                1,
                col,
            )
        fig.update_xaxes(title_text="FFN sparsity (%)", row=1, col=col)
        fig.update_yaxes(type="log", row=1, col=col)
    fig.update_yaxes(title_text="ms per token and layer", row=1, col=1)
    title = f"FFN time against the bandwidth limit (bytes read / {limits['gbps']:.1f} GB/s measured)"
    fig = _layout(fig, title, "limits", height=420)
    fig.update_layout(legend=dict(orientation="h", xanchor="left", x=0, yanchor="top", y=-0.2), margin=dict(b=140))
    return fig

"""Plot builder of the MoE routing view: plain numbers in, `go.Figure` out (as plots.py)."""

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from turbo_demo.app.plots.compare import _layout


def routing_figure(sides: dict[str, dict]) -> go.Figure:
    """Per MoE side two panels of layers x experts: the current token's routing weights (0 where
    an expert was not chosen) and, over the run, the share of decode steps in which each expert
    was chosen (top-k of E: the shares of a layer add up to k).

    sides = {label: {"now": [[weight per expert] per layer], "share": [[share] per layer], "top_k": k}}"""
    panels = ("this token's routing weights", "chosen, share of steps")
    titles = [f"{label}: {what}" for label in sides for what in panels]
    fig = make_subplots(rows=1, cols=2 * len(sides) or 1, subplot_titles=titles, horizontal_spacing=0.06)
    for i, side in enumerate(sides.values()):
        for j, (z, scale, hover) in enumerate(
            (
                (side["now"], "Blues", "layer %{y}, expert %{x}: weight %{z:.2f}<extra></extra>"),
                (side["share"], "Oranges", "layer %{y}, expert %{x}: chosen in %{z:.0%} of the steps<extra></extra>"),
            )
        ):
            col = 2 * i + j + 1
            fig.add_trace(
                go.Heatmap(z=z, zmin=0.0, zmax=1.0, colorscale=scale, showscale=False, hovertemplate=hover), 1, col
            )
            fig.update_xaxes(title_text="expert", dtick=1, row=1, col=col)
            fig.update_yaxes(title_text="layer" if col == 1 else None, dtick=1, row=1, col=col)
    top_k = ", ".join(f"top-{side['top_k']}" for side in sides.values())
    return _layout(fig, f"Routing: which experts each layer chose ({top_k})", "routing", height=300)

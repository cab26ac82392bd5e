"""Plot builder of the token inspector: plain codes in, `go.Figure` out (as plots.py)."""

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from turbo_demo.app.plots.compare import _layout
from turbo_demo.app.views.inspector import grid
from turbo_demo.runtime.stats import FIRED, NEURON_CODES

# one colour per code (stats.NEURON_CODES): not fired, fired, computed with h = 0, missed
CODE_COLORS = ("#eeeeee", "#1f4e9c", "#ff9f1c", "#d62728")
# a stepwise scale over z in 0..3, so that each code gets its own colour
SCALE = [[edge, color] for i, color in enumerate(CODE_COLORS) for edge in (i / 4, (i + 1) / 4)]
LEGEND = {  # what each code means, for modes that choose their neurons
    "not fired": "not fired",
    "fired": "fired (for predictor / threshold: a true positive)",
    "computed, h = 0": "computed, h = 0 (a false positive)",
    "missed": "missed: active in the dense FFN, not computed",
}


def neuron_maps_figure(panes: list[dict], step: int) -> go.Figure:
    """Every layer's neurons at one generated position, one column per pane, one row per
    layer: each neuron a cell of a near-square grid (neuron i at row i // cols, column
    i % cols), coloured by its code. panes: inspector.maps_at's dicts (label, mode, token,
    sparsity, codes (layers, neurons) or None)."""
    shown = [p for p in panes if p["codes"]]
    layers = max((len(p["codes"]) for p in shown), default=0)
    if not layers:
        return _layout(go.Figure(), f"Token {step + 1}: no neuron map kept for it", "neuron-maps", height=200)
    # numpy arrays: Plotly validates nested lists element by element, which cost ~0.2 s a
    # figure at the embedded models' size, at every live update of the talk layout
    codes = [np.array(p["codes"], dtype=float) for p in shown]  # (layers, neurons) per pane
    titles = [
        f"{p['label']} · layer {layer}: {int((c[layer] == FIRED).sum()) if layer < len(c) else 0} fired"
        for layer in range(layers)
        for p, c in zip(shown, codes)
    ]
    fig = make_subplots(
        rows=layers, cols=len(shown), subplot_titles=titles, horizontal_spacing=0.04, vertical_spacing=0.3 / layers
    )
    for col, pane in enumerate(codes, start=1):
        for layer, row in enumerate(pane, start=1):
            cells = np.array(grid(row.tolist()), dtype=float)  # the padding (None) becomes NaN
            ids = np.arange(cells.size).reshape(cells.shape)  # the padding's are never shown (hoverongaps)
            heat = go.Heatmap(
                z=cells,
                customdata=ids,
                zmin=0,
                zmax=3,
                colorscale=SCALE,
                showscale=False,
                xgap=1,
                ygap=1,
                hoverongaps=False,
                hovertemplate="neuron %{customdata}<extra></extra>",
            )
            fig.add_trace(heat, layer, col)
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False, autorange="reversed")
    used = set(np.unique(np.concatenate([c.ravel() for c in codes])).astype(int))
    for code, (name, color) in enumerate(zip(NEURON_CODES, CODE_COLORS)):
        if code in used:  # a legend entry per code that occurs
            marker = dict(color=color, size=10, symbol="square")
            fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", marker=marker, name=LEGEND[name]))
    tokens = " vs ".join(f"{p['label']}: {p['token']!r} ({fmt(p['sparsity'])} sparse)" for p in panes)
    fig = _layout(fig, f"Token {step + 1}: {tokens}", "neuron-maps", height=140 + 190 * layers)
    # below the maps, anchored by its own top-left corner (a legend above them, anchored
    # "auto", made Plotly widen the left margin to half the figure)
    fig.update_layout(legend=dict(orientation="h", xanchor="left", x=0, yanchor="top", y=-0.02))
    return fig


def fmt(share: float | None) -> str:
    return "–" if share is None else f"{share:.0%}"

"""The token inspector's tab (a page module: it imports gradio). Its data comes from
inspector.py, its figure from plots_inspector.py; `inspector_tab` is called inside the page's
Blocks and returns `show(left, right, state)`, the final update of a run."""

from collections.abc import Callable

import gradio as gr

from turbo_demo.app.engine.compare import SideRecord
from turbo_demo.app.engine.public import MAX_NEW_TOKENS
from turbo_demo.app.plots import inspector as plots_inspector
from turbo_demo.app.ui.texts import INSPECT
from turbo_demo.app.views import inspector


def maps_figure(state, step):
    """The maps of the session's last run at the 1-based position `step` (None before any run)."""
    kept = (state or {}).get("inspect")
    if not kept:
        return None
    position = max(0, min(int(step or 1), inspector.steps_of(kept)) - 1)
    return plots_inspector.neuron_maps_figure(inspector.maps_at(kept, position), position)


def inspector_tab(session: gr.State) -> tuple[Callable[[SideRecord, SideRecord, dict], dict], list]:
    """The tab's widgets and events; returns show(left, right, state) -> {component: value},
    which keeps the run in the session's state, and the components it updates."""
    with gr.Tab("Inspect tokens"):
        gr.Markdown(INSPECT)
        with gr.Row():
            left = gr.HighlightedText(label="Left", elem_id="left-tokens", show_legend=False)
            right = gr.HighlightedText(label="Right", elem_id="right-tokens", show_legend=False)
        step = gr.Slider(1, MAX_NEW_TOKENS, value=1, step=1, label="Token", elem_id="inspect-step")
        maps = gr.Plot(label="Neuron maps at this token", elem_id="neuron-maps")

    def on_select(state, evt: gr.SelectData):
        position = (evt.index if isinstance(evt.index, int) else evt.index[0]) + 1
        return position, maps_figure(state, position)

    for pane in (left, right):
        pane.select(on_select, [session], [step, maps], api_visibility="private")
    step.release(maps_figure, [session, step], [maps], api_visibility="private")

    def show(left_rec: SideRecord, right_rec: SideRecord, state: dict) -> dict:
        kept = state["inspect"] = inspector.keep(left_rec, right_rec)
        steps = max(2, inspector.steps_of(kept))  # a slider needs min < max
        return {
            left: inspector.token_spans(left_rec),
            right: inspector.token_spans(right_rec),
            step: gr.Slider(1, steps, value=1, step=1),
            maps: maps_figure(state, 1),
        }

    return show, [left, right, step, maps]

"""The token inspector's tab. Its data comes from views/inspector.py, its figure from
plots/inspector.py; `inspector_tab` builds it inside the page's Blocks and `show_inspect` is
its part of a run's final update."""

from dataclasses import dataclass

import gradio as gr

from turbo_demo.app.engine.public import MAX_NEW_TOKENS
from turbo_demo.app.engine.sides import SideSnapshot
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


@dataclass(frozen=True)
class InspectorTab:
    left: gr.HighlightedText
    right: gr.HighlightedText
    step: gr.Slider
    maps: gr.Plot

    @property
    def outputs(self) -> list:
        return [self.left, self.right, self.step, self.maps]


def on_select(state, evt: gr.SelectData):
    """A token clicked: the slider moves to it and the maps show its position."""
    position = (evt.index if isinstance(evt.index, int) else evt.index[0]) + 1
    return position, maps_figure(state, position)


def inspector_tab(session: gr.State) -> InspectorTab:
    """The tab's widgets and events (selecting a token, moving the slider)."""
    with gr.Tab("Inspect tokens"):
        gr.Markdown(INSPECT)
        with gr.Row():
            left = gr.HighlightedText(label="Left", elem_id="left-tokens", show_legend=False)
            right = gr.HighlightedText(label="Right", elem_id="right-tokens", show_legend=False)
        step = gr.Slider(1, MAX_NEW_TOKENS, value=1, step=1, label="Token", elem_id="inspect-step")
        maps = gr.Plot(label="Neuron maps at this token", elem_id="neuron-maps")
    for pane in (left, right):
        pane.select(on_select, [session], [step, maps], api_visibility="private")
    step.release(maps_figure, [session, step], [maps], api_visibility="private")
    return InspectorTab(left, right, step, maps)


def show_inspect(tab: InspectorTab, left_rec: SideSnapshot, right_rec: SideSnapshot, state: dict) -> dict:
    """A finished run on the tab; the run's maps are kept in the session's state for the slider."""
    kept = state["inspect"] = inspector.keep(left_rec, right_rec)
    steps = max(2, inspector.steps_of(kept))  # a slider needs min < max
    return {
        tab.left: inspector.token_spans(left_rec),
        tab.right: inspector.token_spans(right_rec),
        tab.step: gr.Slider(1, steps, value=1, step=1),
        tab.maps: maps_figure(state, 1),
    }

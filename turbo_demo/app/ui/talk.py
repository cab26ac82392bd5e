"""The talk layout (a page module: it imports gradio): for a projector, the two outputs large,
one big tokens/s and sparsity figure per side, and the live neuron maps of the latest token; no
settings. The page opens on it with `?view=talk`. `talk_tab` builds it inside the page's Tabs;
`show_talk` is its update for a run as it is now."""

import html
from dataclasses import dataclass

import gradio as gr

from turbo_demo.app.engine.sides import SideSnapshot
from turbo_demo.app.plots import inspector as plots_inspector
from turbo_demo.app.views import compare as views
from turbo_demo.app.views import inspector

TALK_TAB = "talk"


def big_numbers(rec: SideSnapshot) -> str:
    """One side's headline as large HTML: its label, tokens/s (median step) and FFN sparsity."""
    if rec.error:
        return f"<div style='font-size:1.4em'>⚠️ {html.escape(rec.error)}</div>"
    speed = f"{rec.tokens_per_s:,.0f} tok/s" if rec.steps else "–"
    sparsity = f"{views.fmt_share(rec.mean_sparsity)} of FFN neurons idle" if rec.steps else ""
    return (
        f"<div style='font-size:1.3em;opacity:0.8'>{html.escape(views.side_label(rec))}</div>"
        f"<div style='font-size:3.2em;font-weight:700;line-height:1.1'>{speed}</div>"
        f"<div style='font-size:1.8em'>{sparsity}</div>"
    )


def big_text(rec: SideSnapshot) -> str:
    """One side's output as large monospace HTML (escaped; line breaks kept)."""
    style = "font-size:1.5em;font-family:monospace;white-space:pre-wrap;min-height:8em"
    return f"<div style='{style}'>{html.escape(rec.text)}</div>"


def live_maps(left: SideSnapshot, right: SideSnapshot):
    """Both sides' neuron maps at the latest position either has reached (None before a token)."""
    kept = inspector.keep(left, right)
    steps = inspector.steps_of(kept)
    if not steps:
        return None
    return plots_inspector.neuron_maps_figure(inspector.maps_at(kept, steps - 1), steps - 1)


@dataclass(frozen=True)
class TalkTab:
    generate: gr.Button  # the page binds the tab's buttons as its own Generate and Stop
    stop: gr.Button
    panes: tuple  # per side: (numbers, text) HTML
    maps: gr.Plot

    @property
    def outputs(self) -> list:
        return [c for pane in self.panes for c in pane] + [self.maps]


def talk_tab() -> TalkTab:
    with gr.Tab("Talk", id=TALK_TAB):
        with gr.Row():
            generate = gr.Button("Generate", variant="primary", elem_id="talk-generate")
            stop = gr.Button("Stop", variant="stop", elem_id="talk-stop")
        panes = []
        with gr.Row():
            for side in ("left", "right"):
                with gr.Column():
                    panes.append((gr.HTML(elem_id=f"talk-{side}-numbers"), gr.HTML(elem_id=f"talk-{side}-text")))
        maps = gr.Plot(label="Live: every layer's neurons at the latest token", elem_id="talk-maps")
    return TalkTab(generate, stop, tuple(panes), maps)


def show_talk(tab: TalkTab, left: SideSnapshot, right: SideSnapshot) -> dict:
    """The run so far on the talk layout: each side's big numbers and text, the live maps."""
    shown = {tab.maps: live_maps(left, right)}
    for (numbers, text), rec in zip(tab.panes, (left, right)):
        shown |= {numbers: big_numbers(rec), text: big_text(rec)}
    return shown

"""The "Why dReLU" tab's widgets and events (a page module: it imports gradio). The data comes
from teaching.py, the figures from plots_teaching.py; `teaching_tab` is called inside the
page's Blocks, with the Compare tab's prompt box and the session's state; `paper_tab` after it."""

import gradio as gr

from turbo_demo import paper_figures
from turbo_demo.app.engine.catalog import ModelStore
from turbo_demo.app.plots import teaching as plots_teaching
from turbo_demo.app.ui.texts import LIMITS, PAPER, WHY_DRELU, WHY_DRELU_PLANE, WHY_DRELU_TEXT
from turbo_demo.app.views import paper, teaching
from turbo_demo.errors import UserError
from turbo_demo.offline.evaluate import TEXT_SWEEP_TOKENS

MAX_TEXT_CHARS = 20_000  # read before tokenizing; the sweep scores TEXT_SWEEP_TOKENS at most


def shipped_figure():
    curves = teaching.shipped_sweeps()
    if not curves:
        return None
    title = "Top-k sparsity vs perplexity, held-out split (eval.json)"
    return plots_teaching.sweep_figure(curves, title, "sweep", teaching.PAPER_SWEEP)


def teaching_tab(store: ModelStore, session: gr.State, prompt: gr.Textbox) -> None:
    with gr.Tab("Why dReLU"):
        gr.Markdown(WHY_DRELU)
        gr.Plot(value=shipped_figure(), label="Top-k sweep", elem_id="sweep")
        gr.Markdown(WHY_DRELU_TEXT.format(tokens=TEXT_SWEEP_TOKENS))
        sweep_button = gr.Button("Sweep the prompt's text", elem_id="sweep-text")
        sweep_note = gr.Markdown()
        sweep_plot = gr.Plot(label="Top-k sweep of the prompt", elem_id="sweep-prompt")
        gr.Markdown(WHY_DRELU_PLANE)
        plane_button = gr.Button("Draw the last run's (gate, up) pairs", elem_id="plane-draw")
        plane_note = gr.Markdown()
        plane_plot = gr.Plot(
            value=plots_teaching.plane_figure(teaching.plane({})), label="(gate, up) plane", elem_id="plane"
        )

    def on_sweep(text):
        try:
            curves, scored = teaching.text_sweeps(store, (text or "")[:MAX_TEXT_CHARS])
        except UserError as exc:
            return f"⚠️ {exc}", None
        title = f"Top-k sparsity vs perplexity on the prompt ({scored} tokens scored)"
        return f"Scored {scored} tokens of the prompt.", plots_teaching.sweep_figure(curves, title, "sweep-prompt")

    def on_plane(state):
        last = (state or {}).get("last")
        if not last:
            return (
                "_Generate on the Compare tab first (on float weights): the pairs come from the last run._",
                gr.skip(),
            )
        try:
            points = teaching.run_pairs(store, last)
        except UserError as exc:
            return f"⚠️ {exc}", gr.skip()
        counts = ", ".join(f"{label}: {len(g):,} pairs" for label, (g, _) in points.items())
        return f"Measured: {counts}.", plots_teaching.plane_figure(teaching.plane(points))

    sweep_button.click(on_sweep, [prompt], [sweep_note, sweep_plot], api_visibility="private")
    plane_button.click(on_plane, [session], [plane_note, plane_plot], api_visibility="private")


def paper_tab() -> None:
    """The paper's figures beside ours, and the FFN speed against its bandwidth limit."""
    with gr.Tab("Paper vs ours"):
        gr.Markdown(PAPER)
        gr.Markdown(paper.paper_table(), elem_id="paper-table")
        gr.Markdown(LIMITS)
        figure = plots_teaching.speed_limit_figure(paper.speed_limits(), paper_figures.SPEEDUPS, paper_figures.SPARSITY)
        gr.Plot(value=figure, label="FFN time vs the bandwidth limit", elem_id="limits")

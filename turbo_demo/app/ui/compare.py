"""The Compare tab: its components as two dataclasses (one pane per side, and the tab), built
by plain functions, and the mapping from a CompareView to them (show_compare). page.py wires
the handlers."""

from dataclasses import dataclass, replace

import gradio as gr

from turbo_demo.app.engine.compare import MAX_SPARSITY, Settings
from turbo_demo.app.engine.prompts import EXAMPLES
from turbo_demo.app.engine.public import MAX_NEW_TOKENS, Policy
from turbo_demo.app.engine.sides import SideRequest
from turbo_demo.app.ui.menus import AS_STORED, QUANT_CHOICES, mode_choices, mode_help, quant_of, settled_mode
from turbo_demo.app.views.compare import CompareView

LOCAL_MODEL_INFO = "an embedded model, a local HF model directory, or a hub id"


@dataclass(frozen=True)
class SidePane:
    """One side's menus and output; default_mode is the mode the pane prefers where offered."""

    model: gr.Dropdown
    mode: gr.Dropdown
    quant: gr.Dropdown
    status: gr.Markdown
    text: gr.Textbox
    default_mode: str


@dataclass(frozen=True)
class CompareTab:
    prompt: gr.Textbox
    generate: gr.Button
    stop: gr.Button
    max_new: gr.Slider
    temperature: gr.Slider
    top_p: gr.Slider
    seed: gr.Number
    chat: gr.Checkbox
    system: gr.Textbox
    sparsity: gr.Slider
    left: SidePane
    right: SidePane
    headline: gr.Markdown
    run_status: gr.Markdown
    download: gr.DownloadButton
    share: gr.Markdown
    left_prompt: gr.Textbox
    right_prompt: gr.Textbox
    heat_left: gr.Plot
    heat_right: gr.Plot
    speed: gr.Plot
    memory: gr.Plot
    recall: gr.Plot
    routing: gr.Plot


def side_pane(side: str, default: tuple[str, str], names: list[str], policy: Policy) -> SidePane:
    """A side's column: model, mode and weights menus, the mode's help, status line and output."""
    default_model, default_mode = default
    model = gr.Dropdown(
        names,
        value=default_model if default_model in names else None,
        allow_custom_value=not policy.public,
        label=f"{side.title()} model",
        elem_id=f"{side}-model",
        info="the models this app offers"
        if policy.public
        else "an embedded model, a local HF model directory, or a hub id",
    )
    modes, error = mode_choices(model.value, policy.allowed) if model.value else ([("dense", "dense")], "")
    start = settled_mode(modes, default_mode, default_mode)
    # custom values: a Generate racing a model change sends the old mode (settled_mode)
    mode = gr.Dropdown(modes, value=start, label="Backend mode", elem_id=f"{side}-mode", allow_custom_value=True)
    quant = gr.Dropdown(QUANT_CHOICES, value=AS_STORED, label="Weights", elem_id=f"{side}-quant")
    explain = gr.Markdown(mode_help(start))
    mode.change(mode_help, [mode], [explain], queue=False, api_visibility="private")
    status = gr.Markdown(error, elem_id=f"{side}-status")
    text = gr.Textbox(label="Output", lines=8, interactive=False, elem_id=f"{side}-text")
    return SidePane(model, mode, quant, status, text, default_mode)


def settings_rows() -> tuple:
    """The generation settings: (max_new, temperature, top_p, seed, chat, system, sparsity)."""
    with gr.Row():
        max_new = gr.Slider(1, MAX_NEW_TOKENS, value=64, step=1, label="Max new tokens")
        temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature (0 = greedy)")
        top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="Top-p")
        seed = gr.Number(value=0, precision=0, label="Seed")
    with gr.Row():
        chat = gr.Checkbox(
            value=True, label="Chat format", info="the prompt as the user's turn (models with a template)"
        )
        system = gr.Textbox(label="System prompt (chat format)", lines=1, scale=2)
        sparsity = gr.Slider(
            0.0,
            MAX_SPARSITY,
            value=0.5,
            step=0.05,
            label="Threshold mode: target sparsity",
            info="per-layer thresholds calibrated on a few hundred tokens (TEAL / CATS)",
        )
    return max_new, temperature, top_p, seed, chat, system, sparsity


def compare_tab(names: list[str], policy: Policy, defaults: tuple) -> CompareTab:
    """The tab's components, laid out in the current gr.Tab; defaults: the (model, mode) of each side."""
    with gr.Row():
        prompt = gr.Textbox(label="Prompt", lines=4, value=EXAMPLES[0], scale=4)
        with gr.Column(scale=1, min_width=160):
            generate = gr.Button("Generate", variant="primary", elem_id="generate")
            stop = gr.Button("Stop", variant="stop", elem_id="stop")
    gr.Examples(EXAMPLES, inputs=[prompt], label="Examples that suit the embedded models")
    with gr.Accordion("Generation settings", open=False):
        settings = settings_rows()
    with gr.Row():
        panes = []
        for side, default in zip(("left", "right"), defaults):
            with gr.Column():
                panes.append(side_pane(side, default, names, policy))
    headline = gr.Markdown(elem_id="headline")
    run_status = gr.Markdown()
    with gr.Row():
        download = gr.DownloadButton("Download this run (.zip)", visible=False, elem_id="download")
        share = gr.Markdown(elem_id="share")
    with gr.Accordion("The prompt as each model read it", open=False), gr.Row():
        left_prompt = gr.Textbox(label="Left", lines=3, interactive=False, elem_id="left-prompt")
        right_prompt = gr.Textbox(label="Right", lines=3, interactive=False, elem_id="right-prompt")
    with gr.Row():
        heat_left = gr.Plot(label="Left: active neurons", elem_id="heat-left")
        heat_right = gr.Plot(label="Right: active neurons", elem_id="heat-right")
    with gr.Row():
        speed = gr.Plot(label="Tokens/s")
        memory = gr.Plot(label="Memory")
    recall = gr.Plot(label="Predictor recall")
    routing = gr.Plot(label="MoE routing", visible=False, elem_id="routing")  # MoE sides only
    return CompareTab(
        prompt, generate, stop, *settings, *panes, headline, run_status, download, share,
        left_prompt, right_prompt, heat_left, heat_right, speed, memory, recall, routing,
    )  # fmt: skip


def show_compare(tab: CompareTab, view: CompareView, message: str) -> dict:
    """The view's fields on the tab's components (one place maps them)."""
    return {
        tab.left.text: view.left_text,
        tab.right.text: view.right_text,
        tab.left_prompt: view.left_prompt,
        tab.right_prompt: view.right_prompt,
        tab.left.status: view.left_status,
        tab.right.status: view.right_status,
        tab.headline: view.headline,
        tab.heat_left: view.left_heatmap,
        tab.heat_right: view.right_heatmap,
        tab.speed: view.speed,
        tab.memory: view.memory,
        tab.recall: view.recall,
        tab.routing: gr.Plot(value=view.routing, visible=view.routing is not None),
        tab.run_status: message,
    }


def on_model_change(policy: Policy, name, current_mode, preferred):
    """A model box changed: its pane's modes, the mode the menu settles on, and any error."""
    modes, error = mode_choices(name, policy.allowed)
    return gr.Dropdown(choices=modes, value=settled_mode(modes, current_mode, preferred)), error


def run_inputs(tab: CompareTab) -> set:
    """The components a Generate click reads (Gradio hands their values over as one dict)."""
    panes = {c for pane in (tab.left, tab.right) for c in (pane.model, pane.mode, pane.quant)}
    settings = {tab.max_new, tab.temperature, tab.top_p, tab.seed, tab.chat, tab.system, tab.sparsity}
    return {tab.prompt, *panes, *settings}


def read_run(tab: CompareTab, values: dict, policy: Policy) -> tuple[str, SideRequest, SideRequest, Settings]:
    """A Generate click's (prompt, left, right, settings) from `values` (run_inputs' components):
    each side's mode settled as its menu settles it; a UserError for what the policy refuses."""
    sides = []
    for pane in (tab.left, tab.right):
        name = values[pane.model]
        mode = settled_mode(mode_choices(name, policy.allowed)[0], values[pane.mode], pane.default_mode)
        sides.append(SideRequest(name, mode, quant_of(values[pane.quant])))
    settings = Settings(values[tab.max_new], values[tab.temperature], values[tab.top_p], values[tab.seed])
    settings = replace(settings, chat=values[tab.chat], system=values[tab.system], sparsity=values[tab.sparsity])
    policy.check_prompt(values[tab.prompt])
    settings.checked()
    return values[tab.prompt], sides[0], sides[1], settings

"""The Gradio page: the only module that imports gradio. Handlers only wire widgets to the
plain functions of compare.py, panels.py and profile.py; `build_demo()` does no heavy work."""

import time
from threading import Event

import gradio as gr

from turbo_demo import panels
from turbo_demo.catalog import DEFAULT_LEFT, DEFAULT_RIGHT, ModelStore, embedded_names, model_modes
from turbo_demo.compare import MAX_NEW_TOKENS, Settings, SideRecord, compare_summary, run_compare
from turbo_demo.errors import UserError
from turbo_demo.profile import activation_profile
from turbo_demo.runtime import cpp, kernels

UPDATES_PER_SECOND = 4
EXAMPLES = [
    "def fibonacci(n):\n    ",
    "class Stack:\n    \"\"\"A last-in, first-out stack.\"\"\"\n\n    def __init__(self):\n",
    "import os\n\n\ndef list_files(directory):\n    \"\"\"Return",
    "The module provides functions for",
]
INTRO = """# TurboSparse Studio
Two language models continue your prompt side by side. The right one uses **dReLU**
(`relu(x W_gate) * relu(x W_up)`, from the Turbo Sparse paper): most of its FFN neurons are
exactly zero for each token, so the sparse backend can skip them. Watch which neurons fire, and
what skipping them buys. The embedded models are tiny (trained here on Python's own source
code), so they write Python-flavoured text. The embedded dReLU models were trained with a small L1
penalty on the FFN activation (ProSparse-style) on top of dReLU; see the About tab."""
ABOUT = """### dReLU
SwiGLU FFNs multiply `silu(x W_gate)` by a dense `x W_up`: almost no neuron is ever exactly
zero. dReLU puts a ReLU on both branches, so a neuron contributes only when both are positive;
the paper reports ~90% of neurons at exactly zero per token with no loss of quality.

### Predictors
A zero neuron costs nothing only if we know it is zero *before* reading its weights. Like
PowerInfer and Deja Vu, each layer has a small low-rank MLP that reads the residual stream and
predicts which neurons will fire; we measure its recall (share of truly active neurons it
found) against the dense computation, outside the timed step.

### The sparse backend
Decoding one token is bound by memory bandwidth: every weight is read once per token. The
backend reads only the rows of W_gate, W_up and (neuron-major) W_down of the predicted neurons,
so FFN bytes per token fall with sparsity; in exact mode it computes the gate densely and skips
up/down for the zero neurons, which is lossless.

| | paper (TurboSparse-Mistral-7B / PowerInfer) |
|---|---|
| FFN sparsity | ~90% (Mixtral: 97% per MoE layer) |
| 300M pretraining, WikiText-2 perplexity | dReLU 28.45 vs SwiGLU 28.48 |
| top-k 90% sparsity perplexity | dReLU 29.19 vs SwiGLU 112.36 |
| CPU-only decoding vs llama.cpp dense | 2.08x (i7-12700K, Mistral-7B FP16) |
"""


def prepare_kernels(choice: str, progress) -> None:
    """Switch to the C++ kernels ("auto": when they build here); the first build takes a while."""
    kernels.select_backend(choice, lambda: progress(0, desc=cpp.BUILD_NOTICE))


def build_demo(store: ModelStore | None = None, kernel_backend: str = "auto") -> gr.Blocks:
    """The app. kernel_backend: "auto" (C++ when it builds, else PyTorch), "cpp" or "torch"."""
    store = store or ModelStore()
    names = embedded_names()

    def mode_choices(name):
        try:
            return model_modes(name), ""
        except UserError as exc:
            return ["dense"], f"⚠️ {exc}"

    def on_model_change(name, current_mode, preferred):
        modes, error = mode_choices(name)
        value = current_mode if current_mode in modes else (preferred if preferred in modes else modes[0])
        return gr.Dropdown(choices=modes, value=value), error

    def on_stop(state):
        if state and state.get("stop"):
            state["stop"].set()
        return "Stopping after the current step…"

    def on_generate(prompt, left_model, left_mode, right_model, right_mode, max_new_tokens,
                    temperature, top_p, seed, state, progress=gr.Progress()):
        state = state or {}
        state["stop"] = stop = Event()
        if not prompt or not prompt.strip():
            yield (gr.skip(),) * 10 + ("Type a prompt first (or pick an example).", state) + (gr.skip(),) * 3
            return
        prepare_kernels(kernel_backend, progress)
        for name in {left_model, right_model}:
            if not store.is_loaded(name):
                progress(0, desc=f"Loading {name}…")
                try:
                    store.get(name)
                except UserError:
                    pass  # the side that uses it reports the error in its pane
        left, right = SideRecord(left_model, left_mode), SideRecord(right_model, right_mode)
        settings = Settings(max_new_tokens, temperature, top_p, seed)
        last = 0.0
        for _ in run_compare(store, left, right, prompt, settings, stop):
            if time.monotonic() - last >= 1 / UPDATES_PER_SECOND:
                last = time.monotonic()
                yield compare_outputs(left, right, "Generating…", state) + (gr.skip(),) * 3
        state["last"] = (left, right)
        done = "Stopped." if stop.is_set() else "Done."
        yield compare_outputs(left, right, done, state) + neurons_outputs(store, left, right)

    def compare_api(prompt: str, left_model: str, left_mode: str, right_model: str, right_mode: str,
                    max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0) -> dict:
        """Run both models on the prompt; returns {"left", "right", "speedup"} summaries."""
        left, right = SideRecord(left_model, left_mode), SideRecord(right_model, right_mode)
        prepare_kernels(kernel_backend, lambda *a, **k: None)
        try:
            for _ in run_compare(store, left, right, prompt, Settings(max_new_tokens, temperature, 1.0, seed)):
                pass
        except UserError as exc:
            return {"error": str(exc)}
        return compare_summary(left, right)

    with gr.Blocks(title="TurboSparse Studio") as demo:
        state = gr.State({})
        gr.Markdown(INTRO)
        with gr.Tab("Compare"):
            with gr.Row():
                prompt = gr.Textbox(label="Prompt", lines=4, value=EXAMPLES[0], scale=4)
                with gr.Column(scale=1, min_width=160):
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
            gr.Examples(EXAMPLES, inputs=[prompt], label="Examples that suit the embedded models")
            with gr.Accordion("Generation settings", open=False):
                with gr.Row():
                    max_new = gr.Slider(1, MAX_NEW_TOKENS, value=64, step=1, label="Max new tokens")
                    temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="Top-p")
                    seed = gr.Number(value=0, precision=0, label="Seed")
            with gr.Row():
                widgets = {}
                for side, (default_model, default_mode) in (("left", DEFAULT_LEFT), ("right", DEFAULT_RIGHT)):
                    with gr.Column():
                        model = gr.Dropdown(names, value=default_model if default_model in names else None,
                                            allow_custom_value=True, label=f"{side.title()} model",
                                            elem_id=f"{side}-model",
                                            info="an embedded model, or a local HF model directory")
                        modes, error = mode_choices(model.value) if model.value else (["dense"], "")
                        mode = gr.Dropdown(modes, value=default_mode if default_mode in modes else modes[0],
                                           label="Backend mode")
                        status = gr.Markdown(error, elem_id=f"{side}-status")
                        text = gr.Textbox(label="Output", lines=8, interactive=False, elem_id=f"{side}-text")
                        widgets[side] = (model, mode, status, text, default_mode)
            headline = gr.Markdown(elem_id="headline")
            run_status = gr.Markdown()
            with gr.Row():
                heat_left = gr.Plot(label="Left: active neurons", elem_id="heat-left")
                heat_right = gr.Plot(label="Right: active neurons", elem_id="heat-right")
            with gr.Row():
                speed = gr.Plot(label="Tokens/s")
                memory = gr.Plot(label="Memory")
            recall = gr.Plot(label="Predictor recall")
        with gr.Tab("Neurons"):
            gr.Markdown("The last run's tokens, once more through each model: how often each FFN "
                        "neuron fires (hot to cold, PowerInfer's view) and the distributions of the "
                        "gate, up and combined activations (Turbo Sparse, Figure 3).")
            with gr.Row():
                firing_left = gr.Plot(label="Left: firing frequency")
                firing_right = gr.Plot(label="Right: firing frequency")
            hist = gr.Plot(label="Activation histograms")
        with gr.Tab("About"):
            gr.Markdown(ABOUT)
            gr.Markdown("#### Our embedded models (`python -m turbo_demo eval DIR --json`)\n"
                        + panels.about_numbers())
            gr.Markdown("#### Our decoding speed (`python -m turbo_demo bench --json`)\n" + panels.bench_numbers())
            gr.Plot(value=panels.training_curve(), label="Training curve")

        (lm, lmode, lstatus, ltext, ldefault), (rm, rmode, rstatus, rtext, rdefault) = widgets["left"], widgets["right"]
        lm.change(lambda n, m: on_model_change(n, m, ldefault), [lm, lmode], [lmode, lstatus])
        rm.change(lambda n, m: on_model_change(n, m, rdefault), [rm, rmode], [rmode, rstatus])
        outputs = [ltext, rtext, lstatus, rstatus, headline, heat_left, heat_right, speed, memory,
                   recall, run_status, state, firing_left, firing_right, hist]
        generate.click(on_generate, [prompt, lm, lmode, rm, rmode, max_new, temperature, top_p, seed, state],
                       outputs, concurrency_limit=1, concurrency_id="generate", api_visibility="private")
        stop.click(on_stop, [state], [run_status], queue=False, api_visibility="private")
        gr.api(compare_api, api_name="compare", concurrency_limit=1, concurrency_id="generate")
    return demo


def compare_outputs(left, right, status, state):
    view = panels.compare_view(left, right)
    return (left.text, right.text, view["left_status"], view["right_status"], view["headline"],
            view["left_heatmap"], view["right_heatmap"], view["speed"], view["memory"], view["recall"],
            status, state)


def neurons_outputs(store, left, right):
    profiles = {}
    for rec in (left, right):
        if rec.error or not rec.token_ids:
            continue
        loaded = store.get(rec.model)
        profiles[panels.side_label(rec)] = activation_profile(loaded.model, rec.prompt_ids + rec.token_ids)
    if not profiles:
        return (gr.skip(),) * 3
    figures = panels.neurons_view(profiles)
    return (figures.get("firing_0", gr.skip()), figures.get("firing_1", gr.skip()), figures["hist"])

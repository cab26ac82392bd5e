"""The Gradio page: with its tabs and API in page_*.py, the only modules that import gradio.
Handlers wire widgets to the plain functions of compare.py and views.py, and map each view's
fields to components in one place (`show_compare`, `show_neurons`); `build_demo()` does no
heavy work."""

import time
from dataclasses import replace
from threading import Event

import gradio as gr

from turbo_demo.app.engine.catalog import DEFAULT_LEFT, DEFAULT_RIGHT, ModelStore, embedded_names
from turbo_demo.app.engine.compare import MAX_SPARSITY, Settings, SideRecord, run_compare
from turbo_demo.app.engine.prompts import EXAMPLES
from turbo_demo.app.engine.public import LOCAL, MAX_NEW_TOKENS, Policy, RunQueue, client_of
from turbo_demo.app.ui import api as page_api
from turbo_demo.app.ui import inspector as page_inspector
from turbo_demo.app.ui import talk as page_talk
from turbo_demo.app.ui import teaching as page_teaching
from turbo_demo.app.ui.menus import AS_STORED, QUANT_CHOICES, mode_choices, mode_help, quant_of, settled_mode
from turbo_demo.app.ui.texts import ABOUT, INTRO, NEURONS
from turbo_demo.app.views import compare as views
from turbo_demo.app.views import export, teaching
from turbo_demo.errors import UserError
from turbo_demo.runtime import Kernels

UPDATES_PER_SECOND = 4
# Handlers the Generate event and the API run at once: one computes, the others wait in the
# RunQueue (where Stop reaches them); beyond this, Gradio's own queue holds them.
CONCURRENT_HANDLERS = 16


def build_demo(store: ModelStore | None = None, kernels: Kernels | None = None, policy: Policy = LOCAL) -> gr.Blocks:
    """The app on `kernels` (chosen and built before, at start; default: the PyTorch reference),
    within `policy`'s limits (default: local, any model path)."""
    store = store or ModelStore(allowed=policy.allowed)
    if store.allowed != policy.allowed:  # the store, not the menus, is what keeps other paths out
        raise ValueError(f"the model store's allow-list {store.allowed} is not the policy's {policy.allowed}")
    kernels = kernels or Kernels()
    queue = RunQueue(policy.runs_per_client)
    names = embedded_names() + list(policy.allowed or ())

    # delete_cache: the run archives Gradio serves are removed after an hour
    with gr.Blocks(title="TurboSparse Studio", delete_cache=(600, 3600)) as demo:
        session = gr.State({})  # {"stop": the running generation's Event}
        gr.Markdown(INTRO)
        with gr.Tabs() as tabs:
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
                        chat = gr.Checkbox(
                            value=True,
                            label="Chat format",
                            info="the prompt as the user's turn (models with a template)",
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
                sides = {}
                with gr.Row():
                    for side, (default_model, default_mode) in (("left", DEFAULT_LEFT), ("right", DEFAULT_RIGHT)):
                        with gr.Column():
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
                            modes, error = (
                                mode_choices(model.value, policy.allowed) if model.value else ([("dense", "dense")], "")
                            )
                            start = default_mode if default_mode in [m for _, m in modes] else modes[0][1]
                            # custom values: a Generate racing a model change sends the old mode (settled_mode)
                            mode = gr.Dropdown(
                                modes,
                                value=start,
                                label="Backend mode",
                                elem_id=f"{side}-mode",
                                allow_custom_value=True,
                            )
                            quant = gr.Dropdown(
                                QUANT_CHOICES, value=AS_STORED, label="Weights", elem_id=f"{side}-quant"
                            )
                            explain = gr.Markdown(mode_help(start))
                            mode.change(mode_help, [mode], [explain], queue=False, api_visibility="private")
                            status = gr.Markdown(error, elem_id=f"{side}-status")
                            text = gr.Textbox(label="Output", lines=8, interactive=False, elem_id=f"{side}-text")
                            sides[side] = (model, mode, status, text, default_mode, quant)
                headline = gr.Markdown(elem_id="headline")
                run_status = gr.Markdown()
                with gr.Row():
                    download = gr.DownloadButton("Download this run (.zip)", visible=False, elem_id="download")
                    share = gr.Markdown(elem_id="share")
                with gr.Accordion("The prompt as each model read it", open=False), gr.Row():
                    lprompt = gr.Textbox(label="Left", lines=3, interactive=False, elem_id="left-prompt")
                    rprompt = gr.Textbox(label="Right", lines=3, interactive=False, elem_id="right-prompt")
                with gr.Row():
                    heat_left = gr.Plot(label="Left: active neurons", elem_id="heat-left")
                    heat_right = gr.Plot(label="Right: active neurons", elem_id="heat-right")
                with gr.Row():
                    speed = gr.Plot(label="Tokens/s")
                    memory = gr.Plot(label="Memory")
                recall = gr.Plot(label="Predictor recall")
                routing = gr.Plot(label="MoE routing", visible=False, elem_id="routing")  # MoE sides only
            show_inspect, inspect_outputs = page_inspector.inspector_tab(session)
            live_talk, talk_outputs, talk_buttons = page_talk.talk_tab()
            with gr.Tab("Neurons"):
                gr.Markdown(NEURONS)
                with gr.Row():
                    firing_left = gr.Plot(label="Left: firing frequency")
                    firing_right = gr.Plot(label="Right: firing frequency")
                hist = gr.Plot(label="Activation distributions")
            page_teaching.teaching_tab(store, session, prompt)
            page_teaching.paper_tab()
            with gr.Tab("About"):
                gr.Markdown(ABOUT)
                gr.Markdown(
                    "#### Our embedded models (`python -m turbo_demo eval DIR --json`)\n" + views.about_numbers()
                )
                gr.Markdown("#### Our decoding speed (`python -m turbo_demo bench --json`)\n" + views.bench_numbers())
                gr.Plot(value=views.training_curve(), label="Training curve")

        (lm, lmode, lstatus, ltext, ldefault, lquant), (rm, rmode, rstatus, rtext, rdefault, rquant) = sides.values()

        def show_compare(view: views.CompareView, message: str) -> dict:
            return {
                ltext: view.left_text,
                rtext: view.right_text,
                lprompt: view.left_prompt,
                rprompt: view.right_prompt,
                lstatus: view.left_status,
                rstatus: view.right_status,
                headline: view.headline,
                heat_left: view.left_heatmap,
                heat_right: view.right_heatmap,
                speed: view.speed,
                memory: view.memory,
                recall: view.recall,
                routing: gr.Plot(value=view.routing, visible=view.routing is not None),
                run_status: message,
            }

        def show_neurons(view: views.NeuronsView) -> dict:
            shown = {firing_left: view.left_firing, firing_right: view.right_firing, hist: view.hist}
            return {component: figure for component, figure in shown.items() if figure is not None}

        def on_model_change(name, current_mode, preferred):
            modes, error = mode_choices(name, policy.allowed)
            return gr.Dropdown(choices=modes, value=settled_mode(name, current_mode, preferred, policy.allowed)), error

        def on_stop(state):
            # no output: a "Stopping…" written into the run's status line could reach the page
            # after the run's own final "Stopped." and overwrite it; the run stops within a step
            if state and state.get("stop"):
                state["stop"].set()

        def on_generate(
            prompt,
            left_model,
            left_mode,
            right_model,
            right_mode,
            left_quant,
            right_quant,
            max_new_tokens,
            temperature,
            top_p,
            seed,
            chat_format,
            system_prompt,
            target_sparsity,
            state,
            request: gr.Request,
            progress=gr.Progress(),
        ):
            # the session's own dict, changed in place: a Stop clicked before the first update
            # (while queued, or while a model loads) finds this run's Event
            stop = state["stop"] = Event()
            left_mode = settled_mode(left_model, left_mode, ldefault, policy.allowed)
            right_mode = settled_mode(right_model, right_mode, rdefault, policy.allowed)
            left = SideRecord(left_model, left_mode, quant=quant_of(left_quant))
            right = SideRecord(right_model, right_mode, quant=quant_of(right_quant))
            try:
                settings = Settings(max_new_tokens, temperature, top_p, seed)
                settings = replace(settings, chat=chat_format, system=system_prompt, sparsity=target_sparsity)
                policy.check_prompt(prompt)
                settings.checked()
                ticket = queue.join(client_of(request))
            except UserError as exc:
                yield {run_status: f"⚠️ {exc}"}
                return
            try:
                for ahead in queue.wait(ticket, stop):
                    yield {run_status: f"Queued: {ahead} run{'s' if ahead > 1 else ''} ahead of yours…"}
                if stop.is_set():
                    yield {run_status: "Stopped before it started."}
                    return
                rounds = run_compare(
                    store,
                    left,
                    right,
                    prompt,
                    settings,
                    stop,
                    kernels,
                    on_progress=lambda message: progress(0, desc=message),
                    policy=policy,
                )
                last = 0.0
                for _ in rounds:
                    if time.monotonic() - last >= 1 / UPDATES_PER_SECOND:
                        last = time.monotonic()
                        view = views.compare_view(left, right)
                        yield {**show_compare(view, "Generating…"), **live_talk(left, right)}
            except UserError as exc:
                yield {run_status: f"⚠️ {exc}"}
                return
            finally:
                queue.leave(ticket)
            done = "Stopped." if stop.is_set() else "Done."
            state["last"] = teaching.last_run(left, right)  # the Why dReLU tab's (gate, up) pairs
            neurons = views.neurons_view(left, right, teaching.run_histograms(store, left, right))
            view = views.compare_view(left, right)
            figures = {"heatmap-left": view.left_heatmap, "heatmap-right": view.right_heatmap, "speed": view.speed}
            link = export.share_query(prompt, left.key, right.key, settings, (left.quant, right.quant))
            kept = {
                download: gr.DownloadButton(value=export.write_run_zip(left, right, settings, figures), visible=True),
                share: f"[Link to this run]({link})",
            }
            # one update: with the talk view in a second yield right after this one, the download
            # button stayed hidden in about half of the browser test's runs (Gradio 6)
            yield {
                **show_compare(view, done),
                **show_neurons(neurons),
                **kept,
                **show_inspect(left, right, state),
                **live_talk(left, right),
            }

        for box, menu, line, default in ((lm, lmode, lstatus, ldefault), (rm, rmode, rstatus, rdefault)):
            box.change(
                lambda n, m, d=default: on_model_change(n, m, d), [box, menu], [menu, line], api_visibility="private"
            )
        outputs = [*show_compare(views.compare_view(SideRecord("", ""), SideRecord("", "")), ""), download, share]
        outputs += [firing_left, firing_right, hist, *inspect_outputs, *talk_outputs]

        def on_load(request: gr.Request):
            """A shared link's prompt, models, modes and settings (query parameters), checked."""
            fields = export.settings_from_query(dict(request.query_params), names)
            widgets = {"prompt": prompt, "left": lm, "left_mode": lmode, "right": rm, "right_mode": rmode}
            widgets |= {"left_quant": lquant, "right_quant": rquant}
            widgets |= {"max_new_tokens": max_new, "temperature": temperature, "top_p": top_p, "seed": seed}
            talk = request.query_params.get("view") == page_talk.TALK_TAB  # the talk layout's link
            return {widget: fields.get(k, gr.skip()) for k, widget in widgets.items()} | {
                tabs: gr.Tabs(selected=page_talk.TALK_TAB) if talk else gr.skip()
            }

        linked = [prompt, lm, lmode, rm, rmode, lquant, rquant, max_new, temperature, top_p, seed, tabs]
        demo.load(on_load, None, linked, queue=False, api_visibility="private")
        # on_generate's parameters, in order
        inputs = [prompt, lm, lmode, rm, rmode, lquant, rquant, max_new, temperature, top_p, seed]
        inputs += [chat, system, sparsity, session]
        for button in (generate, talk_buttons[0]):
            button.click(
                on_generate,
                inputs,
                outputs,
                # runs wait in the RunQueue, where Stop reaches them and each client has one place
                concurrency_limit=CONCURRENT_HANDLERS,
                concurrency_id="generate",
                api_visibility="private",
            )
        for button in (stop, talk_buttons[1]):
            button.click(on_stop, [session], None, queue=False, api_visibility="private")
        compare = page_api.compare_endpoint(store, kernels, policy, queue, names)
        gr.api(compare, api_name="compare", concurrency_id="generate")
    return demo

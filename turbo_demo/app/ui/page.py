"""The Gradio page: composes the tabs of ui/ (compare.py's components as dataclasses, then
inspector.py, talk.py, teaching.py) and the API (api.py); ui/ holds the only gradio imports.
Handlers wire widgets to the plain functions of engine/ and views/, and map each view's fields
to components in one place (compare.show_compare, neurons.show_neurons); `build_demo()` does no heavy
work."""

import time
from threading import Event

import gradio as gr

from turbo_demo.app.engine.catalog import DEFAULT_LEFT, DEFAULT_RIGHT, ModelStore, embedded_names
from turbo_demo.app.engine.compare import SideRecord, run_compare
from turbo_demo.app.engine.public import LOCAL, Policy, RunQueue, client_of
from turbo_demo.app.ui import api as page_api
from turbo_demo.app.ui import inspector as page_inspector
from turbo_demo.app.ui import talk as page_talk
from turbo_demo.app.ui import teaching as page_teaching
from turbo_demo.app.ui.compare import compare_tab, on_model_change, read_run, run_inputs, show_compare
from turbo_demo.app.ui.neurons import about_tab, neurons_tab, show_neurons
from turbo_demo.app.ui.texts import INTRO
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
                c = compare_tab(names, policy, (DEFAULT_LEFT, DEFAULT_RIGHT))
            inspect = page_inspector.inspector_tab(session)
            talk = page_talk.talk_tab()
            n = neurons_tab()
            page_teaching.teaching_tab(store, session, c.prompt)
            page_teaching.paper_tab()
            about_tab()

        def on_stop(state):
            # no output: a "Stopping…" written into the run's status line could reach the page
            # after the run's own final "Stopped." and overwrite it; the run stops within a step
            if state and state.get("stop"):
                state["stop"].set()

        def on_generate(values: dict, request: gr.Request, progress=gr.Progress()):
            # the session's own dict, changed in place: a Stop clicked before the first update
            # (while queued, or while a model loads) finds this run's Event
            state = values[session]
            stop = state["stop"] = Event()
            try:
                prompt, left, right, settings = read_run(c, values, policy)
                ticket = queue.join(client_of(request))
            except UserError as exc:
                yield {c.run_status: f"⚠️ {exc}"}
                return
            try:
                for ahead in queue.wait(ticket, stop):
                    yield {c.run_status: f"Queued: {ahead} run{'s' if ahead > 1 else ''} ahead of yours…"}
                if stop.is_set():
                    yield {c.run_status: "Stopped before it started."}
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
                        yield {**show_compare(c, view, "Generating…"), **page_talk.show_talk(talk, left, right)}
            except UserError as exc:
                yield {c.run_status: f"⚠️ {exc}"}
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
                c.download: gr.DownloadButton(value=export.write_run_zip(left, right, settings, figures), visible=True),
                c.share: f"[Link to this run]({link})",
            }
            # one update: with the talk view in a second yield right after this one, the download
            # button stayed hidden in about half of the browser test's runs (Gradio 6)
            yield {
                **show_compare(c, view, done),
                **show_neurons(n, neurons),
                **kept,
                **page_inspector.show_inspect(inspect, left, right, state),
                **page_talk.show_talk(talk, left, right),
            }

        for pane in (c.left, c.right):
            pane.model.change(
                lambda n, m, d=pane.default_mode: on_model_change(policy, n, m, d),
                [pane.model, pane.mode],
                [pane.mode, pane.status],
                api_visibility="private",
            )
        empty = views.compare_view(SideRecord("", ""), SideRecord("", ""))
        outputs = [*show_compare(c, empty, ""), c.download, c.share]
        outputs += [n.firing_left, n.firing_right, n.hist, *inspect.outputs, *talk.outputs]

        def on_load(request: gr.Request):
            """A shared link's prompt, models, modes and settings (query parameters), checked."""
            fields = export.settings_from_query(dict(request.query_params), names)
            widgets = {"prompt": c.prompt, "left": c.left.model, "left_mode": c.left.mode}
            widgets |= {"right": c.right.model, "right_mode": c.right.mode}
            widgets |= {"left_quant": c.left.quant, "right_quant": c.right.quant}
            widgets |= {"max_new_tokens": c.max_new, "temperature": c.temperature, "top_p": c.top_p, "seed": c.seed}
            talk = request.query_params.get("view") == page_talk.TALK_TAB  # the talk layout's link
            return {widget: fields.get(k, gr.skip()) for k, widget in widgets.items()} | {
                tabs: gr.Tabs(selected=page_talk.TALK_TAB) if talk else gr.skip()
            }

        generation = [c.max_new, c.temperature, c.top_p, c.seed]
        panes = [c.left.model, c.left.mode, c.right.model, c.right.mode, c.left.quant, c.right.quant]
        linked = [c.prompt, *panes, *generation, tabs]
        demo.load(on_load, None, linked, queue=False, api_visibility="private")
        inputs = {*run_inputs(c), session}  # on_generate reads them by component
        for button in (c.generate, talk.generate):
            button.click(
                on_generate,
                inputs,
                outputs,
                # runs wait in the RunQueue, where Stop reaches them and each client has one place
                concurrency_limit=CONCURRENT_HANDLERS,
                concurrency_id="generate",
                api_visibility="private",
            )
        for button in (c.stop, talk.stop):
            button.click(on_stop, [session], None, queue=False, api_visibility="private")
        compare = page_api.compare_endpoint(store, kernels, policy, queue, names)
        gr.api(compare, api_name="compare", concurrency_id="generate")
    return demo

"""The Gradio page: build_demo composes the tabs of ui/ (each a dataclass of its components:
compare.py, inspector.py, talk.py, neurons.py, teaching.py) and the API (api.py), then wires
the events to the handlers, which are methods of Page (the engine's objects and the tabs) and
module-level functions: plain functions of plain values, mapping each view's fields to
components in one place (compare.show_compare, neurons.show_neurons). ui/ holds the only gradio
imports; build_demo does no heavy work."""

import time
from dataclasses import dataclass
from threading import Event

import gradio as gr

from turbo_demo.app.engine.catalog import DEFAULT_LEFT, DEFAULT_RIGHT, ModelStore, embedded_names
from turbo_demo.app.engine.compare import Settings, run_compare
from turbo_demo.app.engine.public import LOCAL, Policy, RunQueue, client_of
from turbo_demo.app.engine.sides import SideSnapshot
from turbo_demo.app.ui import api as page_api
from turbo_demo.app.ui import inspector as page_inspector
from turbo_demo.app.ui import talk as page_talk
from turbo_demo.app.ui import teaching as page_teaching
from turbo_demo.app.ui.compare import CompareTab, compare_tab, on_model_change, read_run, run_inputs, show_compare
from turbo_demo.app.ui.neurons import NeuronsTab, about_tab, neurons_tab, show_neurons
from turbo_demo.app.ui.texts import INTRO
from turbo_demo.app.views import compare as views
from turbo_demo.app.views import export, teaching
from turbo_demo.errors import UserError
from turbo_demo.runtime import Kernels

UPDATES_PER_SECOND = 4
# Handlers the Generate event and the API run at once: one computes, the others wait in the
# RunQueue (where Stop reaches them); beyond this, Gradio's own queue holds them.
CONCURRENT_HANDLERS = 16


@dataclass(frozen=True)
class Page:
    """What the page's handlers act on: the engine's objects (chosen once, in build_demo) and
    the tabs' components. The handlers are its methods: plain functions of a page."""

    store: ModelStore
    kernels: Kernels
    policy: Policy
    queue: RunQueue
    names: list[str]
    session: gr.State  # {"stop": the running generation's Event, "inspect": ..., "last": ...}
    tabs: gr.Tabs
    compare: CompareTab
    inspect: page_inspector.InspectorTab
    talk: page_talk.TalkTab
    neurons: NeuronsTab

    @property
    def outputs(self) -> list:
        """Every component a run updates."""
        empty = views.compare_view(SideSnapshot("", ""), SideSnapshot("", ""))
        n = self.neurons
        return [
            *show_compare(self.compare, empty, ""), self.compare.download, self.compare.share,
            n.firing_left, n.firing_right, n.hist, *self.inspect.outputs, *self.talk.outputs,
        ]  # fmt: skip

    def on_generate(self, values: dict, request: gr.Request, progress=gr.Progress()):
        """A run, streamed: queued, then both sides' updates at UPDATES_PER_SECOND, then the
        final update of every tab."""
        c, queue = self.compare, self.queue
        # the session's own dict, changed in place: a Stop clicked before the first update
        # (while queued, or while a model loads) finds this run's Event
        state = values[self.session]
        stop = state["stop"] = Event()
        try:
            prompt, left, right, settings = read_run(c, values, self.policy)
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
            on_progress = lambda message: progress(0, desc=message)
            rounds = run_compare(
                self.store,
                left,
                right,
                prompt,
                settings,
                stop,
                self.kernels,
                on_progress=on_progress,
                policy=self.policy,
            )
            last = 0.0
            # the page shows only what the engine yielded (the latest round's snapshots, values);
            # before the first round, the sides as asked
            sides = SideSnapshot.of(left), SideSnapshot.of(right)
            for sides in rounds:
                if time.monotonic() - last >= 1 / UPDATES_PER_SECOND:
                    last = time.monotonic()
                    view = views.compare_view(*sides)
                    yield {**show_compare(c, view, "Generating…"), **page_talk.show_talk(self.talk, *sides)}
        except UserError as exc:
            yield {c.run_status: f"⚠️ {exc}"}
            return
        finally:
            queue.leave(ticket)
        yield self.finished(prompt, *sides, settings, state, "Stopped." if stop.is_set() else "Done.")

    def finished(
        self, prompt: str, left: SideSnapshot, right: SideSnapshot, settings: Settings, state: dict, done: str
    ) -> dict:
        """A run's final update of every tab, in one update: with the talk view in a second yield
        right after this one, the download button stayed hidden in about half of the browser
        test's runs (Gradio 6)."""
        c = self.compare
        state["last"] = teaching.last_run(left, right)  # the Why dReLU tab's (gate, up) pairs
        neurons = views.neurons_view(left, right, teaching.run_histograms(self.store, left, right))
        view = views.compare_view(left, right)
        figures = {"heatmap-left": view.left_heatmap, "heatmap-right": view.right_heatmap, "speed": view.speed}
        link = export.share_query(prompt, left.key, right.key, settings, (left.quant, right.quant))
        return {
            **show_compare(c, view, done),
            **show_neurons(self.neurons, neurons),
            c.download: gr.DownloadButton(value=export.write_run_zip(left, right, settings, figures), visible=True),
            c.share: f"[Link to this run]({link})",
            **page_inspector.show_inspect(self.inspect, left, right, state),
            **page_talk.show_talk(self.talk, left, right),
        }

    def on_load(self, request: gr.Request):
        """A shared link's prompt, models, modes and settings (query parameters), checked."""
        c = self.compare
        fields = export.settings_from_query(dict(request.query_params), self.names)
        widgets = {"prompt": c.prompt, "left": c.left.model, "left_mode": c.left.mode}
        widgets |= {"right": c.right.model, "right_mode": c.right.mode}
        widgets |= {"left_quant": c.left.quant, "right_quant": c.right.quant}
        widgets |= {"max_new_tokens": c.max_new, "temperature": c.temperature, "top_p": c.top_p, "seed": c.seed}
        talk_view = request.query_params.get("view") == page_talk.TALK_TAB  # the talk layout's link
        return {widget: fields.get(k, gr.skip()) for k, widget in widgets.items()} | {
            self.tabs: gr.Tabs(selected=page_talk.TALK_TAB) if talk_view else gr.skip()
        }


def on_stop(state):
    # no output: a "Stopping…" written into the run's status line could reach the page after
    # the run's own final "Stopped." and overwrite it; the run stops within a step
    if state and state.get("stop"):
        state["stop"].set()


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
        session = gr.State({})
        gr.Markdown(INTRO)
        with gr.Tabs() as tabs:
            with gr.Tab("Compare"):
                c = compare_tab(names, policy, (DEFAULT_LEFT, DEFAULT_RIGHT))
            inspect = page_inspector.inspector_tab(session)
            talk = page_talk.talk_tab()
            neurons = neurons_tab()
            page_teaching.teaching_tab(store, session, c.prompt)
            page_teaching.paper_tab()
            about_tab()
        page = Page(store, kernels, policy, queue, names, session, tabs, c, inspect, talk, neurons)
        for pane in (c.left, c.right):
            pane.model.change(
                lambda name, mode, default=pane.default_mode: on_model_change(policy, name, mode, default),
                [pane.model, pane.mode],
                [pane.mode, pane.status],
                api_visibility="private",
            )
        generation = [c.max_new, c.temperature, c.top_p, c.seed]
        panes = [c.left.model, c.left.mode, c.right.model, c.right.mode, c.left.quant, c.right.quant]
        demo.load(page.on_load, None, [c.prompt, *panes, *generation, tabs], queue=False, api_visibility="private")
        for button in (c.generate, talk.generate):
            button.click(
                page.on_generate,
                {*run_inputs(c), session},  # on_generate reads them by component
                page.outputs,
                # runs wait in the RunQueue, where Stop reaches them and each client has one place
                concurrency_limit=CONCURRENT_HANDLERS,
                concurrency_id="generate",
                api_visibility="private",
            )
        for button in (c.stop, talk.stop):
            button.click(on_stop, [session], None, queue=False, api_visibility="private")
        gr.api(
            page_api.compare_endpoint(store, kernels, policy, queue, names),
            api_name="compare",
            concurrency_id="generate",
        )
    return demo

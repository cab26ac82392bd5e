"""The app's plain functions (side-by-side engine, panels, plots) and the `compare` endpoint."""

import copy
import dataclasses
import socket
from threading import Event

import pytest
from plotly import graph_objects as go

from turbo_demo.app.engine.catalog import ModelStore, resolve
from turbo_demo.app.engine.compare import Settings, fit_prompt, run_compare
from turbo_demo.app.engine.sides import SideRequest, SideSnapshot, compare_summary
from turbo_demo.app.plots import compare as plots
from turbo_demo.app.ui.menus import mode_choices, settled_mode
from turbo_demo.app.views import compare as views
from turbo_demo.choices import modes_for
from turbo_demo.errors import UserError
from turbo_demo.models.activations import activation_histograms

PROMPT = "def add(a, b):\n    return"


def run(store, left, right, prompt=PROMPT, stop=None, on_progress=None, **settings):
    asked, settings = (SideRequest(*left), SideRequest(*right)), Settings(**{"temperature": 0.0, **settings})
    rounds = list(run_compare(store, *asked, prompt, settings, stop, on_progress=on_progress))
    left, right = rounds[-1]
    return left, right, rounds


def test_both_sides_stream_in_turn_and_summarise(tiny_dirs):
    store, heard = ModelStore(), []
    left, right, rounds = run(
        store,
        (str(tiny_dirs["dense"]), "dense"),
        (str(tiny_dirs["drelu"]), "exact"),
        on_progress=heard.append,
        max_new_tokens=6,
    )
    assert heard == [f"Loading {tiny_dirs['dense']}…", f"Loading {tiny_dirs['drelu']}…"]  # once each
    run(
        store,
        (str(tiny_dirs["dense"]), "dense"),
        (str(tiny_dirs["drelu"]), "exact"),
        on_progress=heard.append,
        max_new_tokens=1,
    )
    assert len(heard) == 2
    assert len(left.steps) == len(right.steps) == 6 and len(rounds) >= 6
    assert left.text and right.text and left.engine == right.engine == "lean"
    summary = compare_summary(left, right)
    assert set(summary) == {"left", "right", "speedup"}
    for side in ("left", "right"):
        assert {"text", "tokens", "tokens_per_s", "mean_sparsity", "peak_rss_mb"} <= set(summary[side])
        assert summary[side]["tokens"] == 6 and summary[side]["tokens_per_s"] > 0
        assert summary[side]["dtype"] == "float32"
    assert summary["left"]["mean_sparsity"] == 0.0 and summary["right"]["mean_sparsity"] > 0.3
    # the models are loaded once and shared
    assert store.get(str(tiny_dirs["dense"])) is store.get(str(tiny_dirs["dense"]))


def test_a_broken_side_reports_its_error_while_the_other_runs(tiny_dirs, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    (broken / "model.safetensors").write_bytes(b"x")
    store = ModelStore()
    for bad, needle in (
        (str(tmp_path / "nope"), "not found"),
        (str(broken), str(broken)),
        ("No Such Model", "not found"),
    ):
        left, right, _ = run(store, (bad, "dense"), (str(tiny_dirs["drelu"]), "exact"), max_new_tokens=3)
        assert needle in left.error and not left.steps
        assert len(right.steps) == 3 and not right.error
    left, right, _ = run(
        store, (str(tiny_dirs["dense"]), "exact"), (str(tiny_dirs["drelu"]), "predictor"), max_new_tokens=2
    )
    assert "threshold mode" in left.error and "predictors" in right.error


def test_bad_prompts_and_settings():
    store = ModelStore()
    with pytest.raises(UserError, match="empty prompt"):
        run(store, ("a", "dense"), ("b", "dense"), prompt="   ")
    ids, notice = fit_prompt(list(range(600)), context=128, max_new_tokens=28)
    assert ids == list(range(500, 600)) and "truncated from the left" in notice
    assert fit_prompt([1, 2], 128, 28) == ([1, 2], "")
    clamped = Settings(max_new_tokens=10_000, temperature=-1, top_p=7, seed=3).checked()
    assert (clamped.max_new_tokens, clamped.temperature, clamped.top_p) == (256, 0.0, 1.0)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"max_new_tokens": float("nan")}, "max new tokens must be a finite number, got nan"),
        ({"temperature": float("inf")}, "temperature must be a finite number"),
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"top_p": "0.9"}, "top-p must be a number, got str"),
        ({"max_new_tokens": None}, "max new tokens must be a number, got NoneType"),
        ({"seed": 2**64}, r"seed must be a whole number in \[0, 2\*\*63\)"),
        ({"seed": 1.5}, "seed must be a whole number"),
        ({"seed": float("nan")}, "seed must be a whole number"),
        ({"system": 3}, "system prompt must be text"),
    ],
)
def test_settings_that_are_not_numbers_are_refused_in_one_line(bad, message):
    with pytest.raises(UserError, match=message):
        Settings(**bad).checked()


def test_long_prompt_is_truncated_with_a_notice(tiny_dirs):
    left, _, _ = run(
        ModelStore(),
        (str(tiny_dirs["dense"]), "dense"),
        (str(tiny_dirs["drelu"]), "dense"),
        prompt="def add(a, b): return a + b\n" * 60,
        max_new_tokens=4,
    )
    assert "truncated" in left.notice and len(left.prompt_ids) + 4 <= 128 and len(left.steps) == 4


def test_stop_ends_both_sides_within_a_step(tiny_dirs):
    store, stop = ModelStore(), Event()
    asked = SideRequest(str(tiny_dirs["dense"]), "dense"), SideRequest(str(tiny_dirs["drelu"]), "dense")
    rounds = []
    for sides in run_compare(store, *asked, PROMPT, Settings(max_new_tokens=100), stop):
        rounds.append(sides)
        if len(rounds) == 3:
            stop.set()
    left, right = rounds[-1]
    assert len(left.steps) <= 4 and len(right.steps) <= 4 and "stopped" in left.notice


def test_a_yielded_snapshot_never_changes_after_later_rounds(tiny_dirs):
    """The engine hands out values: each round's pair reads after the run as it read when it was
    yielded (a record the engine kept filling would have grown by the later tokens and notices),
    and nobody holding one can change it."""
    stop, seen = Event(), []
    asked = SideRequest(str(tiny_dirs["dense"]), "dense"), SideRequest(str(tiny_dirs["drelu"]), "exact")
    for sides in run_compare(ModelStore(), *asked, PROMPT, Settings(max_new_tokens=100, temperature=0.0), stop):
        seen.append((sides, copy.deepcopy(sides)))
        if len(seen) == 4:
            stop.set()
    assert all(sides == then for sides, then in seen)
    assert [[len(side.steps) for side in sides] for sides, _ in seen[:4]] == [[1, 1], [2, 2], [3, 3], [4, 4]]
    (first, _), (last, _) = seen[0], seen[-1]
    assert first[0].token_ids != last[0].token_ids and all(side.firing_counts for side in last)
    assert not any("stopped" in side.notice for sides, _ in seen[:-1] for side in sides)
    assert all("stopped" in side.notice for side in last)
    assert all(isinstance(side.steps, tuple) and isinstance(side.firing_counts[0], tuple) for side in last)
    with pytest.raises(dataclasses.FrozenInstanceError):
        first[0].text = "changed"


def test_modes_offered_per_model(tiny_dirs):
    from turbo_demo.checkpoints.config import load_config

    assert modes_for(load_config(tiny_dirs["dense"])) == ["dense", "threshold"]
    assert modes_for(load_config(tiny_dirs["drelu"])) == ["dense", "exact", "threshold"]
    with pytest.raises(UserError):
        resolve("")


def test_a_generate_racing_a_model_change_runs_the_mode_the_menu_will_show(tiny_dirs):
    """The mode menu's old value sent with a new model (Generate clicked before the model
    change's update arrived: seen in the browser test on a busy machine) is settled as the menu
    settles it: kept where the model offers it, else the pane's default, else the first mode."""
    dense, drelu = str(tiny_dirs["dense"]), str(tiny_dirs["drelu"])

    def settled(model: str, current: str, preferred: str) -> str:
        return settled_mode(mode_choices(model)[0], current, preferred)

    assert settled(dense, "predictor", "exact") == "dense"  # SwiGLU: dense and threshold
    assert settled(dense, "predictor", "threshold") == "threshold"
    assert settled(drelu, "exact", "dense") == "exact"
    assert settled(drelu, "predictor", "exact") == "exact"  # no predictors in it


def test_a_generate_click_reads_its_run_from_the_tabs_components(tiny_dirs):
    """read_run: the values Gradio hands over by component become the prompt, each side's request
    (mode settled, weights chosen) and the settings; a setting that is no number is refused."""
    import gradio as gr

    from turbo_demo.app.engine.public import LOCAL
    from turbo_demo.app.ui.compare import compare_tab, read_run, run_inputs

    with gr.Blocks():
        tab = compare_tab(["Dense SwiGLU"], LOCAL, (("Dense SwiGLU", "dense"), ("TurboSparse dReLU", "predictor")))
    dense, drelu = str(tiny_dirs["dense"]), str(tiny_dirs["drelu"])
    values = {component: component.value for component in run_inputs(tab)}
    values |= {tab.prompt: "def f(x):", tab.left.model: dense, tab.left.mode: "predictor", tab.right.model: drelu}
    values |= {tab.right.mode: "exact", tab.right.quant: "int8", tab.temperature: 0.0, tab.max_new: 5}
    prompt, left, right, settings = read_run(tab, values, LOCAL)
    assert prompt == "def f(x):" and (left.model, left.mode, left.quant) == (dense, "dense", None)
    assert (right.model, right.mode, right.quant) == (drelu, "exact", "int8")
    assert (settings.max_new_tokens, settings.temperature, settings.sparsity) == (5, 0.0, 0.5)
    with pytest.raises(UserError, match="temperature"):
        read_run(tab, values | {tab.temperature: "warm"}, LOCAL)


def test_views_build_the_expected_figures(tiny_dirs):
    store = ModelStore()
    left, right, _ = run(
        store, (str(tiny_dirs["dense"]), "dense"), (str(tiny_dirs["drelu"]), "exact"), max_new_tokens=5
    )
    view = views.compare_view(left, right)
    assert (view.left_text, view.right_text) == (left.text, right.text)
    heat = view.right_heatmap.data[0]
    assert isinstance(heat, go.Heatmap) and (heat.zmin, heat.zmax) == (0.0, 1.0)
    assert len(heat.z) == 2 and len(heat.z[0]) == 5  # layers x tokens
    assert len(view.speed.data) == 2 and all(len(t.y) == 5 for t in view.speed.data)
    assert [t.name for t in view.memory.data] == [None, "dense FFN", "actually read"]
    assert view.recall.data == ()  # no predictor on either side
    assert "Speed-up" in view.headline and "tok/s" in view.headline
    for fig in (view.left_heatmap, view.right_heatmap, view.speed, view.memory, view.recall):
        assert fig.layout.uirevision
    hists = {
        views.side_label(r): activation_histograms(store.get(r.model).model, r.prompt_ids + r.token_ids)
        for r in (left, right)
    }
    neurons = views.neurons_view(left, right, hists)
    firing = neurons.right_firing.data[0]
    assert len(firing.z) == 2 and len(firing.z[0]) == 128  # layers x neurons, hot to cold
    # the runtime's own counts: a neuron's share of the decode steps in which it fired
    assert sorted(right.firing_counts[0], reverse=True)[0] / 5 == firing.z[0][0]
    assert sum(right.firing_counts[0]) == round(sum(s.active_share[0] * 128 for s in right.steps))
    assert len(neurons.hist.data) == 6
    dense_h, drelu_h = (hists[views.side_label(r)]["combined"] for r in (left, right))
    assert dense_h["zeros"] == 0 and drelu_h["zeros"] > 0.3 * drelu_h["total"]
    broken = SideSnapshot("x", "dense", error="nope")
    assert views.neurons_view(broken, SideSnapshot("y", "dense"), {}) == views.NeuronsView(None, None, None)


def test_plot_builders_on_plain_data():
    fig = plots.recall_figure({"a": [0.9, 0.95]})
    assert list(fig.data[0].y) == [0.9, 0.95]
    assert plots.rolling([1, 2, 3, 4], window=2) == [1, 1.5, 2.5, 3.5]
    firing = plots.firing_figure([[0.1, 0.9, 0.5]], "t", "k")
    assert list(firing.data[0].z[0]) == [0.9, 0.5, 0.1]
    curve = plots.training_figure(
        [{"tokens": 1, "sparsity": 0.5, "val_loss": 3.0}, {"tokens": 2, "sparsity": 0.6}], "t"
    )
    assert len(curve.data) == 2 and list(curve.data[1].y) == [3.0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_compare_endpoint_through_gradio_client(tiny_dirs):
    from gradio_client import Client

    from turbo_demo.app.ui.page import build_demo

    demo = build_demo()  # the PyTorch kernels: the C++ ones are chosen at app start, not here
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        result = client.predict(
            PROMPT, str(tiny_dirs["dense"]), "dense", str(tiny_dirs["drelu"]), "exact", 5, 0.0, 0, api_name="/compare"
        )
        assert result["left"]["tokens"] == result["right"]["tokens"] == 5
        assert result["speedup"] > 0 and result["right"]["mean_sparsity"] > 0
        bad = client.predict(
            PROMPT, "/no/such/dir", "dense", str(tiny_dirs["drelu"]), "dense", 3, 0.0, 0, api_name="/compare"
        )
        assert "not found" in bad["left"]["error"] and bad["right"]["tokens"] == 3
        args = (PROMPT, str(tiny_dirs["dense"]), "dense", str(tiny_dirs["drelu"]), "exact", 3, 0.0, 0)
        quantized = client.predict(*args, "stored", "int8", api_name="/compare")
        assert (quantized["left"]["quant"], quantized["right"]["quant"]) == (None, "int8")
        assert quantized["right"]["tokens"] == 3
        odd = client.predict(*args, "int3", "stored", api_name="/compare")
        assert "int3" in odd["left"]["error"] and odd["right"]["tokens"] == 3
    finally:
        demo.close()


def test_compare_defaults_to_the_page_and_is_an_mcp_tool():
    import requests
    from gradio_client import Client

    from turbo_demo.app.ui.page import build_demo

    demo = build_demo()
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, mcp_server=True)
    try:
        tools = {t["name"]: t for t in requests.get(f"http://127.0.0.1:{port}/gradio_api/mcp/schema").json()}
        assert set(tools) == {"compare"}  # the model-box handlers are not offered
        props = tools["compare"]["inputSchema"]["properties"]
        assert props["left_model"]["default"] == "Dense SwiGLU" and props["right_mode"]["default"] == "predictor"
        assert "dense, exact, predictor, threshold" in props["left_mode"]["description"]
        from gradio_client import Client

        result = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(
            "def f(x):", max_new_tokens=2, api_name="/compare"
        )
        assert result["left"]["model"] == "Dense SwiGLU" and result["right"]["tokens"] == 2
    finally:
        demo.close()


def test_a_run_is_kept_as_a_zip_and_a_link(tiny_dirs):
    import csv
    import io
    import json
    import zipfile
    from urllib.parse import parse_qsl

    from turbo_demo.app.views import export

    settings = Settings(max_new_tokens=4, temperature=0.0, seed=7)
    left, right, _ = run(
        ModelStore(), (str(tiny_dirs["dense"]), "dense"), (str(tiny_dirs["drelu"]), "exact"), max_new_tokens=4, seed=7
    )
    view = views.compare_view(left, right)
    archive = zipfile.ZipFile(io.BytesIO(export.run_zip(left, right, settings, {"speed": view.speed})))
    assert sorted(archive.namelist()) == ["records.json", "speed.html", "steps.csv"]
    records = json.loads(archive.read("records.json"))
    assert records["sides"]["right"]["token_ids"] == list(right.token_ids)
    assert records["summary"]["right"]["tokens"] == 4
    rows = list(csv.DictReader(io.StringIO(archive.read("steps.csv").decode())))
    assert len(rows) == 2 * 4 * 2  # sides x steps x layers
    first = next(r for r in rows if r["side"] == "right")
    assert float(first["active"]) == right.steps[0].active_share[0]
    assert "plotly" in archive.read("speed.html").decode()[:5000].lower()
    # the link's query reopens the page with the same fields; foreign or broken values drop out
    query = export.share_query(PROMPT, left.key, right.key, settings)
    names = [str(tiny_dirs["dense"]), str(tiny_dirs["drelu"])]
    fields = export.settings_from_query(dict(parse_qsl(query[1:])), names)
    assert fields == {
        "prompt": PROMPT, "left": names[0], "left_mode": "dense", "right": names[1], "right_mode": "exact",
        "max_new_tokens": 4, "temperature": 0.0, "top_p": 0.95, "seed": 7,
    }  # fmt: skip
    hostile = {"left": "/etc", "left_mode": "rm", "tokens": "nan", "seed": "1e30", "temperature": "0.5"}
    assert export.settings_from_query(hostile | {"right_quant": "int3"}, names) == {}
    quantized = export.share_query(PROMPT, left.key, right.key, settings, (None, "int4"))
    assert "left_quant" not in quantized
    assert export.settings_from_query(dict(parse_qsl(quantized[1:])), names) == fields | {"right_quant": "int4"}

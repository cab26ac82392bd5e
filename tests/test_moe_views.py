"""The app's MoE views (issue 14, item 4) on a tiny TurboSparse-Mixtral and a plain Mixtral in
the published layout (test_moe's writer): the routing figure is the records' routing, the
memory panel and status line count bytes against a dense MoE, the Neurons view sorts per expert,
and the inspector's maps cover every expert's neurons."""

import pytest
from plotly import graph_objects as go
from test_moe import CONFIG, EXPERTS, INTER, LAYERS, TOP_K, write_layout

from turbo_demo.app.engine.catalog import ModelStore
from turbo_demo.app.engine.compare import Settings, last_round, run_compare
from turbo_demo.app.engine.sides import SideRequest, SideSnapshot
from turbo_demo.app.plots import compare as plots
from turbo_demo.app.views import compare as views
from turbo_demo.app.views import inspector
from turbo_demo.runtime.moe import routing_counts, routing_weights


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("moe-views")
    sparse, dense = root / "TurboSparse-Mixtral", root / "Mixtral"
    write_layout(sparse, tokenizer, CONFIG, predictors=True)
    plain = {**CONFIG, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_act": "silu"}
    write_layout(dense, tokenizer, plain, predictors=False)
    asked = SideRequest(str(dense), "dense"), SideRequest(str(sparse), "predictor")
    left, right = last_round(run_compare(ModelStore(), *asked, "def add", Settings(max_new_tokens=5, temperature=0.0)))
    assert not left.error and not right.error, (left.error, right.error)
    return left, right


def test_the_routing_view_is_the_records_routing(moe_run):
    left, right = moe_run
    assert left.moe == right.moe == (EXPERTS, INTER, TOP_K)
    view = views.compare_view(left, right)
    heat = [t for t in view.routing.data if isinstance(t, go.Heatmap)]
    assert len(heat) == 4  # per side: this token's weights, and the share of steps chosen
    assert [list(row) for row in heat[2].z] == routing_weights(right.steps[-1], EXPERTS)
    shares = [[c / 5 for c in row] for row in routing_counts(right.steps, EXPERTS)]
    assert [list(row) for row in heat[3].z] == shares
    assert all(sum(row) == pytest.approx(TOP_K) for row in shares)  # k experts per step and layer
    assert views.compare_view(SideSnapshot("a", "dense"), SideSnapshot("b", "dense")).routing is None


def test_bytes_against_the_dense_moe_and_all_experts(moe_run):
    left, right = moe_run
    view = views.compare_view(left, right)
    names = [t.name for t in view.memory.data]
    assert "dense MoE" in names
    routed = next(t for t in view.memory.data if t.name == "dense MoE")
    assert list(routed.y) == pytest.approx([views.mean_routed(r) / views.MB for r in (left, right)])
    assert "of the dense MoE's" in views.side_markdown(right) and "of all experts'" in views.side_markdown(right)
    assert views.mean_routed(SideSnapshot("a", "dense")) is None


def test_the_neurons_view_and_the_inspector_cover_every_expert(moe_run):
    left, right = moe_run
    firing = views.neurons_view(left, right, {}).right_firing.data[0]
    assert len(firing.z) == LAYERS and len(firing.z[0]) == EXPERTS * INTER
    first = [c / 5 for c in right.firing_counts[0][:INTER]]
    assert list(firing.z[0][:INTER]) == sorted(first, reverse=True)  # expert 0, hot to cold
    assert list(plots.firing_figure([[0.1, 0.9, 0.5, 0.2]], "t", "k", blocks=2).data[0].z[0]) == [0.9, 0.1, 0.5, 0.2]
    assert right.map_shape == (LAYERS, EXPERTS * INTER)
    codes = inspector.maps_at(inspector.keep(left, right), 0)[1]["codes"]
    assert sum(c == 1 for c in codes[0]) == round(right.steps[0].active_share[0] * EXPERTS * INTER)

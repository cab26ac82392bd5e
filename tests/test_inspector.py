"""The token inspector (issue 17, item 2): the runtime's per-step neuron codes agree with its own
statistics, pack and unpack losslessly, and the inspector's maps, spans and figure are the
records they come from; the state a session keeps for a 256-token run stays within its bound."""

import base64
import io
import json
import pickle
import zipfile

import pytest
import torch
from plotly import graph_objects as go

from conftest import lean, tiny_model
from turbo_demo.app.engine.catalog import DEFAULT_LEFT, DEFAULT_RIGHT, ModelStore
from turbo_demo.app.engine.compare import Settings, last_round, run_compare
from turbo_demo.app.engine.sides import SideRequest, SideSnapshot
from turbo_demo.app.plots import inspector as plots_inspector
from turbo_demo.app.views import export, inspector
from turbo_demo.runtime.stats import COMPUTED_ZERO, FIRED, MISSED, pack_codes, unpack_codes

PROMPT = [3, 7, 11, 19, 23]


def generated(runtime, audit=True, tokens=6):
    return list(runtime.generate(PROMPT, tokens, audit=audit, codes=True))


@pytest.mark.parametrize("mode", ["dense", "exact", "predictor", "threshold"])
def test_codes_agree_with_the_steps_statistics(mode, any_kernels):
    model = tiny_model("drelu", predictor_rank=8)
    options = {"threshold": 0.05} if mode == "threshold" else {}
    steps = generated(lean(model, mode, any_kernels, **options))
    n = steps[0].intermediate_size
    for s in steps:
        assert s.codes.shape == (2, n) and s.codes.dtype == torch.uint8
        for layer, codes in enumerate(s.codes):
            fired, zero, missed = (int((codes == c).sum()) for c in (FIRED, COMPUTED_ZERO, MISSED))
            assert fired == round(s.active_share[layer] * n)
            if mode in ("predictor", "threshold"):  # the modes that choose: TP, FP and missed
                assert fired + zero == round(s.computed_share[layer] * n)
                assert s.recall[layer] == pytest.approx(fired / max(1, fired + missed))
            else:
                assert zero == missed == 0
    assert all(s.to_dict().get("codes") is None for s in steps)  # the JSON schema stays numbers


def test_exact_codes_are_dense_codes_and_unaudited_steps_miss_nothing():
    model = tiny_model("drelu", predictor_rank=8)
    dense, exact = (generated(lean(model, mode)) for mode in ("dense", "exact"))
    assert all(torch.equal(d.codes, e.codes) for d, e in zip(dense, exact))
    blind = generated(lean(model, "predictor"), audit=False)
    assert all(int((s.codes == MISSED).sum()) == 0 for s in blind)
    assert all(s.codes is None for s in lean(model, "dense").generate(PROMPT, 3))


@pytest.mark.parametrize("shape", [(1, 1), (2, 5), (3, 128), (4, 1283)])
def test_codes_pack_to_two_bits_and_back(shape):
    codes = torch.randint(0, 4, shape, generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    data = pack_codes(codes)
    assert len(data) == -(-codes.numel() // 4)
    assert unpack_codes(data, *shape) == codes.tolist()


def share(counts: torch.Tensor) -> list[float]:
    return [n / 6 for n in counts.tolist()]


def crafted() -> tuple[SideSnapshot, SideSnapshot, torch.Tensor]:
    """A crafted two-sided run: left dense with 2 steps, right predictor with 3; layers 2 x 6."""
    from turbo_demo.runtime.stats import StepStats

    codes = torch.tensor([[[1, 0, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]]] * 2 + [[[1, 2, 3, 0, 0, 0], [0, 0, 0, 0, 2, 1]]])
    steps = tuple(
        StepStats(i, 5 + i, 0.01, 6, share((c == 1).sum(1)), share(((c == 1) | (c == 2)).sum(1)))
        for i, c in enumerate(codes)
    )
    left = SideSnapshot(
        "L", "dense", pieces=("a", "b"), steps=steps[:2], maps=tuple(pack_codes(c) for c in codes[:2]), map_shape=(2, 6)
    )
    right = SideSnapshot(
        "R",
        "predictor",
        pieces=("x", "y", "z"),
        steps=steps,
        maps=tuple(pack_codes(c) for c in codes),
        map_shape=(2, 6),
    )
    return left, right, codes


def test_the_inspectors_maps_are_the_records_they_come_from():
    left, right, codes = crafted()
    kept = inspector.keep(left, right)
    assert inspector.steps_of(kept) == 3 and inspector.kept_bytes(kept) == 5 * 3  # 12 codes: 3 bytes a step
    assert inspector.token_spans(right) == [(p, s.sparsity) for p, s in zip("xyz", right.steps)]
    at_two = inspector.maps_at(kept, 2)
    assert [p["label"] for p in at_two] == ["L · dense", "R · predictor"]
    assert at_two[0]["codes"] is None and at_two[0]["token"] is None  # the left pane ended earlier
    assert at_two[1]["codes"] == codes[2].tolist() and at_two[1]["token"] == "z"
    assert inspector.grid([1, 2, 3, 0, 1]) == [[1, 2, 3], [0, 1, None]]
    assert list(inspector.keep(left, SideSnapshot("E", "dense", error="x"))) == ["left"]  # a failed side keeps nothing


def test_the_neuron_maps_figure_draws_every_layer_of_both_panes():
    left, right, codes = crafted()
    kept = inspector.keep(left, right)
    fig = plots_inspector.neuron_maps_figure(inspector.maps_at(kept, 1), 1)
    heat = [t for t in fig.data if isinstance(t, go.Heatmap)]
    assert len(heat) == 4  # 2 layers x 2 panes, column by column
    cells = [[[None if v != v else int(v) for v in row] for row in h.z] for h in heat]  # NaN: padding
    assert cells == [inspector.grid(c) for side in (codes[1], codes[1]) for c in side.tolist()]
    assert all((h.zmin, h.zmax) == (0, 3) for h in heat)
    legend = [t.name for t in fig.data if isinstance(t, go.Scatter)]
    assert legend == [plots_inspector.LEGEND[n] for n in ("not fired", "fired")]
    assert "Token 2" in fig.layout.title.text and "'b'" in fig.layout.title.text
    # the last step: only the right pane has a map, and all four codes occur
    last = plots_inspector.neuron_maps_figure(inspector.maps_at(kept, 2), 2)
    assert len([t for t in last.data if isinstance(t, go.Heatmap)]) == 2
    assert len([t for t in last.data if isinstance(t, go.Scatter)]) == 4
    assert "no neuron map" in plots_inspector.neuron_maps_figure([], 0).layout.title.text


def test_a_runs_zip_carries_its_maps(tmp_path):
    left, right, codes = crafted()
    data = export.run_zip(left, right, Settings(), {})
    records = json.loads(zipfile.ZipFile(io.BytesIO(data)).read("records.json"))
    maps = records["sides"]["right"]["maps"]
    assert [unpack_codes(base64.b64decode(m), 2, 6) for m in maps] == codes.tolist()
    assert records["sides"]["right"]["pieces"] == ["x", "y", "z"] and "2 bits a neuron" in records["maps_format"]


def test_a_sessions_inspector_state_for_a_256_token_run_stays_small():
    store = ModelStore()
    asked = SideRequest(*DEFAULT_LEFT), SideRequest(*DEFAULT_RIGHT)
    settings = Settings(max_new_tokens=256, temperature=0.0)
    left, right = last_round(run_compare(store, *asked, "def f(x):\n", settings))
    assert not left.error and not right.error
    kept = inspector.keep(left, right)
    steps = inspector.steps_of(kept)
    layers, neurons = right.map_shape
    assert inspector.kept_bytes(kept) <= 2 * steps * -(-layers * neurons // 4)
    assert len(pickle.dumps(kept)) < inspector.SESSION_BOUND  # what the session's state holds


def test_the_talk_layouts_numbers_text_and_live_maps():
    from turbo_demo.app.ui import talk as page_talk

    left, right, _ = crafted()
    numbers = page_talk.big_numbers(right)
    assert f"{right.tokens_per_s:,.0f} tok/s" in numbers and "idle" in numbers and "R · predictor" in numbers
    assert "⚠️" in page_talk.big_numbers(
        SideSnapshot("E", "dense", error="<no>")
    ) and "&lt;no&gt;" in page_talk.big_numbers(SideSnapshot("E", "dense", error="<no>"))
    assert "a &lt; b" in page_talk.big_text(SideSnapshot("T", "dense", text="a < b"))
    live = page_talk.live_maps(left, right)  # the latest position either side reached: the third
    assert "Token 3" in live.layout.title.text
    assert page_talk.live_maps(SideSnapshot("A", "dense"), SideSnapshot("B", "dense")) is None

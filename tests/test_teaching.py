"""The teaching views of issue 17: honest first-run numbers (warm-up, median speed, time to
first token, unsteady steps marked), as plain functions and, for the cold start, a fresh process."""

import json
import subprocess
import sys
import textwrap

import pytest
from plotly import graph_objects as go

from conftest import REPO, lean, tiny_model
from turbo_demo.app import plots, views
from turbo_demo.app.catalog import ModelStore, embedded_names
from turbo_demo.app.compare import Settings, SideRecord, run_compare, speedup
from turbo_demo.runtime.stats import StepStats


def steps_of(times: list[float]) -> list[StepStats]:
    return [StepStats(step=i, token=1, time_s=t, intermediate_size=4, active_share=[0.5]) for i, t in enumerate(times)]


@pytest.mark.parametrize("mode, options", [("dense", {}), ("exact", {}), ("threshold", {"sparsity": 0.5})])
@pytest.mark.parametrize("prompt", [[5], [5, 17, 33, 2, 9]])
def test_warm_up_changes_no_token_and_no_count(mode, options, prompt):
    model = tiny_model("drelu")
    cold, warm = lean(model, mode, **options), lean(model, mode, **options)
    warm.warm_up(3)
    assert warm.warm and not warm.firing.any()
    a = list(cold.generate(prompt, 8, temperature=0.8, top_p=0.9, seed=3, warm_up=0))
    b = list(warm.generate(prompt, 8, temperature=0.8, top_p=0.9, seed=3))
    assert [s.token for s in a] == [s.token for s in b]
    assert [s.active_share for s in a] == [s.active_share for s in b]
    assert cold.firing_counts() == warm.firing_counts()
    assert [vars(m).get("threshold") for m in cold.modes] == [vars(m).get("threshold") for m in warm.modes]
    assert not cold.warm and warm.prefill_s >= 0.0


def test_headline_speed_is_the_median_step():
    left, right = SideRecord("a", "dense"), SideRecord("b", "exact")
    left.steps = steps_of([0.010, 0.010, 0.500, 0.010])  # one stall
    right.steps = steps_of([0.005, 0.004, 0.006])
    assert left.median_step_s == pytest.approx(0.010) and left.tokens_per_s == pytest.approx(100.0)
    assert left.mean_tokens_per_s == pytest.approx(4 / 0.530)
    assert right.tokens_per_s == pytest.approx(200.0)
    assert speedup(left, right) == pytest.approx(2.0)
    left.first_token_s, right.first_token_s = 0.0421, 1.5
    text = views.headline(left, right)
    assert "×2.00" in text and "**First token** 42.1 ms vs 1.50 s" in text
    assert "first token 42.1 ms" in views.side_markdown(left)
    assert SideRecord("c", "dense").tokens_per_s == 0.0


def test_speed_figure_marks_the_unsteady_steps():
    times = [0.01] * 10
    times[2] = times[3] = 0.05  # two stalls in a row: one shaded band
    times[7] = 0.021  # just over 2x the median
    assert plots.unsteady_steps(times) == [2, 3, 7]
    assert plots.runs_of([2, 3, 7]) == [(2, 3), (7, 7)]
    fig = plots.speed_figure({"left": times, "right": [0.005] * 10})
    assert [type(t) for t in fig.data] == [go.Scatter, go.Scatter] and len(fig.data[0].y) == 10
    bands = [s for s in fig.layout.shapes if s.type == "rect"]
    assert [(b.x0, b.x1) for b in bands] == [(2.5, 4.5), (7.5, 8.5)]  # step i is drawn at x = i + 1
    lines = [s for s in fig.layout.shapes if s.type == "line"]
    assert sorted(round(s.y0) for s in lines) == [100, 200]  # the medians, in tokens/s
    assert "3 steps over 2x the median" in fig.layout.title.text


def test_a_run_records_its_time_to_first_token(tiny_dirs):
    left, right = SideRecord(str(tiny_dirs["dense"]), "dense"), SideRecord(str(tiny_dirs["drelu"]), "exact")
    for _ in run_compare(ModelStore(), left, right, "def add(a, b):", Settings(max_new_tokens=3, temperature=0.0)):
        pass
    for rec in (left, right):
        assert rec.first_token_s is not None and rec.first_token_s >= rec.steps[0].time_s > 0
        assert rec.summary()["first_token_s"] == round(rec.first_token_s, 4)


# A fresh process does what app.py does (kernels, store, warm_up), then compares the default
# models RUNS times; one thread, so that another process on a 2-core machine costs a step a
# time slice rather than an OpenMP barrier's wait (which is what makes 2-thread steps bimodal).
COLD_START = textwrap.dedent(
    """
    import json, torch
    torch.set_num_threads(1)
    from turbo_demo.app.catalog import DEFAULT_LEFT, DEFAULT_RIGHT, ModelStore
    from turbo_demo.app.compare import Settings, SideRecord, run_compare, speedup
    from turbo_demo.app.texts import EXAMPLES
    from turbo_demo.app.warm import warm_up
    from turbo_demo.runtime.kernels import load_kernels
    kernels, store = load_kernels("auto"), ModelStore()
    errors = warm_up(store, kernels)
    ratios, settings = [], Settings(max_new_tokens=96, temperature=0.0)
    for _ in range(4):
        left, right = SideRecord(*DEFAULT_LEFT), SideRecord(*DEFAULT_RIGHT)
        for _ in run_compare(store, left, right, EXAMPLES[0], settings, kernels=kernels):
            pass
        ratios.append(speedup(left, right))
    print(json.dumps({"errors": errors, "ratios": ratios, "kernels": kernels.name}))
    """
)
# The first run read x0.80 where later ones read ~1.5x. On this shared 2-core machine
# the later runs of one process themselves spread (1.8x to 3.4x seen in one process, other
# engineers' jobs running), so the first headline must lie within the later runs' range,
# widened by this factor on either side: a cold first run as in the issue falls far outside.
COLD_TOLERANCE = 1.25


@pytest.mark.skipif(len(embedded_names()) < 2, reason="the embedded models are not in this checkout")
def test_first_compare_after_a_cold_start_agrees_with_later_ones():
    out = subprocess.run(
        [sys.executable, "-c", COLD_START], cwd=REPO, capture_output=True, text=True, timeout=600, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["errors"] == ["", ""]
    first, *later = result["ratios"]
    assert min(later) / COLD_TOLERANCE <= first <= max(later) * COLD_TOLERANCE, result

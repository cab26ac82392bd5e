"""Issue 26: a runtime is warmed once per loaded model, mode, options and kernels, and lent to
one request at a time; each side records the phases its visitor waited for (load, warm-up,
prefill, first token); app.py chooses the decode threads for a server and says so."""

import gc
import subprocess
import sys
import weakref
from dataclasses import replace
from threading import Event

import pytest
import torch

from conftest import REPO, tiny_model
from turbo_demo.app.engine import pool
from turbo_demo.app.engine.catalog import DEFAULT_LEFT, DEFAULT_RIGHT, ModelStore, embedded_names
from turbo_demo.app.engine.compare import Settings, last_round, run_compare
from turbo_demo.app.engine.sides import SideRequest, SideSnapshot, compare_summary
from turbo_demo.app.views import compare as views
from turbo_demo.checkpoints import memory
from turbo_demo.checkpoints.checkpoint import save_checkpoint
from turbo_demo.errors import UserError
from turbo_demo.runtime import Decoder, Kernels
from turbo_demo.runtime.modes import ThresholdOptions
from turbo_demo.runtime.stats import StepStats

PROMPT = "def add(a, b):\n    return"


def compare(store, left, right, tokens=3, **settings):
    settings = Settings(max_new_tokens=tokens, temperature=0.0, **settings)
    return last_round(run_compare(store, SideRequest(*left), SideRequest(*right), PROMPT, settings))


@pytest.fixture
def warm_ups(monkeypatch):
    """Counts the runtimes' warm-ups."""
    calls = []
    real = Decoder.warm_up

    def counted(self, *args, **kwargs):
        calls.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Decoder, "warm_up", counted)
    return calls


def test_a_second_request_borrows_the_first_ones_warm_runtime(tiny_dirs, warm_ups):
    store = ModelStore()
    sides = (str(tiny_dirs["dense"]), "dense"), (str(tiny_dirs["drelu"]), "exact")
    first = compare(store, *sides)
    assert len(warm_ups) == 2
    (dense,) = store.get(sides[0][0]).runtimes.idle()
    (exact,) = store.get(sides[1][0]).runtimes.idle()
    assert dense.warm and dense.mode == "dense" and exact.mode == "exact"
    for rec in first:  # the first request loaded the models and warmed their runtimes
        assert rec.load_s > 0 and rec.warm_up_s > 0 and rec.prefill_s is not None and not rec.error
    second = compare(store, *sides)
    assert len(warm_ups) == 2  # no warm-up again
    assert store.get(sides[0][0]).runtimes.idle() == [dense] and store.get(sides[1][0]).runtimes.idle() == [exact]
    for a, b in zip(first, second):
        assert (b.load_s, b.warm_up_s) == (0.0, 0.0)
        assert b.token_ids == a.token_ids and b.firing_counts == a.firing_counts  # reused as if new
        assert b.prefill_s is not None and b.first_token_s >= b.prefill_s >= 0.0
    threads = [rec.threads for rec in second]
    assert threads == [torch.get_num_threads()] * 2  # tiny steps: the caller's threads, not more
    assert f"**Decode threads** {threads[0]} vs {threads[1]}" in views.compare_view(*second).headline


def test_runtimes_lent_at_once_are_distinct_and_the_pool_is_bounded(tiny_dirs, warm_ups):
    store = ModelStore()
    loaded, kernels = store.get(str(tiny_dirs["dense"])), Kernels()
    runtimes = loaded.runtimes
    leases = [runtimes.checkout("dense", kernels) for _ in range(pool.IDLE_PER_KEY + 1)]
    lent = [lease.__enter__() for lease in leases]
    assert len({id(lease.runtime) for lease in lent}) == len(lent) and all(lease.warm_up_s > 0 for lease in lent)
    assert runtimes.idle() == []
    for lease in leases:
        lease.__exit__(None, None, None)
    kept = runtimes.idle("dense")
    assert len(kept) == pool.IDLE_PER_KEY and kept == [lease.runtime for lease in lent[1:]]
    assert store.used() == memory.estimate(loaded.path).total + (pool.IDLE_PER_KEY - 1) * loaded.runtime_bytes
    assert loaded.runtime_bytes == memory.estimate(loaded.path).kv_cache > 0
    with runtimes.checkout("dense", Kernels()) as lease:  # another Kernels object of the same kernels
        assert lease.runtime is kept[-1] and lease.warm_up_s == 0.0
    with runtimes.checkout("threshold", kernels, ThresholdOptions(threshold=0.1)) as lease:
        assert lease.runtime not in kept and lease.warm_up_s > 0  # another key
    assert len(warm_ups) == pool.IDLE_PER_KEY + 2
    for mode in ("threshold", "dense", "dense", "threshold", "dense"):  # more keys than the model keeps
        threshold = ThresholdOptions(threshold=0.2) if mode == "threshold" else None
        with runtimes.checkout(mode, kernels, threshold):
            pass
    assert len(runtimes.idle()) <= pool.IDLE_PER_MODEL


def test_a_closed_or_failed_run_gives_back_or_drops_its_runtime(tiny_dirs):
    store = ModelStore()
    runtimes, kernels = store.get(str(tiny_dirs["drelu"])).runtimes, Kernels()
    left, right = SideRequest(str(tiny_dirs["drelu"]), "dense"), SideRequest(str(tiny_dirs["drelu"]), "exact")
    rounds = run_compare(store, left, right, PROMPT, Settings(max_new_tokens=50))
    next(rounds), next(rounds)
    assert runtimes.idle() == []  # both lent
    rounds.close()  # the page's handler closed: GeneratorExit in each side
    gc.collect()
    assert sorted(r.mode for r in runtimes.idle()) == ["dense", "exact"]
    with pytest.raises(UserError), runtimes.checkout("dense", kernels):
        raise UserError("a visitor's mistake leaves the runtime sound")
    assert len(runtimes.idle("dense")) == 1
    with pytest.raises(RuntimeError), runtimes.checkout("dense", kernels) as lease:
        raise RuntimeError("a runtime that failed mid-step is not lent again")
    assert lease.runtime not in runtimes.idle() and runtimes.idle("dense") == []


def test_threshold_modes_calibrated_options_key_its_runtimes(tiny_dirs):
    store = ModelStore()
    side = (str(tiny_dirs["dense"]), "threshold")
    first = compare(store, side, side, sparsity=0.5)  # both sides at once: two runtimes
    kept = store.get(side[0]).runtimes.idle("threshold")
    assert len(kept) == 2 and all(rec.warm_up_s > 0 for rec in first)
    again = compare(store, side, side, sparsity=0.5)
    assert [rec.warm_up_s for rec in again] == [0.0, 0.0] and again[0].token_ids == first[0].token_ids
    assert sorted(map(id, store.get(side[0]).runtimes.idle("threshold"))) == sorted(map(id, kept))
    other = compare(store, side, side, sparsity=0.8)  # other thresholds: other runtimes
    assert all(rec.warm_up_s > 0 for rec in other)
    # per-layer options (a MoE layer's: a list per expert) make a key
    options = [ThresholdOptions(threshold=0.1), [ThresholdOptions(threshold=0.2), ThresholdOptions(threshold=0.3)]]
    same = [ThresholdOptions(threshold=0.1), [ThresholdOptions(threshold=0.2), ThresholdOptions(threshold=0.3)]]
    assert hash(pool.pool_key("threshold", Kernels(), options)) == hash(pool.pool_key("threshold", Kernels(), same))
    assert pool.pool_key("threshold", Kernels(), options) != pool.pool_key("threshold", Kernels(), options[:1])


def test_eviction_drops_the_models_warm_runtimes(tmp_path, tokenizer):
    dirs = [save_checkpoint(tiny_model("dense", seed=i), tokenizer, tmp_path / f"{i}", torch.float32) for i in range(3)]
    store, kernels = ModelStore(budget=2 * memory.estimate(dirs[0]).total), Kernels()
    a = store.get(str(dirs[0]))
    with a.runtimes.checkout("dense", kernels) as lease:
        runtime = weakref.ref(lease.runtime)
    runtimes = weakref.ref(a.runtimes)
    del a, lease
    store.get(str(dirs[1]))
    store.get(str(dirs[2]))  # evicts the first model, and its pool with it
    gc.collect()
    assert runtime() is None and runtimes() is None
    # a model evicted while a run holds its runtime: the runtime is dropped when given back
    b = store.get(str(dirs[1]))
    with b.runtimes.checkout("dense", kernels):
        held = store.get(str(dirs[0]))  # held by another run
        with pytest.raises(UserError, match="free in the model store's budget"):
            store.get(str(dirs[2]))  # b and dirs[0] held by runs: everything evicted, nothing freed
    assert b.runtimes.idle() == [] and store.get(str(dirs[1])) is not b and held.runtimes.idle() == []


@pytest.mark.skipif(len(embedded_names()) < 2, reason="the embedded models are not in this checkout")
def test_the_start_up_warm_up_leaves_the_default_compare_warm(warm_ups):
    from turbo_demo.app.engine.warm import warm_up

    store, kernels = ModelStore(), Kernels()
    assert warm_up(store, kernels, tokens=2) == ["", ""]
    assert len(warm_ups) == 2
    asked = SideRequest(*DEFAULT_LEFT), SideRequest(*DEFAULT_RIGHT)
    left, right = last_round(run_compare(store, *asked, "def f(x):", Settings(max_new_tokens=2), Event(), kernels))
    assert len(warm_ups) == 2  # the first visitor paid for nothing
    assert [(r.load_s, r.warm_up_s) for r in (left, right)] == [(0.0, 0.0), (0.0, 0.0)]


def test_the_phases_are_in_the_summary_and_the_status_line():
    steps = tuple(StepStats(step=i, token=1, time_s=0.025, intermediate_size=4, active_share=[0.5]) for i in range(3))
    timed = {"load_s": 0.0, "warm_up_s": 0.0, "prefill_s": 0.21, "first_token_s": 1.25}
    rec = SideSnapshot("a", "predictor", engine="lean", dtype="float32", steps=steps, **timed)
    summary = rec.summary()
    assert {"load_s", "warm_up_s", "prefill_s", "first_token_s", "tokens_per_s"} <= set(summary)
    assert (summary["load_s"], summary["warm_up_s"], summary["prefill_s"]) == (0.0, 0.0, 0.21)
    line = views.side_markdown(rec)
    assert "load 0 s · warm-up 0 s · prefill 210.0 ms · first token 1.25 s · 40.0 tokens/s" in line
    cold = SideSnapshot("b", "dense", load_s=61.0, warm_up_s=23.4, prefill_s=6.6, first_token_s=7.0, steps=rec.steps)
    assert "load 61.00 s · warm-up 23.40 s · prefill 6.60 s" in views.side_markdown(cold)
    assert compare_summary(rec, cold)["right"]["warm_up_s"] == 23.4
    headline = views.headline(cold, rec)
    assert "**Speed-up** ×1.00" in headline and "**First token** 7.00 s vs 1.25 s" in headline
    assert "Decode threads" not in headline  # no runtime ran: nobody chose threads
    assert "**Decode threads** 2 vs 1" in views.headline(replace(cold, threads=2), replace(rec, threads=1))


def test_app_chooses_its_decode_threads_for_a_server():
    import app

    assert [app.serving_threads(n) for n in (1, 2, 4, 16)] == [1, 1, 3, 15]
    assert app.usable_cores() >= 1
    help_text = subprocess.run(
        [sys.executable, "app.py", "--help"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    flat = " ".join(help_text.split())
    assert "--threads N" in flat and "use but one" in flat and "web server" in flat
    refused = subprocess.run([sys.executable, "app.py", "--threads", "0"], cwd=REPO, capture_output=True, text=True)
    assert refused.returncode == 2 and "--threads must be at least 1" in refused.stderr


@pytest.mark.parametrize("long_step_s", [0.0, float("inf")])
def test_the_warm_up_gives_long_steps_every_core_and_short_ones_the_callers_threads(monkeypatch, long_step_s):
    """A step as long as a 7B model's is bound by memory bandwidth: it runs on the kernels'
    prefill_threads (every core); a short one on the caller's (a server's share); the caller's
    threads are left as they were either way."""
    from turbo_demo.runtime import LeanRuntime, pack
    from turbo_demo.runtime import decoder as decoder_module

    monkeypatch.setattr(decoder_module, "LONG_STEP_S", long_step_s)
    kernels = Kernels()
    caller = torch.get_num_threads()
    kernels.prefill_threads = caller + 1
    runtime = LeanRuntime(pack(tiny_model("drelu")), "dense", kernels)
    seen = []
    decode = runtime.decode
    monkeypatch.setattr(runtime, "decode", lambda token: (seen.append(torch.get_num_threads()), decode(token))[1])
    runtime.warm_up()
    expected = caller + 1 if long_step_s == 0.0 else caller
    assert runtime.decode_threads == (caller + 1 if long_step_s == 0.0 else None) and runtime.threads == expected
    seen.clear()
    assert len(list(runtime.generate([1, 2, 3], 3))) == 3
    assert seen == [expected] * 3 and torch.get_num_threads() == caller


def test_the_in_process_default_compare_is_warm_from_its_first_run():
    """warm.default_compares, the in-process half of `bench --served`: warmed as app.py warms
    the store, so its first summary already pays no load or warm-up."""
    from turbo_demo.app.engine.warm import default_compares

    (summary,) = default_compares(Kernels(), 1)
    assert summary["speedup"] > 0
    assert all(summary[side]["load_s"] == 0 and summary[side]["warm_up_s"] == 0 for side in ("left", "right"))

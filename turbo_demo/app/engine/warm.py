"""Warming the app's default models at start, so that a visitor's first run is timed warm.

`warm_up(store, kernels)` loads and packs the default models (the store keeps them), then runs
one short compare and the Neurons tab's dense forward on them, untimed and thrown away: the
process's first calls (thread pools, GEMM kernels, tokenizers, the allocator's first blocks,
the weights' first reads) happen here rather than in the first Generate. The compare's two
runtimes, warm, stay in their models' pools (app/pool.py): the page's default compare borrows
them, so that its first visitor's load and warm-up read 0 s.

`default_compares(kernels, runs)` runs the compare endpoint's default (texts.API_PROMPT, 64
greedy tokens) in this process, the counterpart of probe.default_compares on a served app.
`time_compare(path, quant, kernels)` times a warm compare of one model dense against predictor,
as `bench --full` asks at the paper's scale: the engine's seconds beyond the sides' own prefill
and decode steps.
"""

import time
from threading import Event

from turbo_demo.app.engine.catalog import DEFAULT_LEFT, DEFAULT_RIGHT, ModelStore
from turbo_demo.app.engine.compare import Settings, last_round, run_compare
from turbo_demo.app.engine.prompts import API_PROMPT, EXAMPLES
from turbo_demo.app.engine.sides import SideRequest, compare_summary
from turbo_demo.models.activations import activation_histograms
from turbo_demo.runtime import Kernels

WARM_TOKENS = 16


def warm_up(
    store: ModelStore,
    kernels: Kernels | None = None,
    left: tuple[str, str] = DEFAULT_LEFT,
    right: tuple[str, str] = DEFAULT_RIGHT,
    tokens: int = WARM_TOKENS,
) -> list[str]:
    """Run the page's default compare once, `tokens` long, and the activation forward; return
    each side's error (empty where it warmed), so that the caller can say what did not."""
    asked, settings = (SideRequest(*left), SideRequest(*right)), Settings(max_new_tokens=tokens)
    sides = last_round(run_compare(store, *asked, EXAMPLES[0], settings, Event(), kernels))
    for rec in sides:
        if not rec.error and rec.token_ids:
            activation_histograms(store.get(rec.model).model, rec.ids)
    return [rec.error for rec in sides]


def time_compare(path: str, quant: str | None, kernels: Kernels, tokens: int = WARM_TOKENS) -> dict:
    """A compare of the model at `path` (in `quant`) dense against predictor, `tokens` new tokens,
    greedy, run twice on one store: the first loads and warms it, the second is timed. Returns
    its wall seconds, the sides' own prefill and decode steps' seconds, and the rest (`engine_s`:
    statistics, the recall audit, neuron maps, detokenizing, alternating the sides)."""
    store, settings = ModelStore(), Settings(max_new_tokens=tokens, temperature=0.0)
    dense, predictor = SideRequest(path, "dense", quant), SideRequest(path, "predictor", quant)
    for _ in range(2):
        start = time.perf_counter()
        sides = last_round(run_compare(store, dense, predictor, EXAMPLES[0], settings, Event(), kernels))
        wall = time.perf_counter() - start
    own = sum((rec.prefill_s or 0.0) + sum(s.time_s for s in rec.steps) for rec in sides)
    return {
        "new_tokens": tokens,
        "wall_s": wall,
        "sides_prefill_and_decode_s": own,
        "engine_s": wall - own,
        "sides": {rec.mode: rec.summary() for rec in sides},
    }


def default_compares(kernels: Kernels, runs: int = 4) -> list[dict]:
    """The compare endpoint's default run (page_api.compare with API_PROMPT only),
    `runs` times in this process on a store warmed as app.py warms it: its JSON summaries."""
    store = ModelStore()
    warm_up(store, kernels)
    summaries = []
    left, right = SideRequest(*DEFAULT_LEFT), SideRequest(*DEFAULT_RIGHT)
    for _ in range(runs):
        sides = last_round(run_compare(store, left, right, API_PROMPT, Settings(64, 0.0, 1.0, 0), Event(), kernels))
        summaries.append(compare_summary(*sides))
    return summaries

"""The "Why dReLU" tab's data, as plain functions: the top-k sweep (shipped, and on a visitor's
text) and the (gate, up) plane of the three FFN variants with a run's measured pairs.

    shipped_sweeps()                   {model: (sparsities, perplexities)} from eval.json
    text_sweeps(store, text)           the same curve on the visitor's text, per embedded model
    last_run(left, right)              what a session keeps of its last run for the plane
    run_histograms(store, left, right) the Neurons tab's activation histograms of a run
    gate_up_pairs(model, ids)          (gate, up) pre-activations of every layer, token, neuron
    plane(points)                      h over the plane for each variant, and measured zero shares
"""

import math

import torch
import torch.nn.functional as F

from turbo_demo import paper_figures
from turbo_demo.app.engine.catalog import EMBEDDED, ModelStore, embedded_names
from turbo_demo.app.engine.sides import SideSnapshot
from turbo_demo.app.views.compare import side_label
from turbo_demo.models.activations import activation_histograms
from turbo_demo.models.hooks import on_gate_up
from turbo_demo.offline.evaluate import text_sweep
from turbo_demo.paths import MODELS_DIR, eval_results

# The paper's Table 3 as the sweep plot's curves, beside shipped_sweeps' (same form)
PAPER_SWEEP = {
    f"paper: {ffn} {paper_figures.TOPK_MODEL_SIZE}": (list(paper_figures.TOPK_SPARSITY), list(perplexity))
    for ffn, perplexity in paper_figures.TOPK_PERPLEXITY.items()
}
VARIANTS = {
    "SwiGLU: silu(g) * u": lambda g, u: F.silu(g) * u,
    "ReGLU: relu(g) * u": lambda g, u: F.relu(g) * u,
    "dReLU: relu(g) * relu(u)": lambda g, u: F.relu(g) * F.relu(u),
}
PAIRS_PER_SIDE = 3000  # measured (gate, up) pairs drawn per side (all are counted)
GRID = 81  # points per axis of the plane


def shipped_sweeps() -> dict[str, tuple[list[float], list[float]]]:
    """Each embedded model's "topk_sweep" from its eval.json (written by `eval`), by name."""
    curves = {}
    for name, folder in EMBEDDED.items():
        curve = (eval_results(MODELS_DIR / folder) or {}).get("topk_sweep")
        if curve:
            curves[name] = (curve["sparsity"], curve["perplexity"])
    return curves


def text_sweeps(store: ModelStore, text: str) -> tuple[dict[str, tuple[list[float], list[float]]], int]:
    """The sweep of every embedded model on `text` (its first TEXT_SWEEP_TOKENS tokens), and the
    number of tokens scored (the embedded models share one tokenizer)."""
    curves, scored = {}, 0
    for name in embedded_names():
        loaded = store.get(name)
        result = text_sweep(loaded.model, loaded.tokenizer, text)
        curves[name], scored = (result["sparsity"], result["perplexity"]), result["tokens"]
    return curves, scored


def last_run(left: SideSnapshot, right: SideSnapshot) -> list[tuple[str, str, list[int]]]:
    """(model, side label, prompt + generated ids) of each side that generated: all the plane
    needs of a run (a few hundred ints per side in the session's state)."""
    return [(r.model, side_label(r), r.ids) for r in float_sides(left, right)]


def float_sides(left: SideSnapshot, right: SideSnapshot) -> list[SideSnapshot]:
    """The sides that generated on float weights: a side quantized at load has no float gate
    and up matrices for the model's own forward to measure (they stay on the meta device)."""
    return [r for r in (left, right) if not r.error and r.token_ids and not r.quant]


@torch.no_grad()
def gate_up_pairs(model, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up): W_gate x and W_up x of every layer, token and neuron of the model's own dense
    forward over ids, flattened alike (pair i is one neuron of one token in one layer)."""
    seen: dict[str, list[torch.Tensor]] = {"gate": [], "up": []}

    def on_pre(layer, branch, out):
        seen[branch].append(out.flatten().float())

    with on_gate_up(model, on_pre):
        model(input_ids=torch.tensor([ids]), use_cache=False)
    return torch.cat(seen["gate"]), torch.cat(seen["up"])


Pairs = dict[str, tuple[torch.Tensor, torch.Tensor]]


def run_histograms(store: ModelStore, left: SideSnapshot, right: SideSnapshot) -> dict[str, dict]:
    """The Neurons tab's activation histograms of each side that generated, by side label."""
    return {
        side_label(rec): activation_histograms(store.get(rec.model).model, rec.ids) for rec in float_sides(left, right)
    }


def run_pairs(store: ModelStore, last: list[tuple[str, str, list[int]]]) -> Pairs:
    """The measured pairs of each side of a session's last run (last_run's list), by label."""
    return {label: gate_up_pairs(store.get(model).model, ids) for model, label, ids in last}


def zero_share(variant: str, gate: torch.Tensor, up: torch.Tensor) -> float:
    """Share of the pairs at which the variant's h is exactly 0."""
    return float((VARIANTS[variant](gate, up) == 0).float().mean()) if len(gate) else 0.0


def plane(points: Pairs) -> dict:
    """The plot's plain data: a symmetric grid covering 99% of the measured |gate| and |up|
    (else [-4, 4]), h of each variant on it ([u][g]), the measured pairs subsampled, and the
    share of exact zeros of each variant on each side's measured pairs (all of them)."""
    values = [v.abs() for g, u in points.values() for v in (g, u) if len(v)]
    limit = float(torch.quantile(torch.cat(values)[:1_000_000], 0.99)) if values else 4.0
    limit = limit if math.isfinite(limit) and limit > 0 else 4.0
    axis = torch.linspace(-limit, limit, GRID)
    g, u = axis[None, :].expand(GRID, GRID), axis[:, None].expand(GRID, GRID)
    pick = torch.Generator().manual_seed(0)
    shown = {}
    for label, (pg, pu) in points.items():
        idx = torch.randperm(len(pg), generator=pick)[:PAIRS_PER_SIDE]
        shown[label] = (pg[idx].tolist(), pu[idx].tolist())
    return {
        "axis": axis.tolist(),
        "h": {name: fn(g, u).tolist() for name, fn in VARIANTS.items()},
        "points": shown,
        "zeros": {name: {label: zero_share(name, pg, pu) for label, (pg, pu) in points.items()} for name in VARIANTS},
    }

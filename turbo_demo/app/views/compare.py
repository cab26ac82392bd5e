"""What the app shows for a run, as plain functions of the run's snapshots (tested without a browser).

`compare_view` turns the two SideSnapshots into a CompareView (texts, status lines, headline and
the live figures); `neurons_view` into a NeuronsView (the runtime's firing counts, and the
activation distributions); `about_numbers`, `bench_numbers` and `training_curve` read what the
project's own commands wrote next to the embedded models (eval.json, bench.json, training log).
The page maps each view's fields to its components in one place.
"""

from dataclasses import dataclass

import plotly.graph_objects as go
import psutil

from turbo_demo.app.engine.catalog import EMBEDDED
from turbo_demo.app.engine.sides import SideSnapshot, speedup
from turbo_demo.app.plots import compare as plots
from turbo_demo.app.plots import moe as plots_moe
from turbo_demo.paths import MODELS_DIR, bench_results, eval_results, read_json
from turbo_demo.runtime.moe import routing_counts, routing_weights

MB = 2**20


def side_label(rec: SideSnapshot) -> str:
    return f"{rec.model} · {rec.mode}"


def side_markdown(rec: SideSnapshot) -> str:
    """One pane's status line: what runs, where its visitor's time went (load, warm-up, prefill,
    first token, then decode speed), how sparse, and any notice or error."""
    if rec.error:
        return f"**{side_label(rec)}**: ⚠️ {rec.error}"
    weights = f"{rec.quant} weights, {rec.dtype} activations" if rec.quant else rec.dtype
    parts = [f"**{side_label(rec)}**" + (f" ({rec.engine} engine, {weights})" if rec.engine else "")]
    if rec.steps:
        parts += [f"load {fmt_seconds(rec.load_s)}", f"warm-up {fmt_seconds(rec.warm_up_s)}"]
        if rec.prefill_s is not None:
            parts.append(f"prefill {fmt_seconds(rec.prefill_s)}")
        if rec.first_token_s is not None:
            parts.append(f"first token {fmt_seconds(rec.first_token_s)}")
        parts.append(f"{rec.tokens_per_s:,.1f} tokens/s (median step)")
        if rec.mean_sparsity is not None:
            parts.append(f"FFN sparsity {rec.mean_sparsity:.1%}")
        routed = mean_routed(rec)
        if routed:  # a MoE side: its FFN bytes against a dense MoE's and a dense FFN's of all experts
            read = sum(s.ffn_bytes for s in rec.steps) / len(rec.steps)
            everything = rec.steps[-1].ffn_bytes_dense
            parts.append(f"FFN bytes {read / routed:.0%} of the dense MoE's, {read / everything:.0%} of all experts'")
    if rec.notice:
        parts.append(f"_{rec.notice}_")
    return " · ".join(parts)


def headline(left: SideSnapshot, right: SideSnapshot) -> str:
    """The numbers above the plots: tokens/s each (1 / median step), speed-up (decode against
    decode), time to first token (prefill included, apart from the speed), mean sparsity, peak
    RSS, and each side's decode threads (the runtime's warm-up chose them: runtime/decoder.py)."""
    ratio = speedup(left, right)
    peak = max(left.peak_rss, right.peak_rss) / MB
    cells = [
        f"**Left** {left.tokens_per_s:,.1f} tok/s" if left.steps else "**Left** –",
        f"**Right** {right.tokens_per_s:,.1f} tok/s" if right.steps else "**Right** –",
        f"**Speed-up** ×{ratio:.2f}" if ratio else "**Speed-up** –",
        f"**First token** {fmt_seconds(left.first_token_s)} vs {fmt_seconds(right.first_token_s)}",
        f"**Sparsity** {fmt_share(left.mean_sparsity)} vs {fmt_share(right.mean_sparsity)}",
        f"**Peak RSS** {peak:,.0f} MB" if peak else "**Peak RSS** –",
    ]
    if left.threads or right.threads:
        cells.append(f"**Decode threads** {left.threads or '–'} vs {right.threads or '–'}")
    return " &nbsp;|&nbsp; ".join(cells)


def fmt_share(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def fmt_seconds(value: float | None) -> str:
    if value is None:
        return "–"
    if value == 0:  # a phase this request did not wait for (a model held, a runtime warm)
        return "0 s"
    return f"{value * 1000:,.1f} ms" if value < 1 else f"{value:,.2f} s"


def mean_per_layer(rows: list[list[float]]) -> list[float]:
    return [sum(col) / len(col) for col in zip(*rows)] if rows else []


@dataclass
class CompareView:
    """The Compare tab for a run as it is now."""

    left_text: str
    right_text: str
    left_prompt: str  # the text each model read: its chat template applied, where it has one
    right_prompt: str
    left_status: str
    right_status: str
    headline: str
    left_heatmap: go.Figure
    right_heatmap: go.Figure
    speed: go.Figure
    memory: go.Figure
    recall: go.Figure
    routing: go.Figure | None = None  # MoE sides only


def routing_view(sides: dict[str, SideSnapshot]) -> go.Figure | None:
    """The routing figure of the MoE sides that have generated (None where neither is MoE)."""
    shown = {}
    for label, rec in sides.items():
        if rec.moe and rec.steps:
            experts, _, top_k = rec.moe
            share = [[c / len(rec.steps) for c in row] for row in routing_counts(rec.steps, experts)]
            shown[label] = {"now": routing_weights(rec.steps[-1], experts), "share": share, "top_k": top_k}
    return plots_moe.routing_figure(shown) if shown else None


def mean_routed(rec: SideSnapshot) -> float | None:
    """A MoE side's mean FFN bytes per token of a dense MoE (router + the chosen experts in
    full); None for dense FFNs."""
    routed = [s.ffn_bytes_routed for s in rec.steps if s.ffn_bytes_routed is not None]
    return sum(routed) / len(routed) if routed else None


def compare_view(left: SideSnapshot, right: SideSnapshot) -> CompareView:
    """Texts, status lines, headline and figures for the Compare tab, from the two sides' snapshots."""
    sides = {side_label(r): r for r in (left, right)}
    ffn_read = {}
    for label, rec in (("left", left), ("right", right)):
        if rec.steps and rec.steps[-1].ffn_bytes_dense:
            mean_read = sum(s.ffn_bytes for s in rec.steps) / len(rec.steps)
            routed = mean_routed(rec)
            ffn_read[label] = (mean_read / MB, rec.steps[-1].ffn_bytes_dense / MB, routed and routed / MB)
    recall = {
        label: mean_per_layer([s.recall for s in rec.steps if s.recall is not None])
        for label, rec in sides.items()
        if any(s.recall is not None for s in rec.steps)
    }
    return CompareView(
        left_text=left.text,
        right_text=right.text,
        left_prompt=left.rendered_prompt,
        right_prompt=right.rendered_prompt,
        left_status=side_markdown(left),
        right_status=side_markdown(right),
        headline=headline(left, right),
        left_heatmap=plots.activity_heatmap(
            [s.active_share for s in left.steps], f"Active FFN neurons: {side_label(left)}", "heat-left"
        ),
        right_heatmap=plots.activity_heatmap(
            [s.active_share for s in right.steps], f"Active FFN neurons: {side_label(right)}", "heat-right"
        ),
        speed=plots.speed_figure({label: [s.time_s for s in rec.steps] for label, rec in sides.items()}),
        memory=plots.memory_figure(
            psutil.Process().memory_info().rss / MB,
            {"left": left.weight_bytes / MB, "right": right.weight_bytes / MB},
            ffn_read,
        ),
        recall=plots.recall_figure(recall),
        routing=routing_view(sides),
    )


@dataclass
class NeuronsView:
    """The Neurons tab: each side's firing frequency (None where a side has nothing to show)
    and the activation histograms of the sides that ran."""

    left_firing: go.Figure | None
    right_firing: go.Figure | None
    hist: go.Figure | None


def firing_shares(rec: SideSnapshot) -> list[list[float]] | None:
    """Per layer and neuron, the share of the run's decode steps in which the neuron fired,
    from the runtime's own counts (h != 0 among the neurons the side's mode computed)."""
    if rec.error or not rec.steps or not rec.firing_counts or not rec.firing_counts[0]:
        return None
    return [[c / len(rec.steps) for c in layer] for layer in rec.firing_counts]


def neurons_view(left: SideSnapshot, right: SideSnapshot, hists: dict[str, dict]) -> NeuronsView:
    """Firing heatmaps from the snapshots, and histograms (keyed by side label) drawn together."""
    figures = []
    for rec, key in ((left, "firing-left"), (right, "firing-right")):
        shares = firing_shares(rec)
        experts = rec.moe[0] if rec.moe else 1  # a MoE side: each expert's neurons hot to cold
        title = f"Neuron firing frequency over the decode steps: {side_label(rec)}"
        title += f" (experts 0-{experts - 1} left to right)" if experts > 1 else ""
        figures.append(None if shares is None else plots.firing_figure(shares, title, key, blocks=experts))
    return NeuronsView(figures[0], figures[1], plots.histogram_figure(hists) if hists else None)


def about_numbers() -> str:
    """A markdown table of the embedded models' eval.json (written by the eval command)."""
    rows = []
    for name, folder in EMBEDDED.items():
        ev = eval_results(MODELS_DIR / folder)
        log = read_json(MODELS_DIR / folder / "training_log.json") or {}
        l1 = log.get("settings", {}).get("l1")
        how = f"{log.get('preset', '?')}" + (f" + L1 {l1:g}" if l1 else "")
        if ev:
            topk = ev["topk_perplexity"]
            rows.append(
                f"| {name} | {how} | {ev['perplexity']:.2f} | {sparsity_cell(ev)} | "
                f"{topk['0.5']:.2f} / {topk['0.8']:.2f} / {topk['0.9']:.2f} |"
            )
    if not rows:
        return "_No eval.json next to the embedded models: run `python -m turbo_demo eval DIR --json`._"
    head = (
        "| model | trained as | held-out perplexity | FFN sparsity | top-k perplexity at 50 / 80 / 90% |\n"
        "|---|---|---|---|---|\n"
    )
    return (
        head + "\n".join(rows) + "\n\n_The L1 penalty (ProSparse-style) raises sparsity beyond plain "
        "dReLU; docs/embedded-models.md gives plain dReLU's numbers from the same budget. A MoE model's FFN sparsity "
        "counts all its experts' neurons (routing leaves 6 of 8 experts idle); inside the chosen experts "
        "in brackets._"
    )


def sparsity_cell(ev: dict) -> str:
    """FFN sparsity of one eval.json: over all experts' neurons for a MoE model (in-expert after)."""
    moe = ev.get("moe")
    if moe:
        return f"{moe['total_sparsity_mean']:.1%} ({ev['sparsity']['mean']:.1%} in-expert)"
    return f"{ev['sparsity']['mean']:.1%}"


def bench_numbers() -> str:
    """The end-to-end rows of assets/bench.json (written by the bench command), as markdown."""
    bench = bench_results()
    if not bench:
        return "_No assets/bench.json yet: run `python -m turbo_demo bench --json`._"
    rows = [
        f"| {e['model']} | {e.get('dtype', '?')} | {e.get('quant') or '-'} | {e['engine']} | "
        f"{e['tokens_per_s']:,.1f} | {e.get('speedup_vs_dense', 0):.2f}x |"
        for e in bench.get("e2e", [])
    ]
    return (
        "| model | dtype | weights | engine | tokens/s | vs our dense |\n|---|---|---|---|---|---|\n"
        + "\n".join(rows)
        + f"\n\n_Machine: {bench['machine'].get('cpu', '?')}, {bench['machine'].get('threads', '?')} threads._"
    )


def training_curve():
    log = read_json(MODELS_DIR / EMBEDDED["TurboSparse dReLU"] / "training_log.json")
    if not log:
        return None
    return plots.training_figure(log["steps"], "How sparsity emerges while the embedded dReLU model trains")

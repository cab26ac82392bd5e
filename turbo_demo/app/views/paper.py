"""The paper beside ours, as plain data read from what the project's commands wrote: the FFN
speed against its bandwidth limit (bench.json), and one table of the paper's figures with our
measured counterparts (eval.json, bench.json) and the commands that produced them.

Bytes a batch-1 FFN step must read, for hidden H, intermediate I, b bytes a weight, and
k = (1 - s) I active neurons at sparsity s (the bench's synthetic layers: the gate is positive
exactly on the active neurons):
    dense, transformers   3 H I b                      (W_gate, W_up, W_down in full)
    exact                 H I b + 2 k H b              (the gate in full, up and down rows of k)
    predictor             r H b + 3 k H b              (fc1 of rank r, then k rows of each matrix;
                                                        fc2's rows, read where relu(fc1 x) != 0,
                                                        are left out: the limit is a lower bound)
Each mode's time cannot go below its bytes / the machine's measured read bandwidth.
"""

from turbo_demo import paper_figures
from turbo_demo.app.engine.catalog import EMBEDDED
from turbo_demo.paths import MODELS_DIR, bench_results, eval_results

BENCH_RANK = 256  # the bench's predictor rank (bench.common.Settings.rank)
LIMIT_MODES = ("transformers", "dense", "exact", "predictor")


def bytes_read(mode: str, hidden: int, inter: int, sparsity: float, elem: int = 2, rank: int = BENCH_RANK) -> int:
    """The bytes one FFN step of `mode` must read (module docstring)."""
    k = round((1 - sparsity) * inter)
    if mode in ("dense", "transformers"):
        return 3 * hidden * inter * elem
    if mode == "exact":
        return hidden * inter * elem + 2 * k * hidden * elem
    if mode == "predictor":
        return rank * hidden * elem + 3 * k * hidden * elem
    raise ValueError(f"no byte count for mode {mode!r}")


def speed_limits(bench: dict | None = None) -> dict:
    """{shape: {mode: {"sparsity": [...], "ms": [...], "limit_ms": [...]}}} from bench.json's FFN
    rows, with "gbps", the bandwidth the limits divide by ({} without a bench.json)."""
    bench = bench_results() if bench is None else bench
    if not bench or not bench.get("ffn"):
        return {}
    gbps = bench["machine"]["read_gbps"]
    elem = 4 if bench["machine"].get("dtype") == "float32" else 2
    shapes: dict = {}
    for row in bench["ffn"]:
        hidden, inter = (int(v) for v in row["shape"].split("x"))
        curve = shapes.setdefault(row["shape"], {}).setdefault(row["mode"], {"sparsity": [], "ms": [], "limit_ms": []})
        curve["sparsity"].append(row["sparsity"])
        curve["ms"].append(row["ms"])
        curve["limit_ms"].append(bytes_read(row["mode"], hidden, inter, row["sparsity"], elem) / (gbps * 1e9) * 1e3)
    return {"gbps": gbps, "shapes": shapes}


NO_MOE = "– (no eval.json next to the embedded MoE pair)"
EVAL = "`python -m turbo_demo eval DIR --json` (held-out split)"
BENCH = "`python -m turbo_demo bench --json`"
Row = tuple[str, str, str, str]  # (figure, the paper's value, ours, the command that measured ours)


def eval_of(folder: str) -> dict:
    return eval_results(MODELS_DIR / folder) or {}


def e2e_row(bench: dict, model: str, engine: str, quant: str | None = None) -> dict:
    rows = [r for r in bench.get("e2e", []) if (r["model"], r["engine"], r.get("quant")) == (model, engine, quant)]
    return rows[0] if rows else {}


def topk_rise(ev: dict) -> float:
    """The rise of perplexity at the paper's top-k sparsity over the model's own (eval.json)."""
    return ev["topk_perplexity"][str(paper_figures.TOPK_SPARSITY[-1])] / ev["perplexity"] - 1


def paper_topk_rise(ffn: str) -> float:
    """The same rise in the paper's Table 3, for its dReLU or SwiGLU model."""
    ppl = paper_figures.TOPK_PERPLEXITY[ffn]
    return ppl[-1] / ppl[0] - 1


def speedups(by_machine: dict[str, float]) -> str:
    return ", ".join(f"{v:.2f}x ({m})" for m, v in by_machine.items())


def paper_rows(bench: dict | None = None) -> list[Row]:
    """One row per paper figure; ours says why where this project has not measured it."""
    bench = bench_results() if bench is None else bench
    bench = bench or {}
    dense, drelu = eval_of(EMBEDDED["Dense SwiGLU"]), eval_of(EMBEDDED["TurboSparse dReLU"])
    rows = []
    if drelu:
        rows.append(sparsity_row(drelu))
    if dense and drelu:
        rows += quality_rows(dense, drelu)
    if speed := speed_row(bench):
        rows.append(speed)
    return [*rows, moe_idle_row(), moe_speed_row(bench)]


def sparsity_row(drelu: dict) -> Row:
    return (
        "FFN sparsity (share of neurons with h = 0)",
        f"~{paper_figures.SPARSITY:.0%} ({paper_figures.MODEL})",
        f"{drelu['sparsity']['mean']:.1%} (embedded dReLU + L1, 5M parameters)",
        EVAL,
    )


def quality_rows(dense: dict, drelu: dict) -> list[Row]:
    """dReLU against SwiGLU: perplexity as trained, and its rise at the paper's top-k sparsity."""
    paper = paper_figures.TOPK_PERPLEXITY
    return [
        (
            "Perplexity, dReLU vs SwiGLU, same data and budget",
            f"{paper['dReLU'][0]} vs {paper['SwiGLU'][0]} ({paper_figures.TOPK_MODEL_SIZE}, WikiText-2)",
            f"{drelu['perplexity']:.2f} vs {dense['perplexity']:.2f} (5M, Python's stdlib)",
            EVAL,
        ),
        (
            f"Top-k {paper_figures.TOPK_SPARSITY[-1]:.0%} sparsity: perplexity rise, SwiGLU vs dReLU",
            f"+{paper_topk_rise('SwiGLU'):.1%} vs +{paper_topk_rise('dReLU'):.1%} "
            f"({paper['SwiGLU'][-1]}, {paper['dReLU'][-1]})",
            f"+{topk_rise(dense):.1%} vs +{topk_rise(drelu):.1%}",
            EVAL,
        ),
    ]


def speed_row(bench: dict) -> Row | None:
    """The 7b-shape stack's predictor decoding against our dense, llama.cpp's and transformers'
    (None without its e2e row in bench.json)."""
    pred, hf = e2e_row(bench, "7b-shape", "predictor"), e2e_row(bench, "7b-shape", "transformers")
    llama = e2e_row(bench, "7b-shape", "llama.cpp", "f16")
    if not pred:
        return None
    ours = f"{pred['speedup_vs_dense']:.2f}x over our dense at {pred['sparsity']:.0%} sparsity"
    if llama:
        ours += f", {pred['tokens_per_s'] / llama['tokens_per_s']:.2f}x over llama.cpp F16 dense"
    if hf:
        ours += f", {pred['tokens_per_s'] / hf['tokens_per_s']:.1f}x over transformers"
    ranks = pred.get("predictor_ranks")
    at = f", predictor ranks {min(ranks)}-{max(ranks)}" if ranks else ""
    return (
        "CPU decoding speed-up, batch 1, 7B shape",
        f"{speedups(paper_figures.SPEEDUPS)} over llama.cpp dense, FP16",
        ours + f" (8 random layers{at}, bf16)",
        BENCH,
    )


def moe_idle_row() -> Row:
    """Idle neurons per MoE layer, by routing alone and with dReLU (the embedded MoE pair's eval.json)."""
    sparse_moe, dense_moe = eval_of(EMBEDDED["TurboSparse MoE"]), eval_of(EMBEDDED["Dense MoE"])
    moe_ev = sparse_moe.get("moe")
    idle = NO_MOE
    if moe_ev:
        idle = (
            f"{moe_ev['expert_sparsity']:.0%} -> {moe_ev['total_sparsity_mean']:.1%} (embedded dReLU MoE, "
            f"{moe_ev['experts']} experts, top-{moe_ev['top_k']}"
            + (
                f"; perplexity {sparse_moe['perplexity']:.2f} vs dense MoE {dense_moe['perplexity']:.2f})"
                if dense_moe
                else ")"
            )
        )
    routed, with_drelu = paper_figures.MOE_IDLE
    return (
        "MoE: idle neurons per layer, routing -> with dReLU",
        f"{routed:.0%} -> {with_drelu:.0%} ({paper_figures.MOE_MODEL})",
        idle,
        EVAL if moe_ev else "–",
    )


def moe_speed_row(bench: dict) -> Row:
    moe = {r["mode"]: r for r in bench.get("moe", [])}
    ours = "– (no MoE rows in assets/bench.json yet)"
    if "predictor" in moe:
        p = moe["predictor"]
        ours = (
            f"{p['speedup']:.2f}x our dense MoE, {p['speedup_vs_transformers']:.1f}x transformers' "
            f"({p['layers']} random {p['shape']} layer(s), {p['in_expert_sparsity']:.0%} in-expert sparsity)"
        )
    return (
        "MoE CPU decoding speed-up",
        f"{speedups(paper_figures.MOE_SPEEDUPS)} over llama.cpp dense, Mixtral-47B INT4",
        ours,
        BENCH,
    )


def paper_table(bench: dict | None = None) -> str:
    """paper_rows as a markdown table."""
    lines = ["| the paper's figure | paper | ours | measured by |", "|---|---|---|---|"]
    return "\n".join(lines + [f"| {' | '.join(row)} |" for row in paper_rows(bench)])

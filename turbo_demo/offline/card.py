"""Model cards for the embedded checkpoints, written from the files the project's commands left
in the checkpoint directory: training_log.json (train), eval.json (eval --json),
predictors.json (predictors --json) and quant_eval.json (eval --quant --json). Nothing in a
card is typed by hand."""

import json
from pathlib import Path

from turbo_demo.errors import UserError
from turbo_demo.paths import eval_results, read_json

HOW = {
    "dense": "A dense Mistral model with a SwiGLU FFN, trained from scratch",
    "drelu": "A TurboSparse-style dReLU model (bamboo), trained from scratch with the same shape, "
    "data order and budget as the dense model",
    "relufy": "The dense SwiGLU model ReLUfied: its SwiGLU swapped for dReLU, then trained further",
    "moe-dense": "A dense mixture-of-experts model (Mixtral: SwiGLU experts, top-2 of 8), trained from scratch",
    "moe-drelu": "A TurboSparse-Mixtral-style model (dReLU experts, top-2 of 8, a predictor per expert), "
    "trained from scratch with the same shape, data order and budget as the dense MoE",
}


def card_text(path: Path) -> str:
    log, ev = read_json(path / "training_log.json"), eval_results(path)
    if not log or not ev:
        raise UserError(f"{path} needs training_log.json and eval.json (from the train and eval commands)")
    s, shape, final = log["settings"], log["shape"], log["final"]
    penalty = (
        f"plus an L1 penalty on the FFN activation (lambda {s['l1']:g}, ramped in over the "
        f"first {s['l1_ramp']:.0%} of steps, ProSparse-style)"
        if s["l1"]
        else "no sparsity penalty"
    )
    lines = [
        "---",
        "license: mit",
        "library_name: transformers",
        "---",
        "",
        f"# {path.name}",
        "",
        f"{HOW[log['preset']]}; {penalty}. Part of TurboSparse Studio; load it with "
        "`from turbo_demo.models import register_auto_classes; register_auto_classes()` then "
        "`AutoModelForCausalLM.from_pretrained(dir)` (no remote code).",
        "",
        "## Training",
        "",
        f"- Architecture: {log['architecture']}, hidden {shape['hidden_size']}, FFN "
        f"{shape['intermediate_size']}{experts_text(shape)}, {shape['num_hidden_layers']} layers, "
        f"{shape['num_attention_heads']} heads ({shape['num_key_value_heads']} KV), vocabulary "
        f"{shape['vocab_size']} (byte-level BPE trained on the same corpus), activation `{log['hidden_act']}`.",
        "- Data: the Python standard library's own sources (code, docstrings, pydoc topics), "
        "split by file; held-out files are never trained on.",
        f"- {s['steps']} steps of {s['batch_size']} x {s['seq_len']} tokens ({final['tokens']:,} tokens), "
        f"AdamW (0.9, 0.95), peak LR {s['lr']:g}, cosine to {s['min_lr']:g}, seed {s['seed']}, "
        f"{final['elapsed_s'] / 60:.0f} minutes on {log.get('threads', 1)} CPU thread(s).",
        *(
            [f"- Load balancing: Mixtral's auxiliary loss at weight {s['router_loss']:g}."]
            if s.get("router_loss")
            else []
        ),
        f"- Reproduce: `python -m turbo_demo --threads {log.get('threads', 1)} train --preset {log['preset']}"
        + (f" --l1 {s['l1']:g}" if log["preset"] == "drelu" and s["l1"] == 0 else "")
        + " --out DIR`.",
        "",
        "## Evaluation",
        "",
        "`python -m turbo_demo eval DIR --json` printed:",
        "",
        "```json",
        json.dumps(ev),
        "```",
        "",
        *moe_lines(ev.get("moe")),
    ]
    pred = read_json(path / "predictors.json")
    if pred:
        rank = pred["rank"] if isinstance(pred["rank"], int) else ",".join(map(str, pred["rank"]))
        options = f"--rank {rank} --tokens {pred['train_tokens']} --target-recall {pred['target_recall']}" + (
            f" --steps {pred['steps']}" if "steps" in pred else ""
        )
        lines += [
            "## Activation predictors",
            "",
            f"`python -m turbo_demo predictors DIR {options} --json` printed:",
            "",
            "```json",
            json.dumps(pred),
            "```",
            "",
        ]
    return "\n".join(lines + quant_lines(read_json(path / "quant_eval.json")))


def experts_text(shape: dict) -> str:
    if "num_local_experts" not in shape:
        return ""
    return f" per expert, {shape['num_local_experts']} experts (top-{shape['num_experts_per_tok']} routing)"


def moe_lines(moe: dict | None) -> list[str]:
    """The card's per-layer table of expert-level, in-expert and total sparsity (eval.json's moe)."""
    if not moe:
        return []
    k, e = moe["top_k"], moe["experts"]
    lines = [
        "### Sparsity per layer",
        "",
        f"Expert-level: top-{k} of {e} leaves {moe['expert_sparsity']:.0%} of a layer's experts idle per token. "
        "In-expert: exactly-zero h inside the chosen experts. Total: share of all the layer's neurons idle, "
        f"1 - ({k}/{e}) * (1 - in-expert). Expert share: how often each expert was chosen.",
        "",
        "| layer | expert-level | in-expert | total | expert share (min / max) |",
        "|---|---|---|---|---|",
    ]
    for i, (inside, total, share) in enumerate(
        zip(moe["in_expert_sparsity"], moe["total_sparsity"], moe["expert_share"])
    ):
        lines.append(
            f"| {i} | {moe['expert_sparsity']:.1%} | {inside:.1%} | {total:.1%} | {min(share):.1%} / {max(share):.1%} |"
        )
    return [*lines, f"| mean | | | {moe['total_sparsity_mean']:.1%} | |", ""]


def quant_lines(q: dict | None) -> list[str]:
    """The card's table of the runtime's quality at each block format (quant_eval.json)."""
    if not q:
        return []
    base = q["rows"][0]["perplexity"]
    modes = list(q["rows"][0]["agreement"])
    head = "| weights | perplexity | FFN sparsity | predictor recall | predicted sparsity | " + " | ".join(
        f"{m}: greedy agreement (free / forced)" for m in modes
    )
    lines = [
        "## Quantized weights",
        "",
        f"`python -m turbo_demo eval DIR --quant int8,int4 --max-tokens {q['tokens']} --json` (lean runtime, "
        f"{q['backend']} kernels, activations in {q['dtype']}; teacher-forced over {q['tokens']} held-out "
        f"tokens in windows of {q['window']}; agreement with the float model over {q['prompts']} prompts x "
        f"{q['new_tokens']} greedy tokens, see offline/quant_eval.py):",
        "",
        head + " |",
        "|" + "---|" * (5 + len(modes)),
    ]
    for r in q["rows"]:

        def share(v):
            return "-" if v is None else f"{v:.1%}"

        cells = [
            r["weights"],
            f"{r['perplexity']:.3f} ({r['perplexity'] / base - 1:+.2%})",
            share(r["sparsity"]),
            "-" if r["predictor_recall"] is None else f"{r['predictor_recall']:.4f}",
            share(r["predicted_sparsity"]),
            *(f"{r['agreement'][m]:.1%} / {r['forced_agreement'][m]:.1%}" for m in modes),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, "", "```json", json.dumps(q), "```", ""]


def write_card(path: str) -> Path:
    out = Path(path) / "README.md"
    out.write_text(card_text(Path(path)))
    return out

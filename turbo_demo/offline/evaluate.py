"""Held-out loss, perplexity, FFN sparsity per layer, and perplexity under top-k pruning.

Sparsity (the paper's definition): the share of FFN neurons whose combined activation h is
exactly zero, over every token and neuron of a layer. Top-k perplexity (the paper's Table 3):
per token, keep only the (1 - k) share of neurons with the largest |h|, zero the rest.
The sweep (`eval` writes it as "topk_sweep") runs the same top-k perplexity at every sparsity
of SWEEP_SPARSITIES; at 0 nothing is pruned, so its perplexity is the model's own. The app's
sweep of a visitor's text is `text_sweep`: the same function on one short window.
A mixture-of-experts model is scored as its dReLU (or SwiGLU) experts alone, without predictor
masks; its sparsity is per routed token (moe_eval.py adds the routing), and "with_predictors"
is the published forward's loss, masks included.
"""

import math
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from turbo_demo.checkpoints.checkpoint import load_model, load_tokenizer
from turbo_demo.errors import UserError
from turbo_demo.models.hooks import hook_lock, on_ffn_activation
from turbo_demo.offline import corpus
from turbo_demo.offline.moe_eval import counting_routes, masked_experts, moe_summary, unmasked
from turbo_demo.runtime.moe import is_moe

TOPK_SPARSITIES = (0.5, 0.8, 0.9)
SWEEP_SPARSITIES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
TEXT_SWEEP_TOKENS = 512  # a visitor's text is scored on its first this many tokens at most


def keep_top(h: torch.Tensor, sparsity: float) -> torch.Tensor:
    """h (..., I) with all but the ceil((1 - sparsity) * I) largest |h_i| per token set to 0."""
    keep = max(1, math.ceil((1 - sparsity) * h.size(-1)))
    idx = h.abs().topk(keep, dim=-1).indices
    return torch.zeros_like(h).scatter_(-1, idx, h.gather(-1, idx))


def eval_tokens(tokenizer, text_file: str | None) -> tuple[torch.Tensor, str]:
    """The token stream to evaluate on, and a name for it: a text file, or the held-out split."""
    if text_file is None:
        return corpus.encode_split(tokenizer, "heldout"), "heldout split"
    path = Path(text_file)
    if not path.is_file():
        raise UserError(f"text file not found: {path}")
    ids = tokenizer(path.read_text(encoding="utf-8", errors="replace"))["input_ids"]
    if len(ids) < 2:
        raise UserError(f"{path} holds fewer than 2 tokens: nothing to evaluate")
    return torch.tensor(ids, dtype=torch.int32), str(path)


@torch.no_grad()
def mean_loss(model, tokens, seq_len: int, max_tokens: int, batch_size: int = 8) -> tuple[float, int]:
    """Mean next-token cross-entropy over non-overlapping windows, and the tokens scored."""
    total, count = 0.0, 0
    for x, y in corpus.sequential_batches(tokens, batch_size, seq_len, max_tokens):
        logits = model(input_ids=x, use_cache=False).logits
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    return total / count, count


def topk_perplexity(model, tokens, seq_len: int, max_tokens: int, sparsity: float) -> float:
    """Perplexity with each layer's h pruned to its top (1 - sparsity) share by |h|, per token."""
    with on_ffn_activation(model, lambda layer, h: keep_top(h, sparsity)):
        return math.exp(mean_loss(model, tokens, seq_len, max_tokens)[0])


def sweep(model, tokens, seq_len: int, max_tokens: int, base_loss: float, sparsities=SWEEP_SPARSITIES) -> dict:
    """{"sparsity": [...], "perplexity": [...]}: top-k perplexity at each sparsity (rounded as
    eval.json keeps it); at 0 the unpruned perplexity exp(base_loss)."""
    values = [
        math.exp(base_loss) if k == 0 else topk_perplexity(model, tokens, seq_len, max_tokens, k) for k in sparsities
    ]
    return {"sparsity": list(sparsities), "perplexity": [round(v, 4) for v in values]}


def text_sweep(model, tokenizer, text: str, max_tokens: int = TEXT_SWEEP_TOKENS) -> dict:
    """The sweep on a visitor's text: its first max_tokens tokens (at most the model's context)
    as one window; "tokens" says how many were scored."""
    ids = tokenizer(text or "")["input_ids"]
    context = getattr(model.config, "max_position_embeddings", max_tokens + 1)
    ids = ids[: min(max_tokens, context) + 1]
    if len(ids) < 2:
        raise UserError("the text gives fewer than 2 tokens: nothing to score")
    tokens = torch.tensor(ids, dtype=torch.int32)
    seq_len = len(ids) - 1
    with hook_lock(model):  # the unpruned baseline: no other thread's pruning hooks meanwhile
        loss, n = mean_loss(model, tokens, seq_len, seq_len, batch_size=1)
    return {**sweep(model, tokens, seq_len, seq_len, loss), "tokens": n}


def evaluate(
    model, tokens: torch.Tensor, seq_len: int = 256, max_tokens: int = 131072, with_sweep: bool = False
) -> dict:
    """Loss, perplexity, sparsity per layer and top-k perplexity at TOPK_SPARSITIES; with_sweep:
    also "topk_sweep" over SWEEP_SPARSITIES (TOPK_SPARSITIES are among them, computed once)."""
    seq_len = min(seq_len, len(tokens) - 1)
    zeros, seen = {}, {}

    def count_zeros(layer, h):
        zeros[layer] = zeros.get(layer, 0) + (h == 0).sum().item()
        seen[layer] = seen.get(layer, 0) + h.numel()

    routing = counting_routes(model) if is_moe(model) else nullcontext()
    with on_ffn_activation(model, count_zeros), routing as counts:
        loss, n = mean_loss(model, tokens, seq_len, max_tokens)
    per_layer = [zeros[i] / seen[i] for i in sorted(zeros)]
    curve = sweep(model, tokens, seq_len, max_tokens, loss, SWEEP_SPARSITIES if with_sweep else TOPK_SPARSITIES)
    at = dict(zip(curve["sparsity"], curve["perplexity"]))
    topk = {str(k): at[k] for k in TOPK_SPARSITIES}
    return {
        "loss": round(loss, 4),
        "perplexity": round(math.exp(loss), 4),
        "tokens": n,
        "sparsity": {"mean": round(sum(per_layer) / len(per_layer), 4), "per_layer": [round(s, 4) for s in per_layer]},
        "topk_perplexity": topk,
        **({"topk_sweep": curve} if with_sweep else {}),
        **({"moe": moe_summary(model.config, per_layer, counts)} if counts is not None else {}),
    }


def evaluate_dir(model_dir: str, text_file: str | None = None, max_tokens: int = 131072) -> dict:
    model = load_model(model_dir)
    tokens, source = eval_tokens(load_tokenizer(model_dir), text_file)
    masks = bool(masked_experts(model))
    with unmasked(model):
        result = evaluate(model, tokens, max_tokens=max_tokens, with_sweep=True)
    if masks:
        loss, _ = mean_loss(model, tokens, min(256, len(tokens) - 1), max_tokens)
        result["with_predictors"] = {"loss": round(loss, 4), "perplexity": round(math.exp(loss), 4)}
    return {"model": str(model_dir), "text": source, **result}

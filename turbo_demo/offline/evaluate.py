"""Held-out loss, perplexity, FFN sparsity per layer, and perplexity under top-k pruning.

Sparsity (the paper's definition): the share of FFN neurons whose combined activation h is
exactly zero, over every token and neuron of a layer. Top-k perplexity (the paper's Table 3):
per token, keep only the (1 - k) share of neurons with the largest |h|, zero the rest.
"""

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from turbo_demo.errors import UserError
from turbo_demo.model.checkpoint import load_model, load_tokenizer
from turbo_demo.model.hooks import on_ffn_activation
from turbo_demo.offline import corpus

TOPK_SPARSITIES = (0.5, 0.8, 0.9)


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


def evaluate(model, tokens: torch.Tensor, seq_len: int = 256, max_tokens: int = 131072) -> dict:
    seq_len = min(seq_len, len(tokens) - 1)
    zeros, seen = {}, {}

    def count_zeros(layer, h):
        zeros[layer] = zeros.get(layer, 0) + (h == 0).sum().item()
        seen[layer] = seen.get(layer, 0) + h.numel()

    with on_ffn_activation(model, count_zeros):
        loss, n = mean_loss(model, tokens, seq_len, max_tokens)
    per_layer = [zeros[i] / seen[i] for i in sorted(zeros)]
    topk = {}
    for k in TOPK_SPARSITIES:
        with on_ffn_activation(model, lambda layer, h, k=k: keep_top(h, k)):
            topk[str(k)] = round(math.exp(mean_loss(model, tokens, seq_len, max_tokens)[0]), 4)
    return {
        "loss": round(loss, 4),
        "perplexity": round(math.exp(loss), 4),
        "tokens": n,
        "sparsity": {"mean": round(sum(per_layer) / len(per_layer), 4), "per_layer": [round(s, 4) for s in per_layer]},
        "topk_perplexity": topk,
    }


def evaluate_dir(model_dir: str, text_file: str | None = None, max_tokens: int = 131072) -> dict:
    model = load_model(model_dir)
    tokens, source = eval_tokens(load_tokenizer(model_dir), text_file)
    result = evaluate(model, tokens, max_tokens=max_tokens)
    return {"model": str(model_dir), "text": source, **result}

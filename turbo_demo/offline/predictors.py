"""Activation predictors (PowerInfer / Deja Vu): collect, train, calibrate, store in the checkpoint.

For layer l, with r the residual stream just before the FFN's RMSNorm (the input of
post_attention_layernorm) and h the FFN's combined activation:

    label_i = 1[h_i != 0]                   (I,) per token
    score   = fc2(relu(fc1(r)))             fc1: H -> rank, fc2: rank -> I, no biases
    loss    = BCEWithLogits(score, label, pos_weight = sqrt(#neg / #pos))

trained on tokens of the training split. Each layer's threshold is then lowered from 0 until
recall (share of truly active neurons predicted active) reaches `target_recall` on held-out
tokens. Predictors are stored as `model.layers.{l}.mlp.predictor.fc1/fc2` (the published
TurboSparse layout) with `predictor_rank` and per-layer `predictor_threshold` in config.json.
A TurboSparse-Mixtral model gets one predictor per expert instead (moe_predictors.py).
"""

from contextlib import ExitStack
from pathlib import Path

import torch
from tqdm import tqdm

from turbo_demo.checkpoints.checkpoint import load_model, load_tokenizer
from turbo_demo.checkpoints.config import load_config
from turbo_demo.errors import UserError
from turbo_demo.models.bamboo import BambooForCausalLM
from turbo_demo.models.hooks import on_ffn_activation
from turbo_demo.models.mixtral import TurboSparseMixtralForCausalLM
from turbo_demo.offline import corpus
from turbo_demo.offline.fitting import SEQ_LEN, calibrate, hook_input, save_weights_in_place, train_layer
from turbo_demo.offline.moe_predictors import train_expert_predictors


@torch.no_grad()
def collect(model, tokens: torch.Tensor, n_tokens: int, seq_len: int = SEQ_LEN):
    """Per layer: residuals (n, H) and labels h != 0 (n, I) bool, from the first n tokens."""
    rs, labels = {}, {}
    with ExitStack() as stack:
        for i, layer in enumerate(model.model.layers):
            stack.enter_context(
                hook_input(layer.post_attention_layernorm, lambda r, i=i: rs.setdefault(i, []).append(r.flatten(0, 1)))
            )
        stack.enter_context(
            on_ffn_activation(model, lambda i, h: labels.setdefault(i, []).append((h != 0).flatten(0, 1)))
        )
        for x, _ in tqdm(list(corpus.sequential_batches(tokens, 8, seq_len, n_tokens)), desc="collect"):
            model(input_ids=x, use_cache=False)
    return ([torch.cat(rs[i]).float() for i in sorted(rs)], [torch.cat(labels[i]) for i in sorted(labels)])


def train_predictors(
    model_dir: str,
    rank: int | list[int] = 64,
    train_tokens: int = 65536,
    val_tokens: int = 16384,
    steps: int = 600,
    target_recall: float = 0.97,
    seed: int = 0,
) -> dict:
    """Train, calibrate and store predictors in `model_dir`; returns per-layer statistics.

    rank: one rank for every layer, or a list with one per layer (PowerInfer sizes them per layer).
    """
    if not 0 < target_recall <= 1:
        raise UserError(f"--target-recall must be in (0, 1], got {target_recall}")
    if train_tokens < SEQ_LEN:
        raise UserError(f"--tokens must be at least one sequence of {SEQ_LEN} tokens, got {train_tokens}")
    if val_tokens < SEQ_LEN:
        raise UserError(f"val_tokens must be at least one sequence of {SEQ_LEN} tokens, got {val_tokens}")
    stored_dtype = load_config(model_dir).dtype  # keep the checkpoint's own (16-bit) dtype
    model = load_model(model_dir)
    if isinstance(rank, list) and len(rank) != model.config.num_hidden_layers:
        raise UserError(f"--rank lists {len(rank)} ranks for {model.config.num_hidden_layers} layers")
    tokenizer = load_tokenizer(model_dir)
    if isinstance(model, TurboSparseMixtralForCausalLM):
        return train_expert_predictors(
            model, tokenizer, model_dir, rank, train_tokens, val_tokens, steps, target_recall, seed, stored_dtype
        )
    if not isinstance(model, BambooForCausalLM):
        raise UserError(
            f"predictors need a dReLU (bamboo) model whose neurons are exactly zero; "
            f"{model_dir} is a {type(model).__name__}"
        )
    r_train, y_train = collect(model, corpus.encode_split(tokenizer, "train"), train_tokens)
    r_val, y_val = collect(model, corpus.encode_split(tokenizer, "heldout"), val_tokens)
    layers = []
    for i, mlp in enumerate(tqdm([layer.mlp for layer in model.model.layers], desc="train predictors")):
        layer_rank = rank[i] if isinstance(rank, list) else rank
        mlp.predictor = train_layer(r_train[i], y_train[i], layer_rank, steps, seed + i)
        layers.append({"layer": i, **calibrate(mlp.predictor, r_val[i], y_val[i], target_recall)})
    model.config.predictor_rank = rank
    model.config.predictor_threshold = [entry["threshold"] for entry in layers]
    save_weights_in_place(model, Path(model_dir), stored_dtype)
    ffn = sum(3 * m.down_proj.weight.numel() for m in (layer.mlp for layer in model.model.layers))
    extra = sum(p.numel() for layer in model.model.layers for p in layer.mlp.predictor.parameters())
    return {
        "model": str(model_dir),
        "rank": rank,
        "steps": steps,
        "train_tokens": len(r_train[0]),
        "val_tokens": len(r_val[0]),
        "target_recall": target_recall,
        "predictor_share_of_ffn": round(extra / ffn, 4),
        "layers": layers,
    }

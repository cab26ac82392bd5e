"""Per-expert activation predictors for a TurboSparse-Mixtral model, in the published layout.

For expert e of layer l, with x the expert's routed input (the normed hidden state of each token
the router sends to e, top-k of the router's softmax) and h_e = relu(w1_e x) * relu(w3_e x):

    label_i = 1[h_e,i != 0]          (I,) per routed token
    score   = fc2(relu(fc1(x)))       fc1: H -> rank, fc2: rank -> I, no biases

trained and calibrated as predictors.py trains a dense model's per-layer ones (same loss, same
threshold rule, target recall on held-out tokens), on the tokens routed to e only. The model is
read without predictors (their masks would change h); they are stored as
`model.layers.{l}.block_sparse_moe.experts.{e}.predictor.fc1/fc2` with `predictor_rank` (per
layer, per expert) and `predictor_threshold` (likewise) in config.json.
"""

from contextlib import ExitStack
from pathlib import Path

import torch
from tqdm import tqdm

from turbo_demo.models.bamboo import BambooPredictor
from turbo_demo.models.hooks import hook_lock, part
from turbo_demo.offline import corpus
from turbo_demo.offline.fitting import SEQ_LEN, calibrate, hook_input, save_weights_in_place, train_layer
from turbo_demo.offline.moe_eval import masked_experts


def experts_of(model) -> list[list]:
    """Every layer's list of expert modules."""
    return [list(layer.mlp.experts) for layer in model.model.layers]


@torch.no_grad()
def collect_experts(model, tokens: torch.Tensor, n_tokens: int):
    """Per (layer, expert): routed inputs x (n_e, H) fp32 and labels h != 0 (n_e, I), over the
    first n_tokens tokens; n_e is how many of them the router sent to that expert."""
    xs: dict[tuple[int, int], list] = {}
    labels: dict[tuple[int, int], list] = {}
    with hook_lock(model), ExitStack() as stack:
        for i, group in enumerate(experts_of(model)):
            for e, expert in enumerate(group):
                stack.enter_context(hook_input(expert, lambda x, k=(i, e): xs.setdefault(k, []).append(x.float())))
                stack.enter_context(
                    hook_input(part(expert, "down"), lambda h, k=(i, e): labels.setdefault(k, []).append(h != 0))
                )
        for x, _ in tqdm(list(corpus.sequential_batches(tokens, 8, SEQ_LEN, n_tokens)), desc="collect"):
            model(input_ids=x, use_cache=False)
    return {k: torch.cat(v) for k, v in xs.items()}, {k: torch.cat(v) for k, v in labels.items()}


def train_expert_predictors(
    model,
    tokenizer,
    model_dir: str,
    rank,
    train_tokens: int,
    val_tokens: int,
    steps: int,
    target_recall: float,
    seed: int,
    stored_dtype,
) -> dict:
    """Train, calibrate and store a predictor for every expert; per-expert statistics.
    rank: one for every expert, or one per layer (all of a layer's experts share it)."""
    groups = experts_of(model)
    for expert in masked_experts(model):
        expert.predictor = None  # read the dReLU experts themselves, unmasked; new ones follow
    x_train, y_train = collect_experts(model, corpus.encode_split(tokenizer, "train"), train_tokens)
    x_val, y_val = collect_experts(model, corpus.encode_split(tokenizer, "heldout"), val_tokens)
    ranks, thresholds, experts = [], [], []
    for i, group in enumerate(tqdm(groups, desc="train predictors")):
        layer_rank = rank[i] if isinstance(rank, list) else rank
        ranks.append([layer_rank] * len(group))
        thresholds.append([])
        for e, expert in enumerate(group):
            key = (i, e)
            if key in x_train:
                expert.predictor = train_layer(x_train[key], y_train[key], layer_rank, steps, seed + i * len(group) + e)
            else:  # the router sent it no training token: nothing to learn from, keep all its neurons
                expert.predictor = keep_all_predictor(expert, layer_rank)
            width = expert.w2.weight.size(1)
            x, y = (
                x_val.get(key, torch.zeros(0, model.config.hidden_size)),
                y_val.get(key, torch.zeros(0, width, dtype=bool)),
            )
            stats = calibrate(expert.predictor, x, y, target_recall)
            expert.threshold = stats["threshold"]
            thresholds[-1].append(stats["threshold"])
            experts.append(
                {"layer": i, "expert": e, "train_tokens": len(x_train.get(key, ())), "val_tokens": len(x), **stats}
            )
    model.config.predictor_rank = ranks
    model.config.predictor_threshold = thresholds
    save_weights_in_place(model, Path(model_dir), stored_dtype)
    ffn = sum(3 * expert.w2.weight.numel() for group in groups for expert in group)
    extra = sum(p.numel() for group in groups for expert in group for p in expert.predictor.parameters())
    return {
        "model": str(model_dir),
        "rank": rank,
        "steps": steps,
        "train_tokens": train_tokens,
        "val_tokens": val_tokens,
        "target_recall": target_recall,
        "predictor_share_of_ffn": round(extra / ffn, 4),
        "experts": experts,
        "layers": [layer_summary(i, [x for x in experts if x["layer"] == i]) for i in range(len(groups))],
    }


def keep_all_predictor(expert, rank: int) -> BambooPredictor:
    """A predictor of zeros: every score is 0, at or above the threshold 0 that calibrate gives
    an expert without held-out tokens, so every neuron is computed (the expert runs dense)."""
    predictor = BambooPredictor(expert.w2.weight.size(0), rank, expert.w2.weight.size(1))
    torch.nn.init.zeros_(predictor.fc1.weight)
    torch.nn.init.zeros_(predictor.fc2.weight)
    return predictor.eval()


def layer_summary(layer: int, experts: list[dict]) -> dict:
    """A layer's statistics over its experts, weighted by their held-out tokens (the cli table's
    row; experts the router sent none have no statistics); threshold is the experts' mean."""
    seen = [x for x in experts if x["val_tokens"]]
    n = sum(x["val_tokens"] for x in seen) or 1

    def mean(key):
        return round(sum(x[key] * x["val_tokens"] for x in seen) / n, 4)

    return {
        "layer": layer,
        "threshold": round(sum(x["threshold"] for x in experts) / len(experts), 4),
        "recall": mean("recall"),
        "predicted_sparsity": mean("predicted_sparsity"),
        "true_sparsity": mean("true_sparsity"),
    }

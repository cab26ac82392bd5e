"""Routing and sparsity of a mixture-of-experts model (Mixtral, TurboSparse-Mixtral) for `eval`.

With E experts and top-k routing every token runs k of a layer's E experts, so the layer's
expert-level sparsity is exactly 1 - k/E (75% at top-2 of 8). Inside the chosen experts the
in-expert sparsity s_in is the share of exactly-zero h over the routed (token, expert) pairs, and
the total sparsity, the share of all E * I neurons of the layer idle for a token, is

    total = 1 - (k / E) * (1 - s_in)

the paper's "75% -> 97%". Expert shares: how often each expert was chosen, over all routed slots.
"""

from contextlib import contextmanager

import torch


@contextmanager
def counting_routes(model):
    """Yields counts[layer][expert], filled by every forward inside the context: how many routed
    slots chose that expert (a forward hook on each layer's router, which returns
    (logits, weights, indices))."""
    experts = model.config.num_local_experts
    counts = [[0] * experts for _ in model.model.layers]

    def hook(layer):
        def count(module, args, output):
            hits = torch.bincount(output[2].flatten(), minlength=experts).tolist()
            counts[layer] = [a + b for a, b in zip(counts[layer], hits)]

        return count

    handles = [layer.mlp.gate.register_forward_hook(hook(i)) for i, layer in enumerate(model.model.layers)]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def masked_experts(model) -> list:
    """The experts (TurboSparse-Mixtral) that carry a predictor, over all layers."""
    return [
        expert
        for layer in model.model.layers
        if isinstance(experts := getattr(layer.mlp, "experts", None), torch.nn.ModuleList)
        for expert in experts
        if getattr(expert, "predictor", None) is not None
    ]


@contextmanager
def unmasked(model):
    """A TurboSparse-Mixtral model's experts without their predictors' masks (the dReLU experts
    themselves) inside the context; restored on exit. Other models are left as they are."""
    saved = [(expert, expert.predictor) for expert in masked_experts(model)]
    for expert, _ in saved:
        expert.predictor = None
    try:
        yield
    finally:
        for expert, predictor in saved:
            expert.predictor = predictor


def moe_summary(config, in_expert: list[float], counts: list[list[int]]) -> dict:
    """eval.json's "moe" entry from per-layer in-expert sparsity and routing counts."""
    k, e = config.num_experts_per_tok, config.num_local_experts
    total = [1 - k / e * (1 - s) for s in in_expert]
    return {
        "experts": e,
        "top_k": k,
        "expert_sparsity": round(1 - k / e, 4),
        "in_expert_sparsity": [round(s, 4) for s in in_expert],
        "total_sparsity": [round(t, 4) for t in total],
        "total_sparsity_mean": round(sum(total) / len(total), 4),
        "expert_share": [[round(c / max(1, sum(row)), 4) for c in row] for row in counts],
    }

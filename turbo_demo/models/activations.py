"""The distributions of a run's FFN activations, through the model's own (dense) forward.

After a run, the prompt + generated tokens go once more through the transformers model with
hooks (always removed), which yields histograms of the gate pre-activation (W_gate x), the up
pre-activation (W_up x) and the combined activation h over all layers and tokens (TurboSparse,
Figure 3). How often each neuron fired is not measured here: the runtime counts that itself,
for what its mode really computed.
"""

import torch

from turbo_demo.models.hooks import on_ffn_activation, on_gate_up

BINS = 61


def histogram(values: torch.Tensor, bins: int = BINS) -> dict:
    """Counts over a symmetric range that covers 99.5% of |values|; exact zeros counted apart."""
    v = values.flatten().float()
    zeros = int((v == 0).sum())
    sample = v[torch.randperm(len(v), generator=torch.Generator().manual_seed(0))[:200_000]]
    limit = float(torch.quantile(sample.abs(), 0.995)) or 1.0
    counts = torch.histc(v[v != 0].clamp(-limit, limit), bins=bins, min=-limit, max=limit)
    edges = torch.linspace(-limit, limit, bins + 1)
    return {
        "centers": ((edges[:-1] + edges[1:]) / 2).tolist(),
        "counts": counts.tolist(),
        "zeros": zeros,
        "total": len(v),
    }


@torch.no_grad()
def activation_histograms(model, ids: list[int]) -> dict:
    """{"gate", "up", "combined"}: a histogram each, over every layer and token of ids."""
    values: dict[str, list[torch.Tensor]] = {"gate": [], "up": [], "combined": []}

    def on_h(layer, h):
        values["combined"].append(h.flatten())

    def on_pre(layer, branch, out):
        values[branch].append(out.flatten())

    with on_ffn_activation(model, on_h), on_gate_up(model, on_pre):
        model(input_ids=torch.tensor([ids]), use_cache=False)
    return {kind: histogram(torch.cat(v)) for kind, v in values.items()}

"""What a run's tokens do inside the FFN: per-neuron firing frequency and activation histograms.

After a run, the prompt + generated tokens go once more through the model's own forward with
hooks (always removed), which yields, per layer l and neuron i:

    firing[l][i] = share of tokens with h_i != 0        (PowerInfer's hot/cold neurons)

and histograms of the gate pre-activation (W_gate x), the up pre-activation (W_up x) and the
combined activation h over all layers and tokens (TurboSparse Figure 3).
"""

import torch

from turbo_demo.hooks import on_ffn_activation, on_gate_up

BINS = 61


def histogram(values: torch.Tensor, bins: int = BINS) -> dict:
    """Counts over a symmetric range that covers 99.5% of |values|; exact zeros counted apart."""
    v = values.flatten().float()
    zeros = int((v == 0).sum())
    sample = v[torch.randperm(len(v), generator=torch.Generator().manual_seed(0))[:200_000]]
    limit = float(torch.quantile(sample.abs(), 0.995)) or 1.0
    counts = torch.histc(v[v != 0].clamp(-limit, limit), bins=bins, min=-limit, max=limit)
    edges = torch.linspace(-limit, limit, bins + 1)
    return {"centers": ((edges[:-1] + edges[1:]) / 2).tolist(), "counts": counts.tolist(),
            "zeros": zeros, "total": len(v)}


@torch.no_grad()
def activation_profile(model, ids: list[int]) -> dict:
    """{"firing": [[share per neuron] per layer], "hist": {"gate", "up", "combined"}} for ids."""
    values = {"gate": [], "up": [], "combined": []}
    fired = {}

    def on_h(layer, h):
        values["combined"].append(h.flatten())
        fired[layer] = (h != 0).flatten(0, -2).float().mean(0)

    def on_pre(layer, branch, out):
        values[branch].append(out.flatten())

    with on_ffn_activation(model, on_h), on_gate_up(model, on_pre):
        model(input_ids=torch.tensor([ids]), use_cache=False)
    return {"firing": [fired[layer].tolist() for layer in sorted(fired)],
            "hist": {kind: histogram(torch.cat(v)) for kind, v in values.items()}}

"""Mixture-of-experts layers in the runtime: Mixtral's router, then an FFN mode per chosen expert.

For one token's normed hidden state x (H,) in a layer of E experts of I neurons each, top-k:

    p = softmax(W_router x) in fp32 (E,); K = the k largest p; w_e = p_e / sum_{K} p
    y = sum_{e in K} w_e FFN_e(x)

FFN_e is the layer's mode (dense, exact, predictor, threshold: runtime/modes.py) on expert e's
packed weights, through the same kernels as a dense model's FFN, so only the chosen experts'
rows are read, and of those only what the mode computes. An expert's predictor reads the
expert's routed input x (TurboSparse-Mixtral's published forward), not the residual.

A MoE layer counts as one FFN of N = E * I neurons, expert e's neuron i at e * I + i: its
records' computed and active neurons, its firing counts (L, N) and its recall are shares of all
experts' neurons, so top-2 of 8 computes at most 25% of them, and dReLU skips most of those.
Per layer, the record also says which experts were chosen, with their weights, and each chosen
expert's own record (computed, active, bytes, recall).

`pack_moe(model, q)` packs transformers' Mixtral (experts fused as gate_up_proj (E, 2I, H) and
down_proj (E, H, I), SwiGLU) and TurboSparse-Mixtral (experts[e].w1 / w2 / w3, dReLU, predictors),
the experts' matrices block-quantized where the pack is (the router stays as loaded).
"""

from dataclasses import dataclass, field
from typing import Any

import torch

from turbo_demo.errors import UserError
from turbo_demo.runtime.kernels import Kernels
from turbo_demo.runtime.kernels.reference import plus
from turbo_demo.runtime.modes import Mode
from turbo_demo.runtime.stats import LayerRecord, MoERecall
from turbo_demo.runtime.weights import FFNWeights, Quantizer, nbytes, neuron_major


@dataclass(frozen=True)
class MoEWeights:
    """One MoE layer: the router (E, H), each expert's FFNWeights, and k experts per token."""

    router: torch.Tensor
    experts: list[FFNWeights]
    top_k: int
    # fixed once: all experts' neurons N = E * I, and the bytes of a dense FFN of that total
    # size (every expert), of what a dense MoE reads per token (router + k experts), of the router
    n: int = field(init=False)
    dense_bytes: int = field(init=False)
    routed_bytes: int = field(init=False)
    router_bytes: int = field(init=False)

    def __post_init__(self):
        if len({e.n for e in self.experts}) != 1:
            raise UserError("the experts of a MoE layer differ in size, which the runtime does not support")
        router_bytes = nbytes(self.router)
        for name, value in (
            ("n", sum(e.n for e in self.experts)),
            ("dense_bytes", sum(e.dense_bytes for e in self.experts)),
            ("routed_bytes", router_bytes + self.top_k * self.experts[0].dense_bytes),
            ("router_bytes", router_bytes),
        ):
            object.__setattr__(self, name, value)  # frozen: set once, here

    @property
    def expert_n(self) -> int:
        return self.experts[0].n

    @property
    def parts(self) -> tuple[FFNWeights, ...]:
        """The FFNs the layer is made of: its experts."""
        return tuple(self.experts)

    def make_mode(self, cls: type[Mode], kernels: Kernels, options=None) -> "MoEMode":
        return MoEMode(self, cls, kernels, options)


def route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral's routing of router logits (..., E) -> (weights (..., k) fp32, experts (..., k)):
    softmax in fp32, the k largest, renormalised to sum 1."""
    top = torch.softmax(logits.float(), dim=-1).topk(k, dim=-1)
    return top.values / top.values.sum(dim=-1, keepdim=True), top.indices


class MoEMode:
    """A layer's mode for a MoE layer: the router, then `cls` (a Mode class) on each chosen expert.
    options: the mode's options for every expert, or a list with one per expert."""

    def __init__(self, w: MoEWeights, cls: type[Mode], kernels: Kernels, options=None):
        per_expert = list(options) if isinstance(options, (list, tuple)) else [options] * len(w.experts)
        if len(per_expert) != len(w.experts):
            raise UserError(
                f"{cls.name} mode got options for {len(per_expert)} experts; the layer has {len(w.experts)}"
            )
        # the router stays as loaded (a tensor); each expert's mode binds its own kernels
        self.w, self.kernels, self.name, self.can_miss = w, kernels.for_weights(w.router), cls.name, cls.can_miss
        self.experts: list[Mode] = [cls(e, kernels, o) for e, o in zip(w.experts, per_expert)]

    def reset(self) -> None:
        """A new sequence: each expert's mode's (Mode.reset)."""
        for mode in self.experts:
            mode.reset()

    def prefill(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """x (..., T, H) -> (..., T, H): each token through its k experts' prefill formula (the
        predictor's mask from the expert's routed input x); r is not read."""
        flat = x.reshape(-1, x.size(-1))  # (N, H)
        weights, chosen = route(flat @ self.w.router.t(), self.w.top_k)  # (N, k) each
        out = torch.zeros_like(flat)
        for e, mode in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            if token.numel():
                xs = flat[token]
                out.index_add_(0, token, (mode.prefill(xs, xs) * weights[token, slot, None]).to(out.dtype))
        return out.view_as(x)

    def step(self, x, r, add_to=None, counts=None) -> tuple[torch.Tensor, LayerRecord]:
        """One token x (H,) -> (add_to + y, the layer's LayerRecord); counts (E * I,) int32."""
        weights, chosen = route(self.kernels.matvec(self.w.router, x), self.w.top_k)
        n = self.w.expert_n
        y, parts, order = torch.zeros_like(x), [], sorted(zip(chosen.tolist(), weights.tolist()))
        for e, weight in order:  # ascending expert ids, as transformers sums them
            ye, part = self.experts[e].step(x, x, None, None if counts is None else counts[e * n : (e + 1) * n])
            y = y + (ye.float() * weight).to(x.dtype)
            parts.append(part)
        choice = None
        if self.can_miss:
            idx = torch.cat([part.choice[1] + e * n for (e, _), part in zip(order, parts)])
            choice = (x, idx)
        record = LayerRecord(
            computed=sum(p.computed for p in parts),
            active=sum(p.active for p in parts),
            bytes=self.w.router_bytes + sum(p.bytes for p in parts),
            routed_bytes=self.w.routed_bytes,
            choice=choice,
            experts=[e for e, _ in order],
            weights=[w for _, w in order],
            parts=parts,
        )
        return plus(y, add_to), record

    def truly_active(self, record: LayerRecord) -> torch.Tensor | None:
        """(E * I,) bool: the neurons the dense MoE activates at the recorded step (h != 0 in the
        chosen experts' dense FFNs; no neuron of another expert); None if no expert can miss."""
        if record.choice is None:
            return None
        x, n = record.choice[0], self.w.expert_n
        truly = torch.zeros(self.w.n, dtype=torch.bool, device=x.device)
        for e in record.experts or ():
            truly[e * n : (e + 1) * n] = self.experts[e].dense_h(x) != 0
        return truly

    def recall(self, record: LayerRecord, truly: torch.Tensor | None = None) -> MoERecall | None:
        """The layer's recall over all chosen experts' truly active neurons (`truly_active`,
        computed if not given), and each chosen expert's own over its neurons."""
        truly = self.truly_active(record) if truly is None else truly
        if truly is None or record.choice is None:
            return None
        n = self.w.expert_n
        experts = []
        for e, part in zip(record.experts or (), record.parts or ()):
            own, computed = truly[e * n : (e + 1) * n], part.choice[1]  # type: ignore[index]
            experts.append(own.index_select(0, computed).sum().item() / max(1, int(own.sum())))
        share = truly.index_select(0, record.choice[1]).sum().item() / max(1, int(truly.sum()))
        return MoERecall(share, experts)


def is_moe(model) -> bool:
    """Whether the model's decoder layers are Mixtral-shaped MoE layers (mlp.gate, mlp.experts)."""
    layers = getattr(getattr(model, "model", None), "layers", None) or []
    return bool(layers) and all(hasattr(layer.mlp, "gate") and hasattr(layer.mlp, "experts") for layer in layers)


def expert_ffn(expert: Any, act: str, q: Quantizer, prefix: str) -> FFNWeights:
    """A TurboSparse-Mixtral expert's weights: w1 the gate, w3 up, w2 down; dReLU, its predictor;
    each matrix as `q` keeps it, by its name `prefix` + w1.weight etc."""
    predictor = expert.predictor
    return FFNWeights(
        wg=q(f"{prefix}w1.weight", expert.w1.weight.detach()),
        wu=q(f"{prefix}w3.weight", expert.w3.weight.detach()),
        wd_t=q(f"{prefix}w2.weight", neuron_major(expert.w2)),
        act=act,
        drelu=True,
        fc1=None if predictor is None else q(f"{prefix}predictor.fc1.weight", predictor.fc1.weight.detach()),
        fc2_t=None if predictor is None else q(f"{prefix}predictor.fc2.weight", neuron_major(predictor.fc2)),
        threshold=None if predictor is None else expert.threshold,
        wd=q.rows(f"{prefix}w2.weight", expert.w2.weight.detach()),
    )


def expert_weights(experts: Any, config, q: Quantizer, prefix: str) -> list[FFNWeights]:
    """FFNWeights per expert, from TurboSparse-Mixtral's ModuleList or Mixtral's fused tensors,
    each matrix named as quant.checkpoint_matrices names it (`prefix` {e}.w1.weight etc.)."""
    if isinstance(experts, torch.nn.ModuleList):
        return [expert_ffn(e, config.hidden_act, q, f"{prefix}{i}.") for i, e in enumerate(experts)]
    # transformers' Mixtral: gate_up_proj (E, 2I, H), gate rows first; down_proj (E, H, I)
    gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    weights = []
    for e in range(gate_up.size(0)):
        wg, wu = gate_up[e].chunk(2, dim=0)
        weights.append(
            FFNWeights(
                q(f"{prefix}{e}.w1.weight", wg),
                q(f"{prefix}{e}.w3.weight", wu),
                q(f"{prefix}{e}.w2.weight", down[e].t().contiguous()),
                act=config.hidden_act,
                drelu=False,
                wd=q.rows(f"{prefix}{e}.w2.weight", down[e]),
            )
        )
    return weights


def pack_moe(model, q: Quantizer | None = None) -> list[MoEWeights]:
    """The MoE layers' weights of a Mixtral or TurboSparse-Mixtral model (which is left as is);
    the routers stay as loaded, the experts' matrices as `q` keeps them."""
    config, q = model.config, q or Quantizer()
    return [
        MoEWeights(
            layer.mlp.gate.weight.detach(),
            expert_weights(layer.mlp.experts, config, q, f"model.layers.{i}.mlp.experts."),
            config.num_experts_per_tok,
        )
        for i, layer in enumerate(model.model.layers)
    ]


def expert_firing(counts: list[list[int]], n_experts: int) -> list[list[list[int]]]:
    """A runtime's firing counts (L, E * I) as (L, E, I): per layer, expert and neuron."""
    size = len(counts[0]) // n_experts if counts else 0
    return [[row[e * size : (e + 1) * size] for e in range(n_experts)] for row in counts]


def routing_counts(steps, n_experts: int) -> list[list[int]]:
    """(L, E): in how many of the StepStats `steps` each layer chose each expert."""
    counts: list[list[int]] = []
    for stats in steps:
        for layer, chosen in enumerate(stats.experts or ()):
            if layer == len(counts):
                counts.append([0] * n_experts)
            for e in chosen:
                counts[layer][e] += 1
    return counts


def moe_shape(packed) -> tuple[int, int, int] | None:
    """(experts, neurons per expert, experts per token) of a pack's MoE layers; None for dense FFNs."""
    first = packed.ffns[0] if packed.ffns else None
    return (len(first.experts), first.expert_n, first.top_k) if isinstance(first, MoEWeights) else None


def routing_weights(stats, n_experts: int) -> list[list[float]]:
    """(L, E): one StepStats' routing weight of each layer's experts, 0 where not chosen."""
    rows = []
    for chosen, weights in zip(stats.experts or (), stats.expert_weights or ()):
        row = [0.0] * n_experts
        for e, w in zip(chosen, weights):
            row[e] = w
        rows.append(row)
    return rows

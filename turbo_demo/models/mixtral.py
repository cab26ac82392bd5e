"""TurboSparse-Mixtral: Mixtral with dReLU experts and a predictor per expert, in the published
TurboSparse-Mixtral checkpoint format (model_type "turbosparsemixtral").

Per MoE layer, for a token's normed hidden state x (H,) (after post_attention_layernorm):

    router     p = softmax(W_router x) in fp32 over the E experts (block_sparse_moe.gate, (E, H));
               the top-k experts by p, their weights p_e / sum of the top-k p (Mixtral's routing)
    expert e   h_e = relu(w1_e x) * relu(w3_e x)   (w1 = gate, w3 = up, (I, H); w2 = down, (H, I))
               m_e = [s_e > t], s_e = fc2_e(relu(fc1_e x)), the expert's own predictor on the
               expert's routed input x (fc1 (r_e, H), fc2 (I, r_e), no biases), t = 0
               y_e = w2_e (m_e * h_e)
    output     y = sum over the chosen experts of weight_e * y_e

The published forward multiplies by m = round(sigmoid(s)) (straight-through in training), i.e.
m_i = 1 exactly when s_i > 0: this class's forward is that model, mask included, wherever an
expert has a predictor (an expert without one is the dReLU expert alone). The published config
names no rank: `checkpoint.load_config` takes every expert's from the weight shapes (they
differ per expert).

The module tree is transformers' Mixtral one (`model.layers[i].mlp` with `.gate`, a
MixtralTopKRouter, and `.experts`), here a ModuleList of per-expert modules; the checkpoint's
`block_sparse_moe` names map to `mlp` on load and back on save (the renaming transformers
applies to Mixtral, registered for this model type in `turbo_demo/models/__init__.py`). Plain
Mixtral checkpoints (SwiGLU experts) load through transformers' own MixtralForCausalLM.
"""

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import MixtralConfig
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.mixtral.modeling_mixtral import (
    MixtralAttention,
    MixtralDecoderLayer,
    MixtralForCausalLM,
    MixtralModel,
    MixtralPreTrainedModel,
    MixtralRMSNorm,
    MixtralRotaryEmbedding,
    MixtralTopKRouter,
)

from turbo_demo.models.bamboo import BambooPredictor


@strict(accept_kwargs=True)
class TurboSparseMixtralConfig(MixtralConfig):
    """MixtralConfig with dReLU experts.

    hidden_act: the activation of *both* w1 (gate) and w3 (up) in every expert ("relu" = dReLU).
    predictor_rank: the rank of every expert's predictor: an int for all, a list per layer of
        lists per expert (0: that expert has none), or None when the checkpoint has none.
    predictor_threshold: the score above which a neuron is predicted active: one float, or a
        list per layer of lists per expert; 0.0 is the published rule round(sigmoid(s)) == 1.
    """

    model_type = "turbosparsemixtral"
    hidden_act: str = "relu"
    predictor_rank: int | list[list[int]] | None = None
    predictor_threshold: float | list[list[float]] = 0.0

    def rank_of(self, layer: int, expert: int) -> int | None:
        """The predictor rank of one expert, or None (0) where it has none."""
        r = self.predictor_rank
        return r if r is None or isinstance(r, int) else r[layer][expert]

    def threshold_of(self, layer: int, expert: int) -> float:
        t = self.predictor_threshold
        return t if isinstance(t, (int, float)) else t[layer][expert]


class TurboSparseMixtralExpert(nn.Module):
    """One dReLU expert, (..., H) -> (..., H): w2(m * act(w1 x) * act(w3 x)), act = relu as
    published, m its predictor's mask [fc2(relu(fc1 x)) > threshold] (all ones without one)."""

    def __init__(self, config: TurboSparseMixtralConfig, layer: int, expert: int):
        super().__init__()
        hidden, inter = config.hidden_size, config.intermediate_size
        self.w1 = nn.Linear(hidden, inter, bias=False)
        self.w2 = nn.Linear(inter, hidden, bias=False)
        self.w3 = nn.Linear(hidden, inter, bias=False)
        self.act = ACT2FN[config.hidden_act]
        rank = config.rank_of(layer, expert)
        self.predictor = BambooPredictor(hidden, rank, inter) if rank else None
        self.threshold = float(config.threshold_of(layer, expert))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.w1(x)) * self.act(self.w3(x))
        if self.predictor is not None:
            h = h * (self.predictor(x) > self.threshold).to(h.dtype)
        return self.w2(h)


class TurboSparseMixtralSparseMoeBlock(nn.Module):
    """Mixtral's routing over dReLU experts: (B, T, H) -> (B, T, H)."""

    def __init__(self, config: TurboSparseMixtralConfig, layer: int):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = MixtralTopKRouter(config)  # weight (E, H); fp32 softmax, top-k, renormalised
        self.experts = nn.ModuleList(
            [TurboSparseMixtralExpert(config, layer, e) for e in range(config.num_local_experts)]
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (N, H)
        _, weights, chosen = self.gate(x)  # (N, k) fp32 weights summing to 1, (N, k) expert ids
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            if token.numel():
                y = expert(x[token]) * weights[token, slot, None]
                out.index_add_(0, token, y.to(out.dtype))
        return out.view(shape)


class TurboSparseMixtralDecoderLayer(MixtralDecoderLayer):
    """Mixtral's decoder layer (same forward) whose `mlp` is the dReLU MoE block."""

    def __init__(self, config: TurboSparseMixtralConfig, layer_idx: int):
        GradientCheckpointingLayer.__init__(self)  # not Mixtral's: it would build fused experts
        self.hidden_size = config.hidden_size
        self.self_attn = MixtralAttention(config, layer_idx)
        self.mlp = TurboSparseMixtralSparseMoeBlock(config, layer_idx)
        self.input_layernorm = MixtralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = MixtralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class TurboSparseMixtralModel(MixtralModel):
    config_class = TurboSparseMixtralConfig

    def __init__(self, config: TurboSparseMixtralConfig):
        MixtralPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [TurboSparseMixtralDecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.norm = MixtralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = MixtralRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class TurboSparseMixtralForCausalLM(MixtralForCausalLM):
    """MixtralForCausalLM (its forward, router logits and auxiliary loss) over dReLU experts."""

    config_class = TurboSparseMixtralConfig

    def __init__(self, config: TurboSparseMixtralConfig):
        MixtralPreTrainedModel.__init__(self, config)
        self.model = TurboSparseMixtralModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.router_aux_loss_coef = config.router_aux_loss_coef
        self.num_experts = config.num_local_experts
        self.num_experts_per_tok = config.num_experts_per_tok
        self.post_init()

"""Bamboo: the TurboSparse (dReLU) model, in the published TurboSparse-Mistral checkpoint format.

It is transformers' Mistral with one change, the FFN:

    SwiGLU (Mistral):  y = W_down (silu(W_gate x) * (W_up x))
    dReLU (Bamboo):    y = W_down (relu(W_gate x) * relu(W_up x))

plus an optional low-rank activation predictor per layer, stored under the published names
`model.layers.{i}.mlp.predictor.fc1/fc2`: score = fc2(relu(fc1(r))), fc1: hidden -> rank,
fc2: rank -> intermediate, no biases, r the residual stream before post_attention_layernorm.
The published model multiplies h by mask = round(sigmoid(score)), i.e. neuron i is active
when score_i > 0; our runtime's predictor mode is that model (runtime/modes.py). This class's
own forward is the dReLU network without the mask (what dense and exact mode compute, and what
training, evaluation and predictor training read). The published config names no rank:
`load_config` takes each layer's from the weight shapes (they differ per layer).

The classes are registered with the transformers Auto classes in `turbo_demo/models/__init__.py`, so
`AutoModelForCausalLM.from_pretrained(dir)` loads a bamboo checkpoint with
`trust_remote_code` off, even when its config carries the published `auto_map`.
"""

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import MistralConfig, MistralForCausalLM
from transformers.activations import ACT2FN


@strict(accept_kwargs=True)
class BambooConfig(MistralConfig):
    """MistralConfig with a dReLU FFN.

    hidden_act: the activation applied to *both* the gate and the up branch ("relu" = dReLU).
    predictor_rank: rank of the per-layer activation predictor; an int for every layer, a list
        with one rank per layer, or None when the checkpoint carries no predictors.
    predictor_threshold: the score (a logit) above which a neuron is predicted active; 0.0 is
        the published rule round(sigmoid(score)) == 1 (PowerInfer's default too); a list gives
        one threshold per layer (calibrated by `python -m turbo_demo predictors`).
    """

    model_type = "bamboo"
    hidden_act: str = "relu"
    predictor_rank: int | list[int] | None = None
    predictor_threshold: float | list[float] = 0.0

    def rank_of(self, layer: int) -> int | None:
        """The predictor rank of one layer, or None without predictors."""
        if self.predictor_rank is None:
            return None
        if isinstance(self.predictor_rank, int):
            return self.predictor_rank
        return self.predictor_rank[layer]

    def threshold_of(self, layer: int) -> float:
        t = self.predictor_threshold
        return t if isinstance(t, (int, float)) else t[layer]


class BambooPredictor(nn.Module):
    """Low-rank neuron predictor: score = fc2(relu(fc1(r))), (..., hidden) -> (..., intermediate)."""

    def __init__(self, hidden_size: int, rank: int, intermediate_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, rank, bias=False)
        self.fc2 = nn.Linear(rank, intermediate_size, bias=False)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(r)))


class BambooMLP(nn.Module):
    """dReLU FFN: down_proj(act(gate_proj(x)) * act(up_proj(x))), with room for a predictor."""

    def __init__(self, config: BambooConfig, layer_idx: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]
        rank = config.rank_of(layer_idx)
        self.predictor = BambooPredictor(config.hidden_size, rank, config.intermediate_size) if rank else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.act_fn(self.up_proj(x)))


class BambooForCausalLM(MistralForCausalLM):
    """MistralForCausalLM whose decoder layers carry a BambooMLP."""

    config_class = BambooConfig

    def __init__(self, config: BambooConfig):
        super().__init__(config)
        for i, layer in enumerate(self.model.layers):
            layer.mlp = BambooMLP(config, i)
        self.post_init()


def swiglu_to_drelu(dense: MistralForCausalLM) -> BambooForCausalLM:
    """ReLUfication: a BambooForCausalLM carrying a dense Mistral model's weights.

    Every weight is copied by name; only the activation changes (silu on the gate -> relu on
    gate and up), so the result needs continued training to recover its loss.
    """
    fields = dense.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "hidden_act"):
        fields.pop(key, None)
    model = BambooForCausalLM(BambooConfig(**fields, hidden_act="relu"))
    model.load_state_dict(dense.state_dict())
    return model.to(dense.dtype)

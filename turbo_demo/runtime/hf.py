"""The engine for architectures the lean one lacks: transformers' own forward, FFN modes inside.

`sparse_model(packed, modes, firing)` returns a new model object that shares every tensor with
the loaded one but has its own module tree, in which each decoder layer's MLP is a SparseMLP
running that layer's mode: the loaded model, shared by other runs, is never modified (as
gpt-fast's converters return a new model). One token at a time goes through the mode's sparse
step, several (prefill) through the mode's prefill formula, as in the lean runtime.
"""

import copy
import inspect
import itertools
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from turbo_demo.runtime.decoder import Decoder
from turbo_demo.runtime.kernels import Kernels
from turbo_demo.runtime.modes import Mode
from turbo_demo.runtime.packing import PackedModel
from turbo_demo.runtime.stats import LayerRecord


class SparseMLP(nn.Module):
    """An HF MLP replacement: x (B, T, H) -> (B, T, H) through an FFN mode. HF's forward cannot
    return the step's record, so the module keeps the last one for the engine to collect."""

    def __init__(self, mode: Mode, counts: torch.Tensor):
        super().__init__()
        self.mode, self.counts = mode, counts
        self.residual: torch.Tensor | None = None  # the predictor input, set by a pre-hook
        self.record = LayerRecord()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] * x.shape[1] == 1:
            assert self.residual is not None  # the post_attention_layernorm pre-hook ran
            y, self.record = self.mode.step(x.view(-1), self.residual.view(-1), counts=self.counts)
            return y.view_as(x)
        assert self.residual is not None
        return self.mode.prefill(x, self.residual)


def twin(model: Any) -> Any:
    """A copy of model's module tree that shares every parameter and buffer with it."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def sparse_model(packed: PackedModel, modes: list[Mode], firing: torch.Tensor) -> Any:
    """The packed model's twin with every MLP running its mode (firing: (L, I) counts)."""
    model = twin(packed.model)
    # a MoE block replaced by a SparseMLP records no router logits: transformers would compute
    # its load-balancing loss from none (TurboSparse-Mixtral's config asks for it); the twin's
    # config is its own copy
    if getattr(model.config, "output_router_logits", False):
        model.config.output_router_logits = False
    for layer, mode, counts in zip(model.model.layers, modes, firing):
        sparse = SparseMLP(mode, counts)
        layer.post_attention_layernorm.register_forward_pre_hook(
            lambda module, args, s=sparse: setattr(s, "residual", args[0])
        )
        layer.mlp = sparse
    return model


class TransformersRuntime(Decoder):
    """The same generation API on a transformers model's own forward and KV cache."""

    engine = "transformers"

    def __init__(self, packed: PackedModel, mode: str = "dense", kernels: Kernels | None = None, options=None, **given):
        super().__init__(packed, mode, kernels or Kernels(), options, **given)
        self.model = sparse_model(packed, self.modes, self.firing) if self.modes else packed.model
        self.mlps = [layer.mlp for layer in self.model.model.layers] if self.modes else []
        self.config = self.model.config
        self.max_len = getattr(self.config, "max_position_embeddings", 2048)
        params = inspect.signature(self.model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.cache: DynamicCache | None = None

    def reset(self) -> None:
        self.cache = DynamicCache(config=self.config)

    @torch.inference_mode()
    def run(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids[None].to(self.model.device), use_cache=True, **{self.cache_arg: self.cache})
        return out.logits[0, -1]

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        self.reset()
        return self.run(ids)

    def decode(self, token: int) -> tuple[torch.Tensor, list[LayerRecord]]:
        logits = self.run(torch.tensor([token]))
        return logits, [mlp.record for mlp in self.mlps]

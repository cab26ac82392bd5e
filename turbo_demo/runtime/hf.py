"""FFN modes inside a transformers model, and the engine for architectures the lean one lacks.

`sparse_mode(model, mode)` swaps every decoder layer's MLP for a SparseMLP that runs an FFN
mode object (sharing the weights), so `model.generate` decodes sparsely too; leaving the
context puts the original modules back. One token at a time goes through the sparse step,
several (prefill) through the dense formula, exactly as in the lean runtime.
"""

import inspect
from contextlib import contextmanager

import torch
from torch import nn
from transformers import DynamicCache

from turbo_demo.errors import UserError
from turbo_demo.hooks import ffn_modules
from turbo_demo.runtime.engine import Decoder
from turbo_demo.runtime.ffn import make_ffn


class SparseMLP(nn.Module):
    """An HF MLP replacement: x (B, T, H) -> (B, T, H) through an FFN mode object."""

    def __init__(self, ffn):
        super().__init__()
        self.ffn = ffn
        self.residual = None  # set by a pre-hook on post_attention_layernorm: the predictor input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] * x.shape[1] == 1:
            return self.ffn.step(x.view(-1), self.residual.view(-1)).view_as(x)
        return self.ffn.batch(x)


@contextmanager
def sparse_mode(model, mode: str, **options):
    """Run `model` with every FFN in `mode`; yields the per-layer FFN objects (their records)."""
    restore = apply_mode(model, mode, **options)
    try:
        yield [layer.mlp.ffn for layer in model.model.layers]
    finally:
        restore()


def apply_mode(model, mode: str, **options):
    """Swap the MLPs for `mode` and return a function that undoes the swap."""
    originals = ffn_modules(model)
    layers = list(model.model.layers)
    handles = []
    for i, (layer, mlp) in enumerate(zip(layers, originals)):
        sparse = SparseMLP(make_ffn(mode, mlp, model.config, i, **options))
        handles.append(layer.post_attention_layernorm.register_forward_pre_hook(
            lambda module, args, s=sparse: setattr(s, "residual", args[0])))
        layer.mlp = sparse

    def restore():
        for handle in handles:
            handle.remove()
        for layer, mlp in zip(layers, originals):
            layer.mlp = mlp

    return restore


class TransformersRuntime(Decoder):
    """The same generation API on a transformers model's own forward and KV cache."""

    engine = "transformers"

    def __init__(self, model, mode: str = "dense", **mode_options):
        self.model, self.config = model, model.config
        self.max_len = getattr(model.config, "max_position_embeddings", 2048)
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self._restore = None
        self.set_mode(mode, **mode_options)

    def set_mode(self, mode: str, **options) -> None:
        self.close()
        try:
            self._restore = apply_mode(self.model, mode, **options)
            self.ffns = [layer.mlp.ffn for layer in self.model.model.layers]
        except UserError:
            if mode != "dense":
                raise
            self.ffns = []  # no gated FFN to watch: decode densely without FFN statistics
        self.mode = mode
        self.dense_ffn_bytes = sum(3 * f.n * f.row_bytes for f in self.ffns)

    def close(self) -> None:
        if self._restore:
            self._restore()
            self._restore = None

    def reset(self) -> None:
        self.cache = DynamicCache(config=self.config)

    @torch.inference_mode()
    def run(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids[None].to(self.model.device), use_cache=True,
                         **{self.cache_arg: self.cache})
        return out.logits[0, -1]

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        self.reset()
        return self.run(ids)

    def decode(self, token: int) -> torch.Tensor:
        return self.run(torch.tensor([token]))

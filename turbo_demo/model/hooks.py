"""Watching (and editing) the FFN activations of any gated-FFN causal LM through hooks.

The combined activation h of layer i is the input of `model.layers[i].mlp.down_proj` (in a
TurboSparse-Mixtral model, of each expert's w2, for the tokens routed to it):
h = act(W_gate x) * (W_up x) for SwiGLU, relu(W_gate x) * relu(W_up x) for dReLU. A forward
pre-hook on down_proj therefore sees h for every FFN variant without touching its code. The
gate and up projections are gate_proj and up_proj, or Phi-3's one gate_up_proj, whose output
(..., 2I) is the gate's I values, then up's.
Hooks live only inside the context managers below, which always remove them. A model's
modules are shared (the app's sessions use one loaded copy), so each context holds HOOKS, one
re-entrant lock, while its hooks are on: no thread's forward runs under another's hooks. A
hook-free forward that must not (a baseline before pruning) holds it too.
"""

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from turbo_demo.errors import UserError

HOOKS = threading.RLock()  # re-entrant: the histograms nest both contexts in one thread


def ffn_modules(model: nn.Module) -> list[nn.Module]:
    """The MLP module of every decoder layer, in order; a clear error for other architectures."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(hasattr(layer, "mlp") for layer in layers):
        raise UserError(f"{type(model).__name__} has no model.layers[i].mlp: not a Llama-shaped model")
    mlps = [layer.mlp for layer in layers]
    if not all(is_gated(m) for m in mlps):
        raise UserError(f"{type(model).__name__} has no gated FFN (gate_proj/up_proj or gate_up_proj, down_proj)")
    return mlps


def hooked_ffns(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(layer, FFN) for every FFN the hooks below watch: each layer's MLP, or in a MoE model whose
    experts are modules (TurboSparse-Mixtral), each expert of each layer (h then holds only the
    tokens routed to that expert). transformers' Mixtral stores its experts fused: not hookable."""
    layers = getattr(getattr(model, "model", None), "layers", None) or []
    experts = [getattr(getattr(layer, "mlp", None), "experts", None) for layer in layers]
    if layers and all(isinstance(e, nn.ModuleList) for e in experts):
        return [(i, expert) for i, group in enumerate(experts) for expert in group]  # type: ignore[arg-type]
    return list(enumerate(ffn_modules(model)))


def part(ffn: nn.Module, kind: str) -> nn.Module:
    """An FFN's "gate", "up" or "down" projection, by HF's names or Mixtral's (w1, w3, w2)."""
    hf, mixtral = {"gate": ("gate_proj", "w1"), "up": ("up_proj", "w3"), "down": ("down_proj", "w2")}[kind]
    return getattr(ffn, hf) if hasattr(ffn, hf) else getattr(ffn, mixtral)


def is_gated(mlp: nn.Module) -> bool:
    split = hasattr(mlp, "gate_proj") and hasattr(mlp, "up_proj")
    return hasattr(mlp, "down_proj") and (split or hasattr(mlp, "gate_up_proj"))


@contextmanager
def on_ffn_activation(model: nn.Module, fn: Callable[[int, torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """Call fn(layer, h) with each layer's combined activation h (..., intermediate).

    If fn returns a tensor, it replaces h as the input of down_proj (used for top-k pruning).
    """
    with HOOKS:
        handles = []
        for i, mlp in hooked_ffns(model):

            def pre_hook(module, args, layer=i):
                new = fn(layer, args[0])
                return None if new is None else (new,)

            handles.append(part(mlp, "down").register_forward_pre_hook(pre_hook))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


@contextmanager
def on_gate_up(model: nn.Module, fn: Callable[[int, str, torch.Tensor], None]) -> Iterator[None]:
    """Call fn(layer, "gate" | "up", pre_activation) with gate_proj(x) and up_proj(x) outputs."""
    with HOOKS:
        handles = []
        for i, mlp in hooked_ffns(model):
            if hasattr(mlp, "gate_up_proj"):

                def fused(module, args, output, layer=i):
                    gate, up = output.chunk(2, dim=-1)
                    fn(layer, "gate", gate)
                    fn(layer, "up", up)

                handles.append(mlp.gate_up_proj.register_forward_hook(fused))
                continue
            for name in ("gate", "up"):

                def hook(module, args, output, layer=i, branch=name):
                    fn(layer, branch, output)

                handles.append(part(mlp, name).register_forward_hook(hook))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

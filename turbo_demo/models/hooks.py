"""Watching (and editing) the FFN activations of any gated-FFN causal LM through hooks.

The combined activation h of layer i is the input of `model.layers[i].mlp.down_proj` (in a
TurboSparse-Mixtral model, of each expert's w2, for the tokens routed to it):
h = act(W_gate x) * (W_up x) for SwiGLU, relu(W_gate x) * relu(W_up x) for dReLU. A forward
pre-hook on down_proj therefore sees h for every FFN variant without touching its code. The
gate and up projections are gate_proj and up_proj, or Phi-3's one gate_up_proj, whose output
(..., 2I) is the gate's I values, then up's. transformers' Mixtral stores its experts fused
(MixtralExperts: gate_up_proj (E, 2I, H), down_proj (E, H, I)) with no module per expert: there a
forward hook on the experts recomputes each chosen expert's gate, up and h from those weights by
the same formulas, hands them to fn, and (only where fn replaces an h) returns the output
rebuilt from them.
Hooks live only inside the context managers below, which always remove them. A model's
modules are shared (the app's sessions use one loaded copy), so each context holds the model's
own re-entrant lock, `hook_lock(model)`, while its hooks are on: no thread's forward runs under
another's hooks on that model, and two models never wait for each other. A hook-free forward
that must not run under another thread's hooks (a baseline before pruning) holds it too.
"""

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from turbo_demo.errors import UserError


class HookLock:
    """A model's lock for its hooks, re-entrant: the histograms nest both contexts in one thread.

    A copy of the model (runtime/hf.py's twin: a module tree of its own, sharing the tensors) gets a
    new one, since hooks on the copy's modules never reach the model's; a lock cannot be copied.
    """

    def __init__(self):
        self.lock = threading.RLock()

    def __deepcopy__(self, memo) -> "HookLock":
        return HookLock()


def hook_lock(model: nn.Module) -> threading.RLock:
    """The lock that gives turns to the hooks on `model` (and to hook-free forwards that must not
    run under another thread's hooks): the model's own, made on first use. dict.setdefault is one
    atomic step, so two threads asking at once get the same lock."""
    return model.__dict__.setdefault("hook_lock", HookLock()).lock


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


def fused_experts(model: nn.Module) -> list[nn.Module] | None:
    """Every layer's fused experts module (transformers' MixtralExperts), or None if not fused."""
    layers = getattr(getattr(model, "model", None), "layers", None) or []
    experts = [getattr(getattr(layer, "mlp", None), "experts", None) for layer in layers]
    if layers and all(isinstance(getattr(e, "gate_up_proj", None), nn.Parameter) for e in experts):
        return experts  # type: ignore[return-value]
    return None


def _down_hook(layer: int, fn: Callable[[int, torch.Tensor], torch.Tensor | None]):
    """A forward pre-hook for down_proj: fn(layer, h), whose tensor (if any) replaces h."""

    def pre_hook(module, args):
        new = fn(layer, args[0])
        return None if new is None else (new,)

    return pre_hook


def _routed(module, args):
    """(expert, tokens, slots, gate, up) for each expert MixtralExperts(x (N, H), top_k_index
    (N, k), top_k_weights (N, k)) runs: gate and up (n_e, I) over the tokens routed to it."""
    x, index = args[0], args[1]
    for e in index.unique().tolist():
        token, slot = torch.where(index == e)
        gate, up = F.linear(x[token], module.gate_up_proj[e]).chunk(2, dim=-1)
        yield e, token, slot, gate, up


def _fused_hook(layer: int, fn: Callable[[int, torch.Tensor], torch.Tensor | None]):
    """A forward hook for MixtralExperts: fn(layer, h_e) for each chosen expert e, with
    h_e = act(gate) * up over its routed tokens; the output rebuilt where fn replaced one."""

    def hook(module, args, output):
        parts, replaced = [], False
        for e, token, slot, gate, up in _routed(module, args):
            h = module.act_fn(gate) * up
            new = fn(layer, h)
            replaced |= new is not None
            parts.append((e, token, slot, h if new is None else new))
        if not replaced:
            return None
        out = torch.zeros_like(args[0])
        for e, token, slot, h in parts:
            y = F.linear(h, module.down_proj[e]) * args[2][token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    return hook


def _fused_gate_up_hook(layer: int, fn: Callable[[int, str, torch.Tensor], None]):
    """A forward hook for MixtralExperts: fn(layer, "gate" | "up", pre-activation) per expert."""

    def hook(module, args, output):
        for _, _, _, gate, up in _routed(module, args):
            fn(layer, "gate", gate)
            fn(layer, "up", up)

    return hook


def _gate_up_handles(layer: int, mlp: nn.Module, fn: Callable[[int, str, torch.Tensor], None]) -> list:
    """Forward hooks calling fn(layer, "gate" | "up", output) on one FFN's projections (Phi-3's
    fused gate_up_proj: its output split in two)."""
    if hasattr(mlp, "gate_up_proj"):

        def split(module, args, output):
            gate, up = output.chunk(2, dim=-1)
            fn(layer, "gate", gate)
            fn(layer, "up", up)

        return [mlp.gate_up_proj.register_forward_hook(split)]

    def hook(branch: str):
        return lambda module, args, output: fn(layer, branch, output)

    return [part(mlp, b).register_forward_hook(hook(b)) for b in ("gate", "up")]


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
    with hook_lock(model):
        fused = fused_experts(model)
        if fused is not None:
            handles = [experts.register_forward_hook(_fused_hook(i, fn)) for i, experts in enumerate(fused)]
        else:
            handles = [part(mlp, "down").register_forward_pre_hook(_down_hook(i, fn)) for i, mlp in hooked_ffns(model)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


@contextmanager
def on_gate_up(model: nn.Module, fn: Callable[[int, str, torch.Tensor], None]) -> Iterator[None]:
    """Call fn(layer, "gate" | "up", pre_activation) with gate_proj(x) and up_proj(x) outputs."""
    with hook_lock(model):
        fused = fused_experts(model)
        if fused is not None:
            handles = [e.register_forward_hook(_fused_gate_up_hook(i, fn)) for i, e in enumerate(fused)]
        else:
            handles = [h for i, mlp in hooked_ffns(model) for h in _gate_up_handles(i, mlp, fn)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

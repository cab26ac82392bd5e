"""The runtime's weight records, a leaf that the kernels, packing, the modes and MoE all build on:
an FFN layer's matrices in the kernels' layout (FFNWeights), an attention block's
(AttentionWeights), and what a pack keeps of each matrix (the tensor, or its blocks: Quantizer)."""

from dataclasses import dataclass, field

import torch

from turbo_demo.runtime.quant import QWeight, Weight, format_of, quantize, row_bytes, rows_name, weight_bytes


def nbytes(t: Weight) -> int:
    return weight_bytes(t)


class Quantizer:
    """What pack keeps of each matrix: the tensor itself (quant None), or its blocks in the
    format `format_of(name, quant)` names, taken from `done` where quantized at load."""

    def __init__(self, quant: str | None = None, done: dict[str, QWeight] | None = None):
        self.quant, self.done = quant, done or {}

    def __call__(self, name: str, w: torch.Tensor) -> Weight:
        if self.quant is None:
            return w
        if name in self.done:
            return self.done[name]
        fmt = format_of(name, self.quant)
        return w if fmt is None else quantize(w, fmt)

    def rows(self, name: str, w: torch.Tensor) -> QWeight | None:
        """A quantized pack's (H, I) blocks of W_down `name` (w as HF stores it; quant.DOWN):
        from `done` (rows_name), else quantized here; None unquantized (the dense formula reads
        wd_t), and for a checkpoint quantized before these blocks existed (w on the meta device)."""
        if self.quant is None:
            return None
        key = rows_name(name)
        if key in self.done:
            return self.done[key]
        fmt = format_of(key, self.quant)
        return None if w.is_meta or fmt is None else quantize(w, fmt)


def neuron_major(linear: torch.nn.Linear) -> torch.Tensor:
    """linear.weight (out, in) as a contiguous (in, out) copy; the module keeps its own."""
    return linear.weight.detach().t().contiguous()


@dataclass(frozen=True)
class FFNWeights:
    """One layer's gated FFN: wg, wu (I, H), wd_t (I, H); act applies to the gate, and to the up
    branch too when drelu (bamboo; a ReLU Llama is ReGLU: drelu False); the predictor fc1 (R, H),
    fc2_t (R, I) and the bound its scores must exceed (score_bound) when the model has one;
    in a quantized pack, wd: W_down (H, I) in blocks along the neurons, which the dense formula
    reads (Quantizer.rows; None: it reads wd_t)."""

    wg: Weight
    wu: Weight
    wd_t: Weight
    act: str
    drelu: bool
    fc1: Weight | None = None
    fc2_t: Weight | None = None
    threshold: float | None = None
    wd: QWeight | None = None
    # sizes, fixed once (a decode step reads them in every layer): neurons, the bytes of one
    # neuron's row in one of the three matrices, and of the whole FFN
    n: int = field(init=False)
    row_bytes: int = field(init=False)
    dense_bytes: int = field(init=False)

    def __post_init__(self):
        n, row = self.wg.size(0), row_bytes(self.wg)
        for name, value in (("n", n), ("row_bytes", row), ("dense_bytes", 3 * n * row)):
            object.__setattr__(self, name, value)  # frozen: set once, here

    @property
    def matrices(self) -> tuple[Weight, ...]:
        """What the FFN kernels read: the three matrices, and the predictor's where it has one."""
        return tuple(w for w in (self.wg, self.wu, self.wd_t, self.fc1, self.fc2_t, self.wd) if w is not None)

    @property
    def parts(self) -> tuple["FFNWeights", ...]:
        """The FFNs a layer is made of: itself (a MoE layer's are its experts, runtime/moe.py)."""
        return (self,)

    def make_mode(self, cls, kernels, options=None):
        """The layer's mode: `cls` (a runtime.modes.Mode class) on these weights (a MoE layer
        makes its router's mode around one per expert instead)."""
        return cls(self, kernels, options)


@dataclass(frozen=True)
class AttentionWeights:
    """One layer's attention block: the input RMSNorm's weight, the four projections, and the
    optional parts (None where the architecture has none): the biases of q, k, v and o (Qwen2),
    and q_norm, k_norm (hd,), an RMSNorm of each head of q and k before RoPE (Qwen3)."""

    norm: torch.Tensor
    wq: Weight
    wk: Weight
    wv: Weight
    wo: Weight
    bq: torch.Tensor | None = None
    bk: torch.Tensor | None = None
    bv: torch.Tensor | None = None
    bo: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None

    @property
    def matrices(self) -> tuple[Weight, ...]:
        return self.wq, self.wk, self.wv, self.wo

    @property
    def extras(self) -> tuple[torch.Tensor | None, ...]:
        """bq, bk, bv, bo, q_norm, k_norm: the C++ attention step's optional arguments, in its order."""
        return self.bq, self.bk, self.bv, self.bo, self.q_norm, self.k_norm

    @property
    def plain(self) -> bool:
        """Whether it has none of the optional parts (the Llama block)."""
        return all(e is None for e in self.extras)

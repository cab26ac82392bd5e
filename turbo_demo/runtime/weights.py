"""The runtime's weight records, a leaf that packing, the modes and MoE all build on: an FFN
layer's matrices in the kernels' layout (FFNWeights) and what a pack keeps of each matrix (the
tensor, or its blocks: Quantizer)."""

from dataclasses import dataclass, field

import torch

from turbo_demo.runtime.quant import QWeight, Weight, format_of, quantize, row_bytes, weight_bytes


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


def neuron_major(linear: torch.nn.Linear) -> torch.Tensor:
    """linear.weight (out, in) as a contiguous (in, out) copy; the module keeps its own."""
    return linear.weight.detach().t().contiguous()


@dataclass(frozen=True)
class FFNWeights:
    """One layer's gated FFN: wg, wu (I, H), wd_t (I, H); act applies to the gate, and to the up
    branch too when drelu (bamboo; a ReLU Llama is ReGLU: drelu False); the predictor fc1 (R, H),
    fc2_t (R, I) and the bound its scores must exceed (score_bound) when the model has one."""

    wg: Weight
    wu: Weight
    wd_t: Weight
    act: str
    drelu: bool
    fc1: Weight | None = None
    fc2_t: Weight | None = None
    threshold: float | None = None
    # sizes, fixed once (a decode step reads them in every layer): neurons, the bytes of one
    # neuron's row in one of the three matrices, and of the whole FFN
    n: int = field(init=False)
    row_bytes: int = field(init=False)
    dense_bytes: int = field(init=False)

    def __post_init__(self):
        n, row = self.wg.size(0), row_bytes(self.wg)
        for name, value in (("n", n), ("row_bytes", row), ("dense_bytes", 3 * n * row)):
            object.__setattr__(self, name, value)  # frozen: set once, here

"""The runtime's own weights: `pack(model)`, built once per loaded model, read by every runtime.

The transformers model stays exactly as loaded (other runs and its own forward use it). What
the kernels need in another layout is copied once, here:

    W_down (H, I)        -> wd_t (I, H)   neuron-major: row i is neuron i's output column
    predictor fc2 (I, R) -> fc2_t (R, I)  input-major: row j is what z_j adds to the scores
    everything else      shared with the model (gate, up, attention, norms, embeddings: their
                         HF layout is already row-major, one row per output)

so the pack costs one extra copy of W_down and fc2 (about a third of the FFN's weights).
"""

from dataclasses import dataclass, field
from typing import Any

import torch

from turbo_demo.errors import UserError
from turbo_demo.model.hooks import ffn_modules
from turbo_demo.runtime.kernels.reference import ACTS

LEAN_ARCHITECTURES = ("mistral", "llama", "bamboo")


def lean_supports(config) -> bool:
    """Whether the lean runtime knows this architecture (else: transformers' own forward)."""
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    return (
        config.model_type in LEAN_ARCHITECTURES
        and rope == "default"
        and not getattr(config, "attention_bias", False)
        and not getattr(config, "mlp_bias", False)
    )


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def neuron_major(linear: torch.nn.Linear) -> torch.Tensor:
    """linear.weight (out, in) as a contiguous (in, out) copy; the module keeps its own."""
    return linear.weight.detach().t().contiguous()


@dataclass(frozen=True)
class FFNWeights:
    """One layer's gated FFN: wg, wu (I, H), wd_t (I, H); act applies to the gate, and to the up
    branch too when drelu (bamboo); the predictor fc1 (R, H), fc2_t (R, I) and its calibrated
    score threshold when the checkpoint has one."""

    wg: torch.Tensor
    wu: torch.Tensor
    wd_t: torch.Tensor
    act: str
    drelu: bool
    fc1: torch.Tensor | None = None
    fc2_t: torch.Tensor | None = None
    threshold: float | None = None
    # sizes, fixed once (a decode step reads them in every layer): neurons, the bytes of one
    # neuron's row in one of the three matrices, and of the whole FFN
    n: int = field(init=False)
    row_bytes: int = field(init=False)
    dense_bytes: int = field(init=False)

    def __post_init__(self):
        n, row_bytes = self.wg.size(0), self.wg.size(1) * self.wg.element_size()
        for name, value in (("n", n), ("row_bytes", row_bytes), ("dense_bytes", 3 * n * row_bytes)):
            object.__setattr__(self, name, value)  # frozen: set once, here


def pack_ffn(mlp, config, layer: int) -> FFNWeights:
    act = getattr(config, "hidden_act", "silu")
    if act not in ACTS:
        raise UserError(f"unsupported FFN activation {act!r}; the sparse runtime knows {', '.join(ACTS)}")
    predictor = getattr(mlp, "predictor", None)
    threshold_of = getattr(config, "threshold_of", None)
    return FFNWeights(
        wg=mlp.gate_proj.weight.detach(),
        wu=mlp.up_proj.weight.detach(),
        wd_t=neuron_major(mlp.down_proj),
        act=act,
        drelu=getattr(config, "model_type", "") == "bamboo",
        fc1=None if predictor is None else predictor.fc1.weight.detach(),
        fc2_t=None if predictor is None else neuron_major(predictor.fc2),
        threshold=None if predictor is None or threshold_of is None else float(threshold_of(layer)),
    )


@dataclass(frozen=True)
class AttentionWeights:
    """One layer's attention block: the input RMSNorm's weight and the four projections."""

    norm: torch.Tensor
    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    wo: torch.Tensor


@dataclass(frozen=True)
class LeanWeights:
    """Everything a lean decode step reads, looked up once: at batch 1 on a small model the
    module attribute lookups of every step would cost as much as the arithmetic."""

    embed: torch.Tensor
    norm: torch.Tensor
    lm_head: torch.Tensor
    attention: list[AttentionWeights]
    ffn_norms: list[torch.Tensor]


@dataclass(frozen=True)
class PackedModel:
    """A loaded model and the runtime's weights for it. ffns is empty for a model without a gated
    FFN (only dense decoding, through transformers); lean is None where the lean runtime does
    not know the architecture."""

    model: Any  # a transformers causal LM; its config fields are read by name
    ffns: list[FFNWeights]
    lean: LeanWeights | None

    @property
    def owned_bytes(self) -> int:
        """Bytes of the copies the pack made (beyond the model's own weights)."""
        return sum(nbytes(f.wd_t) + (0 if f.fc2_t is None else nbytes(f.fc2_t)) for f in self.ffns)


def pack_lean(model) -> LeanWeights:
    inner = model.model
    return LeanWeights(
        embed=inner.embed_tokens.weight.detach(),
        norm=inner.norm.weight.detach(),
        lm_head=model.lm_head.weight.detach(),
        attention=[
            AttentionWeights(
                layer.input_layernorm.weight.detach(),
                layer.self_attn.q_proj.weight.detach(),
                layer.self_attn.k_proj.weight.detach(),
                layer.self_attn.v_proj.weight.detach(),
                layer.self_attn.o_proj.weight.detach(),
            )
            for layer in inner.layers
        ],
        ffn_norms=[layer.post_attention_layernorm.weight.detach() for layer in inner.layers],
    )


@torch.no_grad()
def pack(model) -> PackedModel:
    """The runtime's weights for a loaded transformers causal LM (which is left as it is)."""
    try:
        ffns = [pack_ffn(mlp, model.config, i) for i, mlp in enumerate(ffn_modules(model))]
    except UserError:
        ffns = []  # no gated FFN the kernels know: dense decoding through transformers only
    lean = pack_lean(model) if ffns and lean_supports(model.config) else None
    return PackedModel(model, ffns, lean)

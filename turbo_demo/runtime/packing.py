"""The runtime's own weights: `pack(model)`, built once per loaded model, read by every runtime.

The transformers model stays exactly as loaded (other runs and its own forward use it). What
the kernels need in another layout is copied once, here:

    W_down (H, I)        -> wd_t (I, H)   neuron-major: row i is neuron i's output column
    predictor fc2 (I, R) -> fc2_t (R, I)  input-major: row j is what z_j adds to the scores
    everything else      shared with the model (gate, up, attention, norms, embeddings: their
                         HF layout is already row-major, one row per output); Phi-3's fused
                         qkv_proj and gate_up_proj are split into row views, not copies

so the pack costs one extra copy of W_down and fc2 (about a third of the FFN's weights), and
for Gemma one of its RMSNorm weights, stored as the (1 + w) they multiply by.
"""

from dataclasses import dataclass, field
from typing import Any

import torch

from turbo_demo.errors import UserError
from turbo_demo.model.hooks import ffn_modules
from turbo_demo.runtime.kernels.reference import ACTS

# What the lean engine adds to the Llama block per architecture (else: transformers' engine):
#   qwen2   biases on q, k, v            qwen3  an RMSNorm of each q and k head before RoPE
#   gemma   embeddings times sqrt(H), RMSNorms scaled by (1 + w), a tanh-GELU gate
#   phi3    q, k, v and gate, up stored fused: split here as row views
# Gemma 2 and 3 (norms after attention and FFN, logit soft-capping, alternating sliding
# windows) run on transformers' forward, as do non-default RoPE scalings (Llama 3's among them),
# partial rotary embeddings, layers that mix attention types, and FFNs with biases.
LEAN_ARCHITECTURES = ("mistral", "llama", "bamboo", "qwen2", "qwen3", "gemma", "phi3")


def lean_supports(config) -> bool:
    """Whether the lean runtime knows this architecture (else: transformers' own forward)."""
    rope = getattr(config, "rope_parameters", None) or {}
    return (
        config.model_type in LEAN_ARCHITECTURES
        and rope.get("rope_type", "default") == "default"
        and rope.get("partial_rotary_factor", 1.0) == 1.0
        and len(set(getattr(config, "layer_types", None) or ())) <= 1
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


def gate_up(mlp) -> tuple[torch.Tensor, torch.Tensor]:
    """W_gate and W_up (I, H): HF's two projections, or Phi-3's fused gate_up_proj (2I, H), whose
    first I rows are the gate (Phi3MLP chunks its output gate first), split as row views."""
    if hasattr(mlp, "gate_up_proj"):
        return tuple(mlp.gate_up_proj.weight.detach().chunk(2, dim=0))
    return mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()


def pack_ffn(mlp, config, layer: int) -> FFNWeights:
    # Gemma 2 and 3 name the FFN's activation hidden_activation, the others hidden_act
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
    if act not in ACTS:
        raise UserError(f"unsupported FFN activation {act!r}; the sparse runtime knows {', '.join(ACTS)}")
    if any(getattr(m, "bias", None) is not None for m in mlp.children() if isinstance(m, torch.nn.Linear)):
        raise UserError("the FFN has biases, which the sparse kernels do not add")
    predictor = getattr(mlp, "predictor", None)
    threshold_of = getattr(config, "threshold_of", None)
    wg, wu = gate_up(mlp)
    return FFNWeights(
        wg=wg,
        wu=wu,
        wd_t=neuron_major(mlp.down_proj),
        act=act,
        drelu=getattr(config, "model_type", "") == "bamboo",
        fc1=None if predictor is None else predictor.fc1.weight.detach(),
        fc2_t=None if predictor is None else neuron_major(predictor.fc2),
        threshold=None if predictor is None or threshold_of is None else float(threshold_of(layer)),
    )


@dataclass(frozen=True)
class AttentionWeights:
    """One layer's attention block: the input RMSNorm's weight, the four projections, and the
    optional parts of Kernels.attention_step (None where the architecture has none)."""

    norm: torch.Tensor
    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    wo: torch.Tensor
    bq: torch.Tensor | None = None
    bk: torch.Tensor | None = None
    bv: torch.Tensor | None = None
    bo: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None

    @property
    def extras(self) -> tuple[torch.Tensor | None, ...]:
        """bq, bk, bv, bo, q_norm, k_norm: attention_step's optional arguments, in its order."""
        return self.bq, self.bk, self.bv, self.bo, self.q_norm, self.k_norm


@dataclass(frozen=True)
class LeanWeights:
    """Everything a lean decode step reads, looked up once: at batch 1 on a small model the
    module attribute lookups of every step would cost as much as the arithmetic. embed_scale
    (a scalar in the weights' dtype, Gemma's sqrt(H)) multiplies the embeddings where given."""

    embed: torch.Tensor
    norm: torch.Tensor
    lm_head: torch.Tensor
    attention: list[AttentionWeights]
    ffn_norms: list[torch.Tensor]
    embed_scale: torch.Tensor | None = None
    copied_bytes: int = 0  # Gemma's (1 + w) norms, the only lean weights that are copies


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
        ffns = sum(nbytes(f.wd_t) + (0 if f.fc2_t is None else nbytes(f.fc2_t)) for f in self.ffns)
        return ffns + (0 if self.lean is None else self.lean.copied_bytes)


def bias(linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach()


def pack_attention(attn, norm: torch.Tensor) -> AttentionWeights:
    q_norm, k_norm = (getattr(attn, name, None) for name in ("q_norm", "k_norm"))
    extras = dict(
        bo=bias(attn.o_proj),
        q_norm=None if q_norm is None else q_norm.weight.detach(),
        k_norm=None if k_norm is None else k_norm.weight.detach(),
    )
    if hasattr(attn, "qkv_proj"):  # Phi-3: rows q (nh hd), then k and v (nkv hd each)
        wqkv = attn.qkv_proj.weight.detach()
        nkv = attn.num_key_value_heads * attn.head_dim
        wq, wk, wv = wqkv.split([wqkv.size(0) - 2 * nkv, nkv, nkv])
        return AttentionWeights(norm, wq, wk, wv, attn.o_proj.weight.detach(), **extras)
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    wq, wk, wv = (p.weight.detach() for p in projections)
    bq, bk, bv = (bias(p) for p in projections)
    return AttentionWeights(norm, wq, wk, wv, attn.o_proj.weight.detach(), bq, bk, bv, **extras)


def pack_lean(model) -> LeanWeights:
    inner = model.model
    gemma = model.config.model_type == "gemma"
    # Gemma's RMSNorm multiplies by (1 + w): stored once as such, the rms_norm kernel serves
    # (exact in fp32; in bf16 the kernel rounds the normed x before the product, HF after it)
    norms = [inner.norm] + [
        n for layer in inner.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)
    ]
    weights = [n.weight.detach() + 1 if gemma else n.weight.detach() for n in norms]
    embed = inner.embed_tokens.weight.detach()
    return LeanWeights(
        embed=embed,
        norm=weights[0],
        lm_head=model.lm_head.weight.detach(),
        attention=[pack_attention(layer.self_attn, n) for layer, n in zip(inner.layers, weights[1::2])],
        ffn_norms=weights[2::2],
        # as GemmaTextScaledWordEmbedding rounds it: to fp32, then to the weights' dtype
        embed_scale=torch.tensor(model.config.hidden_size**0.5).to(embed.device, embed.dtype) if gemma else None,
        copied_bytes=sum(map(nbytes, weights)) if gemma else 0,
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

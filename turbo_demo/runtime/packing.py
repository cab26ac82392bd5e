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

`pack(model, quant="int8" | "int4")` stores every matrix a decode step reads as blocks instead
(runtime/quant.py, `quant.format_of` says which format each gets; embeddings and norms stay as
loaded), in the same neuron-major layout. Matrices already quantized at load
(`quantized`, by parameter name, W_down and fc2 in their neuron-major layout) are taken as they
are, so that a model streamed from its safetensors (checkpoints/quantized.py) never holds its float
matrices at all. A quantized pack keeps W_down twice: neuron-major for the sparse steps
(PowerInfer's layout), and as HF stores it for the dense formula (llama.cpp's: quant.DOWN).
"""

import math
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from turbo_demo.errors import UserError
from turbo_demo.models.hooks import ffn_modules
from turbo_demo.runtime.kernels.reference import ACTS
from turbo_demo.runtime.moe import is_moe, pack_moe
from turbo_demo.runtime.quant import QWeight, Weight, is_blocks
from turbo_demo.runtime.weights import AttentionWeights, FFNWeights, Quantizer, nbytes, neuron_major

# What the lean engine adds to the Llama block per architecture (else: transformers' engine):
#   qwen2   biases on q, k, v            qwen3  an RMSNorm of each q and k head before RoPE
#   gemma   embeddings times sqrt(H), RMSNorms scaled by (1 + w), a tanh-GELU gate
#   phi3    q, k, v and gate, up stored fused: split here as row views
#   mixtral, turbosparsemixtral  a router and experts per layer (runtime/moe.py)
# Gemma 2 and 3 (norms after attention and FFN, logit soft-capping, alternating sliding
# windows) run on transformers' forward, as do non-default RoPE scalings (Llama 3's among them),
# partial rotary embeddings, layers that mix attention types, and FFNs with biases.
LEAN_ARCHITECTURES = (
    "mistral", "llama", "bamboo", "qwen2", "qwen3", "gemma", "phi3", "mixtral", "turbosparsemixtral"
)  # fmt: skip


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


def gate_up(mlp, q: Quantizer, prefix: str) -> tuple[Weight, Weight]:
    """W_gate and W_up (I, H): HF's two projections, or Phi-3's fused gate_up_proj (2I, H), whose
    first I rows are the gate (Phi3MLP chunks its output gate first), split as row views."""
    if hasattr(mlp, "gate_up_proj"):
        fused = q(f"{prefix}gate_up_proj.weight", mlp.gate_up_proj.weight.detach())
        half = fused.size(0) // 2
        return tuple(fused.split([half, half]))
    return q(f"{prefix}gate_proj.weight", mlp.gate_proj.weight.detach()), q(
        f"{prefix}up_proj.weight", mlp.up_proj.weight.detach()
    )


def pack_ffn(mlp, config, layer: int, q: Quantizer | None = None) -> FFNWeights:
    # Gemma 2 and 3 name the FFN's activation hidden_activation, the others hidden_act
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
    if act not in ACTS:
        raise UserError(f"unsupported FFN activation {act!r}; the sparse runtime knows {', '.join(ACTS)}")
    if any(getattr(m, "bias", None) is not None for m in mlp.children() if isinstance(m, torch.nn.Linear)):
        raise UserError("the FFN has biases, which the sparse kernels do not add")
    predictor = getattr(mlp, "predictor", None)
    q, prefix = q or Quantizer(), f"model.layers.{layer}.mlp."
    wg, wu = gate_up(mlp, q, prefix)
    return FFNWeights(
        wg=wg,
        wu=wu,
        wd_t=q(f"{prefix}down_proj.weight", neuron_major(mlp.down_proj)),
        act=act,
        drelu=getattr(config, "model_type", "") == "bamboo",
        fc1=None if predictor is None else q(f"{prefix}predictor.fc1.weight", predictor.fc1.weight.detach()),
        fc2_t=None if predictor is None else q(f"{prefix}predictor.fc2.weight", neuron_major(predictor.fc2)),
        threshold=score_bound(predictor, config, layer),
        wd=q.rows(f"{prefix}down_proj.weight", mlp.down_proj.weight.detach()),
    )


def score_bound(predictor, config, layer: int) -> float | None:
    """The bound a layer's predictor scores are compared against, strictly (score > bound, as the
    kernels do): for a PowerInfer predictor (checkpoints/powerinfer.py), whose rule is score >= min_score,
    the largest float32 below min_score (the same neurons for float32 scores, PowerInfer's own
    compare); else the config's threshold (bamboo's: calibrated, or the published 0.0); None
    without a predictor or a threshold."""
    if predictor is None:
        return None
    min_score = getattr(predictor, "min_score", None)
    if min_score is not None:
        t = torch.tensor(min_score, dtype=torch.float32)
        return float(torch.nextafter(t, t.new_tensor(-math.inf)))
    threshold_of = getattr(config, "threshold_of", None)
    return None if threshold_of is None else float(threshold_of(layer))


def ffn_parts(ffns: list) -> list[FFNWeights]:
    """Every FFN of a pack's layers: a MoE layer's (runtime/moe.py) are its experts."""
    return [e for f in ffns for e in f.parts]


@dataclass(frozen=True)
class LeanWeights:
    """Everything a lean decode step reads, looked up once: at batch 1 on a small model the
    module attribute lookups of every step would cost as much as the arithmetic. embed_scale
    (a scalar in the weights' dtype, Gemma's sqrt(H)) multiplies the embeddings where given."""

    embed: torch.Tensor
    norm: torch.Tensor
    lm_head: Weight
    attention: list[AttentionWeights]
    ffn_norms: list[torch.Tensor]
    embed_scale: torch.Tensor | None = None
    copied_bytes: int = 0  # Gemma's (1 + w) norms and quantized matrices: the lean weights that are copies


@dataclass(frozen=True)
class PackedModel:
    """A loaded model and the runtime's weights for it. ffns is empty for a model without a gated
    FFN (only dense decoding, through transformers); lean is None where the lean runtime does
    not know the architecture."""

    model: Any  # a transformers causal LM; its config fields are read by name
    ffns: list  # one FFNWeights per layer, or a MoE layer's moe.MoEWeights
    lean: LeanWeights | None
    quant: str | None = None  # "int8" or "int4" where the matrices are block-quantized
    # threshold mode's per-layer thresholds calibrated on this pack, by target sparsity
    # (runtime/calibration.py): kept with the weights they were measured on, freed with them
    calibrated: dict = field(default_factory=dict, repr=False, compare=False)
    calibrating: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def owned_bytes(self) -> int:
        """Bytes of the copies the pack made (beyond the model's own weights)."""
        ffns = sum(
            nbytes(f.wd_t)
            + sum(nbytes(w) for w in (f.wg, f.wu, f.fc1) if w is not None and is_blocks(w))  # quantized copies
            + sum(nbytes(w) for w in (f.fc2_t, f.wd) if w is not None)
            for f in ffn_parts(self.ffns)
        )
        return ffns + (0 if self.lean is None else self.lean.copied_bytes)


def bias(linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach()


def pack_attention(attn, norm: torch.Tensor, q: Quantizer, prefix: str) -> AttentionWeights:
    q_norm, k_norm = (getattr(attn, name, None) for name in ("q_norm", "k_norm"))
    extras = dict(
        bo=bias(attn.o_proj),
        q_norm=None if q_norm is None else q_norm.weight.detach(),
        k_norm=None if k_norm is None else k_norm.weight.detach(),
    )
    if hasattr(attn, "qkv_proj"):  # Phi-3: rows q (nh hd), then k and v (nkv hd each)
        wqkv = q(f"{prefix}qkv_proj.weight", attn.qkv_proj.weight.detach())
        nkv = attn.num_key_value_heads * attn.head_dim
        wq, wk, wv = wqkv.split([wqkv.size(0) - 2 * nkv, nkv, nkv])
        return AttentionWeights(norm, wq, wk, wv, q(f"{prefix}o_proj.weight", attn.o_proj.weight.detach()), **extras)
    projections = {name: getattr(attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
    wq, wk, wv, wo = (q(f"{prefix}{name}.weight", p.weight.detach()) for name, p in projections.items())
    bq, bk, bv = (bias(p) for p in list(projections.values())[:3])
    return AttentionWeights(norm, wq, wk, wv, wo, bq, bk, bv, **extras)


def pack_lean(model, q: Quantizer) -> LeanWeights:
    inner = model.model
    gemma = model.config.model_type == "gemma"
    # Gemma's RMSNorm multiplies by (1 + w): stored once as such, the rms_norm kernel serves
    # (exact in fp32; in bf16 the kernel rounds the normed x before the product, HF after it)
    norms = [inner.norm] + [
        n for layer in inner.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)
    ]
    weights = [n.weight.detach() + 1 if gemma else n.weight.detach() for n in norms]
    embed = inner.embed_tokens.weight.detach()
    attention = [
        pack_attention(layer.self_attn, n, q, f"model.layers.{i}.self_attn.")
        for i, (layer, n) in enumerate(zip(inner.layers, weights[1::2]))
    ]
    lm_head = q("lm_head.weight", model.lm_head.weight.detach())
    quantized = [w for a in attention for w in (a.wq, a.wk, a.wv, a.wo)] + [lm_head]
    return LeanWeights(
        embed=embed,
        norm=weights[0],
        lm_head=lm_head,
        attention=attention,
        ffn_norms=weights[2::2],
        # as GemmaTextScaledWordEmbedding rounds it: to fp32, then to the weights' dtype
        embed_scale=torch.tensor(model.config.hidden_size**0.5).to(embed.device, embed.dtype) if gemma else None,
        # Phi-3's q, k, v are row views of one quantized tensor: counted once, by their rows
        copied_bytes=(sum(map(nbytes, weights)) if gemma else 0) + sum(nbytes(w) for w in quantized if is_blocks(w)),
    )


@torch.no_grad()
def pack(model, quant: str | None = None, quantized: dict[str, QWeight] | None = None) -> PackedModel:
    """The runtime's weights for a loaded transformers causal LM (which is left as it is); with
    quant ("int8", "int4"), its matrices block-quantized (those in `quantized` as they are)."""
    q = Quantizer(quant, quantized)
    try:
        if is_moe(model):
            ffns: list = pack_moe(model, q)
        else:
            ffns = [pack_ffn(mlp, model.config, i, q) for i, mlp in enumerate(ffn_modules(model))]
    except UserError:
        ffns = []  # no gated FFN the kernels know: dense decoding through transformers only
    lean = pack_lean(model, q) if ffns and lean_supports(model.config) else None
    if quant is not None and lean is None:
        raise UserError(
            f"quantized weights ({quant}) run on the lean runtime only, which does not know "
            f"{model.config.model_type!r} models: load it without quantization"
        )
    return PackedModel(model, ffns, lean, quant)

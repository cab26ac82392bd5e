"""Lean batch-1 decoding for Llama-shaped models, on packed weights: Mistral, Llama, bamboo,
Qwen2, Qwen3, Gemma (1), Phi-3 (packing.lean_supports says which configs; the others run on
transformers' own forward, runtime/hf.py).

The runtime reads the pack's tensors (runtime/packing.py), keeps a preallocated KV cache, and
decodes with a small ladder of functions:

    prefill(ids) -> logits               all prompt tokens at once, causal attention, the FFN
                                         mode's prefill formula (dense, or the published mask)
    decode(token) -> (logits, records)   one token: attention on the cache, then the FFN mode
    generate(...)                        (Decoder) yields one StepStats per new token

Per layer:  a = x + W_o attn(rope(W_q n1(x)), rope(W_k n1(x)), W_v n1(x));  x' = a + FFN(n2(a), a)
where n1, n2 are RMSNorms and the FFN gets the residual a for its predictor; x starts as the
token's embedding (times sqrt(H) for Gemma). Where the architecture has them, q, k and v get
their biases (Qwen2) and q, k an RMSNorm per head before RoPE (Qwen3).

Prefill runs batched PyTorch operations (GEMMs, SDPA). A decode step works on vectors through
the kernels (GEMV, fused RMSNorm, fused RoPE + cache write + attention): at batch 1 the step is
bound by the bytes of weights it reads, and, in small models, by the fixed cost per operation.
"""

import torch
import torch.nn.functional as F

from turbo_demo.errors import UserError
from turbo_demo.runtime.decoder import Decoder
from turbo_demo.runtime.kernels import Kernels
from turbo_demo.runtime.kernels.reference import LayerCache, rope
from turbo_demo.runtime.packing import PackedModel
from turbo_demo.runtime.stats import LayerRecord

# The KV cache is preallocated for this many positions at most: a 32k-context checkpoint must
# not reserve gigabytes for a demo that decodes a few hundred tokens.
MAX_CONTEXT = 4096


class LeanRuntime(Decoder):
    """Decodes a packed Llama-shaped model with one FFN mode in every layer."""

    engine = "lean"

    def __init__(self, packed: PackedModel, mode: str = "dense", kernels: Kernels | None = None, options=None, **given):
        if packed.lean is None:
            raise UserError(f"the lean runtime does not know {packed.model.config.model_type!r} models")
        super().__init__(packed, mode, kernels or Kernels(), options, **given)
        config = packed.model.config
        self.w = packed.lean
        self.eps = config.rms_norm_eps
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        # a window applies to every layer (lean_supports refuses layers of mixed types), unless
        # the layers say they all attend fully (Qwen2 and Qwen3 keep a window they do not use)
        full = set(getattr(config, "layer_types", None) or ()) == {"full_attention"}
        self.window = None if full else getattr(config, "sliding_window", None)
        self.max_len = min(config.max_position_embeddings, MAX_CONTEXT)
        self.device, self.dtype = self.w.embed.device, self.w.embed.dtype
        theta = config.rope_parameters["rope_theta"]
        inv_freq = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim))
        freqs = torch.arange(self.max_len, dtype=torch.float)[:, None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)  # (max_len, head_dim)
        half = self.head_dim // 2
        sin_signed = torch.cat((-emb[:, :half].sin(), emb[:, half:].sin()), dim=-1)
        self.cos, self.sin_signed = (t.to(self.device, self.dtype) for t in (emb.cos(), sin_signed))
        shape = (len(self.w.attention), self.n_kv, self.max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        # the kernel sets for the attention's matrices and the LM head's, bound once (the FFNs'
        # are their modes'): int4 keeps the head at int8, blocks as well
        self.attention_kernels = self.kernels.for_weights(*(m for a in self.w.attention for m in a.matrices))
        self.head_kernels = self.kernels.for_weights(self.w.lm_head)
        # per layer: (attention weights, its cache, FFN norm, mode, firing counts)
        caches = [LayerCache(k, v, self.cos, self.sin_signed) for k, v in zip(self.k_cache, self.v_cache)]
        self.layers = list(zip(self.w.attention, caches, self.w.ffn_norms, self.modes, self.firing))
        self.pos = 0

    def reset(self) -> None:
        self.pos = 0

    def attention(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Prefill from position 0: x (T, H) -> attention output (T, H); fills the cache."""
        w, T, linear = self.w.attention[i], x.size(0), self.attention_kernels.linear
        h = self.kernels.rms_norm(x, w.norm, self.eps)
        q = linear(h, w.wq, w.bq).view(T, self.n_heads, self.head_dim)
        k = linear(h, w.wk, w.bk).view(T, self.n_kv, self.head_dim)
        v = linear(h, w.wv, w.bv).view(T, self.n_kv, self.head_dim).transpose(0, 1)
        if w.q_norm is not None:
            q = self.kernels.rms_norm(q, w.q_norm, self.eps)
        if w.k_norm is not None:
            k = self.kernels.rms_norm(k, w.k_norm, self.eps)
        q, k = q.transpose(0, 1), k.transpose(0, 1)  # (nh, T, hd), (nkv, T, hd)
        q = rope(q, self.cos[:T], self.sin_signed[:T])  # (nh, T, hd)
        self.k_cache[i, :, :T] = rope(k, self.cos[:T], self.sin_signed[:T])  # (nkv, T, hd)
        self.v_cache[i, :, :T] = v
        mask = None  # causal; banded where a sliding window is shorter than the prompt
        if self.window and self.window < T:
            pos = torch.arange(T, device=self.device)
            mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - self.window)
        # batched (1, heads, T, hd): PyTorch's CPU flash kernel takes 4-D inputs only (3-D ones
        # run the unfused formula, 2x slower at 512 tokens)
        out = F.scaled_dot_product_attention(
            q[None], self.k_cache[None, i, :, :T], self.v_cache[None, i, :, :T], attn_mask=mask,
            is_causal=mask is None, enable_gqa=True,
        )[0]  # fmt: skip
        return linear(out.transpose(0, 1).reshape(T, -1), w.wo, w.bo)

    def embed(self, ids: torch.Tensor | int) -> torch.Tensor:
        """The embeddings of ids ((T,) -> (T, H), or one id -> (H,)), scaled where the
        architecture scales them."""
        x = self.w.embed[ids]
        return x if self.w.embed_scale is None else x * self.w.embed_scale

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The last position's hidden state x (H,) -> logits (V,)."""
        return self.head_kernels.matvec(self.w.lm_head, self.kernels.rms_norm(x, self.w.norm, self.eps))

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """The prompt ids (T,) from position 0, each FFN its mode's prefill -> logits of the last
        token (V,)."""
        self.reset()
        if ids.numel() > self.max_len:
            raise UserError(f"prompt of {ids.numel()} tokens exceeds the context of {self.max_len}")
        x = self.embed(ids.to(self.device))  # (T, H)
        for i, (mode, norm) in enumerate(zip(self.modes, self.w.ffn_norms)):
            x = x + self.attention(i, x)
            x = x + mode.prefill(self.kernels.rms_norm(x, norm, self.eps), x)
        self.pos = ids.numel()
        return self.logits(x[-1])

    @torch.inference_mode()
    def decode(self, token: int) -> tuple[torch.Tensor, list[LayerRecord]]:
        """One token at the current position, FFNs in the runtime's mode -> (logits (V,), one
        LayerRecord per layer)."""
        k, x, pos = self.attention_kernels, self.embed(token), self.pos  # x (H,)
        first = max(0, pos + 1 - self.window) if self.window else 0  # the sliding window's start
        records = []
        for a, cache, ffn_norm, mode, counts in self.layers:
            # x + W_o attention(n1(x)), with k and v of this position written into the cache
            x = k.attention_step(x, a, self.eps, cache, pos, first)
            x, record = mode.step(k.rms_norm(x, ffn_norm, self.eps), x, x, counts)
            records.append(record)
        self.pos += 1
        return self.logits(x), records

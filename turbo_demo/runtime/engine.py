"""Lean batch-1 decoding for the Mistral family (Mistral, Llama, bamboo), on HF weights.

The runtime reads the weight tensors of a loaded transformers model (no copies), keeps a
preallocated KV cache, and decodes with a small ladder of functions:

    prefill(ids) -> logits    all prompt tokens at once, causal attention, dense FFN
    decode(token) -> logits   one token: attention on the cache, then the layer's FFN mode
    sample(logits) -> token   greedy, or temperature + top-p from a seeded generator
    generate(...)             yields one StepStats per new token (time, sparsity, bytes)

Per layer:  a = x + W_o attn(rope(W_q n1(x)), rope(W_k n1(x)), W_v n1(x));  x' = a + FFN(n2(a), a)
where n1, n2 are RMSNorms and the FFN gets the residual a for its predictor.

Prefill runs batched PyTorch operations (GEMMs, SDPA). A decode step works on vectors through
`kernels` (GEMV, fused RMSNorm, fused RoPE + cache write + attention): at batch 1 the step is
bound by the bytes of weights it reads, and, in small models, by the fixed cost per operation.
"""

import time
from collections.abc import Iterator
from threading import Event

import torch
import torch.nn.functional as F

from turbo_demo.errors import UserError
from turbo_demo.runtime import kernels
from turbo_demo.runtime.ffn import FFN, make_ffn
from turbo_demo.runtime.stats import StepStats

SUPPORTED = ("mistral", "llama", "bamboo")
MAX_CONTEXT = 4096


def supports(config) -> bool:
    """Whether the lean runtime knows this architecture (else: TransformersRuntime)."""
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    return (config.model_type in SUPPORTED and rope == "default"
            and not getattr(config, "attention_bias", False) and not getattr(config, "mlp_bias", False))


def sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """Greedy for temperature <= 0, else nucleus sampling over softmax(logits / temperature)
    (kernels.sample_top_p) at one uniform number from the seeded generator."""
    if temperature <= 0:
        return kernels.argmax(logits)
    # u from the CPU generator; the draw runs where the logits are (the C++ kernels' logits are
    # on the CPU, and the PyTorch kernel sorts a CUDA model's logits on its GPU)
    u = float(torch.rand((), generator=gen, dtype=torch.float64))
    return kernels.sample_top_p(logits.float(), temperature, top_p, u)


class Decoder:
    """The generation loop shared by both engines; subclasses give prefill, decode and ffns."""

    engine = "?"
    ffns: list[FFN]
    max_len: int
    dense_ffn_bytes: int

    def audit(self, on: bool) -> None:
        for ffn in self.ffns:
            ffn.audit = on

    def close(self) -> None:
        """Give the model back as it was loaded (the transformers engine swaps its MLPs)."""

    def firing_counts(self) -> list[list[int]]:
        """Per layer and neuron: in how many decode steps of the last generation the neuron fired
        (h != 0 among the neurons its mode computed)."""
        return [ffn.firing.tolist() for ffn in self.ffns]

    def generate(self, prompt_ids: list[int], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, stop: Event | None = None,
                 eos_token_id: int | None = None, audit: bool = False) -> Iterator[StepStats]:
        """Yield one StepStats per new token.

        The prompt but its last token is prefilled (dense FFN); every new token then comes from
        a decode step in the current mode, timed alone (decode + sample). The predictor audit,
        when on, runs after the timer stops so that it never counts as decoding time.
        """
        if not prompt_ids:
            raise UserError("empty prompt: give at least one token")
        gen = torch.Generator().manual_seed(seed)
        max_new_tokens = min(max_new_tokens, self.max_len - len(prompt_ids) + 1)
        self.audit(audit)
        for ffn in self.ffns:
            ffn.firing.zero_()
        if len(prompt_ids) > 1:
            self.prefill(torch.tensor(prompt_ids[:-1]))
        else:
            self.reset()
        token = prompt_ids[-1]
        n = self.ffns[0].n if self.ffns else 0
        for step in range(max_new_tokens):
            start = time.perf_counter()
            logits = self.decode(token)
            token = sample(logits, temperature, top_p, gen)
            elapsed = time.perf_counter() - start
            if audit:
                for ffn in self.ffns:
                    ffn.record.recall = ffn.audit_recall()
            records = [ffn.record for ffn in self.ffns]
            yield StepStats.from_records(step, token, elapsed, records, n, self.dense_ffn_bytes)
            if (stop is not None and stop.is_set()) or token == eos_token_id:
                return


class Runtime(Decoder):
    """Decodes a loaded Mistral-family HF model with a chosen FFN mode."""

    engine = "lean"

    def __init__(self, model, mode: str = "dense", **mode_options):
        config = model.config
        if not supports(config):
            raise UserError(f"the lean runtime does not know {config.model_type!r} models")
        self.model, self.config = model, config
        self.eps = config.rms_norm_eps
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.window = getattr(config, "sliding_window", None)
        # The KV cache is preallocated for max_len positions: capped so that a 32k-context
        # checkpoint does not reserve gigabytes for a demo that decodes a few hundred tokens.
        self.max_len = min(config.max_position_embeddings, MAX_CONTEXT)
        inner = model.model
        self.embed = inner.embed_tokens.weight.data
        self.norm = inner.norm.weight.data
        self.lm_head = model.lm_head.weight.data
        self.device = self.embed.device
        if self.device.type != "cpu" and kernels.backend() == "cpp":
            raise UserError(f"the C++ kernels run on the CPU and this model is on {self.device}: "
                            "use the torch backend (--backend torch), or move the model to the CPU")
        self.layers = [layer for layer in inner.layers]
        # A decode step's tensors per layer, looked up once: at batch 1 on a small model the
        # module attribute lookups of every step would cost as much as the arithmetic.
        self.attn_weights = [(layer.input_layernorm.weight.data, layer.self_attn.q_proj.weight.data,
                              layer.self_attn.k_proj.weight.data, layer.self_attn.v_proj.weight.data,
                              layer.self_attn.o_proj.weight.data) for layer in self.layers]
        self.ffn_norms = [layer.post_attention_layernorm.weight.data for layer in self.layers]
        self.dtype = self.embed.dtype
        theta = config.rope_parameters["rope_theta"]
        inv_freq = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim))
        freqs = torch.arange(self.max_len, dtype=torch.float)[:, None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)  # (max_len, head_dim)
        half = self.head_dim // 2
        sin_signed = torch.cat((-emb[:, :half].sin(), emb[:, half:].sin()), dim=-1)
        self.cos, self.sin_signed = (t.to(self.device, self.dtype) for t in (emb.cos(), sin_signed))
        self.k_cache = self.v_cache = None
        self.pos = 0
        self.set_mode(mode, **mode_options)

    def set_mode(self, mode: str, **options) -> None:
        """Swap every layer's FFN for `mode`; the weights stay shared with the HF model."""
        self.ffns: list[FFN] = [make_ffn(mode, layer.mlp, self.config, i, **options)
                                for i, layer in enumerate(self.layers)]
        self.mode = mode
        self.dense_ffn_bytes = sum(3 * f.n * f.row_bytes for f in self.ffns)

    def reset(self) -> None:
        shape = (len(self.layers), self.n_kv, self.max_len, self.head_dim)
        if self.k_cache is None:
            self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self.layer_caches = list(zip(self.k_cache, self.v_cache))  # (nkv, max_len, hd) views
        self.pos = 0

    def attention(self, i: int, layer, x: torch.Tensor) -> torch.Tensor:
        """Prefill from position 0: x (T, H) -> attention output (T, H); fills the cache."""
        attn = layer.self_attn
        T = x.size(0)
        h = kernels.rms_norm(x, layer.input_layernorm.weight, self.eps)
        q = F.linear(h, attn.q_proj.weight).view(T, self.n_heads, self.head_dim).transpose(0, 1)
        k = F.linear(h, attn.k_proj.weight).view(T, self.n_kv, self.head_dim).transpose(0, 1)
        v = F.linear(h, attn.v_proj.weight).view(T, self.n_kv, self.head_dim).transpose(0, 1)
        q = kernels.rope(q, self.cos[:T], self.sin_signed[:T])  # (nh, T, hd)
        self.k_cache[i, :, :T] = kernels.rope(k, self.cos[:T], self.sin_signed[:T])  # (nkv, T, hd)
        self.v_cache[i, :, :T] = v
        pos = torch.arange(T, device=self.device)
        mask = pos[None, :] <= pos[:, None]  # causal, and banded when a sliding window applies
        if self.window:
            mask &= pos[None, :] > pos[:, None] - self.window
        out = F.scaled_dot_product_attention(q, self.k_cache[i, :, :T], self.v_cache[i, :, :T],
                                             attn_mask=mask, enable_gqa=True)
        return F.linear(out.transpose(0, 1).reshape(T, -1), attn.o_proj.weight)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The last position's hidden state x (H,) -> logits (V,)."""
        return kernels.matvec(self.lm_head, kernels.rms_norm(x, self.norm, self.eps))

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """The prompt ids (T,) from position 0, FFNs dense -> logits of the last token (V,)."""
        self.reset()
        if ids.numel() > self.max_len:
            raise UserError(f"prompt of {ids.numel()} tokens exceeds the context of {self.max_len}")
        x = self.embed[ids.to(self.device)]  # (T, H)
        for i, layer in enumerate(self.layers):
            x = x + self.attention(i, layer, x)
            x = x + self.ffns[i].batch(kernels.rms_norm(x, layer.post_attention_layernorm.weight, self.eps))
        self.pos = ids.numel()
        return self.logits(x[-1])

    @torch.inference_mode()
    def decode(self, token: int) -> torch.Tensor:
        """One token at the current position, FFNs in the current mode -> logits (V,)."""
        x = self.embed[token]  # (H,)
        pos = self.pos
        first = max(0, pos + 1 - self.window) if self.window else 0  # the sliding window's start
        for attn, (k_cache, v_cache), ffn_norm, ffn in zip(self.attn_weights, self.layer_caches,
                                                           self.ffn_norms, self.ffns):
            # x + W_o attention(n1(x)), with k and v of this position written into the caches
            x = kernels.attention_step(x, attn[0], self.eps, *attn[1:], k_cache, v_cache, self.cos,
                                       self.sin_signed, pos, first)
            x = ffn.step(kernels.rms_norm(x, ffn_norm, self.eps), x, add_to=x)
        self.pos += 1
        return self.logits(x)

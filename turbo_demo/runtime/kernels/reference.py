"""The kernels of a decode step, in PyTorch: the reference every backend must equal.

`Kernels` is both the PyTorch backend and the contract: each method's docstring is the one
definition of what the kernel computes (the C++ backend, `cpp.CppKernels`, overrides the
methods and must give the same results up to summation order; tests check it). Weights are
neuron-major (N, H): W_gate and W_up as HF stores them, W_down transposed (`wd_t`), so that a
sparse step reads each chosen neuron's rows as contiguous runs of H values. Vectors have the
weights' dtype; fp32 or bf16.

A weight may also be block-quantized (`quant.QWeight`, int8 or int4). The kernels for such
weights are a kernel set of their own (`BlockKernels`: vectors fp32 or bf16 alike, a weight's
dot products the quantized ones of `quant.q_rows_dot`, x quantized per block as llama.cpp
does, its weighted row sums `quant.q_rows_axpy`), bound once to the weights it will read:
`kernels.for_weights(*matrices)` gives the set for those matrices, so that no kernel tests a
weight's kind per call. The compound kernels are written in terms of rows_dot, rows_axpy,
matvec and vecmat, so one definition covers both sets.

Two optional arguments recur in the FFN steps:
    add_to (H,)      return add_to + y instead of y: the layer's residual add, fused into the
                     step's kernel (at batch 1 a separate tensor add costs more than the sum)
    counts (N,) i32  add 1 to counts[i] for every neuron i with h_i != 0 that the step
                     computed: the runtime's neuron firing counts
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from turbo_demo.errors import UserError
from turbo_demo.runtime.quant import Weight, dequantize, is_blocks, q_rows_axpy, q_rows_dot, quantize_activation
from turbo_demo.runtime.weights import AttentionWeights, FFNWeights

# Named as transformers' ACT2FN names them: "gelu" is the erf form, "gelu_pytorch_tanh" (Gemma)
# 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))).
ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
}
# The reference's gathered rows are copies (index_select): above this share of the neurons,
# one dense pass, masked, reads the weights faster than the gathers and gives the same result.
DENSE_FALLBACK_SHARE = 0.45


def plus(y: torch.Tensor, add_to: torch.Tensor | None) -> torch.Tensor:
    return y if add_to is None else add_to + y


def count_firing(counts: torch.Tensor | None, idx: torch.Tensor, h: torch.Tensor) -> None:
    """counts[idx_j] += 1 for every h_j != 0 (repeated indices count once each)."""
    if counts is not None:
        counts.index_add_(0, idx, (h != 0).to(counts.dtype))


def rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1) for x = (x1, x2):
    rotate_half(x) * sin = roll(x, d/2) * sin_signed with sin_signed = (-sin1, sin2)."""
    return x * cos + x.roll(x.size(-1) // 2, -1) * sin_signed


def top_indices(v: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of the k largest values of v (N,), ascending."""
    return v.topk(k, sorted=False).indices.sort().values


@dataclass(frozen=True)
class LayerCache:
    """A layer's KV cache, k and v (nkv, max_len, hd), and the whole rotary tables cos,
    sin_signed (max_len, hd) that its keys are written with."""

    k: torch.Tensor
    v: torch.Tensor
    cos: torch.Tensor
    sin_signed: torch.Tensor


def decode_attention(q, k, v, k_cache, v_cache, cos, sin_signed, pos: int, first: int) -> torch.Tensor:
    """RoPE on q (nh * hd,) and k (nkv * hd,); k, v into the caches (nkv, max_len, hd) at pos;
    attention over the cached positions first..pos -> (nh * hd,). Query head h reads kv head
    h / (nh / nkv) (grouped-query attention); softmax(q . k / sqrt(hd)) in fp32."""
    n_kv, _, hd = k_cache.shape
    k_cache[:, pos] = rope(k.view(n_kv, hd), cos, sin_signed)
    v_cache[:, pos] = v.view(n_kv, hd)
    keys, values = k_cache[:, first : pos + 1].float(), v_cache[:, first : pos + 1].float()  # (nkv, L, hd)
    # the query heads of a group share one matmul with the group's keys (no per-head cache copy)
    qg = rope(q.view(-1, hd), cos, sin_signed).view(n_kv, -1, hd).float() * hd**-0.5
    probs = torch.softmax(qg @ keys.transpose(1, 2), dim=-1)  # (nkv, group, L)
    return (probs @ values).to(q.dtype).view(-1)


class Kernels:
    """The PyTorch kernels, on weights held as tensors. Capabilities: `name` and the device types
    the kernels run on. A matrix argument (w, wt) is left untyped: each set reads the one kind
    it is bound to (for_weights), tensors here, QWeights in BlockKernels."""

    name = "torch"
    devices: tuple[str, ...] = ("cpu", "cuda")

    def __init__(self) -> None:
        # threads for a prompt's forward (compute-bound GEMMs), where it differs from the decode
        # steps' (the calling thread's torch threads, which a server keeps below its core count)
        self._prefill_threads: int | None = None

    @property
    def prefill_threads(self) -> int | None:
        return self._prefill_threads

    @prefill_threads.setter
    def prefill_threads(self, threads: int | None) -> None:
        self._prefill_threads = threads

    @property
    def tensors(self) -> "Kernels":
        """This backend's kernels for matrices held as tensors."""
        return self

    @functools.cached_property
    def blocks(self) -> "Kernels":
        """This backend's kernels for block-quantized matrices (QWeight), made once."""
        return BlockKernels(self)

    def for_weights(self, *matrices: Weight | None) -> "Kernels":
        """The kernel set that reads these matrices (None: absent): bound once, where a layer's
        mode or a runtime is made. One set reads one kind, so the matrices must all be tensors
        or all blocks."""
        kinds = {is_blocks(w) for w in matrices if w is not None}
        if len(kinds) > 1:
            raise UserError("one layer's matrices mix block-quantized and unquantized weights, which no kernel reads")
        return self.blocks if kinds == {True} else self.tensors

    def rows_dot(self, w, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """y_j = W[idx_j] . x: W (N, H), x (H,), idx (k,) int64 -> y (k,); reads only rows idx."""
        return torch.mv(w.index_select(0, idx), x)

    def rows_axpy(self, wt, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """y = sum_j h_j Wt[idx_j]: Wt (N, H), h (k,), idx (k,) -> y (H,); rows with h_j = 0,
        which add nothing, are not read."""
        # embedding_bag sums the rows weighted by h without materialising them, but reads every
        # row it is given, and rejects an empty bag: drop the zero weights first
        nonzero = h != 0
        idx, h = idx[nonzero], h[nonzero]
        if idx.numel() == 0:
            return wt.new_zeros(wt.size(1))
        return F.embedding_bag(idx.unsqueeze(0), wt, per_sample_weights=h.unsqueeze(0), mode="sum")[0]

    def matvec(self, w, x: torch.Tensor) -> torch.Tensor:
        """y = W x: W (N, H), x (H,) -> y (N,)."""
        return torch.mv(w, x)

    def vecmat(self, h: torch.Tensor, wt) -> torch.Tensor:
        """y = h Wt: h (N,), Wt (N, H) -> y (H,)."""
        return h @ wt

    def up_down(self, w: FFNWeights, x, idx, a, add_to=None, counts=None):
        """A sparse FFN step of w (a ReLU gate) on the neurons idx (k,) whose activated gate
        values a (k,) are known (with a = None: a = relu(rows_dot(Wg, x, idx))) -> (y, up_rows,
        active): h = a * act(rows_dot(Wu, x, idx)), act = relu if w.drelu else identity,
        y = rows_axpy(Wd_t, h, idx); the up rows of neurons with a_j = 0 (h_j = 0 anyway) are
        not read: up_rows = #{j : a_j != 0}; active = #{j : h_j != 0}."""
        if a is None:
            a = torch.relu(self.rows_dot(w.wg, x, idx))
        live = a != 0
        idx, a = idx[live], a[live]
        u = self.rows_dot(w.wu, x, idx)
        h = a * (torch.relu(u) if w.drelu else u)
        count_firing(counts, idx, h)
        return plus(self.rows_axpy(w.wd_t, h, idx), add_to), idx.numel(), int(torch.count_nonzero(h))

    def dense_down(self, w: FFNWeights, h: torch.Tensor) -> torch.Tensor:
        """The dense formula's down projection of h (I,) or a prompt's (..., T, I) -> (..., H):
        h Wd_t (vecmat, or times for a prompt)."""
        return self.vecmat(h, w.wd_t) if h.dim() == 1 else self.times(h, w.wd_t)

    def ffn_dense(self, w: FFNWeights, x, add_to=None, counts=None):
        """The dense FFN of one token -> (y, active): h = act(Wg x) * (act(Wu x) if w.drelu else
        Wu x), y = dense_down(w, h), active = #{i : h_i != 0}; act = ACTS[w.act]."""
        f = ACTS[w.act]
        u = self.matvec(w.wu, x)
        h = f(self.matvec(w.wg, x)) * (f(u) if w.drelu else u)
        if counts is not None:
            counts += h != 0
        return plus(self.dense_down(w, h), add_to), int(torch.count_nonzero(h))

    def ffn_exact(self, w: FFNWeights, x, add_to=None, counts=None):
        """A ReLU-gated FFN on its gate-active neurons -> (y, computed, active): g = Wg x,
        S = {i : g_i > 0}, computed = |S|, then up_down on S with a = g[S]; equal to ffn_dense
        with act = relu, reading only the rows of S in Wu and of the active neurons in Wd_t."""
        g = self.matvec(w.wg, x)
        idx = self.indices_over(g, 0.0)
        y, _, active = self.up_down(w, x, idx, g.index_select(0, idx), add_to, counts)
        return y, idx.numel(), active

    def predict(self, w: FFNWeights, r, threshold: float, budget: int) -> tuple[torch.Tensor, int]:
        """w's activation predictor's choice of neurons for the residual r (H,) -> (idx, rows):
        z = relu(fc1 r) (R,), score = z fc2_t (I,), fc2_t (R, I) input-major, summed over the
        `rows` rows with z_j != 0 (the others add nothing and are not read);
        idx = top_indices(score, budget) if budget > 0, else the ascending i with
        score_i > threshold (the published rule round(sigmoid(score_i)) == 1 at threshold 0)."""
        z = torch.relu(self.matvec(w.fc1, r))
        score = self.vecmat(z, w.fc2_t)
        idx = top_indices(score, budget) if budget > 0 else self.indices_over(score, threshold)
        return idx, int(torch.count_nonzero(z))

    def ffn_predicted(self, w: FFNWeights, r, x, threshold: float, budget: int, add_to=None, counts=None):
        """A predictor-mode step of a ReLU-gated FFN -> (y, idx, rows, up_rows, active):
        (idx, rows) = predict(w, r, ...), then up_down on idx with a = None (the gate on the
        chosen rows only)."""
        idx, rows = self.predict(w, r, threshold, budget)
        if len(idx) <= DENSE_FALLBACK_SHARE * w.n:
            y, up_rows, active = self.up_down(w, x, idx, None, add_to, counts)
            return y, idx, rows, up_rows, active
        mask = torch.zeros(w.n, dtype=torch.bool, device=x.device).index_fill_(0, idx, True)
        a = torch.relu(self.matvec(w.wg, x)) * mask
        u = self.matvec(w.wu, x)
        h = a * (torch.relu(u) if w.drelu else u)
        if counts is not None:
            counts += h != 0
        return plus(self.vecmat(h, w.wd_t), add_to), idx, rows, int(torch.count_nonzero(a)), int(torch.count_nonzero(h))

    def linear(self, x: torch.Tensor, w, b: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., H) @ W.T (+ b): W (N, H) -> (..., N), a prompt's batched product (prefill)."""
        return F.linear(x, w, b)

    def times(self, h: torch.Tensor, wt) -> torch.Tensor:
        """h (..., N) @ Wt: Wt (N, H) -> (..., H), a prompt's batched product."""
        return h @ wt

    def rms_norm(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        """w * x / sqrt(mean(x^2) + eps) over the last dim of x (..., H), normalised in fp32 and
        rounded to x's dtype before w multiplies it, as in HF."""
        return w * F.rms_norm(x.float(), (x.size(-1),), eps=eps).to(x.dtype)

    def attention_step(self, x, w: AttentionWeights, eps: float, cache: LayerCache, pos: int, first: int):
        """A layer's attention block for one token x (H,): x + (Wo decode_attention(q, k, v, ...)
        + bo), n = rms_norm(x, w.norm, eps), q = Wq n + bq, k = Wk n + bk, v = Wv n + bv, with
        the cache's rotary tables read at row pos; where w has q_norm, k_norm, each head of q
        and k is rms_norm'ed with them before RoPE."""
        h = self.rms_norm(x, w.norm, eps)
        q, k, v = (plus(self.matvec(m, h), b) for m, b in ((w.wq, w.bq), (w.wk, w.bk), (w.wv, w.bv)))
        hd = cache.k.size(2)
        if w.q_norm is not None:
            q = self.rms_norm(q.view(-1, hd), w.q_norm, eps).view(-1)
        if w.k_norm is not None:
            k = self.rms_norm(k.view(-1, hd), w.k_norm, eps).view(-1)
        out = decode_attention(q, k, v, cache.k, cache.v, cache.cos[pos], cache.sin_signed[pos], pos, first)
        return x + plus(self.matvec(w.wo, out), w.bo)

    def indices_over(self, v: torch.Tensor, t: float) -> torch.Tensor:
        """The indices i with v_i > t, ascending."""
        return torch.nonzero(v > t).squeeze(1)

    def argmax(self, v: torch.Tensor) -> int:
        """The index of the first largest value of v (N,), a NaN counting as largest (torch.argmax)."""
        return int(v.argmax())

    def sample_top_p(self, v: torch.Tensor, temperature: float, top_p: float, u: float) -> int:
        """The token nucleus sampling draws from logits v (N,) at one uniform u in [0, 1):
        p = exp((v - max v) * (1 / temperature)); with the tokens ranked by p descending (ties:
        lower index first), token i is kept iff the mass ranked above it is < top_p * sum(p);
        the result is the first kept i, in index order, whose cumulative kept mass exceeds
        u * (the kept mass). Sums in fp64."""
        v = v.float()
        p = torch.exp((v - v.max()) * (1.0 / temperature))  # fp32, as the C++ loop computes it
        p64 = p.double()
        keep = torch.ones_like(p, dtype=torch.bool)
        if top_p < 1.0:
            ranked, order = p64.sort(descending=True, stable=True)  # stable: ties by lower index
            above = ranked.cumsum(0) - ranked  # the mass ranked above each token
            keep = torch.zeros_like(keep).index_fill_(0, order[above < top_p * p64.cumsum(0)[-1]], True)
        cdf = (p64 * keep).cumsum(0)
        j = int(torch.searchsorted(cdf, u * cdf[-1], right=True))  # the first cdf_j > u * kept mass
        return j if j < v.numel() else int(keep.nonzero()[-1])


class BlockKernels(Kernels):
    """The PyTorch kernels on block-quantized matrices (QWeight): the products of the module
    docstring's quantized definitions; the compound kernels are Kernels' own."""

    def __init__(self, tensors: Kernels):
        self._tensors = tensors

    @property
    def tensors(self) -> Kernels:
        return self._tensors

    @property
    def blocks(self) -> Kernels:
        return self

    @property
    def prefill_threads(self) -> int | None:  # one setting per backend, kept by its tensor set
        return self._tensors.prefill_threads

    @prefill_threads.setter
    def prefill_threads(self, threads: int | None) -> None:
        self._tensors.prefill_threads = threads

    def rows_dot(self, w, x, idx):
        return q_rows_dot(w, x, idx)

    def rows_axpy(self, wt, h, idx):
        nonzero = h != 0  # rows that add nothing are not read
        return q_rows_axpy(wt, h[nonzero], idx[nonzero])

    def matvec(self, w, x):
        return q_rows_dot(w, x)

    def vecmat(self, h, wt):
        return q_rows_axpy(wt, h)

    def dense_down(self, w, h):
        """With W_down's (H, I) blocks (w.wd): h quantized per block, then their dot products,
        as llama.cpp's ffn_down (matvec, or linear for a prompt); without: Kernels' h Wd_t."""
        if w.wd is None:
            return super().dense_down(w, h)
        return self.matvec(w.wd, h) if h.dim() == 1 else self.linear(h, w.wd)

    def linear(self, x, w, b=None):
        """Each token's row is matvec's: x quantized per block, then the dequantized rows' dot
        products in fp32, rounded to x's dtype."""
        return plus((quantize_activation(x) @ dequantize(w).t()).to(x.dtype), b)

    def times(self, h, wt):
        """h unquantized times the block values rounded to h's dtype (fp32: vecmat's exact
        values; bf16: rounded to nearest-even, for the CPU's bf16 dot products), fp32 sums, the
        result rounded to h's dtype."""
        return (h.float() @ dequantize(wt).to(h.dtype).float()).to(h.dtype)

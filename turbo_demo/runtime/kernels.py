"""The kernels of a decode step, with two backends: PyTorch (always works) and C++ (faster).

Gather-GEMV, the two operations a sparse FFN needs, on a subset `idx` of neurons:

    rows_dot(W, x, idx)   y_j = W[idx_j] . x           W (N, H) neuron-major, x (H,), y (k,)
    rows_axpy(Wt, h, idx) y   = sum_j h_j * Wt[idx_j]  Wt (N, H) neuron-major, h (k,), y (H,)

Both read only the k selected rows, each a contiguous run of H values (rows_axpy skips those
with h_j = 0, which add nothing): that is what makes a sparse FFN cheaper when decoding is bound
by memory bandwidth. Their dense forms, over all rows,
serve the dense FFN and the attention projections of one token:

    matvec(W, x)          y = W x                      W (N, H), x (H,), y (N,)
    vecmat(h, Wt)         y = h Wt                     h (N,), Wt (N, H), y (H,)

and a sparse FFN step on the neurons idx, once their activated gate values a (k,) are known
(or, with a = None, a = relu(rows_dot(Wg, x, idx))):

    up_down(Wu, Wd_t, x, idx, a, relu_up, Wg=None, add_to=None, counts=None) -> (y, up_rows, active)
                          h = a * act(rows_dot(Wu, x, idx)), act = relu or identity,
                          y = rows_axpy(Wd_t, h, idx), active = the number of non-zero h_j;
                          the up rows of neurons with a_j = 0 (h_j = 0 anyway) are not read:
                          up_rows = the number of non-zero a_j

whole FFN steps of one token, one call each (the C++ versions skip the tensor operations
in between, whose fixed costs outweigh a small layer's arithmetic):

    ffn_dense(Wg, Wu, Wd_t, x, act, act_up, add_to=None, counts=None) -> (y, active)
                          h = act(Wg x) * (act(Wu x) if act_up else Wu x), y = h Wd_t,
                          active = the number of non-zero h_i; act in ACTS
    ffn_exact(Wg, Wu, Wd_t, x, relu_up, add_to=None, counts=None) -> (y, computed, active)
                          S = {i : (Wg x)_i > 0}, computed = |S|, then up_down on S

                          up_down, ffn_dense and ffn_exact return add_to + y when given
                          add_to (H,): the layer's residual add, fused (at batch 1 a separate
                          tensor op costs more than the add: ~8% of a small model's step);
                          given counts (N,) int32, they add 1 to counts[i] for every neuron
                          with h_i != 0 (the runtime's neuron firing counts)

    predict(fc1, fc2_t, r, threshold, budget) -> (idx, rows)
                          z = relu(fc1 r) (R,), score = z fc2_t (I,) (fc2_t (R, I) input-major:
                          the rows with z_j = 0 add nothing and are not read; rows = how many
                          are), idx = top_indices(score, budget) if budget > 0, else the
                          ascending i with score_i >= threshold
    ffn_predicted(fc1, fc2_t, r, threshold, budget, Wg, Wu, Wd_t, x, relu_up, add_to=None,
                  counts=None) -> (y, idx, rows, up_rows, active)
                          a predictor-mode step in one call: predict, then up_down on idx
                          with a = None (the gate on the chosen rows)

and the rest of one token's layer:

    attention_step(x, ln_w, eps, Wq, Wk, Wv, Wo, k_cache, v_cache, cos, sin_signed, pos, first)
                          x + Wo decode_attention(Wq n, Wk n, Wv n, ...), n = rms_norm(x, ln_w);
                          cos, sin_signed: the rotary tables (max_len, hd), read at row pos
    rms_norm(x, w, eps)   w * x / sqrt(mean(x^2) + eps), normalised in fp32    x (..., H)
    indices_over(v, t, inclusive)   the indices i with v_i > t (>= t if inclusive), ascending
    argmax(v)             int: the index of the first largest value of v (N,), as torch.argmax
    sample_top_p(v, temperature, top_p, u)
                          int: the token nucleus sampling draws from logits v (N,) at one
                          uniform u in [0, 1): p = exp((v - max v) * (1 / temperature)); with
                          the tokens ranked by p descending (ties: lower index first), token i
                          is kept iff the mass ranked above it is < top_p * sum(p); the result
                          is the first kept i, in index order, whose cumulative kept mass
                          exceeds u * (the kept mass); sums in fp64

built, in the PyTorch versions (and likewise inside the C++ ones), from

    decode_attention(q, k, v, k_cache, v_cache, cos, sin_signed, pos, first) -> (nh * hd,)
                          RoPE on q, k (nh * hd,), (nkv * hd,); k, v into the caches
                          (nkv, max_len, hd) at pos; attention over positions first..pos
    top_indices(v, k)     the indices of the k largest values of v (N,), ascending

The C++ versions (`turbo_demo.runtime.cpp`: no gather buffer, fp32 sums, streaming loops, one
call per fused operation) are selected with `use_backend("cpp")`, or `select_backend("auto")`
where they may not build. Callers look the functions up at call time (`kernels.rows_dot(...)`),
so switching backends takes effect at once. Importing never compiles.
"""

import torch
import torch.nn.functional as F

from turbo_demo.errors import UserError

BACKENDS = ("torch", "cpp")
NAMES = ("rows_dot", "rows_axpy", "matvec", "vecmat", "up_down", "ffn_dense", "ffn_exact", "predict",
         "ffn_predicted", "rms_norm", "attention_step", "indices_over", "argmax", "sample_top_p")
ACTS = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu}


def torch_rows_dot(w: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.mv(w.index_select(0, idx), x)


def torch_rows_axpy(wt: torch.Tensor, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    # embedding_bag sums the selected rows weighted by h without materialising them, but reads
    # every row it is given: drop the zero weights first. It rejects an empty bag (a zero sum).
    nonzero = h != 0
    idx, h = idx[nonzero], h[nonzero]
    if idx.numel() == 0:
        return wt.new_zeros(wt.size(1))
    return F.embedding_bag(idx.unsqueeze(0), wt, per_sample_weights=h.unsqueeze(0), mode="sum")[0]


torch_matvec = torch.mv


def torch_vecmat(h: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    return h @ wt


def plus(y: torch.Tensor, add_to: torch.Tensor | None) -> torch.Tensor:
    return y if add_to is None else add_to + y


def count_firing(counts: torch.Tensor | None, idx: torch.Tensor, h: torch.Tensor) -> None:
    """counts[idx_j] += 1 for every h_j != 0 (repeated indices count once each)."""
    if counts is not None:
        counts.index_add_(0, idx, (h != 0).to(counts.dtype))


def torch_up_down(wu, wd_t, x, idx, a, relu_up: bool, wg=None, add_to=None,
                  counts=None) -> tuple[torch.Tensor, int, int]:
    if a is None:
        a = torch.relu(torch_rows_dot(wg, x, idx))
    live = a != 0
    idx, a = idx[live], a[live]
    u = torch_rows_dot(wu, x, idx)
    h = a * (torch.relu(u) if relu_up else u)
    count_firing(counts, idx, h)
    return plus(torch_rows_axpy(wd_t, h, idx), add_to), idx.numel(), int(torch.count_nonzero(h))


def torch_ffn_dense(wg, wu, wd_t, x, act: str, act_up: bool, add_to=None, counts=None) -> tuple[torch.Tensor, int]:
    f = ACTS[act]
    u = torch.mv(wu, x)
    h = f(torch.mv(wg, x)) * (f(u) if act_up else u)
    if counts is not None:
        counts += h != 0
    return plus(h @ wd_t, add_to), int(torch.count_nonzero(h))


def torch_ffn_exact(wg, wu, wd_t, x, relu_up: bool, add_to=None, counts=None) -> tuple[torch.Tensor, int, int]:
    g = torch.mv(wg, x)
    idx = torch_indices_over(g, 0.0, False)
    y, _, active = torch_up_down(wu, wd_t, x, idx, g.index_select(0, idx), relu_up, add_to=add_to,
                                 counts=counts)
    return y, idx.numel(), active


def torch_predict(fc1, fc2_t, r, threshold: float, budget: int) -> tuple[torch.Tensor, int]:
    z = torch.relu(torch.mv(fc1, r))
    score = z @ fc2_t
    idx = torch_top_indices(score, budget) if budget > 0 else torch_indices_over(score, threshold, True)
    return idx, int(torch.count_nonzero(z))


def torch_ffn_predicted(fc1, fc2_t, r, threshold: float, budget: int, wg, wu, wd_t, x, relu_up: bool,
                        add_to=None, counts=None) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
    idx, rows = torch_predict(fc1, fc2_t, r, threshold, budget)
    y, up_rows, active = torch_up_down(wu, wd_t, x, idx, None, relu_up, wg, add_to, counts)
    return y, idx, rows, up_rows, active


def torch_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # the normalised x is rounded to x's dtype before the weight multiplies it, as in HF
    return w * F.rms_norm(x.float(), (x.size(-1),), eps=eps).to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1) for x = (x1, x2):
    rotate_half(x) * sin = roll(x, d/2) * sin_signed with sin_signed = (-sin1, sin2)."""
    return x * cos + x.roll(x.size(-1) // 2, -1) * sin_signed


def torch_decode_attention(q, k, v, k_cache, v_cache, cos, sin_signed, pos: int, first: int):
    n_kv, _, hd = k_cache.shape
    k_cache[:, pos] = rope(k.view(n_kv, hd), cos, sin_signed)
    v_cache[:, pos] = v.view(n_kv, hd)
    keys, values = k_cache[:, first:pos + 1].float(), v_cache[:, first:pos + 1].float()  # (nkv, L, hd)
    # grouped-query attention without copying the cache per head: the query heads of a group
    # share one matmul with the group's keys; fp32, as SDPA computes on the CPU
    qg = rope(q.view(-1, hd), cos, sin_signed).view(n_kv, -1, hd).float() * hd ** -0.5
    probs = torch.softmax(qg @ keys.transpose(1, 2), dim=-1)  # (nkv, group, L)
    return (probs @ values).to(q.dtype).view(-1)


def torch_attention_step(x, ln_w, eps, wq, wk, wv, wo, k_cache, v_cache, cos, sin_signed, pos: int,
                         first: int) -> torch.Tensor:
    h = torch_rms_norm(x, ln_w, eps)
    out = torch_decode_attention(torch.mv(wq, h), torch.mv(wk, h), torch.mv(wv, h), k_cache, v_cache,
                                 cos[pos], sin_signed[pos], pos, first)
    return x + torch.mv(wo, out)


def torch_top_indices(v: torch.Tensor, k: int) -> torch.Tensor:
    return v.topk(k, sorted=False).indices.sort().values


def torch_indices_over(v: torch.Tensor, t: float, inclusive: bool) -> torch.Tensor:
    return torch.nonzero(v >= t if inclusive else v > t).squeeze(1)


def torch_argmax(v: torch.Tensor) -> int:
    return int(v.argmax())


def torch_sample_top_p(v: torch.Tensor, temperature: float, top_p: float, u: float) -> int:
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


_TORCH = (torch_rows_dot, torch_rows_axpy, torch_matvec, torch_vecmat, torch_up_down, torch_ffn_dense,
          torch_ffn_exact, torch_predict, torch_ffn_predicted, torch_rms_norm, torch_attention_step,
          torch_indices_over, torch_argmax, torch_sample_top_p)
(rows_dot, rows_axpy, matvec, vecmat, up_down, ffn_dense, ffn_exact, predict, ffn_predicted, rms_norm,
 attention_step, indices_over, argmax, sample_top_p) = _TORCH
_backend = "torch"


def use_backend(name: str) -> None:
    """Rebind the kernels: "torch" (always works) or "cpp" (builds on first use)."""
    global rows_dot, rows_axpy, matvec, vecmat, up_down, ffn_dense, ffn_exact, predict, ffn_predicted
    global rms_norm, attention_step, indices_over, argmax, sample_top_p, _backend
    if name == "torch":
        functions = _TORCH
    elif name == "cpp":
        from turbo_demo.runtime import cpp

        module = cpp.load()
        functions = tuple(getattr(module, n) for n in NAMES)
    else:
        raise UserError(f"unknown kernel backend {name!r}; choose one of {', '.join(BACKENDS)}")
    (rows_dot, rows_axpy, matvec, vecmat, up_down, ffn_dense, ffn_exact, predict, ffn_predicted, rms_norm,
     attention_step, indices_over, argmax, sample_top_p) = functions
    _backend = name


def select_backend(choice: str, before_build=None) -> str:
    """Switch to `choice`: "torch", "cpp", or "auto" (cpp where it builds here, else torch);
    returns the backend now in use. before_build(), when given, is called before the first
    build of the C++ kernels (about a minute), so that the caller can say why it waits."""
    if choice not in ("auto", *BACKENDS):
        raise UserError(f"unknown kernel backend {choice!r}; choose auto, {', '.join(BACKENDS)}")
    if choice != "torch":
        from turbo_demo.runtime import cpp

        if not cpp.built() and before_build is not None:
            before_build()
        if choice == "auto":
            choice = "cpp" if cpp.available() else "torch"
    use_backend(choice)
    return choice


def backend() -> str:
    """The name of the backend in use: "torch" or "cpp"."""
    return _backend

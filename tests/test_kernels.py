"""The C++ kernels against the PyTorch reference, and choosing the kernels."""

import pytest
import torch
import torch.nn.functional as F

from turbo_demo.errors import UserError
from turbo_demo.runtime.kernels import CppKernels, Kernels, cpp, load_kernels
from turbo_demo.runtime.kernels.reference import LayerCache
from turbo_demo.runtime.weights import AttentionWeights, FFNWeights

REF = Kernels()

# (N, H): H a multiple of 16, H not a multiple of 16 (SIMD tails), H below one vector.
SHAPES = [(64, 128), (97, 203), (33, 7)]
# fp32: both sides sum in fp32, in different orders. bf16: the C++ kernels round where the
# reference's tensor operations store bf16 values, so the two agree but where an fp32 sum summed
# in another order lands on the other side of a rounding boundary: one bf16 step, at most
# eps = 2^-7 of the value (measured here: bit-identical on every case). A result off by 1% fails
# (test_bf16_tolerance_fails_a_one_percent_error).
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-6, rtol=torch.finfo(torch.bfloat16).eps)}


def case(n, h, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, h, generator=g).to(dtype)
    x = torch.randn(h, generator=g).to(dtype)
    hv = torch.randn(k, generator=g).to(dtype)
    idx = torch.randperm(n, generator=g)[:k].sort().values
    return w, x, hv, idx


@pytest.fixture
def module(cpp_kernels):
    """The C++ kernels (skips where they cannot be built; fails instead under TURBO_DEMO_REQUIRE_CPP=1)."""
    return cpp_kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,h", SHAPES)
@pytest.mark.parametrize("k", ["0", "1", "half", "N"])
def test_cpp_matches_torch(module, n, h, k, dtype):
    k = {"0": 0, "1": 1, "half": n // 2, "N": n}[k]
    w, x, hv, idx = case(n, h, k, dtype)
    ref_axpy = REF.rows_axpy(w, hv, idx)
    for got, ref, size in (
        (module.rows_dot(w, x, idx), REF.rows_dot(w, x, idx), k),
        (module.rows_axpy(w, hv, idx), ref_axpy, h),
    ):
        assert got.dtype == dtype and got.shape == (size,)
        torch.testing.assert_close(got, ref, **TOL[dtype])


def test_cpp_bf16_accumulates_in_fp32(module):
    """bf16 results are the fp32 sums of the exact bf16 inputs, rounded once."""
    w, x, hv, idx = case(300, 1000, 150, torch.bfloat16, seed=1)
    ref_dot = REF.rows_dot(w.float(), x.float(), idx).to(torch.bfloat16)
    ref_axpy = REF.rows_axpy(w.float(), hv.float(), idx).to(torch.bfloat16)
    torch.testing.assert_close(module.rows_dot(w, x, idx), ref_dot, **TOL[torch.bfloat16])
    torch.testing.assert_close(module.rows_axpy(w, hv, idx), ref_axpy, **TOL[torch.bfloat16])


def test_bf16_tolerance_fails_a_one_percent_error(module):
    """The companion of every bf16 comparison here: a kernel 1% off (a scale, a dropped term)
    fails the tolerance the kernels pass."""
    wg, wu, wd_t, x = ffn_case(97, 203, torch.bfloat16)
    w, xv, hv, idx = case(97, 203, 48, torch.bfloat16)
    pairs = [
        (
            module.ffn_dense(ffn(wg, wu, wd_t, "silu", False), x)[0],
            REF.ffn_dense(ffn(wg, wu, wd_t, "silu", False), x)[0],
        ),
        (module.rows_dot(w, xv, idx), REF.rows_dot(w, xv, idx)),
        (module.rows_axpy(w, hv, idx), REF.rows_axpy(w, hv, idx)),
    ]
    for got, ref in pairs:
        torch.testing.assert_close(got, ref, **TOL[torch.bfloat16])
        with pytest.raises(AssertionError):
            torch.testing.assert_close((got.float() * 0.99).to(torch.bfloat16), ref, **TOL[torch.bfloat16])


def test_cpp_repeated_indices_and_threads(module):
    w, x, hv, _ = case(50, 333, 0, torch.float32)
    idx = torch.tensor([3, 3, 0, 49, 7, 3, 12, 49, 1, 2, 5, 6])
    hv = torch.randn(len(idx))
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            torch.testing.assert_close(module.rows_dot(w, x, idx), REF.rows_dot(w, x, idx), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(module.rows_axpy(w, hv, idx), REF.rows_axpy(w, hv, idx), atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("fn", ["rows_dot", "rows_axpy"])
def test_cpp_rejects_bad_input(module, fn):
    f = getattr(module, fn)
    w, x, hv, idx = case(40, 24, 10, torch.float32)
    v = x if fn == "rows_dot" else hv
    bad = {
        "weight dtype": (w.double(), v.double(), idx),
        "weight float16": (w.half(), v.half(), idx),
        "vector dtype": (w, v.to(torch.bfloat16), idx),
        "idx dtype": (w, v, idx.int()),
        "weight not contiguous": (w.t().contiguous().t(), v, idx),
        "vector not contiguous": (w, torch.stack([v, v], 1)[:, 0], idx),
        "weight not 2-D": (w.flatten(), v, idx),
        "vector size": (w, v[:-1], idx),
        "idx too large": (w, v, torch.cat([idx[:-1], torch.tensor([40])])),
        "idx negative": (w, v, torch.cat([idx[:-1], torch.tensor([-1])])),
        "idx not 1-D": (w, v, idx.unsqueeze(0)),
    }
    for what, args in bad.items():
        with pytest.raises(RuntimeError):
            f(*args)
            pytest.fail(f"{fn} accepted bad input: {what}")
    with pytest.raises(RuntimeError, match="out of range"):
        f(w, v, torch.tensor([0, 40]))


def test_torch_rows_axpy_empty():
    w = torch.randn(5, 3)
    y = REF.rows_axpy(w, torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert torch.equal(y, torch.zeros(3))


def test_load_kernels_chooses_once_and_says_why_it_waits(cpp_kernels):
    assert isinstance(load_kernels("torch"), Kernels) and load_kernels("torch").name == "torch"
    builds = []
    auto = load_kernels("auto", lambda: builds.append(1))
    assert isinstance(auto, CppKernels) and auto.name == "cpp" and auto.devices == ("cpu",)
    assert builds == []  # built already in this test session: nothing to announce
    assert load_kernels("auto", device="cuda").name == "torch"  # the C++ kernels are CPU code
    assert load_kernels("cpp").ops is cpp_kernels.ops  # built once per process


def test_unknown_kernel_backend():
    with pytest.raises(UserError, match="unknown kernel backend 'fast'; choose one of auto, torch, cpp"):
        load_kernels("fast")


def test_build_cache_is_keyed_by_cpu_and_sources(monkeypatch):
    key = cpp.build_key()
    assert cpp.module_name().endswith(key) and cpp.build_dir(cpp.module_name()).name == cpp.module_name()
    monkeypatch.setattr(cpp, "cpu_flags", lambda: "flags : some other cpu")
    assert cpp.build_key() != key  # a cache carried to another CPU is never loaded
    monkeypatch.undo()
    monkeypatch.setattr(cpp, "FLAGS", [*cpp.FLAGS, "-DOTHER"])
    assert cpp.build_key() != key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prompt_gemms_through_fp32_equal_torchs(cpp_kernels, monkeypatch, dtype):
    """widened_linear and widened_times (a prompt's GEMMs where the CPU has no bf16 dot products)
    against F.linear and matmul in the weights' dtype. linear: 39 tokens (a block of 32, then a
    tile of 4 and a short one), 40 rows (a short group of three), 101 columns (a tail past the
    last vector). times: 10 tokens (tiles of 3 and a short one) over 300 rows (panels of 128 and a
    short third) into 101 columns (strips and a tail), through wide_times, and through fp32_times
    (row chunks with a ragged last one) once the prompt is longer than WIDE_TIMES_TOKENS. Both
    sides multiply the same values (bf16 ones are exact in fp32) and sum K products in fp32 in
    different orders: about sqrt(K) roundings of eps32 of the sum of |terms| (a factor 4 of room);
    a bf16 result may then round to the neighbouring bf16 value, one step of at most 2^-7 |y|."""
    monkeypatch.setattr(cpp, "WIDEN_ROWS", 16)
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(40, 101, generator=g) * torch.linspace(0.2, 2, 101)).to(dtype)  # uneven columns
    wt = (torch.randn(300, 101, generator=g) * torch.linspace(2, 0.2, 101)).to(dtype)
    b = torch.randn(40, generator=g).to(dtype)
    x = torch.randn(3, 13, 101, generator=g).to(dtype)
    h = torch.relu(torch.randn(2, 5, 300, generator=g)).to(dtype)  # dReLU-like zeros
    eps32, step = torch.finfo(torch.float32).eps, torch.finfo(torch.bfloat16).eps
    terms = x.abs().double() @ w.abs().double().t()
    h_terms = h.abs().double() @ wt.abs().double()
    cases = [
        (cpp_kernels.widened_linear(x, w, b), F.linear(x, w, b), terms + b.abs().double(), 101),
        (cpp_kernels.widened_linear(x, w), F.linear(x, w), terms, 101),
        (cpp_kernels.widened_times(h, wt), h @ wt, h_terms, 300),
    ]
    monkeypatch.setattr(cpp, "WIDE_TIMES_TOKENS", 4)
    cases.append((cpp_kernels.widened_times(h, wt), h @ wt, h_terms, 300))
    for got, ref, terms, k in cases:
        assert got.dtype == dtype and got.shape == ref.shape
        allowed = 4 * k**0.5 * eps32 * terms + (step * ref.abs().double() if dtype == torch.bfloat16 else 0)
        assert ((got.double() - ref.double()).abs() <= allowed).all()
        assert not ((got.double() * 1.01 - ref.double()).abs() <= allowed).all()
    with pytest.raises(RuntimeError, match="100 values per token, the weight takes 101"):
        cpp_kernels.ops.wide_linear(torch.zeros(3, 100), w)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        cpp_kernels.ops.wide_times(torch.zeros(3, 300), wt.double())


@pytest.mark.parametrize(
    "flags,through_fp32", [("avx2 fma", True), ("avx512f avx512_bf16", False), ("amx_bf16", False)]
)
def test_cpp_kernels_choose_the_prompt_gemms_by_the_cpu(cpp_kernels, monkeypatch, flags, through_fp32):
    """torch's GEMMs where the CPU has bf16 dot products, the fp32 ones elsewhere, chosen once."""
    calls = []
    monkeypatch.setattr(cpp, "cpu_flags", lambda: f"flags\t\t: {flags}")
    monkeypatch.setattr(
        CppKernels, "widened_linear", lambda self, x, w, b=None: calls.append("linear") or F.linear(x, w, b)
    )
    monkeypatch.setattr(CppKernels, "widened_times", lambda self, h, wt: calls.append("times") or h @ wt)
    kernels = CppKernels(cpp_kernels.ops)
    kernels.linear(torch.randn(3, 8), torch.randn(4, 8))
    kernels.times(torch.randn(3, 4), torch.randn(4, 8))
    assert calls == (["linear", "times"] if through_fp32 else [])


def ffn_case(n, h, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    wg, wu, wd_t = (torch.randn(n, h, generator=g).div(h**0.5).to(dtype) for _ in range(3))
    return wg, wu, wd_t, torch.randn(h, generator=g).to(dtype)


def ffn(wg, wu, wd_t, act="relu", drelu=True, fc1=None, fc2_t=None):
    """The kernels' FFN record: act on the gate, and on the up branch too where drelu."""
    return FFNWeights(wg, wu, wd_t, act, drelu, fc1, fc2_t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act,act_up", [("relu", True), ("relu", False), ("silu", False), ("gelu", False)])
def test_cpp_ffn_steps_match_torch(module, dtype, act, act_up):
    wg, wu, wd_t, x = ffn_case(97, 203, dtype)
    w = ffn(wg, wu, wd_t, act, act_up)
    y, active = module.ffn_dense(w, x)
    ref_y, ref_active = REF.ffn_dense(w, x)
    torch.testing.assert_close(y, ref_y, **TOL[dtype])
    assert active == ref_active
    if act == "relu":  # exact mode: the same FFN on the gate-active neurons only
        y_exact, computed, active_exact = module.ffn_exact(w, x)
        ref = REF.ffn_exact(w, x)
        torch.testing.assert_close(y_exact, ref[0], **TOL[dtype])
        assert (computed, active_exact) == ref[1:] and active_exact == active
        assert computed == int((REF.matvec(wg, x) > 0).sum())
        torch.testing.assert_close(y_exact, y, **TOL[dtype])
        idx = torch.arange(0, 97, 2)  # a predicted set: up rows only where the gate is on
        got, ref = module.up_down(w, x, idx, None), REF.up_down(w, x, idx, None)
        torch.testing.assert_close(got[0], ref[0], **TOL[dtype])
        assert got[1:] == ref[1:] and got[1] == int((REF.rows_dot(wg, x, idx) > 0).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ffn_steps_add_to_is_the_residual_add(module, dtype):
    """add_to fuses the residual add: the same as adding the step's own result afterwards, in
    both backends (bitwise: y is rounded to the dtype before the add, as a tensor add sees it)."""
    wg, wu, wd_t, x = ffn_case(97, 203, dtype, seed=7)
    r = torch.randn(203, generator=torch.Generator().manual_seed(8)).to(dtype)
    idx, w = torch.arange(1, 97, 3), ffn(wg, wu, wd_t)
    for fns in ((module.ffn_dense, module.ffn_exact, module.up_down), (REF.ffn_dense, REF.ffn_exact, REF.up_down)):
        dense, exact, up_down = fns
        steps = ((dense, (w, x)), (exact, (w, x)), (up_down, (w, x, idx, None)))
        for fn, args in steps:
            plain, added = fn(*args), fn(*args, add_to=r)
            assert torch.equal(added[0], r + plain[0]) and added[1:] == plain[1:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ffn_steps_count_the_firing_neurons(module, dtype):
    """counts[i] += 1 where h_i != 0, in both backends: over every neuron (dense, exact), and
    over a selection that repeats neurons (up_down: each occurrence counts)."""
    wg, wu, wd_t, x = ffn_case(97, 203, dtype, seed=7)
    h = REF.matvec(wg, x).relu() * REF.matvec(wu, x).relu()
    fired = (h != 0).to(torch.int32)
    idx = torch.tensor([1, 4, 4, 90, 7, 1, 1, 60])
    picked = torch.zeros(97, dtype=torch.int32).index_add_(0, idx, fired[idx])
    assert 0 < int(fired.sum()) < 97 and int(picked.sum()) > 0
    w = ffn(wg, wu, wd_t)
    for fns in ((module.ffn_dense, module.ffn_exact, module.up_down), (REF.ffn_dense, REF.ffn_exact, REF.up_down)):
        dense, exact, up_down = fns
        steps = ((dense, (w, x), fired), (exact, (w, x), fired), (up_down, (w, x, idx, None), picked))
        for fn, args, expected in steps:
            counts = torch.full((97,), 5, dtype=torch.int32)
            fn(*args, counts=counts)
            fn(*args, counts=counts)
            assert torch.equal(counts, 5 + 2 * expected)
    with pytest.raises(RuntimeError, match="counts must be"):
        module.ffn_exact(w, x, counts=torch.zeros(97))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_predict_matches_torch(module, dtype):
    g = torch.Generator().manual_seed(3)
    fc1, fc2_t = torch.randn(24, 40, generator=g).to(dtype), torch.randn(24, 300, generator=g).to(dtype)
    r = torch.randn(40, generator=g).to(dtype)
    w = ffn(*ffn_case(300, 40, dtype)[:3], fc1=fc1, fc2_t=fc2_t)
    for threshold, budget in ((0.0, 0), (-2.5, 0), (0.0, 30), (0.0, 300)):
        idx, rows = module.predict(w, r, threshold, budget)
        ref_idx, ref_rows = REF.predict(w, r, threshold, budget)
        assert rows == ref_rows and 0 < rows < 24  # relu zeroes some of the rank's outputs
        if dtype == torch.float32:  # bf16 scores may round differently near the cut
            assert torch.equal(idx, ref_idx)
        assert len(idx) == (budget or len(ref_idx))
    with pytest.raises(RuntimeError, match="budget"):
        module.predict(w, r, 0.0, 301)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_ffn_predicted_matches_torch(module, dtype):
    """The fused predictor step: predict's choice, then up_down on it with the gate computed."""
    g = torch.Generator().manual_seed(10)
    wg, wu, wd_t, x = ffn_case(300, 40, dtype, seed=11)
    fc1, fc2_t = torch.randn(24, 40, generator=g).to(dtype), torch.randn(24, 300, generator=g).to(dtype)
    r = torch.randn(40, generator=g).to(dtype)
    w = ffn(wg, wu, wd_t, fc1=fc1, fc2_t=fc2_t)
    for threshold, budget in ((0.0, 0), (0.0, 45)):
        counts = [torch.zeros(300, dtype=torch.int32) for _ in range(2)]
        got = module.ffn_predicted(w, r, x, threshold, budget, x, counts[0])
        ref = REF.ffn_predicted(w, r, x, threshold, budget, x, counts[1])
        torch.testing.assert_close(got[0], ref[0], **TOL[dtype])
        assert len(got[1]) == (budget or len(ref[1])) and 0 < got[4] < got[3] <= len(got[1])
        if dtype == torch.float32:  # bf16 scores may round differently near the cut
            assert torch.equal(got[1], ref[1]) and got[2:] == ref[2:] and torch.equal(counts[0], counts[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h,nh,nkv,hd", [(64, 4, 2, 16), (256, 8, 4, 32)])  # q, k, v on one thread; on two
def test_cpp_attention_step_matches_torch(module, dtype, h, nh, nkv, hd):
    g = torch.Generator().manual_seed(4)
    max_len, pos = 12, 7
    w = {
        name: torch.randn(rows, cols, generator=g).div(cols**0.5).to(dtype)
        for name, rows, cols in (("q", nh * hd, h), ("k", nkv * hd, h), ("v", nkv * hd, h), ("o", h, nh * hd))
    }
    x, ln_w = torch.randn(h, generator=g).to(dtype), torch.rand(h, generator=g).add(0.5).to(dtype)
    cos, sin = (torch.rand(max_len, hd, generator=g).to(dtype) for _ in range(2))
    caches = {}
    for name, fn in (("cpp", module.attention_step), ("torch", REF.attention_step)):
        kc, vc = (torch.randn(nkv, max_len, hd, generator=torch.Generator().manual_seed(5)).to(dtype) for _ in range(2))
        y = fn(x, AttentionWeights(ln_w, w["q"], w["k"], w["v"], w["o"]), 1e-5, LayerCache(kc, vc, cos, sin), pos, 2)
        caches[name] = (y, kc, vc)
    for got, ref in zip(caches["cpp"], caches["torch"]):
        if dtype == torch.float32:
            torch.testing.assert_close(got, ref, **TOL[dtype])
            continue
        # the fused step keeps q, k, v and the attention's output in fp32 where the reference
        # rounds each to bf16: four roundings of at most 2^-8, at the output's scale
        tol = dict(atol=float(4 * 2**-8 * ref.float().abs().max()), rtol=0.0)
        torch.testing.assert_close(got, ref, **tol)
        with pytest.raises(AssertionError):  # 5% off fails it
            torch.testing.assert_close((got.float() * 1.05).to(dtype), ref, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_argmax_matches_torch(module, dtype):
    v = torch.randn(4096, generator=torch.Generator().manual_seed(9)).to(dtype)
    tied = torch.tensor([1.0, 3.0, -2.0, 3.0, 0.5]).to(dtype)  # ties: the first one
    nan = torch.tensor([1.0, float("nan"), 5.0, float("nan")]).to(dtype)  # NaN counts as largest
    for case in (v, tied, nan, v[:1]):
        assert module.argmax(case) == REF.argmax(case)
    with pytest.raises(RuntimeError, match="empty"):
        module.argmax(v[:0])


def test_sample_top_p_draws_from_the_nucleus(any_kernels):
    """Draws at evenly spaced u give each token its share of the nucleus: the top tokens up to
    top_p of the mass (the one that crosses top_p included), renormalised."""

    def shares(logits, top_p, temperature=1.0, draws=1000):
        v = torch.tensor(logits)
        got = torch.zeros(len(logits))
        for k in range(draws):
            got[any_kernels.sample_top_p(v, temperature, top_p, (k + 0.5) / draws)] += 1
        return got / draws

    logits = torch.tensor([0.1, 0.5, 0.05, 0.2, 0.15]).log().tolist()
    # ranked 0.5, 0.2, 0.15 | 0.1, 0.05: the mass above 0.1 is 0.85 >= 0.8, so it is left out
    torch.testing.assert_close(shares(logits, 0.8), torch.tensor([0, 0.5, 0, 0.2, 0.15]) / 0.85, atol=2e-3, rtol=0)
    torch.testing.assert_close(shares(logits, 1.0), torch.tensor([0.1, 0.5, 0.05, 0.2, 0.15]), atol=2e-3, rtol=0)
    assert shares(logits, 0.3).tolist() == [0, 1, 0, 0, 0]  # the top token alone
    # temperature 0.5 squares the probabilities before they are renormalised
    squared = torch.tensor([0.01, 0.25, 0.0025, 0.04, 0.0225]) / 0.325
    torch.testing.assert_close(shares(logits, 1.0, 0.5), squared, atol=2e-3, rtol=0)
    # ties rank the lower index first: of four equal tokens, top_p 0.5 keeps the first two
    assert shares([2.0, 2.0, 2.0, 2.0], 0.5).tolist() == [0.5, 0.5, 0, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_sample_top_p_matches_torch(module, dtype):
    g = torch.Generator().manual_seed(11)
    for n in (1, 7, 4096):
        for scale in (0.0, 1.0, 10.0):
            v = (torch.randn(n, generator=g) * scale).to(dtype)
            for logits in (v, v.round()):  # round: many ties
                for temperature, top_p in ((0.3, 0.5), (0.7, 0.95), (1.5, 0.05), (1.0, 1.0)):
                    for u in (0.0, 0.37, 0.999999):
                        assert module.sample_top_p(logits, temperature, top_p, u) == REF.sample_top_p(
                            logits, temperature, top_p, u
                        )
    for args, message in (
        ((v, 0.0, 0.9, 0.5), "temperature"),
        ((v, 1.0, 0.0, 0.5), "top_p"),
        ((v, 1.0, 0.9, 1.0), "u must be"),
        ((v[:0], 1.0, 0.9, 0.5), "empty"),
        ((torch.full((3,), float("-inf")).to(dtype), 1.0, 0.9, 0.5), "finite"),
    ):
        with pytest.raises(RuntimeError, match=message):
            module.sample_top_p(*args)


def test_cpp_ffn_steps_on_two_threads(module):
    """Large enough to split the neurons over threads, in blocks, with a ragged last block: the
    dense step, and the exact step and up_down, which share one loop."""
    wg, wu, wd_t, x = ffn_case(3001, 256, torch.float32, seed=5)  # blocks of 1024: 3, or 2 + 2
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            y, active = module.ffn_dense(ffn(wg, wu, wd_t, "silu", False), x)
            ref = REF.ffn_dense(ffn(wg, wu, wd_t, "silu", False), x)
            torch.testing.assert_close(y, ref[0], atol=1e-5, rtol=1e-5)
            assert active == ref[1]
            y, computed, active = module.ffn_exact(ffn(wg, wu, wd_t), x)
            ref = REF.ffn_exact(ffn(wg, wu, wd_t), x)
            torch.testing.assert_close(y, ref[0], atol=1e-5, rtol=1e-5)
            assert (computed, active) == ref[1:]
            idx = torch.arange(0, 3001, 2)  # a predicted set, with its gate values given or not
            a = torch.randn(len(idx), generator=torch.Generator().manual_seed(6)).relu()
            for given, drelu in ((None, True), (a, False)):
                counts, w = [torch.zeros(3001, dtype=torch.int32) for _ in range(2)], ffn(wg, wu, wd_t, drelu=drelu)
                got = module.up_down(w, x, idx, given, counts=counts[0])
                ref = REF.up_down(w, x, idx, given, counts=counts[1])
                torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
                assert got[1:] == ref[1:] and torch.equal(counts[0], counts[1])
    finally:
        torch.set_num_threads(before)

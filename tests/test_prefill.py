"""A prompt's batched products (Kernels.linear / times, the prefill's GEMMs) on block-quantized
weights: the C++ kernels (q_linear, q_times) against the reference (the whole matrix
dequantized, then one GEMM) and against the decode step's matvec / vecmat token by token, and a
quantized runtime's prefill on both backends.

Tolerances from the arithmetic. Both sides multiply the same values: the weights' d * q (int4: d (q - 8))
and, in linear, x quantized per block to the same int8 values (bit for bit); they differ only in
the order in which fp32 sums K products: about sqrt(K) roundings of eps32 of the sum of |terms|
(with a factor 4 of room). A bf16 result is that fp32 value rounded once more, so it may differ
by one bf16 step (at most 2^-7 of |y|) on top. Each check has a companion: the result off by
1% (what a wrong scale or a dropped block gives) must fail the same comparison.
"""

import pytest
import torch

from conftest import tiny_model
from turbo_demo.runtime import LeanRuntime, pack
from turbo_demo.runtime.kernels import Kernels
from turbo_demo.runtime.quant import dequantize, quantize, quantize_activation

REF = Kernels().blocks  # the reference on block-quantized weights
EPS32 = torch.finfo(torch.float32).eps
BF16_STEP = torch.finfo(torch.bfloat16).eps  # one step of a bf16 value: at most eps * |y|


def bound(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The allowed |difference| per element of y = x @ w (w as (K, N)): the fp32 summation's
    rounding over K terms, and one bf16 step of |y| where y is bf16."""
    k = x.size(-1)
    terms = x.abs().double() @ w.abs().double()
    allowed = 4 * k**0.5 * EPS32 * terms
    if y.dtype == torch.bfloat16:
        allowed = allowed + BF16_STEP * y.abs().double()
    return allowed


def within(got: torch.Tensor, ref: torch.Tensor, allowed: torch.Tensor) -> bool:
    return bool(((got.double() - ref.double()).abs() <= allowed).all())


def case(n, h, t, fmt, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = quantize(torch.randn(n, h, generator=g) * 0.5 + 0.1, fmt)  # a non-zero mean: int4's offset matters
    x = (torch.randn(t, h, generator=g) * torch.linspace(0.1, 3, h)).to(dtype)  # uneven magnitudes
    return w, x


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,h,t", [(100, 256, 5), (37, 203, 14), (9, 7, 1), (16, 64, 15), (300, 96, 7)])
def test_cpp_prefill_products_match_the_reference(cpp_kernels, fmt, dtype, n, h, t):
    """Shapes: rows past a group of 16 (or 4), a padded last block, one token, token tiles and
    tails of each length (AVX-512: 6 tokens a tile, AVX2: 4), times' rows past two panels of 128
    and a short third (AVX2), column blocks in pairs and one alone."""
    w, x = case(n, h, t, fmt, dtype)
    values = dequantize(w)  # (N, H), as both backends see them
    y, ref = cpp_kernels.blocks.linear(x, w), REF.linear(x, w)
    assert y.dtype == dtype and y.shape == (t, n)
    allowed = bound(quantize_activation(x), values.t(), ref)
    assert within(y, ref, allowed)
    assert not within(y * 1.01, ref, allowed)
    # times: h (T, N) @ Wt for Wt (N, H), the down projection's form (rows = neurons); some
    # neurons zero for every token, as dReLU and the predictor's mask leave them
    g = torch.Generator().manual_seed(1)
    hv = ((torch.randn(t, n, generator=g) + 0.5) * (torch.rand(n, generator=g) > 0.3)).to(dtype)
    y, ref = cpp_kernels.blocks.times(hv, w), REF.times(hv, w)
    assert y.dtype == dtype and y.shape == (t, h)
    allowed = bound(hv.float(), values, ref)
    assert within(y, ref, allowed)
    assert not within(y * 1.01, ref, allowed)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_cpp_prefill_rows_are_the_decode_steps_products(cpp_kernels, fmt):
    """Each token's row of linear is matvec on that token, of times vecmat: a prompt computes
    what decoding it token by token computes."""
    w, x = case(70, 160, 9, fmt, torch.float32)
    y = cpp_kernels.blocks.linear(x, w)
    hv = torch.relu(torch.randn(9, 70, generator=torch.Generator().manual_seed(2)))
    z = cpp_kernels.blocks.times(hv, w)
    values = dequantize(w)
    for t in range(9):
        allowed = bound(quantize_activation(x[t : t + 1]), values.t(), y[t : t + 1])
        assert within(y[t : t + 1], cpp_kernels.blocks.matvec(w, x[t])[None], allowed)
        allowed = bound(hv[t : t + 1], values, z[t : t + 1])
        assert within(z[t : t + 1], cpp_kernels.blocks.vecmat(hv[t], w)[None], allowed)
        assert not within(z[t : t + 1] * 1.01, cpp_kernels.blocks.vecmat(hv[t], w)[None], allowed)


def test_cpp_linear_adds_the_bias_keeps_leading_dims_and_refuses_bad_input(cpp_kernels):
    w, x = case(40, 96, 6, "int8", torch.float32)
    b = torch.linspace(-1, 1, 40)
    x = x.view(2, 3, 96)
    y = cpp_kernels.blocks.linear(x, w, b)
    ref = REF.linear(x, w, b)
    assert y.shape == (2, 3, 40)
    allowed = bound(quantize_activation(x), dequantize(w).t(), ref)
    assert within(y, ref, allowed)
    assert not within(y - b, ref, allowed)  # the bias is there
    with pytest.raises(RuntimeError, match="values per token"):
        cpp_kernels.ops.q_linear(torch.zeros(3, 95), w.data, w.code, w.cols)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        cpp_kernels.ops.q_times(torch.zeros(3, 40, dtype=torch.float64), w.data, w.code, w.cols)


@pytest.fixture(scope="module")
def tiny_drelu():
    """A dReLU model with predictors, two blocks wide, weights larger than HF's init so that its
    logits are far from flat."""
    model = tiny_model("drelu", hidden_size=64, intermediate_size=256, predictor_rank=16)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0 if p.dim() > 1 else 1.0)
    return model


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("mode", ["dense", "predictor"])
def test_quantized_prefill_agrees_across_backends_and_with_decoding(backends, tiny_drelu, fmt, mode):
    """A quantized runtime's prefill logits on both backends agree (the same tile values, GEMMs
    summed in another order); and they agree with decoding the prompt token by token, which
    quantizes each activation to Q8_0 first, within that quantization's effect."""
    packed = pack(tiny_drelu, fmt)
    ids = torch.tensor([3, 17, 5, 99, 42, 7, 64, 11])
    logits = [LeanRuntime(packed, mode, k).prefill(ids) for k in backends]
    scale = logits[0].abs().max()
    for other in logits[1:]:
        assert (other - logits[0]).abs().max() <= 1e-4 * scale
    runtime = LeanRuntime(packed, mode, backends[-1])
    runtime.reset()
    for token in ids.tolist():
        stepped, _ = runtime.decode(token)
    # Q8_0 activations: a relative error of about 1/254 per value, averaged over the sums
    assert (stepped - logits[-1]).abs().max() <= 0.05 * scale
    assert stepped.argmax() == logits[-1].argmax()

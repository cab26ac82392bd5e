"""Block-quantized weights (runtime/quant.py): the format against llama.cpp's block layouts, the
C++ q_* kernels against the PyTorch reference on QWeights, and every FFN mode running on an
int8 / int4 pack.

Tolerances: both backends quantize x to the same int8 values (bit for bit) and sum the same
products, in a different order: fp32 results agree to ~1e-6 of the sum of |terms| (TOL32); a
bf16 result is the same fp32 value rounded once, so it may differ by one bf16 step where the
two sums straddle a rounding boundary (TOL16: 1/128 relative)."""

import json

import pytest
import torch

from conftest import tiny_model
from turbo_demo.checkpoints import memory
from turbo_demo.checkpoints.checkpoint import load_model, load_tokenizer, save_checkpoint
from turbo_demo.checkpoints.quantized import load_quantized
from turbo_demo.errors import UserError
from turbo_demo.runtime import LeanRuntime, pack
from turbo_demo.runtime.kernels import Kernels
from turbo_demo.runtime.kernels.reference import ACTS, LayerCache
from turbo_demo.runtime.quant import BLOCK_BYTES, QWeight, dequantize, quantize, quantize_activation
from turbo_demo.runtime.weights import AttentionWeights, FFNWeights

REF = Kernels().blocks  # the reference on block-quantized weights
QUANTS = ["int8", "int4"]
DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=1 / 128)}
# (N, H): H a multiple of the block, H not a multiple of it (a padded last block), H below one
# block, and H of 18 blocks (the axpy's scales: 16 blocks' headers gathered at once, then a tail)
SHAPES = [(64, 256), (97, 203), (33, 7), (40, 32 * 17 + 5)]


def qcase(n, h, fmt, dtype, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = quantize(torch.randn(n, h, generator=g) / h**0.5, fmt)
    x = torch.randn(h, generator=g).to(dtype)
    idx = torch.randperm(n, generator=g)[:k]
    hv = torch.randn(k, generator=g).to(dtype)
    return w, x, idx, hv


def test_int8_block_is_q8_0():
    """One block: fp16 d = amax / 127 then 32 int8 q = round(x / d), as llama.cpp's block_q8_0."""
    x = torch.linspace(-2.0, 1.0, 32)
    w = quantize(x[None], "int8")
    assert w.data.shape == (1, 34) and BLOCK_BYTES["int8"] == 34
    d = w.data[0, :2].view(torch.float16).item()
    assert d == pytest.approx(2.0 / 127, rel=1e-3)
    q = w.data[0, 2:].view(torch.int8)
    assert q[0] == -127 and torch.equal(q, (x * (127 / 2.0)).round().to(torch.int8))
    torch.testing.assert_close(dequantize(w)[0], x, atol=d / 2 + 1e-6, rtol=0)


def test_int4_block_is_q4_0():
    """One block: fp16 d = -(the value of largest |x|) / 8, value j in the low nibble of byte j
    and value j + 16 in its high nibble, w = d (q - 8), as llama.cpp's block_q4_0."""
    x = torch.arange(32, dtype=torch.float32) * 0.1 - 2.0  # -2.0 .. 1.1: the extreme is -2
    w = quantize(x[None], "int4")
    assert w.data.shape == (1, 18) and BLOCK_BYTES["int4"] == 18
    d = w.data[0, :2].view(torch.float16).item()
    assert d == pytest.approx(2.0 / 8, rel=1e-3)
    nibbles = w.data[0, 2:]
    q = torch.cat((nibbles & 15, nibbles >> 4))
    assert q[0] == 0 and torch.equal(q, (x / d + 8.5).trunc().clamp(max=15).to(torch.uint8))
    torch.testing.assert_close(dequantize(w)[0], x, atol=d / 2 + 1e-6, rtol=0)


@pytest.mark.parametrize(("fmt", "qtype"), [("int8", "Q8_0"), ("int4", "Q4_0")])
def test_blocks_are_the_bytes_gguf_writes(fmt, qtype):
    """Our blocks are llama.cpp's, byte for byte: gguf's own quantizer (the reference rounding
    llama.cpp's GGUF files are written with) gives the same bytes for the same weights, ties of
    |x| and all-zero blocks included, and its dequantizer the same values."""
    gguf = pytest.importorskip("gguf")
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(64, 32 * 12, generator=g) * 0.02).bfloat16().float()
    w[0, :32] = 0.0  # a zero block: d = 0
    w[1, :32] = torch.where(torch.arange(32) % 2 == 0, 0.5, -0.5)  # |x| tied: the first one wins
    kind = getattr(gguf.GGMLQuantizationType, qtype)
    theirs = gguf.quants.quantize(w.numpy(), kind)
    ours = quantize(w, fmt).data.numpy()
    assert ours.shape == theirs.shape and (ours == theirs).all()
    assert torch.equal(dequantize(quantize(w, fmt)), torch.from_numpy(gguf.quants.dequantize(theirs, kind)))
    flipped = w.clone()
    flipped[1, :32] = -flipped[1, :32]  # the extreme's sign decides int4's d and every q
    assert not (quantize(flipped, fmt).data.numpy() == theirs).all()


@pytest.mark.parametrize("fmt", QUANTS)
def test_quantize_error_is_half_a_step_and_padding_is_dropped(fmt):
    w = torch.randn(5, 70, generator=torch.Generator().manual_seed(1))
    q = quantize(w, fmt, chunk_rows=2)  # chunks give the same bytes as one pass
    assert torch.equal(q.data, quantize(w, fmt).data)
    back = dequantize(q)
    assert back.shape == (5, 70)
    blocks = torch.nn.functional.pad(w, (0, 26)).view(5, 3, 32)
    step = (blocks.abs().amax(-1) / (127 if fmt == "int8" else 8)).repeat_interleave(32, dim=1)[:, :70]
    # int4 clamps q to 15: a value more than 7.5 steps on the side opposite the block's extreme
    # is one step off at most; every other value half a step
    clamped = (w / step).abs() > 7.5 if fmt == "int4" else torch.zeros_like(w, dtype=torch.bool)
    bound = torch.where(clamped, step, step / 2) + 4e-3 * w.abs().clamp(min=1e-3)
    assert ((back - w).abs() <= bound).all()
    idx = torch.tensor([4, 0, 4])
    assert torch.equal(dequantize(q, idx), back[idx])


def test_activation_quantization_keeps_zero_and_the_block_maximum():
    x = torch.tensor([0.0] * 32 + [3.0, -1.5] + [0.0] * 5)
    v = quantize_activation(x)
    assert v.shape == x.shape and torch.equal(v[:32], x[:32]) and v[32] == 3.0
    assert v[33] == pytest.approx(-1.5, abs=3.0 / 127 / 2)


@pytest.mark.parametrize("fmt", QUANTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,h", SHAPES)
@pytest.mark.parametrize("k", ["0", "1", "half", "N"])
def test_cpp_quantized_gemv_matches_torch(cpp_kernels, fmt, dtype, n, h, k):
    k = {"0": 0, "1": 1, "half": n // 2, "N": n}[k]
    w, x, idx, hv = qcase(n, h, fmt, dtype, k)
    pairs = [
        (cpp_kernels.blocks.rows_dot(w, x, idx), REF.rows_dot(w, x, idx), (k,)),
        (cpp_kernels.blocks.rows_axpy(w, hv, idx), REF.rows_axpy(w, hv, idx), (h,)),
        (cpp_kernels.blocks.matvec(w, x), REF.matvec(w, x), (n,)),
    ]
    if k == n:
        pairs.append((cpp_kernels.blocks.vecmat(hv, w), REF.vecmat(hv, w), (h,)))
    for got, ref, shape in pairs:
        assert got.dtype == dtype and got.shape == shape
        torch.testing.assert_close(got, ref, **TOL[dtype])


@pytest.mark.parametrize("fmt", QUANTS)
@pytest.mark.parametrize("n,h,k", [(60, 32 * 130 + 7, 40), (700, 203, 600)])
def test_cpp_quantized_axpy_splits_columns_or_rows_between_threads(cpp_kernels, fmt, n, h, k):
    """rows_axpy past the one-thread size (64 KB of rows read), on two threads: few rows of many
    columns (4k < h, as the predictor's fc2) split the columns at multiples of 512 values (here the
    second part ends in a padded block), else the rows (partial sums added up). Against the
    reference; the last output moved by a thousandth of the largest fails the same comparison."""
    w, _, idx, hv = qcase(n, h, fmt, torch.float32, k, seed=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = cpp_kernels.blocks.rows_axpy(w, hv, idx)
    finally:
        torch.set_num_threads(threads)
    ref = REF.rows_axpy(w, hv, idx)
    torch.testing.assert_close(got, ref, **TOL[torch.float32])
    nudged = ref.clone()
    nudged[h - 1] += 1e-3 * ref.abs().max()
    with pytest.raises(AssertionError):
        torch.testing.assert_close(got, nudged, **TOL[torch.float32])


@pytest.mark.parametrize("fmt", QUANTS)
def test_cpp_quantized_dots_hold_the_largest_block_sums(cpp_kernels, fmt):
    """Blocks whose integer sums are as large as the formats allow: every weight at its format's
    largest |q| (int4 15, int8 127) against x at +-127 everywhere. The AVX2 kernels keep partial
    sums of up to 8 such products in 16-bit lanes (15 x 127 x 8 = 15240, 2 x 127 x 127 = 32258);
    a wrapped lane would be off by 65536 steps, a single product dropped by one whole product."""
    n, h = 13, 32 * 9 + 5  # a short last group of four rows, a padded last block
    g = torch.Generator().manual_seed(5)
    ones = torch.ones(n, h)
    if fmt == "int4":  # each block [1, -1, -1, ...] or its negation: q = 15 (clamped) but the first
        w = torch.where(torch.arange(h) % 32 == 0, 1.0, -1.0).expand(n, h).clone()
        w[1::2] *= -1.0
    else:  # every value +-1: q = +-127
        w = torch.where(torch.rand(n, h, generator=g) < 0.5, -ones, ones)
    qw = quantize(w, fmt)
    x = torch.where(torch.rand(h, generator=g) < 0.8, 1.0, -1.0)
    tokens = torch.stack([x, -x, x.flip(0)])
    for got, ref in (
        (cpp_kernels.blocks.matvec(qw, x), REF.matvec(qw, x)),
        (cpp_kernels.blocks.rows_dot(qw, x, torch.arange(n).flip(0)), REF.rows_dot(qw, x, torch.arange(n).flip(0))),
        (cpp_kernels.blocks.linear(tokens, qw), REF.linear(tokens, qw)),
    ):
        torch.testing.assert_close(got, ref, **TOL[torch.float32])
        one_product = (torch.arange(ref.numel()) == 3).view_as(ref).float()  # |w x| = 1 here
        with pytest.raises(AssertionError):
            torch.testing.assert_close(got, ref + one_product, **TOL[torch.float32])


def test_reference_is_dequantize_then_the_float_formula():
    """The reference's quantized GEMV is the float GEMV of the dequantized rows and of x after
    its per-block quantization; against the unquantized x it is off by that rounding only."""
    w, x, idx, hv = qcase(97, 203, "int8", torch.float32, 40)
    dense = dequantize(w)
    torch.testing.assert_close(REF.rows_dot(w, x, idx), dense[idx] @ quantize_activation(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(REF.rows_axpy(w, hv, idx), hv @ dense[idx], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(REF.matvec(w, x), dense @ x, atol=0.03, rtol=0.01)


def qffn(n, h, fmt, dtype, seed=0, rank=8):
    g = torch.Generator().manual_seed(seed)
    ws = [quantize(torch.randn(n, h, generator=g) / h**0.5, fmt) for _ in range(3)]
    fc1 = quantize(torch.randn(rank, h, generator=g) / h**0.5, "int8")
    fc2_t = quantize(torch.randn(rank, n, generator=g), "int8")
    return ws, fc1, fc2_t, torch.randn(h, generator=g).to(dtype)


@pytest.mark.parametrize("fmt", QUANTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act,act_up", [("relu", True), ("relu", False), ("silu", False)])
def test_cpp_quantized_ffn_steps_match_torch(cpp_kernels, fmt, dtype, act, act_up):
    (wg, wu, wd_t), fc1, fc2_t, x = qffn(97, 203, fmt, dtype)
    counts, ref_counts = torch.zeros(97, dtype=torch.int32), torch.zeros(97, dtype=torch.int32)
    r = torch.randn(203, generator=torch.Generator().manual_seed(3)).to(dtype)
    w = FFNWeights(wg, wu, wd_t, act, act_up, fc1, fc2_t)
    y, active = cpp_kernels.blocks.ffn_dense(w, x, add_to=r, counts=counts)
    ref_y, ref_active = REF.ffn_dense(w, x, add_to=r, counts=ref_counts)
    torch.testing.assert_close(y, ref_y, **TOL[dtype])
    assert active == ref_active and torch.equal(counts, ref_counts)
    if act != "relu":
        return
    got, ref = cpp_kernels.blocks.ffn_exact(w, x), REF.ffn_exact(w, x)
    torch.testing.assert_close(got[0], ref[0], **TOL[dtype])
    assert got[1:] == ref[1:] and got[2] == active
    torch.testing.assert_close(got[0], ref_y - r, **TOL[dtype])  # exact == dense, same arithmetic
    for idx in (torch.arange(0, 97, 2), torch.tensor([5]), torch.zeros(0, dtype=torch.long), torch.arange(97)):
        got, ref = cpp_kernels.blocks.up_down(w, x, idx, None), REF.up_down(w, x, idx, None)
        torch.testing.assert_close(got[0], ref[0], **TOL[dtype])
        assert got[1:] == ref[1:]
    for threshold, budget in ((0.0, 0), (0.0, 30)):
        got = cpp_kernels.blocks.ffn_predicted(w, r, x, threshold, budget)
        ref = REF.ffn_predicted(w, r, x, threshold, budget)
        assert torch.equal(got[1], ref[1]) and got[2:] == ref[2:]
        torch.testing.assert_close(got[0], ref[0], **TOL[dtype])


@pytest.mark.parametrize("fmt", QUANTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act,act_up", [("relu", True), ("silu", False)])
def test_cpp_quantized_dense_step_reads_w_down_rows(cpp_kernels, fmt, dtype, act, act_up):
    """Given W_down's (H, I) blocks (wd), the dense step is llama.cpp's: h quantized per block,
    dotted with wd's rows. The C++ step against the reference; the reference against that
    formula written out; a one-product change fails the same comparison. I = 203: a padded
    last block of h; H = 97 outputs: a short last group of rows."""
    (wg, wu, _), _, _, x = qffn(203, 97, fmt, dtype)
    g = torch.Generator().manual_seed(5)
    down = torch.randn(97, 203, generator=g) / 203**0.5
    w = FFNWeights(wg, wu, quantize(down.t().contiguous(), fmt), act, act_up, wd=quantize(down, fmt))
    r = torch.randn(97, generator=g).to(dtype)
    counts, ref_counts = torch.zeros(203, dtype=torch.int32), torch.zeros(203, dtype=torch.int32)
    y, active = cpp_kernels.blocks.ffn_dense(w, x, add_to=r, counts=counts)
    ref_y, ref_active = REF.ffn_dense(w, x, add_to=r, counts=ref_counts)
    torch.testing.assert_close(y, ref_y, **TOL[dtype])
    assert active == ref_active == int(torch.count_nonzero(ref_counts)) and torch.equal(counts, ref_counts)
    f = ACTS[act]
    u = REF.matvec(wu, x)
    h = f(REF.matvec(wg, x)) * (f(u) if act_up else u)
    terms = dequantize(w.wd) * quantize_activation(h).float()  # (H, I): each output's products
    torch.testing.assert_close(ref_y, (terms.sum(1).to(dtype) + r), **TOL[dtype])
    one_product = torch.zeros(97).index_fill_(0, torch.tensor([3]), float(terms[3].abs().max())).to(dtype)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(y, ref_y + one_product, **TOL[dtype])


def test_cpp_quantized_kernels_reject_bad_input(cpp_kernels):
    w, x, _, _ = qcase(10, 40, "int8", torch.float32, 3)
    with pytest.raises(RuntimeError, match="bytes per row"):
        cpp_kernels.blocks.matvec(QWeight(w.data, "int8", 100), x)
    with pytest.raises(RuntimeError, match="out of range"):
        cpp_kernels.blocks.rows_dot(w, x, torch.tensor([10]))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        cpp_kernels.blocks.matvec(w, x.double())


def greedy(packed, mode, kernels, steps=12, **options):
    runtime = LeanRuntime(packed, mode, kernels, **options)
    return [s.token for s in runtime.generate([3, 17, 42, 7, 99], steps)]


@pytest.mark.parametrize("fmt", QUANTS)
def test_every_mode_runs_quantized_on_both_backends(backends, fmt):
    model = tiny_model("drelu", predictor_rank=8)
    packed = pack(model, fmt)
    assert packed.quant == fmt and isinstance(packed.ffns[0].wg, QWeight)
    assert isinstance(packed.lean.attention[0].wq, QWeight) and isinstance(packed.ffns[0].fc1, QWeight)
    assert packed.ffns[0].fc1.fmt == "int8" and packed.ffns[0].wg.fmt == fmt
    assert model.model.layers[0].mlp.gate_proj.weight.dtype == torch.float32  # the model is left as it is
    tokens = {}
    for kernels in backends:
        for mode in ("dense", "exact", "predictor", "threshold"):
            tokens[kernels.name, mode] = greedy(packed, mode, kernels)
    for (_, mode), t in tokens.items():
        assert t == tokens["torch", mode]


class QuantizedDown(torch.nn.Module):
    """W_down as a quantized pack computes it: dense mode quantizes h per block and dots it with
    W_down's blocks along the neurons (FFNWeights.wd); the other modes sum W_down's neuron-major
    blocks weighted by h unquantized."""

    def __init__(self, w: torch.Tensor, fmt: str, mode: str):
        super().__init__()
        self.dense = mode == "dense"
        self.w = dequantize(quantize(w, fmt)) if self.dense else dequantize(quantize(w.t(), fmt)).t()

    def forward(self, h):
        return (quantize_activation(h) if self.dense else h) @ self.w.t()


def quantized_reference(model, fmt: str, mode: str = "dense"):
    """The model as a quantized runtime computes it in `mode` (dense, or exact with every neuron),
    in transformers' own forward: each matrix replaced by its dequantized blocks, the input of
    each linear layer quantized per block to Q8_0 first, and W_down as QuantizedDown."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name and "down_proj" not in name:
                p.copy_(dequantize(quantize(p, fmt)))
        # a tied LM head is quantized, its embedding (a lookup) is not: untie them
        model.lm_head.weight = torch.nn.Parameter(dequantize(quantize(model.lm_head.weight, fmt)))
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("down_proj"):
            module.register_forward_pre_hook(lambda _, args: (quantize_activation(args[0]),))
    for layer in model.model.layers:
        layer.mlp.down_proj = QuantizedDown(layer.mlp.down_proj.weight.detach(), fmt, mode)
    return model


def test_int8_dense_and_exact_are_their_quantized_formulas(backends):
    """The int8 runtime's logits are those of transformers' forward on the dequantized weights
    with the activations quantized where the kernels quantize them (quantized_reference): dense
    with W_down's blocks along the neurons and h quantized, exact with W_down's neuron-major
    blocks and h as it is, in the prompt and the decoded token; up to fp32 summation
    order and a Q8 rounding an order flips (1e-3 of the logits' scale). W_down 20% off fails it,
    and so does each mode against the other's formula (two quantizations of W_down)."""
    model = tiny_model("drelu", seed=2)
    packed = pack(model, "int8")
    ids = torch.tensor([3, 17, 42, 7])
    expected = {}
    with torch.no_grad():
        for mode in ("dense", "exact"):
            expected[mode] = quantized_reference(tiny_model("drelu", seed=2), "int8", mode)(ids[None]).logits[0, -1]
    tol = dict(atol=1e-3 * float(expected["dense"].abs().max()), rtol=0.0)
    for kernels in backends:
        for mode, other in (("dense", "exact"), ("exact", "dense")):
            runtime = LeanRuntime(packed, mode, kernels)
            runtime.prefill(ids[:-1])
            logits = runtime.decode(int(ids[-1]))[0]
            torch.testing.assert_close(logits, expected[mode], **tol)
            with pytest.raises(AssertionError):
                torch.testing.assert_close(logits, expected[other], **tol)
    wrong = tiny_model("drelu", seed=2)
    with torch.no_grad():
        for layer in wrong.model.layers:
            layer.mlp.down_proj.weight.mul_(0.8)
    runtime = LeanRuntime(pack(wrong, "int8"), "dense", backends[0])
    runtime.prefill(ids[:-1])
    with pytest.raises(AssertionError):
        torch.testing.assert_close(runtime.decode(int(ids[-1]))[0], expected["dense"], **tol)


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory, tokenizer):
    model = tiny_model("drelu", predictor_rank=4, tie_word_embeddings=False, seed=3)
    return save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("untied") / "m", dtype=torch.float32)


def matrices(packed) -> list[QWeight]:
    attention = [w for a in packed.lean.attention for w in (a.wq, a.wk, a.wv, a.wo)]
    return [packed.lean.lm_head, *attention, *(w for f in packed.ffns for w in f.matrices)]


@pytest.mark.parametrize("fmt", QUANTS)
def test_streamed_load_equals_quantizing_the_loaded_model(untied_dir, fmt):
    """load_quantized never holds the float matrices, and gives the same blocks as pack(model,
    quant) on the model loaded in float (W_down in both layouts); its memory estimate counts
    exactly those blocks, W_down's (H, I) ones as copies."""
    streamed, packed = load_quantized(untied_dir, fmt), pack(load_model(untied_dir), fmt)
    assert all(p.is_meta for n, p in streamed.model.named_parameters() if n.endswith("proj.weight"))
    assert not streamed.model.model.embed_tokens.weight.is_meta
    pairs = list(zip(matrices(streamed), matrices(packed), strict=True))
    assert all(a.fmt == b.fmt and torch.equal(a.data, b.data) for a, b in pairs)
    need = memory.estimate(untied_dir, None, None, fmt)
    floats = sum(p.numel() * 4 for p in streamed.model.parameters() if not p.is_meta)
    rows = sum(f.wd.nbytes for f in streamed.ffns)  # W_down's (H, I) blocks: runtime copies
    assert need.quant == fmt and need.weights + need.copies == sum(w.nbytes for w in matrices(streamed)) + floats
    assert need.copies == rows > 0 and streamed.ffns[0].wd.shape == streamed.ffns[0].wd_t.shape[::-1]
    assert f"of {fmt} weights" in need.describe()
    assert greedy(streamed, "predictor", Kernels()) == greedy(packed, "predictor", Kernels())


def test_generate_quant_json(untied_dir, capsys):
    from turbo_demo.cli import main

    args = ["generate", str(untied_dir), "--quant", "int8", "--prompt", "def add(a, b):", "--max-new-tokens", "4"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["quant"] == "int8" and len(out["token_ids"]) == 4
    # the phases: the prompt but its last token prefilled, then the first token's own step
    assert len(out["prompt_ids"]) > 1 and out["warm_up_s"] > 0
    assert 0 < out["prefill_s"] < out["first_token_s"]
    assert out["first_token_s"] >= out["prefill_s"] + out["steps"][0]["time_s"]


@pytest.mark.parametrize("fmt", QUANTS)
def test_quantize_save_load_is_bit_identical_and_transformers_refuses(untied_dir, tmp_path, fmt, capsys):
    from transformers import AutoModelForCausalLM

    from turbo_demo.cli import main

    dst = tmp_path / f"q-{fmt}"
    assert main(["quantize", str(untied_dir), str(dst), "--quant", fmt]) == 0
    assert capsys.readouterr().out.strip() == str(dst)
    loaded, direct = load_quantized(dst), load_quantized(untied_dir, fmt)
    assert loaded.quant == fmt and "Q8_0" in (dst / "README.md").read_text()
    pairs = list(zip(matrices(loaded), matrices(direct), strict=True))
    assert all(a.fmt == b.fmt and a.cols == b.cols and torch.equal(a.data, b.data) for a, b in pairs)
    small = dict(direct.model.named_parameters())
    assert all(torch.equal(p, small[n]) for n, p in loaded.model.named_parameters() if not p.is_meta)
    assert greedy(loaded, "predictor", Kernels()) == greedy(direct, "predictor", Kernels())
    with pytest.raises(ValueError, match="turbosparse_quantized"):
        AutoModelForCausalLM.from_pretrained(dst)
    assert main(["generate", str(dst), "--prompt", "def", "--max-new-tokens", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["quant"] == fmt
    other = "int4" if fmt == "int8" else "int8"
    assert main(["generate", str(dst), "--quant", other, "--prompt", "def"]) == 2
    assert f"holds {fmt} weights" in capsys.readouterr().err
    # a checkpoint written before W_down's (H, I) blocks were kept: its dense formula reads wd_t
    from safetensors.torch import load_file, save_file

    tensors = {n: t for n, t in load_file(dst / "model.safetensors").items() if ".rows." not in n}
    layout = {n: v for n, v in json.loads(safe_metadata(dst)["turbo_demo_blocks"]).items() if n in tensors}
    save_file(tensors, dst / "model.safetensors", metadata={"turbo_demo_blocks": json.dumps(layout)})
    older = load_quantized(dst)
    assert all(f.wd is None for f in older.ffns) and all(f.wd is not None for f in loaded.ffns)
    assert greedy(older, "dense", Kernels()) == greedy(older, "exact", Kernels())
    # blocks not of their format's size are refused: int4 as Q4_1 wrote them (20 bytes per 32
    # values, before Q4_0's 18), int8 one byte short
    name = next(n for n, (f, _) in layout.items() if f == fmt)
    rows, width = tensors[name].shape
    tensors[name] = torch.zeros(rows, width // 18 * 20 if fmt == "int4" else width - 1, dtype=torch.uint8)
    save_file(tensors, dst / "model.safetensors", metadata={"turbo_demo_blocks": json.dumps(layout)})
    with pytest.raises(UserError, match=r"Q4_1.*quantize` on the float" if fmt == "int4" else "bytes per row"):
        load_quantized(dst)


def safe_metadata(path) -> dict:
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", framework="pt") as f:
        return f.metadata()


def test_model_store_and_compare_load_a_side_quantized(untied_dir):
    """The app's plain-function path for a per-side quantization menu: ModelStore.get(...,
    quant=) holds one copy per (model, quantization), and a SideRequest's quant loads its side so."""
    from turbo_demo.app.engine.catalog import ModelStore
    from turbo_demo.app.engine.compare import Settings, last_round, run_compare
    from turbo_demo.app.engine.sides import SideRequest

    store = ModelStore(budget=10**10)
    q8, plain = store.get(str(untied_dir), quant="int8"), store.get(str(untied_dir))
    assert q8.packed.quant == "int8" and plain.packed.quant is None
    assert store.get(str(untied_dir), quant="int8") is q8 and q8.weight_bytes < plain.weight_bytes
    asked = SideRequest(str(untied_dir), "dense"), SideRequest(str(untied_dir), "predictor", quant="int4")
    left, right = last_round(run_compare(store, *asked, "def", Settings(max_new_tokens=3)))
    assert not left.error and not right.error, (left.error, right.error)
    assert right.summary()["quant"] == "int4" and left.summary()["quant"] is None and len(right.token_ids) == 3


def fed_agreement(name: str, kernels) -> dict[str, tuple[float, float]]:
    """{mode: (float, int8)}: the share of positions where the shipped model `name`, fed the float
    model's 16-token greedy continuation of four prompts, picks the float model's next token."""
    from turbo_demo.offline.quant_eval import continuations, forced, modes_of
    from turbo_demo.paths import MODELS_DIR

    path = MODELS_DIR / name
    base = pack(load_model(path))
    quantized = load_quantized(path, "int8", base.model.dtype)
    text = "import os\n\ndef main(argv):\n    parser = argparse.ArgumentParser(description='"
    ids = load_tokenizer(path)(text)["input_ids"]
    prompts = [ids[:8], ids[:12], ids[4:16], ids[2:]]
    shares = {}
    for mode in modes_of(base):
        reference = continuations(base, mode, prompts, 16, kernels)
        shares[mode] = tuple(forced(p, mode, prompts, reference, kernels) for p in (base, quantized))
    return shares


def test_int8_greedy_tokens_agree_with_float_on_the_embedded_model(backends):
    """At int8, fed the float model's greedy continuation, every mode of the shipped dReLU model
    picks the float model's next token at >= 95% of positions (eval --quant measured 99.6% in
    dense and exact mode, 99.2% in predictor mode over 8 prompts x 32 tokens)."""
    shares = fed_agreement("turbosparse-drelu", backends[-1])
    assert list(shares) == ["dense", "exact", "predictor"]
    for mode, (float_share, int8_share) in shares.items():
        assert float_share == 1.0 and int8_share >= 0.95, mode


def test_turbosparse_mistral_7b_at_int8_fits_16_gb_and_bf16_does_not(tmp_path):
    """The estimate before loading, from headers alone (no data): TurboSparse-Mistral-7B's
    shapes (7.99B parameters with rank-1280 predictors) need 22.3 GB in bf16 and 11.6 GB at int8
    (2.0 GB of it W_down's second blocks, quant.DOWN)."""
    import struct

    from turbo_demo.models.bamboo import BambooConfig

    rank, shapes = 1280, {"model.embed_tokens.weight": [32064, 4096], "lm_head.weight": [32064, 4096]}
    for i in range(32):
        layer = f"model.layers.{i}."
        for name, shape in (
            ("self_attn.q_proj", [4096, 4096]), ("self_attn.k_proj", [1024, 4096]), ("self_attn.v_proj", [1024, 4096]),
            ("self_attn.o_proj", [4096, 4096]), ("mlp.gate_proj", [14336, 4096]), ("mlp.up_proj", [14336, 4096]),
            ("mlp.down_proj", [4096, 14336]), ("mlp.predictor.fc1", [rank, 4096]), ("mlp.predictor.fc2", [14336, rank]),
        ):  # fmt: skip
            shapes[f"{layer}{name}.weight"] = shape
    header, offset = {}, 0
    for name, (rows, cols) in shapes.items():
        header[name] = {"dtype": "BF16", "shape": [rows, cols], "data_offsets": [offset, offset + 2 * rows * cols]}
        offset += 2 * rows * cols
    blob = json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob)
    config = BambooConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        vocab_size=32064, hidden_act="relu", predictor_rank=rank, max_position_embeddings=32768,
        tie_word_embeddings=False,
    )  # fmt: skip
    config.save_pretrained(tmp_path)
    assert offset / 2 == pytest.approx(7.99e9, rel=0.002)
    need = {q: memory.estimate(tmp_path, torch.bfloat16, None, q) for q in (None, "int8", "int4")}
    assert [round(need[q].total / 1e9, 1) for q in need] == [22.3, 11.6, 7.0]
    memory.check_fits(need["int8"], 16 * 10**9)
    with pytest.raises(UserError, match=r"needs 22.3 GB \(16.0 GB of bfloat16 weights .* but 16.0 GB"):
        memory.check_fits(need[None], 16 * 10**9)


@pytest.mark.parametrize("fmt", QUANTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpp_quantized_attention_step_matches_torch(cpp_kernels, dtype, fmt):
    """q, k and v in one q_matvecs call; h of 5 blocks: one group of int4 pairs and a tail block."""
    g = torch.Generator().manual_seed(4)
    h, nh, nkv, hd, max_len = 160, 4, 2, 16, 8
    wq, wk, wv, wo = (quantize(torch.randn(n, m, generator=g) / m**0.5, fmt) for n, m in
                      ((nh * hd, h), (nkv * hd, h), (nkv * hd, h), (h, nh * hd)))  # fmt: skip
    x, ln_w = torch.randn(h, generator=g).to(dtype), torch.rand(h, generator=g).to(dtype) + 0.5
    cos, sin = (torch.randn(max_len, hd, generator=g).to(dtype) for _ in range(2))
    caches = [torch.randn(nkv, max_len, hd, generator=g).to(dtype) for _ in range(2)]
    outs = []
    for kernels in (cpp_kernels.blocks, REF):
        kc, vc = (c.clone() for c in caches)
        step = kernels.attention_step(
            x, AttentionWeights(ln_w, wq, wk, wv, wo), 1e-5, LayerCache(kc, vc, cos, sin), 5, 1
        )
        outs.append((step, kc, vc))
    for got, ref in zip(outs[0], outs[1]):
        torch.testing.assert_close(got, ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpp_matvecs_match_one_matvec_each(cpp_kernels, dtype):
    """One call for weights of one format; mixed formats fall back to one matvec each."""
    ws = [qcase(n, 203, fmt, dtype, 1, seed=n)[0] for n, fmt in ((97, "int4"), (33, "int4"), (1, "int4"), (64, "int8"))]
    x = qcase(1, 203, "int8", dtype, 1, seed=9)[1]
    for group in (ws[:3], ws):
        got = cpp_kernels.blocks.matvecs(group, x)
        assert len(got) == len(group)
        for y, w in zip(got, group):
            torch.testing.assert_close(y, REF.matvec(w, x), **TOL[dtype])

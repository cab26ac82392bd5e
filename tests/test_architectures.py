"""Any Hugging Face causal LM on either engine: tiny random checkpoints made with transformers' own
config classes, saved and loaded as published ones are, then decoded by our runtime and
checked against transformers' own forward and generate."""

import pytest
import torch
import transformers

from turbo_demo.checkpoints.checkpoint import load_model
from turbo_demo.errors import UserError
from turbo_demo.models.hooks import on_gate_up
from turbo_demo.runtime import LeanRuntime, TransformersRuntime, open_runtime, pack
from turbo_demo.runtime.kernels import Kernels
from turbo_demo.runtime.kernels.reference import LayerCache
from turbo_demo.runtime.weights import AttentionWeights

SHAPE = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=300,
    max_position_embeddings=64,
    bos_token_id=0,
    eos_token_id=None,  # nothing stops transformers' generate early
    pad_token_id=0,
)
# config class, its fields beyond SHAPE, the engine our runtime picks for it
ARCHITECTURES = {
    "llama": ("LlamaConfig", {"attention_bias": True}, "lean"),  # biases on q, k, v and o
    "mistral": ("MistralConfig", {"sliding_window": 4}, "lean"),  # a window shorter than the text
    "qwen2": ("Qwen2Config", {}, "lean"),
    "qwen3": ("Qwen3Config", {"head_dim": 16}, "lean"),
    "gemma": ("GemmaConfig", {"head_dim": 8}, "lean"),
    "phi3": ("Phi3Config", {}, "lean"),
    "gemma2": ("Gemma2Config", {"head_dim": 8, "sliding_window": 4}, "transformers"),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 8, "sliding_window": 4}, "transformers"),
    "phi3-partial-rope": ("Phi3Config", {"partial_rotary_factor": 0.5}, "transformers"),
    "qwen2-mixed-layers": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
                           "transformers"),
    "llama3-rope": (
        "LlamaConfig",
        {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 16}},
        "transformers",
    ),
}  # fmt: skip
IDS = [5, 17, 3, 99, 250, 42, 7, 8, 120, 33, 61, 2, 9, 14, 200, 150]
QK_SCALE = 12.0  # q and k weights at std 0.24 instead of 0.02: attention scores of a few units


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def arch(request, tmp_path_factory):
    """(name, model loaded through load_model, the engine expected): random weights, with the
    norms and biases that start at 0 or 1 made random too, so that each one is tested, and
    queries and keys large enough that attention is far from uniform (HF's init gives scores
    near 0, under which RoPE's angles, windows and masks hardly change the logits)."""
    name = request.param
    config_class, fields, engine = ARCHITECTURES[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**SHAPE, **fields)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if "norm" in param_name or param_name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
            elif any(part in param_name for part in ("q_proj", "k_proj", "qkv_proj")):
                p.mul_(QK_SCALE)
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    return name, load_model(path, dtype=torch.float32), engine


def logits_per_step(runtime, prefill=6):
    """The logits after prefilling IDS[:prefill], then after each decode step of the rest."""
    out = [runtime.prefill(torch.tensor(IDS[:prefill]))]
    out += [runtime.decode(t)[0] for t in IDS[prefill:-1]]
    return torch.stack(out)


def test_the_engine_each_architecture_runs_on(arch):
    name, model, engine = arch
    packed = pack(model)
    assert open_runtime(packed).engine == engine
    assert len(packed.ffns) == 2 and packed.ffns[0].wg.shape == (64, 32)
    if name == "phi3":  # gate and up: the fused matrix's two halves, as views
        fused = model.model.layers[0].mlp.gate_up_proj.weight
        assert packed.ffns[0].wg.data_ptr() == fused.data_ptr()
        assert packed.ffns[0].wu.data_ptr() == fused[64:].data_ptr()


def test_dense_greedy_decoding_equals_transformers_generate(arch):
    _, model, _ = arch
    expected = model.generate(torch.tensor([IDS[:6]]), max_new_tokens=8, do_sample=False)[0, 6:].tolist()
    runtime = open_runtime(pack(model))
    assert [s.token for s in runtime.generate(IDS[:6], max_new_tokens=8)] == expected


def test_each_engine_equals_the_models_forward(arch, backends):
    _, model, engine = arch
    with torch.no_grad():
        expected = model(torch.tensor([IDS[:-1]])).logits[0, 5:]
    packed = pack(model)
    runtimes = [TransformersRuntime(packed)]
    if engine == "lean":
        runtimes += [LeanRuntime(packed, kernels=kernels) for kernels in backends]
    for runtime in runtimes:
        # fp32, the two sides summing in other orders: measured up to 3.4e-7 (3 eps at logits
        # below 2); 1e-6 is 8 eps. RoPE's theta 1% off moves the llama fixture's logits by 1e-5
        torch.testing.assert_close(logits_per_step(runtime), expected, rtol=0, atol=1e-6)


def test_threshold_mode_decodes_sparsely_with_its_statistics(arch):
    _, model, engine = arch
    packed = pack(model)
    runtimes = [TransformersRuntime(packed, "threshold", threshold=0.05)]
    if engine == "lean":
        runtimes.append(LeanRuntime(packed, "threshold", threshold=0.05))
    tokens = []
    for runtime in runtimes:
        steps = list(runtime.generate(IDS[:6], max_new_tokens=5, audit=True))
        assert len(steps) == 5
        for s in steps:
            assert len(s.computed_share) == 2 and all(0 < c < 1 for c in s.computed_share)
            assert all(0 < r <= 1 for r in s.recall) and s.ffn_bytes < s.ffn_bytes_dense
        tokens.append(([s.token for s in steps], runtime.firing_counts()))
    assert all(t == tokens[0] for t in tokens)  # either engine: the same tokens and firing counts


def test_gate_up_hooks_see_the_gate_and_up_projections(arch):
    _, model, _ = arch
    seen, inputs = {}, []
    mlp = model.model.layers[0].mlp
    handle = mlp.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    with torch.no_grad(), on_gate_up(model, lambda layer, branch, v: seen.setdefault((layer, branch), v)):
        model(torch.tensor([IDS[:4]]))
    handle.remove()
    w = pack(model).ffns[0]
    assert sorted(seen) == [(0, "gate"), (0, "up"), (1, "gate"), (1, "up")]
    torch.testing.assert_close(seen[(0, "gate")], inputs[0] @ w.wg.t())
    torch.testing.assert_close(seen[(0, "up")], inputs[0] @ w.wu.t())


def test_a_model_without_a_gated_ffn_runs_dense_on_transformers_and_says_so(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype=torch.float32)
    expected = model.generate(torch.tensor([IDS[:6]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    packed = pack(model)
    runtime = open_runtime(packed)
    assert runtime.engine == "transformers" and packed.lean is None
    assert [s.token for s in runtime.generate(IDS[:6], max_new_tokens=4)] == expected[0, 6:].tolist()
    with pytest.raises(UserError, match=r"threshold mode needs a gated FFN .* dense mode only"):
        open_runtime(packed, "threshold", threshold=0.1)


def test_an_ffn_with_biases_runs_dense_only():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE, mlp_bias=True)).eval()
    packed = pack(model)
    assert packed.ffns == [] and packed.lean is None  # the sparse kernels would drop the biases
    with pytest.raises(UserError, match="dense mode only"):
        open_runtime(packed, "threshold", threshold=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_attention_step_with_biases_and_head_norms_matches_torch(cpp_kernels, dtype):
    g = torch.Generator().manual_seed(3)
    h, nh, nkv, hd, max_len, pos = 32, 4, 2, 8, 10, 6

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    x, norm = rand(h), rand(h).abs()
    projections = (rand(nh * hd, h), rand(nkv * hd, h), rand(nkv * hd, h), rand(h, nh * hd))
    rotary = (rand(max_len, hd), rand(max_len, hd))
    extras = (rand(nh * hd), rand(nkv * hd), rand(nkv * hd), rand(h), rand(hd).abs(), rand(hd).abs())
    w = AttentionWeights(norm, *projections, *extras)
    caches = rand(nkv, max_len, hd), rand(nkv, max_len, hd)
    out = {}
    for kernels in (Kernels(), cpp_kernels):
        kc, vc = (c.clone() for c in caches)
        out[kernels.name] = (kernels.attention_step(x, w, 1e-6, LayerCache(kc, vc, *rotary), pos, 1), kc, vc)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for got, ref in zip(out["cpp"], out["torch"]):
        torch.testing.assert_close(got, ref, **tol)

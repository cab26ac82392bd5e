"""MoE experts block-quantized: the published TurboSparse-Mixtral and Mixtral layouts (test_moe)
streamed into int8 / int4 blocks expert by expert, the same blocks as quantizing the loaded
model, every mode on both backends, exact == dense at the same quantization, quantize -> save
-> load bit for bit, and the embedded MoE pair's greedy tokens at int8 against float."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file
from test_moe import CONFIG, PROMPT, write_layout
from test_quant import fed_agreement

from turbo_demo.checkpoints import memory
from turbo_demo.checkpoints.checkpoint import load_model, load_tokenizer
from turbo_demo.checkpoints.quantized import load_quantized
from turbo_demo.cli import main
from turbo_demo.runtime import LeanRuntime, pack
from turbo_demo.runtime.kernels import Kernels
from turbo_demo.runtime.packing import ffn_parts
from turbo_demo.runtime.quant import QWeight

QUANTS = ["int8", "int4"]


@pytest.fixture(scope="module")
def published(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("moeq") / "TurboSparse-Mixtral"
    write_layout(path, tokenizer, CONFIG, predictors=True)
    return path


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("moeq") / "Mixtral"
    config = {**CONFIG, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_act": "silu"}
    config.pop("auto_map")
    write_layout(path, tokenizer, config, predictors=False)
    return path


def expert_matrices(packed) -> list:
    return [w for e in ffn_parts(packed.ffns) for w in e.matrices]


def same_blocks(a, b) -> bool:
    pairs = list(zip(expert_matrices(a), expert_matrices(b), strict=True))
    return all(x.fmt == y.fmt and x.cols == y.cols and torch.equal(x.data, y.data) for x, y in pairs)


def greedy(packed, mode, kernels, steps=10) -> list[int]:
    return [s.token for s in LeanRuntime(packed, mode, kernels).generate(PROMPT, steps)]


@pytest.mark.parametrize("fmt", QUANTS)
@pytest.mark.parametrize("layout", ["published", "mixtral"])
def test_streamed_experts_equal_quantizing_the_loaded_model(request, layout, fmt):
    """load_quantized reads the experts one matrix at a time into blocks (the router stays as
    loaded): the same blocks as pack(model, quant) on the float model, and the memory estimate
    counts exactly those blocks and the float rest."""
    path = request.getfixturevalue(layout)
    streamed, packed = load_quantized(path, fmt, torch.float32), pack(load_model(path, torch.float32), fmt)
    assert same_blocks(streamed, packed)
    expert = ffn_parts(streamed.ffns)[0]
    assert expert.wg.fmt == expert.wd_t.fmt == fmt and expert.wd_t.shape == (expert.n, CONFIG["hidden_size"])
    assert (expert.fc1 is None) == (layout == "mixtral") and (expert.fc1 is None or expert.fc1.fmt == "int8")
    assert all(not isinstance(f.router, QWeight) and f.router.dtype == torch.float32 for f in streamed.ffns)
    assert all(p.is_meta for n, p in streamed.model.named_parameters() if ".experts." in n)
    need = memory.estimate(path, torch.float32, None, fmt)
    floats = sum(p.numel() * 4 for p in streamed.model.parameters() if not p.is_meta)
    blocks = sum(w.nbytes for w in expert_matrices(streamed)) + sum(
        w.nbytes for a in streamed.lean.attention for w in (a.wq, a.wk, a.wv, a.wo)
    )
    rows = sum(e.wd.nbytes for e in ffn_parts(streamed.ffns))  # W_down's second blocks: copies
    assert need.weights == blocks - rows + streamed.lean.lm_head.nbytes + floats and need.copies == rows
    assert greedy(streamed, "dense", Kernels()) == greedy(packed, "dense", Kernels())


def test_fused_experts_are_split_per_expert(mixtral, tmp_path):
    """A Mixtral checkpoint in transformers' own module layout (experts fused as gate_up_proj
    (E, 2I, H) and down_proj (E, H, I)) streams into the blocks of its per-expert layout."""
    model = load_model(mixtral, torch.float32)
    fused = tmp_path / "fused"
    model.config.save_pretrained(fused)
    load_tokenizer(mixtral).save_pretrained(fused)
    state = {n: t.contiguous() for n, t in model.state_dict().items()}
    assert state["model.layers.0.mlp.experts.gate_up_proj"].dim() == 3
    save_file(state, fused / "model.safetensors")
    for fmt in QUANTS:
        assert same_blocks(load_quantized(fused, fmt, torch.float32), load_quantized(mixtral, fmt, torch.float32))
        assert (
            memory.estimate(fused, torch.float32, None, fmt).weights
            == memory.estimate(mixtral, torch.float32, None, fmt).weights
        )


def neuron_major_only(packed):
    """The pack with its experts' (H, I) blocks of W_down dropped: the dense formula on the
    neuron-major blocks, which the sparse steps read."""
    ffns = [replace(f, experts=[replace(e, wd=None) for e in f.experts]) for f in packed.ffns]
    return replace(packed, ffns=ffns)


@pytest.mark.parametrize("fmt", QUANTS)
def test_every_mode_runs_on_quantized_experts_on_both_backends(published, backends, fmt):
    """Dense, exact, predictor and threshold on int8 / int4 experts: each backend's greedy tokens
    are the torch reference's; exact's logits are those of the dense formula on the neuron-major
    blocks (the same rows, the same sums), and dense's, which reads W_down's (H, I) blocks with
    h quantized (FFNWeights.wd), are not."""
    packed = load_quantized(published, fmt, torch.float32)
    assert all(e.wd is not None and e.wd.shape == (CONFIG["hidden_size"], e.n) for e in ffn_parts(packed.ffns))
    tokens = {(k.name, mode): greedy(packed, mode, k) for k in backends for mode in ("dense", "exact", "predictor")}
    assert all(t == tokens["torch", mode] for (_, mode), t in tokens.items())
    for kernels in backends:
        logits = {}
        neurons = neuron_major_only(packed)  # the prompt too through the neuron-major blocks
        for name, mode, p in (("dense", "dense", packed), ("neurons", "dense", neurons), ("exact", "exact", neurons)):
            runtime = LeanRuntime(p, mode, kernels)
            runtime.prefill(torch.tensor(PROMPT[:-1]))
            logits[name] = runtime.decode(PROMPT[-1])[0]
        torch.testing.assert_close(logits["exact"], logits["neurons"], atol=1e-5, rtol=1e-5)
        with pytest.raises(AssertionError):
            torch.testing.assert_close(logits["dense"], logits["neurons"], atol=1e-5, rtol=1e-5)
        threshold = LeanRuntime(packed, "threshold", kernels, threshold=0.05)
        assert len([s.token for s in threshold.generate(PROMPT, 4)]) == 4


@pytest.mark.parametrize("fmt", QUANTS)
def test_quantize_save_load_moe_is_bit_identical(published, tmp_path, fmt, capsys):
    dst = tmp_path / f"moe-{fmt}"
    assert main(["quantize", str(published), str(dst), "--quant", fmt]) == 0
    capsys.readouterr()
    loaded, direct = load_quantized(dst), load_quantized(published, fmt)
    assert same_blocks(loaded, direct)
    assert all(torch.equal(a.router, b.router) for a, b in zip(loaded.ffns, direct.ffns))
    assert greedy(loaded, "predictor", Kernels()) == greedy(direct, "predictor", Kernels())
    assert main(["generate", str(dst), "--prompt", "def", "--max-new-tokens", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["quant"] == fmt and len(out["token_ids"]) == 3


@pytest.mark.parametrize("name", ["moe-dense-swiglu", "moe-turbosparse-drelu"])
def test_int8_greedy_tokens_agree_with_float_on_the_embedded_moe_pair(backends, name):
    """At int8, fed the float model's greedy continuation, every mode of the shipped MoE pair
    picks the float model's next token at >= 95% of positions."""
    shares = fed_agreement(name, backends[-1])
    assert shares and all(int8_share >= 0.95 for _, int8_share in shares.values()), shares

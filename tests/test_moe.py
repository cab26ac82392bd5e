"""TurboSparse-Mixtral, small: the published layout loads natively, and the runtime's MoE modes
are checked against a reference forward written here from the published formulas.

The checkpoint is written tensor by tensor under the published names
(../shared/reference/published-formats.md): `block_sparse_moe.gate` (E, H), experts
`w1` (gate), `w3` (up), `w2` (down) and a predictor per expert whose rank differs per expert,
a config with auto_map to remote code, no rank, `torch_dtype`, `output_router_logits: true`;
bf16 weights in two shards with an index. A plain Mixtral checkpoint (SwiGLU experts, the same
names) is the dense comparator.
"""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_published import layer_weights, reference_attention, rms

from conftest import tiny_model
from turbo_demo.app.engine.catalog import ModelStore, model_modes
from turbo_demo.app.engine.compare import Settings, last_round, run_compare
from turbo_demo.app.engine.sides import SideRequest
from turbo_demo.checkpoints.checkpoint import load_model
from turbo_demo.checkpoints.config import load_config
from turbo_demo.checkpoints.memory import estimate
from turbo_demo.cli import main
from turbo_demo.errors import UserError
from turbo_demo.models.activations import activation_histograms
from turbo_demo.models.hooks import on_ffn_activation
from turbo_demo.models.mixtral import TurboSparseMixtralForCausalLM
from turbo_demo.runtime import LeanRuntime, TransformersRuntime, pack
from turbo_demo.runtime.moe import expert_firing, moe_shape, routing_counts, routing_weights

H, INTER, LAYERS, EXPERTS, TOP_K, VOCAB = 32, 64, 2, 8, 2, 300
HEADS, KV_HEADS = 4, 2
RANKS = [[4 + 2 * ((3 * layer + e) % 5) for e in range(EXPERTS)] for layer in range(LAYERS)]
CONFIG = {  # as published, but small; no predictor rank
    "architectures": ["TurboSparseMixtralForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_turbosparsemixtral.TurboSparseMixtralConfig",
        "AutoModelForCausalLM": "modeling_turbosparsemixtral.TurboSparseMixtralForCausalLM",
    },
    "model_type": "turbosparsemixtral",
    "hidden_act": "relu",
    "hidden_size": H,
    "intermediate_size": INTER,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "num_local_experts": EXPERTS,
    "num_experts_per_tok": TOP_K,
    "output_router_logits": True,
    "router_aux_loss_coef": 0.02,
    "router_jitter_noise": 0.0,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1e6,
    "sliding_window": None,
    "max_position_embeddings": 32768,
    "vocab_size": VOCAB,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": False,
    "bos_token_id": 0,
    "eos_token_id": 0,
}
PROMPT = [5, 17, 3, 99, 250, 42, 7, 8, 120, 33]
ROUTER_SKEW = torch.linspace(1.5, -1.5, EXPERTS)  # per expert: how much its router row leans on u


def write_layout(path, tokenizer, config: dict, predictors: bool) -> dict:
    """Random weights under the published names, bf16, in two shards with an index; returns
    the state dict in fp32 (what the model holds once loaded in fp32)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=0.15):
        return (scale * torch.randn(*shape, generator=g)).to(torch.bfloat16)

    # Uneven routing, as trained routers have: every token's residual shares a direction u (as
    # real models' hidden states share a mean), and each router row leans on u by ROUTER_SKEW,
    # so that experts 0-1 are chosen by most tokens and 6-7 by few or none (checked below)
    u = torch.nn.functional.normalize(torch.randn(H, generator=g), dim=0)
    embed = 1.0 * torch.randn(VOCAB, H, generator=g) + 3.0 * u
    state = {"model.embed_tokens.weight": embed.to(torch.bfloat16), "lm_head.weight": rand(VOCAB, H)}
    state["model.norm.weight"] = (1 + rand(H)).to(torch.bfloat16)
    hd = H // HEADS
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = (1 + rand(H)).to(torch.bfloat16)
        state[p + "post_attention_layernorm.weight"] = (1 + rand(H)).to(torch.bfloat16)
        for name, rows in (("q", HEADS * hd), ("k", KV_HEADS * hd), ("v", KV_HEADS * hd)):
            state[p + f"self_attn.{name}_proj.weight"] = rand(rows, H)
        state[p + "self_attn.o_proj.weight"] = rand(H, HEADS * hd)
        state[p + "block_sparse_moe.gate.weight"] = (rand(EXPERTS, H, scale=0.5) + ROUTER_SKEW[:, None] * u).to(
            torch.bfloat16
        )
        for e in range(EXPERTS):
            q = f"{p}block_sparse_moe.experts.{e}."
            state[q + "w1.weight"], state[q + "w3.weight"] = rand(INTER, H), rand(INTER, H)
            state[q + "w2.weight"] = rand(H, INTER)
            if predictors:
                state[q + "predictor.fc1.weight"] = rand(RANKS[i][e], H, scale=0.3)
                state[q + "predictor.fc2.weight"] = rand(INTER, RANKS[i][e], scale=0.3)
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, path / file, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    tokenizer.save_pretrained(path)
    return {k: v.float() for k, v in state.items()}


@pytest.fixture(scope="module")
def published(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("moe") / "TurboSparse-Mixtral"
    return path, write_layout(path, tokenizer, CONFIG, predictors=True)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory, tokenizer):
    """A plain Mixtral checkpoint (SwiGLU experts, no predictors) in the same layout."""
    path = tmp_path_factory.mktemp("moe") / "Mixtral"
    config = {**CONFIG, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_act": "silu"}
    config.pop("auto_map")
    return path, write_layout(path, tokenizer, config, predictors=False)


def reference_logits(state, ids: list[int], act=torch.relu, masked: bool = True, trace=None) -> torch.Tensor:
    """The published forward from the formulas (fp32) -> logits (T, V): Mistral attention, then
    per token the router softmax(W_r n) in fp32, its top-2 renormalised, and the sum of
    w_e * w2_e(m_e * act(w1_e n) * g(w3_e n)) over the two (dReLU: act = g = relu; SwiGLU: act =
    silu, g = identity), m_e = round(sigmoid(fc2_e(relu(fc1_e n)))) where masked. With a list
    as trace, (layer, expert, h) is appended for every routed (token, expert) pair."""
    T = len(ids)
    x = state["model.embed_tokens.weight"][ids]
    up = torch.relu if act is torch.relu else (lambda u: u)
    for i in range(LAYERS):
        p = layer_weights(state, i)
        x = reference_attention(x, p, HEADS, KV_HEADS, CONFIG["rope_theta"])
        n = rms(x, p("post_attention_layernorm"))
        probs = torch.softmax((n @ p("block_sparse_moe.gate").T).float(), -1)
        top = probs.topk(TOP_K, dim=-1)
        weights = top.values / top.values.sum(-1, keepdim=True)
        y = torch.zeros_like(x)
        for t in range(T):
            for e, w in zip(top.indices[t].tolist(), weights[t]):
                ex = f"block_sparse_moe.experts.{e}."
                h = act(n[t] @ p(ex + "w1").T) * up(n[t] @ p(ex + "w3").T)
                if masked:
                    score = torch.relu(n[t] @ p(ex + "predictor.fc1").T) @ p(ex + "predictor.fc2").T
                    h = h * torch.round(torch.sigmoid(score))
                if trace is not None:
                    trace.append((i, e, h))
                y[t] += w * (h @ p(ex + "w2").T)
        x = x + y
    return rms(x, state["model.norm.weight"]) @ state["lm_head.weight"].T


def reference_greedy(state, steps: int, **kw) -> list[int]:
    ids = list(PROMPT)
    for _ in range(steps):
        ids.append(int(reference_logits(state, ids, **kw)[-1].argmax()))
    return ids[len(PROMPT) :]


def runtime_logits(runtime, ids: list[int], prefill: int = 4) -> torch.Tensor:
    """Logits from position prefill - 1 on: one prefill, then one decode step per token."""
    out = [runtime.prefill(torch.tensor(ids[:prefill]))] + [runtime.decode(t)[0] for t in ids[prefill:]]
    return torch.stack(out)


def test_the_published_layout_loads_natively_and_saves_back(published, tmp_path):
    path, state = published
    assert load_config(path).predictor_rank == RANKS  # from the weight shapes: the config names none
    model = load_model(path)
    assert type(model) is TurboSparseMixtralForCausalLM and model.dtype == torch.float32
    for i in range(LAYERS):
        moe = model.model.layers[i].mlp
        assert torch.equal(moe.gate.weight, state[f"model.layers.{i}.block_sparse_moe.gate.weight"])
        for e, expert in enumerate(moe.experts):
            name = f"model.layers.{i}.block_sparse_moe.experts.{e}."
            for w in ("w1", "w2", "w3", "predictor.fc1", "predictor.fc2"):
                assert torch.equal(expert.get_submodule(w).weight, state[name + w + ".weight"]), name + w
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(state)  # the published names again
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path)(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_the_model_is_the_published_forward(published):
    """The class's own forward (transformers') == the formulas, masks included."""
    path, state = published
    with torch.no_grad():
        logits = load_model(path)(torch.tensor([PROMPT])).logits[0]
    torch.testing.assert_close(logits, reference_logits(state, PROMPT), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("engine", [LeanRuntime, TransformersRuntime])
def test_predictor_mode_is_the_published_model(published, engine, backends):
    path, state = published
    packed = pack(load_model(path))
    expected = reference_greedy(state, 6)
    want = reference_logits(state, PROMPT + expected)
    for kernels in backends:
        runtime = engine(packed, "predictor", kernels)
        assert [s.token for s in runtime.generate(PROMPT, 6)] == expected, kernels.name
        got = runtime_logits(runtime, PROMPT + expected[:-1])
        torch.testing.assert_close(got, want[3:-1], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("engine", [LeanRuntime, TransformersRuntime])
@pytest.mark.parametrize("mode", ["dense", "exact"])
def test_dense_and_exact_are_the_experts_without_masks(published, engine, mode, backends):
    path, state = published
    packed = pack(load_model(path))
    want = reference_logits(state, PROMPT, masked=False)
    for kernels in backends:
        torch.testing.assert_close(
            runtime_logits(engine(packed, mode, kernels), PROMPT), want[3:], atol=2e-4, rtol=1e-4
        )
    assert not torch.allclose(want, reference_logits(state, PROMPT), atol=1e-2)  # the masks matter


@pytest.mark.parametrize(
    "mode,options", [("dense", {}), ("exact", {}), ("predictor", {}), ("threshold", {"threshold": 0.05})]
)
def test_lean_equals_the_transformers_engine_step_by_step(published, mode, options, backends):
    packed = pack(load_model(published[0]))
    for kernels in backends:
        runs = [
            list(engine(packed, mode, kernels, **options).generate(PROMPT, 6, audit=True))
            for engine in (LeanRuntime, TransformersRuntime)
        ]
        keys = ("token", "computed_share", "active_share", "experts", "recall", "expert_recall", "ffn_bytes")
        for lean_step, hf_step in zip(*runs):
            lean_d, hf_d = lean_step.to_dict(), hf_step.to_dict()
            assert {k: lean_d[k] for k in keys} == {k: hf_d[k] for k in keys}
            torch.testing.assert_close(lean_step.expert_weights, hf_step.expert_weights, atol=1e-6, rtol=0)


def test_statistics_add_up_over_all_experts(published, any_kernels):
    packed = pack(load_model(published[0]))
    n = EXPERTS * INTER
    for mode in ("dense", "exact", "predictor"):
        runtime = LeanRuntime(packed, mode, any_kernels)
        steps = list(runtime.generate(PROMPT, 8, audit=True))
        for s in steps:
            assert s.intermediate_size == n and len(s.experts) == LAYERS
            for layer in range(LAYERS):
                assert len(set(s.experts[layer])) == TOP_K and sum(s.expert_weights[layer]) == pytest.approx(1)
                assert 0 <= s.active_share[layer] <= s.computed_share[layer] <= 1
                if mode != "predictor":  # only the chosen experts' neurons: 2 of 8 experts
                    assert s.computed_share[layer] <= TOP_K / EXPERTS
            assert s.ffn_bytes_dense == sum(w.dense_bytes for w in packed.ffns)  # a dense FFN of all experts
            assert s.ffn_bytes_routed == sum(w.routed_bytes for w in packed.ffns)  # the dense MoE
        if mode == "dense":
            assert all(c == TOP_K / EXPERTS for s in steps for c in s.computed_share)
            assert all(s.ffn_bytes == s.ffn_bytes_routed for s in steps)
        else:
            assert all(s.ffn_bytes < s.ffn_bytes_routed for s in steps)
        if mode == "predictor":
            assert all(0 <= r <= 1 for s in steps for layer in s.expert_recall for r in layer)
            assert all(len(layer) == TOP_K for s in steps for layer in s.expert_recall)
        else:
            assert all(s.recall is None for s in steps)
        assert moe_shape(packed) == (EXPERTS, INTER, TOP_K)
        for s in steps:  # the routing view of one token: layers x experts
            assert [sum(row) for row in routing_weights(s, EXPERTS)] == pytest.approx([1.0] * LAYERS)
            assert [sum(w > 0 for w in row) for row in routing_weights(s, EXPERTS)] == [TOP_K] * LAYERS
        counts = runtime.firing_counts()
        per_expert = expert_firing(counts, EXPERTS)  # (L, E, I)
        chosen = routing_counts(steps, EXPERTS)  # (L, E)
        for layer in range(LAYERS):
            assert sum(counts[layer]) == round(sum(s.active_share[layer] * n for s in steps))
            assert sum(chosen[layer]) == TOP_K * len(steps)
            for e in range(EXPERTS):
                assert max(per_expert[layer][e]) <= chosen[layer][e]  # fires only where chosen


def test_the_fixture_routes_unevenly(published):
    """Most tokens choose the first experts and few the last: the tests see busy experts beside
    idle ones (a MoE path that treats the experts alike would not be exercised otherwise)."""
    runtime = LeanRuntime(pack(load_model(published[0])), "dense")
    steps = list(runtime.generate(PROMPT, 16))
    for counts in routing_counts(steps, EXPERTS):  # measured: [5, 13, 8, 5, 0, 1, 0, 0], [2, 9, 10, 5, 4, 2, 0, 0]
        busiest = sorted(counts, reverse=True)
        assert busiest[0] + busiest[1] >= TOP_K * len(steps) / 2  # 2 of 8 experts take half the choices
        assert counts[-2] + counts[-1] <= TOP_K * len(steps) / 8


def test_the_routing_is_mixtrals(published):
    """The chosen experts and weights of a step == top-2 of the fp32 softmax, renormalised."""
    model = load_model(published[0])
    runtime = LeanRuntime(pack(model), "predictor")  # the model's own forward
    runtime.prefill(torch.tensor(PROMPT[:-1]))
    _, records = runtime.decode(PROMPT[-1])
    captured = []
    with torch.no_grad():
        hooks = [
            layer.mlp.gate.register_forward_hook(lambda m, a, out: captured.append(out)) for layer in model.model.layers
        ]
        model(torch.tensor([PROMPT]))
        for hook in hooks:
            hook.remove()
    for record, (_, weights, chosen) in zip(records, captured):
        order = chosen[-1].argsort()
        assert record.experts == chosen[-1][order].tolist()
        assert record.weights == pytest.approx(weights[-1][order].tolist(), abs=1e-6)


def test_plain_mixtral_is_the_dense_comparator(mixtral, backends):
    path, state = mixtral
    model = load_model(path)
    assert type(model).__name__ == "MixtralForCausalLM"
    want = reference_logits(state, PROMPT, act=torch.nn.functional.silu, masked=False)
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor([PROMPT])).logits[0], want, atol=2e-4, rtol=1e-4)
    packed = pack(model)
    assert moe_shape(packed) == (EXPERTS, INTER, TOP_K) and moe_shape(pack(tiny_model("drelu"))) is None
    for kernels in backends:
        torch.testing.assert_close(
            runtime_logits(LeanRuntime(packed, "dense", kernels), PROMPT), want[3:], atol=2e-4, rtol=1e-4
        )
        steps = list(LeanRuntime(packed, "threshold", kernels, threshold=0.0).generate(PROMPT, 3))
        assert all(c <= TOP_K / EXPERTS for s in steps for c in s.computed_share)
    with pytest.raises(UserError, match="exact mode needs a ReLU-gated FFN"):
        LeanRuntime(packed, "exact")
    with pytest.raises(UserError, match="predictor mode needs trained predictors"):
        LeanRuntime(packed, "predictor")


def test_the_memory_estimate_counts_the_experts_copies(published):
    path, state = published
    copied = sum(v.numel() for k, v in state.items() if k.endswith((".w2.weight", "predictor.fc2.weight")))
    assert estimate(path, torch.float32).copies == 4 * copied
    assert pack(load_model(path)).owned_bytes == 4 * copied


def test_generate_runs_moe_models_and_says_what_each_layer_chose(published, mixtral, capsys):
    path = str(published[0])
    args = ["generate", path, "--prompt", "def add", "--max-new-tokens", "4", "--json", "--audit"]
    assert main([*args, "--mode", "predictor"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["engine"] == "lean" and len(out["steps"]) == 4
    assert [len(layer) for layer in out["firing_counts"]] == [EXPERTS * INTER] * LAYERS
    step = out["steps"][0]
    assert [len(set(chosen)) for chosen in step["experts"]] == [TOP_K] * LAYERS
    assert all(r is not None for layer in step["expert_recall"] for r in layer)
    assert main([*args, "--mode", "threshold", "--sparsity", "0.5"]) == 0  # calibrated per expert
    ids = json.loads(capsys.readouterr().out)["token_ids"]  # 4 tokens, or fewer ending at eos (id 0)
    assert 1 <= len(ids) <= 4 and (len(ids) == 4 or ids[-1] == CONFIG["eos_token_id"])
    assert main(["generate", str(mixtral[0]), "--prompt", "def add", "--max-new-tokens", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"][0]["computed_share"] == [TOP_K / EXPERTS] * LAYERS


def test_the_compare_engine_runs_a_moe_pair(published, mixtral):
    store = ModelStore()
    assert model_modes(str(published[0])) == ["dense", "exact", "predictor", "threshold"]
    assert model_modes(str(mixtral[0])) == ["dense", "threshold"]
    asked = SideRequest(str(mixtral[0]), "dense"), SideRequest(str(published[0]), "predictor")
    left, right = last_round(run_compare(store, *asked, "def add", Settings(max_new_tokens=4, temperature=0.0)))
    assert not left.error and not right.error, (left.error, right.error)
    assert len(left.steps) == len(right.steps) == 4
    assert all(s.ffn_bytes == s.ffn_bytes_routed for s in left.steps)  # the dense MoE reads k experts
    assert all(s.ffn_bytes < s.ffn_bytes_routed for s in right.steps)
    assert [len(layer) for layer in right.firing_counts] == [EXPERTS * INTER] * LAYERS


def test_the_activation_hooks_watch_every_expert(published, mixtral):
    """The histograms and top-k evaluation hook each expert's w1, w3 (gate, up) and w2's input h:
    h is dReLU's, zero where a gate or up is, and masked by the expert's predictor."""
    model = load_model(published[0])
    seen = []
    watch = lambda layer, h: seen.append((layer, h.shape[-1], float((h == 0).float().mean())))
    with on_ffn_activation(model, watch), torch.no_grad():
        model(torch.tensor([PROMPT]))
    assert {layer for layer, _, _ in seen} == set(range(LAYERS)) and {n for _, n, _ in seen} == {INTER}
    assert all(zeros > 0.5 for _, _, zeros in seen)  # relu * relu, then the mask
    histograms = activation_histograms(model, PROMPT)
    assert histograms["combined"]["total"] == LAYERS * TOP_K * len(PROMPT) * INTER  # every routed token
    fused = activation_histograms(load_model(mixtral[0]), PROMPT)  # recomputed from the fused weights
    assert fused["combined"]["total"] == fused["gate"]["total"] == LAYERS * TOP_K * len(PROMPT) * INTER


def test_fused_mixtral_experts_are_watched_and_pruned_by_the_formula(mixtral):
    """transformers' Mixtral stores its experts fused: the hooks recompute h = silu(gate) * up per
    routed token; returning h unchanged keeps the logits, pruning it changes them."""
    model = load_model(mixtral[0])
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        plain = model(ids).logits
        with on_ffn_activation(model, lambda layer, h: h.clone()):
            same = model(ids).logits
        with on_ffn_activation(model, lambda layer, h: torch.zeros_like(h)):
            pruned = model(ids).logits
    torch.testing.assert_close(same, plain)
    assert (pruned - plain).abs().max() > 1e-3

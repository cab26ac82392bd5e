"""The embedded MoE pair's offline tools on tiny checkpoints in the published layout: the MoE
training presets, per-expert predictors (trained, stored, loaded back, run), and `eval`'s
routing statistics against the reference forward of test_moe.py."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from test_moe import CONFIG, EXPERTS, LAYERS, PROMPT, TOP_K, reference_logits, write_layout

from turbo_demo.checkpoints.checkpoint import load_model
from turbo_demo.offline.evaluate import evaluate, evaluate_dir
from turbo_demo.offline.moe_eval import unmasked
from turbo_demo.offline.predictors import train_predictors
from turbo_demo.offline.train import MoEShape, build_model, make_optimizer, settings_for, train_step
from turbo_demo.runtime import LeanRuntime, pack


@pytest.mark.parametrize("preset", ["moe-dense", "moe-drelu"])
def test_the_moe_presets_train_with_the_load_balancing_loss(preset, tokenizer):
    torch.manual_seed(0)
    shape = MoEShape(hidden_size=32, intermediate_size=16, num_hidden_layers=2, vocab_size=300)
    s = settings_for(preset)
    model = build_model(s, tokenizer, shape).train()
    assert model.config.num_local_experts == 8 and model.config.num_experts_per_tok == 2
    opt = make_optimizer(model, s)
    x = torch.randint(0, 300, (4, 16))
    y = torch.roll(x, -1, dims=1)
    first, sparsity = train_step(model, opt, x, y, s.l1, s.router_loss)
    for _ in range(5):
        last, _ = train_step(model, opt, x, y, s.l1, s.router_loss)
    assert last < first
    if preset == "moe-dense":
        assert sparsity is None  # fused SwiGLU experts are not watched while training
    else:
        assert 0.0 < sparsity < 1.0


@pytest.fixture(scope="module")
def unpredicted(tmp_path_factory, tokenizer):
    """The published layout without predictors, in two shards: what `predictors` starts from."""
    path = tmp_path_factory.mktemp("moe-offline") / "TurboSparse-Mixtral"
    config = {**CONFIG, "torch_dtype": "float32"}
    return path, write_layout(path, tokenizer, config, predictors=False)


def test_per_expert_predictors_are_trained_stored_and_loaded(unpredicted):
    path, _ = unpredicted
    result = train_predictors(str(path), rank=4, train_tokens=2048, val_tokens=1024, steps=30, target_recall=0.9)
    assert [(x["layer"], x["expert"]) for x in result["experts"]] == [
        (i, e) for i in range(LAYERS) for e in range(EXPERTS)
    ]
    assert all(x["recall"] >= 0.9 for x in result["experts"] if x["val_tokens"])
    assert [x["layer"] for x in result["layers"]] == list(range(LAYERS))
    # the routing is uneven (test_moe's fixture): experts the router sent no training token get a
    # predictor that keeps all their neurons (scores 0, threshold 0), and no statistics
    idle = [(x["layer"], x["expert"]) for x in result["experts"] if not x["train_tokens"]]
    assert idle and all(x["recall"] is None and x["threshold"] == 0.0 for x in result["experts"] if not x["val_tokens"])
    config = json.loads((path / "config.json").read_text())
    assert config["predictor_rank"] == [[4] * EXPERTS] * LAYERS
    assert [t for row in config["predictor_threshold"] for t in row] == [x["threshold"] for x in result["experts"]]
    assert sorted(p.name for p in path.glob("*.safetensors*")) == ["model.safetensors"]  # the old shards went
    with safe_open(path / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.1.block_sparse_moe.experts.7.predictor.fc2.weight").shape == (64, 4)
    model = load_model(path)
    expert = model.model.layers[1].mlp.experts[3]
    assert expert.threshold == config["predictor_threshold"][1][3] and expert.predictor.fc1.weight.shape == (4, 32)
    steps = list(LeanRuntime(pack(model), "predictor").generate(PROMPT, 3))
    assert len(steps) == 3
    for layer, e in idle:
        predictor = model.model.layers[layer].mlp.experts[e].predictor
        assert not predictor.fc1.weight.any() and not predictor.fc2.weight.any()


def test_eval_reports_routing_and_sparsity_as_the_reference_forward(unpredicted, tokenizer, tmp_path):
    """In-expert sparsity and expert shares from eval == those counted in the reference forward;
    the expert-level and total sparsity follow from top-k of E."""
    path, state = unpredicted
    model = load_model(path)
    with unmasked(model):
        result = evaluate(model, torch.tensor(PROMPT, dtype=torch.int32), seq_len=len(PROMPT) - 1)
    trace = []
    reference_logits(state, PROMPT[:-1], masked=False, trace=trace)
    moe = result["moe"]
    assert moe["experts"] == EXPERTS and moe["top_k"] == TOP_K and moe["expert_sparsity"] == 0.75
    for i in range(LAYERS):
        hs = [h for layer, _, h in trace if layer == i]
        zeros = sum(int((h == 0).sum()) for h in hs) / sum(h.numel() for h in hs)
        assert moe["in_expert_sparsity"][i] == pytest.approx(zeros, abs=1e-4)
        assert moe["total_sparsity"][i] == pytest.approx(1 - TOP_K / EXPERTS * (1 - zeros), abs=1e-4)
        chosen = [e for layer, e, _ in trace if layer == i]
        shares = [chosen.count(e) / len(chosen) for e in range(EXPERTS)]
        assert moe["expert_share"][i] == pytest.approx(shares, abs=1e-4)
    assert result["sparsity"]["per_layer"] == moe["in_expert_sparsity"]


def test_eval_of_a_model_with_predictors_scores_both_forwards(tmp_path, tokenizer):
    """The experts alone (the headline loss) and the published forward with masks."""
    path = tmp_path / "published"
    state = write_layout(path, tokenizer, CONFIG, predictors=True)
    text = tmp_path / "text.txt"
    text.write_text(tokenizer.decode(PROMPT * 8))
    result = evaluate_dir(str(path), str(text))
    ids = tokenizer(text.read_text())["input_ids"]
    n = min(256, len(ids) - 1)
    for key, masked in (("loss", False), ("with_predictors", True)):
        logits = reference_logits(state, ids[:n], masked=masked)
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1 : n + 1])).item()
        got = result[key] if key == "loss" else result[key]["loss"]
        assert got == pytest.approx(loss, abs=2e-3), key
    masked = result["with_predictors"]
    assert abs(masked["loss"] - result["loss"]) > 1e-2  # the masks matter here
    assert masked["perplexity"] == pytest.approx(math.exp(masked["loss"]), rel=1e-3)

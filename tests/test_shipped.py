"""The shipped checkpoints: they load offline through the Auto classes, describe themselves,
and generate; the dReLU ones are sparse and carry predictors that the runtime uses; the MoE
pair's eval.json meets the MoE targets."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralForCausalLM

from conftest import SHIPPED, lean
from turbo_demo.models import register_auto_classes
from turbo_demo.models.mixtral import TurboSparseMixtralForCausalLM

MODELS = ["dense-swiglu", "turbosparse-drelu", "turbosparse-relufied", "moe-dense-swiglu", "moe-turbosparse-drelu"]
CLASSES = {
    "dense-swiglu": "MistralForCausalLM",
    "turbosparse-drelu": "BambooForCausalLM",
    "turbosparse-relufied": "BambooForCausalLM",
    "moe-dense-swiglu": "MixtralForCausalLM",
    "moe-turbosparse-drelu": "TurboSparseMixtralForCausalLM",
}


@pytest.fixture(autouse=True)
def auto_classes():
    """The tests below load the checkpoints as a user would, through the Auto classes."""
    register_auto_classes()


@pytest.mark.parametrize("name", MODELS)
def test_shipped_checkpoint_loads_and_generates(name):
    path = SHIPPED / name
    for file in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
        "training_log.json",
        "README.md",
        "eval.json",
    ):
        assert (path / file).is_file(), f"{name} lacks {file}"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == CLASSES[name]
    prompt = tokenizer("def fibonacci(n):\n", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(out[0, prompt["input_ids"].size(1) :], skip_special_tokens=True)
    assert len(text.strip()) > 0
    log = json.loads((path / "training_log.json").read_text())
    assert log["steps"] and "val_loss" in log["final"]


@pytest.mark.parametrize("name", ["turbosparse-drelu", "turbosparse-relufied"])
def test_shipped_drelu_models_are_sparse_with_predictors(name):
    model = AutoModelForCausalLM.from_pretrained(SHIPPED / name, dtype=torch.float32)
    assert model.config.predictor_rank and model.model.layers[0].mlp.predictor is not None
    runtime = lean(model, "predictor")
    steps = list(runtime.generate([1, 2, 3], max_new_tokens=8, audit=True))
    assert len(steps) == 8 and all(s.sparsity > 0.5 for s in steps)
    assert all(0.5 < r <= 1.0 for s in steps for r in s.recall)


@pytest.mark.parametrize("name", ["turbosparse-drelu", "turbosparse-relufied"])
def test_shipped_predictors_meet_the_target_their_json_reports(name):
    """The stored predictors and thresholds, measured afresh on the held-out tokens their
    calibration used, give predictors.json's numbers: recall 0.95 at >= 80% predicted sparsity."""
    from turbo_demo.offline import corpus
    from turbo_demo.offline.fitting import choice_stats
    from turbo_demo.offline.predictors import collect

    path = SHIPPED / name
    report = json.loads((path / "predictors.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokens = corpus.encode_split(AutoTokenizer.from_pretrained(path), "heldout")
    residuals, labels = collect(model, tokens, report["val_tokens"])
    for layer, r, y, expected in zip(model.model.layers, residuals, labels, report["layers"]):
        with torch.no_grad():
            got = choice_stats(layer.mlp.predictor(r), y, model.config.threshold_of(expected["layer"]))
        # the checkpoint stores the predictors in fp16 and the threshold rounded; the report
        # measured them before saving
        assert got["recall"] == pytest.approx(expected["recall"], abs=2e-3) and got["recall"] >= 0.948
        assert got["predicted_sparsity"] == pytest.approx(expected["predicted_sparsity"], abs=2e-3)
        assert got["predicted_sparsity"] >= 0.8


def test_the_shipped_moe_pair_routes_top_2_of_8_and_the_drelu_one_predicts_per_expert():
    dense = AutoModelForCausalLM.from_pretrained(SHIPPED / "moe-dense-swiglu", dtype=torch.float32)
    sparse = AutoModelForCausalLM.from_pretrained(SHIPPED / "moe-turbosparse-drelu", dtype=torch.float32)
    assert type(dense) is MixtralForCausalLM and isinstance(sparse, TurboSparseMixtralForCausalLM)
    for model in (dense, sparse):
        assert (model.config.num_local_experts, model.config.num_experts_per_tok) == (8, 2)
    assert all(e.predictor is not None for layer in sparse.model.layers for e in layer.mlp.experts)
    steps = list(lean(sparse, "predictor").generate([1, 2, 3], max_new_tokens=8, audit=True))
    for s in steps:  # computed: the predicted rows of 2 of 8 experts; active: those truly non-zero
        assert all(0 < a <= c < 0.25 for a, c in zip(s.active_share, s.computed_share))
    recalls = [r for s in steps for layer in s.expert_recall for r in layer]  # few active rows each: noisy
    assert sum(recalls) / len(recalls) > 0.85


def test_shipped_moe_predictors_meet_the_target_their_json_reports():
    """Each expert's stored predictor, measured afresh on the held-out tokens routed to it, gives
    predictors.json's numbers (experts with at least 500 such tokens: the rest are too few to
    compare after fp16 storage)."""
    from turbo_demo.offline import corpus
    from turbo_demo.offline.fitting import choice_stats
    from turbo_demo.offline.moe_eval import unmasked
    from turbo_demo.offline.moe_predictors import collect_experts

    path = SHIPPED / "moe-turbosparse-drelu"
    report = json.loads((path / "predictors.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokens = corpus.encode_split(AutoTokenizer.from_pretrained(path), "heldout")
    with unmasked(model):  # the labels are the unmasked experts' h
        xs, ys = collect_experts(model, tokens, report["val_tokens"])
    layers = model.model.layers
    predictors = {(i, e): x.predictor for i, layer in enumerate(layers) for e, x in enumerate(layer.mlp.experts)}
    checked = 0
    for expected in report["experts"]:
        key = (expected["layer"], expected["expert"])
        assert len(xs[key]) == expected["val_tokens"]
        if expected["val_tokens"] < 500:
            continue
        with torch.no_grad():
            got = choice_stats(predictors[key](xs[key]), ys[key], model.config.threshold_of(*key))
        assert got["recall"] == pytest.approx(expected["recall"], abs=3e-3) and got["recall"] >= 0.945
        assert got["predicted_sparsity"] == pytest.approx(expected["predicted_sparsity"], abs=3e-3)
        checked += 1
    assert checked >= 24


def test_the_shipped_moe_pair_meets_the_moe_targets_in_its_eval_json():
    """The dReLU MoE: total sparsity >= 95% (75% from routing, the rest inside the experts) at a
    held-out loss within 3% of the dense MoE's, trained on the same data, order and budget."""
    dense, sparse = (json.loads((SHIPPED / name / "eval.json").read_text()) for name in MODELS[3:])
    assert dense["moe"]["expert_sparsity"] == sparse["moe"]["expert_sparsity"] == 0.75
    assert sparse["moe"]["total_sparsity_mean"] >= 0.95 and min(sparse["moe"]["total_sparsity"]) > 0.9
    assert sparse["loss"] <= 1.03 * dense["loss"] and sparse["with_predictors"]["loss"] <= 1.03 * dense["loss"]
    assert dense["tokens"] == sparse["tokens"] == 131072


def test_the_compare_engine_runs_the_embedded_moe_pair_by_its_menu_names():
    from turbo_demo.app.engine.catalog import ModelStore, embedded_names
    from turbo_demo.app.engine.compare import Settings, last_round, run_compare
    from turbo_demo.app.engine.sides import SideRequest

    assert {"Dense MoE", "TurboSparse MoE"} <= set(embedded_names())
    asked = SideRequest("Dense MoE", "dense"), SideRequest("TurboSparse MoE", "predictor")
    settings = Settings(max_new_tokens=6, temperature=0.0)
    left, right = last_round(run_compare(ModelStore(), *asked, "def add(a, b):", settings))
    assert not left.error and not right.error, (left.error, right.error)
    assert len(left.steps) == len(right.steps) == 6
    assert all(s.ffn_bytes == s.ffn_bytes_routed for s in left.steps)  # the dense MoE reads its 2 experts
    assert all(s.ffn_bytes < 0.5 * s.ffn_bytes_routed for s in right.steps)

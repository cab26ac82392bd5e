"""The FFN modes one by one: their statistics, options and errors, and the predictors they use."""

import json

import pytest
import torch
from safetensors import safe_open
from test_runtime import runtime_logits
from transformers import AutoModelForCausalLM

from conftest import lean, tiny_model
from turbo_demo.errors import UserError
from turbo_demo.models.bamboo import BambooConfig, BambooMLP, BambooPredictor
from turbo_demo.offline.fitting import calibrate
from turbo_demo.offline.predictors import train_predictors
from turbo_demo.runtime import pack
from turbo_demo.runtime.calibration import calibration_ids, threshold_options
from turbo_demo.runtime.kernels import Kernels, reference
from turbo_demo.runtime.lean import LeanRuntime
from turbo_demo.runtime.modes import DenseMode, ExactMode, PredictorMode, PredictorOptions
from turbo_demo.runtime.packing import pack_ffn
from turbo_demo.runtime.quant import quantize
from turbo_demo.runtime.weights import FFNWeights


def test_threshold_zero_equals_dense():
    for kind in ("dense", "drelu"):
        packed = pack(tiny_model(kind))
        dense = runtime_logits(LeanRuntime(packed))
        torch.testing.assert_close(
            runtime_logits(LeanRuntime(packed, "threshold", threshold=0.0)), dense, rtol=0, atol=1e-5
        )


def test_predictor_with_every_neuron_active_equals_dense(monkeypatch):
    packed = pack(tiny_model("drelu", predictor_rank=4))
    dense = runtime_logits(LeanRuntime(packed))
    every = LeanRuntime(packed, "predictor", threshold=float("-inf"))
    torch.testing.assert_close(runtime_logits(every), dense, rtol=0, atol=1e-5)  # dense fallback
    monkeypatch.setattr(reference, "DENSE_FALLBACK_SHARE", 1.0)  # force the gathered path
    torch.testing.assert_close(runtime_logits(every), dense, rtol=0, atol=1e-5)
    torch.testing.assert_close(runtime_logits(LeanRuntime(packed, "predictor", budget=1.0)), dense, rtol=0, atol=1e-5)


def test_statistics_of_a_hand_built_layer(monkeypatch):
    config = BambooConfig(
        hidden_size=4,
        intermediate_size=6,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        vocab_size=8,
        predictor_rank=2,
    )
    mlp = BambooMLP(config, 0)
    with torch.no_grad():
        mlp.gate_proj.weight.copy_(
            torch.tensor([[1.0, 0, 0, 0], [-1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, -1, 0, 0]])
        )
        mlp.up_proj.weight.copy_(
            torch.tensor([[1.0, 0, 0, 0], [1, 0, 0, 0], [0, -1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, 1, 0, 0]])
        )
        mlp.down_proj.weight.copy_(torch.arange(24.0).view(4, 6))
        # z = relu(fc1 r) = (r_0, 0); score = fc2 z = r_0 * (1, 1, -1, 1, 1, -1)
        mlp.predictor.fc1.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]]))
        mlp.predictor.fc2.weight.copy_(torch.tensor([[1.0, 0], [1, 0], [-1, 0], [1, 0], [1, 0], [-1, 0]]))
    x = torch.tensor([1.0, 2.0, 3.0, 0.0])
    # gate = [1, -1, 2, 3, 0, -2] -> relu > 0 for neurons 0, 2, 3; up = [1, 1, -2, 3, 0, 2]
    # h = [1, 0, 0, 9, 0, 0]: neuron 2 is computed (gate on) but its up branch is off.
    w, k = pack_ffn(mlp, config, 0), Kernels()
    counts = torch.zeros(6, dtype=torch.int32)
    y, record = ExactMode(w, k).step(x, x, counts=counts)
    torch.testing.assert_close(y, mlp(x))
    row = 4 * 4  # bytes of one fp32 row of H = 4
    assert (record.computed, record.active) == (3, 2)
    assert record.bytes == 6 * row + 3 * row + 2 * row  # all gate rows, 3 up, 2 down
    assert counts.tolist() == [1, 0, 0, 1, 0, 0]
    counts.zero_()
    _, record = DenseMode(w, k).step(x, x, counts=counts)
    assert (record.computed, record.active, record.bytes) == (6, 2, 18 * row)
    assert counts.tolist() == [1, 0, 0, 1, 0, 0]
    # the predictor picks 0, 1, 3, 4: four gate rows; up only where the gate is on (0, 3); down
    # where h != 0 (0, 3); of the predictor, fc1 and the one row of fc2_t whose z is non-zero
    monkeypatch.setattr(reference, "DENSE_FALLBACK_SHARE", 1.0)  # the gathered path, in torch too
    counts.zero_()
    predictor = PredictorMode(w, k, PredictorOptions(threshold=0.0))
    y, record = predictor.step(x, x, counts=counts)
    torch.testing.assert_close(y, mlp(x))
    assert (record.computed, record.active) == (4, 2) and predictor.recall(record) == 1.0
    assert record.bytes == (8 + 1 * 6) * 4 + 4 * row + 2 * row + 2 * row
    predictor.step(-x, -x, counts=counts)  # z = relu(-r_0) = 0: every score is 0, none fires
    assert counts.tolist() == [1, 0, 0, 1, 0, 0]


def test_mode_options_are_checked_when_the_runtime_is_made(tiny_dirs, capsys):
    from turbo_demo import cli

    model = tiny_model("drelu", predictor_rank=4)
    for options, message in (
        ({"budjet": 0.3}, "predictor mode has no option 'budjet'; its options: threshold, budget"),
        ({"budget": 1.5}, r"share of the neurons in \(0, 1\]"),
        ({"budget": 0.3, "threshold": 0.0}, "a threshold or a budget, not both"),
        ({"threshold": float("nan")}, "NaN"),
    ):
        with pytest.raises(UserError, match=message):
            lean(model, "predictor", **options)
    with pytest.raises(UserError, match="dense mode has no option 'budget'; it takes none"):
        lean(model, "dense", budget=0.3)
    with pytest.raises(UserError, match=r"target sparsity must be in \[0, 1\)"):
        lean(model, "threshold", sparsity=1.0)
    assert cli.main(["generate", str(tiny_dirs["drelu"]), "--prompt", "def", "--budget", "0.3"]) == 2
    assert "dense mode has no option 'budget'" in capsys.readouterr().err


def test_predictor_audit_measures_recall():
    packed = pack(tiny_model("drelu", predictor_rank=4))
    steps = list(LeanRuntime(packed, "predictor", budget=0.25).generate([5, 6, 7, 8], max_new_tokens=5, audit=True))
    for stats in steps:
        assert stats.recall is not None and all(0.0 <= r <= 1.0 for r in stats.recall)
        assert all(abs(c - 32 / 128) < 1e-9 for c in stats.computed_share)
        assert stats.ffn_bytes < stats.ffn_bytes_dense
    every = LeanRuntime(packed, "predictor", threshold=float("-inf"))
    assert all(r == [1.0, 1.0] for r in (s.recall for s in every.generate([5, 6], 3, audit=True)))
    assert next(iter(every.generate([5, 6], 2))).recall is None


def test_bad_modes_say_what_to_do_instead():
    with pytest.raises(UserError, match="unknown mode 'turbo'"):
        lean(tiny_model("drelu"), "turbo")
    with pytest.raises(UserError, match="threshold mode for SwiGLU"):
        lean(tiny_model("dense"), "exact")
    with pytest.raises(UserError, match="python -m turbo_demo predictors"):
        lean(tiny_model("drelu"), "predictor")


def test_predictors_round_trip_through_from_pretrained(tiny_dirs, tmp_path):
    import shutil

    path = shutil.copytree(tiny_dirs["drelu"], tmp_path / "drelu")
    config = json.loads((path / "config.json").read_text())
    config["dtype"] = "bfloat16"  # predictors must keep the checkpoint's own dtype
    (path / "config.json").write_text(json.dumps(config))
    result = train_predictors(str(path), rank=8, train_tokens=2048, val_tokens=1024, steps=30)
    assert [e["layer"] for e in result["layers"]] == [0, 1]
    assert all(e["recall"] >= 0.9 for e in result["layers"])
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert loaded.config.predictor_rank == 8
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(path / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.predictor.fc1.weight").dtype == torch.bfloat16
    assert loaded.config.predictor_threshold == [e["threshold"] for e in result["layers"]]
    assert loaded.model.layers[1].mlp.predictor.fc2.weight.shape == (128, 8)
    runtime = lean(loaded, "predictor")
    assert len(list(runtime.generate([5, 6, 7], 4))) == 4


def test_calibration_reaches_the_target_recall_over_every_token():
    """The threshold comes from all the truly active scores, not a prefix of them."""
    torch.manual_seed(0)
    pred = BambooPredictor(8, 4, 50)
    r = torch.randn(3000, 8)
    y = torch.rand(3000, 50) < 0.3  # 45,000 active labels
    for target in (0.9, 0.95, 0.99):
        stats = calibrate(pred, r, y, target)
        assert target <= stats["recall"] < target + 0.01


def test_thresholds_calibrated_per_layer_reach_the_target_and_are_cached(tokenizer):
    model = tiny_model("dense")
    packed = pack(model)
    first = threshold_options(packed, tokenizer, 0.6, 128)
    assert len(first) == len(packed.ffns) and all(o.threshold > 0 for o in first)
    assert threshold_options(packed, tokenizer, 0.6, 128) == first  # cached per model and sparsity
    higher = threshold_options(packed, tokenizer, 0.8, 128)
    assert all(h.threshold > f.threshold for h, f in zip(higher, first))
    # on the calibration text itself, decoding skips about the target share of the neurons
    ids = calibration_ids(tokenizer, 128)
    steps = list(LeanRuntime(packed, "threshold", options=higher).generate(ids[:60], 30))
    assert 0.65 < sum(s.sparsity for s in steps) / len(steps) < 0.95
    drelu = pack(tiny_model("drelu"))
    natural = LeanRuntime(drelu, "dense").generate(ids[:60], 10)
    below = min(s.sparsity for s in natural) / 2  # under dReLU's own sparsity the threshold is 0
    assert [o.threshold for o in threshold_options(drelu, tokenizer, below, 128)] == [0.0] * len(drelu.ffns)


def test_predictor_mode_on_a_swiglu_layer_gates_with_silu(cpp_kernels):
    """A predictor on a SwiGLU layer (a silu gate, an up branch without activation): the chosen
    neurons' h is silu(gate) * up, the published formula, in both backends; a ReLU'd gate fails."""
    g = torch.Generator().manual_seed(12)
    n, h, rank = 40, 24, 6
    wg, wu, wd_t = (torch.randn(n, h, generator=g) / h**0.5 for _ in range(3))
    fc1, fc2_t = torch.randn(rank, h, generator=g), torch.randn(rank, n, generator=g)
    w = FFNWeights(wg, wu, wd_t, "silu", False, fc1, fc2_t, 0.0)
    x, r = torch.randn(h, generator=g), torch.randn(h, generator=g)
    score = torch.relu(fc1 @ r) @ fc2_t
    chosen = score > 0
    assert 0 < int(chosen.sum()) < n
    expected = ((torch.nn.functional.silu(wg @ x) * (wu @ x)) * chosen) @ wd_t
    relu_gated = ((torch.relu(wg @ x) * (wu @ x)) * chosen) @ wd_t
    for kernels in (Kernels(), cpp_kernels):
        y, record = PredictorMode(w, kernels).step(x, r)
        assert record.computed == int(chosen.sum())
        torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
        with pytest.raises(AssertionError):
            torch.testing.assert_close(y, relu_gated, atol=1e-5, rtol=1e-5)


def test_a_mode_binds_the_kernels_of_its_weights_kind():
    """Kernels are bound once, when a mode is made: tensors to the tensor set, blocks to the
    blocks set of the same backend (which shares its prefill threads); one layer's matrices of
    both kinds are refused."""
    kernels = Kernels()
    kernels.prefill_threads = 3
    g = torch.Generator().manual_seed(1)
    mats = [torch.randn(64, 32, generator=g) for _ in range(3)]
    plain = FFNWeights(*mats, "relu", True)
    blocks = FFNWeights(*(quantize(m, "int8") for m in mats), "relu", True)
    assert DenseMode(plain, kernels).kernels is kernels
    bound = DenseMode(blocks, kernels).kernels
    assert bound is kernels.blocks and bound.tensors is kernels and bound.for_weights(*mats) is kernels
    assert bound.prefill_threads == 3 and bound.name == kernels.name
    with pytest.raises(UserError, match="mix block-quantized and unquantized"):
        DenseMode(FFNWeights(mats[0], blocks.wu, mats[2], "relu", True), kernels)

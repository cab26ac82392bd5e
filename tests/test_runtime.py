"""The lean runtime and the FFN modes: paths that must agree, statistics, and clear errors."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from conftest import tiny_model
from turbo_demo.errors import UserError
from turbo_demo.hooks import on_ffn_activation
from turbo_demo.modeling_bamboo import BambooConfig, BambooMLP, BambooPredictor
from turbo_demo.runtime import ffn as ffn_module
from turbo_demo.runtime.engine import Runtime
from turbo_demo.runtime.ffn import make_ffn
from turbo_demo.runtime.hf import TransformersRuntime, sparse_mode
from turbo_demo.runtime.predictors import calibrate, train_predictors

IDS = torch.tensor([5, 17, 3, 99, 250, 42, 7, 8, 120, 33, 61, 2, 9, 14, 200, 150, 11, 76, 43, 21,
                    5, 6, 70, 80, 90, 100, 110, 120, 130, 140])


def runtime_logits(runtime, ids=IDS, prefill=8):
    """Logits for every position from `prefill` on: one prefill, then one decode step each."""
    out = [runtime.prefill(ids[:prefill])]
    out += [runtime.decode(int(t)) for t in ids[prefill:-1]]
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["dense", "drelu"])
def test_runtime_equals_transformers_forward(kind):
    model = tiny_model(kind)
    with torch.no_grad():
        reference = model(IDS[None]).logits[0, 7:-1]
    torch.testing.assert_close(runtime_logits(Runtime(model)), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(runtime_logits(TransformersRuntime(tiny_model(kind))), reference,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("mode,options", [("dense", {}), ("exact", {}), ("predictor", {"budget": 0.3})])
def test_runtime_on_cuda_equals_the_cpu(mode, options):
    model = tiny_model("drelu", predictor_rank=4, seed=4)
    on_cpu = runtime_logits(Runtime(model, mode, **options))
    for engine in (Runtime, TransformersRuntime):
        runtime = engine(tiny_model("drelu", predictor_rank=4, seed=4).to("cuda"), mode, **options)
        torch.testing.assert_close(runtime_logits(runtime).cpu(), on_cpu, rtol=1e-4, atol=1e-4)
        steps = list(runtime.generate([5, 6, 7], max_new_tokens=4, temperature=0.8, audit=True))
        assert len(steps) == 4 and sum(map(sum, runtime.firing_counts())) > 0


def test_cpp_kernels_refuse_a_model_off_the_cpu(monkeypatch):
    from turbo_demo.runtime import kernels

    monkeypatch.setattr(kernels, "backend", lambda: "cpp")
    with pytest.raises(UserError, match="use the torch backend"):
        Runtime(tiny_model("drelu").to("meta"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_generate_on_cuda_without_a_gpu_says_so(tiny_dirs, capsys):
    from turbo_demo import cli

    assert cli.main(["generate", str(tiny_dirs["drelu"]), "--prompt", "def", "--device", "cuda"]) == 2
    assert "no CUDA device here" in capsys.readouterr().err


def test_exact_equals_dense_over_prefill_and_20_decode_steps():
    runtime = Runtime(tiny_model("drelu", seed=1))
    dense = runtime_logits(runtime)
    runtime.set_mode("exact")
    exact = runtime_logits(runtime)
    assert len(exact) == 22
    torch.testing.assert_close(exact, dense, rtol=0, atol=1e-5)
    assert runtime.ffns[0].record.computed < runtime.ffns[0].n


def test_threshold_zero_equals_dense():
    for kind in ("dense", "drelu"):
        runtime = Runtime(tiny_model(kind))
        dense = runtime_logits(runtime)
        runtime.set_mode("threshold", threshold=0.0)
        torch.testing.assert_close(runtime_logits(runtime), dense, rtol=0, atol=1e-5)


def test_predictor_with_every_neuron_active_equals_dense(monkeypatch):
    model = tiny_model("drelu", predictor_rank=4)
    runtime = Runtime(model)
    dense = runtime_logits(runtime)
    runtime.set_mode("predictor", threshold=float("-inf"))
    torch.testing.assert_close(runtime_logits(runtime), dense, rtol=0, atol=1e-5)  # dense fallback
    monkeypatch.setattr(ffn_module, "DENSE_FALLBACK_SHARE", 1.0)  # force the gathered path
    torch.testing.assert_close(runtime_logits(runtime), dense, rtol=0, atol=1e-5)
    runtime.set_mode("predictor", budget=1.0)
    torch.testing.assert_close(runtime_logits(runtime), dense, rtol=0, atol=1e-5)


def test_statistics_of_a_hand_built_layer(monkeypatch):
    config = BambooConfig(hidden_size=4, intermediate_size=6, num_hidden_layers=1,
                          num_attention_heads=1, num_key_value_heads=1, vocab_size=8, predictor_rank=2)
    mlp = BambooMLP(config, 0)
    with torch.no_grad():
        mlp.gate_proj.weight.copy_(torch.tensor([[1., 0, 0, 0], [-1, 0, 0, 0], [0, 1, 0, 0],
                                                 [0, 0, 1, 0], [0, 0, 0, 1], [0, -1, 0, 0]]))
        mlp.up_proj.weight.copy_(torch.tensor([[1., 0, 0, 0], [1, 0, 0, 0], [0, -1, 0, 0],
                                               [0, 0, 1, 0], [0, 0, 0, 1], [0, 1, 0, 0]]))
        mlp.down_proj.weight.copy_(torch.arange(24.0).view(4, 6))
        # z = relu(fc1 r) = (r_0, 0); score = fc2 z = r_0 * (1, 1, -1, 1, 1, -1)
        mlp.predictor.fc1.weight.copy_(torch.tensor([[1., 0, 0, 0], [0, 0, 0, 0]]))
        mlp.predictor.fc2.weight.copy_(torch.tensor([[1., 0], [1, 0], [-1, 0], [1, 0], [1, 0], [-1, 0]]))
    x = torch.tensor([1.0, 2.0, 3.0, 0.0])
    # gate = [1, -1, 2, 3, 0, -2] -> relu > 0 for neurons 0, 2, 3; up = [1, 1, -2, 3, 0, 2]
    # h = [1, 0, 0, 9, 0, 0]: neuron 2 is computed (gate on) but its up branch is off.
    exact = make_ffn("exact", mlp, config, 0)
    y = exact.step(x, x)
    torch.testing.assert_close(y, mlp(x))
    row = 4 * 4  # bytes of one fp32 row of H = 4
    assert (exact.record.computed, exact.record.active) == (3, 2)
    assert exact.record.bytes == 6 * row + 3 * row + 2 * row  # all gate rows, 3 up, 2 down
    assert exact.firing.tolist() == [1, 0, 0, 1, 0, 0]
    dense = make_ffn("dense", mlp, config, 0)
    dense.step(x, x)
    assert (dense.record.computed, dense.record.active, dense.record.bytes) == (6, 2, 18 * row)
    assert dense.firing.tolist() == [1, 0, 0, 1, 0, 0]
    # the predictor picks 0, 1, 3, 4: four gate rows; up only where the gate is on (0, 3); down
    # where h != 0 (0, 3); of the predictor, fc1 and the one row of fc2_t whose z is non-zero
    monkeypatch.setattr(ffn_module, "DENSE_FALLBACK_SHARE", 1.0)  # the gathered path, in torch too
    predictor = make_ffn("predictor", mlp, config, 0, threshold=0.0)
    torch.testing.assert_close(predictor.step(x, x), mlp(x))
    assert (predictor.record.computed, predictor.record.active) == (4, 2)
    assert predictor.record.bytes == (8 + 1 * 6) * 4 + 4 * row + 2 * row + 2 * row
    predictor.step(-x, -x)  # scores r_0 * (...) < 0 for 0, 1, 3, 4: it picks 2 and 5, which are off
    assert predictor.firing.tolist() == [1, 0, 0, 1, 0, 0]


@pytest.mark.parametrize("engine", [Runtime, TransformersRuntime])
@pytest.mark.parametrize("mode,options", [("dense", {}), ("exact", {}), ("predictor", {"budget": 0.5})])
def test_firing_counts_add_up_to_each_steps_active_neurons(engine, mode, options):
    runtime = engine(tiny_model("drelu", predictor_rank=4, seed=2), mode, **options)
    list(runtime.generate([5, 6, 7], max_new_tokens=4))  # counts start afresh with each generation
    steps = list(runtime.generate([5, 6, 7, 8], max_new_tokens=6))
    counts = runtime.firing_counts()
    assert len(counts) == 2 and all(len(layer) == 128 for layer in counts)
    for layer, per_neuron in enumerate(counts):
        assert max(per_neuron) <= len(steps)
        assert sum(per_neuron) == round(sum(s.active_share[layer] * 128 for s in steps))


def test_generate_command_prints_steps_and_firing_counts(tiny_dirs, capsys):
    from turbo_demo import cli
    from turbo_demo.runtime import cpp

    outs = {}
    for backend in ("torch", "cpp") if cpp.available() else ("torch",):
        assert cli.main(["generate", str(tiny_dirs["drelu"]), "--mode", "exact", "--prompt", "def add",
                         "--max-new-tokens", "5", "--backend", backend, "--json"]) == 0
        out = outs[backend] = json.loads(capsys.readouterr().out)
        assert len(out["token_ids"]) == len(out["steps"]) == 5 and out["engine"] == "lean"
        assert out["backend"] == backend and out["dtype"] == "float32"  # auto: a small model
        assert [len(layer) for layer in out["firing_counts"]] == [128, 128]
        active = sum(round(s["active_share"][0] * 128) for s in out["steps"])
        assert sum(out["firing_counts"][0]) == active > 0
    assert len({json.dumps([o["token_ids"], o["firing_counts"]]) for o in outs.values()}) == 1
    assert cli.main(["generate", str(tiny_dirs["drelu"]), "--prompt", "def add", "--max-new-tokens", "3",
                     "--dtype", "bf16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dtype"] == "bfloat16" and len(out["token_ids"]) == 3


def test_sampled_generation_follows_the_seed_on_both_backends():
    from turbo_demo.runtime import cpp, kernels

    tokens = {}
    for backend in ("torch", "cpp") if cpp.available() else ("torch",):
        kernels.use_backend(backend)  # the autouse fixture restores the backend
        runtime = Runtime(tiny_model("drelu", seed=5), "exact")
        for seed in (3, 3, 4):
            steps = runtime.generate([5, 6, 7], max_new_tokens=12, temperature=0.9, top_p=0.9, seed=seed)
            tokens.setdefault((backend, seed), []).append([s.token for s in steps])
    runs = {key: [json.dumps(t) for t in value] for key, value in tokens.items()}
    assert all(len(set(value)) == 1 for value in runs.values())  # one seed, one sequence
    assert len({runs[key][0] for key in runs if key[1] == 3}) == 1  # on either backend
    assert runs[("torch", 3)] != runs[("torch", 4)]


def test_predictor_audit_measures_recall():
    model = tiny_model("drelu", predictor_rank=4)
    runtime = Runtime(model, "predictor", budget=0.25)
    steps = list(runtime.generate([5, 6, 7, 8], max_new_tokens=5, audit=True))
    for stats in steps:
        assert stats.recall is not None and all(0.0 <= r <= 1.0 for r in stats.recall)
        assert all(abs(c - 32 / 128) < 1e-9 for c in stats.computed_share)
        assert stats.ffn_bytes < stats.ffn_bytes_dense
    runtime.set_mode("predictor", threshold=float("-inf"))
    assert all(r == [1.0, 1.0] for r in (s.recall for s in runtime.generate([5, 6], 3, audit=True)))
    assert list(runtime.generate([5, 6], 2))[0].recall is None


def test_sparsified_model_still_works_with_transformers_generate():
    model = tiny_model("drelu", seed=3)
    prompt = torch.tensor([[5, 17, 3, 99]])
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, output_logits=True,
                  return_dict_in_generate=True)
    dense = model.generate(prompt, **kwargs)
    with sparse_mode(model, "exact") as ffns:
        sparse = model.generate(prompt, **kwargs)
        assert ffns[0].record.computed < ffns[0].n
    assert torch.equal(sparse.sequences, dense.sequences)
    torch.testing.assert_close(torch.cat(sparse.logits), torch.cat(dense.logits), rtol=0, atol=1e-5)


def test_hooks_and_transforms_leave_nothing_behind():
    model = tiny_model("drelu")
    mlps = [layer.mlp for layer in model.model.layers]
    with on_ffn_activation(model, lambda i, h: None), sparse_mode(model, "exact"):
        pass
    assert [layer.mlp for layer in model.model.layers] == mlps
    for module in model.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks


def test_bad_modes_say_what_to_do_instead():
    with pytest.raises(UserError, match="unknown mode 'turbo'"):
        Runtime(tiny_model("drelu"), "turbo")
    with pytest.raises(UserError, match="threshold mode for SwiGLU"):
        Runtime(tiny_model("dense"), "exact")
    with pytest.raises(UserError, match="python -m turbo_demo predictors"):
        Runtime(tiny_model("drelu"), "predictor")


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
    runtime = Runtime(loaded, "predictor")
    assert len(list(runtime.generate([5, 6, 7], 4))) == 4


def test_transformers_engine_gives_the_model_back():
    model = tiny_model("drelu")
    mlps = [layer.mlp for layer in model.model.layers]
    runtime = TransformersRuntime(model, "exact")
    steps = list(runtime.generate([5, 6, 7], 3))
    assert len(steps) == 3 and steps[0].computed_share[0] < 1.0
    runtime.close()
    assert [layer.mlp for layer in model.model.layers] == mlps
    Runtime(model, "exact")  # the shared model is usable again


def test_calibration_reaches_the_target_recall_over_every_token():
    """The threshold comes from all the truly active scores, not a prefix of them."""
    torch.manual_seed(0)
    pred = BambooPredictor(8, 4, 50)
    r = torch.randn(3000, 8)
    y = torch.rand(3000, 50) < 0.3  # 45,000 active labels
    for target in (0.9, 0.95, 0.99):
        stats = calibrate(pred, r, y, target)
        assert target <= stats["recall"] < target + 0.01

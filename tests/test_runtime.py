"""The lean runtime and the FFN modes: paths that must agree, statistics, and clear errors."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from conftest import lean, tiny_model, transformers_engine
from turbo_demo.errors import UserError
from turbo_demo.model.bamboo import BambooConfig, BambooMLP, BambooPredictor
from turbo_demo.offline.predictors import calibrate, train_predictors
from turbo_demo.runtime import TransformersRuntime, pack
from turbo_demo.runtime.hf import sparse_model
from turbo_demo.runtime.kernels import Kernels, reference
from turbo_demo.runtime.lean import LeanRuntime
from turbo_demo.runtime.modes import DenseMode, ExactMode, PredictorMode, PredictorOptions, make_modes
from turbo_demo.runtime.packing import pack_ffn

IDS = torch.tensor(
    [
        5,
        17,
        3,
        99,
        250,
        42,
        7,
        8,
        120,
        33,
        61,
        2,
        9,
        14,
        200,
        150,
        11,
        76,
        43,
        21,
        5,
        6,
        70,
        80,
        90,
        100,
        110,
        120,
        130,
        140,
    ]
)


def runtime_logits(runtime, ids=IDS, prefill=8):
    """Logits for every position from `prefill` on: one prefill, then one decode step each."""
    out = [runtime.prefill(ids[:prefill])]
    out += [runtime.decode(int(t))[0] for t in ids[prefill:-1]]
    return torch.stack(out)


def model_state(model) -> list:
    """Every parameter's storage, layout and values: what "left as loaded" means."""
    return [(name, p.data_ptr(), p.shape, p.stride(), p.detach().clone()) for name, p in model.named_parameters()]


def assert_same_state(before: list, after: list) -> None:
    assert [b[:4] for b in before] == [a[:4] for a in after]
    assert all(torch.equal(b[4], a[4]) for b, a in zip(before, after))


@pytest.mark.parametrize("kind", ["dense", "drelu"])
def test_runtime_equals_transformers_forward(kind):
    model = tiny_model(kind)
    with torch.no_grad():
        expected = model(IDS[None]).logits[0, 7:-1]
    torch.testing.assert_close(runtime_logits(lean(model)), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(runtime_logits(transformers_engine(model)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("mode,options", [("dense", {}), ("exact", {}), ("predictor", {"budget": 0.3})])
def test_runtime_on_cuda_equals_the_cpu(mode, options):
    model = tiny_model("drelu", predictor_rank=4, seed=4)
    on_cpu = runtime_logits(lean(model, mode, **options))
    for engine in (lean, transformers_engine):
        runtime = engine(tiny_model("drelu", predictor_rank=4, seed=4).to("cuda"), mode, **options)
        torch.testing.assert_close(runtime_logits(runtime).cpu(), on_cpu, rtol=1e-4, atol=1e-4)
        steps = list(runtime.generate([5, 6, 7], max_new_tokens=4, temperature=0.8, audit=True))
        assert len(steps) == 4 and sum(map(sum, runtime.firing_counts())) > 0


def test_cpu_only_kernels_refuse_a_model_off_the_cpu():
    class CpuOnly(Kernels):
        name, devices = "cpu-only", ("cpu",)

    with pytest.raises(UserError, match=r"the cpu-only kernels run on cpu .* use the torch backend"):
        lean(tiny_model("drelu").to("meta"), kernels=CpuOnly())


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_generate_on_cuda_without_a_gpu_says_so(tiny_dirs, capsys):
    from turbo_demo import cli

    assert cli.main(["generate", str(tiny_dirs["drelu"]), "--prompt", "def", "--device", "cuda"]) == 2
    assert "no CUDA device here" in capsys.readouterr().err


@pytest.mark.parametrize("engine", [LeanRuntime, TransformersRuntime])
def test_building_and_running_a_runtime_leaves_the_model_as_loaded(engine):
    model = tiny_model("drelu", predictor_rank=4, seed=6)
    before, mlps = model_state(model), [layer.mlp for layer in model.model.layers]
    with torch.no_grad():
        logits = model(IDS[None]).logits
    packed = pack(model)
    for mode, options in (("dense", {}), ("exact", {}), ("predictor", {"budget": 0.5})):
        assert len(list(engine(packed, mode, **options).generate([5, 6, 7], 4, audit=True))) == 4
    assert_same_state(before, model_state(model))
    assert [layer.mlp for layer in model.model.layers] == mlps
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(IDS[None]).logits, logits)
    assert packed.owned_bytes == 2 * (128 * 32 + 4 * 128) * 4  # W_down and fc2, per layer, in fp32


def test_exact_equals_dense_over_prefill_and_20_decode_steps():
    packed = pack(tiny_model("drelu", seed=1))
    dense = runtime_logits(LeanRuntime(packed))
    runtime = LeanRuntime(packed, "exact")
    exact = runtime_logits(runtime)
    assert len(exact) == 22
    torch.testing.assert_close(exact, dense, rtol=0, atol=1e-5)
    _, records = runtime.decode(5)
    assert records[0].computed < packed.ffns[0].n


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


@pytest.mark.parametrize("engine", [lean, transformers_engine])
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


def test_generate_command_prints_steps_and_firing_counts(tiny_dirs, capsys, any_kernels):
    from turbo_demo import cli

    outs = {}
    for backend in dict.fromkeys(("torch", any_kernels.name)):
        assert (
            cli.main(
                [
                    "generate",
                    str(tiny_dirs["drelu"]),
                    "--mode",
                    "exact",
                    "--prompt",
                    "def add",
                    "--max-new-tokens",
                    "5",
                    "--backend",
                    backend,
                    "--json",
                ]
            )
            == 0
        )
        out = outs[backend] = json.loads(capsys.readouterr().out)
        assert len(out["token_ids"]) == len(out["steps"]) == 5 and out["engine"] == "lean"
        assert out["backend"] == backend and out["dtype"] == "float32"  # auto: a small model
        assert [len(layer) for layer in out["firing_counts"]] == [128, 128]
        active = sum(round(s["active_share"][0] * 128) for s in out["steps"])
        assert sum(out["firing_counts"][0]) == active > 0
    assert len({json.dumps([o["token_ids"], o["firing_counts"]]) for o in outs.values()}) == 1
    assert (
        cli.main(
            [
                "generate",
                str(tiny_dirs["drelu"]),
                "--prompt",
                "def add",
                "--max-new-tokens",
                "3",
                "--dtype",
                "bf16",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["dtype"] == "bfloat16" and len(out["token_ids"]) == 3


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


def test_sampled_generation_follows_the_seed_on_both_backends(any_kernels):
    tokens = {}
    packed = pack(tiny_model("drelu", seed=5))
    for kernels in (Kernels(), any_kernels):
        runtime = LeanRuntime(packed, "exact", kernels)
        for seed in (3, 3, 4):
            steps = runtime.generate([5, 6, 7], max_new_tokens=12, temperature=0.9, top_p=0.9, seed=seed)
            tokens.setdefault((kernels.name, seed), []).append([s.token for s in steps])
    runs = {key: [json.dumps(t) for t in value] for key, value in tokens.items()}
    assert all(len(set(value)) == 1 for value in runs.values())  # one seed, one sequence
    assert len({runs[key][0] for key in runs if key[1] == 3}) == 1  # on either backend
    assert runs[("torch", 3)] != runs[("torch", 4)]


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


def test_sparse_model_decodes_with_transformers_generate_and_leaves_the_model_alone():
    model = tiny_model("drelu", seed=3)
    before = model_state(model)
    prompt = torch.tensor([[5, 17, 3, 99]])
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    dense = model.generate(prompt, **kwargs)
    packed = pack(model)
    modes = make_modes(packed.ffns, "exact", Kernels())
    firing = torch.zeros((2, 128), dtype=torch.int32)
    sparse_twin = sparse_model(packed, modes, firing)
    sparse = sparse_twin.generate(prompt, **kwargs)
    assert sparse_twin.model.layers[0].mlp.record.computed < 128 and int(firing.sum()) > 0
    assert torch.equal(sparse.sequences, dense.sequences)
    torch.testing.assert_close(torch.cat(sparse.logits), torch.cat(dense.logits), rtol=0, atol=1e-5)
    assert_same_state(before, model_state(model))
    assert sparse_twin.lm_head.weight is model.lm_head.weight  # shared, not copied
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


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

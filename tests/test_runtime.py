"""The lean runtime and the FFN modes: paths that must agree, statistics, and clear errors."""

import json

import pytest
import torch

from conftest import lean, tiny_model, transformers_engine
from turbo_demo.errors import UserError
from turbo_demo.runtime import TransformersRuntime, pack
from turbo_demo.runtime.decoder import Sampling
from turbo_demo.runtime.hf import sparse_model
from turbo_demo.runtime.kernels import Kernels
from turbo_demo.runtime.lean import LeanRuntime
from turbo_demo.runtime.modes import make_modes

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
        steps = list(runtime.generate([5, 6, 7], max_new_tokens=4, sampling=Sampling(0.8), audit=True))
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


def test_generate_command_prints_steps_and_firing_counts(tiny_dirs, capsys, backends):
    from turbo_demo import cli

    outs = {}
    for backend in (k.name for k in backends):
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


def test_sampled_generation_follows_the_seed_on_both_backends(backends):
    tokens = {}
    packed = pack(tiny_model("drelu", seed=5))
    for kernels in backends:
        runtime = LeanRuntime(packed, "exact", kernels)
        for seed in (3, 3, 4):
            steps = runtime.generate([5, 6, 7], max_new_tokens=12, sampling=Sampling(0.9, 0.9, seed))
            tokens.setdefault((kernels.name, seed), []).append([s.token for s in steps])
    runs = {key: [json.dumps(t) for t in value] for key, value in tokens.items()}
    assert all(len(set(value)) == 1 for value in runs.values())  # one seed, one sequence
    assert len({runs[key][0] for key in runs if key[1] == 3}) == 1  # on either backend
    assert runs[("torch", 3)] != runs[("torch", 4)]


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


def test_a_model_without_a_gated_ffn_decodes_densely_and_refuses_sparse_modes():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300, n_positions=64)).eval()
    packed = pack(model)
    assert packed.ffns == [] and packed.lean is None
    with torch.no_grad():
        expected = model(IDS[None, :12]).logits[0, 7:-1]
    runtime = TransformersRuntime(packed)
    torch.testing.assert_close(runtime_logits(runtime, IDS[:12]), expected, rtol=1e-5, atol=1e-5)
    assert [s.active_share for s in runtime.generate([5, 6], 3)] == [[], [], []]
    with pytest.raises(UserError, match="exact mode needs a gated FFN"):
        TransformersRuntime(packed, "exact")

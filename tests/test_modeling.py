"""The bamboo (dReLU) model: formula, HF round trips, remote-code-free loading, KV cache."""

import json

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import tiny_model
from turbo_demo.models import register_auto_classes
from turbo_demo.models.bamboo import BambooForCausalLM, BambooMLP, swiglu_to_drelu


def test_drelu_mlp_equals_its_formula():
    model = tiny_model("drelu")
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp, BambooMLP)
    x = torch.randn(3, 5, 32)
    g, u, d = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    expected = (torch.relu(x @ g.T) * torch.relu(x @ u.T)) @ d.T
    torch.testing.assert_close(mlp(x), expected, rtol=0, atol=1e-6)


def test_save_then_from_pretrained_gives_same_logits(tmp_path):
    register_auto_classes()  # what loading through the Auto classes asks of a user
    x = torch.randint(0, 300, (2, 12))
    for kind in ("dense", "drelu"):
        model = tiny_model(kind, predictor_rank=8) if kind == "drelu" else tiny_model(kind)
        model.save_pretrained(tmp_path / kind)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / kind, dtype=torch.float32)
        assert type(loaded) is type(model)
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    predictor = loaded.model.layers[1].mlp.predictor
    torch.testing.assert_close(predictor.fc2.weight, model.model.layers[1].mlp.predictor.fc2.weight)


def test_big_models_load_in_bf16_small_ones_in_fp32(tmp_path, monkeypatch):
    from turbo_demo.checkpoints import checkpoint, config

    model = tiny_model("drelu")
    model.to(torch.float16).save_pretrained(tmp_path)  # stored in half precision
    (tmp_path / "pytorch_model.bin").write_bytes(b"0" * 10**6)  # not counted: safetensors come first
    fp32_bytes = 2 * (tmp_path / "model.safetensors").stat().st_size  # twice the fp16 file
    assert checkpoint.load_model(tmp_path).dtype == torch.float32
    monkeypatch.setattr(config, "FP32_MAX_BYTES", fp32_bytes)  # just fits, without the .bin
    assert checkpoint.load_model(tmp_path).dtype == torch.float32
    monkeypatch.setattr(config, "FP32_MAX_BYTES", fp32_bytes - 1)
    assert checkpoint.load_model(tmp_path).dtype == torch.bfloat16
    assert checkpoint.load_model(tmp_path, torch.float32).dtype == torch.float32  # asked for


def test_published_auto_map_loads_without_remote_code(tmp_path):
    register_auto_classes()
    model = tiny_model("drelu")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["BambooForCausalLM"]
    config["auto_map"] = {
        "AutoConfig": "configuration_bamboo.BambooConfig",
        "AutoModelForCausalLM": "modeling_bamboo.BambooForCausalLM",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert not (tmp_path / "modeling_bamboo.py").exists()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "bamboo"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=False)
    assert isinstance(loaded, BambooForCausalLM)


def test_cached_decoding_equals_uncached():
    for kind in ("dense", "drelu"):
        model = tiny_model(kind)
        prompt = torch.randint(1, 300, (1, 6))
        out = model.generate(
            prompt,
            max_new_tokens=10,
            do_sample=False,
            use_cache=True,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
        cached = torch.cat(out.logits)
        with torch.no_grad():
            full = model(out.sequences[:, :-1], use_cache=False).logits[0, prompt.size(1) - 1 :]
        torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-5)


def test_relufication_keeps_every_weight():
    dense = tiny_model("dense")
    relufied = swiglu_to_drelu(dense)
    assert isinstance(relufied, BambooForCausalLM) and relufied.config.hidden_act == "relu"
    for name, tensor in dense.state_dict().items():
        torch.testing.assert_close(relufied.state_dict()[name], tensor, rtol=0, atol=0)

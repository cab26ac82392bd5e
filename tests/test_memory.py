"""Memory: the estimate from headers, the guard before any allocation, the store's budget."""

import gc
import json
import struct

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig

from conftest import tiny_model
from turbo_demo.app.engine.catalog import ModelStore
from turbo_demo.checkpoints import checkpoint, memory
from turbo_demo.checkpoints.checkpoint import load_model, save_checkpoint
from turbo_demo.errors import UserError
from turbo_demo.runtime import lean, pack


def huge_checkpoint(path):
    """A Mistral config and a safetensors file whose header claims 8 x 6.25e11 bf16 elements
    (10 TB, 20 TB at fp32) and holds no tensor data at all."""
    path.mkdir()
    MistralConfig(hidden_size=4096, num_hidden_layers=8, vocab_size=32000).save_pretrained(path)
    step = 1_250_000_000_000  # bytes per tensor
    header = {
        f"model.layers.{i}.self_attn.q_proj.weight": {
            "dtype": "BF16",
            "shape": [10**6, 625_000],
            "data_offsets": [i * step, (i + 1) * step],
        }
        for i in range(8)
    }
    blob = json.dumps(header).encode()
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob)
    return path


def test_a_checkpoint_claiming_more_than_the_machine_is_refused_before_any_allocation(tmp_path, monkeypatch):
    path = huge_checkpoint(tmp_path / "huge")

    def never(*args, **kwargs):
        raise AssertionError("the guard let a load start")

    monkeypatch.setattr(checkpoint.AutoModelForCausalLM, "from_pretrained", never)
    monkeypatch.setattr(checkpoint, "converted_state_dict", never)
    with pytest.raises(UserError, match=r"^huge needs 2\d\.\d TB \(2\d\.\d TB of float32 weights .* are available$"):
        load_model(path)  # refused from the headers: `never` shows that no load began
    with pytest.raises(UserError, match=r"needs .* but 1.0 GB is the model store's budget"):
        ModelStore(budget=10**9).get(str(path), on_load=never)


def test_the_estimate_is_the_bytes_a_load_and_its_pack_take(tmp_path, tokenizer):
    path = save_checkpoint(tiny_model("drelu", predictor_rank=8), tokenizer, tmp_path / "m", dtype=torch.float16)
    for dtype in (torch.float32, torch.bfloat16):  # both converted from the fp16 file
        need, packed = memory.estimate(path, dtype), pack(load_model(path, dtype))
        assert need.weights == sum(p.numel() * p.element_size() for p in packed.model.parameters())
        assert need.copies == packed.owned_bytes > 0
        runtime = lean.LeanRuntime(packed, "dense")
        assert need.kv_cache == runtime.k_cache.nbytes + runtime.v_cache.nbytes
        # converted one tensor at a time, as transformers converts from its memory map
        reference = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        for (name, p), q in zip(packed.model.named_parameters(), reference.parameters(), strict=True):
            assert torch.equal(p, q), name


def test_a_bin_checkpoint_is_estimated_from_its_file_sizes(tmp_path):
    model = tiny_model("dense")
    model.config.dtype = "float32"
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weights <= memory.estimate(tmp_path, torch.float32).weights < 1.1 * weights


def test_the_store_evicts_the_least_recently_used_model_within_its_budget(tmp_path, tokenizer):
    models = [tiny_model("dense", seed=i) for i in range(3)]
    dirs = [save_checkpoint(m, tokenizer, tmp_path / f"m{i}", torch.float32) for i, m in enumerate(models)]
    size = memory.estimate(dirs[0]).total
    store, loads = ModelStore(budget=2 * size), []
    a, b = (store.get(str(d), on_load=loads.append) for d in dirs[:2])
    assert store.get(str(dirs[0])) is a  # a is now the most recently used
    del a, b  # no run uses them
    store.get(str(dirs[2]), on_load=loads.append)  # evicts b
    assert len(loads) == 3 and store.used() == 2 * size
    store.get(str(dirs[0]), on_load=loads.append)
    assert len(loads) == 3  # a was kept
    in_use = store.get(str(dirs[1]), on_load=loads.append)  # reloaded, evicts c
    assert len(loads) == 4
    # runs hold a's and b's packs: evicting them frees nothing, so c is refused, and a is not reloaded
    held = store.get(str(dirs[0])).packed
    with pytest.raises(UserError, match="free in the model store's budget"):
        store.get(str(dirs[2]), on_load=loads.append)
    assert store.get(str(dirs[0]), on_load=loads.append).packed is held and len(loads) == 4
    del held, in_use
    gc.collect()
    store.get(str(dirs[2]), on_load=loads.append)
    assert len(loads) == 5


def test_aliases_of_one_directory_share_one_model(tiny_dirs, tmp_path):
    store, path = ModelStore(), tiny_dirs["dense"]
    link = tmp_path / "link"
    link.symlink_to(path)
    loaded = store.get(str(path))
    assert store.get(f"{path}/../{path.name}") is loaded and store.get(str(link)) is loaded


def test_the_budget_comes_from_the_environment_in_gb(monkeypatch):
    monkeypatch.setenv(memory.BUDGET_ENV, "0.5")
    assert ModelStore().budget == 500_000_000
    monkeypatch.setenv(memory.BUDGET_ENV, "lots")
    with pytest.raises(UserError, match="not a number of GB"):
        ModelStore()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device_map='auto' places weights on a GPU; none here")
def test_device_map_auto_puts_the_weights_on_the_gpu(tiny_dirs):
    model = load_model(tiny_dirs["drelu"], device_map="auto")
    assert {p.device.type for p in model.parameters()} == {"cuda"}

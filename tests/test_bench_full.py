"""`bench --full` on a small checkpoint of the same published layout: the writer's files load
natively with their per-layer predictor ranks, and the measurements' schema and arithmetic hold
(the 7B size itself is never run in tests: 16 GB of shards)."""

import json

import pytest

from turbo_demo.bench.common import cpu_info, published_ranks
from turbo_demo.bench.full import CONFIG, measure, write_peer_gguf, write_published
from turbo_demo.bench.phases import PREFILL_TOKENS, REQUEST_TOKENS
from turbo_demo.checkpoints.config import load_config

SMALL = {**CONFIG, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 300}  # fmt: skip


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return write_published(tmp_path_factory.mktemp("published") / "small", SMALL, progress=lambda m: None)


def test_the_written_checkpoint_is_the_published_layout(small):
    config = json.loads((small / "config.json").read_text())
    assert config["model_type"] == "bamboo" and "predictor_rank" not in config  # as published: no rank
    index = json.loads((small / "model.safetensors.index.json").read_text())
    assert "model.layers.1.mlp.predictor.fc2.weight" in index["weight_map"]
    loaded = load_config(small)
    assert [loaded.rank_of(i) for i in range(2)] == published_ranks(2)  # read from the tensors' shapes


def test_measure_reports_every_phase_with_consistent_arithmetic(small):
    result = measure(str(small), "int8", "auto", "turbo_demo.app.engine.warm:time_compare")
    assert result["layers"] == 2 and result["predictor_ranks"] == published_ranks(2)
    assert result["machine"] == cpu_info()  # the CPU travels with the numbers
    load = result["load"]
    assert load["seconds"] > 0 and load["estimate"] > 0
    assert load["peak_vs_estimate"] == pytest.approx(load["peak_rss"] / load["estimate"])
    assert {(r["engine"], r["prompt_tokens"]) for r in result["prefill"]} == {
        (m, n) for m in ("dense", "predictor") for n in PREFILL_TOKENS
    }
    for r in result["prefill"]:
        assert r["tokens_per_s"] == pytest.approx(r["prompt_tokens"] / r["seconds"])
    assert {(r["engine"], r["decode_threads"]) for r in result["request"]} >= {("dense", 1), ("predictor", 1)}
    for r in result["request"]:
        assert 0 < r["ttft_s"] < r["total_s"]
        assert r["decode_tokens_per_s"] == pytest.approx((REQUEST_TOKENS - 1) / (r["total_s"] - r["ttft_s"]))
    compare = result["compare"]
    assert set(compare["sides"]) == {"dense", "predictor"}
    assert not any(side["error"] for side in compare["sides"].values())
    assert 0 < compare["sides_prefill_and_decode_s"] < compare["wall_s"]
    assert compare["engine_s"] == pytest.approx(compare["wall_s"] - compare["sides_prefill_and_decode_s"])
    assert all(side["load_s"] == 0 and side["warm_up_s"] == 0 for side in compare["sides"].values())  # warm


def test_versus_llama_cpp_alternates_on_the_same_weights(small, tmp_path):
    """With peers: llama.cpp's GGUF is written from the shards (Q8_0 for int8) and decoded in its
    own process beside our two modes, each engine's best round kept, the ratios its rates'."""
    pytest.importorskip("llama_cpp")
    gguf = write_peer_gguf(small, "q8_0")
    assert gguf.name == "llama-cpp-q8_0.gguf" and not any(small.glob("*.part"))
    assert write_peer_gguf(small, "q8_0") == gguf  # a kept folder's file is reused
    versus = measure(str(small), "int8", "auto", None, str(gguf))["versus"]
    rows = {r["engine"]: r for r in versus["rows"]}
    assert set(rows) == {"dense", "predictor", "llama.cpp q8_0"}, versus["notes"]
    for r in rows.values():
        assert 0 < r["ttft_s"] < r["total_s"]
        assert r["decode_tokens_per_s"] == pytest.approx((REQUEST_TOKENS - 1) / (r["total_s"] - r["ttft_s"]))
    peer = rows["llama.cpp q8_0"]["decode_tokens_per_s"]
    for mode in ("dense", "predictor"):
        assert versus[f"{mode}_over_llama_cpp"] == pytest.approx(rows[mode]["decode_tokens_per_s"] / peer)
    assert any(note.startswith("llama.cpp: dense decoding") for note in versus["notes"])

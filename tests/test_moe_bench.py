"""The MoE rows of the benchmark on a tiny Mixtral-shaped layer: schema and the bytes each variant
reads (no timing asserts), and the shaped activity they rest on; the decoding rows of MoE
checkpoints (tiny ones in the published layout)."""

import pytest
import torch
from test_moe import CONFIG, write_layout

from turbo_demo.bench.common import InRounds, Settings
from turbo_demo.bench.e2e import bench_moe_models
from turbo_demo.bench.moe import MOE_MODES, bench_moe, random_moe, shape_experts
from turbo_demo.bench.report import format_table
from turbo_demo.runtime.kernels import Kernels
from turbo_demo.runtime.modes import ExactMode
from turbo_demo.runtime.moe import MoEMode

TINY = Settings(ffn_shapes=((32, 128),), rank=8, ffn_rounds=2, moe_sparsity=0.75, moe_layers=2)


def test_shaped_activity_is_the_wanted_share_of_the_chosen_experts():
    _, w = random_moe(TINY)
    x = torch.randn(32).to(TINY.dtype)
    shape_experts(Kernels(), w, x, 0.25, torch.Generator().manual_seed(0))
    _, record = MoEMode(w, ExactMode, Kernels()).step(x, x)
    assert [p.active for p in record.parts] == [p.computed for p in record.parts] == [32, 32]  # 25% of 128


def test_moe_rows_say_what_each_variant_reads(backends):
    flush = torch.ones(1 << 16)
    for kernels in backends:
        rows = bench_moe(TINY, kernels, flush, gbps=10.0, progress=False)
        assert [r["mode"] for r in rows] == list(MOE_MODES)
        by_mode = {r["mode"]: r for r in rows}
        for r in rows:
            assert set(r) == {
                "shape", "layers", "mode", "in_expert_sparsity", "ms", "bytes", "limit_ms", "speedup",
                "speedup_vs_transformers",
            }  # fmt: skip
            assert r["shape"] == "8x32x128 top-2" and r["layers"] == 2 and r["ms"] > 0
            assert r["limit_ms"] == pytest.approx(r["bytes"] / 10e9 * 1e3)
        row, router = 32 * 2, 8 * 32 * 2  # bf16 bytes of one neuron's row, of the router
        by_mode = {m: r | {"bytes": r["bytes"] / 2} for m, r in by_mode.items()}  # per layer of the two
        assert by_mode["transformers"]["bytes"] == by_mode["dense"]["bytes"] == router + 2 * 3 * 128 * row
        # exact: every gate row, then up and down of the 25% active; predictor: fc1, the fc2 rows of
        # its non-zero hidden units (of 8), and gate, up, down of the 25% it picks
        assert by_mode["exact"]["bytes"] == router + 2 * (128 + 2 * 32) * row
        fc1, fc2_row = 8 * 32 * 2, 128 * 2
        least = router + 2 * (fc1 + 3 * 32 * row)
        assert least < by_mode["predictor"]["bytes"] <= least + 2 * 8 * fc2_row
        assert by_mode["dense"]["speedup"] == 1.0 and by_mode["transformers"]["speedup_vs_transformers"] == 1.0
    result = {"machine": {"cpu": "?", "simd": [], "threads": 1, "torch": "?", "backend": "torch", "dtype": "bf16"}}
    result["machine"].update(family_model="?/?", read_gbps=10.0, read_method="?", read_gbps_at_end=10.0)
    assert "MoE step through the stack" in format_table({**result, "ffn": [], "moe": rows, "e2e": [], "notes": []})


def test_moe_checkpoints_decode_in_the_engines_their_configs_allow(tmp_path, tokenizer):
    dense, sparse = tmp_path / "moe-dense", tmp_path / "moe-drelu"
    mixtral = {**CONFIG, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_act": "silu"}
    write_layout(dense, tokenizer, mixtral, predictors=False)
    write_layout(sparse, tokenizer, CONFIG, predictors=True)
    settings = Settings(embedded_moe=(dense, sparse, tmp_path / "nowhere"), embedded_tokens=3, e2e_rounds=2)
    notes = []
    rows = bench_moe_models(settings, Kernels(), InRounds.over(Kernels(), 1 << 16), notes, progress=False)
    assert [(r["model"], r["engine"]) for r in rows] == [
        ("embedded-moe-dense", "transformers"),
        ("embedded-moe-dense", "dense"),
        ("embedded-moe-drelu", "transformers"),
        ("embedded-moe-drelu", "dense"),
        ("embedded-moe-drelu", "exact"),
        ("embedded-moe-drelu", "predictor"),
    ]
    by = {(r["model"], r["engine"]): r for r in rows}
    for model in ("embedded-moe-dense", "embedded-moe-drelu"):
        assert by[model, "dense"]["sparsity"] == pytest.approx(0.75)  # 6 of 8 experts never read
        # transformers' experts, like dense mode, read the chosen experts only
        assert by[model, "transformers"]["bytes_per_token"] == pytest.approx(by[model, "dense"]["bytes_per_token"])
    sparse = {engine: by["embedded-moe-drelu", engine] for engine in ("dense", "exact", "predictor")}
    assert sparse["exact"]["sparsity"] > 0.75
    assert sparse["predictor"]["bytes_per_token"] < sparse["dense"]["bytes_per_token"]
    assert any("embedded-nowhere skipped" in n for n in notes) and any("8 experts, top-2" in n for n in notes)

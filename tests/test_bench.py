"""The benchmark's machinery on tiny shapes: the JSON schema and sane numbers, no timing asserts."""

import json
import re
import subprocess
import sys

import pytest
import torch

from conftest import tiny_model
from turbo_demo.bench.common import SIMD_FLAGS, InRounds, Settings, settings_for
from turbo_demo.bench.ffn import FFN_MODES
from turbo_demo.bench.peers import all_peers, close_all
from turbo_demo.bench.report import format_table
from turbo_demo.bench.run import run_bench
from turbo_demo.errors import UserError
from turbo_demo.runtime import LeanRuntime, pack
from turbo_demo.runtime.kernels import Kernels

TINY_STACK = dict(hidden_size=32, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=300)


def tiny_settings(embedded) -> Settings:
    return Settings(
        read_bytes=1 << 20,
        ffn_shapes=((32, 128), (16, 64)),
        sparsities=(0.5, 0.9),
        ffn_rounds=2,
        working_set=1 << 16,
        rank=8,
        stack=TINY_STACK,
        stack_layers=1,
        stack_ranks=(8,),
        stack_tokens=2,
        embedded=embedded,
        embedded_tokens=3,
        embedded_moe=None,  # test_moe_bench.py decodes MoE checkpoints
        e2e_rounds=2,
        quants=("int8",),
    )


def positive(v) -> bool:
    return isinstance(v, float) and v > 0


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_bench_schema_on_tiny_shapes(tiny_dirs, backend):
    result = run_bench(tiny_settings(tiny_dirs["drelu"]), backend=backend, progress=False)
    assert json.loads(json.dumps(result)) == result
    assert set(result) == {"machine", "kernels", "ffn", "moe", "e2e", "prefill", "request", "notes"}
    machine = result["machine"]
    assert set(machine) == {
        "cpu",
        "vendor",
        "family_model",
        "simd",
        "threads",
        "torch",
        "backend",
        "dtype",
        "read_gbps",
        "read_method",
        "read_gbps_at_end",
    }
    assert set(machine["simd"]) <= set(SIMD_FLAGS) and machine["cpu"]
    assert re.fullmatch(r"\d+/\d+", machine["family_model"])  # x86 Linux, as every machine here
    assert machine["backend"] in ("cpp", "torch") and positive(machine["read_gbps"])
    assert positive(machine["read_gbps_at_end"]) and machine["read_gbps_at_end"] != machine["read_gbps"]

    # each kernel alone on the first FFN shape (128 x 32), per format: the bytes it reads
    kernels = {(e["kernel"], e["format"]): e for e in result["kernels"]}
    assert set(kernels) == {(k, f) for k in ("matvec", "vecmat", "predictor") for f in ("bfloat16", "int8")}
    assert kernels["matvec", "bfloat16"]["bytes"] == kernels["vecmat", "bfloat16"]["bytes"] == 128 * 32 * 2
    assert kernels["matvec", "int8"]["bytes"] == 128 * 34  # one block of 32 per row
    fc1, fc2_row = 8 * 34, 4 * 34  # rank 8: fc1 (8, 32), fc2_t (8, 128) at int8
    assert fc1 <= kernels["predictor", "int8"]["bytes"] <= fc1 + 8 * fc2_row
    for e in kernels.values():
        assert e["shape"] == "128x32" and positive(e["ms"])
        assert e["gbps"] == pytest.approx(e["bytes"] / e["ms"] / 1e6)
        assert positive(e["read_gbps"])  # the kernels' own rounds' reading, not the machine's first
        assert e["share_of_read_bandwidth"] == pytest.approx(e["gbps"] / e["read_gbps"])
    assert len({e["read_gbps"] for e in kernels.values()}) == 1

    assert len(result["ffn"]) == 2 * 2 * len(FFN_MODES)
    for e in result["ffn"]:
        assert set(e) == {"shape", "mode", "sparsity", "ms", "speedup", "speedup_vs_transformers"}
        assert e["shape"] in ("32x128", "16x64") and e["mode"] in FFN_MODES
        assert positive(e["ms"]) and positive(e["speedup"]) and positive(e["speedup_vs_transformers"])
        if e["mode"] == "dense":
            assert e["speedup"] == 1.0
        if e["mode"] == "transformers":
            assert e["speedup_vs_transformers"] == 1.0

    engines = [(e["model"], e["dtype"], e["quant"], e["engine"]) for e in result["e2e"]]
    # the tiny checkpoint has no predictors: its predictor engine is skipped, with a note; it
    # runs in the benchmark's dtype and in the app's, quantized in the benchmark's dtype
    assert engines == [
        ("7b-shape", "bfloat16", None, "transformers"),
        ("7b-shape", "bfloat16", None, "dense"),
        ("7b-shape", "bfloat16", None, "exact"),
        ("7b-shape", "bfloat16", None, "predictor"),
        ("7b-shape", "bfloat16", "int8", "dense"),
        ("7b-shape", "bfloat16", "int8", "exact"),
        ("7b-shape", "bfloat16", "int8", "predictor"),
    ] + [
        ("embedded-drelu", dtype, quant, engine)
        for dtype in ("bfloat16", "float32")
        for quant in ((None, "int8") if dtype == "bfloat16" else (None,))
        for engine in ("transformers", "dense", "exact")
        if quant is None or engine != "transformers"
    ]
    assert any("no predictors" in note for note in result["notes"])
    for e in result["e2e"]:
        assert set(e) == {
            "model",
            "dtype",
            "quant",
            "engine",
            "bytes_per_token",
            "limit_tokens_per_s",
            "tokens_per_s",
            "sparsity",
            "bandwidth_share",
            "speedup_vs_dense",
            "stats_share",
            "predictor_ranks",
            "read_gbps",
        }
        assert e["predictor_ranks"] == ([8] if (e["model"], e["engine"]) == ("7b-shape", "predictor") else None)
        assert all(positive(e[k]) for k in ("tokens_per_s", "bandwidth_share", "speedup_vs_dense"))
        assert (e["sparsity"] is None) == (e["engine"] == "transformers")
        assert (e["stats_share"] is None) == (e["engine"] == "transformers")
        assert e["stats_share"] is None or 0 < e["stats_share"] < 1
    by_engine = {(e["model"], e["quant"], e["engine"]): e for e in result["e2e"]}
    assert by_engine["7b-shape", None, "dense"]["sparsity"] == 0.0
    assert by_engine["7b-shape", None, "predictor"]["sparsity"] == pytest.approx(0.9, abs=0.01)
    # int8 rows read about 34/64 of the bf16 bytes (a 2-byte scale per 32 one-byte values)
    bf16, int8 = (by_engine["7b-shape", q, "dense"]["bytes_per_token"] for q in (None, "int8"))
    assert int8 == pytest.approx(bf16 * 34 / 64, rel=0.01)
    assert "FFN step" in format_table(result) and "embedded-drelu" in format_table(result)
    assert "vecmat    int8" in format_table(result)
    # the prompt phases: each (mode, quant) of the 7b-shape stack, no peers (not asked for)
    keys = {(e["engine"], e["quant"]) for e in result["request"]}
    assert keys == {(mode, quant) for mode in ("dense", "predictor") for quant in (None, "int8")}
    assert {(e["engine"], e["quant"], e["prompt_tokens"]) for e in result["prefill"]} == {
        (*key, n) for key in keys for n in (32, 512)
    }
    for e in result["prefill"]:
        assert e["tokens_per_s"] == pytest.approx(e["prompt_tokens"] / e["seconds"])
        assert e["vs_llama_cpp"] is None and positive(e["vs_decode"])
    for e in result["request"]:
        assert 0 < e["ttft_s"] < e["total_s"] and positive(e["decode_tokens_per_s"])
    assert "Prefill" in format_table(result) and "Request" in format_table(result)


def test_missing_checkpoint_is_a_note(tmp_path):
    settings = tiny_settings(tmp_path / "nowhere")
    settings.ffn_shapes, settings.sparsities = ((16, 64),), (0.9,)
    result = run_bench(settings, backend="torch", progress=False)
    assert {e["model"] for e in result["e2e"]} == {"7b-shape"}
    assert any("embedded-drelu skipped" in note for note in result["notes"])


def test_settings_and_bad_names():
    assert settings_for(quick=True, dtype="fp32").dtype == torch.float32
    assert settings_for().stack_layers == 8
    assert settings_for().peers and not settings_for(quick=True).peers and settings_for(quick=True, peers=True).peers
    with pytest.raises(UserError, match="unknown dtype"):
        settings_for(dtype="int4")
    with pytest.raises(UserError, match="unknown quantization"):
        settings_for(quants=("int3",))
    with pytest.raises(UserError, match="unknown kernel backend"):
        run_bench(tiny_settings(None), backend="cuda", progress=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_backend_decodes_like_torch(dtype, cpp_kernels):
    """The benchmark compares engines on the C++ kernels: the fused decode step (RMSNorm, RoPE,
    cache write, attention, GEMVs) must give the torch path's logits, windowed attention too,
    and in fp32 the same neuron firing counts."""
    ids = torch.tensor([5, 17, 3, 99, 250, 42, 7, 8, 120, 33, 61, 2, 9, 14])
    drelu = pack(tiny_model("drelu", predictor_rank=4, sliding_window=6).to(dtype))
    swiglu = pack(tiny_model("dense").to(dtype))
    cases = {
        "dense": (drelu, {}),
        "exact": (drelu, {}),
        "predictor": (drelu, {"budget": 0.5}),
        "threshold": (swiglu, {"threshold": 0.02}),
    }  # the last: an up branch without ReLU
    out, firing = {}, {}
    for kernels in (Kernels(), cpp_kernels):
        for mode, (packed, options) in cases.items():
            runtime = LeanRuntime(packed, mode, kernels, **options)
            logits = [runtime.prefill(ids[:4])] + [runtime.decode(int(t))[0] for t in ids[4:]]
            out[kernels.name, mode] = torch.stack(logits).float()
            firing[kernels.name, mode] = runtime.firing.clone()
    for mode in cases:
        ref = out["torch", mode]
        # bf16: the logits are stored in bf16, and the two sides' fp32 sums round their layers'
        # outputs to either side of a bf16 boundary: at most one bf16 step (eps = 2^-7 of the
        # value) at the largest logit (measured: 1 step, 0.0039 at logits up to 0.75)
        eps = torch.finfo(dtype).eps
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=eps * float(ref.abs().max()), rtol=0)
        torch.testing.assert_close(out["cpp", mode], ref, **tol)
        with pytest.raises(AssertionError):  # 1% off fails the same comparison
            torch.testing.assert_close(out["cpp", mode] * 0.99, ref, **tol)
        assert firing["cpp", mode].sum() > 0
        if dtype == torch.float32:
            assert torch.equal(firing["cpp", mode], firing["torch", mode])
    torch.testing.assert_close(out["cpp", "exact"], out["cpp", "dense"], atol=0, rtol=0)  # same rows, same sums


def test_missing_peers_are_notes(monkeypatch, tmp_path):
    for name in ("llama_cpp", "torchao", "torchao.quantization"):
        monkeypatch.setitem(sys.modules, name, None)
    notes: list[str] = []
    assert all_peers(tiny_model("drelu"), None, [1], 2, tmp_path, notes) == {}
    assert any("pip install llama-cpp-python" in n for n in notes)
    assert any("pip install torchao" in n for n in notes)


def test_peers_decode_and_read_what_their_formats_store(tmp_path):
    """llama.cpp at f16 / q8_0 / q4_0 on a GGUF of the weights and torchao int8 decode the
    bench's tokens; their bytes per token follow their formats (torchao int4 needs rows of 128:
    a note at this size)."""
    model, notes = tiny_model("drelu").to(torch.bfloat16), []
    peers = all_peers(model, None, [1], 3, tmp_path, notes)
    assert not any("not installed" in n for n in notes), notes  # requirements-test.txt installs both
    assert set(peers) == {("llama.cpp", t) for t in ("f16", "q8_0", "q4_0")} | {("transformers+torchao", "int8")}
    assert len(peers["llama.cpp", "q8_0"].run()) == 3
    peers["transformers+torchao", "int8"].run()
    size = {key: peer.bytes_per_token for key, peer in peers.items()}
    # the LM head is the tied embedding (300 x 32); the layers' matrices come with it
    weights = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n) + 300 * 32
    assert size["llama.cpp", "f16"] == 2 * weights
    assert size["llama.cpp", "q8_0"] == weights * 34 // 32
    assert size["llama.cpp", "q4_0"] < size["llama.cpp", "q8_0"]
    assert size["transformers+torchao", "int8"] == pytest.approx(weights, rel=0.1)
    assert any(n.startswith("transformers+torchao int4: ValueError: hidden size 32") for n in notes)
    close_all(peers)
    assert not any(peer.worker.process.is_alive() for peer in peers.values())


def test_phase_rows_arithmetic_from_crafted_timings(monkeypatch):
    """The prefill and request rows' derived numbers, from timings chosen here: tokens/s, the
    ratio to llama.cpp at the same precision and to the same engine's decode rate."""
    from turbo_demo.bench import phases
    from turbo_demo.bench.peers import Peer

    packed = pack(tiny_model("drelu"))
    peer = Peer(worker=None, bytes_per_token=1, prompt=[1], tokens=1)  # never called: timings are crafted
    crafted = {
        "request": {("dense", None): (0.5, 6.8), ("llama.cpp", None): (0.25, 2.35)},
        32: {("dense", None): (0.4,), ("llama.cpp", None): (0.8,)},
        512: {("dense", None): (2.0,), ("llama.cpp", None): (5.0,)},
    }
    calls = iter(crafted.values())
    monkeypatch.setattr(phases, "timed_rounds", lambda fns, rounds, bar: next(calls))
    rows = phases.bench_phases(
        "tiny", {None: packed}, {"dense": {}}, None, Settings(), Kernels(), False, {("llama.cpp", "f16"): peer}
    )
    request = {r["engine"]: r for r in rows if r["phase"] == "request"}
    assert request["dense"]["decode_tokens_per_s"] == pytest.approx(63 / 6.3)  # 63 tokens after the first
    assert request["llama.cpp"]["decode_tokens_per_s"] == pytest.approx(63 / 2.1)
    assert request["dense"]["ttft_s"] == 0.5 and request["dense"]["total_s"] == 6.8
    prefill = {(r["engine"], r["prompt_tokens"]): r for r in rows if r["phase"] == "prefill"}
    assert prefill["dense", 32]["tokens_per_s"] == pytest.approx(80.0)
    assert prefill["dense", 32]["vs_llama_cpp"] == pytest.approx(2.0)
    assert prefill["dense", 512]["vs_llama_cpp"] == pytest.approx(2.5)
    assert prefill["dense", 512]["vs_decode"] == pytest.approx(256 / 10)
    assert prefill["llama.cpp", 512]["vs_llama_cpp"] is None
    assert prefill["llama.cpp", 512]["peer_type"] == "f16" and prefill["dense", 512]["peer_type"] is None


def test_decode_rows_arithmetic_from_crafted_timings(monkeypatch):
    """The e2e rows' derived numbers from timings chosen here: tokens/s, the ratio to our dense,
    the read bandwidth of the same rounds (the faster reader's median), the tokens/s it allows at
    the row's bytes, and the share of it reached."""
    from turbo_demo.bench import e2e

    real = e2e.round_robin
    reference = InRounds.over(Kernels(), 1 << 20)
    sum_reader, matvec_reader = reference.calls  # crafted: 10 GB/s and 5 GB/s
    crafted = {("transformers", None): 2.0, ("dense", None): 0.5, ("exact", None): 0.25,
               sum_reader: reference.nbytes / 10.0e9, matvec_reader: reference.nbytes / 5.0e9}  # fmt: skip

    def timings(calls, rounds, bar):
        real(calls, 1, bar)  # every engine decodes once: the rows' bytes and sparsity are real
        return {key: crafted[key] for key in calls}

    monkeypatch.setattr(e2e, "round_robin", timings)
    settings = tiny_settings(None)
    model = tiny_model("drelu")
    rows = {r["engine"]: r for r in e2e.bench_model("tiny", model, None, 4, settings, Kernels(), reference, False)}
    assert set(rows) == {"transformers", "dense", "exact"}
    for engine, seconds in (("transformers", 2.0), ("dense", 0.5), ("exact", 0.25)):
        row = rows[engine]
        assert row["tokens_per_s"] == pytest.approx(4 / seconds)
        assert row["speedup_vs_dense"] == pytest.approx(0.5 / seconds)
        assert row["read_gbps"] == pytest.approx(10.0)
        assert row["limit_tokens_per_s"] == pytest.approx(10.0e9 / row["bytes_per_token"])
        assert row["bandwidth_share"] == pytest.approx(row["bytes_per_token"] / 10.0e9 / (seconds / 4))
    assert rows["exact"]["bytes_per_token"] < rows["dense"]["bytes_per_token"]  # it skips rows


def test_a_fresh_process_peak_rss_is_its_own_not_its_parents():
    # The bench measures a load's peak in a fresh interpreter. Its parent here held 1.5 GB just
    # before starting it; ru_maxrss would report at least that in the child (Linux carries a
    # parent's peak across fork and exec), the child's own peak is importing torch (~0.5 GB).
    child = "from turbo_demo.bench.common import peak_rss; print(peak_rss())"
    parent = (
        "import subprocess, sys; block = b'x' * (1536 << 20); del block; "
        f"print(subprocess.run([sys.executable, '-c', {child!r}], capture_output=True, text=True, check=True).stdout)"
    )
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, check=True)
    assert 0 < int(out.stdout.strip()) < 1 << 30

"""End-to-end batch-1 decoding per engine, on a Mistral-7B-shaped stack of random layers and on
the shipped dReLU checkpoint (see the package docstring for the method)."""

import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import GenerationConfig

from turbo_demo.bench.common import InRounds, Settings, published_ranks, randomize_, round_robin, timed
from turbo_demo.bench.peers import LLAMA_CPP_CONTEXT, Peer, all_peers, close_all
from turbo_demo.bench.phases import bench_phases
from turbo_demo.checkpoints.checkpoint import load_model
from turbo_demo.checkpoints.config import auto_dtype, dtype_name, load_config
from turbo_demo.models.bamboo import BambooConfig, BambooForCausalLM
from turbo_demo.runtime import LeanRuntime, PackedModel, pack
from turbo_demo.runtime.kernels import Kernels
from turbo_demo.runtime.quant import weight_bytes
from turbo_demo.runtime.stats import LayerRecord, StepStats

ENGINES = ("transformers", "dense", "exact", "predictor")
PROMPT = [1]  # one token, so that every engine decodes every new token with a one-token forward


def random_stack(s: Settings) -> BambooForCausalLM:
    """The 7b-shape model: Mistral-7B's layer shapes, `stack_layers` layers at the published
    predictor ranks, random weights."""
    config = BambooConfig(
        **s.stack,
        num_hidden_layers=s.stack_layers,
        predictor_rank=list(s.stack_ranks or published_ranks(s.stack_layers)),
        max_position_embeddings=LLAMA_CPP_CONTEXT,
        sliding_window=None,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = BambooForCausalLM(config).to(s.dtype)
    model.to_empty(device="cpu")
    randomize_(model)
    model.model.rotary_emb = type(model.model.rotary_emb)(config)  # a computed buffer
    return model.eval()


def stats_seconds(runtime: LeanRuntime, reps: int = 2000) -> float:
    """Seconds to build one decode step's statistics from the records of a decode step, as
    generate() does: a LayerRecord per layer (the FFN step's part) and the StepStats."""
    runtime.reset()
    _, records = runtime.decode(PROMPT[0])
    n = runtime.firing.size(1)

    def build():
        rebuilt = [LayerRecord(computed=r.computed, active=r.active, bytes=r.bytes, choice=r.choice) for r in records]
        StepStats.from_records(0, 0, 0.0, rebuilt, n, runtime.dense_ffn_bytes)

    return timed(lambda: [build() for _ in range(reps)]) / reps


def other_bytes(packed: PackedModel) -> int:
    """Weight bytes a decode step reads besides the FFN's: attention projections and LM head."""
    lean = packed.lean
    return weight_bytes(lean.lm_head) + sum(weight_bytes(w) for a in lean.attention for w in (a.wq, a.wk, a.wv, a.wo))


def packs_of(model, quants: tuple = ()) -> dict:
    """{None: the model's pack as loaded, quant: its pack in each block format of `quants`}."""
    return {None: pack(model), **{q: pack(model, q) for q in quants}}


def bench_model(
    label: str,
    model,
    predictor: dict | None,
    tokens: int,
    s: Settings,
    kernels: Kernels,
    reference: InRounds,
    progress: bool,
    packs: dict | None = None,
    peers: dict[tuple, Peer] | None = None,
) -> list[dict]:
    """tokens/s of each engine decoding `tokens` tokens after a one-token prompt: transformers'
    generate on the model as loaded, the lean runtime on each of `packs` (packs_of: the model
    as loaded, None: only that, and quantized; engine (mode, quant)), and the `peers`
    (bench/peers.py), all in one round robin with the `reference` readers, whose reading there
    (read_gbps) is what every row's limit and share are against."""
    peers = peers or {}
    packs = packs or packs_of(model)
    ranks = model.config.predictor_rank if predictor is not None else None
    generation = GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    exact = {"exact": {}} if model.config.hidden_act == "relu" else {}  # a SwiGLU model has no exact mode
    modes = {"dense": {}, **exact, **({"predictor": predictor} if predictor is not None else {})}
    runtimes = {
        (mode, quant): LeanRuntime(packed, mode, kernels, **options)
        for quant, packed in packs.items()
        for mode, options in modes.items()
    }
    steps = defaultdict(list)

    def decode(key):
        steps[key].extend(runtimes[key].generate(PROMPT, tokens))

    calls = {
        ("transformers", None): lambda: model.generate(torch.tensor([PROMPT]), generation_config=generation),
        **{key: lambda key=key: decode(key) for key in runtimes},
        **{key: peer.run for key, peer in peers.items()},
        **reference.calls,
    }
    bar = tqdm(total=s.e2e_rounds, desc=f"e2e {label}", file=sys.stderr, disable=not progress, leave=False)
    seconds = round_robin(calls, s.e2e_rounds, bar)
    bar.close()
    gbps = reference.gbps(seconds)
    # what transformers reads of the FFN: all of it, or in a MoE model the chosen experts' (as dense mode)
    dense_ffn = statistics.mean(st.ffn_bytes for st in steps["dense", None])
    stats_cost = {key: stats_seconds(runtime) for key, runtime in runtimes.items()}

    def row(key: tuple, step_bytes: float, sparsity: float | None, stats_cost: float | None) -> dict:
        per_token = seconds[key] / tokens
        return {
            "model": label,
            "dtype": dtype_name(model.dtype),
            "quant": key[1],
            "engine": key[0],
            "tokens_per_s": 1 / per_token,
            "sparsity": sparsity,
            "bytes_per_token": step_bytes,
            # the tokens/s the read bandwidth allows at these bytes per token
            "limit_tokens_per_s": gbps * 1e9 / step_bytes,
            "bandwidth_share": step_bytes / (gbps * 1e9) / per_token,
            "speedup_vs_dense": seconds["dense", None] / seconds[key],
            "stats_share": None if stats_cost is None else stats_cost / per_token,
            "predictor_ranks": ranks if key[0] == "predictor" else None,
            "read_gbps": gbps,
        }

    results = []
    for quant in packs:
        if quant is None:
            results.append(row(("transformers", None), other_bytes(packs[None]) + dense_ffn, None, None))
        for engine in ENGINES[1:]:
            key = (engine, quant)
            if key in runtimes:
                ffn_bytes = statistics.mean(st.ffn_bytes for st in steps[key])
                sparsity = 1 - statistics.mean(c for st in steps[key] for c in st.computed_share)
                results.append(row(key, other_bytes(packs[quant]) + ffn_bytes, sparsity, stats_cost[key]))
    # a peer whose process failed has no timing (bench/process.py; its note says why)
    return results + [row(key, peer.bytes_per_token, None, None) for key, peer in peers.items() if key in seconds]


def bench_e2e(
    s: Settings, kernels: Kernels, reference: InRounds, notes: list[str], progress: bool
) -> tuple[list[dict], list[dict]]:
    """(the decoding rows, the 7b-shape stack's prompt-phase rows: bench/phases.py)."""
    with tempfile.TemporaryDirectory(prefix="turbo-demo-gguf-") as tmp:  # the peers' GGUF files
        return bench_models(s, kernels, reference, notes, progress, Path(tmp))


def bench_models(
    s: Settings, kernels: Kernels, reference: InRounds, notes: list[str], progress: bool, tmp: Path
) -> tuple[list[dict], list[dict]]:
    stack = random_stack(s)
    peers = all_peers(stack, None, PROMPT, s.stack_tokens, tmp / "7b-shape", notes) if s.peers else None
    packs = packs_of(stack, s.quants)
    predictor = {"budget": s.stack_budget}
    results = bench_model("7b-shape", stack, predictor, s.stack_tokens, s, kernels, reference, progress, packs, peers)
    ranks = stack.config.predictor_rank
    phases = bench_phases("7b-shape", packs, {"dense": {}, "predictor": predictor}, ranks, s, kernels, progress, peers)
    close_all(peers)
    del stack, packs  # the 7b-shape weights, before the next model loads
    notes.append(
        f"7b-shape: {s.stack_layers} layers of Mistral-7B's shape, random weights, "
        f"predictor ranks {ranks}{'' if s.stack_ranks else ' (the published range)'} computing "
        f"{s.stack_budget:.0%} of the neurons"
    )
    if s.embedded is None or not (Path(s.embedded) / "config.json").is_file():
        notes.append(f"embedded-drelu skipped: no checkpoint at {s.embedded}")
        return results, phases
    app_dtype = auto_dtype(Path(s.embedded), load_config(s.embedded))  # as the app loads it
    for dtype in dict.fromkeys((s.dtype, app_dtype)):
        model = load_model(s.embedded, dtype)
        predictor = {} if model.config.predictor_rank else None
        in_bench_dtype = dtype == s.dtype  # quantized rows and the peers in the benchmark's dtype only
        quants = s.quants if in_bench_dtype else ()
        peers = None
        if s.peers and in_bench_dtype:
            peers = all_peers(model, Path(s.embedded), PROMPT, s.embedded_tokens, tmp / "embedded", notes)
        packs = packs_of(model, quants)
        results += bench_model(
            "embedded-drelu", model, predictor, s.embedded_tokens, s, kernels, reference, progress, packs, peers
        )
        close_all(peers)
    if predictor is None:
        notes.append(
            "embedded-drelu: no predictors in the checkpoint (run `python -m turbo_demo "
            "predictors`), predictor engine skipped"
        )
    notes.append(
        f"embedded-drelu: in {dtype_name(s.dtype)} and in {dtype_name(app_dtype)}, the dtype the app runs it in"
    )
    return results + bench_moe_models(s, kernels, reference, notes, progress), phases


def bench_moe_models(
    s: Settings, kernels: Kernels, reference: InRounds, notes: list[str], progress: bool
) -> list[dict]:
    """The embedded MoE checkpoints (s.embedded_moe), each in its own round robin, in the app's
    dtype: transformers' generate and the lean engines its config allows (exact for dReLU
    experts, predictor where they carry predictors). Rows are labelled embedded-<folder>."""
    results = []
    for path in s.embedded_moe or ():
        label = f"embedded-{Path(path).name}"
        if not (Path(path) / "config.json").is_file():
            notes.append(f"{label} skipped: no checkpoint at {path}")
            continue
        model = load_model(path)
        predictor = {} if getattr(model.config, "predictor_rank", None) else None
        results += bench_model(label, model, predictor, s.embedded_tokens, s, kernels, reference, progress)
        notes.append(
            f"{label}: {model.config.num_local_experts} experts, top-{model.config.num_experts_per_tok}, "
            f"in {dtype_name(model.dtype)} (as the app loads it); bytes_per_token counts the chosen experts' rows"
        )
    return results

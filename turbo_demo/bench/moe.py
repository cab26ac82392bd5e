"""One MoE step (batch 1) through a stack of `moe_layers` MoE layers at Mixtral's shape:
transformers' Mixtral MoE block, and our MoE modes at the paper's in-expert sparsity, on random
weights.

Each layer: E experts of the first FFN shape (hidden, intermediate) (4096 x 14336 by default:
Mixtral-8x7B's), top-k routing, a router and per-expert predictors of rank `rank`. Variants:

    transformers  MixtralSparseMoeBlock's own forward (fused gate_up_proj / down_proj, SwiGLU)
    dense         our MoE mode, dense experts (the router, then all rows of the k chosen experts)
    exact         dReLU experts, h != 0 on a (1 - moe_sparsity) share of each chosen expert
    predictor     the predictor computes that share (its `budget`), all of them truly active,
                  so that down reads every chosen row (the worst case)

Our modes read the same tensors as the transformers block (W_gate and W_up as row views of its
gate_up_proj; W_down transposed once, as the pack does). Before each timed step the activity is
shaped for that variant in every layer (rows of the chosen experts' W_gate and W_up negated, as
bench/ffn.py does) and the `read_bytes` buffer is read, so that every step starts with its
weights out of the caches. Every layer of the stack gets the step's one input x (random layers:
chaining outputs would only rescale it). ms and bytes are the whole stack's; limit_ms is the
step's bytes read / read bandwidth: the time a step cannot beat.
"""

import statistics
import sys
import time
from collections import defaultdict
from dataclasses import replace

import torch
from tqdm import tqdm
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from turbo_demo.bench.common import Settings, randomize_, rotated, timed
from turbo_demo.runtime.kernels import Kernels
from turbo_demo.runtime.modes import DenseMode, ExactMode, PredictorMode, PredictorOptions
from turbo_demo.runtime.moe import MoEMode, MoEWeights, expert_weights, route
from turbo_demo.runtime.weights import Quantizer

MOE_MODES = ("transformers", "dense", "exact", "predictor")


def random_moe(s: Settings) -> tuple[MixtralSparseMoeBlock, MoEWeights]:
    """transformers' Mixtral MoE block with random weights, and our dReLU experts on its tensors
    (W_down transposed, random predictors)."""
    hidden, inter = s.ffn_shapes[0]
    config = MixtralConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_local_experts=s.moe_experts,
        num_experts_per_tok=s.moe_top_k,
        num_attention_heads=1,
        num_key_value_heads=1,
    )
    with torch.device("meta"):
        block = MixtralSparseMoeBlock(config).to(s.dtype)
    block.to_empty(device="cpu")
    randomize_(block)
    block.gate.weight.data.normal_(0, 1)  # routing spread over the experts
    predictors = [torch.randn(s.rank, dim).to(s.dtype) for dim in (hidden, inter) for _ in range(s.moe_experts)]
    experts = [
        replace(e, act="relu", drelu=True, fc1=fc1, fc2_t=fc2_t, threshold=0.0)
        for e, fc1, fc2_t in zip(
            expert_weights(block.experts, config, Quantizer(), "experts."),
            predictors[: s.moe_experts],
            predictors[s.moe_experts :],
        )
    ]
    return block.eval(), MoEWeights(block.gate.weight.detach(), experts, s.moe_top_k)


def shape_experts(kernels: Kernels, w: MoEWeights, x: torch.Tensor, share: float, gen: torch.Generator) -> None:
    """For x's chosen experts: h(x) != 0 on exactly a random `share` of each one's neurons."""
    _, chosen = route(kernels.matvec(w.router, x), w.top_k)
    for e in chosen.tolist():
        ffn = w.experts[e]
        active = torch.zeros(ffn.n, dtype=torch.bool)
        active[torch.randperm(ffn.n, generator=gen)[: round(share * ffn.n)]] = True
        flip_gate = (kernels.matvec(ffn.wg, x) > 0) != active
        ffn.wg.mul_(1.0 - 2.0 * flip_gate.to(ffn.wg.dtype)[:, None])
        flip_up = active & (kernels.matvec(ffn.wu, x) < 0)
        ffn.wu.mul_(1.0 - 2.0 * flip_up.to(ffn.wu.dtype)[:, None])


def timed_steps(stack: list[MoEMode], x: torch.Tensor) -> tuple[float, int]:
    """(seconds, bytes read) of one MoE mode step on x in every layer of the stack."""
    start = time.perf_counter()
    records = [mode.step(x, x)[1] for mode in stack]
    return time.perf_counter() - start, sum(r.bytes for r in records)


def bench_moe(s: Settings, kernels: Kernels, flush: torch.Tensor, gbps: float, progress: bool) -> list[dict]:
    """One step through the MoE stack per variant, `ffn_rounds` rounds in rotating order (see the
    docstring)."""
    layers = [random_moe(s) for _ in range(s.moe_layers)]
    share = 1 - s.moe_sparsity
    modes = {
        "dense": [MoEMode(w, DenseMode, kernels) for _, w in layers],
        "exact": [MoEMode(w, ExactMode, kernels) for _, w in layers],
        "predictor": [MoEMode(w, PredictorMode, kernels, PredictorOptions(budget=share)) for _, w in layers],
    }
    gen = torch.Generator().manual_seed(0)
    times, nbytes = defaultdict(list), defaultdict(list)
    bar = tqdm(total=s.ffn_rounds, desc="moe", file=sys.stderr, disable=not progress, leave=False)
    with torch.inference_mode():
        for rnd in range(-1, s.ffn_rounds):  # round -1: untimed first calls
            x = torch.randn(layers[0][1].router.size(1), generator=gen).to(s.dtype)
            for mode in rotated(MOE_MODES, rnd):
                for _, w in layers:
                    shape_experts(kernels, w, x, 1.0 if mode == "predictor" else share, gen)
                flush.sum()
                if mode == "transformers":
                    seconds = timed(lambda x=x: [block(x.view(1, 1, -1)) for block, _ in layers])
                    read = sum(w.routed_bytes for _, w in layers)
                else:
                    seconds, read = timed_steps(modes[mode], x)
                if rnd >= 0:
                    times[mode].append(seconds)
                    nbytes[mode].append(read)
            bar.update(rnd >= 0)
    bar.close()
    hidden, inter = s.ffn_shapes[0]
    dense, hf = (statistics.median(times[m]) for m in ("dense", "transformers"))
    results = []
    for mode in MOE_MODES:
        seconds, read = statistics.median(times[mode]), statistics.mean(nbytes[mode])
        results.append(
            {
                "shape": f"{s.moe_experts}x{hidden}x{inter} top-{s.moe_top_k}",
                "layers": s.moe_layers,
                "mode": mode,
                "in_expert_sparsity": None if mode in ("transformers", "dense") else s.moe_sparsity,
                "ms": seconds * 1e3,
                "bytes": read,
                "limit_ms": read / (gbps * 1e9) * 1e3,
                "speedup": dense / seconds,
                "speedup_vs_transformers": hf / seconds,
            }
        )
    return results

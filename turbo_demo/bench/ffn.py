"""One FFN step (batch 1) per mode and sparsity on synthetic dReLU layers, and the transformers
MLP module's own forward on the same shapes (see the package docstring for the method)."""

import statistics
import sys
from collections import defaultdict
from math import ceil

import torch
from tqdm import tqdm

from turbo_demo.bench.common import Settings, random_mlp, rotated, timed
from turbo_demo.models.bamboo import BambooConfig, BambooMLP
from turbo_demo.runtime.kernels import Kernels
from turbo_demo.runtime.modes import DenseMode, ExactMode, PredictorMode, PredictorOptions
from turbo_demo.runtime.packing import pack_ffn

FFN_MODES = ("transformers", "dense", "exact", "predictor")


def shape_activity(kernels: Kernels, mlp: BambooMLP, x: torch.Tensor, active: torch.Tensor) -> None:
    """Negate rows of W_gate and W_up so that h(x) != 0 exactly where `active` (I,) is true:
    gate > 0 and up > 0 there, gate <= 0 elsewhere. The signs come from the same kernel the
    FFN step uses, so they are the signs the step sees."""
    with torch.no_grad():
        wg, wu = mlp.gate_proj.weight, mlp.up_proj.weight
        flip_gate = (kernels.matvec(wg, x) > 0) != active
        wg.mul_(1.0 - 2.0 * flip_gate.to(wg.dtype)[:, None])
        flip_up = active & (kernels.matvec(wu, x) < 0)
        wu.mul_(1.0 - 2.0 * flip_up.to(wu.dtype)[:, None])


class HFStep:
    """The transformers MLP module's forward on one token, with the FFN modes' step signature."""

    def __init__(self, mlp: BambooMLP):
        self.mlp = mlp

    def step(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return self.mlp(x.view(1, 1, -1)).view(-1)


def bench_ffn(s: Settings, kernels: Kernels, flush: torch.Tensor, progress: bool) -> list[dict]:
    """One FFN step per mode and sparsity, per shape; dense and sparse steps interleaved."""
    results = []
    for hidden, inter in s.ffn_shapes:
        config = BambooConfig(
            hidden_size=hidden,
            intermediate_size=inter,
            num_attention_heads=1,
            num_key_value_heads=1,
            predictor_rank=s.rank,
        )
        layer_bytes = 3 * hidden * inter * torch.finfo(s.dtype).bits // 8
        copies = [random_mlp(config, s.dtype) for _ in range(max(2, ceil(s.working_set / layer_bytes)))]
        layers = [(mlp, pack_ffn(mlp, config, 0)) for mlp in copies]  # a pack shares W_gate, W_up
        # the transformers module's own copies, apart from those the modes read
        hf_copies = [random_mlp(config, s.dtype) for _ in range(2)]
        gen = torch.Generator().manual_seed(0)
        times, turn = defaultdict(list), 0
        bar = tqdm(
            total=s.ffn_rounds * len(s.sparsities),
            desc=f"ffn {hidden}x{inter}",
            file=sys.stderr,
            disable=not progress,
            leave=False,
        )
        for rnd in range(s.ffn_rounds):
            for sparsity in s.sparsities:
                x, r = (torch.randn(hidden, generator=gen).to(s.dtype) for _ in range(2))
                active = torch.zeros(inter, dtype=torch.bool)
                active[torch.randperm(inter, generator=gen)[: round((1 - sparsity) * inter)]] = True
                # three consecutive copies; with only two, dense shares one (its state is irrelevant)
                (_, dense_w), (exact_mlp, exact_w), (pred_mlp, pred_w) = (
                    layers[(turn + j) % len(layers)] for j in (2, 0, 1)
                )
                turn += 3
                shape_activity(kernels, exact_mlp, x, active)
                shape_activity(kernels, pred_mlp, x, torch.ones_like(active))
                hf_mlp = hf_copies[turn % len(hf_copies)]
                ffns = {
                    "transformers": HFStep(hf_mlp),
                    "dense": DenseMode(dense_w, kernels),
                    "exact": ExactMode(exact_w, kernels),
                    "predictor": PredictorMode(pred_w, kernels, PredictorOptions(budget=1 - sparsity)),
                }
                if rnd == 0 and sparsity == s.sparsities[0]:
                    for ffn in ffns.values():  # untimed first calls (lazy set-up, first touches)
                        ffn.step(x, r)
                flush.sum()
                for mode in rotated(FFN_MODES, rnd):
                    times[mode, sparsity].append(timed(ffns[mode].step, x, r))
                bar.update()
        bar.close()
        del copies, layers, hf_copies
        for sparsity in s.sparsities:
            dense, hf = (statistics.median(times[mode, sparsity]) for mode in ("dense", "transformers"))
            for mode in FFN_MODES:
                seconds = statistics.median(times[mode, sparsity])
                results.append(
                    {
                        "shape": f"{hidden}x{inter}",
                        "mode": mode,
                        "sparsity": sparsity,
                        "ms": seconds * 1e3,
                        "speedup": dense / seconds,
                        "speedup_vs_transformers": hf / seconds,
                    }
                )
    return results

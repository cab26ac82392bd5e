"""Each decode kernel alone at the first FFN shape, per weight format: where a step's time goes.

A dense FFN step is two matvecs (W_gate x, W_up x: dot products along rows) and one vecmat
(h W_down: a weighted sum of neuron-major rows); a predictor's choice is one matvec on fc1 and
a vecmat over the rows of fc2_t whose z_j is non-zero. At batch 1 each is bound by the bytes it
reads, so each row gives its GB/s and its share of the read bandwidth measured in the same
rounds (read_gbps, common.InRounds): a kernel well under the others' share is bound by its
arithmetic, not by memory.

    matvec     y = W x over every row of a (I, H) matrix
    vecmat     y = h Wt over every row of a (I, H) matrix, h without zeros
    predictor  predict() at the mean of the stack's ranks (the published ranks: 1280): fc1 (R, H)
               whole, fc2_t (R, I) on the rows with z_j != 0 (about half of them for random
               weights); bytes = what it reads

Copies of the weights are cycled through (more bytes than the caches hold), and the variants
alternate within each round (timed_rounds): the medians are comparable within one run.
"""

import sys
import time

import torch
from tqdm import tqdm

from turbo_demo.bench.common import InRounds, Settings, published_ranks, timed, timed_rounds
from turbo_demo.runtime.kernels import Kernels
from turbo_demo.runtime.quant import FORMATS, quantize, row_bytes, weight_bytes
from turbo_demo.runtime.weights import FFNWeights

ROUNDS = 7


def kernel_calls(fmt: str | None, s: Settings, kernels: Kernels, gen: torch.Generator) -> dict:
    """{(kernel, format): a call returning (seconds, bytes read)} for weights in `fmt` (None:
    s.dtype tensors), each call on the next of its copies."""
    hidden, inter = s.ffn_shapes[0]
    ranks = s.stack_ranks or published_ranks(32)
    rank = round(sum(ranks) / len(ranks))
    keep = (lambda w: w.to(s.dtype)) if fmt is None else (lambda w: quantize(w, fmt))
    predictor_fmt = None if fmt is None else FORMATS[fmt]["predictor"]
    keep_predictor = (lambda w: w.to(s.dtype)) if predictor_fmt is None else (lambda w: quantize(w, predictor_fmt))
    copies = max(2, -(-s.working_set // (inter * hidden * torch.finfo(s.dtype).bits // 8)))
    mats = [keep(torch.randn(inter, hidden, generator=gen).div(hidden**0.5)) for _ in range(copies)]
    # the predictor's matrices, with the FFN's first copy (predict reads only fc1 and fc2_t)
    predictors = [
        FFNWeights(m, m, m, "relu", True, keep_predictor(torch.randn(rank, hidden, generator=gen)),
                   keep_predictor(torch.randn(rank, inter, generator=gen)))
        for m in mats[:2]
    ]  # fmt: skip
    bound = kernels.for_weights(mats[0])
    bound_predictor = kernels.for_weights(predictors[0].fc1, predictors[0].fc2_t)
    x = torch.randn(hidden, generator=gen).to(s.dtype)
    h = torch.randn(inter, generator=gen).to(s.dtype)
    turn = {"matvec": 0, "vecmat": 0, "predictor": 0}

    def next_of(kind: str, items: list):
        turn[kind] += 1
        return items[turn[kind] % len(items)]

    def predict() -> tuple[float, int]:
        w = next_of("predictor", predictors)
        start = time.perf_counter()
        _, rows = bound_predictor.predict(w, x, 0.0, 0)  # rows: how many fc2_t rows it read
        return time.perf_counter() - start, weight_bytes(w.fc1) + rows * row_bytes(w.fc2_t)

    name = fmt or str(s.dtype).removeprefix("torch.")
    return {
        ("matvec", name): lambda: (timed(bound.matvec, next_of("matvec", mats), x), weight_bytes(mats[0])),
        ("vecmat", name): lambda: (timed(bound.vecmat, h, next_of("vecmat", mats)), weight_bytes(mats[0])),
        ("predictor", name): predict,
    }


def bench_kernels(s: Settings, kernels: Kernels, reference: InRounds, progress: bool) -> list[dict]:
    """One row per kernel and format: median ms, bytes, GB/s and its share of the `reference`
    readers' reading in the same rounds."""
    gen = torch.Generator().manual_seed(0)
    calls = {}
    for fmt in (None, *s.quants):
        calls |= kernel_calls(fmt, s, kernels, gen)
    calls |= {key: lambda fn=fn: (timed(fn), reference.nbytes) for key, fn in reference.calls.items()}
    bar = tqdm(total=ROUNDS, desc="kernels", file=sys.stderr, disable=not progress, leave=False)
    medians = timed_rounds(calls, ROUNDS, bar)
    bar.close()
    gbps = reference.gbps({key: medians.pop(key)[0] for key in reference.calls})
    hidden, inter = s.ffn_shapes[0]
    rows = []
    for (kernel, fmt), (seconds, nbytes) in medians.items():
        rows.append(
            {"kernel": kernel, "format": fmt, "shape": f"{inter}x{hidden}", "ms": seconds * 1e3, "bytes": int(nbytes),
             "gbps": nbytes / seconds / 1e9, "share_of_read_bandwidth": nbytes / seconds / 1e9 / gbps,
             "read_gbps": gbps}
        )  # fmt: skip
    return rows

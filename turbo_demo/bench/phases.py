"""What a visitor waits for besides decoding: the prompt's prefill and a whole request, on the
7b-shape stack (at the published predictor ranks), ours beside llama.cpp on the same weights.

    prefill  tokens/s of one prompt of T tokens (each of PREFILL_TOKENS) through the lean
             runtime's prefill (one batched forward: GEMMs on the weights as held, block formats
             one dequantized tile at a time; the published predictor mask in predictor mode),
             per mode and precision; llama.cpp: the same T tokens as one batch (n_batch >= T);
             vs_llama_cpp = ours / llama.cpp at the same precision (bf16 vs F16, int8 vs Q8_0,
             int4 vs Q4_0), vs_decode = prefill tokens/s / the same engine's decode tokens/s
             (from the request rows)
    request  a REQUEST_PROMPT-token prompt and REQUEST_TOKENS new tokens, greedy, as generate()
             runs it on a warm runtime: ttft_s (from the call to the first new token: the
             prefill and the first step), decode_tokens_per_s (the other new tokens over their
             time) and total_s

Each is a median over rounds in which the variants take turns in a rotating order (common.py).
"""

import sys
import time
from collections.abc import Callable, Iterator

import torch
from tqdm import tqdm

from turbo_demo.bench.common import Settings, timed, timed_rounds
from turbo_demo.bench.peers import Peer
from turbo_demo.checkpoints.config import dtype_name
from turbo_demo.runtime import LeanRuntime, PackedModel
from turbo_demo.runtime.kernels import Kernels

PREFILL_TOKENS = (32, 512)
REQUEST_PROMPT = 32
REQUEST_TOKENS = 64
# llama.cpp's type at the precision of each of our weight formats (None: as loaded, bf16)
PEER_TYPE = {None: "f16", "int8": "q8_0", "int4": "q4_0"}


def prompt_ids(n: int, vocab: int) -> list[int]:
    """A fixed prompt of n tokens (the weights are random: any ids do)."""
    return [(7 * i + 1) % vocab for i in range(n)]


def request_seconds(tokens: Iterator) -> tuple[float, float]:
    """(seconds to the first new token, seconds in all) of a request: iterating `tokens`, its
    new tokens as they come (a generator, which starts its work at the first one)."""
    start, first = time.perf_counter(), None
    for _ in tokens:
        first = first or time.perf_counter() - start
    return first, time.perf_counter() - start


def bench_phases(
    label: str,
    packs: dict[str | None, PackedModel],
    modes: dict[str, dict],
    ranks: list[int] | None,
    s: Settings,
    kernels: Kernels,
    progress: bool,
    peers: dict[tuple, Peer] | None = None,
) -> list[dict]:
    """The prefill and request rows of each (mode, quant) runtime on `packs` and of llama.cpp's
    `peers` (those of PEER_TYPE's types), in one round robin per phase and prompt length."""
    vocab = next(iter(packs.values())).model.config.vocab_size
    dtype = dtype_name(next(iter(packs.values())).model.dtype)
    runtimes = {
        (mode, quant): LeanRuntime(packed, mode, kernels, **options)
        for quant, packed in packs.items()
        for mode, options in modes.items()
    }
    for runtime in runtimes.values():
        runtime.warm_up()
    llama = {("llama.cpp", q): peers["llama.cpp", t] for q, t in PEER_TYPE.items() if ("llama.cpp", t) in (peers or {})}

    def row(phase: str, key: tuple, **values) -> dict:
        return {
            "model": label,
            "phase": phase,
            "dtype": dtype,
            "quant": key[1],
            "engine": key[0],
            "peer_type": PEER_TYPE[key[1]] if key[0] == "llama.cpp" else None,
            "predictor_ranks": ranks if key[0] == "predictor" else None,
            **values,
        }

    def rounds(calls: dict, desc: str) -> dict:
        bar = tqdm(total=s.e2e_rounds, desc=f"{desc} {label}", file=sys.stderr, disable=not progress, leave=False)
        results = timed_rounds(calls, s.e2e_rounds, bar)
        bar.close()
        return results

    rows, decode_rate = [], {}
    for key, (ttft, total) in rounds(request_calls(runtimes, llama, vocab), "request").items():
        decode_rate[key] = (REQUEST_TOKENS - 1) / (total - ttft)
        rows.append(
            row(
                "request",
                key,
                prompt_tokens=REQUEST_PROMPT,
                new_tokens=REQUEST_TOKENS,
                ttft_s=ttft,
                decode_tokens_per_s=decode_rate[key],
                total_s=total,
            )
        )
    for n in PREFILL_TOKENS:
        seconds = {key: v[0] for key, v in rounds(prefill_calls(runtimes, llama, n, vocab), f"prefill {n}").items()}
        for key, sec in seconds.items():
            peer = ("llama.cpp", key[1])
            rows.append(
                row(
                    "prefill",
                    key,
                    prompt_tokens=n,
                    seconds=sec,
                    tokens_per_s=n / sec,
                    vs_llama_cpp=seconds[peer] / sec if peer in seconds and key[0] != "llama.cpp" else None,
                    vs_decode=n / sec / decode_rate[key],
                )
            )
    return rows


def request_calls(runtimes: dict[tuple, LeanRuntime], llama: dict[tuple, Peer], vocab: int) -> dict[tuple, Callable]:
    """By (engine, quant), a call that runs one request and returns (ttft_s, total_s)."""
    prompt = prompt_ids(REQUEST_PROMPT, vocab)
    calls = {
        key: lambda r=r: request_seconds(r.generate(prompt, REQUEST_TOKENS, warm_up=0)) for key, r in runtimes.items()
    }
    return calls | {
        key: lambda p=p: request_seconds(p.worker.stream("tokens", prompt, REQUEST_TOKENS)) for key, p in llama.items()
    }


def prefill_calls(
    runtimes: dict[tuple, LeanRuntime], llama: dict[tuple, Peer], n: int, vocab: int
) -> dict[tuple, Callable]:
    """By (engine, quant), a call that prefills one n-token prompt and returns (seconds,)."""
    ids = prompt_ids(n, vocab)
    tensor = torch.tensor(ids)
    calls = {key: lambda r=r, t=tensor: (timed(r.prefill, t),) for key, r in runtimes.items()}
    return calls | {key: lambda p=p, i=ids: (timed(lambda: p.worker.call("prefill", i)),) for key, p in llama.items()}

"""What every part of the benchmark shares: its settings, fair timing, the machine, random layers."""

import platform
import resource
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from turbo_demo.bench.process import PeerFailed
from turbo_demo.checkpoints.config import DTYPES
from turbo_demo.choices import QUANTS
from turbo_demo.errors import UserError
from turbo_demo.models.bamboo import BambooConfig, BambooMLP
from turbo_demo.paths import DRELU_MODEL, MOE_DENSE_MODEL, MOE_DRELU_MODEL
from turbo_demo.runtime.kernels import Kernels

MISTRAL_7B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
}
EMBEDDED = DRELU_MODEL
EMBEDDED_MOE = (MOE_DENSE_MODEL, MOE_DRELU_MODEL)  # (dense, dReLU)


@dataclass
class Settings:
    dtype: torch.dtype = torch.bfloat16
    read_bytes: int = 1 << 30
    ffn_shapes: tuple = ((4096, 14336), (1024, 4096))  # (hidden, intermediate)
    sparsities: tuple = (0.5, 0.8, 0.9, 0.95, 0.97)
    ffn_rounds: int = 9
    working_set: int = 768 << 20  # bytes of FFN weights cycled through: more than the caches hold
    rank: int = 256  # predictor rank of the FFN rows (the 7b-shape stack has the published ranks)
    stack: dict = field(default_factory=lambda: dict(MISTRAL_7B))
    stack_layers: int = 8
    stack_ranks: tuple | None = None  # the stack's predictor rank per layer (None: published_ranks)
    stack_budget: float = 0.1  # the 7b-shape predictor computes this share of neurons
    stack_tokens: int = 6
    embedded: Path | None = EMBEDDED
    embedded_tokens: int = 48
    embedded_moe: tuple[Path, ...] | None = EMBEDDED_MOE  # MoE checkpoints decoded like the embedded one
    e2e_rounds: int = 5
    quants: tuple = ()  # block formats whose lean engines join the e2e rows (runtime/quant.py)
    peers: bool = False  # llama.cpp and transformers+torchao on the same weights (bench/peers.py)
    # the MoE layer (bench/moe.py): experts of the first FFN shape, top-k, the in-expert sparsity
    moe_experts: int = 8
    moe_top_k: int = 2
    moe_sparsity: float = 0.85
    moe_layers: int = 3  # the stack one MoE step runs through (2.8 GB of bf16 experts each at Mixtral's shape)


def published_ranks(layers: int) -> list[int]:
    """Per-layer predictor ranks in TurboSparse-Mistral-7B's published range: 1536 at layer 0
    falling linearly to 1024 at the last of 32 layers (mean 1280; the published checkpoint's
    parameter count gives a mean of about 1.27k, its tensor shapes the rest), sampled evenly
    for a stack of fewer layers, in multiples of 32."""
    return [round((1536 - 512 * (32 * i // layers) / 31) / 32) * 32 for i in range(layers)]


def settings_for(
    quick: bool = False, dtype: str = "bf16", quants: tuple = QUANTS, peers: bool | None = None
) -> Settings:
    """The full benchmark (a few minutes), or a quick one (under a minute, noisier); the e2e
    rows in `dtype` and, for the lean engines, with each of `quants`; with the peers where
    `peers` (None: in the full benchmark only, since they add GGUF exports and quantized copies)."""
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    unknown = [q for q in quants if q not in QUANTS]
    if unknown:
        raise UserError(f"unknown quantization {unknown[0]!r}; choose from {', '.join(QUANTS)}")
    settings = Settings(dtype=DTYPES[dtype], quants=tuple(quants), peers=not quick if peers is None else peers)
    if quick:
        settings = replace(
            settings,
            ffn_rounds=3,
            stack_layers=2,
            moe_layers=1,
            stack_tokens=3,
            embedded_tokens=16,
            e2e_rounds=2,
            working_set=512 << 20,
        )
    return settings


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def rotated(items, turn: int) -> list:
    return [items[(i + turn) % len(items)] for i in range(len(items))]


# An untimed pause before each timed call: a peer's worker threads (llama.cpp's thread pool,
# OpenMP's team after our kernels) spin-wait for more work for a while after a call returns,
# on the cores the next variant's clock is running on.
SETTLE_S = 0.05


def settle() -> None:
    """Wait SETTLE_S on this thread's core, busy: on the 2-vCPU VMs here, once every vCPU has
    idled for some tens of ms, the next call's first parallel region waits milliseconds for its
    other thread to wake (docs/speed.md, "On an AMD EPYC (Zen 4)"). That is a once-per-request
    cost (in a request's TTFT), not a kernel's; a sleeping pause would charge it to every call."""
    end = time.perf_counter() + SETTLE_S
    while time.perf_counter() < end:
        pass


def timed_rounds(calls: dict, rounds: int, bar) -> dict:
    """Each call's results, medians over `rounds` rounds: one untimed warm-up call each, then
    rounds that call each once (after SETTLE_S), in an order rotating every round; a call
    returns a tuple of seconds, and each of its items gets its own median. A call that raises
    PeerFailed (a peer whose process died: bench/process.py, which notes it) leaves the rounds
    and the results."""
    calls = dict(calls)
    results = defaultdict(list)

    def call(key, timed_round: bool) -> None:
        try:
            result = calls[key]()
        except PeerFailed:
            del calls[key]
            results.pop(key, None)
            return
        if timed_round:
            results[key].append(result)

    for key in list(calls):
        call(key, False)
    for turn in range(rounds):
        for key in rotated(list(calls), turn):
            settle()
            call(key, True)
        bar.update()
    return {key: [statistics.median(r[i] for r in rs) for i in range(len(rs[0]))] for key, rs in results.items()}


def round_robin(calls: dict, rounds: int, bar) -> dict[str, float]:
    """Median seconds per call of each callable (timed_rounds of their run times)."""
    runs = {name: lambda fn=fn: (timed(fn),) for name, fn in calls.items()}
    return {name: seconds for name, (seconds,) in timed_rounds(runs, rounds, bar).items()}


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# The instruction sets the kernels and the peers' paths depend on, as /proc/cpuinfo names them
SIMD_FLAGS = ("avx2", "fma", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def cpu_info() -> dict:
    """{"cpu": model name, "vendor": AMD / Intel / ..., "family_model": "cpu family/model" as
    /proc/cpuinfo numbers them, "simd": the SIMD_FLAGS this CPU has}: every bench result carries
    it, since the kernels and the peers take other paths per family. A VM's model name can be a
    bare "AMD EPYC": the numbers tell its generation (AMD family 25 model 17 is Zen 4 Genoa)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    vendor = {"AuthenticAMD": "AMD", "GenuineIntel": "Intel"}.get(fields.get("vendor_id", ""), fields.get("vendor_id"))
    flags = set(fields.get("flags", "").split())
    return {
        "cpu": fields.get("model name") or platform.processor() or platform.machine(),
        "vendor": vendor or platform.machine(),
        "family_model": f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}",
        "simd": [f for f in SIMD_FLAGS if f in flags],
    }


def peak_rss() -> int:
    """This process's peak resident set in bytes since its exec: /proc/self/status's VmHWM, the
    peak of this address space. Not ru_maxrss: a child's starts at its parent's peak at fork
    (Linux keeps the old address space's peak across exec), so a fresh interpreter would report
    the peak of whatever its parent did before (bench --full writes a GGUF there)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux counts it in KiB


def readers(kernels: Kernels, buf: torch.Tensor) -> dict[str, Callable]:
    """The two readers of the fp32 buffer `buf`, by name: torch.sum, and the kernels' matvec over
    it as bf16 rows (4096 wide)."""
    rows, x = buf.view(torch.bfloat16).view(-1, 4096), torch.zeros(4096, dtype=torch.bfloat16)
    return {"torch.sum over fp32": buf.sum, f"{kernels.name} matvec over bf16 rows": lambda: kernels.matvec(rows, x)}


def read_bandwidth(kernels: Kernels, buf: torch.Tensor, bar) -> tuple[float, str]:
    """(GB/s, reader) of the faster of the two readers of the fp32 buffer `buf`."""
    seconds = round_robin(readers(kernels, buf), 5, bar)
    best = min(seconds, key=seconds.get)
    return nbytes(buf) / seconds[best] / 1e9, best


@dataclass(frozen=True)
class InRounds:
    """The read bandwidth measured inside a bench's own rounds: read_bandwidth's two readers, over
    a buffer larger than the caches, take their turns among the variants, and the faster one's
    median is the reading the rounds' shares are against. The bandwidth these shared machines
    give moves by up to 2x within a minute (a 40 s trace of torch.sum on a Zen 5 read 26 to 75
    GB/s, in spells of seconds), so a reading taken minutes before the rounds says more about that
    moment than about a kernel."""

    calls: dict  # {("read", reader name): the reader}
    nbytes: int

    @classmethod
    def over(cls, kernels: Kernels, size: int) -> "InRounds":
        """Readers of a new buffer of `size` bytes (whole 4096-wide bf16 rows)."""
        buf = torch.ones(max(1, size // 8192) * 2048)
        return cls({("read", name): fn for name, fn in readers(kernels, buf).items()}, nbytes(buf))

    def gbps(self, seconds: dict) -> float:
        """The reading from the rounds' median seconds by key (the readers' among them)."""
        return self.nbytes / min(seconds[key] for key in self.calls) / 1e9


def randomize_(model: nn.Module, std: float = 0.02) -> None:
    """Random weights in place: N(0, std) matrices, unit norm weights (fast, unlike HF init)."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std) if p.dim() > 1 else p.fill_(1.0)


def random_mlp(config: BambooConfig, dtype: torch.dtype) -> BambooMLP:
    with torch.device("meta"):
        mlp = BambooMLP(config, 0).to(dtype)
    mlp.to_empty(device="cpu")
    randomize_(mlp)
    return mlp

"""The whole benchmark in one run (the method: the bench package's docstring)."""

import sys

import torch
from tqdm import tqdm

from turbo_demo.bench.common import InRounds, Settings, cpu_info, read_bandwidth
from turbo_demo.bench.e2e import bench_e2e
from turbo_demo.bench.ffn import bench_ffn
from turbo_demo.bench.kernels import bench_kernels
from turbo_demo.bench.moe import bench_moe
from turbo_demo.checkpoints.config import dtype_name
from turbo_demo.runtime.kernels import Kernels, cpp, load_kernels


def read_buffer(s: Settings) -> torch.Tensor:
    """s.read_bytes of fp32 ones: a whole number of 4096-wide bf16 rows (read_bandwidth)."""
    return torch.ones(s.read_bytes // 8192 * 2048)


def bandwidth(kernels: Kernels, buf: torch.Tensor, desc: str, progress: bool) -> tuple[float, str]:
    """read_bandwidth over buf, behind a progress bar named desc."""
    bar = tqdm(total=5, desc=desc, file=sys.stderr, disable=not progress, leave=False)
    reading = read_bandwidth(kernels, buf, bar)
    bar.close()
    return reading


def run_bench(s: Settings, backend: str = "auto", progress: bool = True) -> dict:
    """The whole benchmark as one JSON-ready dict: machine, kernels, ffn, e2e and notes. The kernels are
    chosen once, for the whole run."""
    notes: list[str] = []
    kernels = load_kernels(backend, cpp.announce_build)
    if kernels.name == "torch" and backend == "auto":
        notes.append("C++ kernels unavailable (no compiler or a failed build): torch backend used")
    with torch.inference_mode():
        buf = read_buffer(s)
        gbps, method = bandwidth(kernels, buf, "read bandwidth", progress)
        machine = {
            **cpu_info(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "backend": kernels.name,
            "dtype": dtype_name(s.dtype),
            "read_gbps": gbps,
            "read_method": method,
        }
        # the kernel and decode rows' shares: against the bandwidth read in their own rounds
        reference = InRounds.over(kernels, s.working_set)
        kernel_rows = bench_kernels(s, kernels, reference, progress)
        ffn = bench_ffn(s, kernels, buf, progress)
        moe = bench_moe(s, kernels, buf, gbps, progress)
        del buf  # 1 GiB by default, not held while the models are
        e2e, phases = bench_e2e(s, kernels, reference, notes, progress)
        # again at the end: how far these shared machines drifted during the run (the moe rows'
        # limits are against the first reading)
        machine["read_gbps_at_end"] = bandwidth(kernels, read_buffer(s), "read bandwidth, again", progress)[0]
    notes.append(
        f"moe: {s.moe_layers} MoE layer(s) per step, each of {s.moe_experts} experts of "
        f"{s.ffn_shapes[0][0]}x{s.ffn_shapes[0][1]}, top-"
        f"{s.moe_top_k}, random weights, {s.moe_sparsity:.0%} in-expert sparsity, predictor rank {s.rank} per expert"
    )
    return {
        "machine": machine,
        "kernels": kernel_rows,
        "ffn": ffn,
        "moe": moe,
        "e2e": e2e,
        "prefill": [r for r in phases if r["phase"] == "prefill"],
        "request": [r for r in phases if r["phase"] == "request"],
        "notes": notes,
    }

"""The memory a model needs in this app, known before anything is allocated, and the guard.

From the safetensors headers alone (`headers.read_headers`), at the dtype the model will load in:

    weights   sum over tensors of numel * itemsize(load dtype)   (integer tensors as stored; a
              tied lm_head counted once)
    copies    what `runtime.packing.pack` copies: every layer's W_down (H, I) -> (I, H) and
              predictor fc2 (I, R) -> (R, I), numel * itemsize(load dtype) each
    kv_cache  one lean runtime's caches: 2 * layers * kv_heads * min(max_positions, 4096)
              * head_dim * itemsize(load dtype)
    slack     SLACK of the weights: the one tensor in flight during a load, buffers, allocator

A .bin-only checkpoint has no headers: its weights are its files' size, rescaled from the dtype
its config says it stores (half precision where unstated) to the load dtype, and its copies
W_down's shape from the config.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from turbo_demo.checkpoints.config import auto_dtype, dtype_name, load_config, stored_itemsize, weight_files
from turbo_demo.checkpoints.headers import read_headers
from turbo_demo.errors import UserError
from turbo_demo.runtime.lean import MAX_CONTEXT
from turbo_demo.runtime.quant import DOWN, block_nbytes, checkpoint_matrices, format_of, packed_shape

SLACK = 0.05
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
# What pack copies: W_down of every gated FFN (a MoE's: of every expert), and its predictor's
# fc2 where there is one.
COPIED = ("mlp.down_proj.weight", "predictor.fc2.weight")
COPIED_EXPERT = (".block_sparse_moe.experts.", ".w2.weight")  # a Mixtral expert's W_down


def is_copied(name: str) -> bool:
    return name.endswith(COPIED) or (COPIED_EXPERT[0] in name and name.endswith(COPIED_EXPERT[1]))


def human(n: float) -> str:
    """Bytes in decimal units, one decimal: 16.9 GB, 512.0 MB."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


@dataclass(frozen=True)
class Estimate:
    """Bytes a loaded, packed model takes, and one runtime on it (see the module docstring)."""

    name: str
    dtype: torch.dtype
    weights: int
    copies: int
    kv_cache: int
    quant: str | None = None  # "int8" / "int4": the matrices as blocks, the rest in dtype

    @property
    def slack(self) -> int:
        return int(SLACK * self.weights)

    @property
    def total(self) -> int:
        return self.weights + self.copies + self.kv_cache + self.slack

    def describe(self) -> str:
        kind = self.quant or dtype_name(self.dtype)
        return (
            f"{self.name} needs {human(self.total)} ({human(self.weights)} of {kind} weights"
            f" + {human(self.copies)} runtime copies + {human(self.kv_cache)} KV cache + {human(self.slack)} slack)"
        )


def kv_cache_bytes(config, itemsize: int) -> int:
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    positions = min(getattr(config, "max_position_embeddings", MAX_CONTEXT), MAX_CONTEXT)
    return 2 * layers * kv_heads * positions * head_dim * itemsize


def estimate(path: str | Path, dtype: torch.dtype | None = None, config=None, quant: str | None = None) -> Estimate:
    """What `path` needs loaded in `dtype` (None: the dtype `load_model` picks), from its headers;
    with quant ("int8", "int4"), as checkpoints/quantized.py loads it: each matrix quant.format_of
    names in its blocks (W_down and fc2 quantized in their neuron-major layout), copies: W_down
    once more in blocks as stored (quant.DOWN) and a tied LM head's quantized copy beside the
    float embedding; everything else in dtype."""
    path = Path(path)
    config = config if config is not None else load_config(path)
    dtype = dtype if dtype is not None else auto_dtype(path, config)
    itemsize = dtype.itemsize
    tensors = read_headers(path)
    if getattr(config, "tie_word_embeddings", False) and "model.embed_tokens.weight" in tensors:
        tensors.pop("lm_head.weight", None)  # one matrix, whatever the file holds
    if tensors and quant is not None:

        def size(name: str, t) -> tuple[int, int]:
            """(bytes as loaded, bytes of W_down's second blocks (quant.DOWN))."""
            if t.dtype not in FLOAT_DTYPES:
                return t.nbytes, 0
            total = rows = 0
            for part, m in checkpoint_matrices(name, torch.empty(t.shape, device="meta")):  # fused experts: each
                fmt = format_of(part, quant) if m.dim() == 2 else None
                total += m.numel() * itemsize if fmt is None else block_nbytes(packed_shape(part, m.shape), fmt)
                rows += block_nbytes(m.shape, fmt) if fmt is not None and part.endswith(DOWN) else 0
            return total, rows

        sizes = [size(name, t) for name, t in tensors.items()]
        weights = sum(s for s, _ in sizes)
        embed = tensors.get("model.embed_tokens.weight")
        tied = getattr(config, "tie_word_embeddings", False) and embed is not None
        head = block_nbytes(embed.shape, format_of("lm_head.weight", quant)) if tied else 0
        copies = sum(r for _, r in sizes) + head
    elif tensors:
        weights = sum(t.numel * itemsize if t.dtype in FLOAT_DTYPES else t.nbytes for t in tensors.values())
        copies = sum(t.numel * itemsize for name, t in tensors.items() if is_copied(name))
    else:
        stored = sum(f.stat().st_size for f in weight_files(path))
        weights = stored // stored_itemsize(config) * itemsize
        ffn = getattr(config, "intermediate_size", 0) * config.hidden_size
        copies = config.num_hidden_layers * ffn * itemsize
    kv = kv_cache_bytes(config, itemsize) if hasattr(config, "num_hidden_layers") else 0
    return Estimate(path.name, dtype, weights, copies, kv, quant)


def available_bytes(device_map: str | dict | None = None) -> int:
    """Memory a load can take now: the OS's available memory, and with a device map (accelerate
    fills the GPUs first, then the CPU) the free memory of every CUDA device as well."""
    free = psutil.virtual_memory().available
    if device_map is not None and torch.cuda.is_available():
        free += sum(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
    return free


def check_fits(need: Estimate, budget: int, what: str = "are available") -> None:
    """Raise a one-line UserError naming needed vs `budget` bytes when the model does not fit:
    "<need.describe()> but <budget> <what>"."""
    if need.total > budget:
        raise UserError(f"{need.describe()} but {human(budget)} {what}")


BUDGET_ENV = "TURBO_DEMO_MEMORY_BUDGET"
BUDGET_SHARE = 0.8


def default_budget() -> int:
    """TURBO_DEMO_MEMORY_BUDGET (GB) if set, else BUDGET_SHARE of the machine's memory less what
    this process already holds (the interpreter, torch, Gradio)."""
    given = os.environ.get(BUDGET_ENV, "").strip()
    if given:
        try:
            return int(float(given) * 1e9)
        except ValueError:
            raise UserError(f"{BUDGET_ENV}={given!r} is not a number of GB") from None
    return int(BUDGET_SHARE * psutil.virtual_memory().total) - psutil.Process().memory_info().rss

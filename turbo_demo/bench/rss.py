"""A load's peak RSS, measured (docs/your-own-models.md, "Memory"): `write_random_checkpoint`, then `measure_load`,
which loads it in a fresh interpreter (peak_rss is a process's lifetime peak) and reports the
peaks after loading, packing and reading every weight, beside what checkpoints/memory.py estimates."""

import json
import subprocess
import sys
from pathlib import Path

import psutil
import torch

from turbo_demo.bench.common import peak_rss
from turbo_demo.checkpoints.checkpoint import load_model
from turbo_demo.checkpoints.config import DTYPES, dtype_name
from turbo_demo.checkpoints.headers import read_headers
from turbo_demo.checkpoints.quantized import load_quantized
from turbo_demo.models.bamboo import BambooConfig, BambooForCausalLM
from turbo_demo.runtime.packing import pack


def write_random_checkpoint(out: str | Path, layers: int = 12) -> Path:
    """A random bf16 bamboo checkpoint of hidden 2048, FFN 7168, 12 layers: 785M parameters,
    1.57 GB, built on the meta device so that writing it holds one copy."""
    config = BambooConfig(
        hidden_size=2048, intermediate_size=7168, num_hidden_layers=layers, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, hidden_act="relu", tie_word_embeddings=False, dtype="bfloat16",
    )  # fmt: skip
    with torch.device("meta"):
        model = BambooForCausalLM(config)
    model.to_empty(device="cpu").to(torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=generator)
    model.save_pretrained(out)
    return Path(out)


def measure_here(path: str, dtype: str) -> dict:
    """Peak RSS above the RSS before the load (peak_rss: this process's lifetime peak, so only
    meaningful in a fresh process, as measure_load runs it) after load_model(path, dtype), after
    pack, and after reading every weight once (as decoding does: mapped pages come in)."""

    def peak() -> int:
        return peak_rss() - base

    base = psutil.Process().memory_info().rss
    model = load_model(path, DTYPES.get(dtype))
    figures = {"dtype": dtype_name(model.dtype), "load": peak()}
    packed = pack(model)
    figures["load_and_pack"] = peak()
    with torch.no_grad():
        for p in model.parameters():
            p.sum()
    figures["all_weights_read"] = peak()
    figures["weights"] = sum(p.numel() * p.element_size() for p in model.parameters())
    figures["copies"] = packed.owned_bytes
    return figures


def measure_quantized_here(path: str, quant: str) -> dict:
    """Peak RSS above the RSS before model/quantized.load_quantized(path, quant) (fresh process
    only, as measure_load runs it), the pack's bytes (blocks and the float tensors kept) and
    the largest float matrix (one layer's share of what streams through a load)."""
    base = psutil.Process().memory_info().rss
    packed = load_quantized(path, quant, torch.bfloat16)
    load = peak_rss() - base
    kept = sum(p.numel() * p.element_size() for p in packed.model.parameters() if not p.is_meta)
    largest = max(t.nbytes for t in read_headers(Path(path)).values())
    return {"quant": quant, "load": load, "quantized": packed.owned_bytes + kept, "largest_tensor": largest}


def measure_load(path: str | Path, dtype: str = "auto", quant: str | None = None) -> dict:
    """measure_here in a fresh interpreter: {"weights", "copies", "load", "load_and_pack",
    "all_weights_read"} in bytes, and "dtype"; with quant, measure_quantized_here."""
    call = f"measure_here({str(path)!r}, {dtype!r})"
    if quant is not None:
        call = f"measure_quantized_here({str(path)!r}, {quant!r})"
    code = f"import json; from turbo_demo.bench.rss import *; print(json.dumps({call}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])

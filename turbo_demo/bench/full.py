"""`bench --full`: the whole request at the paper's scale, never in CI (it writes 16 GB of shards
and needs about 12 GB of memory for int8).

A random checkpoint in TurboSparse-Mistral-7B's published layout (the shared reference's
published-formats.md: bamboo, 32 layers of 4096 x 14336, 32 / 8 heads, vocab 32064, a config
with no predictor rank, predictor ranks per layer from the tensor shapes, bf16 shards with an
index) is written to a temporary folder, then measured in a fresh process, so that its peak RSS
is the load's own:

    load     seconds to load it quantized at load (`quant`), peak RSS above the process's start
             against memory.estimate's total for it
    prefill  tokens/s of prompts of PREFILL_TOKENS tokens, dense and predictor (budget 0.1)
    request  a REQUEST_PROMPT-token prompt and REQUEST_TOKENS new tokens: TTFT, decode tokens/s,
             decoding on this process's threads and on one (app.py's choice on 2 cores)
    compare  the app's engine (run_compare on a ModelStore, runtimes warm) dense against
             predictor on that model, COMPARE_TOKENS new tokens: its wall seconds beside what the
             two sides' own prefill and decode steps took (the rest is the engine's: statistics,
             the recall audit, the neuron maps, detokenizing)
    versus   with peers: the same request, in PEER_ROUNDS rounds alternating our dense, our
             predictor and llama.cpp's dense decoding of the same weights at the same precision
             (a GGUF written from the shards: int8 as Q8_0, int4 as Q4_0), in its own process;
             each engine's best round, and predictor and dense over llama.cpp

The weights are random: their predictors do not predict anything, so predictor mode computes the
`budget` share of neurons with the highest scores, the speed the published model's 90% sparsity
gives, not its quality.
"""

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from turbo_demo.bench.common import MISTRAL_7B, cpu_info, peak_rss, published_ranks
from turbo_demo.bench.phases import (
    PEER_TYPE,
    PREFILL_TOKENS,
    REQUEST_PROMPT,
    REQUEST_TOKENS,
    prompt_ids,
    request_seconds,
)

LAYERS = 32
VOCAB = 32064
BUDGET = 0.1
PEER_ROUNDS = 3  # the first pays first calls (llama.cpp's page faults on its mmap'd file)
COMPARE_TOKENS = 16
LAYERS_PER_SHARD = 4
CONFIG = {  # as published (published-formats.md), no predictor rank or threshold
    "architectures": ["BambooForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_bamboo.BambooConfig",
        "AutoModel": "modeling_bamboo.BambooModel",
        "AutoModelForCausalLM": "modeling_bamboo.BambooForCausalLM",
    },
    "model_type": "bamboo",
    "hidden_act": "relu",
    "hidden_size": MISTRAL_7B["hidden_size"],
    "intermediate_size": MISTRAL_7B["intermediate_size"],
    "num_hidden_layers": LAYERS,
    "num_attention_heads": MISTRAL_7B["num_attention_heads"],
    "num_key_value_heads": MISTRAL_7B["num_key_value_heads"],
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "max_position_embeddings": 32768,
    "vocab_size": VOCAB,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "transformers_version": "4.41.0",
}


def layer_tensors(config: dict, i: int, rank: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Layer i's tensors under the published names, random N(0, 0.02) bf16, unit norms."""
    h, n = config["hidden_size"], config["intermediate_size"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    shapes = {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (n, h),
        "mlp.up_proj": (n, h),
        "mlp.down_proj": (h, n),
        "mlp.predictor.fc1": (rank, h),
        "mlp.predictor.fc2": (n, rank),
    }
    out = {f"model.layers.{i}.{name}.weight": random_bf16(shape, gen) for name, shape in shapes.items()}
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[f"model.layers.{i}.{norm}.weight"] = torch.ones(h, dtype=torch.bfloat16)
    return out


def random_bf16(shape: tuple, gen: torch.Generator) -> torch.Tensor:
    return torch.empty(shape).normal_(0, 0.02, generator=gen).to(torch.bfloat16)


def write_published(path: Path, config: dict = CONFIG, progress=print) -> Path:
    """The checkpoint (see the module docstring; other sizes with another `config`) in `path`, a
    shard of LAYERS_PER_SHARD layers at a time (memory holds one shard), predictor ranks
    published_ranks(layers), a byte-level tokenizer."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from turbo_demo.checkpoints.gguf_export import byte_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(0)
    n, hidden, vocab = config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]
    ranks = published_ranks(n)
    shards = [range(s, min(n, s + LAYERS_PER_SHARD)) for s in range(0, n, LAYERS_PER_SHARD)]
    weight_map, total = {}, 0
    for k, layers in enumerate(shards):
        tensors = {name: t for i in layers for name, t in layer_tensors(config, i, ranks[i], gen).items()}
        if k == 0:
            tensors["model.embed_tokens.weight"] = random_bf16((vocab, hidden), gen)
        if k == len(shards) - 1:
            tensors["lm_head.weight"] = random_bf16((vocab, hidden), gen)
            tensors["model.norm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, path / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, file)
        total += sum(t.nbytes for t in tensors.values())
        progress(f"wrote {file} ({total / 1e9:.1f} GB so far)")
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    byte_level = byte_tokenizer()["model"]  # the 256 byte symbols, as the bench's GGUF files have
    tokenizer = Tokenizer(models.BPE(vocab=byte_level["vocab"], merges=[tuple(m) for m in byte_level["merges"]]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    eos = "<|endoftext|>"
    tokenizer.add_special_tokens([eos])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos, bos_token=eos, pad_token=eos).save_pretrained(
        path
    )
    return path


def seconds(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def measure(path: str, quant: str, backend: str, also: str | None = None, gguf: str | None = None) -> dict:
    """Every measurement of the module docstring on the checkpoint at `path`, in this process
    (a fresh one: the peak RSS is this process's own, peak_rss). also: "module:function",
    called last as function(path, quant, kernels) with the model freed, its result under "compare"
    (the CLI passes the app's compare timing, which this layer does not import). gguf: the same
    weights as llama.cpp's file (write_peer_gguf), for "versus"."""
    import gc
    import importlib

    import psutil

    from turbo_demo.checkpoints.memory import estimate
    from turbo_demo.checkpoints.quantized import load_quantized
    from turbo_demo.runtime import LeanRuntime, load_kernels
    from turbo_demo.runtime.kernels import cpp

    kernels = load_kernels(backend, cpp.announce_build, prefill_threads=torch.get_num_threads())
    need = estimate(path, torch.bfloat16, None, quant)
    base = psutil.Process().memory_info().rss
    start = time.perf_counter()
    packed = load_quantized(path, quant, torch.bfloat16)
    load_s = time.perf_counter() - start
    peak = peak_rss() - base
    config = packed.model.config
    result = {
        "model": "published-7b" if config.num_hidden_layers == LAYERS else f"published-{config.num_hidden_layers}",
        "layers": config.num_hidden_layers,
        "quant": quant,
        "machine": cpu_info(),
        "threads": torch.get_num_threads(),
        "predictor_ranks": [config.rank_of(i) for i in range(config.num_hidden_layers)],
        "budget": BUDGET,
        "load": {"seconds": load_s, "peak_rss": peak, "estimate": need.total, "peak_vs_estimate": peak / need.total},
        "warm_up_s": {},
        "prefill": [],
        "request": [],
    }
    runtimes = {}
    for mode, options in (("dense", {}), ("predictor", {"budget": BUDGET})):
        runtimes[mode] = LeanRuntime(packed, mode, kernels, **options)
        measure_mode(runtimes[mode], mode, config.vocab_size, result)
    if gguf is not None:
        result["versus"] = versus_llama_cpp(runtimes, Path(gguf), PEER_TYPE[quant], config.vocab_size)
    del runtimes, packed
    gc.collect()
    if also:
        module, function = also.split(":")
        result["compare"] = getattr(importlib.import_module(module), function)(path, quant, kernels)
    return result


def measure_mode(runtime, mode: str, vocab: int, result: dict) -> None:
    """The warm-up, prefill and request rows of one runtime (its mode `mode`), into `result`."""
    from turbo_demo.runtime.decoder import torch_threads

    result["warm_up_s"][mode] = seconds(runtime.warm_up)
    for n in PREFILL_TOKENS:
        ids = torch.tensor(prompt_ids(n, vocab))
        s = min(seconds(runtime.prefill, ids) for _ in range(2))
        result["prefill"].append({"engine": mode, "prompt_tokens": n, "seconds": s, "tokens_per_s": n / s})
    # at this process's threads, and decoding on one (app.py's policy on a 2-core machine: the
    # other core is the web server's; the prompt still runs on every core)
    for threads in dict.fromkeys((torch.get_num_threads(), 1)):
        with torch_threads(threads):
            ttft, total = request_seconds(
                runtime.generate(prompt_ids(REQUEST_PROMPT, vocab), REQUEST_TOKENS, warm_up=0)
            )
        rate = (REQUEST_TOKENS - 1) / (total - ttft)
        result["request"].append(
            {"engine": mode, "decode_threads": threads, "prompt_tokens": REQUEST_PROMPT,
             "new_tokens": REQUEST_TOKENS, "ttft_s": ttft, "decode_tokens_per_s": rate, "total_s": total}
        )  # fmt: skip


def versus_llama_cpp(runtimes: dict, gguf: Path, qtype: str, vocab: int) -> dict:
    """The request of `measure_mode` at this process's threads, PEER_ROUNDS rounds alternating
    our runtimes (by mode) and llama.cpp on `gguf` (its type `qtype`) in its own process: each
    engine's best round, and each of ours over llama.cpp. A llama.cpp that fails is a note."""
    from turbo_demo.bench.peers import LLAMA_CPP_CONTEXT, LLAMA_CPP_NOTE, llama_cpp_build, start_llama_cpp
    from turbo_demo.bench.process import PeerFailed

    try:
        import llama_cpp
    except ImportError:
        return {"notes": ["llama.cpp left out: llama-cpp-python is not installed"]}
    threads, notes, prompt = torch.get_num_threads(), [], prompt_ids(REQUEST_PROMPT, vocab)
    worker = start_llama_cpp(gguf, qtype, threads, LLAMA_CPP_CONTEXT, notes)
    engines = {mode: lambda r=r: r.generate(prompt, REQUEST_TOKENS, warm_up=0) for mode, r in runtimes.items()}
    if worker is not None:
        engines[f"llama.cpp {qtype}"] = lambda: worker.stream("tokens", prompt, REQUEST_TOKENS)
    best: dict[str, dict] = {}
    for _ in range(PEER_ROUNDS):
        for engine, tokens in list(engines.items()):
            try:
                ttft, total = request_seconds(tokens())
            except PeerFailed:  # a crash mid-run: its note is in `notes` (on_failure)
                engines.pop(engine)
                best.pop(engine, None)
                continue
            rate = (REQUEST_TOKENS - 1) / (total - ttft)
            if engine not in best or rate > best[engine]["decode_tokens_per_s"]:
                best[engine] = {"engine": engine, "ttft_s": ttft, "decode_tokens_per_s": rate, "total_s": total}
    if worker is not None:
        worker.close()
        notes.append(LLAMA_CPP_NOTE.format(version=llama_cpp.__version__, build=llama_cpp_build(), threads=threads))
    peer = best.get(f"llama.cpp {qtype}")
    ratios = {} if peer is None else {
        f"{mode}_over_llama_cpp": best[mode]["decode_tokens_per_s"] / peer["decode_tokens_per_s"] for mode in runtimes
    }  # fmt: skip
    return {"threads": threads, "prompt_tokens": REQUEST_PROMPT, "new_tokens": REQUEST_TOKENS,
            "rounds": PEER_ROUNDS, "rows": list(best.values()), **ratios, "notes": notes}  # fmt: skip


def write_peer_gguf(path: Path, qtype: str) -> Path:
    """llama.cpp's file of the checkpoint at `path` in `qtype`, streamed tensor by tensor from its
    shards by export-gguf's writer, beside them (a kept folder reuses it); a file cut short is
    never taken for a finished one."""
    import os
    from contextlib import ExitStack

    from safetensors import safe_open

    from turbo_demo.bench.peers import tokenizer_of
    from turbo_demo.checkpoints.config import load_config
    from turbo_demo.checkpoints.gguf_export import write_gguf

    dst = path / f"llama-cpp-{qtype}.gguf"
    if dst.is_file():
        return dst
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    with ExitStack() as stack:
        files = {f: stack.enter_context(safe_open(path / f, "pt")) for f in set(weight_map.values())}
        shapes = {name: tuple(files[f].get_slice(name).get_shape()) for name, f in weight_map.items()}
        part = write_gguf(
            path / f"{dst.name}.part", load_config(path), shapes, lambda name: files[weight_map[name]].get_tensor(name),
            tokenizer_of(path), qtype,
        )  # fmt: skip
    os.replace(part, dst)
    return dst


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_full(
    quant: str = "int8", backend: str = "auto", keep: Path | None = None, also: str | None = None, peers: bool = False
) -> dict:
    """Write the checkpoint (into `keep`, where it is reused if already there; else a temporary
    folder, removed afterwards), with peers its GGUF file for llama.cpp, and measure it in a
    fresh process (`measure`)."""
    with tempfile.TemporaryDirectory(prefix="turbo-demo-7b-") as tmp:
        path = keep or Path(tmp) / "published-7b"
        if not (path / "model.safetensors.index.json").is_file():
            start = time.perf_counter()
            write_published(path, CONFIG, say)
            say(f"checkpoint written in {time.perf_counter() - start:.0f} s")
        gguf = None
        if peers:
            start = time.perf_counter()
            gguf = str(write_peer_gguf(path, PEER_TYPE[quant]))
            say(f"{gguf} ready in {time.perf_counter() - start:.0f} s")
        code = (
            "import json; from turbo_demo.bench.full import measure; "
            f"print(json.dumps(measure({str(path)!r}, {quant!r}, {backend!r}, {also!r}, {gguf!r})))"
        )
        out = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"the measuring process failed (exit {out.returncode}); its stderr is above")
        return json.loads(out.stdout.strip().splitlines()[-1])

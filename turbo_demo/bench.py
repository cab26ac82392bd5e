"""`python -m turbo_demo bench`: the speed of the sparse FFN and of batch-1 decoding, measured.

    machine  read_gbps: memory read bandwidth, the faster of two readers of one large buffer
             (torch.sum over it as fp32, or the C++ matvec over it as bf16 rows)
    ffn      ms of one FFN step (batch 1) per mode and sparsity, through the product's FFN
             classes on synthetic dReLU layers, and of the transformers MLP module's own
             forward (PyTorch's GEMVs, HF's weight layout) as the reference users start from;
             speedup = dense ms / mode ms and speedup_vs_transformers = transformers ms /
             mode ms, at the same shape and sparsity
    e2e      tokens/s of decoding per engine: transformers' model.generate, and the lean Runtime
             in the dense, exact and predictor modes, on a Mistral-7B-shaped stack of random
             layers and on the shipped dReLU checkpoint (in the benchmark's dtype, and in fp32,
             the dtype the app runs it in), with
             bandwidth_share = (weight bytes read per token / read bandwidth) / seconds per token
             (above 1 where the weights partly fit in the caches, as a small model's do),
             sparsity = the share of FFN neurons whose rows were skipped (1 - computed share)
             and stats_share = the time to build one step's statistics (a LayerRecord per
             layer and the StepStats; the counts in them come from the kernels' own loops) /
             seconds per token, for the lean engines, whose statistics are always on

Fairness. Every number is a median over rounds in which the compared variants take turns, in an
order that rotates each round, so that a slow spell of the machine hits them alike. Caches do
not flatter: the FFN layers cycle through copies adding up to at least `working_set` bytes,
every FFN step gets a fresh input, hence a fresh set of neurons, and each round of FFN steps
starts after reading the `read_bytes` buffer, which evicts the weights (and writes back the
sign flips below, which would otherwise eat into the bandwidth of the timed steps).

Synthetic activity. For the input x of an FFN step, rows of W_gate and W_up are negated (which
negates their outputs exactly) so that h = relu(W_gate x) * relu(W_up x) is non-zero on exactly
the neurons wanted: in exact mode a random (1 - sparsity) share of them; in predictor mode all
of them, so that every neuron the predictor picks (its `budget` = 1 - sparsity best scores) is
truly active and down reads all of their rows, the worst case.
"""

import platform
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from math import ceil
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm
from transformers import GenerationConfig

from turbo_demo.checkpoint import DTYPES, dtype_name
from turbo_demo.errors import UserError
from turbo_demo.modeling_bamboo import BambooConfig, BambooForCausalLM, BambooMLP
from turbo_demo.runtime import cpp, kernels
from turbo_demo.runtime.engine import Runtime
from turbo_demo.runtime.ffn import make_ffn
from turbo_demo.runtime.stats import LayerRecord, StepStats

FFN_MODES = ("transformers", "dense", "exact", "predictor")
ENGINES = ("transformers", "dense", "exact", "predictor")
MISTRAL_7B = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
              "num_key_value_heads": 8, "vocab_size": 32000}
EMBEDDED = Path(__file__).resolve().parent.parent / "assets" / "models" / "turbosparse-drelu"
PROMPT = [1]  # one token, so that every engine decodes every new token with a one-token forward


@dataclass
class Settings:
    dtype: torch.dtype = torch.bfloat16
    read_bytes: int = 1 << 30
    ffn_shapes: tuple = ((4096, 14336), (1024, 4096))  # (hidden, intermediate)
    sparsities: tuple = (0.5, 0.8, 0.9, 0.95, 0.97)
    ffn_rounds: int = 9
    working_set: int = 768 << 20  # bytes of FFN weights cycled through: more than the caches hold
    rank: int = 256  # predictor rank, FFN and 7b-shape stack alike
    stack: dict = field(default_factory=lambda: dict(MISTRAL_7B))
    stack_layers: int = 8
    stack_budget: float = 0.1  # the 7b-shape predictor computes this share of neurons
    stack_tokens: int = 6
    embedded: Path | None = EMBEDDED
    embedded_tokens: int = 48
    e2e_rounds: int = 5


def settings_for(quick: bool = False, dtype: str = "bf16") -> Settings:
    """The full benchmark (a few minutes), or a quick one (under a minute, noisier)."""
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    settings = Settings(dtype=DTYPES[dtype])
    if quick:
        settings = replace(settings, ffn_rounds=3, stack_layers=2, stack_tokens=3, embedded_tokens=16,
                           e2e_rounds=2, working_set=512 << 20)
    return settings


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def rotated(items, turn: int) -> list:
    return [items[(i + turn) % len(items)] for i in range(len(items))]


def round_robin(calls: dict, rounds: int, bar) -> dict[str, float]:
    """Median seconds per call of each callable: one untimed warm-up call each, then `rounds`
    rounds that call each once, in an order rotating every round."""
    for fn in calls.values():
        fn()
    times = defaultdict(list)
    for turn in range(rounds):
        for name in rotated(list(calls), turn):
            times[name].append(timed(calls[name]))
        bar.update()
    return {name: statistics.median(t) for name, t in times.items()}


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def read_bandwidth(buf: torch.Tensor, bar) -> tuple[float, str]:
    """(GB/s, reader) of the faster of two readers of the fp32 buffer `buf`."""
    readers = {"torch.sum over fp32": buf.sum}
    if kernels.backend() == "cpp":
        rows, x = buf.view(torch.bfloat16).view(-1, 4096), torch.zeros(4096, dtype=torch.bfloat16)
        readers["C++ matvec over bf16 rows"] = lambda: kernels.matvec(rows, x)
    seconds = round_robin(readers, 5, bar)
    best = min(seconds, key=seconds.get)
    return nbytes(buf) / seconds[best] / 1e9, best


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


def shape_activity(mlp: BambooMLP, x: torch.Tensor, active: torch.Tensor) -> None:
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
    """The transformers MLP module's forward on one token, with the FFN classes' step signature."""

    def __init__(self, mlp: BambooMLP):
        self.mlp = mlp

    def step(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return self.mlp(x.view(1, 1, -1)).view(-1)


def bench_ffn(s: Settings, flush: torch.Tensor, progress: bool) -> list[dict]:
    """One FFN step per mode and sparsity, per shape; dense and sparse steps interleaved."""
    results = []
    for hidden, inter in s.ffn_shapes:
        config = BambooConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=1,
                              num_key_value_heads=1, predictor_rank=s.rank)
        layer_bytes = 3 * hidden * inter * torch.finfo(s.dtype).bits // 8
        copies = [random_mlp(config, s.dtype) for _ in range(max(2, ceil(s.working_set / layer_bytes)))]
        # the transformers module keeps HF's (H, I) W_down: make_ffn never sees these copies
        hf_copies = [random_mlp(config, s.dtype) for _ in range(2)]
        gen = torch.Generator().manual_seed(0)
        times, turn = defaultdict(list), 0
        bar = tqdm(total=s.ffn_rounds * len(s.sparsities), desc=f"ffn {hidden}x{inter}",
                   file=sys.stderr, disable=not progress, leave=False)
        for rnd in range(s.ffn_rounds):
            for sparsity in s.sparsities:
                x, r = (torch.randn(hidden, generator=gen).to(s.dtype) for _ in range(2))
                active = torch.zeros(inter, dtype=torch.bool)
                active[torch.randperm(inter, generator=gen)[:round((1 - sparsity) * inter)]] = True
                # three consecutive copies; with only two, dense shares one (its state is irrelevant)
                dense_mlp, exact_mlp, pred_mlp = (copies[(turn + j) % len(copies)] for j in (2, 0, 1))
                turn += 3
                shape_activity(exact_mlp, x, active)
                shape_activity(pred_mlp, x, torch.ones_like(active))
                hf_mlp = hf_copies[turn % len(hf_copies)]
                ffns = {"transformers": HFStep(hf_mlp),
                        "dense": make_ffn("dense", dense_mlp, config, 0),
                        "exact": make_ffn("exact", exact_mlp, config, 0),
                        "predictor": make_ffn("predictor", pred_mlp, config, 0, budget=1 - sparsity)}
                if rnd == 0 and sparsity == s.sparsities[0]:
                    for ffn in ffns.values():  # untimed first calls (lazy set-up, first touches)
                        ffn.step(x, r)
                flush.sum()
                for mode in rotated(FFN_MODES, rnd):
                    times[mode, sparsity].append(timed(ffns[mode].step, x, r))
                bar.update()
        bar.close()
        del copies, hf_copies
        for sparsity in s.sparsities:
            dense, hf = (statistics.median(times[mode, sparsity]) for mode in ("dense", "transformers"))
            for mode in FFN_MODES:
                seconds = statistics.median(times[mode, sparsity])
                results.append({"shape": f"{hidden}x{inter}", "mode": mode, "sparsity": sparsity,
                                "ms": seconds * 1e3, "speedup": dense / seconds,
                                "speedup_vs_transformers": hf / seconds})
    return results


def random_stack(s: Settings) -> BambooForCausalLM:
    """The 7b-shape model: Mistral-7B's layer shapes, `stack_layers` layers, random weights."""
    config = BambooConfig(**s.stack, num_hidden_layers=s.stack_layers, predictor_rank=s.rank,
                          max_position_embeddings=256, sliding_window=None, tie_word_embeddings=False)
    with torch.device("meta"):
        model = BambooForCausalLM(config).to(s.dtype)
    model.to_empty(device="cpu")
    randomize_(model)
    model.model.rotary_emb = type(model.model.rotary_emb)(config)  # a computed buffer
    return model.eval()


def transformers_twin(model: BambooForCausalLM) -> BambooForCausalLM:
    """A model sharing `model`'s weight tensors except W_down, which it keeps in HF's (H, I)
    layout: the lean runtime re-lays W_down out neuron-major in place, which would slow
    transformers' own forward and make the comparison unfair."""
    with torch.device("meta"):
        twin = type(model)(model.config).to(model.dtype)
    twin.load_state_dict(model.state_dict(), assign=True)
    for layer in twin.model.layers:
        w = layer.mlp.down_proj.weight.detach()
        layer.mlp.down_proj.weight = nn.Parameter(w.clone(memory_format=torch.contiguous_format),
                                                  requires_grad=False)
    twin.model.rotary_emb = type(model.model.rotary_emb)(model.config)
    return twin.eval()


def stats_seconds(runtime: Runtime, reps: int = 2000) -> float:
    """Seconds to build one decode step's statistics from the runtime's last layer records, as
    generate() does: a LayerRecord per layer (the FFN step's part) and the StepStats."""
    records = [ffn.record for ffn in runtime.ffns]

    def build():
        rebuilt = [LayerRecord(computed=r.computed, active=r.active, bytes=r.bytes) for r in records]
        StepStats.from_records(0, 0, 0.0, rebuilt, runtime.ffns[0].n, runtime.dense_ffn_bytes)

    return timed(lambda: [build() for _ in range(reps)]) / reps


def bench_model(label: str, model, predictor: dict | None, tokens: int, s: Settings, gbps: float,
                progress: bool) -> list[dict]:
    """tokens/s of each engine decoding `tokens` tokens after a one-token prompt."""
    twin = transformers_twin(model)
    generation = GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                  pad_token_id=0)
    modes = {"dense": {}, "exact": {}, **({"predictor": predictor} if predictor is not None else {})}
    runtimes = {mode: Runtime(model, mode, **options) for mode, options in modes.items()}
    steps = defaultdict(list)

    def decode(mode):
        steps[mode].extend(runtimes[mode].generate(PROMPT, tokens))

    calls = {"transformers": lambda: twin.generate(torch.tensor([PROMPT]), generation_config=generation),
             **{mode: lambda mode=mode: decode(mode) for mode in runtimes}}
    bar = tqdm(total=s.e2e_rounds, desc=f"e2e {label}", file=sys.stderr, disable=not progress, leave=False)
    seconds = round_robin(calls, s.e2e_rounds, bar)
    bar.close()
    # weights read per token besides the FFN's: attention projections and the LM head
    other = nbytes(model.lm_head.weight) + sum(
        nbytes(p) for layer in model.model.layers for p in layer.self_attn.parameters())
    dense_ffn = runtimes["dense"].dense_ffn_bytes
    stats_cost = {mode: stats_seconds(runtime) for mode, runtime in runtimes.items()}
    results = []
    for engine in ENGINES:
        if engine not in seconds:
            continue
        per_token = seconds[engine] / tokens
        if engine == "transformers":
            ffn_bytes, sparsity, stats_share = dense_ffn, None, None
        else:
            ffn_bytes = statistics.mean(st.ffn_bytes for st in steps[engine])
            sparsity = 1 - statistics.mean(c for st in steps[engine] for c in st.computed_share)
            stats_share = stats_cost[engine] / per_token
        results.append({"model": label, "dtype": dtype_name(model.dtype),
                        "engine": engine, "tokens_per_s": 1 / per_token,
                        "sparsity": sparsity,
                        "bandwidth_share": (other + ffn_bytes) / (gbps * 1e9) / per_token,
                        "speedup_vs_dense": seconds["dense"] / seconds[engine],
                        "stats_share": stats_share})
    return results


def bench_e2e(s: Settings, gbps: float, notes: list[str], progress: bool) -> list[dict]:
    results = bench_model("7b-shape", random_stack(s), {"budget": s.stack_budget}, s.stack_tokens, s,
                          gbps, progress)
    notes.append(f"7b-shape: {s.stack_layers} layers of Mistral-7B's shape, random weights, "
                 f"predictor rank {s.rank} computing {s.stack_budget:.0%} of the neurons")
    if s.embedded is None or not (Path(s.embedded) / "config.json").is_file():
        notes.append(f"embedded-drelu skipped: no checkpoint at {s.embedded}")
        return results
    from turbo_demo.checkpoint import auto_dtype, load_config, load_model

    app_dtype = auto_dtype(Path(s.embedded), load_config(s.embedded))  # as the app loads it
    for dtype in dict.fromkeys((s.dtype, app_dtype)):
        model = load_model(s.embedded, dtype)
        predictor = {} if model.config.predictor_rank else None
        results += bench_model("embedded-drelu", model, predictor, s.embedded_tokens, s, gbps, progress)
    if predictor is None:
        notes.append("embedded-drelu: no predictors in the checkpoint (run `python -m turbo_demo "
                     "predictors`), predictor engine skipped")
    notes.append(f"embedded-drelu: in {dtype_name(s.dtype)} and in "
                 f"{dtype_name(app_dtype)}, the dtype the app runs it in")
    return results


def run_bench(s: Settings, backend: str = "auto", progress: bool = True) -> dict:
    """The whole benchmark as one JSON-ready dict: machine, ffn, e2e and notes."""
    notes: list[str] = []
    previous = kernels.backend()
    if kernels.select_backend(backend, cpp.announce_build) == "torch" and backend == "auto":
        notes.append("C++ kernels unavailable (no compiler or a failed build): torch backend used")
    try:
        with torch.inference_mode():
            buf = torch.ones(s.read_bytes // 8192 * 2048)  # a whole number of 4096-wide bf16 rows
            bar = tqdm(total=5, desc="read bandwidth", file=sys.stderr, disable=not progress, leave=False)
            gbps, method = read_bandwidth(buf, bar)
            bar.close()
            machine = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "backend": kernels.backend(), "dtype": dtype_name(s.dtype),
                       "read_gbps": gbps, "read_method": method}
            ffn = bench_ffn(s, buf, progress)
            del buf
            e2e = bench_e2e(s, gbps, notes, progress)
    finally:
        kernels.use_backend(previous)
    return {"machine": machine, "ffn": ffn, "e2e": e2e, "notes": notes}


def format_table(result: dict) -> str:
    m = result["machine"]
    lines = [f"{m['cpu']}, {m['threads']} threads, torch {m['torch']}, {m['backend']} kernels, {m['dtype']}",
             f"read bandwidth {m['read_gbps']:.1f} GB/s ({m['read_method']})", "",
             "FFN step, batch 1: ms (speed-up vs our dense; predictor also vs transformers)",
             f"{'shape':<12}{'sparsity':>9}" + "".join(f"{mode:>20}" for mode in FFN_MODES)
             + f"{'predictor vs tf':>17}"]
    rows = defaultdict(dict)
    for e in result["ffn"]:
        rows[e["shape"], e["sparsity"]][e["mode"]] = e
    for (shape, sparsity), modes in rows.items():
        cells = (f"{modes[mode]['ms']:.2f} ({modes[mode]['speedup']:.2f}x)" for mode in FFN_MODES)
        lines.append(f"{shape:<12}{sparsity:>9.2f}" + "".join(f"{c:>20}" for c in cells)
                     + f"{modes['predictor']['speedup_vs_transformers']:>16.2f}x")
    lines += ["", "Decoding, batch 1",
              f"{'model':<16}{'dtype':<10}{'engine':<14}{'tokens/s':>10}{'sparsity':>10}{'bandwidth':>11}"
              f"{'vs dense':>10}{'stats':>8}"]
    for e in result["e2e"]:
        sparsity = "-" if e["sparsity"] is None else f"{e['sparsity']:.2f}"
        stats = "-" if e["stats_share"] is None else f"{e['stats_share']:.1%}"
        lines.append(f"{e['model']:<16}{e['dtype']:<10}{e['engine']:<14}{e['tokens_per_s']:>10.2f}{sparsity:>10}"
                     f"{e['bandwidth_share']:>11.0%}{e['speedup_vs_dense']:>9.2f}x{stats:>8}")
    lines += [""] + [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)

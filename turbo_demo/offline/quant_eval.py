"""What quantization costs a model, measured on the runtime that decodes it:
`python -m turbo_demo eval MODEL_DIR --quant int8,int4 --json`.

For the model as loaded and for each block format (runtime/quant.py), through the lean runtime
and the kernels the app uses, teacher-forced on held-out tokens in windows of `window` tokens
(each window decoded from an empty cache, one token per step):

    perplexity          exp(mean NLL of the next token), dense mode
    sparsity            share of FFN neurons with h = 0 in dense mode (all layers)
    predictor_recall    mean over steps and layers of the share of truly active neurons the
                        predictor computed (predictor mode, where the model has predictors)
    predicted_sparsity  1 - the share it computed
    agreement           per mode: share of positions where the greedy continuation (`new`
                        tokens after each of `prompts` held-out prompts of 16 tokens) equals the
                        float model's in the same mode, position by position (free-running: after
                        a first difference the two texts usually part)
    forced_agreement    per mode: share of those positions where, fed the float model's
                        continuation so far, the quantized runtime's greedy token is the float's

The perplexities are those of this runtime's token-by-token decoding over `window`-token
windows, comparable with each other, not with `eval`'s batched forward over longer windows.
"""

import itertools
import math

import torch

from turbo_demo.checkpoints.checkpoint import load_model, load_tokenizer
from turbo_demo.checkpoints.quantized import load_quantized
from turbo_demo.choices import modes_for
from turbo_demo.offline.evaluate import eval_tokens
from turbo_demo.runtime import LeanRuntime, pack
from turbo_demo.runtime.kernels import Kernels, load_kernels
from turbo_demo.runtime.packing import ffn_parts
from turbo_demo.runtime.stats import share


def modes_of(packed) -> list[str]:
    """The modes measured here: those the model supports (choices.modes_for) but threshold, which
    has no threshold to compare at until one is given or calibrated."""
    # predictors its config may not declare: a PowerInfer folder's, attached at load
    attached = ffn_parts(packed.ffns)[0].fc1 is not None  # a MoE layer's: its first expert's
    return [m for m in modes_for(packed.model.config, attached) if m != "threshold"]


@torch.inference_mode()
def teacher_forced(packed, mode: str, tokens: torch.Tensor, window: int, kernels: Kernels) -> dict:
    """Mean NLL, computed share and recall of `mode` over `tokens`, window by window."""
    runtime = LeanRuntime(packed, mode, kernels)
    nll, count, computed, active, recall, recalls = 0.0, 0, 0, 0, 0.0, 0
    neurons = sum(w.n for w in packed.ffns)
    for start in range(0, tokens.numel() - 1, window):
        seq = tokens[start : start + window + 1].tolist()
        runtime.reset()
        for current, target in itertools.pairwise(seq):
            logits, records = runtime.decode(current)
            nll -= float(torch.log_softmax(logits.float(), -1)[target])
            count += 1
            computed += sum(r.computed for r in records)
            active += sum(r.active for r in records)
            for m, r in zip(runtime.modes, records):
                value = share(m.recall(r))  # a MoE layer's: over its chosen experts
                if value is not None:
                    recall, recalls = recall + value, recalls + 1
    return {
        "nll": nll / count,
        "tokens": count,
        "computed_share": computed / (count * neurons),
        "active_share": active / (count * neurons),
        "recall": recall / recalls if recalls else None,
    }


@torch.inference_mode()
def continuations(packed, mode: str, prompts: list[list[int]], new: int, kernels: Kernels) -> list[list[int]]:
    runtime = LeanRuntime(packed, mode, kernels)
    return [[s.token for s in runtime.generate(p, new, warm_up=0)] for p in prompts]


@torch.inference_mode()
def forced(packed, mode: str, prompts: list[list[int]], reference: list[list[int]], kernels: Kernels) -> float:
    """Share of positions where the argmax after the prompt and reference[:i] is reference[i]."""
    runtime = LeanRuntime(packed, mode, kernels)
    hits = total = 0
    for prompt, cont in zip(prompts, reference):
        runtime.prefill(torch.tensor(prompt[:-1]))
        for token, expected in zip([prompt[-1], *cont[:-1]], cont):
            hits += kernels.argmax(runtime.decode(token)[0]) == expected
            total += 1
    return hits / total


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for p, q in zip(a, b) for x, y in zip(p, q)]
    return sum(x == y for x, y in pairs) / len(pairs)


def quant_quality(
    model_dir: str,
    quants=("int8", "int4"),
    max_tokens: int = 16384,
    window: int = 256,
    prompts: int = 8,
    new: int = 32,
    backend: str = "auto",
) -> dict:
    """The table of the module docstring for the model as loaded and each of `quants`."""
    kernels = load_kernels(backend)
    tokenizer = load_tokenizer(model_dir)
    tokens, source = eval_tokens(tokenizer, None)
    tokens = tokens[: max_tokens + 1]
    step = (tokens.numel() - 16) // prompts
    prompt_ids = [tokens[i * step : i * step + 16].tolist() for i in range(prompts)]
    base = pack(load_model(model_dir))
    packs = {"float": base, **{q: load_quantized(model_dir, q, base.model.dtype) for q in quants}}
    modes = modes_of(base)
    reference = {mode: continuations(base, mode, prompt_ids, new, kernels) for mode in modes}
    rows = []
    for name, packed in packs.items():
        dense = teacher_forced(packed, "dense", tokens, window, kernels)
        row = {
            "weights": name,
            "perplexity": math.exp(dense["nll"]),
            "sparsity": 1 - dense["active_share"],
            "predictor_recall": None,
            "predicted_sparsity": None,
            "agreement": {mode: agreement(continuations(packed, mode, prompt_ids, new, kernels), reference[mode])
                          for mode in modes},
            "forced_agreement": {mode: forced(packed, mode, prompt_ids, reference[mode], kernels) for mode in modes},
        }  # fmt: skip
        if "predictor" in modes:
            predicted = teacher_forced(packed, "predictor", tokens[: max_tokens // 4 + 1], window, kernels)
            row["predictor_recall"] = predicted["recall"]
            row["predicted_sparsity"] = 1 - predicted["computed_share"]
        rows.append(row)
    return {
        "model": str(model_dir),
        "text": source,
        "tokens": dense["tokens"],
        "window": window,
        "dtype": str(base.model.dtype).removeprefix("torch."),
        "backend": kernels.name,
        "prompts": prompts,
        "new_tokens": new,
        "rows": rows,
    }

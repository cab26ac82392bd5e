"""`python -m turbo_demo generate`: one model, one FFN mode, text streamed (or --json)."""

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from turbo_demo.errors import UserError


def mode_options(args):
    """The FFN mode's options dataclass from --budget, --threshold and --sparsity; an option
    the mode does not take is an error."""
    from turbo_demo.runtime.modes import mode_options

    return mode_options(args.mode, budget=args.budget, threshold=args.threshold, sparsity=args.sparsity)


def decode_device(name: str):
    """The torch.device for --device: "cpu", or "cuda" / "cuda:N" where torch sees a GPU."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"device {name!r} is not supported: use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("no CUDA device here (torch.cuda.is_available() is False): use --device cpu")
    return device


@dataclass(frozen=True)
class Request:
    """What one call decodes: the prompt as rendered and encoded, and the sampling, each as
    given on the command line or else as the model's generation config says."""

    prompt_ids: list[int]
    rendered: str
    chat: bool
    temperature: float
    top_p: float
    max_new_tokens: int


@dataclass(frozen=True)
class Decoded:
    """What the call produced: each step's statistics, the new ids, their text, and the seconds
    from the call's start to its first new token."""

    steps: list
    ids: list[int]
    text: str
    first_token_s: float | None  # None: no new token

    @property
    def tokens_per_s(self) -> float:
        return len(self.ids) / sum(s.time_s for s in self.steps)


def generate(args) -> None:
    """`python -m turbo_demo generate`: stream a model's text in one mode, or print --json."""
    from turbo_demo.checkpoints.checkpoint import load_tokenizer
    from turbo_demo.checkpoints.config import dtype_name
    from turbo_demo.checkpoints.generation import read_generation
    from turbo_demo.runtime import load_kernels, open_runtime
    from turbo_demo.runtime.kernels import cpp

    options = mode_options(args)
    device = decode_device(args.device)
    kernels = load_kernels(args.backend, cpp.announce_build, device.type)
    packed, quant = load_packed(args, device)
    tokenizer = load_tokenizer(args.model_dir)
    generation = read_generation(Path(args.model_dir), packed.model.config, tokenizer)
    chat = generation.chat if args.chat is None else args.chat
    if chat and not generation.chat:
        raise UserError(f"{args.model_dir}'s tokenizer has no chat template: drop --chat")
    if args.mode == "threshold" and args.sparsity is not None:  # per-layer, on the calibration text
        from turbo_demo.runtime.calibration import threshold_options

        options = threshold_options(packed, tokenizer, args.sparsity, packed.model.config.max_position_embeddings)
    runtime = open_runtime(packed, args.mode, kernels, options)
    request = encode_request(args, tokenizer, generation, chat)
    if not args.json:
        for note in generation.notes if args.temperature is None else ():
            print(f"note: {note}: greedy decoding is used instead", file=sys.stderr)
        if args.show_prompt:
            print(request.rendered, file=sys.stderr)
    runtime.warm_up()  # untimed, before the first token's clock starts
    decoded = stream(runtime, tokenizer, generation, request, args)
    facts = {
        "model": args.model_dir,
        "mode": args.mode,
        "engine": runtime.engine,
        "backend": kernels.name,
        "device": str(device),
        "dtype": dtype_name(packed.model.dtype),
        "quant": quant,
    }
    if args.json:
        print(json.dumps(as_json(facts, args.prompt, generation, request, runtime, decoded)))
    else:
        print(summary(facts, runtime.prefill_s, decoded), file=sys.stderr)


def load_packed(args, device):
    """(the runtime's pack of --model-dir, its block format or None): quantized at load with
    --quant or as a `quantize` checkpoint stores it (on the CPU), else float on `device`."""
    from turbo_demo.checkpoints.checkpoint import load_model
    from turbo_demo.checkpoints.config import DTYPES
    from turbo_demo.checkpoints.quantized import load_quantized, stored_quant
    from turbo_demo.runtime import pack

    quant = getattr(args, "quant", None) or stored_quant(Path(args.model_dir))
    if quant is None:
        return pack(load_model(args.model_dir, DTYPES.get(args.dtype), predictors=args.predictors).to(device)), None
    # streamed from the safetensors into blocks, or a `quantize` checkpoint's
    if device.type != "cpu":
        raise UserError("--quant decodes on the CPU: drop --device")
    if args.predictors:
        raise UserError("PowerInfer predictors attach to float weights: drop --quant or --predictors")
    return load_quantized(args.model_dir, quant, DTYPES.get(args.dtype)), quant


def encode_request(args, tokenizer, generation, chat: bool) -> Request:
    """--prompt (and --system) rendered and encoded, with the sampling; a UserError if empty."""
    from turbo_demo.checkpoints.generation import encode_prompt

    prompt_ids, rendered = encode_prompt(tokenizer, args.prompt, args.system or "", chat)
    if not prompt_ids:
        raise UserError("empty prompt: give some text with --prompt")
    return Request(
        prompt_ids,
        rendered,
        chat,
        temperature=generation.temperature if args.temperature is None else args.temperature,
        top_p=generation.top_p if args.top_p is None else args.top_p,
        max_new_tokens=args.max_new_tokens or min(generation.max_new_tokens or 64, 256),
    )


def stream(runtime, tokenizer, generation, request: Request, args) -> Decoded:
    """Decode the request on the warm runtime, printing the text as it grows unless --json."""
    from turbo_demo.runtime.decoder import Sampling

    steps, ids, shown = [], [], ""
    start, first_token_s = time.perf_counter(), None
    for stats in runtime.generate(
        request.prompt_ids,
        request.max_new_tokens,
        Sampling(request.temperature, request.top_p, args.seed),
        stop_ids=generation.stop_ids,
        vocab=generation.vocab,
        audit=args.audit,
    ):
        first_token_s = first_token_s or time.perf_counter() - start
        steps.append(stats)
        ids.append(stats.token)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if not args.json:
            print(text[len(shown) :], end="", flush=True)
        shown = text
    return Decoded(steps, ids, shown, first_token_s)


def summary(facts: dict, prefill_s: float, decoded: Decoded) -> str:
    """The line on stderr after the streamed text."""
    quant = f", {facts['quant']} weights" if facts["quant"] else ""
    return (
        f"\n[{len(decoded.ids)} tokens, {decoded.tokens_per_s:.1f} tokens/s, first token {decoded.first_token_s:.2f} s "
        f"(prefill {prefill_s:.2f} s), mode {facts['mode']}, "
        f"engine {facts['engine']}, {facts['backend']} kernels, {facts['dtype']}{quant}]"
    )


def as_json(facts: dict, prompt: str, generation, request: Request, runtime, decoded: Decoded) -> dict:
    """--json's object: the run's facts, the request, the text and every step's statistics."""
    return facts | {
        "prompt": prompt,
        "chat": request.chat,
        "rendered_prompt": request.rendered,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "notes": list(generation.notes),
        "prompt_ids": request.prompt_ids,
        "token_ids": decoded.ids,
        "text": decoded.text,
        "tokens_per_s": decoded.tokens_per_s,
        # the prompt but its last token, and the call's start to its first new token
        "prefill_s": runtime.prefill_s,
        "first_token_s": decoded.first_token_s,
        "warm_up_s": runtime.warm_up_s,
        "steps": [s.to_dict() for s in decoded.steps],
        "firing_counts": runtime.firing_counts(),
    }

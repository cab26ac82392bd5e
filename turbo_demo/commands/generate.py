"""`python -m turbo_demo generate`: one model, one FFN mode, text streamed (or --json)."""

import json
import sys
import time

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


def generate(args) -> None:
    """`python -m turbo_demo generate`: stream a model's text in one mode, or print --json."""
    from pathlib import Path

    from turbo_demo.checkpoints.checkpoint import load_model, load_tokenizer
    from turbo_demo.checkpoints.config import DTYPES, dtype_name
    from turbo_demo.checkpoints.generation import encode_prompt, read_generation
    from turbo_demo.runtime import load_kernels, open_runtime, pack
    from turbo_demo.runtime.kernels import cpp

    options = mode_options(args)
    device = decode_device(args.device)
    kernels = load_kernels(args.backend, cpp.announce_build, device.type)
    from turbo_demo.checkpoints.quantized import load_quantized, stored_quant

    quant = getattr(args, "quant", None) or stored_quant(Path(args.model_dir))
    if quant is not None:  # streamed from the safetensors into blocks, or a `quantize` checkpoint
        if device.type != "cpu":
            raise UserError("--quant decodes on the CPU: drop --device")
        if args.predictors:
            raise UserError("PowerInfer predictors attach to float weights: drop --quant or --predictors")
        packed = load_quantized(args.model_dir, quant, DTYPES.get(args.dtype))
        model = packed.model
    else:
        model = load_model(args.model_dir, DTYPES.get(args.dtype), predictors=args.predictors).to(device)
        packed = pack(model)
    tokenizer = load_tokenizer(args.model_dir)
    generation = read_generation(Path(args.model_dir), model.config, tokenizer)
    chat = generation.chat if args.chat is None else args.chat
    if chat and not generation.chat:
        raise UserError(f"{args.model_dir}'s tokenizer has no chat template: drop --chat")
    if args.mode == "threshold" and args.sparsity is not None:  # per-layer, on the calibration text
        from turbo_demo.runtime.calibration import threshold_options

        options = threshold_options(packed, tokenizer, args.sparsity, model.config.max_position_embeddings)
    runtime = open_runtime(packed, args.mode, kernels, options)
    prompt_ids, rendered = encode_prompt(tokenizer, args.prompt, args.system or "", chat)
    if not prompt_ids:
        raise UserError("empty prompt: give some text with --prompt")
    temperature = generation.temperature if args.temperature is None else args.temperature
    top_p = generation.top_p if args.top_p is None else args.top_p
    max_new = args.max_new_tokens or min(generation.max_new_tokens or 64, 256)
    if not args.json:
        for note in generation.notes if args.temperature is None else ():
            print(f"note: {note}: greedy decoding is used instead", file=sys.stderr)
        if args.show_prompt:
            print(rendered, file=sys.stderr)
    runtime.warm_up()  # untimed, before the first token's clock starts
    steps, ids, shown = [], [], ""
    start, first_token_s = time.perf_counter(), None
    for stats in runtime.generate(
        prompt_ids,
        max_new,
        temperature,
        top_p,
        args.seed,
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
    seconds = sum(s.time_s for s in steps)
    if not args.json:
        print(
            f"\n[{len(ids)} tokens, {len(ids) / seconds:.1f} tokens/s, first token {first_token_s:.2f} s "
            f"(prefill {runtime.prefill_s:.2f} s), mode {args.mode}, "
            f"engine {runtime.engine}, {kernels.name} kernels, {dtype_name(model.dtype)}"
            f"{f', {quant} weights' if quant else ''}]",
            file=sys.stderr,
        )
        return
    print(
        json.dumps(
            {
                "model": args.model_dir,
                "mode": args.mode,
                "engine": runtime.engine,
                "backend": kernels.name,
                "device": str(device),
                "dtype": dtype_name(model.dtype),
                "quant": quant,
                "prompt": args.prompt,
                "chat": chat,
                "rendered_prompt": rendered,
                "temperature": temperature,
                "top_p": top_p,
                "notes": list(generation.notes),
                "prompt_ids": prompt_ids,
                "token_ids": ids,
                "text": shown,
                "tokens_per_s": len(ids) / seconds,
                # the prompt but its last token, and the call's start to its first new token
                "prefill_s": runtime.prefill_s,
                "first_token_s": first_token_s,
                "warm_up_s": runtime.warm_up_s,
                "steps": [s.to_dict() for s in steps],
                "firing_counts": runtime.firing_counts(),
            }
        )
    )

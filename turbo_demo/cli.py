"""`python -m turbo_demo <command>`: the headless entry point.

Every command has --help; problems with the input end in one line on stderr and exit code 2.
Each command imports what it runs (torch, transformers, its module) inside its function, so
that parsing the command line and --help import neither.
"""

import argparse
import json
import sys
from pathlib import Path

from turbo_demo.choices import BACKEND_CHOICES, DTYPE_CHOICES, GGUF_TYPES, MODE_HELP, MODES, QUANTS
from turbo_demo.errors import UserError


def cmd_train(args) -> None:
    from turbo_demo.offline.train import settings_for, train

    settings = settings_for(args.preset, steps=args.steps, l1=args.l1, seed=args.seed, init=args.init)
    log = train(settings, args.out)
    print(json.dumps(log["final"]))


def cmd_eval(args) -> None:
    if args.quant:
        from turbo_demo.offline.quant_eval import quant_quality

        result = quant_quality(args.model_dir, tuple(args.quant.split(",")), max_tokens=min(args.max_tokens, 16384))
        print(json.dumps(result) if args.json else "\n".join(json.dumps(row) for row in result["rows"]))
        return
    from turbo_demo.offline.evaluate import evaluate_dir

    result = evaluate_dir(args.model_dir, args.text_file, args.max_tokens)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['model']} on {result['text']} ({result['tokens']} tokens)")
    print(f"  loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}")
    layers = " ".join(f"{s:.3f}" for s in result["sparsity"]["per_layer"])
    print(f"  sparsity mean {result['sparsity']['mean']:.3f}  per layer {layers}")
    for k, ppl in result["topk_perplexity"].items():
        print(f"  top-k perplexity at {float(k):.0%} sparsity: {ppl:.2f}")


def ranks(text: str) -> int | list[int]:
    """argparse type: "64" -> 64, "256,64,64,96" -> [256, 64, 64, 96]."""
    values = [int(v) for v in text.split(",")]
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("ranks must be positive integers")
    return values[0] if len(values) == 1 else values


def cmd_predictors(args) -> None:
    from turbo_demo.offline.predictors import train_predictors

    result = train_predictors(
        args.model_dir, rank=args.rank, target_recall=args.target_recall, train_tokens=args.tokens, steps=args.steps
    )
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"{result['model']}: rank {result['rank']}, predictors = {result['predictor_share_of_ffn']:.1%} of FFN weights"
    )
    print("layer  recall  predicted sparsity  true sparsity  threshold")
    for e in result["layers"]:
        print(
            f"{e['layer']:5d}  {e['recall']:.4f}  {e['predicted_sparsity']:18.4f}  "
            f"{e['true_sparsity']:13.4f}  {e['threshold']:9.3f}"
        )


def cmd_generate(args) -> None:
    from turbo_demo.commands.generate import generate

    generate(args)


def cmd_card(args) -> None:
    from turbo_demo.offline.card import write_card

    print(write_card(args.model_dir))


def cmd_quantize(args) -> None:
    from turbo_demo.checkpoints.config import DTYPES
    from turbo_demo.checkpoints.quantized import quantize_checkpoint

    print(quantize_checkpoint(args.src, args.dst, args.quant, DTYPES.get(args.dtype)))


def cmd_export_gguf(args) -> None:
    if args.powerinfer:
        from turbo_demo.checkpoints.powerinfer_gguf import export_powerinfer

        print(export_powerinfer(args.src, args.dst, args.type))
        return
    from turbo_demo.checkpoints.gguf_export import export_gguf

    print(export_gguf(args.src, args.dst, args.type))


def cmd_bench(args) -> None:
    import torch

    from turbo_demo.bench.common import settings_for
    from turbo_demo.bench.report import format_table
    from turbo_demo.bench.run import run_bench

    if args.bench_threads:
        torch.set_num_threads(args.bench_threads)
    quants = () if args.quant == "none" else tuple(args.quant.split(","))
    if args.served:
        from turbo_demo.commands.loadtest import served_and_in_process

        print(json.dumps(served_and_in_process(args.backend, args.served)))
        return
    if args.full:
        from turbo_demo.bench.full import run_full

        keep = Path(args.full_dir) if args.full_dir else None
        result = run_full(
            quants[0] if quants else "int8",
            args.backend,
            keep,
            "turbo_demo.app.engine.warm:time_compare",
            args.peers is not False,
        )
        print(json.dumps(result) if args.json else json.dumps(result, indent=1))
        return
    result = run_bench(settings_for(args.quick, args.dtype, quants, args.peers), backend=args.backend)
    print(json.dumps(result) if args.json else format_table(result))


def cmd_loadtest(args) -> None:
    from turbo_demo.commands.loadtest import loadtest

    loadtest(args.url, (args.left, args.right), args.fuzz, args.clients, args.runs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m turbo_demo", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train an embedded model (dense, drelu, relufy, moe-dense or moe-drelu preset)")
    p.add_argument("--preset", required=True, help="dense | drelu | relufy | moe-dense | moe-drelu")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--steps", type=int, help="optimizer steps (default: the preset's)")
    p.add_argument("--l1", type=float, help="L1 penalty on the FFN activation (0 = plain dReLU)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--init", help="relufy: the dense checkpoint to start from")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="held-out loss, perplexity, sparsity and top-k perplexity")
    p.add_argument("model_dir")
    p.add_argument("--text-file", help="evaluate on this UTF-8 text instead of the held-out split")
    p.add_argument("--max-tokens", type=int, default=131072, help="tokens to score (default 131072)")
    p.add_argument("--quant", help="int8,int4: the runtime's quality at these formats against float (<= 16384 tokens)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "predictors", help="train activation predictors into a dReLU checkpoint (per layer; per expert in a MoE)"
    )
    p.add_argument("model_dir")
    p.add_argument(
        "--rank",
        type=ranks,
        default=64,
        help="predictor rank: one for all layers, or one per layer as 256,64,64,96 (default 64)",
    )
    p.add_argument("--target-recall", type=float, default=0.97, help="per-layer recall to calibrate to")
    p.add_argument("--tokens", type=int, default=65536, help="training-split tokens to learn from")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per layer")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_predictors)

    p = sub.add_parser("card", help="write a model card from training_log.json, eval.json, predictors.json")
    p.add_argument("model_dir")
    p.set_defaults(func=cmd_card)

    p = sub.add_parser(
        "generate",
        help="stream text from a model in one backend mode",
        description="Modes: " + "; ".join(f"{m}: {MODE_HELP[m]}" for m in MODES),
    )
    p.add_argument("model_dir")
    p.add_argument("--mode", default="dense", choices=MODES, help="the FFN mode (see above)")
    p.add_argument("--prompt", required=True)
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        help="wrap the prompt in the model's chat template as the user's turn (default: on where it has one)",
    )
    p.add_argument("--system", help="with --chat: a system turn before the prompt")
    p.add_argument("--show-prompt", action="store_true", help="print the rendered prompt on stderr")
    p.add_argument("--max-new-tokens", type=int, help="default: the model's generation config, at most 256; else 64")
    p.add_argument(
        "--temperature", type=float, help="0 = greedy; default: the model's generation config where sane, else 0"
    )
    p.add_argument("--top-p", type=float, help="default: the model's generation config, else 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=float, help="predictor mode: compute this share of the neurons")
    p.add_argument("--threshold", type=float, help="predictor mode: score threshold; threshold mode: |activation|")
    p.add_argument("--sparsity", type=float, help="threshold mode: target sparsity (thresholds calibrated per layer)")
    p.add_argument("--audit", action="store_true", help="measure predictor recall (untimed)")
    p.add_argument(
        "--backend", default="auto", choices=BACKEND_CHOICES, help="decode kernels: auto = cpp where it builds"
    )
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N (torch kernels)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="auto = fp32 up to ~1B parameters, else bf16")
    p.add_argument("--quant", choices=QUANTS, help="block-quantize the matrices at load (CPU, lean runtime)")
    p.add_argument("--predictors", metavar="DIR", help="PowerInfer predictor folder (default: MODEL_DIR-Predictor)")
    p.add_argument("--json", action="store_true", help="print token ids, text and per-step statistics")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "quantize", help="write a checkpoint's matrices as int8 / int4 blocks (loads without re-quantizing)"
    )
    p.add_argument("src", help="a float checkpoint directory")
    p.add_argument("dst", help="the directory to write")
    p.add_argument("--quant", required=True, choices=QUANTS)
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="of embeddings and norms (auto as generate)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("export-gguf", help="write a dense Llama / Mistral checkpoint as a GGUF file for llama.cpp")
    p.add_argument("src", help="a float checkpoint directory (dense SwiGLU, safetensors)")
    p.add_argument("dst", help="the .gguf file to write")
    p.add_argument("--type", default="f16", choices=GGUF_TYPES, help="matrix type (default f16)")
    p.add_argument(
        "--powerinfer",
        action="store_true",
        help="instead: a dReLU (bamboo) checkpoint with predictors as PowerInfer's sparse GGUF (f16 or q4_0)",
    )
    p.set_defaults(func=cmd_export_gguf)

    p = sub.add_parser("bench", help="measure FFN and decoding speed per mode (tokens/s, bandwidth)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quick", action="store_true", help="fewer rounds and layers: under a minute, noisier")
    # its own dest: a subcommand default would overwrite the global --threads
    p.add_argument("--threads", type=int, dest="bench_threads", help="torch CPU threads for the benchmark")
    p.add_argument(
        "--backend",
        default="auto",
        choices=BACKEND_CHOICES,
        help="gather-GEMV kernels: auto = cpp where it builds, else torch",
    )
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="weight dtype (default bf16)")
    p.add_argument("--quant", default="int8,int4", help="lean engines also on these block formats, or none")
    p.add_argument(
        "--peers",
        action=argparse.BooleanOptionalAction,
        help="llama.cpp (llama-cpp-python) and transformers+torchao rows on the same weights "
        "(default: on, off with --quick; a missing package is a note)",
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="instead: the whole request at the paper's scale, on a 32-layer random checkpoint in "
        "TurboSparse-Mistral-7B's published layout (writes 16 GB to a temporary folder, needs ~10 GB of "
        "memory at int8, about 15 minutes on 2 cores; the first of --quant): load, peak RSS against the "
        "estimate, prefill, a request, and the app's compare (bench/full.py)",
    )
    p.add_argument("--full-dir", metavar="DIR", help="with --full: write the checkpoint here and keep it (reused)")
    p.add_argument(
        "--served",
        type=int,
        metavar="RUNS",
        help="instead: the default compare's speed-up as `python app.py` serves it (started on 127.0.0.1) "
        "and in this process, RUNS calls each, as JSON",
    )
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("loadtest", help="probe a running app (e.g. a deployed Space): fuzzed calls, then many clients")
    p.add_argument("url", help="the app's address, e.g. https://someone-turbosparse.hf.space/")
    p.add_argument("--fuzz", type=int, default=60, help="malformed calls to make (default 60)")
    p.add_argument("--clients", type=int, default=6, help="concurrent clients (default 6)")
    p.add_argument("--runs", type=int, default=2, help="calls per client (default 2)")
    p.add_argument("--left", default="Dense SwiGLU", help="left model name the app offers")
    p.add_argument("--right", default="TurboSparse dReLU", help="right model name the app offers")
    p.set_defaults(func=cmd_loadtest)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars say what is slow; keep errors to one line
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0

"""`python -m turbo_demo <command>`: the headless entry point.

Every command has --help; problems with the input end in one line on stderr and exit code 2.
Each command imports what it runs (torch, transformers, its module) inside its function, so
that parsing the command line and --help import neither.
"""

import argparse
import json
import sys
from pathlib import Path

from turbo_demo import arguments
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


COMMANDS = {  # name: (its handler, its arguments (arguments.py), its line in --help), in that order
    "train": (
        cmd_train,
        arguments.train,
        "train an embedded model (dense, drelu, relufy, moe-dense or moe-drelu preset)",
    ),
    "eval": (
        cmd_eval,
        arguments.evaluate,
        "held-out loss, perplexity, sparsity and top-k perplexity",
    ),
    "predictors": (
        cmd_predictors,
        arguments.predictors,
        "train activation predictors into a dReLU checkpoint (per layer; per expert in a MoE)",
    ),
    "card": (
        cmd_card,
        arguments.card,
        "write a model card from training_log.json, eval.json, predictors.json",
    ),
    "generate": (
        cmd_generate,
        arguments.generate,
        "stream text from a model in one backend mode",
    ),
    "quantize": (
        cmd_quantize,
        arguments.quantize,
        "write a checkpoint's matrices as int8 / int4 blocks (loads without re-quantizing)",
    ),
    "export-gguf": (
        cmd_export_gguf,
        arguments.export_gguf,
        "write a dense Llama / Mistral checkpoint as a GGUF file for llama.cpp",
    ),
    "bench": (
        cmd_bench,
        arguments.bench,
        "measure FFN and decoding speed per mode (tokens/s, bandwidth)",
    ),
    "loadtest": (
        cmd_loadtest,
        arguments.loadtest,
        "probe a running app (e.g. a deployed Space): fuzzed calls, then many clients",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m turbo_demo", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (handler, add_arguments, summary) in COMMANDS.items():
        p = sub.add_parser(name, help=summary)
        add_arguments(p)
        p.set_defaults(func=handler)
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

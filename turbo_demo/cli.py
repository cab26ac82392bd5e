"""`python -m turbo_demo <command>`: the headless entry point.

Every command has --help; problems with the input end in one line on stderr and exit code 2.
"""

import argparse
import json
import sys

from turbo_demo.errors import UserError


def cmd_train(args) -> None:
    from turbo_demo.train import settings_for, train

    settings = settings_for(args.preset, steps=args.steps, l1=args.l1, seed=args.seed, init=args.init)
    log = train(settings, args.out)
    print(json.dumps(log["final"]))


def cmd_eval(args) -> None:
    from turbo_demo.evaluate import evaluate_dir

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m turbo_demo", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train an embedded model (dense, drelu or relufy preset)")
    p.add_argument("--preset", required=True, help="dense | drelu | relufy")
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
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0

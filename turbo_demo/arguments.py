"""The command line's arguments: one function per subcommand that adds that subcommand's
arguments to its parser (cli.py's COMMANDS pairs each with its handler and help line). Like
choices.py it imports nothing heavy, so that parsing and --help stay instant."""

import argparse

from turbo_demo.choices import BACKEND_CHOICES, DTYPE_CHOICES, GGUF_TYPES, MODE_HELP, MODES, QUANTS


def ranks(text: str) -> int | list[int]:
    """argparse type: "64" -> 64, "256,64,64,96" -> [256, 64, 64, 96]."""
    values = [int(v) for v in text.split(",")]
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("ranks must be positive integers")
    return values[0] if len(values) == 1 else values


def train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", required=True, help="dense | drelu | relufy | moe-dense | moe-drelu")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--steps", type=int, help="optimizer steps (default: the preset's)")
    p.add_argument("--l1", type=float, help="L1 penalty on the FFN activation (0 = plain dReLU)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--init", help="relufy: the dense checkpoint to start from")


def evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir")
    p.add_argument("--text-file", help="evaluate on this UTF-8 text instead of the held-out split")
    p.add_argument("--max-tokens", type=int, default=131072, help="tokens to score (default 131072)")
    p.add_argument("--quant", help="int8,int4: the runtime's quality at these formats against float (<= 16384 tokens)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def predictors(p: argparse.ArgumentParser) -> None:
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


def card(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir")


def generate(p: argparse.ArgumentParser) -> None:
    p.description = "Modes: " + "; ".join(f"{m}: {MODE_HELP[m]}" for m in MODES)
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


def quantize(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="a float checkpoint directory")
    p.add_argument("dst", help="the directory to write")
    p.add_argument("--quant", required=True, choices=QUANTS)
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="of embeddings and norms (auto as generate)")


def export_gguf(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="a float checkpoint directory (dense SwiGLU, safetensors)")
    p.add_argument("dst", help="the .gguf file to write")
    p.add_argument("--type", default="f16", choices=GGUF_TYPES, help="matrix type (default f16)")
    p.add_argument(
        "--powerinfer",
        action="store_true",
        help="instead: a dReLU (bamboo) checkpoint with predictors as PowerInfer's sparse GGUF (f16 or q4_0)",
    )


def bench(p: argparse.ArgumentParser) -> None:
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
        "TurboSparse-Mistral-7B's published layout (writes 16 GB to a temporary folder, needs ~12 GB of "
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


def loadtest(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="the app's address, e.g. https://someone-turbosparse.hf.space/")
    p.add_argument("--fuzz", type=int, default=60, help="malformed calls to make (default 60)")
    p.add_argument("--clients", type=int, default=6, help="concurrent clients (default 6)")
    p.add_argument("--runs", type=int, default=2, help="calls per client (default 2)")
    p.add_argument("--left", default="Dense SwiGLU", help="left model name the app offers")
    p.add_argument("--right", default="TurboSparse dReLU", help="right model name the app offers")

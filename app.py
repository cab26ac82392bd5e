"""TurboSparse Studio: `python app.py [--host H] [--port P] [--kernels K] [--threads N] [--public]` serves the app.

Host and port default to Gradio's usual environment variables (GRADIO_SERVER_NAME,
GRADIO_SERVER_PORT), else 127.0.0.1:7860. Analytics stay off unless the environment turns them on.
The decode kernels and threads are chosen here, before the page serves anyone: by default every
core this process may use but one, which is left to the web server's own threads (an OpenMP team
that shares its cores with them waits at every barrier); a prompt's prefill, which comes before any
token streams, runs on every core. Public mode (on where Spaces sets
SPACE_ID, or with --public; turbo_demo/app/engine/public.py) serves only the embedded models and those
named with --allow-model, within its limits, and refuses uploads.
"""

import argparse
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from turbo_demo.choices import BACKEND_CHOICES
from turbo_demo.errors import UserError

PUBLIC_SESSIONS = 256
THREADS_HELP = (
    "decode threads (torch's and the C++ kernels' OpenMP team; OMP_NUM_THREADS is set to it); default: "
    "OMP_NUM_THREADS where set, else "
    "the cores this process may use but one, at least 1, so that the web server's own threads keep a "
    "core (here: {default} of {cores}); a prompt's prefill runs on every core"
)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, where the OS tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def serving_threads(cores: int) -> int:
    """The decode threads that fit a server on `cores`: all but one, left to the web server."""
    return max(1, cores - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument(
        "--kernels",
        choices=BACKEND_CHOICES,
        default="auto",
        help="decode kernels: C++ where they build here (auto), or force one",
    )
    cores = usable_cores()
    parser.add_argument(
        "--threads", type=int, metavar="N", help=THREADS_HELP.format(default=serving_threads(cores), cores=cores)
    )
    parser.add_argument(
        "--public",
        action=argparse.BooleanOptionalAction,
        help="public mode: an allow-list of models and per-request limits (default: on where SPACE_ID is set)",
    )
    parser.add_argument(
        "--allow-model",
        action="append",
        default=[],
        metavar="DIR_OR_HUB_ID",
        help="public mode: offer this model too (repeatable; also TURBO_DEMO_ALLOW_MODELS, comma-separated)",
    )
    parser.add_argument(
        "--mcp", action="store_true", help="also serve the compare endpoint as an MCP tool (/gradio_api/mcp/)"
    )
    args = parser.parse_args()
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    # --threads, else the environment's OMP_NUM_THREADS where it is a number, else the policy
    env = os.environ.get("OMP_NUM_THREADS", "")
    threads = args.threads or (int(env) if env.isdigit() and int(env) > 0 else serving_threads(cores))
    # before torch starts OpenMP: the Gradio worker threads that decode start with this count too
    os.environ["OMP_NUM_THREADS"] = str(threads)
    # imported after parsing, so that --help answers at once
    import torch

    from turbo_demo.app.engine.public import policy_from
    from turbo_demo.app.ui.page import build_demo
    from turbo_demo.runtime.kernels import cpp, load_kernels

    try:
        # a prompt's forward is compute-bound and comes before any token streams: every core
        kernels = load_kernels(args.kernels, on_build=cpp.announce_build, prefill_threads=cores)
    except UserError as exc:
        sys.exit(f"error: {exc}")
    print(f"Decode kernels: {kernels.name}", file=sys.stderr)
    torch.set_num_threads(threads)  # once, before the warm-up: the C++ kernels read at::get_num_threads()
    shared = "one left to the web server" if cores > 1 else "the one core, shared with the web server"
    why = "--threads" if args.threads else "OMP_NUM_THREADS" if env.isdigit() else f"{shared}; --threads sets it"
    print(f"Decode threads: {threads} of {cores} cores ({why}); prefill threads: {cores}", file=sys.stderr)
    policy = policy_from(args.public, args.allow_model)
    if policy.public:
        print(f"Public mode: {policy.describe()}", file=sys.stderr)
    from turbo_demo.app.engine.catalog import ModelStore
    from turbo_demo.app.engine.warm import warm_up

    store = ModelStore(allowed=policy.allowed)  # public mode: the store itself refuses other models
    demo = build_demo(store, kernels=kernels, policy=policy)
    # the default models loaded, packed and run once, their runtimes kept warm in the store, so
    # that a visitor's first run waits for no load or warm-up and is timed warm
    print("Warming up the default models...", file=sys.stderr)
    for error in filter(None, warm_up(store, kernels)):
        print(f"warm-up: {error}", file=sys.stderr)
    # public: no component takes files, so any upload (Gradio's route is open) is refused; and
    # Gradio keeps each session's component values: hold the most recent sessions only
    public = {"max_file_size": 1, "state_session_capacity": PUBLIC_SESSIONS} if policy.public else {}
    demo.queue(max_size=32).launch(server_name=args.host, server_port=args.port, mcp_server=args.mcp, **public)


if __name__ == "__main__":
    main()

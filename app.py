"""TurboSparse Studio: `python app.py [--host H] [--port P] [--kernels auto|cpp|torch] [--public]` serves the app.

Host and port default to Gradio's usual environment variables (GRADIO_SERVER_NAME,
GRADIO_SERVER_PORT), else 127.0.0.1:7860. Analytics stay off unless the environment turns them on.
The decode kernels are chosen and built here, before the page serves anyone. Public mode (on
where Spaces sets SPACE_ID, or with --public; turbo_demo/app/public.py) serves only the embedded
models and those named with --allow-model, within its limits, and refuses uploads.
"""

import argparse
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from turbo_demo.choices import BACKEND_CHOICES
from turbo_demo.errors import UserError

PUBLIC_SESSIONS = 256


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
    # imported after parsing, so that --help answers at once
    from turbo_demo.app.page import build_demo
    from turbo_demo.app.public import policy_from
    from turbo_demo.runtime.kernels import cpp, load_kernels

    try:
        kernels = load_kernels(args.kernels, on_build=cpp.announce_build)
    except UserError as exc:
        sys.exit(f"error: {exc}")
    print(f"Decode kernels: {kernels.name}", file=sys.stderr)
    policy = policy_from(args.public, args.allow_model)
    if policy.public:
        print(f"Public mode: {policy.describe()}", file=sys.stderr)
    from turbo_demo.app.catalog import ModelStore
    from turbo_demo.app.warm import warm_up

    store = ModelStore(allowed=policy.allowed)  # public mode: the store itself refuses other models
    demo = build_demo(store, kernels=kernels, policy=policy)
    # the default models loaded, packed and run once, so that a visitor's first run is timed warm
    print("Warming up the default models...", file=sys.stderr)
    for error in filter(None, warm_up(store, kernels)):
        print(f"warm-up: {error}", file=sys.stderr)
    # public: no component takes files, so any upload (Gradio's route is open) is refused; and
    # Gradio keeps each session's component values: hold the most recent sessions only
    public = {"max_file_size": 1, "state_session_capacity": PUBLIC_SESSIONS} if policy.public else {}
    demo.queue(max_size=32).launch(server_name=args.host, server_port=args.port, mcp_server=args.mcp, **public)


if __name__ == "__main__":
    main()

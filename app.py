"""TurboSparse Studio: `python app.py [--host H] [--port P]` serves the comparison app.

Host and port default to Gradio's usual environment variables (GRADIO_SERVER_NAME,
GRADIO_SERVER_PORT), else 127.0.0.1:7860. Analytics stay off unless the environment turns them on.
"""

import argparse
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--kernels", choices=("auto", "cpp", "torch"), default="auto",
                        help="sparse kernels: C++ when they build here (auto), or force one")
    args = parser.parse_args()
    from turbo_demo.ui import build_demo

    demo = build_demo(kernel_backend=args.kernels)
    demo.queue(max_size=32).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()

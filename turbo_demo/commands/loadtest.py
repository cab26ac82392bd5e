"""Probing a running app as a visitor would, over raw HTTP: the tests' reliability checks and
`python -m turbo_demo loadtest URL` (for a deployed Space) share these functions.

    call_compare(url, args)         one raw call to the compare endpoint -> (event, data)
    fuzz(url, models, n, seed)      n seeded malformed calls -> counts by outcome
    load(url, models, clients, runs) clients x runs concurrent calls -> counts and latencies
    running_app(port, log)          `python app.py` started on 127.0.0.1, stopped after
    default_compares(url, runs)     the page's default compare, as its API serves it
    served_and_in_process(backend, runs)   its speed-up served (app.py started here) and in-process
"""

import json
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import requests

from turbo_demo.app.engine.prompts import API_PROMPT

BAD_TEXT = [None, 3, [], {}, "", " ", "\x00" * 10, "x" * 5000, float("nan")]
BAD_NUMBERS = [None, "a", float("nan"), float("inf"), -float("inf"), -1, 2**70, 1e30, [], True]
BAD_MODELS = ["/etc", "/root/.ssh", "~", "../", "assets/models/dense-swiglu/../dense-swiglu", "org/name", None, 7]
BAD_MODES = ["turbo", "", None, "dense; rm -rf /", 3]
BAD_QUANTS = ["int3", "fp8", "../int8", 7, [], "INT8"]


def call_compare(url: str, args: list, timeout: float = 300) -> tuple[str, object]:
    """(event, data) of one raw call: "complete" and the result list, "error" and Gradio's
    message, or "refused" and the HTTP status when Gradio's request validation rejects the
    body. The body is JSON as any script may send it (NaN and Infinity included)."""
    url = url.rstrip("/")
    body, headers = json.dumps({"data": args}), {"content-type": "application/json"}
    posted = requests.post(f"{url}/gradio_api/call/compare", data=body, headers=headers, timeout=30)
    if 400 <= posted.status_code < 500:
        return "refused", posted.status_code
    posted.raise_for_status()
    stream = requests.get(f"{url}/gradio_api/call/compare/{posted.json()['event_id']}", timeout=timeout)
    event, data = "", None
    for line in stream.text.splitlines():
        if line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: "):
            data = json.loads(line.removeprefix("data: "))
    return event, data


def errors_of(result: dict) -> list[str]:
    """The error lines of a compare result (its own, and each side's)."""
    sides = [result[s].get("error") for s in ("left", "right") if isinstance(result.get(s), dict)]
    return [e for e in [result.get("error"), *sides] if e]


@dataclass
class Probe:
    """Outcomes of a batch of calls: answered (a result, maybe an error line in it), refused by
    Gradio's validation, failed (an unhandled server error), with seconds per answered call."""

    answered: int = 0
    refused: int = 0
    failed: int = 0
    error_lines: list[str] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def add(self, event: str, data, seconds: float) -> None:
        if event == "complete" and isinstance(data, list) and isinstance(data[0], dict):
            self.answered += 1
            self.seconds.append(seconds)
            self.error_lines += errors_of(data[0])
        elif event == "refused":
            self.refused += 1
        else:
            self.failed += 1

    def summary(self) -> str:
        times = sorted(self.seconds)
        latency = (
            f", median {statistics.median(times):.1f} s, slowest {times[-1]:.1f} s per answered call" if times else ""
        )
        lines = ""
        if self.error_lines:
            common, count = Counter(self.error_lines).most_common(1)[0]
            lines = f"; {len(self.error_lines)} error lines in the answers, most often ({count}x): {common}"
        return f"{self.answered} answered, {self.refused} refused, {self.failed} failed{latency}{lines}"


def fuzz_args(models: tuple[str, str], case: int, rng: random.Random) -> list:
    """Case `case` of the fuzz: a valid call with one argument class broken (prompt, model,
    mode, a number or a quantization), in turn."""
    args = ["def add(a, b):\n    return", models[0], "dense", models[1], "dense", 2, 0.0, 0, "stored", "stored"]
    kind = case % 5
    if kind == 0:
        args[0] = rng.choice(BAD_TEXT)
    elif kind == 1:
        args[rng.choice([1, 3])] = rng.choice(BAD_MODELS)
    elif kind == 2:
        args[rng.choice([2, 4])] = rng.choice(BAD_MODES)
    elif kind == 3:
        args[rng.choice([8, 9])] = rng.choice(BAD_QUANTS)
    else:
        args[rng.choice([5, 6, 7])] = rng.choice(BAD_NUMBERS)
    return args


def fuzz(url: str, models: tuple[str, str], n: int = 60, seed: int = 0) -> Probe:
    rng, probe = random.Random(seed), Probe()
    for case in range(n):
        start = time.monotonic()
        event, data = call_compare(url, fuzz_args(models, case, rng))
        probe.add(event, data, time.monotonic() - start)
    return probe


def load(url: str, models: tuple[str, str], clients: int = 6, runs: int = 2, tokens: int = 3) -> Probe:
    """clients threads, each making `runs` compare calls one after another."""
    probe, lock = Probe(), threading.Lock()

    def visitor():
        for _ in range(runs):
            start = time.monotonic()
            try:
                event, data = call_compare(
                    url, ["def f(x):", models[0], "dense", models[1], "dense", tokens, 0.0, 0, "stored", "stored"]
                )
            except requests.RequestException:
                event, data = "failed", None
            with lock:
                probe.add(event, data, time.monotonic() - start)

    threads = [threading.Thread(target=visitor) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return probe


APP = Path(__file__).resolve().parents[2] / "app.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_app(port: int, log: Path, *args: str, timeout: float = 300) -> Iterator[str]:
    """`python app.py --port PORT ARGS` as a visitor meets it (its thread policy, its warm-up
    before it serves), its output into `log`; yields its URL once it answers, stops it after.
    A RuntimeError with the log's tail where it exits or does not answer within `timeout`
    seconds (a first start builds the kernels: about a minute)."""
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, str(APP), "--port", str(port), *args], cwd=APP.parent, stdout=out, stderr=subprocess.STDOUT
        )
        url, deadline = f"http://127.0.0.1:{port}/", time.monotonic() + timeout
        try:
            while True:
                try:
                    urllib.request.urlopen(url, timeout=5)
                    break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"app.py did not serve: {log.read_text()[-2000:]}") from None
                    time.sleep(1)
            yield url
        finally:
            server.terminate()
            server.wait(timeout=30)


def default_compares(url: str, runs: int = 4) -> list[dict]:
    """The JSON summaries of `runs` calls of the compare endpoint with the prompt only (every
    other parameter the page's default), one after another, through gradio_client as docs/the-app.md
    shows it."""
    from gradio_client import Client

    client = Client(url, verbose=False)
    return [client.predict(API_PROMPT, api_name="/compare") for _ in range(runs)]


def served_and_in_process(backend: str, runs: int) -> dict:
    """The default compare's speed-up as `python app.py` serves it (started here on 127.0.0.1,
    its own thread policy) and in this process (this command's threads), `runs` calls each."""
    import tempfile

    import torch

    from turbo_demo.app.engine.warm import default_compares as in_process
    from turbo_demo.runtime.kernels import cpp, load_kernels

    with (
        tempfile.TemporaryDirectory(prefix="turbo-demo-served-") as tmp,
        running_app(free_port(), Path(tmp) / "app.log", "--kernels", backend) as url,
    ):
        served = default_compares(url, runs)
    kernels = load_kernels(backend, cpp.announce_build)
    here = in_process(kernels, runs)
    return {
        "served": [s.get("speedup") for s in served],
        "in_process": [s.get("speedup") for s in here],
        "in_process_threads": torch.get_num_threads(),
        "served_summaries": served,
        "in_process_summaries": here,
    }


def loadtest(url: str, models: tuple[str, str], fuzz_calls: int, clients: int, runs: int) -> None:
    """`loadtest`: malformed calls, then `clients` clients making `runs` runs each, then one run
    to show the server still answers; a summary line each."""
    print(f"fuzz ({fuzz_calls} malformed calls): {fuzz(url, models, n=fuzz_calls).summary()}")
    print(f"load ({clients} clients x {runs} runs): {load(url, models, clients, runs).summary()}")
    print(f"after: {load(url, models, 1, 1).summary()}")

"""A public-mode server on 127.0.0.1, probed as a visitor would: fuzzed API calls, uploads, many
clients at once, a soak; bounded in count and time, and stopped by the tests themselves."""

import json
import random
import threading

import psutil
import pytest
import requests

from test_app import PROMPT, free_port
from turbo_demo.app.catalog import ModelStore
from turbo_demo.app.compare import Settings, SideRecord, run_compare
from turbo_demo.app.public import public_policy


@pytest.fixture(scope="module")
def server(tiny_dirs):
    """(url, allowed model names) of a public-mode app serving the tiny models."""
    from gradio_client import Client

    from turbo_demo.app.page import build_demo

    allowed = [str(tiny_dirs["dense"]), str(tiny_dirs["drelu"])]
    demo = build_demo(policy=public_policy(allowed))
    port = free_port()
    demo.queue(max_size=32).launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, max_file_size=1)
    url = f"http://127.0.0.1:{port}/"
    try:
        yield url, allowed, Client(url, verbose=False)
    finally:
        demo.close()


def compare(client, *args):
    return client.predict(*args, api_name="/compare")


def raw_compare(url, args) -> tuple[str, object]:
    """(event, data) of a raw HTTP call to the compare endpoint: a JSON body as any script can
    send it (NaN and Infinity included, which gradio_client cannot encode)."""
    body, headers = json.dumps({"data": args}), {"content-type": "application/json"}
    posted = requests.post(f"{url}gradio_api/call/compare", data=body, headers=headers, timeout=30)
    if 400 <= posted.status_code < 500:  # refused by Gradio's request validation, not a crash
        return "refused", posted.status_code
    posted.raise_for_status()
    stream = requests.get(f"{url}gradio_api/call/compare/{posted.json()['event_id']}", timeout=120)
    event, data = "", None
    for line in stream.text.splitlines():
        if line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: "):
            data = json.loads(line.removeprefix("data: "))
    return event, data


def healthy(client, allowed) -> bool:
    result = compare(client, PROMPT, allowed[0], "dense", allowed[1], "exact", 2, 0.0, 0)
    return result["left"]["tokens"] == result["right"]["tokens"] == 2


BAD_TEXT = [None, 3, [], {}, "", " ", "\x00" * 10, "x" * 5000, float("nan")]
BAD_NUMBERS = [None, "a", float("nan"), float("inf"), -float("inf"), -1, 2**70, 1e30, [], True]
BAD_MODELS = ["/etc", "/root/.ssh", "~", "../", "assets/models/dense-swiglu/../dense-swiglu", "org/name", None, 7]


def test_fuzzed_api_calls_are_answered_in_one_line_and_the_app_keeps_serving(server):
    url, allowed, client = server
    rng, answered = random.Random(0), 0
    for case in range(60):
        args = [PROMPT, allowed[0], "dense", allowed[1], "exact", 2, 0.0, 0]
        kind = case % 4
        if kind == 0:
            args[0] = rng.choice(BAD_TEXT)
        elif kind == 1:
            args[rng.choice([1, 3])] = rng.choice(BAD_MODELS)
        elif kind == 2:
            args[rng.choice([2, 4])] = rng.choice(["turbo", "", None, "dense; rm -rf /", 3])
        else:
            args[rng.choice([5, 6, 7])] = rng.choice(BAD_NUMBERS)
        event, data = raw_compare(url, args)
        if event == "refused":
            continue
        assert event == "complete", (args, event, data)
        result, answered = data[0], answered + 1
        errors = [result.get("error")] + [result[s]["error"] for s in ("left", "right") if s in result]
        for error in filter(None, errors):
            assert "\n" not in error and "Traceback" not in error, error
            assert "/root" not in error and "/etc" not in error and "/tmp" not in error, error
        if case % 20 == 19:
            assert healthy(client, allowed)
    assert answered >= 50  # the rest refused by Gradio's own request validation


def test_uploads_are_refused(server):
    url, _, _ = server
    response = requests.post(f"{url}gradio_api/upload", files={"files": ("config.json", b'{"model_type": "x"}')})
    assert response.status_code >= 400


def test_many_clients_at_once_are_all_answered_or_cleanly_refused(server):
    url, allowed, client = server
    from gradio_client import Client

    results: list[dict] = []

    def visitor():
        own = Client(url, verbose=False)
        for _ in range(2):
            results.append(compare(own, PROMPT, allowed[0], "dense", allowed[1], "exact", 3, 0.0, 0))

    threads = [threading.Thread(target=visitor) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 12  # none lost
    served = [r for r in results if "left" in r]
    refused = [r for r in results if "already have a run" in (r.get("error") or "")]
    assert served and len(served) + len(refused) == 12  # loopback: every visitor is one client
    assert all(r["left"]["tokens"] == 3 for r in served)
    assert healthy(client, allowed)


def test_rss_stays_flat_over_a_hundred_runs(tiny_dirs):
    store, process = ModelStore(), psutil.Process()
    settings = Settings(max_new_tokens=4, temperature=0.0)

    def one():
        left, right = SideRecord(str(tiny_dirs["dense"]), "dense"), SideRecord(str(tiny_dirs["drelu"]), "exact")
        for _ in run_compare(store, left, right, PROMPT, settings):
            pass

    for _ in range(20):  # warm: models loaded, allocator settled
        one()
    before = process.memory_info().rss
    for _ in range(100):
        one()
    drift = process.memory_info().rss / before - 1
    assert drift < 0.05, f"RSS grew {drift:.1%} over 100 runs"


def test_stop_while_the_model_loads_ends_the_run_before_any_token(tiny_dirs):
    stop = threading.Event()
    left, right = SideRecord(str(tiny_dirs["dense"]), "dense"), SideRecord(str(tiny_dirs["drelu"]), "dense")
    settings = Settings(max_new_tokens=50)
    for _ in run_compare(ModelStore(), left, right, PROMPT, settings, stop, on_progress=lambda _: stop.set()):
        pass
    assert left.steps == right.steps == [] and "stopped" in left.notice

"""A public-mode server on 127.0.0.1, probed as a visitor would: fuzzed API calls, uploads, many
clients at once, a soak; bounded in count and time, and stopped by the tests themselves."""

import threading

import psutil
import pytest
import requests

from test_app import PROMPT, free_port
from turbo_demo.app.engine.catalog import ModelStore
from turbo_demo.app.engine.compare import Settings, last_round, run_compare
from turbo_demo.app.engine.public import public_policy
from turbo_demo.app.engine.sides import SideRequest
from turbo_demo.commands.loadtest import fuzz, load


@pytest.fixture(scope="module")
def server(tiny_dirs):
    """(url, allowed model names) of a public-mode app serving the tiny models."""
    from gradio_client import Client

    from turbo_demo.app.ui.page import build_demo

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


def healthy(client, allowed) -> bool:
    result = compare(client, PROMPT, allowed[0], "dense", allowed[1], "exact", 2, 0.0, 0)
    return result["left"]["tokens"] == result["right"]["tokens"] == 2


def test_fuzzed_api_calls_are_answered_in_one_line_and_the_app_keeps_serving(server):
    url, allowed, client = server
    for seed in range(3):
        result = fuzz(url, (allowed[0], allowed[1]), n=20, seed=seed)
        assert result.failed == 0 and result.answered >= 16, result.summary()  # the rest: Gradio's validation
        for error in result.error_lines:
            assert "\n" not in error and "Traceback" not in error, error
            assert "/root" not in error and "/etc" not in error and "/tmp" not in error, error
        assert healthy(client, allowed)


def test_uploads_are_refused(server):
    url, _, _ = server
    response = requests.post(f"{url}gradio_api/upload", files={"files": ("config.json", b'{"model_type": "x"}')})
    assert response.status_code >= 400


def test_many_clients_at_once_are_all_answered_or_cleanly_refused(server):
    url, allowed, client = server
    result = load(url, (allowed[0], allowed[1]), clients=6, runs=2, tokens=3)
    assert result.failed == 0 and result.answered == 12, result.summary()  # none lost
    refused = [e for e in result.error_lines if "already have a run" in e]
    assert len(refused) == len(result.error_lines) < 12  # loopback: every visitor is one client
    assert healthy(client, allowed)


def test_rss_stays_flat_over_a_hundred_runs(tiny_dirs):
    store, process = ModelStore(), psutil.Process()
    settings = Settings(max_new_tokens=4, temperature=0.0)

    def one():
        asked = SideRequest(str(tiny_dirs["dense"]), "dense"), SideRequest(str(tiny_dirs["drelu"]), "exact")
        last_round(run_compare(store, *asked, PROMPT, settings))

    for _ in range(20):  # warm: models loaded, allocator settled
        one()
    before = process.memory_info().rss
    for _ in range(100):
        one()
    drift = process.memory_info().rss / before - 1
    assert drift < 0.05, f"RSS grew {drift:.1%} over 100 runs"


def test_stop_while_the_model_loads_ends_the_run_before_any_token(tiny_dirs):
    stop = threading.Event()
    asked = SideRequest(str(tiny_dirs["dense"]), "dense"), SideRequest(str(tiny_dirs["drelu"]), "dense")
    settings = Settings(max_new_tokens=50)
    rounds = run_compare(ModelStore(), *asked, PROMPT, settings, stop, on_progress=lambda _: stop.set())
    left, right = last_round(rounds)
    assert left.steps == right.steps == () and "stopped" in left.notice

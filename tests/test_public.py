"""Public mode: the policy, and the run queue that serves clients in turn, one run each."""

import threading

import pytest

from turbo_demo.app.engine.public import Policy, RunQueue, policy_from
from turbo_demo.errors import UserError


def test_public_mode_is_on_on_a_space_and_off_locally(monkeypatch):
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.setenv("TURBO_DEMO_ALLOW_MODELS", "org/a, /models/b")
    assert not policy_from(None, []).public and policy_from(None, []).allowed is None
    monkeypatch.setenv("SPACE_ID", "someone/turbosparse")
    policy = policy_from(None, ["org/c"])
    assert policy.public and policy.allowed == ("org/c", "org/a", "/models/b")
    assert policy.runs_per_client == 1 and policy.max_new_tokens <= 256
    assert policy_from(False, []).public is False


@pytest.mark.parametrize("prompt, message", [(None, "must be text"), (3, "must be text"), (" ", "empty prompt")])
def test_prompts_are_checked(prompt, message):
    with pytest.raises(UserError, match=message):
        Policy().check_prompt(prompt)
    with pytest.raises(UserError, match="at most 10"):
        Policy(max_prompt_chars=10).check_prompt("x" * 11)


def test_one_entry_per_client_and_runs_in_arrival_order():
    queue, stop = RunQueue(per_client=1), threading.Event()
    a, b = queue.join("alice"), queue.join("bob")
    with pytest.raises(UserError, match="already have a run queued or running"):
        queue.join("alice")
    assert list(queue.wait(a, stop)) == []  # first in line: no wait
    order, ahead_seen, waiting = [], [], threading.Event()

    def second():
        for ahead in queue.wait(b, stop):
            ahead_seen.append(ahead)
            waiting.set()  # bob is in line behind alice
        order.append("bob")
        queue.leave(b)

    worker = threading.Thread(target=second)
    worker.start()
    assert waiting.wait(5)
    order.append("alice")
    queue.leave(a)
    worker.join(5)
    assert order == ["alice", "bob"] and ahead_seen == [1] and len(queue) == 0
    queue.join("alice")  # alice's run ended: she may queue again


def test_stop_while_queued_ends_the_wait():
    queue, stop = RunQueue(), threading.Event()
    first, waiting = queue.join("a"), queue.join("b")
    stop.set()
    assert list(queue.wait(waiting, stop)) == []  # returns at once, though not its turn
    queue.leave(waiting)
    queue.leave(first)
    assert len(queue) == 0


def test_public_mode_loads_only_the_allow_list(tiny_dirs):
    from turbo_demo.app.engine.catalog import ModelStore, model_modes

    allowed = (str(tiny_dirs["drelu"]),)
    store = ModelStore(allowed=allowed)
    assert store.get(allowed[0]).model.config.model_type == "bamboo"
    assert store.get("TurboSparse dReLU").name == "TurboSparse dReLU"  # the embedded ones too
    alias = f"{tiny_dirs['drelu']}/../{tiny_dirs['drelu'].name}"
    for probe in ("/etc", "/root/.ssh", "~", alias, str(tiny_dirs["dense"]), "org/name", 7, None):
        with pytest.raises(UserError) as refused:
            store.get(probe)
        message = str(refused.value)
        assert "not found" not in message and "config.json" not in message  # nothing about the disk
    with pytest.raises(UserError, match="offers only its listed models"):
        model_modes("/etc", allowed)


def test_a_replaced_directory_is_loaded_again_and_a_deleted_one_refused(tmp_path, tokenizer):
    import shutil

    import torch

    from conftest import tiny_model
    from turbo_demo.app.engine.catalog import ModelStore
    from turbo_demo.checkpoints.checkpoint import save_checkpoint

    path = save_checkpoint(tiny_model("dense", seed=1), tokenizer, tmp_path / "m", dtype=torch.float32)
    store = ModelStore()
    first = store.get(str(path)).model.lm_head.weight.clone()
    assert torch.equal(store.get(str(path)).model.lm_head.weight, first)  # unchanged: the same entry
    shutil.rmtree(path)
    save_checkpoint(tiny_model("dense", seed=2), tokenizer, path, dtype=torch.float32)
    assert not torch.equal(store.get(str(path)).model.lm_head.weight, first)
    shutil.rmtree(path)
    with pytest.raises(UserError, match="not found"):
        store.get(str(path))


def test_the_page_refuses_a_store_without_the_policys_allow_list():
    """app.py builds the store before the page: a store made without the allow-list would load
    any path a visitor sends, whatever the menus offer."""
    from turbo_demo.app.engine.catalog import ModelStore
    from turbo_demo.app.engine.public import public_policy
    from turbo_demo.app.ui.page import build_demo

    policy = public_policy([])
    with pytest.raises(ValueError, match="allow-list"):
        build_demo(ModelStore(), policy=policy)
    build_demo(ModelStore(allowed=policy.allowed), policy=policy)
    with pytest.raises(UserError, match="offers only its listed models"):
        ModelStore(allowed=policy.allowed).get("/etc")

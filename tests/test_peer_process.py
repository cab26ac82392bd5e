"""A peer in its own process (bench/process.py): a peer that dies, at its start or in any round,
costs the bench its rows and one note, not the run. The crashes here are real: the child kills
itself with SIGSEGV, as llama.cpp did on an AMX CPU."""

import os
import signal

import pytest

from turbo_demo.bench.process import PeerFailed, Worker


class Engine:
    """A peer's engine that segfaults where it is told to."""

    def __init__(self, crash_at_start: bool = False):
        if crash_at_start:
            os.kill(os.getpid(), signal.SIGSEGV)
        self.calls = 0

    def generate(self, n: int) -> list[int]:
        self.calls += 1
        return list(range(n))

    def tokens(self, n: int):
        yield from range(n)

    def crash(self, _n: int) -> None:
        os.kill(os.getpid(), signal.SIGSEGV)

    def fail(self) -> None:
        raise ValueError("no such tensor")


class NoBar:
    def update(self) -> None:
        pass


def test_calls_streams_and_errors_come_back_from_the_child():
    worker = Worker("peer", Engine)
    assert worker.call("generate", 3) == [0, 1, 2]
    assert list(worker.stream("tokens", 4)) == [0, 1, 2, 3]
    assert worker.call("generate", 1) == [0] and worker.process.pid != os.getpid()
    with pytest.raises(PeerFailed, match=r"peer: ValueError: no such tensor \(test_peer_process.py:\d+\)"):
        worker.call("fail")
    with pytest.raises(PeerFailed):  # a peer that failed once stays failed: its numbers are not trusted
        worker.call("generate", 1)
    assert not worker.process.is_alive()


def test_a_crash_at_start_is_an_error_naming_the_signal():
    with pytest.raises(PeerFailed, match="peer: its process was killed by SIGSEGV"):
        Worker("peer", Engine, True)


def test_a_peer_that_crashes_in_a_round_leaves_the_rounds_with_one_note():
    # here, not at the top: the children import this module for Engine, and this one imports torch
    from turbo_demo.bench.common import timed_rounds

    notes = []
    healthy, doomed = Worker("healthy", Engine), Worker("doomed", Engine)
    doomed.on_failure = notes.append
    turns = {"doomed": 0}

    def doomed_call():  # warm-up, round 0, then a crash in round 1
        turns["doomed"] += 1
        doomed.call("crash" if turns["doomed"] == 3 else "generate", 2)
        return (1.0,)

    def healthy_call():
        healthy.call("generate", 2)
        return (2.0,)

    calls = {"ours": lambda: (0.5,), "healthy": healthy_call, "doomed": doomed_call}
    results = timed_rounds(calls, 4, NoBar())
    assert results == {"ours": [0.5], "healthy": [2.0]}
    assert notes == ["doomed: its process was killed by SIGSEGV"]
    assert turns["doomed"] == 3 and healthy.call("generate", 1) == [0]
    healthy.close()
    assert not healthy.process.is_alive()

"""A peer in its own process, so that a peer that crashes costs the bench its rows and one note,
not the run (llama.cpp has segfaulted on its first eval on an AMX CPU; a segfault in-process
would end the whole benchmark).

A Worker spawns a process that builds one engine, `factory(*args)`, and then serves calls of its
methods over a pipe. A generator method's items come back one message each as they are made,
so the first token of a request is timed when it arrives. Callers time the calls themselves, as
they time our engines; a call's round trip through the pipe is tens of microseconds, against
milliseconds per token. Only the standard library here: the child imports this module and the
factory's, nothing else of the bench."""

import contextlib
import multiprocessing
import signal
import traceback
from collections.abc import Callable, Iterator


class PeerFailed(RuntimeError):
    """The peer's process died, or its engine raised: its rows are left out."""


def serve(conn, factory: Callable, args: tuple) -> None:
    """The child's loop: build the engine, answer ("ready", None), then answer each
    (method, args, stream) message until None or a closed pipe."""
    try:
        engine = factory(*args)
    except Exception as exc:  # reported to the parent, which raises PeerFailed with it
        conn.send(("error", describe(exc)))
        return
    conn.send(("ready", None))
    while (message := conn.recv()) is not None:
        method, call_args, stream = message
        try:
            result = getattr(engine, method)(*call_args)
            if stream:
                for item in result:
                    conn.send(("item", item))
                conn.send(("end", None))
            else:
                conn.send(("result", result))
        except Exception as exc:
            conn.send(("error", describe(exc)))


def describe(exc: BaseException) -> str:
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}" + (
        f" ({where.filename.rsplit('/', 1)[-1]}:{where.lineno})" if where else ""
    )


def exit_reason(code: int | None) -> str:
    if code is None:
        return "its process stopped answering"
    if code < 0:
        return f"its process was killed by {signal.Signals(-code).name}"
    return f"its process exited with status {code}"


class Worker:
    """`factory(*args)` built in a spawned process; `label` names it in errors. Raises
    PeerFailed if the engine cannot be built there."""

    def __init__(self, label: str, factory: Callable, *args):
        self.label = label
        context = multiprocessing.get_context("spawn")  # no fork of a process holding OpenMP threads
        self.conn, child = context.Pipe()
        self.process = context.Process(target=serve, args=(child, factory, args), daemon=True)
        self.process.start()
        child.close()  # the parent's copy: the pipe reads EOF once the child is gone
        self.failure: str | None = None
        self.on_failure: Callable[[str], None] | None = None  # called once, with the failure
        self.receive()

    def receive(self):
        """The next message's value; PeerFailed on an error or a dead process (and every call
        after that)."""
        if self.failure is not None:
            raise PeerFailed(self.failure)
        try:
            kind, value = self.conn.recv()
        except (EOFError, OSError):
            self.process.join(timeout=5)
            kind, value = "error", exit_reason(self.process.exitcode)
        if kind == "error":
            self.failure = f"{self.label}: {value}"
            self.close()
            if self.on_failure is not None:
                self.on_failure(self.failure)
            raise PeerFailed(self.failure)
        return value

    def call(self, method: str, *args):
        """engine.method(*args), run in the child."""
        self.send((method, args, False))
        return self.receive()

    def stream(self, method: str, *args) -> Iterator:
        """The items of the generator engine.method(*args), each as the child makes it."""
        self.send((method, args, True))
        while (item := self.receive()) is not None:  # "end" carries None; no item is None
            yield item

    def send(self, message) -> None:
        if self.failure is not None:
            raise PeerFailed(self.failure)
        with contextlib.suppress(OSError):  # the child is gone: receive() says how
            self.conn.send(message)

    def close(self) -> None:
        """Stop the child (idempotent)."""
        if self.process.is_alive():
            with contextlib.suppress(OSError):
                self.conn.send(None)
            self.process.join(timeout=10)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
        self.conn.close()

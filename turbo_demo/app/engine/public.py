"""The limits of a public deployment (a Hugging Face Space), and the gate that enforces them.

Public mode is on with `python app.py --public`, or wherever Spaces sets SPACE_ID. Then:
models come only from an allow-list (the embedded ones plus what the operator names with
--allow-model or TURBO_DEMO_ALLOW_MODELS, as a directory or hub id); prompts and tokens per
request are capped; each request has a wall-time limit; each client has at most one run queued
or running; uploads are refused; errors never name a path. Local mode keeps free paths and
the app's usual limits.
"""

import itertools
import logging
import math
import os
import re
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from turbo_demo.errors import UserError

MAX_NEW_TOKENS = 256  # the most new tokens a run may ask for (a public policy may allow fewer)


@dataclass(frozen=True)
class Policy:
    """What a request may ask for. allowed: extra model names (directories or hub ids) beyond
    the embedded ones, in public mode; None in local mode (any path)."""

    public: bool = False
    allowed: tuple[str, ...] | None = None
    max_prompt_chars: int = 20_000
    max_new_tokens: int = MAX_NEW_TOKENS
    time_limit_s: float = math.inf
    runs_per_client: int = 0  # 0: no limit

    def check_prompt(self, prompt) -> str:
        if not isinstance(prompt, str):
            raise UserError(f"the prompt must be text, got {type(prompt).__name__}")
        if not prompt.strip():
            raise UserError("empty prompt: type something for the models to continue")
        if len(prompt) > self.max_prompt_chars:
            raise UserError(
                f"the prompt has {len(prompt):,} characters; this app takes at most {self.max_prompt_chars:,}"
            )
        return prompt

    def describe(self) -> str:
        extra = ", ".join(self.allowed or ()) or "none"
        return (
            f"models: the embedded ones, plus {extra}; prompts up to {self.max_prompt_chars:,} characters, "
            f"{self.max_new_tokens} new tokens, {self.time_limit_s:.0f} s per request, "
            f"{self.runs_per_client} run per client at a time; uploads refused"
        )

    def error_line(self, exc: Exception, model: str) -> str:
        """One line for a side's failure. In public mode an unexpected exception is not shown
        (it may name files; the server log has it), and a UserError never names a path."""
        if isinstance(exc, UserError):
            return redact(str(exc)) if self.public else str(exc)
        if self.public:
            log.exception("run of %s failed", model)
            return "the model failed on this request (the server log has the details)"
        return f"{type(exc).__name__}: {exc}"


LOCAL = Policy()
log = logging.getLogger("turbo_demo.app")
# an absolute, home or relative path; not the slash inside a hub id (org/name)
PATHLIKE = re.compile(r"(?<![\w.-])(?:~|\.{1,2})?/[^\s:,;'\"]+")


def redact(message: str) -> str:
    """message with every path in it replaced by "<path>"."""
    return PATHLIKE.sub("<path>", message)


def public_policy(allowed: list[str]) -> Policy:
    """The limits of a public Space on 2 vCPUs: ~30 s of decoding per request at most."""
    return Policy(
        public=True,
        allowed=tuple(allowed),
        max_prompt_chars=2_000,
        max_new_tokens=128,
        time_limit_s=float(os.environ.get("TURBO_DEMO_TIME_LIMIT", 60)),
        runs_per_client=1,
    )


def policy_from(public: bool | None, allowed: list[str]) -> Policy:
    """Public where asked, or on a Space (SPACE_ID set); allowed: the operator's extra models,
    from the flags and TURBO_DEMO_ALLOW_MODELS (comma-separated)."""
    extra = [m.strip() for m in os.environ.get("TURBO_DEMO_ALLOW_MODELS", "").split(",") if m.strip()]
    if public is None:
        public = bool(os.environ.get("SPACE_ID"))
    return public_policy([*allowed, *extra]) if public else Policy()


def client_of(request) -> str:
    """Who a Gradio request (gr.Request, or None outside a server) comes from: the first
    X-Forwarded-For address behind a proxy (Spaces), else the peer's address."""
    if request is None:
        return "local"
    forwarded = (request.headers.get("x-forwarded-for") or "").split(",")[0].strip()
    return forwarded or (request.client.host if request.client else "unknown")


class RunQueue:
    """Runs one at a time (two models timed on a shared CPU must not compete), clients served
    in arrival order, and at most `per_client` entries (waiting or running) per client (0: any).

        ticket = queue.join(client)            # a UserError when the client has its share
        try:
            for ahead in queue.wait(ticket, stop): ...   # while others go first
            ... run, unless stop was set while waiting ...
        finally:
            queue.leave(ticket)
    """

    def __init__(self, per_client: int = 0):
        self.per_client = per_client
        self._order: deque[tuple[int, str]] = deque()  # waiting and running tickets, in turn
        self._next = itertools.count()
        self._cond = threading.Condition()

    def join(self, client: str) -> tuple[int, str]:
        with self._cond:
            if self.per_client and sum(c == client for _, c in self._order) >= self.per_client:
                raise UserError("you already have a run queued or running: wait for it to finish, or press Stop")
            ticket = (next(self._next), client)
            self._order.append(ticket)
            return ticket

    def wait(self, ticket: tuple[int, str], stop: threading.Event, poll_s: float = 0.25) -> Iterator[int]:
        """Yield the number of runs ahead whenever it changes, until ticket's turn or stop."""
        last = -1
        while not stop.is_set():
            with self._cond:
                ahead = self._order.index(ticket)
                if ahead == 0:
                    return
                if ahead == last:
                    self._cond.wait(poll_s)
                    continue
            last = ahead
            yield ahead

    def leave(self, ticket: tuple[int, str]) -> None:
        with self._cond:
            if ticket in self._order:
                self._order.remove(ticket)
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._order)

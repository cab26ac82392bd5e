"""Warm runtimes, kept with their loaded model: a runtime is built and warmed once per model,
mode, options and kernels, then handed from request to request.

    with loaded.runtimes.checkout(mode, kernels, options) as lease:
        lease.runtime.generate(...)   # lease.warm_up_s: what this request paid to warm it (0.0: none)

A request takes an idle warm runtime of its key, or builds and warms one where none is idle (two
requests at once on the same key: the second builds its own), and gives it back when it ends,
stopped or closed included. A runtime is reusable as it is: `generate` resets the KV cache's
position at prefill and zeroes the firing counts, and `warm_up` restores the modes' state. The
pool keeps at most IDLE_PER_KEY idle runtimes per key and IDLE_PER_MODEL in all (the least
recently returned go first); closing it (the store evicts the model) drops them all, and a
runtime returned after that is dropped too.
"""

import threading
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from turbo_demo.errors import UserError
from turbo_demo.runtime import Decoder, Kernels, PackedModel, open_runtime

IDLE_PER_KEY = 2  # two requests on the same model and mode at once each find a warm one
IDLE_PER_MODEL = 4  # threshold mode makes a key per target sparsity: keep the recent ones only


def frozen(options) -> Hashable:
    """A mode's options as a key: its dataclass (frozen, so hashable), or per-layer lists of
    them (threshold mode's calibrated thresholds; a MoE layer's list per expert) as tuples."""
    if isinstance(options, (list, tuple)):
        return tuple(frozen(o) for o in options)
    return options


def pool_key(mode: str, kernels: Kernels, options=None) -> tuple:
    """What makes two runtimes of one model interchangeable. Kernels by class and name: the
    page's and the API's calls may each hold their own object of the same kernels."""
    return mode, frozen(options), type(kernels), kernels.name


@dataclass
class Lease:
    runtime: Decoder
    warm_up_s: float  # seconds this checkout spent warming the runtime; 0.0 where it was warm


class RuntimePool:
    """The idle warm runtimes of one packed model (thread-safe); `runtime_bytes`: what one
    idle runtime holds beyond the pack (its KV cache), for the store's budget."""

    def __init__(self, packed: PackedModel, runtime_bytes: int = 0):
        self.packed, self.runtime_bytes = packed, runtime_bytes
        self._idle: list[tuple[tuple, Decoder]] = []  # least recently returned first
        self._closed = False
        self._lock = threading.Lock()

    def idle(self, mode: str | None = None) -> list[Decoder]:
        """The idle runtimes (of `mode` only, where given), least recently returned first."""
        with self._lock:
            return [runtime for key, runtime in self._idle if mode is None or key[0] == mode]

    @property
    def extra_bytes(self) -> int:
        """Bytes the idle runtimes hold beyond the one runtime a model's estimate counts."""
        with self._lock:
            return max(0, len(self._idle) - 1) * self.runtime_bytes

    @contextmanager
    def checkout(self, mode: str, kernels: Kernels, options=None) -> Iterator[Lease]:
        """An idle warm runtime of this key, or a new one warmed here (outside the lock, so that
        other requests take theirs meanwhile); given back when the block ends, closed or stopped
        included. A runtime that raised anything but a UserError is dropped, not given back."""
        key = pool_key(mode, kernels, options)
        with self._lock:
            mine = [i for i, (k, _) in enumerate(self._idle) if k == key]
            runtime = self._idle.pop(mine[-1])[1] if mine else None
        lease = Lease(runtime, 0.0) if runtime is not None else None
        if lease is None:
            runtime = open_runtime(self.packed, mode, kernels, options)
            runtime.warm_up()
            lease = Lease(runtime, runtime.warm_up_s)
        try:
            yield lease
        except (GeneratorExit, UserError):
            self.give_back(key, lease.runtime)
            raise
        else:
            self.give_back(key, lease.runtime)

    def give_back(self, key: tuple, runtime: Decoder) -> None:
        runtime.reset()  # an idle runtime keeps no request's cache (transformers' grows per run)
        with self._lock:
            if self._closed:
                return
            self._idle.append((key, runtime))
            mine = [i for i, (k, _) in enumerate(self._idle) if k == key]
            if len(mine) > IDLE_PER_KEY:
                del self._idle[mine[0]]
            del self._idle[: max(0, len(self._idle) - IDLE_PER_MODEL)]

    def close(self) -> None:
        """Drop every idle runtime, and any given back later: the model leaves the store."""
        with self._lock:
            self._closed = True
            self._idle.clear()

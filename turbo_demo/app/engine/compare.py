"""The side-by-side engine: two models decode the same prompt, one step each in turn.

Fairness: the two generators are stepped alternately (as FastChat's arena does), so exactly
one model computes at any time and each step is timed alone inside its runtime. A side that
fails (unknown model, broken directory, unsupported mode) records its error and the other side
goes on. A shared threading.Event stops both within one step. Models load inside the engine
(once per store), telling `on_progress(message)`; the kernels are the ones chosen at start. Each
side borrows a warm runtime from its model's pool (app/pool.py) and times each phase it waits for.

State moves by value: each side is asked by a SideRequest, and every round yields both sides as
new SideSnapshots (engine/sides.py), frozen; the engine keeps only its own latest snapshot per
side, so that nothing a caller holds changes after it was yielded. `last_round(run_compare(...))`
runs to the end and gives the final pair.
"""

import math
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, replace
from threading import Event

import psutil

from turbo_demo.app.engine.catalog import ModelStore
from turbo_demo.app.engine.public import LOCAL, MAX_NEW_TOKENS, Policy
from turbo_demo.app.engine.sides import SideRequest, SideSnapshot
from turbo_demo.checkpoints.config import dtype_name
from turbo_demo.checkpoints.generation import encode_prompt
from turbo_demo.errors import UserError
from turbo_demo.runtime import Kernels
from turbo_demo.runtime.calibration import threshold_options
from turbo_demo.runtime.decoder import Sampling
from turbo_demo.runtime.moe import moe_shape
from turbo_demo.runtime.stats import StepStats, pack_codes

MAX_SPARSITY = 0.95
MAX_MAP_BYTES = 8 * 2**20  # a side's kept neuron maps: 256 steps of the embedded models take 320 kB

Sides = tuple[SideSnapshot, SideSnapshot]  # (left, right) after a round


@dataclass(frozen=True)
class Settings:
    max_new_tokens: int = 64
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0
    audit: bool = True  # predictor recall, measured outside the timed step
    chat: bool = True  # the prompt as the user's turn, for models with a chat template
    system: str = ""  # with chat: a system turn first
    sparsity: float = 0.5  # threshold mode's target, calibrated per model

    def checked(self) -> "Settings":
        """The same settings clamped to what the app allows (the widgets clamp too); a value
        that is not a finite number (or a seed outside [0, 2**63)) is a UserError naming it."""
        return Settings(
            max(1, min(MAX_NEW_TOKENS, int(number("max new tokens", self.max_new_tokens)))),
            max(0.0, min(2.0, number("temperature", self.temperature))),
            max(0.05, min(1.0, number("top-p", self.top_p))),
            seed_of(self.seed),
            bool(self.audit),
            bool(self.chat),
            text_of("system prompt", self.system),
            max(0.0, min(MAX_SPARSITY, number("target sparsity", self.sparsity))),
        )


def number(name: str, value) -> float:
    """value as a finite float, else a UserError; bools and strings are not numbers here."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {value}")
    return float(value)


def seed_of(value) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise UserError(f"the seed must be a whole number in [0, 2**63), got {value!r:.40}")
    return value


def text_of(name: str, value) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UserError(f"{name} must be text, got {type(value).__name__}")
    return value


def with_codes(side: SideSnapshot, stats: StepStats) -> SideSnapshot:
    """Move the step's neuron codes out of `stats` (a snapshot's steps hold no tensors) into the
    side's maps, packed, while they fit MAX_MAP_BYTES."""
    codes, stats.codes = stats.codes, None
    if codes is None or not codes.numel() or (len(side.maps) + 1) * (codes.numel() // 4 + 1) > MAX_MAP_BYTES:
        return side
    return replace(side, maps=(*side.maps, pack_codes(codes)), map_shape=tuple(codes.shape))


def fit_prompt(ids: list[int], context: int, max_new_tokens: int) -> tuple[list[int], str]:
    """Keep the last tokens of the prompt so that prompt + new tokens fit the context."""
    room = max(1, context - max_new_tokens)
    if len(ids) <= room:
        return ids, ""
    return ids[-room:], f"prompt truncated from the left to its last {room} tokens (context {context})"


def side_steps(
    store: ModelStore,
    request: SideRequest,
    prompt: str,
    settings: Settings,
    kernels: Kernels,
    stop: Event,
    on_progress: Callable[[str], None] | None,
    policy: Policy,
) -> Generator[SideSnapshot, None, SideSnapshot]:
    """Run one side on a runtime lent by its model's pool: yields a new snapshot after every
    token and returns the last one (its firing counts, or the error that ended it)."""
    side = SideSnapshot.of(request)
    try:
        loaded, load_s = store.load(request.model, on_progress, request.quant)
        side = replace(side, quant=loaded.packed.quant, load_s=load_s)
        if stop.is_set():  # stopped while the model loaded
            return side
        options = None
        if request.mode == "threshold" and loaded.packed.ffns:
            if on_progress is not None:
                on_progress(f"Calibrating {request.model}'s thresholds for {settings.sparsity:.0%} sparsity…")
            context = getattr(loaded.model.config, "max_position_embeddings", 512)
            options = threshold_options(loaded.packed, loaded.tokenizer, settings.sparsity, context)
        with loaded.runtimes.checkout(request.mode, kernels, options) as lease:
            runtime = lease.runtime  # warmed before any clock starts
            side = replace(
                side,
                warm_up_s=lease.warm_up_s,
                engine=runtime.engine,
                weight_bytes=loaded.weight_bytes,
                threads=runtime.threads,
                moe=moe_shape(loaded.packed),
                dtype=dtype_name(loaded.model.dtype),
            )
            ids, rendered = encode_prompt(loaded.tokenizer, prompt, settings.system, settings.chat)
            side = replace(side, rendered_prompt=rendered)
            if not ids:
                raise UserError("the prompt gives no tokens for this model's tokenizer")
            prompt_ids, truncated = fit_prompt(ids, runtime.max_len, settings.max_new_tokens)
            notes = [f"{note}: the app uses the Temperature slider" for note in loaded.generation.notes]
            side = replace(side, prompt_ids=tuple(prompt_ids)).noted(truncated, *notes)
            process = psutil.Process()
            started = time.perf_counter()
            for stats in runtime.generate(
                prompt_ids,
                settings.max_new_tokens,
                Sampling(settings.temperature, settings.top_p, settings.seed),
                stop=stop,
                stop_ids=loaded.generation.stop_ids,
                vocab=loaded.generation.vocab,
                audit=settings.audit,
                codes=True,
            ):
                if side.first_token_s is None:
                    side = replace(side, first_token_s=time.perf_counter() - started, prefill_s=runtime.prefill_s)
                token_ids = (*side.token_ids, stats.token)
                text = loaded.tokenizer.decode(list(token_ids), skip_special_tokens=True)
                # a token that completes a character replaces the "\ufffd" its first bytes decoded to
                kept = side.text if text.startswith(side.text) else side.text.rstrip("\ufffd")
                side = replace(
                    with_codes(side, stats),
                    steps=(*side.steps, stats),
                    token_ids=token_ids,
                    pieces=(*side.pieces, text[len(kept) :]),
                    text=text,
                    peak_rss=max(side.peak_rss, process.memory_info().rss),
                )
                yield side
            return replace(side, firing_counts=tuple(map(tuple, runtime.firing_counts())))
    except Exception as exc:  # one side's failure must never take the other side down
        return replace(side, error=policy.error_line(exc, request.model))


def run_compare(
    store: ModelStore,
    left: SideRequest,
    right: SideRequest,
    prompt: str,
    settings: Settings,
    stop: Event | None = None,
    kernels: Kernels | None = None,
    on_progress: Callable[[str], None] | None = None,
    policy: Policy = LOCAL,
) -> Iterator[Sides]:
    """Step both sides in turn until both finish, stop is set, or the policy's time limit
    passes; yields both sides' snapshots after every round, the last round's final (firing
    counts, errors, the run's notices). kernels: the decode kernels (default: the PyTorch
    reference); policy: the limits of the deployment (default: local, unlimited)."""
    prompt = policy.check_prompt(prompt)
    stop = stop or Event()
    settings = settings.checked()
    settings = replace(settings, max_new_tokens=min(settings.max_new_tokens, policy.max_new_tokens))
    kernels = kernels or Kernels()
    deadline = time.monotonic() + policy.time_limit_s
    # the engine's own accumulator: each side's latest snapshot, and the generators still running
    latest = [SideSnapshot.of(left), SideSnapshot.of(right)]
    running = {
        i: side_steps(store, r, prompt, settings, kernels, stop, on_progress, policy)
        for i, r in enumerate((left, right))
    }
    notes: list[str] = []  # the run's own notices, after each side's (which a side makes before its first token)
    while running:
        for i, steps in list(running.items()):
            try:
                latest[i] = next(steps)
            except StopIteration as end:
                latest[i] = end.value
                del running[i]
        if running and not stop.is_set() and time.monotonic() > deadline:
            stop.set()
            notes.append(f"ended at this app's time limit of {policy.time_limit_s:.0f} s per request")
        if not running and stop.is_set() and time.monotonic() <= deadline:
            notes.append("stopped")
        yield latest[0].noted(*notes), latest[1].noted(*notes)


def last_round(rounds: Iterator[Sides]) -> Sides:
    """The last round of a run (run_compare's), stepped to its end: both sides as they finished."""
    return deque(rounds, maxlen=1)[0]

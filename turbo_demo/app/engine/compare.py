"""The side-by-side engine: two models decode the same prompt, one step each in turn.

Fairness: the two generators are stepped alternately (as FastChat's arena does), so exactly
one model computes at any time and each step is timed alone inside its runtime. A side that
fails (unknown model, broken directory, unsupported mode) records its error and the other side
goes on. A shared threading.Event stops both within one step. Models load inside the engine
(once per store), telling `on_progress(message)`; the kernels are the ones chosen at start. Each
side borrows a warm runtime from its model's pool (app/pool.py) and times each phase it waits for.
"""

import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from threading import Event

import psutil

from turbo_demo.app.engine.catalog import ModelStore
from turbo_demo.app.engine.public import LOCAL, MAX_NEW_TOKENS, Policy
from turbo_demo.checkpoints.config import dtype_name
from turbo_demo.checkpoints.generation import encode_prompt
from turbo_demo.errors import UserError
from turbo_demo.runtime import Kernels
from turbo_demo.runtime.calibration import threshold_options
from turbo_demo.runtime.moe import moe_shape
from turbo_demo.runtime.stats import StepStats, pack_codes

MAX_SPARSITY = 0.95
MAX_MAP_BYTES = 8 * 2**20  # a side's kept neuron maps: 256 steps of the embedded models take 320 kB


@dataclass
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


@dataclass
class SideRecord:
    """Everything one side of a run produced: the app's panels and the API read this."""

    model: str
    mode: str
    engine: str = ""
    dtype: str = ""
    quant: str | None = None  # given: the model's matrices quantized at load ("int8", "int4")
    prompt_ids: list[int] = field(default_factory=list)
    rendered_prompt: str = ""  # the text the model read (its chat template applied, if any)
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    steps: list[StepStats] = field(default_factory=list)
    weight_bytes: int = 0
    peak_rss: int = 0
    notice: str = ""
    error: str = ""
    # per layer and neuron: in how many decode steps it fired (the runtime's own counts)
    firing_counts: list[list[int]] = field(default_factory=list)
    # what a visitor waits for: load (0.0: the store held the model), warm-up (0.0: a warm runtime
    # was idle), prefill (the prompt but its last token), first token; its decode steps' threads
    threads: int = 0
    load_s: float = 0.0
    warm_up_s: float = 0.0
    prefill_s: float | None = None
    first_token_s: float | None = None
    # the token inspector's: each token's text piece, and each step's neuron codes packed
    # (stats.pack_codes, map_shape = (layers, neurons)) up to MAX_MAP_BYTES per side
    pieces: list[str] = field(default_factory=list)
    maps: list[bytes] = field(default_factory=list, repr=False)
    map_shape: tuple[int, int] = (0, 0)
    moe: tuple[int, int, int] | None = None  # (experts, neurons per expert, experts per token)

    @property
    def median_step_s(self) -> float:
        """The median decode step's time: one stall (another process, a first call) cannot
        move it, as it moves a mean."""
        return statistics.median(s.time_s for s in self.steps) if self.steps else 0.0

    @property
    def key(self) -> tuple[str, str]:
        return self.model, self.mode

    @property
    def tokens_per_s(self) -> float:
        """The headline speed: 1 / the median step time."""
        median = self.median_step_s
        return 1.0 / median if median > 0 else 0.0

    @property
    def mean_tokens_per_s(self) -> float:
        """Steps over their summed time: every stall counts."""
        seconds = sum(s.time_s for s in self.steps)
        return len(self.steps) / seconds if seconds else 0.0

    @property
    def mean_sparsity(self) -> float | None:
        values = [s.sparsity for s in self.steps if s.sparsity is not None]
        return sum(values) / len(values) if values else None

    def summary(self) -> dict:
        return {
            "model": self.model,
            "mode": self.mode,
            "engine": self.engine,
            "dtype": self.dtype,
            "quant": self.quant,
            "text": self.text,
            "tokens": len(self.token_ids),
            "tokens_per_s": round(self.tokens_per_s, 2),
            "mean_tokens_per_s": round(self.mean_tokens_per_s, 2),
            "load_s": round(self.load_s, 4),
            "warm_up_s": round(self.warm_up_s, 4),
            "prefill_s": None if self.prefill_s is None else round(self.prefill_s, 4),
            "first_token_s": None if self.first_token_s is None else round(self.first_token_s, 4),
            "mean_sparsity": None if self.mean_sparsity is None else round(self.mean_sparsity, 4),
            "peak_rss_mb": round(self.peak_rss / 2**20, 1),
            "error": self.error or None,
            "notice": self.notice or None,
        }


def add_notice(record: SideRecord, note: str) -> None:
    if note:
        record.notice = f"{record.notice}; {note}" if record.notice else note


def speedup(left: SideRecord, right: SideRecord) -> float | None:
    """Right's tokens/s over left's (median steps; the sparse side is on the right by default)."""
    if left.tokens_per_s and right.tokens_per_s:
        return right.tokens_per_s / left.tokens_per_s
    return None


def keep_codes(record: SideRecord, stats: StepStats) -> None:
    """Move the step's neuron codes into the record, packed, while they fit MAX_MAP_BYTES."""
    codes, stats.codes = stats.codes, None
    if codes is not None and codes.numel() and (len(record.maps) + 1) * (codes.numel() // 4 + 1) <= MAX_MAP_BYTES:
        record.map_shape = tuple(codes.shape)
        record.maps.append(pack_codes(codes))


def fit_prompt(ids: list[int], context: int, max_new_tokens: int) -> tuple[list[int], str]:
    """Keep the last tokens of the prompt so that prompt + new tokens fit the context."""
    room = max(1, context - max_new_tokens)
    if len(ids) <= room:
        return ids, ""
    return ids[-room:], f"prompt truncated from the left to its last {room} tokens (context {context})"


def side_steps(
    store: ModelStore,
    record: SideRecord,
    prompt: str,
    settings: Settings,
    kernels: Kernels,
    stop: Event,
    on_progress: Callable[[str], None] | None,
    policy: Policy,
) -> Iterator[None]:
    """Run one side on a runtime lent by its model's pool, updating `record` in place; yields once per token."""
    try:
        loaded, record.load_s = store.load(record.model, on_progress, record.quant)
        record.quant = loaded.packed.quant
        if stop.is_set():  # stopped while the model loaded
            return
        options = None
        if record.mode == "threshold" and loaded.packed.ffns:
            if on_progress is not None:
                on_progress(f"Calibrating {record.model}'s thresholds for {settings.sparsity:.0%} sparsity…")
            context = getattr(loaded.model.config, "max_position_embeddings", 512)
            options = threshold_options(loaded.packed, loaded.tokenizer, settings.sparsity, context)
        with loaded.runtimes.checkout(record.mode, kernels, options) as lease:
            runtime, record.warm_up_s = lease.runtime, lease.warm_up_s  # warmed before any clock starts
            record.engine, record.weight_bytes, record.threads = runtime.engine, loaded.weight_bytes, runtime.threads
            record.moe, record.dtype = moe_shape(loaded.packed), dtype_name(loaded.model.dtype)
            ids, record.rendered_prompt = encode_prompt(loaded.tokenizer, prompt, settings.system, settings.chat)
            if not ids:
                raise UserError("the prompt gives no tokens for this model's tokenizer")
            record.prompt_ids, truncated = fit_prompt(ids, runtime.max_len, settings.max_new_tokens)
            add_notice(record, truncated)
            for note in loaded.generation.notes:
                add_notice(record, f"{note}: the app uses the Temperature slider")
            process = psutil.Process()
            started = time.perf_counter()
            for stats in runtime.generate(
                record.prompt_ids,
                settings.max_new_tokens,
                settings.temperature,
                settings.top_p,
                settings.seed,
                stop=stop,
                stop_ids=loaded.generation.stop_ids,
                vocab=loaded.generation.vocab,
                audit=settings.audit,
                codes=True,
            ):
                if record.first_token_s is None:
                    record.first_token_s = time.perf_counter() - started
                    record.prefill_s = runtime.prefill_s
                record.steps.append(stats)
                record.token_ids.append(stats.token)
                keep_codes(record, stats)
                text = loaded.tokenizer.decode(record.token_ids, skip_special_tokens=True)
                # a token that completes a character replaces the "\ufffd" its first bytes decoded to
                kept = record.text if text.startswith(record.text) else record.text.rstrip("\ufffd")
                record.pieces.append(text[len(kept) :])
                record.text = text
                record.peak_rss = max(record.peak_rss, process.memory_info().rss)
                yield
            record.firing_counts = runtime.firing_counts()
    except Exception as exc:  # one side's failure must never take the other side down
        record.error = policy.error_line(exc, record.model)


def run_compare(
    store: ModelStore,
    left: SideRecord,
    right: SideRecord,
    prompt: str,
    settings: Settings,
    stop: Event | None = None,
    kernels: Kernels | None = None,
    on_progress: Callable[[str], None] | None = None,
    policy: Policy = LOCAL,
) -> Iterator[tuple[SideRecord, SideRecord]]:
    """Step both sides in turn until both finish, stop is set, or the policy's time limit
    passes; yields after every round. kernels: the decode kernels (default: the PyTorch
    reference); policy: the limits of the deployment (default: local, unlimited)."""
    prompt = policy.check_prompt(prompt)
    stop = stop or Event()
    settings = settings.checked()
    settings = replace(settings, max_new_tokens=min(settings.max_new_tokens, policy.max_new_tokens))
    kernels = kernels or Kernels()
    deadline = time.monotonic() + policy.time_limit_s
    running = [side_steps(store, rec, prompt, settings, kernels, stop, on_progress, policy) for rec in (left, right)]
    while running:
        for gen in list(running):
            if next(gen, StopIteration) is StopIteration:
                running.remove(gen)
        if running and not stop.is_set() and time.monotonic() > deadline:
            stop.set()
            for rec in (left, right):
                add_notice(rec, f"ended at this app's time limit of {policy.time_limit_s:.0f} s per request")
        yield left, right
    if stop.is_set() and time.monotonic() <= deadline:
        for rec in (left, right):
            add_notice(rec, "stopped")


def compare_summary(left: SideRecord, right: SideRecord) -> dict:
    """The JSON summary of the `compare` API endpoint."""
    ratio = speedup(left, right)
    return {"left": left.summary(), "right": right.summary(), "speedup": None if ratio is None else round(ratio, 3)}

"""What one side of a compare is asked to run (SideRequest) and what it has produced so far
(SideSnapshot): frozen values, with tuples for collections, so that a snapshot the engine handed
out reads the same however far the run has gone since. `speedup` and `compare_summary` read two
snapshots."""

import statistics
from dataclasses import dataclass, field, replace

from turbo_demo.runtime.stats import StepStats


@dataclass(frozen=True)
class SideRequest:
    """One side as asked: a model (a menu name, a directory or a hub id), its FFN mode, and the
    quantization to load its matrices in ("int8", "int4"; None: as stored)."""

    model: str
    mode: str
    quant: str | None = None


@dataclass(frozen=True)
class SideSnapshot:
    """One side of a run as it stood when the engine yielded it: the app's panels and the API
    read this. Later snapshots of the run share its tuples' items, which nothing changes (a
    StepStats is final once it is in a snapshot, its codes moved out into `maps`)."""

    model: str
    mode: str
    engine: str = ""
    dtype: str = ""
    quant: str | None = None  # as loaded: the request's, or what the checkpoint stores
    prompt_ids: tuple[int, ...] = ()
    rendered_prompt: str = ""  # the text the model read (its chat template applied, if any)
    token_ids: tuple[int, ...] = ()
    text: str = ""
    steps: tuple[StepStats, ...] = ()
    weight_bytes: int = 0
    peak_rss: int = 0
    notice: str = ""
    error: str = ""
    # per layer and neuron: in how many decode steps it fired (the runtime's own counts, at the end)
    firing_counts: tuple[tuple[int, ...], ...] = ()
    # what a visitor waits for: load (0.0: the store held the model), warm-up (0.0: a warm runtime
    # was idle), prefill (the prompt but its last token), first token; its decode steps' threads
    threads: int = 0
    load_s: float = 0.0
    warm_up_s: float = 0.0
    prefill_s: float | None = None
    first_token_s: float | None = None
    # the token inspector's: each token's text piece, and each step's neuron codes packed
    # (stats.pack_codes, map_shape = (layers, neurons)) up to compare.MAX_MAP_BYTES per side
    pieces: tuple[str, ...] = ()
    maps: tuple[bytes, ...] = field(default=(), repr=False)
    map_shape: tuple[int, int] = (0, 0)
    moe: tuple[int, int, int] | None = None  # (experts, neurons per expert, experts per token)

    @classmethod
    def of(cls, request: SideRequest) -> "SideSnapshot":
        """The side before anything ran: its request's model, mode and quantization."""
        return cls(request.model, request.mode, quant=request.quant)

    def noted(self, *notes: str) -> "SideSnapshot":
        """The same side with `notes` (the empty ones left out) after its notice, "; " between."""
        joined = "; ".join(filter(None, (self.notice, *notes)))
        return self if joined == self.notice else replace(self, notice=joined)

    @property
    def ids(self) -> list[int]:
        """The prompt's ids, then the generated ones: what a forward over the run reads."""
        return [*self.prompt_ids, *self.token_ids]

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


def speedup(left: SideSnapshot, right: SideSnapshot) -> float | None:
    """Right's tokens/s over left's (median steps; the sparse side is on the right by default)."""
    if left.tokens_per_s and right.tokens_per_s:
        return right.tokens_per_s / left.tokens_per_s
    return None


def compare_summary(left: SideSnapshot, right: SideSnapshot) -> dict:
    """The JSON summary of the `compare` API endpoint."""
    ratio = speedup(left, right)
    return {"left": left.summary(), "right": right.summary(), "speedup": None if ratio is None else round(ratio, 3)}

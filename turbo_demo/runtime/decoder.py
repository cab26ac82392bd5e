"""The generation loop both engines share: prefill, then one timed decode step per new token.

    sample(kernels, logits, ...) -> token   greedy, or temperature + top-p at one seeded uniform
    Decoder.warm_up(steps)                   untimed prefill + decode steps on a throwaway prompt
    Decoder.generate(prompt, n, Sampling())  yields one StepStats per new token

An engine gives `prefill(ids) -> logits`, `decode(token) -> (logits, records)` (one LayerRecord
per layer), `reset()`, and its per-layer modes; the runtime owns the firing counts (L, I) and
starts each sequence's modes afresh (`new_sequence`: threshold mode's threshold, which a prefill
may calibrate on its prompt, is per sequence).
"""

import statistics
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from threading import Event

import torch

from turbo_demo.errors import UserError
from turbo_demo.runtime.kernels import Kernels
from turbo_demo.runtime.modes import Mode, ThresholdMode, make_modes, mode_options
from turbo_demo.runtime.moe import MoEMode
from turbo_demo.runtime.packing import PackedModel
from turbo_demo.runtime.stats import LayerRecord, StepStats, neuron_codes

Thresholds = list[float | list[float]]  # per layer; a MoE layer's: one per expert

# Untimed decode steps before a runtime's first timed one: the first calls of a runtime's
# kernels (OpenMP's thread pool, oneDNN's GEMMs in prefill, the allocator's first blocks, the
# weights' first reads from the page cache) cost more than any later call.
WARM_UP_STEPS = 4
WARM_UP_PROMPT = 8  # tokens of the throwaway prompt (ids 0..7)
# A decode step at least this long streams its weights at the memory's pace, which fewer cores
# reach less of (a 7B step at int8: 27% slower on one core of two than on both, 40% in predictor
# mode, `bench --full`), while a web server sharing the cores takes a few milliseconds per token:
# such a step runs on every core (kernels.prefill_threads). Shorter steps keep the caller's
# threads, which a server keeps below its core count (app.py).
LONG_STEP_S = 0.02


@dataclass(frozen=True)
class Sampling:
    """How a generation chooses its tokens: greedy at temperature <= 0, else nucleus sampling
    (`sample`) from a CPU generator seeded with `seed`."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


def sample(kernels: Kernels, logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """Greedy for temperature <= 0, else nucleus sampling over softmax(logits / temperature)
    (Kernels.sample_top_p) at one uniform number from the seeded CPU generator."""
    if temperature <= 0:
        return kernels.argmax(logits)
    u = float(torch.rand((), generator=gen, dtype=torch.float64))
    return kernels.sample_top_p(logits.float(), temperature, top_p, u)


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's (and so the C++ kernels') threads in the calling thread for the block, then back;
    None: unchanged. OpenMP's thread count is a setting of the calling thread."""
    if n is None or n == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Decoder:
    """A runtime: one model, one FFN mode in every layer, one set of kernels."""

    engine = "?"
    max_len: int

    def __init__(self, packed: PackedModel, mode: str, kernels: Kernels, options=None, **given):
        """options: the mode's options dataclass (or a list of them, one per layer), or given as
        keywords (validated either way)."""
        device = packed.model.device
        if device.type not in kernels.devices:
            raise UserError(
                f"the {kernels.name} kernels run on {', '.join(kernels.devices)} and this model is on "
                f"{device}: use the torch backend (--backend torch), or move the model to the CPU"
            )
        if options is None:
            options = mode_options(mode, **given)
        elif given:
            raise UserError("give a mode's options as a dataclass or as keywords, not both")
        if not packed.ffns and mode != "dense":
            raise UserError(
                f"{mode} mode needs a gated FFN the sparse modes know (gate_proj, up_proj, down_proj "
                "with a relu, silu or gelu gate); this model runs in dense mode only"
            )
        self.packed, self.mode, self.kernels, self.options = packed, mode, kernels, options
        self.modes: list[Mode] = make_modes(packed.ffns, mode, kernels, options)
        n = packed.ffns[0].n if packed.ffns else 0
        self.firing = torch.zeros((len(packed.ffns), n), dtype=torch.int32, device=device)
        self.dense_ffn_bytes = sum(w.dense_bytes for w in packed.ffns)
        self.warm = False
        self.warm_up_s = 0.0  # the warm-up's seconds (0 until it ran)
        self.decode_threads: int | None = None  # chosen by the warm-up (None: the caller's threads)
        self.prefill_s = 0.0  # the last generation's prefill, in seconds

    def reset(self) -> None:
        raise NotImplementedError

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, token: int) -> tuple[torch.Tensor, list[LayerRecord]]:
        raise NotImplementedError

    @property
    def threads(self) -> int:
        """The threads its decode steps run on."""
        return self.decode_threads or torch.get_num_threads()

    def new_sequence(self) -> None:
        """Before a sequence's prefill: threshold mode's threshold back to the given one
        (ThresholdMode.reset), so that no sequence decodes with one calibrated on another's
        prompt (a one-token prompt has no prefill; a MoE expert may get none of a prompt's tokens)."""
        for mode in self.modes:
            mode.reset()

    def thresholds(self) -> Thresholds:
        """Threshold mode's threshold in each layer for the current sequence: the given one, or
        with a target sparsity the one the prefill calibrated on the prompt (a MoE layer's: one per
        expert; an expert none of the prompt's tokens reached keeps the given one)."""

        def of(mode) -> float:
            if not isinstance(mode, ThresholdMode):
                raise UserError(f"{self.mode} mode has no activation threshold")
            return mode.threshold

        return [[of(e) for e in mode.experts] if isinstance(mode, MoEMode) else of(mode) for mode in self.modes]

    def firing_counts(self) -> list[list[int]]:
        """Per layer and neuron: in how many decode steps of the last generation the neuron fired
        (h != 0 among the neurons its mode computed)."""
        return self.firing.tolist()

    def warm_up(self, steps: int = WARM_UP_STEPS) -> None:
        """Prefill a throwaway prompt and run `steps` decode steps and samples (greedy and
        nucleus), untimed, so that no timed step pays a first call. Then the firing counts are
        zeroed, the cache reset and the modes started afresh (`new_sequence`): the next generation
        runs as if this never had. Its time is kept in `warm_up_s`, and its steps' median time
        chooses `decode_threads` (LONG_STEP_S)."""
        start = time.perf_counter()
        vocab = self.packed.model.config.vocab_size
        ids = [i % vocab for i in range(min(WARM_UP_PROMPT, max(1, self.max_len - steps - 1)))]
        gen = torch.Generator().manual_seed(0)
        with torch_threads(self.kernels.prefill_threads):
            logits = self.prefill(torch.tensor(ids)) if len(ids) > 1 else None
        token, step_s = ids[-1], []
        for step in range(steps):
            begin = time.perf_counter()
            logits, records = self.decode(token)
            step_s.append(time.perf_counter() - begin)
            token = sample(self.kernels, logits, 0.7 if step % 2 else 0.0, 0.95, gen)
            for mode, record in zip(self.modes, records):
                mode.recall(record)
        del logits
        every_core = self.kernels.prefill_threads
        if step_s and every_core and every_core > torch.get_num_threads():
            # the first step pays first calls: the later ones decide
            self.decode_threads = every_core if statistics.median(step_s[1:] or step_s) >= LONG_STEP_S else None
        self.firing.zero_()
        self.reset()
        self.new_sequence()
        self.warm = True
        self.warm_up_s = time.perf_counter() - start

    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int = 64,
        sampling: Sampling = Sampling(),
        stop: Event | None = None,
        stop_ids: Collection[int] = (),
        vocab: int | None = None,
        audit: bool = False,
        warm_up: int = WARM_UP_STEPS,
        codes: bool = False,
    ) -> Iterator[StepStats]:
        """Yield one StepStats per new token, until max_new_tokens, a token in stop_ids, or stop;
        each token chosen as `sampling` says (greedy by default).

        vocab: only ids below it are ever sampled (logits[:vocab]): an embedding padded beyond
        the tokenizer's ids has rows no text decodes to (None: every row).

        The prompt but its last token is prefilled (the modes' prefill, on the kernels'
        prefill_threads where they name a number); every new token comes from a decode step in
        the runtime's mode (on `decode_threads` where the warm-up chose them), timed alone
        (decode + sample). The recall audit,
        when on, runs after the timer stops so that it never counts as decoding time; so does,
        with `codes`, each step's per-neuron codes (StepStats.codes, stats.NEURON_CODES). A runtime
        that has not run yet first warms up (`warm_up` untimed steps; 0: never); `prefill_s`
        then holds the prefill's time, which the first token waits for on top of its step.
        """
        if not prompt_ids:
            raise UserError("empty prompt: give at least one token")
        if warm_up and not self.warm:
            self.warm_up(warm_up)
        gen = torch.Generator().manual_seed(sampling.seed)
        max_new_tokens = min(max_new_tokens, self.max_len - len(prompt_ids) + 1)
        self.firing.zero_()
        self.new_sequence()
        start = time.perf_counter()
        if len(prompt_ids) > 1:
            with torch_threads(self.kernels.prefill_threads):
                self.prefill(torch.tensor(prompt_ids[:-1]))
        else:
            self.reset()
        self.prefill_s = time.perf_counter() - start
        token = prompt_ids[-1]
        n = self.firing.size(1)
        for step in range(max_new_tokens):
            before = self.firing.clone() if codes else None
            start = time.perf_counter()
            with torch_threads(self.decode_threads):
                logits, records = self.decode(token)
                token = sample(self.kernels, logits[:vocab], sampling.temperature, sampling.top_p, gen)
            elapsed = time.perf_counter() - start
            truly = [mode.truly_active(record) for mode, record in zip(self.modes, records)] if audit else None
            recalls = None if truly is None else [m.recall(r, t) for m, r, t in zip(self.modes, records, truly)]
            stats = StepStats.from_records(step, token, elapsed, records, n, self.dense_ffn_bytes, recalls)
            if before is not None:  # the kernels add 1 to the count of every neuron that fired
                stats.codes = neuron_codes(torch.ne(self.firing, before), records, truly)
            yield stats
            if (stop is not None and stop.is_set()) or token in stop_ids:
                return

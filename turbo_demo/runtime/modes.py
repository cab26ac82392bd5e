"""FFN modes: how one layer computes its FFN for one token, each mode a peer with one job.

For a token's normed hidden state x (H,) and residual r (H,), with h = act(W_gate x) * up(x),
up(x) = act(W_up x) for dReLU and W_up x otherwise:

    dense      y = sum_i h_i W_down[:, i] over every neuron i
    exact      dReLU / ReGLU: the gate for every neuron, then up and down only where
               relu(W_gate x)_i > 0; equal to dense, since the other neurons have h_i = 0
               (in a quantized pack, up to W_down's two quantizations: dense mode reads its
               (H, I) blocks with h quantized, llama.cpp's ffn_down, the other modes its
               neuron-major blocks with h as it is, in the prompt too; FFNWeights.wd)
    predictor  S = {i : score_i > threshold} (or the `budget` share of highest scores), with
               score = fc2(relu(fc1(r))); gate, up and down only on S (PowerInfer, Deja Vu).
               At threshold 0 this is the published TurboSparse forward, whose mask
               round(sigmoid(score)) is part of the model, in the prompt's tokens too
    threshold  the gate for every neuron, then up and down only where |act(W_gate x)_i| > t
               (CATS / TEAL-style; t given, or calibrated on the prompt for a target sparsity)

`step(x, r, add_to, counts) -> (y, LayerRecord)`: y (H,), or add_to + y (the layer's residual
add, fused into the kernel); counts (I,) int32 gets 1 added for every neuron with h_i != 0
among those the step computed. Prefill (`prefill(x, r)`, x and r (T, H)) is the dense formula
in every mode but predictor, which masks it as the published model does; each mode reads
W_down in its prompt as in its steps.
A mode's options are a dataclass, validated when it is made (`mode_options`).
"""

import math
from dataclasses import dataclass, fields

import torch

from turbo_demo.choices import MODES
from turbo_demo.errors import UserError
from turbo_demo.runtime.kernels import Kernels
from turbo_demo.runtime.kernels.reference import ACTS, count_firing, plus
from turbo_demo.runtime.quant import row_bytes, weight_bytes
from turbo_demo.runtime.stats import LayerRecord
from turbo_demo.runtime.weights import FFNWeights


@dataclass(frozen=True)
class NoOptions:
    """Dense and exact mode take no options."""


@dataclass(frozen=True)
class PredictorOptions:
    """threshold: the score (a logit) at or above which a neuron is computed; None: each layer's
    threshold from the checkpoint. budget: compute this share of the neurons instead (the
    highest scores), in (0, 1]. At most one of the two."""

    threshold: float | None = None
    budget: float | None = None

    def __post_init__(self):
        if self.threshold is not None and self.budget is not None:
            raise UserError("predictor mode takes a threshold or a budget, not both")
        if self.budget is not None and not 0 < self.budget <= 1:
            raise UserError(f"the predictor budget is a share of the neurons in (0, 1], got {self.budget}")
        if self.threshold is not None and math.isnan(self.threshold):
            raise UserError("the predictor threshold is NaN")


@dataclass(frozen=True)
class ThresholdOptions:
    """threshold: |act(W_gate x)_i| above which neuron i is computed, >= 0. sparsity: instead,
    the target share of skipped neurons in [0, 1), the threshold calibrated on the prompt."""

    threshold: float | None = None
    sparsity: float | None = None

    def __post_init__(self):
        if self.threshold is not None and self.sparsity is not None:
            raise UserError("threshold mode takes a threshold or a target sparsity, not both")
        if self.threshold is not None and not self.threshold >= 0:
            raise UserError(f"the activation threshold must be >= 0, got {self.threshold}")
        if self.sparsity is not None and not 0 <= self.sparsity < 1:
            raise UserError(f"the target sparsity must be in [0, 1), got {self.sparsity}")


class Mode:
    """The parts every mode shares: the packed weights, the kernels, the dense formula."""

    name: str
    options_class: type = NoOptions
    # Whether the mode may skip a truly active neuron: then its records carry `choice`, for
    # the untimed recall audit.
    can_miss = False

    def __init__(self, w: FFNWeights, kernels: Kernels, options=None):
        self.w, self.kernels = w, kernels.for_weights(*w.matrices)  # the set for w's kind, bound once
        self.options = self.options_class() if options is None else options
        self.act = ACTS[w.act]

    def up(self, u: torch.Tensor) -> torch.Tensor:
        return self.act(u) if self.w.drelu else u

    def dense_h(self, x: torch.Tensor) -> torch.Tensor:
        """h (..., I) for x (..., H); one token (x of shape (H,)) goes through the GEMV kernels."""
        w = self.w
        if x.dim() == 1:
            return self.act(self.kernels.matvec(w.wg, x)) * self.up(self.kernels.matvec(w.wu, x))
        k = self.kernels
        return self.act(k.linear(x, w.wg)) * self.up(k.linear(x, w.wu))

    def prefill(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """The dense FFN of x (..., T, H) -> (..., T, H); r, the residual, is for the predictor."""
        return self.kernels.times(self.dense_h(x), self.w.wd_t)

    def step(self, x, r, add_to=None, counts=None) -> tuple[torch.Tensor, LayerRecord]:
        raise NotImplementedError

    def reset(self) -> None:
        """A new sequence: a mode keeps nothing per sequence, but threshold mode's threshold."""

    def gathered(self, x, idx, a, bytes_before: int, add_to, counts) -> tuple[torch.Tensor, LayerRecord]:
        """Up and down for the neurons idx (k,) whose activated gate values are a (k,); with
        a = None, the gate too, on those rows only. Up reads only the rows whose gate value is
        non-zero, down only those whose h is non-zero (the others add nothing)."""
        w, k = self.w, self.kernels
        relu_gate = w.act == "relu"
        if a is None and not relu_gate:  # up_down computes a = None as a ReLU gate's
            a = self.act(k.rows_dot(w.wg, x, idx))
        if relu_gate or not w.drelu:  # an up branch with a ReLU or no activation: one kernel
            y, up_rows, active = k.up_down(w, x, idx, a, add_to, counts)
        else:
            h = a * self.up(k.rows_dot(w.wu, x, idx))
            count_firing(counts, idx, h)
            y = plus(k.rows_axpy(w.wd_t, h, idx), add_to)
            up_rows, active = idx.shape[0], int(torch.count_nonzero(h))
        return y, self.sparse_record(x, idx, up_rows, active, bytes_before)

    def sparse_record(self, x, idx, up_rows: int, active: int, bytes_before: int) -> LayerRecord:
        """Of the k = idx.shape[0] computed neurons, up_rows read their up row and the active ones their
        down row, on top of bytes_before (gate rows, predictor)."""
        return LayerRecord(
            computed=idx.shape[0],
            active=active,
            bytes=bytes_before + (up_rows + active) * self.w.row_bytes,
            choice=(x, idx) if self.can_miss else None,
        )

    def truly_active(self, record: LayerRecord) -> torch.Tensor | None:
        """The neurons active in the dense FFN (h != 0) at the recorded step's x, (I,) bool;
        None for modes that never skip an active neuron."""
        return None if record.choice is None else self.dense_h(record.choice[0]) != 0

    def recall(self, record: LayerRecord, truly: torch.Tensor | None = None) -> float | None:
        """Share of the truly active neurons (`truly_active`, computed if not given) that the
        recorded step computed; None for modes that never skip an active neuron."""
        truly = self.truly_active(record) if truly is None else truly
        if truly is None or record.choice is None:
            return None
        return truly.index_select(0, record.choice[1]).sum().item() / max(1, int(truly.sum()))


class DenseMode(Mode):
    name = "dense"

    def prefill(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """The dense formula of its steps (Kernels.dense_down: in a quantized pack, W_down's
        (H, I) blocks), so that a prompt and the tokens after it are computed alike."""
        return self.kernels.dense_down(self.w, self.dense_h(x))

    def step(self, x, r, add_to=None, counts=None):
        w = self.w
        y, active = self.kernels.ffn_dense(w, x, add_to, counts)
        return y, LayerRecord(computed=w.n, active=active, bytes=w.dense_bytes)


class ExactMode(Mode):
    name = "exact"

    def __init__(self, w: FFNWeights, kernels: Kernels, options=None):
        if w.act != "relu":
            raise UserError(
                f"exact mode needs a ReLU-gated FFN (dReLU or ReGLU); this model's gate uses "
                f"{w.act}: use the threshold mode for SwiGLU models"
            )
        super().__init__(w, kernels, options)

    def step(self, x, r, add_to=None, counts=None):
        w = self.w
        y, computed, active = self.kernels.ffn_exact(w, x, add_to, counts)
        return y, LayerRecord(computed=computed, active=active, bytes=(w.n + computed + active) * w.row_bytes)


class PredictorMode(Mode):
    name = "predictor"
    options_class = PredictorOptions
    can_miss = True

    def __init__(self, w: FFNWeights, kernels: Kernels, options: PredictorOptions | None = None):
        if w.fc1 is None or w.fc2_t is None:
            raise UserError(
                "predictor mode needs trained predictors in the checkpoint; run "
                "`python -m turbo_demo predictors MODEL_DIR` first, or use the exact mode"
            )
        super().__init__(w, kernels, options)
        self.fc1, self.fc2_t = w.fc1, w.fc2_t
        self.fc1_bytes, self.fc2_row_bytes = weight_bytes(self.fc1), row_bytes(self.fc2_t)
        o = self.options
        self.threshold = (w.threshold or 0.0) if o.threshold is None else o.threshold
        self.budget = 0 if o.budget is None else max(1, round(o.budget * w.n))

    def prefill(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """The published forward on the prompt: h of x (..., T, H) masked, per token, to the
        neurons the predictor picks for its residual r (..., T, H), as `step` picks them."""
        k = self.kernels
        score = k.times(torch.relu(k.linear(r, self.fc1)), self.fc2_t)  # (..., T, I)
        if self.budget:
            mask = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, score.topk(self.budget).indices, True)
        else:
            mask = score > self.threshold
        return k.times(self.dense_h(x) * mask, self.w.wd_t)

    def predictor_bytes(self, rows: int) -> int:
        """Predictor bytes a choice reads: fc1, and the `rows` rows of fc2_t with z_j != 0."""
        return self.fc1_bytes + rows * self.fc2_row_bytes

    def step(self, x, r, add_to=None, counts=None):
        """The neurons predicted active for the residual r (H,), then the sparse step on them."""
        w, k = self.w, self.kernels
        if w.act == "relu":
            y, idx, rows, up_rows, active = k.ffn_predicted(w, r, x, self.threshold, self.budget, add_to, counts)
            bytes_before = self.predictor_bytes(rows) + idx.shape[0] * w.row_bytes  # the chosen gate rows
            return y, self.sparse_record(x, idx, up_rows, active, bytes_before)
        idx, rows = k.predict(w, r, self.threshold, self.budget)
        return self.gathered(x, idx, None, self.predictor_bytes(rows) + idx.shape[0] * w.row_bytes, add_to, counts)


class ThresholdMode(Mode):
    """`threshold` is per sequence: the given one from `reset` (the runtime's new_sequence), or
    with a target sparsity the one a prefill calibrates on its prompt (`calibrated`)."""

    name = "threshold"
    options_class = ThresholdOptions
    can_miss = True

    def __init__(self, w: FFNWeights, kernels: Kernels, options: ThresholdOptions | None = None):
        super().__init__(w, kernels, options)
        self.reset()

    def reset(self) -> None:
        """A new sequence: the given threshold (0 if none) until a prefill calibrates one."""
        self.threshold = self.options.threshold or 0.0

    def calibrated(self, x: torch.Tensor, sparsity: float) -> float:
        """The threshold that skips a share `sparsity` of x's (T, H) neurons: that quantile of
        |act(W_gate x)| over its tokens and neurons (the first million values)."""
        if sparsity <= 0:
            return 0.0
        a = self.act(self.kernels.linear(x, self.w.wg)).abs().flatten().float()
        return float(torch.quantile(a[:1_000_000], sparsity))

    def prefill(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Dense prefill; with a target sparsity, first this sequence's threshold calibrated on x."""
        if self.options.sparsity is not None:
            self.threshold = self.calibrated(x, self.options.sparsity)
        return super().prefill(x, r)

    def step(self, x, r, add_to=None, counts=None):
        w, k = self.w, self.kernels
        a = self.act(k.matvec(w.wg, x))
        idx = k.indices_over(a.abs(), self.threshold)
        return self.gathered(x, idx, a.index_select(0, idx), w.n * w.row_bytes, add_to, counts)


MODE_CLASSES: dict[str, type[Mode]] = {m.name: m for m in (DenseMode, ExactMode, PredictorMode, ThresholdMode)}
assert tuple(MODE_CLASSES) == MODES


def mode_class(mode: str) -> type[Mode]:
    if mode not in MODE_CLASSES:
        raise UserError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    return MODE_CLASSES[mode]


def mode_options(mode: str, **given):
    """The options dataclass of `mode` from keyword values (None means: not given); an unknown
    mode or option is a UserError naming what the mode takes."""
    cls = mode_class(mode).options_class
    known = [f.name for f in fields(cls)]
    unknown = sorted(k for k, v in given.items() if v is not None and k not in known)
    if unknown:
        takes = f"its options: {', '.join(known)}" if known else "it takes none"
        raise UserError(f"{mode} mode has no option {', '.join(map(repr, unknown))}; {takes}")
    return cls(**{k: v for k, v in given.items() if v is not None})


def make_modes(ffns: list[FFNWeights], mode: str, kernels: Kernels, options=None) -> list[Mode]:
    """One mode object per layer; options: the mode's dataclass for every layer, a list of them
    with one per layer (calibrated per-layer thresholds; for a MoE layer, a list per expert), or
    None (its defaults)."""
    cls = mode_class(mode)
    per_layer = list(options) if isinstance(options, (list, tuple)) else [options] * len(ffns)
    if len(per_layer) != len(ffns):
        raise UserError(f"{mode} mode got options for {len(per_layer)} layers; the model has {len(ffns)}")
    for o in (o for layer in per_layer for o in (layer if isinstance(layer, list) else [layer])):
        if o is not None and not isinstance(o, cls.options_class):
            raise UserError(f"{mode} mode takes {cls.options_class.__name__}, not {type(o).__name__}")
    # a MoE layer (runtime/moe.py) makes its own: the router, then the mode per expert
    return [w.make_mode(cls, kernels, o) for w, o in zip(ffns, per_layer)]

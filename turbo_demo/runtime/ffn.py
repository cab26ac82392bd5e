"""FFN modes: one object per layer, sharing the layer's weight tensors with the HF model.

All modes compute, for one token's normed hidden state x (H,) and residual r (H,):

    dense      y = sum_i h_i W_down[:, i],  h = act(W_gate x) * up(x)   for every neuron i
    exact      dReLU / ReGLU: gate for every neuron, then up and down only where
               relu(W_gate x)_i > 0; equal to dense, since the other neurons have h_i = 0
    predictor  S = {i : score_i >= threshold} (or the `budget` highest scores), with
               score = fc2(relu(fc1(r))); gate, up and down only on S (PowerInfer, Deja Vu)
    threshold  gate for every neuron, then up and down only where |act(W_gate x)_i| > t_i
               (CATS / TEAL-style; t_i calibrated per layer for a target sparsity)

with up(x) = act(W_up x) for dReLU and W_up x otherwise. Every step adds 1 to firing[i] (I,)
for each neuron i with h_i != 0 among those it computed: the neuron firing counts, kept by
the kernels' own loops (the runtime zeroes them when a generation starts).

W_down is kept neuron-major (W_down_t, (I, H)), and the predictor's fc2 input-major (fc2_t,
(rank, I)): the HF module's weight becomes a transposed view of the same storage, so there is
still one copy of every weight.
"""

import torch

from turbo_demo.errors import UserError
from turbo_demo.runtime import kernels
from turbo_demo.runtime.stats import LayerRecord

MODES = ("dense", "exact", "predictor", "threshold")
# With the torch kernels, above this share of computed neurons the gathered path (which copies
# the selected rows before the product) is no faster than the dense one. The C++ kernels read
# the selected rows in place at the dense kernels' speed, so with them gathering always pays.
DENSE_FALLBACK_SHARE = 0.45


def neuron_major(linear: torch.nn.Linear) -> torch.Tensor:
    """linear.weight (out, in) laid out as (in, out) rows, in place: returns the (in, out) tensor.

    For down_proj (H, I) the rows are neurons; for the predictor's fc2 (I, rank) they are the
    rank inputs, each a contiguous run over the neurons."""
    w = linear.weight.data
    if w.t().is_contiguous():
        return w.t()
    wt = w.t().contiguous()
    linear.weight.data = wt.t()
    return wt


def row_major(linear: torch.nn.Linear) -> torch.Tensor:
    """linear.weight (out, in) as a contiguous tensor, in place (undoing a transposed layout)."""
    w = linear.weight.data
    if not w.is_contiguous():
        w = w.contiguous()
        linear.weight.data = w
    return w


def activation_kind(config) -> tuple[str, bool]:
    """(act, drelu): the activation name, and whether it applies to the up branch too."""
    act = getattr(config, "hidden_act", "silu")
    return act, getattr(config, "model_type", "") == "bamboo"


class FFN:
    """A layer's FFN weights and the dense formula; subclasses compute fewer neurons."""

    mode = "dense"

    def __init__(self, mlp, config, layer: int = 0, **_):
        act, self.drelu = activation_kind(config)
        if act not in kernels.ACTS:
            raise UserError(f"unsupported FFN activation {act!r}")
        self.act_name, self.act = act, kernels.ACTS[act]
        self.relu_gate = act == "relu"
        self.wg = mlp.gate_proj.weight.data
        self.wu = mlp.up_proj.weight.data
        self.wd_t = neuron_major(mlp.down_proj)
        self.n, self.h = self.wg.shape
        self.row_bytes = self.h * self.wg.element_size()
        self.record = LayerRecord()
        self.firing = torch.zeros(self.n, dtype=torch.int32, device=self.wg.device)
        # When set, step() keeps (x, computed idx) so that audit_recall can run after timing.
        self.audit = False
        self.last = None

    def up(self, u: torch.Tensor) -> torch.Tensor:
        return self.act(u) if self.drelu else u

    def dense_h(self, x: torch.Tensor) -> torch.Tensor:
        """h (..., I) for x (..., H); one token (x of shape (H,)) goes through the GEMV kernels."""
        if x.dim() == 1:
            return self.act(kernels.matvec(self.wg, x)) * self.up(kernels.matvec(self.wu, x))
        return self.act(x @ self.wg.t()) * self.up(x @ self.wu.t())

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        """Dense FFN for x (..., H), as in prefill."""
        return self.dense_h(x) @ self.wd_t

    def step(self, x: torch.Tensor, r: torch.Tensor, add_to: torch.Tensor | None = None) -> torch.Tensor:
        """One token: x (H,) normed input, r (H,) residual -> y (H,), or add_to + y (the layer's
        residual add, fused into the step's kernel); fills self.record."""
        y, active = kernels.ffn_dense(self.wg, self.wu, self.wd_t, x, self.act_name, self.drelu, add_to,
                                      self.firing)
        self.record = LayerRecord(computed=self.n, active=active, bytes=3 * self.n * self.row_bytes)
        return y

    def finish(self, x, idx, a_sel, bytes_read: int, add_to=None) -> torch.Tensor:
        """Up and down for the neurons `idx` (k,) whose activated gate values are a_sel (k,);
        with a_sel None, the gate too, on those rows only.

        Up reads only the rows whose gate value is non-zero, down only those whose h is
        non-zero (the others add nothing); fills self.record; returns y (H,), or add_to + y.
        """
        # up_down fuses the step (one call instead of up to seven) for a ReLU or no activation
        # on the up branch, and computes a ReLU gate itself
        fused = self.relu_gate or not self.drelu
        if a_sel is None and not (fused and self.relu_gate):
            a_sel = self.act(kernels.rows_dot(self.wg, x, idx))
        if fused:
            y, up_rows, active = kernels.up_down(self.wu, self.wd_t, x, idx, a_sel, self.drelu,
                                                 self.wg if a_sel is None else None, add_to, self.firing)
        else:
            h = a_sel * self.up(kernels.rows_dot(self.wu, x, idx))
            kernels.count_firing(self.firing, idx, h)
            y = kernels.plus(kernels.rows_axpy(self.wd_t, h, idx), add_to)
            up_rows, active = len(idx), int(torch.count_nonzero(h))
        self.note(len(idx), up_rows, active, bytes_read)
        return y

    def note(self, computed: int, up_rows: int, active: int, bytes_read: int) -> None:
        """Record a sparse step: of the `computed` neurons, up_rows read their up row and the
        active ones their down row, on top of the bytes_read before (gate rows, predictor)."""
        self.record = LayerRecord(computed=computed, active=active,
                                  bytes=bytes_read + (up_rows + active) * self.row_bytes)

    def audit_recall(self) -> float | None:
        """Share of the neurons active in the dense FFN (h != 0) that the last step computed.

        None for modes that never skip an active neuron (dense, exact) or without a kept step.
        """
        if self.last is None:
            return None
        x, computed = self.last
        self.last = None
        truly = self.dense_h(x) != 0
        hits = truly.index_select(0, computed).sum().item()
        return hits / max(1, int(truly.sum()))


class ExactFFN(FFN):
    mode = "exact"

    def __init__(self, mlp, config, layer: int = 0, **kw):
        super().__init__(mlp, config, layer, **kw)
        if not self.relu_gate:
            raise UserError(
                "exact mode needs a ReLU-gated FFN (dReLU or ReGLU); this model's gate uses "
                f"{config.hidden_act}: use the threshold mode for SwiGLU models"
            )

    def step(self, x, r, add_to=None):
        y, computed, active = kernels.ffn_exact(self.wg, self.wu, self.wd_t, x, self.drelu, add_to, self.firing)
        self.record = LayerRecord(computed=computed, active=active,
                                  bytes=(self.n + computed + active) * self.row_bytes)
        return y


class PredictorFFN(FFN):
    mode = "predictor"

    def __init__(self, mlp, config, layer: int = 0, threshold: float | None = None,
                 budget: float | None = None, **kw):
        super().__init__(mlp, config, layer, **kw)
        predictor = getattr(mlp, "predictor", None)
        if predictor is None:
            raise UserError(
                "predictor mode needs trained predictors in the checkpoint; run "
                "`python -m turbo_demo predictors MODEL_DIR` first, or use the exact mode"
            )
        # fc1 row-major: one dot per rank row; fc2 input-major: one axpy per non-zero z_j
        self.fc1, self.fc2_t = row_major(predictor.fc1), neuron_major(predictor.fc2)
        self.threshold = config.threshold_of(layer) if threshold is None else threshold
        self.budget = 0 if budget is None else max(1, round(budget * self.n))

    def predictor_bytes(self, rows: int) -> int:
        """Bytes of predictor weights a choice reads: fc1, and the `rows` rows of fc2_t with z_j != 0."""
        return (self.fc1.numel() + rows * self.n) * self.fc1.element_size()

    def step(self, x, r, add_to=None):
        """The neurons predicted active for the residual r (H,), then the sparse step on them."""
        if kernels.backend() == "cpp" and self.relu_gate:
            # one call for the choice and the step (on the embedded model the interpreter
            # between two calls cost ~6% of a bf16 decode step)
            y, idx, rows, up_rows, active = kernels.ffn_predicted(
                self.fc1, self.fc2_t, r, self.threshold, self.budget, self.wg, self.wu, self.wd_t, x,
                self.drelu, add_to, self.firing)
            self.note(len(idx), up_rows, active, self.predictor_bytes(rows) + len(idx) * self.row_bytes)
        else:
            idx, rows = kernels.predict(self.fc1, self.fc2_t, r, self.threshold, self.budget)
            if kernels.backend() == "torch" and len(idx) > DENSE_FALLBACK_SHARE * self.n:
                y = kernels.plus(self.masked_dense(x, idx, rows), add_to)
            else:
                y = self.finish(x, idx, None, self.predictor_bytes(rows) + len(idx) * self.row_bytes, add_to)
        if self.audit:
            self.last = (x, idx)
        return y

    def masked_dense(self, x, idx, rows: int):
        """The same result as the gathered path, computed densely (faster for large sets)."""
        mask = torch.zeros(self.n, dtype=x.dtype, device=x.device).index_fill_(0, idx, 1)
        h = self.dense_h(x) * mask
        self.firing += h != 0
        self.record = LayerRecord(computed=len(idx), active=int(torch.count_nonzero(h)),
                                  bytes=self.predictor_bytes(rows) + 3 * self.n * self.row_bytes)
        return kernels.vecmat(h, self.wd_t)


class ThresholdFFN(FFN):
    mode = "threshold"

    def __init__(self, mlp, config, layer: int = 0, threshold: float = 0.0,
                 sparsity: float | None = None, **kw):
        super().__init__(mlp, config, layer, **kw)
        self.threshold = threshold
        self.target = sparsity

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        """Dense prefill; with a target sparsity, first calibrate the threshold on x (T, H):
        the target quantile of |act(W_gate x)| over the prompt's tokens and neurons."""
        if self.target is not None:
            a = self.act(x @ self.wg.t()).abs().flatten().float()
            self.threshold = float(torch.quantile(a[:1_000_000], self.target)) if self.target > 0 else 0.0
        return super().batch(x)

    def step(self, x, r, add_to=None):
        a = self.act(kernels.matvec(self.wg, x))
        idx = kernels.indices_over(a.abs(), self.threshold, False)
        y = self.finish(x, idx, a.index_select(0, idx), self.n * self.row_bytes, add_to)
        if self.audit:
            self.last = (x, idx)
        return y


FFN_CLASSES = {"dense": FFN, "exact": ExactFFN, "predictor": PredictorFFN, "threshold": ThresholdFFN}


def make_ffn(mode: str, mlp, config, layer: int, **options) -> FFN:
    if mode not in FFN_CLASSES:
        raise UserError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    return FFN_CLASSES[mode](mlp, config, layer, **options)

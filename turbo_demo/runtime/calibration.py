"""Per-layer activation thresholds for a target sparsity, calibrated once per model (TEAL / CATS).

For layer l and target sparsity s, t_l is the s-quantile of |act(W_gate x)| over the layer's FFN
inputs x for a calibration text of a few hundred tokens, so that about a share s of the neurons
fall under it on text like it. Threshold mode then computes up and down only where
|act(W_gate x)_i| > t_l. A SwiGLU gate (silu) is rarely exactly zero, so the quantile grows
with s and quality falls; a dReLU gate is zero for most neurons, so t_l stays 0 up to its
natural sparsity.

The calibration is threshold mode's own on a prompt (ThresholdMode.calibrated, in its prefill at
a target sparsity), on the calibration text; the thresholds are kept on the pack
(PackedModel.calibrated) per sparsity, and freed with it.
"""

import torch

from turbo_demo.paths import ASSETS
from turbo_demo.runtime.decoder import Thresholds
from turbo_demo.runtime.kernels import Kernels
from turbo_demo.runtime.modes import ThresholdOptions
from turbo_demo.runtime.packing import PackedModel

CALIBRATION_TEXT = ASSETS / "calibration.txt"
CALIBRATION_TOKENS = 384


def calibration_ids(tokenizer, context: int) -> list[int]:
    """The calibration text's first CALIBRATION_TOKENS tokens (fewer in a short context)."""
    ids = tokenizer(CALIBRATION_TEXT.read_text(encoding="utf-8"))["input_ids"]
    return list(ids[: min(CALIBRATION_TOKENS, context - 1)])


def calibrate(packed: PackedModel, ids: list[int], sparsity: float, kernels: Kernels | None = None) -> Thresholds:
    """t_l per layer: the thresholds a threshold-mode runtime at the target sparsity calibrates
    on the prefill of ids (Decoder.thresholds). A MoE layer's experts calibrate each on the
    tokens routed to it (one that got none: 0)."""
    from turbo_demo.runtime import open_runtime  # the engines import this package's modules

    runtime = open_runtime(packed, "threshold", kernels, ThresholdOptions(sparsity=sparsity))
    runtime.prefill(torch.tensor(ids))
    return runtime.thresholds()


def threshold_options(packed: PackedModel, tokenizer, sparsity: float, context: int) -> list:
    """Threshold mode's per-layer options for `sparsity`, calibrated once per pack and sparsity."""
    key = round(float(sparsity), 4)
    with packed.calibrating:
        if key not in packed.calibrated:
            packed.calibrated[key] = calibrate(packed, calibration_ids(tokenizer, context), key)
        return [
            [ThresholdOptions(threshold=u) for u in t] if isinstance(t, list) else ThresholdOptions(threshold=t)
            for t in packed.calibrated[key]
        ]

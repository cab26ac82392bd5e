"""The names a user may type: one torch-free place for the CLI, the app's flags and the code
that acts on them (importing this module imports nothing heavy, so `--help` is instant)."""

BACKENDS = ("torch", "cpp")  # kernel backends: the PyTorch reference, the C++ kernels
BACKEND_CHOICES = ("auto", *BACKENDS)  # auto: cpp where it builds here, else torch
MODES = ("dense", "exact", "predictor", "threshold")  # FFN modes of the runtime
DTYPE_CHOICES = ("auto", "fp32", "bf16")  # auto: fp32 for small models, bf16 for big ones
QUANTS = ("int8", "int4")  # block-quantized matrices (runtime/quant.py); none: as loaded
GGUF_TYPES = ("f16", "q8_0", "q4_0")  # matrix types `export-gguf` writes (checkpoints/gguf_export.py)
# What each mode computes, as the app and `generate --help` say it. On a published TurboSparse
# checkpoint the predictor's mask is part of the model: predictor mode is the model as published.
MODE_HELP = {
    "dense": "every FFN neuron (for a TurboSparse model: dReLU without the predictor's mask)",
    "exact": "only the neurons whose ReLU gate is > 0; equal to dense, fewer rows read",
    "predictor": "the neurons the predictor picks (score > 0): the published TurboSparse model itself",
    "threshold": "the neurons whose |gate activation| passes a threshold (CATS/TEAL), any gated model",
}


def modes_for(config, predictors: bool = False) -> list[str]:
    """The MODES a model supports, from its config alone (no weights are read): exact needs a ReLU
    gate, predictor trained predictors (the config's predictor_rank, or `predictors` attached
    from elsewhere: a PowerInfer folder), threshold a gated FFN (one with an intermediate size)."""
    modes = ["dense"]
    if getattr(config, "hidden_act", None) == "relu":
        modes.append("exact")
    if getattr(config, "predictor_rank", None) or predictors:
        modes.append("predictor")
    if hasattr(config, "intermediate_size"):
        modes.append("threshold")
    return modes

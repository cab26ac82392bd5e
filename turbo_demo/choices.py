"""The names a user may type: one torch-free place for the CLI, the app's flags and the code
that acts on them (importing this module imports nothing heavy, so `--help` is instant)."""

BACKENDS = ("torch", "cpp")  # kernel backends: the PyTorch reference, the C++ kernels
BACKEND_CHOICES = ("auto", *BACKENDS)  # auto: cpp where it builds here, else torch
MODES = ("dense", "exact", "predictor", "threshold")  # FFN modes of the runtime
DTYPE_CHOICES = ("auto", "fp32", "bf16")  # auto: fp32 for small models, bf16 for big ones

"""The Turbo Sparse paper's own figures (Song et al., 2024, arXiv 2406.05955, as the shared
reference's turbosparse.md quotes them), typed once: the app's texts, its paper table and its
plots quote them from here. Torch-free and importing nothing, so any layer may read it."""

MODEL = "TurboSparse-Mistral-7B"
MOE_MODEL = "TurboSparse-Mixtral-47B"
# MODEL's FFN sparsity: the share of neurons with h = 0 per token ("about 90%")
SPARSITY = 0.9
# MOE_MODEL: the share of each MoE layer's FFN neurons idle for a token by top-2-of-8 routing
# alone, then with dReLU inside the chosen experts too ("75% -> 97%")
MOE_IDLE = (0.75, 0.97)
# Table 3: WikiText-2 perplexity of two TOPK_MODEL_SIZE models (5B tokens each, one dReLU, one
# SwiGLU) that keep only each token's top-k |h|, at each top-k sparsity; at 0% their own
TOPK_MODEL_SIZE = "300M"
TOPK_SPARSITY = (0.0, 0.5, 0.8, 0.85, 0.9)
TOPK_PERPLEXITY = {
    "dReLU": (28.45, 28.45, 28.45, 28.65, 29.19),
    "SwiGLU": (28.48, 28.62, 36.28, 48.55, 112.36),
}
# Batch-1 CPU-only decoding speed-up of PowerInfer + the TurboSparse model over llama.cpp's dense
# original, by machine: MODEL at FP16, and MOE_MODEL at INT4
SPEEDUPS = {"i7-12700K": 2.08, "i9-14900HX": 2.11}
MOE_SPEEDUPS = {"i7-12700K": 2.81, "i9-14900HX": 2.32}

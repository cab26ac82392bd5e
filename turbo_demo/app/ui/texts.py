"""The words of the page: its introduction, the tabs' texts and the API's description. The
paper's figures they quote are paper_figures'."""

from turbo_demo import paper_figures as paper

TOPK = paper.TOPK_PERPLEXITY  # Table 3's perplexities by FFN, at each of paper.TOPK_SPARSITY

INTRO = """# TurboSparse Studio
Two language models continue your prompt side by side. The right one uses **dReLU**
(`relu(x W_gate) * relu(x W_up)`, from the Turbo Sparse paper): most of its FFN neurons are
exactly zero for each token, so the sparse backend can skip them. Watch which neurons fire, and
what skipping them buys. The embedded models are tiny (trained here on Python's own source
code), so they write Python-flavoured text. The embedded dReLU models were trained with a small L1
penalty on the FFN activation (ProSparse-style) on top of dReLU; see the About tab."""
ABOUT = f"""### dReLU
SwiGLU FFNs multiply `silu(x W_gate)` by a dense `x W_up`: almost no neuron is ever exactly
zero. dReLU puts a ReLU on both branches, so a neuron contributes only when both are positive;
the paper reports ~{paper.SPARSITY:.0%} of neurons at exactly zero per token with no loss of quality.

### Predictors
A zero neuron costs nothing only if we know it is zero *before* reading its weights. Like
PowerInfer and Deja Vu, each layer has a small low-rank MLP that reads the residual stream and
predicts which neurons will fire; we measure its recall (share of truly active neurons it
found) against the dense computation, outside the timed step.

### The sparse backend
Decoding one token is bound by memory bandwidth: every weight is read once per token. The
backend reads only the rows of W_gate, W_up and (neuron-major) W_down of the predicted neurons,
so FFN bytes per token fall with sparsity; in exact mode it computes the gate densely and skips
up/down for the zero neurons, which is lossless.

| | paper ({paper.MODEL} / PowerInfer) |
|---|---|
| FFN sparsity | ~{paper.SPARSITY:.0%} (Mixtral: {paper.MOE_IDLE[1]:.0%} per MoE layer) |
| {paper.TOPK_MODEL_SIZE} pretraining, WikiText-2 perplexity | dReLU {TOPK["dReLU"][0]} vs SwiGLU {TOPK["SwiGLU"][0]} |
| top-k {paper.TOPK_SPARSITY[-1]:.0%} sparsity perplexity | dReLU {TOPK["dReLU"][-1]} vs SwiGLU {TOPK["SwiGLU"][-1]} |
| CPU-only decoding vs llama.cpp dense | {paper.SPEEDUPS["i7-12700K"]:.2f}x (i7-12700K, Mistral-7B FP16) |
"""
NEURONS = """The last run, neuron by neuron. **Firing frequency**: the share of its decode steps
in which each FFN neuron fired (h ≠ 0 among the neurons the side's mode computed), counted by the
runtime's kernels; hot to cold, PowerInfer's view. **Activation distributions**: the gate, up and
combined activations of the run's tokens, through the model's own dense forward (Turbo Sparse,
Figure 3)."""

# The compare endpoint's description (API page, MCP tool), filled in with the menus' names.
COMPARE_DOC = """Continue one prompt with two models side by side on TurboSparse Studio's sparse
backend, and compare their speed and FFN activation sparsity.

Args:
    prompt: the text both models continue (the user's turn, for chat models)
    left_model: one of {models} (default: the page's left model)
    left_mode: the left model's FFN mode, one of {modes}; exact needs a ReLU gate, predictor
        trained predictors (default: the page's left mode)
    right_model: as left_model (default: the page's right model)
    right_mode: as left_mode (default: the page's right mode)
    max_new_tokens: tokens to generate per model, 1 to 256
    temperature: 0 for greedy decoding, up to 2
    seed: the sampling seed, a whole number in [0, 2**63)
    left_quant: the left model's weights: "stored" (as stored, the default), "int8" or "int4"
        (quantized at load)
    right_quant: as left_quant

Returns:
    {{"left": summary, "right": summary, "speedup": right tokens/s over left}}, each summary
    with the text, tokens, tokens_per_s, mean_sparsity, peak_rss_mb, and an error or notice;
    or {{"error": why}}.
"""

WHY_DRELU = f"""### Why dReLU
**Top-k sparsity against quality** (the paper's Table 3): per token, keep only the neurons with
the largest |h| and zero the rest, then measure perplexity. Each curve is relative to the
model's own perplexity with nothing pruned, on the held-out split (`python -m turbo_demo eval
DIR --json`, in each model's `eval.json`); the paper's {paper.TOPK_MODEL_SIZE} models in grey. A dReLU model's h
is already zero for most neurons, so pruning them costs nothing; a SwiGLU model loses real
contributions."""
WHY_DRELU_TEXT = """The button runs the same sweep on the **prompt** of the Compare tab (its first
{tokens} tokens, as one window) for every embedded model: short texts give noisy perplexities."""
WHY_DRELU_PLANE = """**The (gate, up) plane.** A neuron's combined activation h is a function of its
two pre-activations, g = W_gate x and u = W_up x. SwiGLU's silu(g) * u is zero only on the
axes; ReGLU's relu(g) * u in the half-plane g <= 0; dReLU's relu(g) * relu(u) in three
quadrants. The button draws the last run's measured (g, u) pairs (every layer, token and neuron
of each side's own dense forward over its prompt and output, a few thousand drawn at random)
and counts, for each formula, the share of those pairs at which it is exactly zero."""

INSPECT = """### Inspect a token
Each model's output, token by token, shaded by the share of its FFN neurons that were zero at
that step (darker: sparser). Click a token in either pane, or move the slider: the maps below
show, for every layer, what each of the layer's neurons did at that position in both panes,
side by side (one cell a neuron, row by row). For the modes that choose their neurons before
computing them (predictor, threshold), orange cells were computed for nothing and red ones were
missed: active in the dense FFN but skipped (the audit's measure; on when *recall* is shown).
The maps come from the runtime's own records of the last run (its kernels' firing counts)."""

PAPER = """### The paper beside ours
Each figure of the Turbo Sparse paper next to this project's own measurement of it, read from
what the commands in the last column wrote (`eval.json` next to each embedded model,
`assets/bench.json`). Our models are 5M parameters trained on 4.9M tokens of Python's sources,
so the comparison is of shapes and trends, not of absolute numbers."""
LIMITS = """**Speed against the physical limit.** Decoding one token at batch 1 reads every weight it
uses once, so an FFN step cannot be faster than the bytes it must read divided by the memory
bandwidth. Solid: our FFN step per mode (`bench --json`, synthetic dReLU layers at each
sparsity); dashed: that mode's limit. The bandwidth is the bench's own measurement (a sum over a
large fp32 buffer); a well-streamed GEMV reads a little faster than that, so dense can touch its
line. The predictor's line leaves out its fc2 rows (they depend on the input), so it is a lower
bound. Stars: the paper's end-to-end speed-up over dense, drawn as a time from our dense FFN's."""

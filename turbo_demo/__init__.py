"""TurboSparse Studio: see activation sparsity in LLMs, and measure what it buys.

Importing the package is cheap: it imports neither torch nor transformers. The folders, the
lower layers first (models/ imports no other folder; runtime/ only models/):

    models/       the HF model classes (bamboo: dReLU Mistral; TurboSparse-Mixtral), hooks
    runtime/      the sparse inference backend: engines, FFN modes, packed weights, kernels/
    checkpoints/  config, memory budget, loading, the quantized format, hub, GGUF and PowerInfer
    app/          the compare engine, views, plot builders and the Gradio page
    offline/      corpus, training, evaluation, predictor training, model cards
    bench/        `python -m turbo_demo bench`
"""

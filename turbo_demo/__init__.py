"""TurboSparse Studio: see activation sparsity in LLMs, and measure what it buys.

Importing the package is cheap: it imports neither torch nor transformers. The folders:

    model/      the bamboo (dReLU) architecture, checkpoint loading, hooks
    runtime/    the sparse inference backend: engines, FFN modes, packed weights, kernels/
    app/        the compare engine, views, plot builders and the Gradio page
    offline/    corpus, training, evaluation, predictor training, model cards
    bench/      `python -m turbo_demo bench`
"""

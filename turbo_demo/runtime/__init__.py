"""The sparse inference backend: a lean decode runtime, FFN modes, predictors and statistics.

`open_runtime` picks the engine: the lean one for the Mistral family, else transformers' own
forward behind the same API.
"""


def open_runtime(model, mode: str = "dense", **options):
    from turbo_demo.runtime.engine import Runtime, supports
    from turbo_demo.runtime.hf import TransformersRuntime

    engine = Runtime if supports(model.config) else TransformersRuntime
    return engine(model, mode, **options)

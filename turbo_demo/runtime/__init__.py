"""The sparse inference backend: packed weights, FFN modes, engines, statistics, kernels/.

    packed = pack(model)                          once per loaded model (runtime/packing.py)
    kernels = load_kernels("auto")                once per process, command or bench run
    runtime = open_runtime(packed, mode, kernels, **options)    per run
    for stats in runtime.generate(prompt_ids, ...): ...

`open_runtime` picks the engine: the lean one where packing found an architecture it knows
(Llama, Mistral, bamboo, Qwen2 / Qwen3, Gemma, Phi-3: packed.lean is set), else transformers'
own forward behind the same API and statistics (Gemma 2 / 3, scaled RoPE, mixed layer types).
"""

from turbo_demo.runtime.decoder import Decoder
from turbo_demo.runtime.hf import TransformersRuntime
from turbo_demo.runtime.kernels import Kernels, load_kernels
from turbo_demo.runtime.lean import LeanRuntime
from turbo_demo.runtime.packing import PackedModel, pack

__all__ = [
    "Decoder",
    "Kernels",
    "LeanRuntime",
    "PackedModel",
    "TransformersRuntime",
    "load_kernels",
    "open_runtime",
    "pack",
]


def open_runtime(
    packed: PackedModel, mode: str = "dense", kernels: Kernels | None = None, options=None, **given
) -> Decoder:
    """A runtime for one run of `packed` in `mode` (options as a dataclass or as keywords)."""
    engine = LeanRuntime if packed.lean is not None else TransformersRuntime
    return engine(packed, mode, kernels, options, **given)

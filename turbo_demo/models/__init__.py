"""The model classes: bamboo (dReLU Mistral, bamboo.py), TurboSparse-Mixtral (dReLU experts,
mixtral.py), and hooks on their FFNs (hooks.py, activations.py). Loading checkpoints is
checkpoints/'s job; nothing here imports the runtime or the loaders.

Importing this package imports neither transformers nor the model classes, and registers nothing:
`register_auto_classes()` does, where checkpoints are read or written (checkpoints/config.py,
quantized.py, checkpoint.py).
"""

import functools


@functools.cache
def register_auto_classes() -> None:
    """Register both model types with the transformers Auto classes, so that their checkpoints
    load through `AutoConfig` / `AutoModelForCausalLM` without remote code, and give
    turbosparsemixtral the renaming transformers applies to Mixtral checkpoints (block_sparse_moe
    -> mlp on load, back on save). Once per process: later calls return at once."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.conversion_mapping import register_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    from turbo_demo.models.bamboo import BambooConfig, BambooForCausalLM
    from turbo_demo.models.mixtral import TurboSparseMixtralConfig, TurboSparseMixtralForCausalLM

    AutoConfig.register("bamboo", BambooConfig, exist_ok=True)
    AutoModelForCausalLM.register(BambooConfig, BambooForCausalLM, exist_ok=True)
    AutoConfig.register("turbosparsemixtral", TurboSparseMixtralConfig, exist_ok=True)
    AutoModelForCausalLM.register(TurboSparseMixtralConfig, TurboSparseMixtralForCausalLM, exist_ok=True)
    register_checkpoint_conversion_mapping(
        "turbosparsemixtral", [WeightRenaming(".block_sparse_moe.", ".mlp.")], overwrite=True
    )

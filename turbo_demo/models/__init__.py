"""The model classes: bamboo (dReLU Mistral, bamboo.py), TurboSparse-Mixtral (dReLU experts,
mixtral.py), and hooks on their FFNs (hooks.py, activations.py). Loading checkpoints is
checkpoints/'s job; nothing here imports the runtime or the loaders.

Importing this package registers both with the transformers Auto classes, so their checkpoints
load through `AutoModelForCausalLM` without remote code, and gives turbosparsemixtral the
renaming transformers applies to Mixtral checkpoints (block_sparse_moe -> mlp, back on save).
"""

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

__all__ = ["BambooConfig", "BambooForCausalLM", "TurboSparseMixtralConfig", "TurboSparseMixtralForCausalLM"]

"""TurboSparse Studio: see activation sparsity in LLMs, and measure what it buys.

Importing the package registers the bamboo (dReLU) architecture with the transformers Auto
classes, so bamboo checkpoints load without remote code. Nothing heavy happens here.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from turbo_demo.modeling_bamboo import BambooConfig, BambooForCausalLM

AutoConfig.register("bamboo", BambooConfig, exist_ok=True)
AutoModelForCausalLM.register(BambooConfig, BambooForCausalLM, exist_ok=True)

__all__ = ["BambooConfig", "BambooForCausalLM"]

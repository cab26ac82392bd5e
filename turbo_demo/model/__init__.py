"""The models: bamboo (dReLU Mistral, bamboo.py), checkpoint loading (checkpoint.py), hooks.

Importing this package registers bamboo with the transformers Auto classes, so bamboo
checkpoints load through `AutoModelForCausalLM` without remote code.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from turbo_demo.model.bamboo import BambooConfig, BambooForCausalLM

AutoConfig.register("bamboo", BambooConfig, exist_ok=True)
AutoModelForCausalLM.register(BambooConfig, BambooForCausalLM, exist_ok=True)

__all__ = ["BambooConfig", "BambooForCausalLM"]

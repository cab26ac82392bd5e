"""Loading and saving Hugging Face format checkpoint directories, with one-line errors.

A checkpoint directory holds config.json, model.safetensors, tokenizer.json (+ config),
generation_config.json and, for the models trained here, training_log.json and a README.md
model card. Everything loads through the transformers Auto classes; bamboo (dReLU) checkpoints
load without remote code because importing `turbo_demo` registers the architecture.
"""

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import turbo_demo  # noqa: F401  (registers bamboo with the Auto classes)
from turbo_demo.errors import UserError


def check_model_dir(path: str | Path) -> Path:
    """The directory as a Path if it looks like an HF checkpoint, else a UserError saying why."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"model directory not found: {path}")
    if not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json: not a Hugging Face model directory")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise UserError(f"{path} has no weights (*.safetensors or *.bin)")
    return path


def load_config(path: str | Path):
    path = check_model_dir(path)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (ValueError, KeyError, json.JSONDecodeError, OSError) as exc:
        raise UserError(f"cannot read {path / 'config.json'}: {exc}") from exc


def load_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """An eval-mode causal LM from a checkpoint directory, in `dtype`, on the CPU."""
    path = check_model_dir(path)
    config = load_config(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=dtype, trust_remote_code=False
        )
    except Exception as exc:  # a broken file surfaces as many exception types; name it once
        raise UserError(f"cannot load the weights in {path}: {type(exc).__name__}: {exc}") from exc
    return model.eval()


def load_tokenizer(path: str | Path):
    path = check_model_dir(path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise UserError(f"cannot load the tokenizer in {path}: {type(exc).__name__}: {exc}") from exc


def save_checkpoint(model, tokenizer, out: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write model (as `dtype` safetensors), tokenizer and generation config into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.to(dtype).save_pretrained(out)
    model.to(torch.float32)
    tokenizer.save_pretrained(out)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=0.8,
        top_p=0.95,
        max_new_tokens=64,
    ).save_pretrained(out)
    return out

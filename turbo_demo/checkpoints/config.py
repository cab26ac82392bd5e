"""What a checkpoint directory declares, read without its weights: that it is one
(check_model_dir), its config (load_config: the predictor ranks of a published TurboSparse
checkpoint from its weight shapes), and the dtype it loads in.

Models load in fp32 while their fp32 weights stay within FP32_MAX_BYTES (about 1B parameters),
and in bf16 above: half the memory (Mistral-7B's 7.24B parameters: 14.5 GB instead of 29) and,
since a batch-1 decoding step streams every weight once, faster decoding; a small model (the
embedded ones) keeps fp32, the precision it was evaluated in.
"""

import json
from pathlib import Path

import torch
from transformers import AutoConfig

from turbo_demo.checkpoints.headers import PREDICTOR_FC1, predictor_ranks, read_headers
from turbo_demo.errors import UserError
from turbo_demo.models import register_auto_classes


def check_model_dir(path: str | Path) -> Path:
    """The directory as a Path if it looks like an HF checkpoint, else a UserError saying why
    (a name too long, or a directory we may not read, included)."""
    path = Path(path)
    try:
        if not path.is_dir():
            raise UserError(f"model directory not found: {path}")
        if not (path / "config.json").is_file():
            raise UserError(f"{path} has no config.json: not a Hugging Face model directory")
        if not weight_files(path):
            raise UserError(f"{path} has no weights (*.safetensors or *.bin)")
    except OSError as exc:
        raise UserError(f"cannot read the model directory {str(path)[:200]}: {exc.strerror}") from exc
    return path


def load_config(path: str | Path):
    """The checkpoint's config; a bamboo or turbosparsemixtral config that names no predictor
    rank (as published) gets each layer's (expert's) rank from the predictor weights' shapes,
    0 where a layer (expert) has none."""
    path = check_model_dir(path)
    register_auto_classes()  # bamboo and turbosparsemixtral configs read as ours
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (ValueError, KeyError, json.JSONDecodeError, OSError) as exc:
        raise UserError(f"cannot read {path / 'config.json'}: {exc}") from exc
    if config.model_type != "bamboo" and "BambooForCausalLM" in (getattr(config, "architectures", None) or ()):
        # Llama's FFN would drop Bamboo's relu on the up branch: a different model, silently
        raise UserError(
            f"{path / 'config.json'} names BambooForCausalLM but model_type {config.model_type!r}: "
            'Bamboo is dReLU (relu on gate and up); set "model_type": "bamboo"'
        )
    if config.model_type in PREDICTOR_FC1 and config.predictor_rank is None:
        config.predictor_rank = predictor_ranks(config, read_headers(path))
    return config


FP32_MAX_BYTES = 4 << 30
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def weight_files(path: Path) -> list[Path]:
    """The weight files transformers loads: *.safetensors where present, else *.bin."""
    return sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))


def stored_itemsize(config) -> int:
    """Bytes per element of the dtype the config says the weights are stored in (2 where unstated)."""
    stored = getattr(config, "dtype", None)
    stored = getattr(torch, stored, None) if isinstance(stored, str) else stored
    return stored.itemsize if isinstance(stored, torch.dtype) else 2


def auto_dtype(path: Path, config) -> torch.dtype:
    """fp32, or bf16 for a model whose fp32 weights would exceed FP32_MAX_BYTES, estimated from
    the size of its weight files and the dtype they store (half precision where unstated)."""
    elements = sum(f.stat().st_size for f in weight_files(path)) // stored_itemsize(config)
    return torch.float32 if 4 * elements <= FP32_MAX_BYTES else torch.bfloat16

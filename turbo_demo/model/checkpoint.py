"""Loading and saving Hugging Face format checkpoint directories, with one-line errors.

A checkpoint directory holds config.json, model.safetensors, tokenizer.json (+ config),
generation_config.json and, for the models trained here, training_log.json and a README.md
model card. Everything loads through the transformers Auto classes; bamboo (dReLU) checkpoints
load without remote code because importing `turbo_demo.model` registers the architecture. A
ReluLLaMA checkpoint (model_type llama, hidden_act relu: ReGLU) is transformers' own Llama.
PowerInfer's predictor folders (model/powerinfer.py) attach to a model as it loads.

Models load in fp32 while their fp32 weights stay within FP32_MAX_BYTES (about 1B parameters),
and in bf16 above: half the memory (Mistral-7B's 7.24B parameters: 14.5 GB instead of 29) and,
since a batch-1 decoding step streams every weight once, faster decoding; a small model (the
embedded ones) keeps fp32, the precision it was evaluated in.
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from turbo_demo.errors import UserError
from turbo_demo.model.headers import read_headers, safetensors_files
from turbo_demo.model.mixtral import expert_ranks
from turbo_demo.model.powerinfer import attach_predictors, predictor_folder, read_predictors


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
    if config.model_type == "bamboo" and config.predictor_rank is None:
        tensors = read_headers(path)
        ranks = [
            tensors[name].shape[0] if (name := f"model.layers.{i}.mlp.predictor.fc1.weight") in tensors else 0
            for i in range(config.num_hidden_layers)
        ]
        if any(ranks):
            config.predictor_rank = ranks
    if config.model_type == "turbosparsemixtral" and config.predictor_rank is None:
        config.predictor_rank = expert_ranks(config, read_headers(path))
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


def converted_state_dict(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The safetensors weights with floating tensors in `dtype`, read one tensor at a time.

    transformers memory-maps the files and converts from the mapping: every page it reads stays
    in the process's RSS until the load ends, so a bf16 -> fp32 load peaked at 1.5x the fp32
    weights (an fp32 -> bf16 one would peak at 3x the bf16 ones). Reading each tensor into its
    own buffer (pread) and converting it drops the source as soon as it is converted: the peak
    is the converted weights plus one tensor.
    """
    tensors = {}
    for file in safetensors_files(path):
        with safe_open(file, framework="pt", backend="pread") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                t = f.get_tensor(name)
                tensors[name] = t.to(dtype) if t.is_floating_point() else t
    return tensors


def load_model(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device_map: str | dict | None = None,
    predictors: str | Path | None = None,
):
    """An eval-mode causal LM from a checkpoint directory, in `dtype` (None: auto_dtype), on the CPU
    or, with a device map ("auto": accelerate fills the GPUs, then the CPU), across devices.

    predictors: a PowerInfer predictor folder to attach (model/powerinfer.py); None: the folder
    beside `path` named after it (ReluLLaMA-7B-Predictor beside ReluLLaMA-7B) where there is one
    and the checkpoint carries no predictors of its own. It is read and checked against the
    config before the weights load, and attached before anyone else holds the model.

    Refuses with a UserError, before anything is allocated, a model whose estimated memory
    (memory.estimate: weights, the runtime's copies, a KV cache) exceeds what is available. On
    the CPU every tensor is read into memory of its own (converted_state_dict), never left
    memory-mapped: a weight file truncated or replaced under a loaded model would otherwise
    kill the process (SIGBUS) or change the weights of a model being served.
    """
    from turbo_demo.model import memory  # memory.py reads configs through this module

    path = check_model_dir(path)
    config = load_config(path)
    if dtype is None:
        dtype = auto_dtype(path, config)
    memory.check_fits(memory.estimate(path, dtype, config), memory.available_bytes(device_map))
    folder = predictor_folder(path, config, predictors)
    found = None if folder is None else read_predictors(folder, config, dtype)
    try:
        if device_map is None and read_headers(path):
            model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
            state_dict = converted_state_dict(path, dtype)
            model = model_class.from_pretrained(None, config=config, state_dict=state_dict, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                path, config=config, dtype=dtype, device_map=device_map, trust_remote_code=False
            )
    except Exception as exc:  # a broken file surfaces as many exception types; name it once
        raise UserError(f"cannot load the weights in {path}: {type(exc).__name__}: {exc}") from exc
    if found is not None:
        attach_predictors(model, found)
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

"""Loading and saving Hugging Face format checkpoint directories, with one-line errors.

A checkpoint directory holds config.json, model.safetensors, tokenizer.json (+ config),
generation_config.json and, for the models trained here, training_log.json and a README.md
model card. Everything loads through the transformers Auto classes; bamboo (dReLU) and
TurboSparse-Mixtral checkpoints load without remote code once `models.register_auto_classes()`
has run (reading a config runs it; so does saving, for TurboSparse-Mixtral's names). A
ReluLLaMA checkpoint (model_type llama, hidden_act relu: ReGLU) is transformers' own Llama.
PowerInfer's predictor folders (checkpoints/powerinfer.py) attach to a model as it loads.

What a directory declares (its config, its load dtype) is read by checkpoints/config.py.
"""

from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from turbo_demo.checkpoints import memory
from turbo_demo.checkpoints.config import auto_dtype, check_model_dir, load_config
from turbo_demo.checkpoints.headers import read_headers, safetensors_files
from turbo_demo.checkpoints.powerinfer import attach_predictors, predictor_folder, read_predictors
from turbo_demo.errors import UserError
from turbo_demo.models import register_auto_classes


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

    predictors: a PowerInfer predictor folder to attach (checkpoints/powerinfer.py); None: the folder
    beside `path` named after it (ReluLLaMA-7B-Predictor beside ReluLLaMA-7B) where there is one
    and the checkpoint carries no predictors of its own. It is read and checked against the
    config before the weights load, and attached before anyone else holds the model.

    Refuses with a UserError, before anything is allocated, a model whose estimated memory
    (memory.estimate: weights, the runtime's copies, a KV cache) exceeds what is available. On
    the CPU every tensor is read into memory of its own (converted_state_dict), never left
    memory-mapped: a weight file truncated or replaced under a loaded model would otherwise
    kill the process (SIGBUS) or change the weights of a model being served.
    """
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
    register_auto_classes()  # a TurboSparse-Mixtral made here saves its experts under block_sparse_moe
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

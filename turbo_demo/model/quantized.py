"""Quantize at load: a checkpoint's matrices go from its safetensors straight into blocks.

    load_quantized(path, "int8" | "int4") -> PackedModel     what `generate --quant`, `bench`
                                                             and the app's ModelStore run

The model is built on the meta device; the tensors are read one at a time (pread, as
checkpoint.converted_state_dict): each matrix that `quant.format_of` names is quantized at once
(W_down and the predictors' fc2 transposed first, into the neuron-major layout the pack keeps)
and its float tensor dropped; the rest (embeddings, norms, biases) is converted to the load
dtype and assigned to the model. So the peak during a load is the quantized model plus one
float tensor and its quantization's temporaries, never the float model.

The transformers model that comes back has no float matrices (they stay on the meta device):
it runs on the lean runtime only, which reads the pack.
"""

from pathlib import Path

import torch
from safetensors import safe_open
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from turbo_demo.errors import UserError
from turbo_demo.model.checkpoint import auto_dtype, check_model_dir, load_config
from turbo_demo.model.headers import safetensors_files
from turbo_demo.runtime.packing import PackedModel, lean_supports, pack
from turbo_demo.runtime.quant import QUANTS, TRANSPOSED, QWeight, format_of, quantize


def check_quant(quant: str) -> str:
    if quant not in QUANTS:
        raise UserError(f"unknown quantization {quant!r}; choose one of {', '.join(QUANTS)}")
    return quant


def stream_quantized(path: Path, config, quant: str, dtype: torch.dtype):
    """(model on meta but its small tensors, {parameter name: QWeight}) from `path`'s safetensors."""
    files = safetensors_files(path)
    if not files:
        raise UserError(f"{path} has no safetensors weights: quantizing at load reads safetensors only")
    with torch.device("meta"):
        model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config)
    quantized: dict[str, QWeight] = {}
    small: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(file, framework="pt", backend="pread") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                t = f.get_tensor(name)
                fmt = format_of(name, quant) if t.dim() == 2 and t.is_floating_point() else None
                if fmt is None:
                    small[name] = t.to(dtype) if t.is_floating_point() else t
                    continue
                quantized[name] = quantize(t.t().contiguous() if name.endswith(TRANSPOSED) else t, fmt)
                del t
    model.load_state_dict(small, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta and n not in quantized]
    if missing:
        raise UserError(f"{path} lacks {len(missing)} weights the model needs, such as {missing[0]}")
    return model.eval(), quantized


def load_quantized(path: str | Path, quant: str, dtype: torch.dtype | None = None) -> PackedModel:
    """The pack of `path` with its matrices in `quant` blocks, streamed (see the module
    docstring); dtype (None: checkpoint.auto_dtype) is that of the activations, embeddings and
    norms. Refused before anything is allocated where memory.estimate(..., quant) does not fit."""
    from turbo_demo.model import memory

    path = check_model_dir(path)
    config = load_config(path)
    check_quant(quant)
    if not lean_supports(config):
        raise UserError(
            f"quantized weights run on the lean runtime only, which does not know {config.model_type!r} "
            "models: load it without quantization"
        )
    dtype = dtype if dtype is not None else auto_dtype(path, config)
    memory.check_fits(memory.estimate(path, dtype, config, quant), memory.available_bytes())
    try:
        model, quantized = stream_quantized(path, config, quant, dtype)
    except UserError:
        raise
    except Exception as exc:  # a broken file surfaces as many exception types; name it once
        raise UserError(f"cannot load the weights in {path}: {type(exc).__name__}: {exc}") from exc
    return pack(model, quant, quantized)

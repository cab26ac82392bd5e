"""Quantize at load: a checkpoint's matrices go from its safetensors straight into blocks.

    load_quantized(path, "int8" | "int4") -> PackedModel     what `generate --quant`, `bench`
                                                             and the app's ModelStore run

The model is built on the meta device; the tensors are read one at a time (pread, as
checkpoint.converted_state_dict): each matrix that `quant.format_of` names is quantized at once
(W_down, a MoE expert's w2 and the predictors' fc2 transposed first, into the neuron-major
layout the pack keeps, and W_down and w2 also as stored, for the dense formula (quant.DOWN);
experts stored fused split into one matrix each, quant.checkpoint_matrices) and its float
tensor dropped; the rest (embeddings, norms, biases) is converted to the load
dtype and assigned to the model. So the peak during a load is the quantized model plus one
float tensor and its quantization's temporaries, never the float model.

The transformers model that comes back has no float matrices (they stay on the meta device):
it runs on the lean runtime only, which reads the pack.

    quantize_checkpoint(src, dst, quant)    `python -m turbo_demo quantize SRC DST --quant Q`

writes a checkpoint that loads without re-quantizing (load_quantized reads its blocks as they
are, bit for bit). Its layout, also in the model card it writes (CARD):

    config.json        {"model_type": "turbosparse_quantized", "turbo_demo_quantized": {"quant",
                       "block": 32, "base_config": the source's config}}: an architecture plain
                       transformers does not know, so that it refuses to load the directory
                       instead of filling the missing matrices with random values
    model.safetensors  the matrices as uint8 "<parameter name>.blocks" (N, B * block bytes),
                       W_down, w2 and fc2 neuron-major (transposed), a MoE layer's experts one
                       matrix each (mlp.experts.{e}.w1 / w2 / w3), W_down and w2 also as
                       stored (H, I) under quant.rows_name (`down_proj.rows`, `w2.rows`;
                       a checkpoint without them runs its dense formula on the neuron-major
                       blocks); embeddings, norms and
                       routers as loaded;
                       metadata "turbo_demo_blocks": JSON {name: [format, columns]}
"""

import ctypes
import functools
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from turbo_demo.checkpoints import memory
from turbo_demo.checkpoints.config import auto_dtype, check_model_dir, load_config
from turbo_demo.checkpoints.headers import safetensors_files
from turbo_demo.errors import UserError
from turbo_demo.models import register_auto_classes
from turbo_demo.runtime.moe import moe_shape
from turbo_demo.runtime.packing import PackedModel, lean_supports, pack
from turbo_demo.runtime.quant import (
    DOWN,
    FORMATS,
    QUANTS,
    TRANSPOSED,
    QWeight,
    block_nbytes,
    checkpoint_matrices,
    format_of,
    is_blocks,
    quantize,
    rows_name,
)


@functools.cache
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def release_freed_memory() -> None:
    """Hand the float tensor just freed back to the OS (glibc's malloc_trim; elsewhere nothing).
    glibc serves allocations below its adaptive mmap threshold (up to 32 MB) from its heap, and
    a freed 30 MB tensor between long-lived blocks stays in the process: without this, a
    streamed int8 load of a 1.57 GB bf16 checkpoint ended at 1.18 GB above its start instead
    of the 0.90 GB it holds."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


MODEL_TYPE = "turbosparse_quantized"
SUFFIX = ".blocks"
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def stored_quant(path: Path) -> str | None:
    """The format a `quantize` checkpoint at `path` holds, None for any other directory."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if config.get("model_type") != MODEL_TYPE:
        return None
    return config["turbo_demo_quantized"]["quant"]


def stored_config(path: Path):
    """The source model's config, as `quantize` saved it."""
    base = dict(json.loads((path / "config.json").read_text())["turbo_demo_quantized"]["base_config"])
    register_auto_classes()  # a bamboo or turbosparsemixtral source
    return AutoConfig.for_model(base.pop("model_type"), **base)


def read_blocks(path: Path, config, dtype: torch.dtype):
    """(model on meta but its small tensors, {parameter name: QWeight}) from a `quantize` checkpoint."""
    with torch.device("meta"):
        model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config)
    quantized: dict[str, QWeight] = {}
    small: dict[str, torch.Tensor] = {}
    with safe_open(path / "model.safetensors", framework="pt", backend="pread") as f:
        layout = json.loads(f.metadata()["turbo_demo_blocks"])
        for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            t = f.get_tensor(name)
            if name.endswith(SUFFIX):
                fmt, cols = layout[name]
                check_row_bytes(path, name, t, fmt, cols)
                quantized[name.removesuffix(SUFFIX)] = QWeight(t, fmt, cols)
            else:
                small[name] = t.to(dtype) if t.is_floating_point() else t
    return finish(model, config, small, quantized, path)


def check_row_bytes(path: Path, name: str, t: torch.Tensor, fmt: str, cols: int) -> None:
    """Refuse blocks whose rows are not `fmt`'s size for `cols` values: int4 was Q4_1 (20 bytes
    per 32 values) before it became Q4_0 (18), and such a file must be written again."""
    want = block_nbytes((1, cols), fmt)
    if t.dim() != 2 or t.size(1) != want:
        q4_1 = fmt == "int4" and t.size(-1) * 18 == want * 20
        older = " (int4 written as Q4_1 by an older `quantize`)" if q4_1 else ""
        raise UserError(
            f"{path}: {name} has {t.size(-1)} bytes per row where {fmt} takes {want} for {cols} values{older}; "
            "run `python -m turbo_demo quantize` on the float checkpoint again"
        )


def finish(model, config, small: dict, quantized: dict, path: Path):
    """The meta model with its small tensors assigned (tied embeddings tied), checked complete."""
    model.load_state_dict(small, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    # a quantized matrix stays on the meta device (Mixtral's fused experts: one per expert)
    covered = {n for n, p in model.named_parameters() if all(m in quantized for m, _ in checkpoint_matrices(n, p))}
    missing = [n for n, p in model.named_parameters() if p.is_meta and n not in covered]
    if missing:
        raise UserError(f"{path} lacks {len(missing)} weights the model needs, such as {missing[0]}")
    return model.eval(), quantized


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
            for stored in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                t = f.get_tensor(stored)
                for name, m in checkpoint_matrices(stored, t):
                    fmt = format_of(name, quant) if m.dim() == 2 and m.is_floating_point() else None
                    if fmt is None:
                        small[name] = m.to(dtype) if m.is_floating_point() else m
                    else:
                        quantized[name] = quantize(m.t().contiguous() if name.endswith(TRANSPOSED) else m, fmt)
                        if name.endswith(DOWN):  # and as stored, for the dense formula (FFNWeights.wd)
                            quantized[rows_name(name)] = quantize(m, fmt)
                del t, m
                release_freed_memory()
    return finish(model, config, small, quantized, path)


def load_quantized(path: str | Path, quant: str | None = None, dtype: torch.dtype | None = None) -> PackedModel:
    """The pack of `path` with its matrices in `quant` blocks: streamed from a float checkpoint
    (see the module docstring), or read from a `quantize` checkpoint (quant None: the one it
    holds); dtype (None: checkpoint.auto_dtype) is that of the activations, embeddings and
    norms. Refused before anything is allocated where memory.estimate(..., quant) does not fit."""
    path = check_model_dir(path)
    stored = stored_quant(path)
    if stored is not None and quant not in (None, stored):
        raise UserError(f"{path} holds {stored} weights, not {quant}: load it with --quant {stored}")
    if stored is None and quant is None:
        raise UserError(f"{path} is not a quantized checkpoint: say which quantization to apply")
    quant = check_quant(stored or quant)
    config = stored_config(path) if stored else load_config(path)
    if not lean_supports(config):
        raise UserError(
            f"quantized weights run on the lean runtime only, which does not know {config.model_type!r} "
            "models: load it without quantization"
        )
    dtype = dtype if dtype is not None else auto_dtype(path, config)
    # a quantize checkpoint's headers are its blocks already: their sizes as stored
    need = memory.estimate(path, dtype, config, None if stored else quant)
    memory.check_fits(need, memory.available_bytes())
    try:
        model, quantized = read_blocks(path, config, dtype) if stored else stream_quantized(path, config, quant, dtype)
    except UserError:
        raise
    except Exception as exc:  # a broken file surfaces as many exception types; name it once
        raise UserError(f"cannot load the weights in {path}: {type(exc).__name__}: {exc}") from exc
    return pack(model, quant, quantized)


CARD = """# {name} ({quant})

Written by `python -m turbo_demo quantize {src} {name} --quant {quant}` (TurboSparse Studio):
the matrices of `{src}` block-quantized, {formats}. Run it with
`python -m turbo_demo generate {name} --prompt ...` (or a model box of the app); plain
transformers refuses it (model type `turbosparse_quantized`).

Layout: config.json holds the source's config under `turbo_demo_quantized.base_config`;
model.safetensors holds each quantized matrix as uint8 `<parameter>.blocks` (one row per
neuron: W_gate, W_up, attention and the LM head as HF stores them (out, in), W_down and the
predictors' fc2 transposed; a MoE layer's experts as `mlp.experts.{{e}}.w1` (gate), `w3` (up)
and `w2` (down, transposed); W_down and w2 once more as stored, `down_proj.rows` and `w2.rows`,
for the dense formula), in blocks of 32 values: int8 = fp16 scale d + 32 int8 q
(w = d q, llama.cpp's Q8_0), int4 = fp16 d + 16 bytes of nibbles (value j in the low nibble
of byte j, value j + 16 in its high nibble; w = d (q - 8), llama.cpp's Q4_0); the rest
(embeddings, norms, MoE routers) as loaded. The safetensors metadata `turbo_demo_blocks` gives each
matrix's format and column count.
"""


def quantize_checkpoint(src: str | Path, dst: str | Path, quant: str, dtype: torch.dtype | None = None) -> Path:
    """Write `src` quantized into `dst` (see the module docstring), streamed as load_quantized."""
    src, dst = Path(src), Path(dst)
    if stored_quant(src):
        raise UserError(f"{src} is quantized already")
    packed = load_quantized(src, quant, dtype)
    if hasattr(packed.model.model.layers[0].self_attn, "qkv_proj"):
        raise UserError("fused projections (Phi-3) are quantized at load only, not written as a checkpoint")
    blocks = packed_blocks(packed)
    small = {n: p.detach() for n, p in packed.model.named_parameters() if not p.is_meta and n not in blocks}
    tensors = {**{f"{n}{SUFFIX}": w.data.contiguous() for n, w in blocks.items()}, **small}
    layout = {f"{n}{SUFFIX}": [w.fmt, w.cols] for n, w in blocks.items()}
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, dst / "model.safetensors", metadata={"turbo_demo_blocks": json.dumps(layout)})
    config = {
        "model_type": MODEL_TYPE,
        "turbo_demo_quantized": {"quant": quant, "block": 32, "base_config": packed.model.config.to_dict()},
    }
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in COPIED_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    formats = ", ".join(f"{role} {fmt}" for role, fmt in FORMATS[quant].items())
    (dst / "README.md").write_text(CARD.format(name=dst.name, src=src.name, quant=quant, formats=formats))
    return dst


def packed_blocks(packed: PackedModel) -> dict[str, QWeight]:
    """Every QWeight of a (non-fused) pack by its parameter name (checkpoint_matrices' names)."""
    lean, moe = packed.lean, moe_shape(packed) is not None
    names = ("w1", "w3", "w2") if moe else ("gate_proj", "up_proj", "down_proj")
    out = {"lm_head.weight": lean.lm_head}
    for i, (a, f) in enumerate(zip(lean.attention, packed.ffns)):
        for short, w in (("q_proj", a.wq), ("k_proj", a.wk), ("v_proj", a.wv), ("o_proj", a.wo)):
            out[f"model.layers.{i}.self_attn.{short}.weight"] = w
        ffns = {f"experts.{e}.": x for e, x in enumerate(f.parts)} if moe else {"": f}
        for sub, x in ffns.items():
            parts = dict(zip(names, (x.wg, x.wu, x.wd_t))) | {"predictor.fc1": x.fc1, "predictor.fc2": x.fc2_t}
            out.update({f"model.layers.{i}.mlp.{sub}{short}.weight": w for short, w in parts.items() if w is not None})
            if x.wd is not None:
                out[rows_name(f"model.layers.{i}.mlp.{sub}{names[2]}.weight")] = x.wd
    if not all(map(is_blocks, out.values())):
        raise UserError("only fully quantized packs can be written")
    return out

"""`export-gguf --powerinfer`: a dReLU (bamboo) checkpoint with predictors as the file PowerInfer
(github.com/SJTU-IPADS/PowerInfer) runs sparsely.

PowerInfer reads llama.cpp's GGUF with four changes, each checked against its source (main
branch: llama.cpp, ggml.h, ggml.c, convert.py, gguf-py/gguf/constants.py and tensor_mapping.py):
- the file starts with the magic `PWRI` instead of `GGUF` (ggml.h: GGUF_POWERINFER_MAGIC; ggml.c's
  gguf_init_from_file marks such a file GGML_SPARSE_INFERENCE, and llama.cpp's llama_model_load
  then takes the sparse path, llm_load_sparse_model_tensors); convert.py overwrites the first
  four bytes of a finished GGUF file the same way;
- general.architecture is `bamboo` (llama.cpp: LLM_ARCH_BAMBOO; gguf-py/gguf/constants.py:
  MODEL_ARCH.BAMBOO), so every hyperparameter key is `bamboo.*`, the llama ones otherwise
  (llm_load_hparams treats LLM_ARCH_BAMBOO as LLM_ARCH_LLAMA);
- the FFN holds `ffn_down_t` instead of `ffn_down` and the predictor `fc1` / `fc2`
  (LLM_TENSOR_NAMES[LLM_ARCH_BAMBOO]; constants.py: FFN_DOWN_T, FC_1, FC_2);
- `powerinfer.sparse_threshold` (FLOAT32, LLM_KV_SPARSE_THRESHOLD): neuron i is skipped when
  fc2(relu(fc1 r))_i < threshold, r the residual before ffn_norm (build_llama_variants passes
  ffn_inp as the predictor's input), the env LLAMA_SPARSE_PRED_THRESHOLD overrides it.

The tensors, with the shapes llm_load_sparse_model_tensors asks for (ggml order: ne0 first, the
reverse of numpy's; -1 = any), of a model of hidden size n_embd, n_ff FFN neurons, layer N's
predictor rank r_N (they differ per layer) and n_vocab embedding rows:

    GGUF name                ggml shape (loader)     from the HF checkpoint                  f16 / q4_0
    token_embd.weight        {n_embd, n_vocab}       model.embed_tokens.weight               F16 / Q8_0
    output_norm.weight       {n_embd}                model.norm.weight                       F32
    output.weight            {n_embd, n_vocab}       lm_head.weight (required: the
                                                     embedding again where tied)             F16 / Q8_0
    blk.N.attn_norm.weight   {n_embd}                input_layernorm                         F32
    blk.N.attn_q.weight      {n_embd, n_embd}        self_attn.q_proj, rows permuted         F16 / Q4_0
    blk.N.attn_k.weight      {n_embd, n_embd_gqa}    self_attn.k_proj, rows permuted         F16 / Q4_0
    blk.N.attn_v.weight      {n_embd, n_embd_gqa}    self_attn.v_proj                        F16 / Q4_0
    blk.N.attn_output.weight {n_embd, n_embd}        self_attn.o_proj                        F16 / Q4_0
    blk.N.ffn_norm.weight    {n_embd}                post_attention_layernorm                F32
    blk.N.ffn_gate.weight    {n_embd, n_ff}          mlp.gate_proj                           F16 / Q4_0
    blk.N.ffn_up.weight      {n_embd, n_ff}          mlp.up_proj                             F16 / Q4_0
    blk.N.ffn_down_t.weight  {n_embd, n_ff}          mlp.down_proj [n_embd, n_ff] transposed F16 / Q4_0
    blk.N.fc1.weight         {n_embd, -1 = r_N}      mlp.predictor.fc1.weight [r_N, n_embd]  F16
    blk.N.fc2.weight         {-1 = r_N, n_ff}        mlp.predictor.fc2.weight [n_ff, r_N]    F16

and nothing else (its CUDA build counts them). ffn_down_t is down_proj transposed, numpy shape
(n_ff, n_embd): row j is neuron j's output column, which the sparse kernel adds (axpy) only for
the neurons the predictor picks; that kernel takes F16 or Q4_0 only, so --type is f16 or q4_0.
Q and K are permuted as for llama.cpp (build_llama_variants ropes adjacent pairs, as the llama
architecture does; convert.py permutes them too). Types: convert.py writes every 2-D tensor F16
and 1-D F32, as `--type f16` does. `--type q4_0` follows gguf_export.tensor_type (Q4_0, the
embedding and LM head at Q8_0, rows whose length is not a multiple of 32 at F16) but keeps the
predictors F16 as convert.py writes them (PowerInfer's own `quantize` would make them Q4_0,
the embedding Q4_0 and the LM head Q6_K; its loader takes any of these types).

The vocabulary: the loader sets n_vocab to the length of tokenizer.ggml.tokens and requires the
embedding and LM head to have that many rows, so a padded embedding (TurboSparse-Mistral: 32064
rows, a 32002-id tokenizer) needs that many tokens: the ids past the tokenizer's are "[PAD{id}]",
typed UNUSED (checkpoints/gguf_vocab.py, as llama.cpp's converter pads; PowerInfer's own converter types
them USER_DEFINED, and its loader decodes either to nothing). Token strings must be unique (the
loader asserts it). PowerInfer's convert.py rejects such a checkpoint (its vocab-size check); this
writer does not need it. The tokenizer (byte-level BPE as "gpt2", SentencePiece BPE as "llama",
special ids, chat template) is written by checkpoints/gguf_vocab.py, as for llama.cpp.

The threshold: the config's `predictor_threshold` where it is one number (0.0 for the published
TurboSparse model, whose rule round(sigmoid(score)) is score > 0); a per-layer list (`python -m
turbo_demo predictors` calibrates one per layer) becomes its lowest value, since PowerInfer has
one threshold for all layers and the lowest keeps every layer's recall at least its own.

Not written, as gguf_export: Mistral's sliding window (PowerInfer's bamboo attends to the whole
context). Run the file with PowerInfer (README):

    ./build/bin/main -m DST.gguf -n 128 -t 8 -p "Once upon a time"

(add --vram-budget GB with a CUDA build; its sparse loader refuses -ngl).
"""

from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from turbo_demo.checkpoints.config import check_model_dir, load_config
from turbo_demo.checkpoints.gguf_export import (
    gguf_name,
    import_gguf,
    safetensors_source,
    tensor_type,
    write_metadata,
    write_tensors,
)
from turbo_demo.checkpoints.gguf_export import oriented as llama_oriented
from turbo_demo.checkpoints.gguf_vocab import read_tokenizer, vocab_writer, write_specials
from turbo_demo.checkpoints.quantized import stored_quant
from turbo_demo.errors import UserError

MAGIC = b"PWRI"  # ggml.h GGUF_POWERINFER_MAGIC, in place of b"GGUF"
TYPES = ("f16", "q4_0")  # ffn_down_t must be F16 or Q4_0 (the sparse axpy kernel)
THRESHOLD_KEY = "powerinfer.sparse_threshold"  # llama.cpp LLM_KV_SPARSE_THRESHOLD


def powerinfer_name(hf_name: str) -> str | None:
    """The GGUF name of an HF parameter in PowerInfer's bamboo file, None for one it has no place
    for: gguf_export's names, down_proj as ffn_down_t, the predictor as fc1 / fc2."""
    parts = hf_name.split(".")  # model, layers, N, mlp, predictor, fc1, weight
    if len(parts) == 7 and parts[:2] == ["model", "layers"] and parts[3:5] == ["mlp", "predictor"]:
        return f"blk.{parts[2]}.{parts[5]}.{parts[6]}" if parts[5] in ("fc1", "fc2") else None
    name = gguf_name(hf_name)
    return name.replace(".ffn_down.", ".ffn_down_t.") if name else None


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """{GGUF name: ggml shape} PowerInfer's loader asks for (the table above, ranks filled in)."""
    n_embd, n_ff, n_vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    n_embd_gqa = n_embd // config.num_attention_heads * config.num_key_value_heads
    shapes = {
        "token_embd.weight": (n_embd, n_vocab),
        "output_norm.weight": (n_embd,),
        "output.weight": (n_embd, n_vocab),
    }
    for i in range(config.num_hidden_layers):
        rank = config.rank_of(i)
        layer = {
            "attn_norm": (n_embd,),
            "attn_q": (n_embd, n_embd),
            "attn_k": (n_embd, n_embd_gqa),
            "attn_v": (n_embd, n_embd_gqa),
            "attn_output": (n_embd, n_embd),
            "ffn_norm": (n_embd,),
            "ffn_gate": (n_embd, n_ff),
            "ffn_up": (n_embd, n_ff),
            "ffn_down_t": (n_embd, n_ff),
            "fc1": (n_embd, rank),
            "fc2": (rank, n_ff),
        }
        shapes.update({f"blk.{i}.{kind}.weight": shape for kind, shape in layer.items()})
    return shapes


def sparse_threshold(config) -> float:
    """The one threshold PowerInfer applies to every layer (see the module docstring)."""
    t = config.predictor_threshold
    return float(t) if isinstance(t, (int, float)) else float(min(t))


def check_powerinfer(config, src: Path) -> None:
    """A UserError unless `config` is a dReLU (bamboo) model with a predictor in every layer and
    attention of the shape PowerInfer's bamboo loader asks for."""
    kind = config.model_type
    if kind != "bamboo" or config.hidden_act != "relu":
        raise UserError(
            f"export-gguf --powerinfer writes dReLU (bamboo) models with predictors; "
            f"{src} is a {kind} model ({config.hidden_act})"
        )
    missing = [i for i in range(config.num_hidden_layers) if not config.rank_of(i)]
    if len(missing) == config.num_hidden_layers:
        raise UserError(
            f"{src} has no activation predictors, which PowerInfer needs in every layer: "
            f"train them with python -m turbo_demo predictors {src}"
        )
    if missing:
        raise UserError(f"{src} has no activation predictor in layers {missing}; PowerInfer needs one in every layer")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim * config.num_attention_heads != config.hidden_size:
        raise UserError("PowerInfer's bamboo architecture needs heads x head_dim == hidden_size")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"export-gguf writes the default rotary embedding only, not {rope['rope_type']!r}")


def tensor_names(config, shapes: Mapping[str, tuple]) -> dict[str, str]:
    """{GGUF name: HF name} of every tensor of the file, in the checkpoint's order; the LM head
    is the embedding where the checkpoint has none (tied: PowerInfer requires output.weight)."""
    expected, names = expected_shapes(config), {}
    for hf in shapes:
        if hf.endswith("rotary_emb.inv_freq"):
            continue
        name = powerinfer_name(hf)
        if name not in expected:
            raise UserError(f"the checkpoint has tensors PowerInfer's bamboo architecture has no place for, e.g. {hf}")
        if stored_shape(name, shapes[hf])[::-1] != expected[name]:
            raise UserError(f"{hf} {list(shapes[hf])} does not fit PowerInfer's {name} (ggml shape {expected[name]})")
        names[name] = hf
    if "lm_head.weight" not in shapes and "model.embed_tokens.weight" in shapes:
        names["output.weight"] = "model.embed_tokens.weight"
    if absent := sorted(expected.keys() - names.keys()):
        raise UserError(f"the checkpoint lacks tensors PowerInfer needs, e.g. {absent[0]}")
    return names


def stored_shape(name: str, shape) -> tuple[int, ...]:
    """The numpy shape of a tensor in the file: down_proj's transposed, the others the HF shape."""
    return tuple(shape)[::-1] if name.endswith("ffn_down_t.weight") else tuple(shape)


def oriented(name: str, w: torch.Tensor, config) -> torch.Tensor:
    """An HF weight as the file holds it: Q / K rows in llama.cpp's rotary pairs, down_proj
    transposed (n_ff, n_embd) so that neuron j's output column is row j."""
    return w.T if name.endswith("ffn_down_t.weight") else llama_oriented(name, w, config)


def powerinfer_type(gguf, name: str, shape: tuple, qtype: str):
    """The GGML type of one tensor: the predictors F16 (as convert.py writes them), the others
    as gguf_export writes a `qtype` file."""
    if name.endswith((".fc1.weight", ".fc2.weight")):
        return gguf.GGMLQuantizationType.F16
    return tensor_type(gguf, name, shape, qtype)


def write_powerinfer(
    dst: str | Path,
    config,
    shapes: Mapping[str, tuple],
    load: Callable[[str], torch.Tensor],
    tokenizer: dict,
    qtype: str = "f16",
    name: str = "model",
    tokenizer_config: Mapping | None = None,
) -> Path:
    """Write `dst` from HF parameters (`shapes` {HF name: shape}, `load(name)` the tensor) and the
    tokenizer.json dict `tokenizer` with its tokenizer_config.json, one tensor in memory at a time,
    then put PowerInfer's magic in place of GGUF's."""
    gguf = import_gguf()
    if qtype not in TYPES:
        raise UserError(f"export-gguf --powerinfer writes {' or '.join(TYPES)}, not {qtype!r} (ffn_down_t's types)")
    write_vocab = vocab_writer(tokenizer)  # refuses a tokenizer it cannot write before the file exists
    names = tensor_names(config, shapes)
    writer = gguf.GGUFWriter(Path(dst), "bamboo")
    write_metadata(writer, config, name, qtype, gguf)
    write_vocab(writer, gguf, tokenizer, config.vocab_size)
    write_specials(writer, tokenizer, tokenizer_config or {}, config)
    writer.add_float32(THRESHOLD_KEY, sparse_threshold(config))
    planned = {}
    for g, hf in names.items():
        shape = stored_shape(g, shapes[hf])
        planned[g] = (shape, powerinfer_type(gguf, g, shape, qtype))
    write_tensors(writer, gguf, planned, lambda g: oriented(g, load(names[g]).float(), config))
    with open(dst, "r+b") as f:  # as PowerInfer's convert.py marks its files
        f.write(MAGIC)
    return Path(dst)


def export_powerinfer(src: str | Path, dst: str | Path, qtype: str = "f16") -> Path:
    """`python -m turbo_demo export-gguf SRC DST --powerinfer [--type f16|q4_0]`: the dReLU
    checkpoint `src` (safetensors, a predictor per layer, a byte-level or SentencePiece BPE
    tokenizer) as the PowerInfer file `dst`."""
    src = check_model_dir(src)
    if stored_quant(src):  # transformers cannot read its config: say what it is first
        raise UserError(f"{src} is a quantized checkpoint; export the float checkpoint it was made from")
    config = load_config(src)
    check_powerinfer(config, src)
    import_gguf()
    shapes, load = safetensors_source(src)
    tokenizer, tokenizer_config = read_tokenizer(src)
    return write_powerinfer(dst, config, shapes, load, tokenizer, qtype, src.name, tokenizer_config)

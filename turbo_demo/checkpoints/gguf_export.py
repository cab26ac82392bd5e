"""`export-gguf`: a dense Llama / Mistral checkpoint as a GGUF file that llama.cpp runs.

The file is what llama.cpp's convert_hf_to_gguf.py writes for a LlamaForCausalLM or
MistralForCausalLM, written with the `gguf` package (llama.cpp's own writer; optional:
`pip install gguf`):

    metadata  general.architecture = "llama", llama.{context_length, embedding_length,
              block_count, feed_forward_length, attention.head_count, attention.head_count_kv,
              attention.layer_norm_rms_epsilon, rope.freq_base, rope.dimension_count,
              vocab_size}, and the tokenizer as tokenizer.ggml.*: byte-level BPE as the "gpt2"
              model, SentencePiece BPE (Llama / Mistral) as the "llama" one (checkpoints/gguf_vocab.py)
    tensors   token_embd, blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm,
              ffn_gate, ffn_up, ffn_down}, output_norm, output (absent with tied embeddings:
              llama.cpp then reads token_embd as the LM head)

Q and K are permuted: HF's rotary embedding rotates the pair (j, j + d/2) of a head of size d
(rotate_half), llama.cpp's llama architecture the pair (2j, 2j + 1), so each head's rows go from
[x_0 .. x_{d/2-1} | y_0 .. y_{d/2-1}] to [x_0, y_0, x_1, y_1, ...] (convert_hf_to_gguf.py's
LlamaModel.permute). Types: f16 writes matrices as F16; q8_0 as Q8_0 (fp16 scale + 32 int8 per
block); q4_0 as Q4_0 (fp16 scale + 32 nibbles, w = d (q - 8)) but the embedding and LM head
at Q8_0, as our int4 keeps the LM head at int8 (llama-quantize would pick Q6_K). Norms stay
F32, and a row whose length is not a multiple of 32 F16, as convert_hf_to_gguf.py does. Not
written: Mistral's sliding window (the llama architecture attends to the whole context, as
convert_hf_to_gguf.py writes Mistral too).

The writer streams: the tensor infos go first (shapes from the safetensors headers), then one
tensor at a time is read, converted and written, so memory holds one matrix, not the model.
"""

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from turbo_demo.checkpoints.config import check_model_dir, load_config
from turbo_demo.checkpoints.gguf_vocab import read_tokenizer, vocab_writer, write_specials
from turbo_demo.checkpoints.headers import read_headers
from turbo_demo.checkpoints.quantized import stored_quant
from turbo_demo.choices import GGUF_TYPES
from turbo_demo.errors import UserError

LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
# What a model of these types is instead, for the one-line refusal.
NOT_LLAMA = {
    "bamboo": "a dReLU (TurboSparse) model; llama.cpp's llama architecture computes SwiGLU",
    "mixtral": "a mixture of experts",
    "turbosparsemixtral": "a mixture of experts",
    "turbosparse_quantized": "a quantized checkpoint; export the float checkpoint it was made from",
}


def import_gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("writing GGUF needs the gguf package: pip install gguf") from None
    return gguf


def gguf_name(hf_name: str) -> str | None:
    """The GGUF tensor name of an HF parameter, None for one llama.cpp has no place for."""
    stem, _, kind = hf_name.rpartition(".")
    if stem in TOP_NAMES:
        return f"{TOP_NAMES[stem]}.{kind}"
    parts = stem.split(".", 3)  # model, layers, N, rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in LAYER_NAMES:
        return f"blk.{parts[2]}.{LAYER_NAMES[parts[3]]}.{kind}"
    return None


def permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """(n_head * d, H) rows of Q or K from HF's rotate-half pairs to llama.cpp's adjacent pairs."""
    return w.reshape(n_head, 2, w.size(0) // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `permute_rope`: llama.cpp's Q / K rows back in HF's order."""
    return w.reshape(n_head, w.size(0) // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def tensor_type(gguf, name: str, shape: tuple, qtype: str):
    """The GGML type of one tensor of a `qtype` file (see the module docstring)."""
    T = gguf.GGMLQuantizationType
    if len(shape) == 1:
        return T.F32
    if qtype == "f16" or shape[-1] % 32:
        return T.F16
    if qtype == "q4_0" and name.startswith(("token_embd", "output.")):
        return T.Q8_0
    return T.Q8_0 if qtype == "q8_0" else T.Q4_0


def byte_tokenizer() -> dict:
    """A tokenizer.json dict for random weights: the 256 byte-level symbols, one merge and
    an end-of-text token (id 0), enough for llama.cpp to load a model."""
    from tokenizers.pre_tokenizers import ByteLevel

    symbols = ["<|endoftext|>", *sorted(ByteLevel.alphabet()), "ĠĠ"]
    return {
        "model": {"type": "BPE", "vocab": {s: i for i, s in enumerate(symbols)}, "merges": [["Ġ", "Ġ"]]},
        "added_tokens": [{"id": 0, "content": "<|endoftext|>", "special": True}],
        "pre_tokenizer": {"type": "ByteLevel", "use_regex": True},
    }


def check_llama(config) -> None:
    """A UserError unless `config` is a dense SwiGLU Llama / Mistral that the file can say."""
    kind = config.model_type
    if kind in NOT_LLAMA:
        raise UserError(f"export-gguf writes dense Llama / Mistral models; this is {NOT_LLAMA[kind]}")
    if kind not in ("llama", "mistral") or config.hidden_act != "silu":
        raise UserError(f"export-gguf writes dense SwiGLU Llama / Mistral models, not {kind} ({config.hidden_act})")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"export-gguf writes the default rotary embedding only, not {rope['rope_type']!r}")


def write_metadata(writer, config, name: str, qtype: str, gguf) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(name)
    writer.add_file_type({"f16": 1, "q8_0": 7, "q4_0": 2}[qtype])  # llama.cpp's LLAMA_FTYPE_MOSTLY_*
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_rope_dimension_count(head_dim)
    if head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)


def write_gguf(
    dst: str | Path,
    config,
    shapes: Mapping[str, tuple],
    load: Callable[[str], torch.Tensor],
    tokenizer: dict,
    qtype: str = "f16",
    name: str = "model",
    tokenizer_config: Mapping | None = None,
) -> Path:
    """Write `dst` from HF parameters: `shapes` {HF name: shape}, `load(name)` the tensor, and the
    tokenizer.json dict `tokenizer` with its tokenizer_config.json (special tokens, chat template;
    none: config's ids). The config is not checked here (the bench writes its dReLU stacks too: same
    shapes, same bytes); `export_gguf` checks it. Tensors llama.cpp has no place for (a predictor)
    are left out."""
    gguf = import_gguf()
    if qtype not in GGUF_TYPES:
        raise UserError(f"unknown GGUF type {qtype!r}; choose one of {', '.join(GGUF_TYPES)}")
    write_vocab = vocab_writer(tokenizer)  # refuses a tokenizer of neither kind before the file exists
    names = {n: g for n in shapes if (g := gguf_name(n)) and not (g == "output.weight" and config.tie_word_embeddings)}
    writer = gguf.GGUFWriter(Path(dst), "llama")
    write_metadata(writer, config, name, qtype, gguf)
    write_vocab(writer, gguf, tokenizer, config.vocab_size)
    write_specials(writer, tokenizer, tokenizer_config or {}, config)
    planned = {g: (tuple(shapes[hf]), tensor_type(gguf, g, tuple(shapes[hf]), qtype)) for hf, g in names.items()}
    hf_of = {g: hf for hf, g in names.items()}
    write_tensors(writer, gguf, planned, lambda g: oriented(g, load(hf_of[g]).float(), config))
    return Path(dst)


def oriented(name: str, w: torch.Tensor, config) -> torch.Tensor:
    """An HF weight as llama.cpp holds it: Q / K rows in its rotary pairs (permute_rope)."""
    if name.endswith("attn_q.weight"):
        return permute_rope(w, config.num_attention_heads)
    if name.endswith("attn_k.weight"):
        return permute_rope(w, config.num_key_value_heads)
    return w


def write_tensors(writer, gguf, planned: Mapping[str, tuple], data: Callable[[str], torch.Tensor]) -> None:
    """The file's tensors, one in memory at a time: `planned` {GGUF name: (shape, GGML type)}
    gives the infos, written with the header and metadata first; then `data(name)`, each float
    tensor in its shape, is stored in its type. Closes the writer."""
    for g, (shape, t) in planned.items():
        if t in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32):
            dtype = np.dtype(np.float16 if t == gguf.GGMLQuantizationType.F16 else np.float32)
            writer.add_tensor_info(g, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
        else:
            byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, t)
            writer.add_tensor_info(g, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for g, (_, t) in planned.items():
        writer.write_tensor_data(gguf.quants.quantize(data(g).contiguous().numpy(), t))
    writer.close()


def safetensors_source(src: Path) -> tuple[dict[str, tuple], Callable[[str], torch.Tensor]]:
    """({HF name: shape}, load(name)) of the checkpoint in `src`: shapes from the headers, each
    tensor read from its own file when asked for (so an export holds one tensor at a time)."""
    headers = read_headers(src)
    if not headers:
        raise UserError(f"{src} has no safetensors weights: export-gguf reads safetensors only")

    def load(name: str) -> torch.Tensor:
        with safe_open(src / headers[name].file, framework="pt") as f:
            return f.get_tensor(name)

    return {n: info.shape for n, info in headers.items()}, load


def export_gguf(src: str | Path, dst: str | Path, qtype: str = "f16") -> Path:
    """`python -m turbo_demo export-gguf SRC DST --type f16|q8_0|q4_0`: the checkpoint `src`
    (safetensors, dense SwiGLU Llama / Mistral, a byte-level or SentencePiece BPE tokenizer) as
    the GGUF file `dst`."""
    src = check_model_dir(src)
    if stored_quant(src):  # transformers cannot read its config: say what it is first
        raise UserError(
            f"export-gguf writes dense Llama / Mistral models; {src} is {NOT_LLAMA['turbosparse_quantized']}"
        )
    config = load_config(src)
    check_llama(config)
    import_gguf()
    shapes, load = safetensors_source(src)
    unknown = [n for n in shapes if gguf_name(n) is None and not n.endswith("rotary_emb.inv_freq")]
    if unknown:
        raise UserError(f"{src} has tensors the llama architecture has no place for, e.g. {unknown[0]}")
    tokenizer, tokenizer_config = read_tokenizer(src)
    return write_gguf(dst, config, shapes, load, tokenizer, qtype, name=src.name, tokenizer_config=tokenizer_config)

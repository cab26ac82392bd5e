"""export-gguf: what GGUFReader reads back equals the checkpoint (after undoing the Q/K
permutation), the permutation turns HF's rotary embedding into llama.cpp's, the quantized types
are the formats we use, and llama.cpp runs the file as
transformers runs the checkpoint (llama-cpp-python is in requirements-test.txt)."""

import json
import sys

import gguf
import numpy as np
import pytest
import torch

from conftest import SHIPPED, TINY
from turbo_demo.bench.e2e import other_bytes
from turbo_demo.bench.llamacpp import LlamaCpp
from turbo_demo.bench.peers import gguf_step_bytes, start_llama_cpp
from turbo_demo.checkpoints.checkpoint import load_model
from turbo_demo.checkpoints.gguf_export import export_gguf, gguf_name, permute_rope, unpermute_rope
from turbo_demo.checkpoints.quantized import quantize_checkpoint
from turbo_demo.cli import main
from turbo_demo.errors import UserError
from turbo_demo.runtime import pack
from turbo_demo.runtime.quant import quantize

DENSE = SHIPPED / "dense-swiglu"


def field(reader, key: str):
    """A scalar, string or array metadata value of a GGUFReader."""
    f = reader.fields[key]
    values = [f.parts[i] for i in f.data]
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        if f.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(v).decode() for v in values]
        return [v.item() for v in values]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(values[0]).decode()
    return values[0].item()


def tensors(reader) -> dict:
    return {t.name: t for t in reader.tensors}


def hf_weights(path) -> dict[str, torch.Tensor]:
    model = load_model(path, torch.float32)
    return {name: t.detach() for name, t in model.state_dict().items()}


def undone(name: str, data: np.ndarray) -> torch.Tensor:
    """A GGUF tensor's values in HF's row order."""
    t = torch.from_numpy(np.array(data, dtype=np.float32))
    heads = {"attn_q": TINY["num_attention_heads"], "attn_k": TINY["num_key_value_heads"]}
    kind = name.split(".")[-2]
    return unpermute_rope(t, heads[kind]) if kind in heads else t


def test_f16_file_reads_back_every_tensor_and_the_metadata(tiny_dirs, tmp_path):
    src = tiny_dirs["dense"]
    reader = gguf.GGUFReader(export_gguf(src, tmp_path / "m.gguf"))
    config = json.loads((src / "config.json").read_text())
    assert field(reader, "general.architecture") == "llama"
    expected = {
        "llama.context_length": TINY["max_position_embeddings"],
        "llama.embedding_length": TINY["hidden_size"],
        "llama.block_count": TINY["num_hidden_layers"],
        "llama.feed_forward_length": TINY["intermediate_size"],
        "llama.attention.head_count": TINY["num_attention_heads"],
        "llama.attention.head_count_kv": TINY["num_key_value_heads"],
        "llama.rope.dimension_count": TINY["hidden_size"] // TINY["num_attention_heads"],
        "llama.vocab_size": 300,
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 0,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
    }
    assert {key: field(reader, key) for key in expected} == expected
    assert field(reader, "llama.rope.freq_base") == pytest.approx(config["rope_parameters"]["rope_theta"])
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"])
    tokenizer = json.loads((src / "tokenizer.json").read_text())
    vocab = {i: t for t, i in tokenizer["model"]["vocab"].items()}
    assert field(reader, "tokenizer.ggml.tokens") == [vocab[i] for i in range(300)]
    assert field(reader, "tokenizer.ggml.merges") == [" ".join(m) for m in tokenizer["model"]["merges"]]
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[0] == gguf.TokenType.CONTROL and set(types[1:]) == {gguf.TokenType.NORMAL}

    weights, written = hf_weights(src), tensors(reader)
    # tied embeddings: no output.weight, llama.cpp reads token_embd as the LM head
    assert set(written) == {gguf_name(n) for n in weights} - {"output.weight"}
    for name, w in weights.items():
        if (g := gguf_name(name)) in written:
            expected_type = gguf.GGMLQuantizationType.F32 if w.dim() == 1 else gguf.GGMLQuantizationType.F16
            assert written[g].tensor_type == expected_type, g
            assert torch.equal(undone(g, written[g].data), w.half().float()), g


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_quantized_files_hold_the_blocks_of_each_matrix(tiny_dirs, tmp_path, qtype):
    """Q8_0 and Q4_0 bytes are our int8 and int4 blocks' bytes (runtime/quant.py, the same
    formats), the q4_0 file's embedding and LM head at Q8_0."""
    written = tensors(gguf.GGUFReader(export_gguf(tiny_dirs["dense"], tmp_path / "m.gguf", qtype)))
    Q = gguf.GGMLQuantizationType
    for name, w in hf_weights(tiny_dirs["dense"]).items():
        if (g := gguf_name(name)) not in written or w.dim() == 1:
            continue
        t = written[g]
        heads = {"attn_q": TINY["num_attention_heads"], "attn_k": TINY["num_key_value_heads"]}
        kind = g.split(".")[-2]
        permuted = permute_rope(w, heads[kind]) if kind in heads else w
        int8 = qtype == "q8_0" or g == "token_embd.weight"  # q4_0 files keep the embedding at Q8_0
        assert t.tensor_type == (Q.Q8_0 if int8 else Q.Q4_0), g
        assert np.array_equal(np.asarray(t.data), quantize(permuted, "int8" if int8 else "int4").data.numpy()), g


def rope_hf(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """HF's rotary embedding of x (..., d): pairs (j, j + d/2) rotated by angle_j (rotate_half)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = angle.cos(), angle.sin()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rope_llama_cpp(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """llama.cpp's rotary embedding (the llama architecture's): pairs (2j, 2j + 1) rotated by angle_j."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    cos, sin = angle.cos(), angle.sin()
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def test_the_permutation_turns_hf_rope_into_llama_cpp_rope():
    torch.manual_seed(0)
    n_head, d, hidden, position = 4, 8, 16, 5
    w, x = torch.randn(n_head * d, hidden), torch.randn(hidden)
    angle = position * 10000.0 ** (-torch.arange(0, d, 2) / d)
    heads_hf = (w @ x).view(n_head, d)
    heads_gguf = (permute_rope(w, n_head) @ x).view(n_head, d)
    # llama.cpp's rope of the permuted rows == the permuted rows of HF's rope
    expected = (permute_rope(rope_hf(heads_hf, angle).reshape(-1, 1), n_head)).view(n_head, d)
    torch.testing.assert_close(rope_llama_cpp(heads_gguf, angle), expected)
    assert torch.equal(unpermute_rope(permute_rope(w, n_head), n_head), w)


def test_q8_0_file_reads_the_bytes_of_our_int8_pack(tiny_dirs, tmp_path):
    """The bench's bytes-per-token of llama.cpp's Q8_0 dense step and of ours at int8 agree."""
    model = load_model(tiny_dirs["dense"], torch.float32)
    packed = pack(model, "int8")
    ffn = sum(f.dense_bytes for f in packed.ffns)
    assert gguf_step_bytes(export_gguf(tiny_dirs["dense"], tmp_path / "m.gguf", "q8_0")) == other_bytes(packed) + ffn


def test_the_command_writes_the_file_and_refuses_in_one_line(tiny_dirs, tmp_path, monkeypatch, capsys):
    dst = tmp_path / "m.gguf"
    assert main(["export-gguf", str(tiny_dirs["dense"]), str(dst), "--type", "q8_0"]) == 0
    assert capsys.readouterr().out.strip() == str(dst)
    assert gguf.GGUFReader(dst).fields["general.file_type"].parts[-1][0] == gguf.LlamaFileType.MOSTLY_Q8_0
    quantized = quantize_checkpoint(tiny_dirs["dense"], tmp_path / "int8", "int8")
    for src, message in ((tiny_dirs["drelu"], "dReLU"), (quantized, "a quantized checkpoint")):
        assert main(["export-gguf", str(src), str(dst)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    with pytest.raises(UserError, match="unknown GGUF type"):
        export_gguf(tiny_dirs["dense"], dst, "q5_k")
    monkeypatch.setitem(sys.modules, "gguf", None)
    assert main(["export-gguf", str(tiny_dirs["dense"]), str(dst)]) == 2
    assert "pip install gguf" in capsys.readouterr().err


@pytest.mark.skipif(not (DENSE / "config.json").is_file(), reason="no shipped dense model")
def test_llama_cpp_runs_the_f16_file_as_transformers_runs_the_checkpoint(tmp_path):
    """Logits on a short prompt within 0.05 of transformers' fp32 ones (the checkpoint is stored
    in fp16, as the F16 file; measured: 0.007 of logits up to 15), the same greedy tokens, and
    llama.cpp's tokenizer splits text as ours does."""
    import llama_cpp
    from transformers import AutoTokenizer

    llm = llama_cpp.Llama(str(export_gguf(DENSE, tmp_path / "m.gguf")), n_ctx=128, logits_all=True, verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(DENSE)
    text = "def add(a, b):\n    return a + b\n\n# 3 cafés, 42 tests\n"
    ids = tokenizer(text)["input_ids"]
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
    model = load_model(DENSE, torch.float32)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    llm.reset()
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids)])
    assert np.abs(logits - expected).max() < 0.05
    assert (logits.argmax(-1) == expected.argmax(-1)).all()
    # greedy decoding, through the bench's llama.cpp decoder: the prefix that transformers
    # generates before it stops at the end-of-text token
    hf = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids) :].tolist()
    assert LlamaCpp(tmp_path / "m.gguf", torch.get_num_threads(), 128).generate(ids, 12)[: len(hf)] == hf


def test_llama_cpp_starts_without_extra_buffer_types_where_they_crash(tiny_dirs, tmp_path):
    """The bench starts llama.cpp in its own process with its extra buffer types (AMX, the CPU
    repacks), else, where that process dies (SIGILL in AMX's tilezero on this project's Intel
    machine), without them; the flag reaches llama.cpp's model parameters, and both decode the
    same tokens as a llama.cpp without them in this process."""
    path = export_gguf(tiny_dirs["dense"], tmp_path / "m.gguf", "q8_0")
    plain = LlamaCpp(path, 1, 64, extra_bufts=False)
    assert plain.llm.model_params.use_extra_bufts is False
    notes = []
    worker = start_llama_cpp(path, "q8_0", 1, 64, notes)
    assert worker.call("generate", [1, 2, 3], 5) == plain.generate([1, 2, 3], 5)
    fallback = "with llama.cpp's extra buffer types on: run with use_extra_bufts=False"
    assert len(notes) <= 1 and all(n.startswith("llama.cpp q8_0: ") and n.endswith(fallback) for n in notes)
    print(notes)  # -s shows which way it started here
    worker.close()

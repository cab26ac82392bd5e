"""export-gguf --powerinfer: a tiny checkpoint in the published TurboSparse-Mistral layout (bf16
shards and an index, no predictor rank in the config, ranks that differ per layer, an embedding
padded past the tokenizer's ids) written as PowerInfer's file and read back against PowerInfer's
loader. The table here is written from llama.cpp's llm_load_sparse_model_tensors (PowerInfer's
fork), not from the module: the PWRI magic, the bamboo architecture, every tensor's name, ggml
shape and type, the values (down_proj transposed, the predictors as stored, Q / K permuted), the
threshold and the padded vocabulary typed UNUSED. The sabotage test breaks the writer one way at
a time and sees the matching check fail."""

import json
import re

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_gguf import field
from test_published import CONFIG as PUBLISHED_SMALL
from test_published import RANKS

from conftest import tiny_model
from turbo_demo.checkpoints import gguf_export, gguf_vocab, powerinfer_gguf
from turbo_demo.checkpoints.checkpoint import save_checkpoint
from turbo_demo.checkpoints.gguf_export import permute_rope
from turbo_demo.checkpoints.powerinfer_gguf import export_powerinfer, sparse_threshold
from turbo_demo.cli import main
from turbo_demo.errors import UserError
from turbo_demo.models.bamboo import BambooConfig, BambooForCausalLM

Q = gguf.GGMLQuantizationType
TOKENIZER_IDS = 300  # conftest's byte-level BPE tokenizer
VOCAB = 320  # embedding rows: ids 300..319 are padding
CONFIG = {**PUBLISHED_SMALL, "vocab_size": VOCAB}  # test_published's layout, with this tokenizer's vocab


def write_published(path, tokenizer) -> dict[str, torch.Tensor]:
    """The published layout in `path` (random weights, ranks RANKS); returns the weights in fp32."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(CONFIG))
    torch.manual_seed(0)
    fields = {k: v for k, v in CONFIG.items() if k not in ("architectures", "auto_map", "model_type", "torch_dtype")}
    model = BambooForCausalLM(BambooConfig(**fields, predictor_rank=RANKS, initializer_range=0.08))
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, path / file, metadata={"format": "pt"})
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    tokenizer.save_pretrained(path)
    return {k: v.float() for k, v in state.items()}


@pytest.fixture(scope="module")
def published(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("published") / "TurboSparse-Mistral-Instruct"
    return path, write_published(path, tokenizer)


def loader_table() -> dict[str, tuple[tuple[int, ...], dict[str, Q]]]:
    """{name: (ggml shape, {file type: GGML type})} as PowerInfer's loader asks for the tensors
    (create_tensor(..., {ne0, ne1})) and as the file types store them."""
    H, F, V = CONFIG["hidden_size"], CONFIG["intermediate_size"], VOCAB
    KV = H // CONFIG["num_attention_heads"] * CONFIG["num_key_value_heads"]  # n_embd_gqa
    matrix = {"f16": Q.F16, "q4_0": Q.Q4_0}
    vector = {"f16": Q.F32, "q4_0": Q.F32}
    head = {"f16": Q.F16, "q4_0": Q.Q8_0}  # the embedding and the LM head (gguf_export's rule)
    predictor = {"f16": Q.F16, "q4_0": Q.F16}  # as PowerInfer's convert.py writes them
    table = {"token_embd.weight": ((H, V), head), "output_norm.weight": ((H,), vector), "output.weight": ((H, V), head)}
    for i, r in enumerate(RANKS):
        layer = {
            "attn_norm": ((H,), vector),
            "attn_q": ((H, H), matrix),
            "attn_k": ((H, KV), matrix),
            "attn_v": ((H, KV), matrix),
            "attn_output": ((H, H), matrix),
            "ffn_norm": ((H,), vector),
            "ffn_gate": ((H, F), matrix),
            "ffn_up": ((H, F), matrix),
            "ffn_down_t": ((H, F), matrix),
            "fc1": ((H, r), predictor),
            "fc2": ((r, F), predictor),
        }
        table.update({f"blk.{i}.{k}.weight": v for k, v in layer.items()})
    return table


def expected_values(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The values a tensor of the file holds, in numpy's order, from the checkpoint's weights."""
    top = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    kind = name.split(".")[-2]
    if kind in top:
        return state[f"{top[kind]}.weight"]
    p = f"model.layers.{name.split('.')[1]}."
    hf = {
        "attn_norm": "input_layernorm", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
        "fc1": "mlp.predictor.fc1", "fc2": "mlp.predictor.fc2",
    }  # fmt: skip
    if kind == "attn_q":
        return permute_rope(state[p + "self_attn.q_proj.weight"], CONFIG["num_attention_heads"])
    if kind == "attn_k":
        return permute_rope(state[p + "self_attn.k_proj.weight"], CONFIG["num_key_value_heads"])
    if kind == "ffn_down_t":
        return state[p + "mlp.down_proj.weight"].T
    return state[f"{p}{hf[kind]}.weight"]


def values_problem(name: str, t, expected: torch.Tensor) -> str | None:
    """Why the tensor's values are not the expected ones: equal after F16 / F32 rounding, within
    a step of each block's scale when quantized (Q4_0: amax / 8, Q8_0: amax / 127)."""
    if t.tensor_type in (Q.F16, Q.F32):
        dtype = torch.float16 if t.tensor_type == Q.F16 else torch.float32
        same = torch.equal(torch.from_numpy(np.array(t.data, dtype=np.float32)), expected.to(dtype).float())
        return None if same else f"{name}: values"
    values = torch.from_numpy(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)).reshape(-1, 32)
    blocks = expected.reshape(-1, 32)
    step = blocks.abs().amax(-1, keepdim=True) / (8 if t.tensor_type == Q.Q4_0 else 127)
    return None if ((values - blocks).abs() <= step + 1e-6).all() else f"{name}: values"


def read_back(path, tmp_path) -> gguf.GGUFReader:
    """A GGUFReader of the file (a copy with GGUF's magic: the reader accepts no other)."""
    readable = tmp_path / "as-gguf.gguf"
    readable.write_bytes(b"GGUF" + path.read_bytes()[4:])
    return gguf.GGUFReader(readable)


def problems(path, state: dict[str, torch.Tensor], qtype: str, tmp_path) -> list[str]:
    """Everything about the file at `path` that PowerInfer's loader or the checkpoint disagrees with."""
    found = [] if path.read_bytes()[:4] == b"PWRI" else ["magic"]
    reader = read_back(path, tmp_path)
    if field(reader, "general.architecture") != "bamboo":
        found.append("architecture")
    hparams = {
        "context_length": CONFIG["max_position_embeddings"],
        "block_count": len(RANKS),
        "embedding_length": CONFIG["hidden_size"],
        "feed_forward_length": CONFIG["intermediate_size"],
        "attention.head_count": CONFIG["num_attention_heads"],
        "attention.head_count_kv": CONFIG["num_key_value_heads"],
    }
    found += [
        f"bamboo.{k}"
        for k, v in hparams.items()
        if f"bamboo.{k}" not in reader.fields or field(reader, f"bamboo.{k}") != v
    ]
    threshold = reader.fields.get("powerinfer.sparse_threshold")
    if threshold is None or threshold.types != [gguf.GGUFValueType.FLOAT32] or field(reader, threshold.name) != 0.0:
        found.append("powerinfer.sparse_threshold")
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    padding = [f"[PAD{i}]" for i in range(TOKENIZER_IDS, VOCAB)]
    if len(tokens) != VOCAB or tokens[TOKENIZER_IDS:] != padding or len(set(tokens)) != VOCAB:
        found.append("vocab rows")
    if set(types[TOKENIZER_IDS:]) != {gguf.TokenType.UNUSED} or gguf.TokenType.UNUSED in types[:TOKENIZER_IDS]:
        found.append("padding types")
    table, written = loader_table(), {t.name: t for t in reader.tensors}
    found += [f"{name}: missing or extra" for name in sorted(table.keys() ^ written.keys())]
    for name in sorted(table.keys() & written.keys()):
        shape, file_types = table[name]
        t = written[name]
        if tuple(int(d) for d in t.shape) != shape:
            found.append(f"{name}: shape")
        elif t.tensor_type != file_types[qtype]:
            found.append(f"{name}: type")
        elif problem := values_problem(name, t, expected_values(state, name)):
            found.append(problem)
    return found


@pytest.mark.parametrize("qtype", ["f16", "q4_0"])
def test_the_file_is_what_powerinfer_loads_and_holds_the_checkpoint(published, tmp_path, qtype):
    src, state = published
    path = export_powerinfer(src, tmp_path / "m.powerinfer.gguf", qtype)
    assert problems(path, state, qtype, tmp_path) == []


def down_not_transposed(oriented):
    """down_proj's values laid out in the transposed shape without transposing them."""
    return lambda name, w, config: w.reshape(w.shape[::-1]) if "ffn_down_t" in name else oriented(name, w, config)


def padding_typed_normal(base_types):
    def sabotaged(gguf_module, tokenizer, vocab_size):
        types = base_types(gguf_module, tokenizer, vocab_size)
        return [gguf.TokenType.NORMAL if t == gguf.TokenType.UNUSED else t for t in types]

    return sabotaged


def down_at_f32(powerinfer_type):
    def sabotaged(gguf_module, name, shape, qtype):
        return Q.F32 if "ffn_down_t" in name else powerinfer_type(gguf_module, name, shape, qtype)

    return sabotaged


SABOTAGES = {  # how the writer goes wrong -> the check that must fail
    "down not transposed": (powerinfer_gguf, "oriented", down_not_transposed, "blk.0.ffn_down_t.weight: values"),
    "Q not permuted": (  # the permutation is gguf_export's, which the PowerInfer writer shares
        gguf_export,
        "permute_rope",
        lambda permute: lambda w, n: w if n == CONFIG["num_attention_heads"] else permute(w, n),
        "blk.0.attn_q.weight: values",
    ),
    "GGUF's magic": (powerinfer_gguf, "MAGIC", lambda _: b"GGUF", "magic"),
    "threshold under another key": (
        powerinfer_gguf,
        "THRESHOLD_KEY",
        lambda _: "sparse_threshold",
        "powerinfer.sparse_threshold",
    ),
    "padding typed NORMAL": (gguf_vocab, "base_types", padding_typed_normal, "padding types"),
    "down_t at F32": (powerinfer_gguf, "powerinfer_type", down_at_f32, "blk.0.ffn_down_t.weight: type"),
}


@pytest.mark.parametrize("sabotage", SABOTAGES)
def test_each_check_fails_on_a_writer_that_gets_it_wrong(published, tmp_path, monkeypatch, sabotage):
    src, state = published
    module, attribute, replace, expected = SABOTAGES[sabotage]
    monkeypatch.setattr(module, attribute, replace(getattr(module, attribute)))
    found = problems(export_powerinfer(src, tmp_path / "m.gguf"), state, "f16", tmp_path)
    assert expected in found


def test_one_threshold_for_every_layer():
    """A single number as it is; 0.0 where the config names none (published: score > 0); the
    lowest of per-layer thresholds, so that no layer computes fewer neurons than it was
    calibrated for."""
    assert sparse_threshold(BambooConfig()) == 0.0
    assert sparse_threshold(BambooConfig(predictor_threshold=-0.25)) == -0.25
    assert sparse_threshold(BambooConfig(predictor_threshold=[-0.1, -0.3, 0.0])) == -0.3


def test_tied_embeddings_still_get_the_lm_head_powerinfer_requires(tmp_path, tokenizer):
    src = save_checkpoint(tiny_model("drelu", predictor_rank=[16, 32]), tokenizer, tmp_path / "tied", torch.float32)
    written = {t.name: t for t in read_back(export_powerinfer(src, tmp_path / "m.gguf"), tmp_path).tensors}
    assert np.array_equal(written["output.weight"].data, written["token_embd.weight"].data)


def test_the_command_writes_the_file_and_refuses_in_one_line(published, tiny_dirs, tmp_path, tokenizer, capsys):
    src, _ = published
    dst = tmp_path / "m.gguf"
    assert main(["export-gguf", str(src), str(dst), "--powerinfer", "--type", "q4_0"]) == 0
    assert capsys.readouterr().out.strip() == str(dst)
    assert dst.read_bytes()[:4] == b"PWRI"
    partial = save_checkpoint(tiny_model("drelu", predictor_rank=[16, 0]), tokenizer, tmp_path / "partial")
    refusals = [
        ([str(tiny_dirs["dense"])], "dReLU (bamboo) models with predictors"),
        ([str(tiny_dirs["drelu"])], "no activation predictors"),
        ([str(partial)], "no activation predictor in layers [1]"),
        ([str(src), "--type", "q8_0"], "f16 or q4_0"),
    ]
    for args, message in refusals:
        assert main(["export-gguf", args[0], str(tmp_path / "x.gguf"), "--powerinfer", *args[1:]]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_tensors_that_do_not_fit_powerinfer_are_refused(published):
    _, state = published
    config = BambooConfig(**{**CONFIG, "predictor_rank": RANKS})
    shapes = {name: tuple(w.shape) for name, w in state.items()}
    assert len(powerinfer_gguf.tensor_names(config, shapes)) == len(loader_table())
    for changed, message in (
        ({"model.extra.weight": (64,)}, "no place for, e.g. model.extra.weight"),
        ({"model.layers.1.mlp.predictor.fc1.weight": (9, 64)}, "does not fit PowerInfer's blk.1.fc1.weight"),
    ):
        with pytest.raises(UserError, match=re.escape(message)):
            powerinfer_gguf.tensor_names(config, shapes | changed)
    with pytest.raises(UserError, match=re.escape("lacks tensors PowerInfer needs, e.g. blk.0.fc2.weight")):
        powerinfer_gguf.tensor_names(config, {k: v for k, v in shapes.items() if "0.mlp.predictor.fc2" not in k})

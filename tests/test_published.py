"""The published TurboSparse-Mistral layout, small: it loads natively, and predictor mode is the
model as published, checked against a reference forward written here from the published formulas.

The checkpoint is written as the model page ships it (../shared/reference/published-formats.md):
a config with no predictor rank, the old `torch_dtype` key and `use_cache: false`; bf16 weights
in two shards with an index; predictor ranks that differ per layer; an embedding padded beyond
the tokenizer's ids; a ChatML tokenizer whose eos (<|im_end|>) differs from the config's (</s>);
the self-contradictory generation config.
"""

import json
import math
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from turbo_demo.app.engine.catalog import ModelStore, model_modes
from turbo_demo.app.engine.compare import Settings, last_round, run_compare
from turbo_demo.app.engine.sides import SideRequest
from turbo_demo.bench.full import CONFIG as PUBLISHED
from turbo_demo.checkpoints.checkpoint import load_model, load_tokenizer
from turbo_demo.checkpoints.config import load_config
from turbo_demo.checkpoints.generation import encode_prompt, read_generation
from turbo_demo.cli import main
from turbo_demo.models.bamboo import BambooConfig, BambooForCausalLM
from turbo_demo.runtime import LeanRuntime, TransformersRuntime, pack
from turbo_demo.runtime.decoder import Sampling

RANKS = [16, 8, 24]
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]
WORDS = ["<unk>", "<s>", "</s>", *LETTERS, " ", *".,!?\n"]  # 35 ids, then <|im_end|>, <|im_start|>
TOKENIZER_IDS = len(WORDS) + 2
VOCAB = 64  # embedding rows: ids 37..63 are padding
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONFIG = {  # as published (bench --full writes it at full size), but small
    **PUBLISHED,
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": len(RANKS),
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
}


def write_published(path):
    """The published layout in `path` (random weights, ranks RANKS); returns the state dict."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(CONFIG))
    torch.manual_seed(0)
    fields = {k: v for k, v in CONFIG.items() if k not in ("architectures", "auto_map", "model_type", "torch_dtype")}
    model = BambooForCausalLM(BambooConfig(**fields, predictor_rank=RANKS, initializer_range=0.08))
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    # norm weights away from 1 (a trained model's are): then the predictor's input, the residual
    # r rather than its norm, decides the mask (with unit weights both give the same signs)
    norms = torch.Generator().manual_seed(1)
    for name in [k for k in state if k.endswith("norm.weight")]:
        state[name] = (torch.rand(state[name].shape, generator=norms) * 1.5 + 0.25).to(torch.bfloat16)
    # padded rows that would win an unrestricted argmax, as an untrained padding row may
    state["lm_head.weight"][TOKENIZER_IDS:] = 4 * state["lm_head.weight"][: VOCAB - TOKENIZER_IDS]
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, path / file, metadata={"format": "pt"})
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    index = {"metadata": {"total_size": sum(v.numel() * 2 for v in state.values())}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    generation = {"do_sample": True, "max_new_tokens": 4096, "temperature": 0.0}  # contradictory, as published
    (path / "generation_config.json").write_text(json.dumps(generation))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>", pad_token="<unk>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    fast.save_pretrained(path)
    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    tokenizer_config.update(tokenizer_class="LlamaTokenizer", chat_template=CHATML)
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (path / "chat_template.jinja").unlink(missing_ok=True)
    return {k: v.float() for k, v in state.items()}


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    path = tmp_path_factory.mktemp("published") / "TurboSparse-Mistral-Instruct"
    return path, write_published(path)


def rms(x, w, eps=1e-5):
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def layer_weights(state, i: int):
    """Layer i's tensors by their name within the layer ("self_attn.q_proj", ...)."""
    return {k.removeprefix(f"model.layers.{i}.").removesuffix(".weight"): v for k, v in state.items()}.__getitem__


def reference_attention(x: torch.Tensor, p, heads: int, kv_heads: int, theta: float) -> torch.Tensor:
    """x (T, H) plus Mistral's attention of it, from the formulas: RMSNorm, RoPE, grouped-query
    attention, causal; p: layer_weights."""
    T, hd = x.shape[0], x.shape[1] // heads
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2).float() / hd))
    angles = torch.arange(T).float()[:, None] * inv
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    n = rms(x, p("input_layernorm"))
    q = (n @ p("self_attn.q_proj").T).view(T, heads, hd).transpose(0, 1)
    k = (n @ p("self_attn.k_proj").T).view(T, kv_heads, hd).transpose(0, 1)
    v = (n @ p("self_attn.v_proj").T).view(T, kv_heads, hd).transpose(0, 1)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k, v = k.repeat_interleave(heads // kv_heads, 0), v.repeat_interleave(heads // kv_heads, 0)
    scores = (q @ k.transpose(1, 2)) / math.sqrt(hd)
    attn = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1) @ v
    return x + attn.transpose(0, 1).reshape(T, -1) @ p("self_attn.o_proj").T


def reference_logits(state, ids: list[int], masked: bool = True) -> torch.Tensor:
    """The published forward of the whole sequence, from the formulas (fp32): Mistral attention
    (RoPE, grouped-query, causal) and the FFN y = W_down(round(sigmoid(fc2(relu(fc1 r)))) *
    relu(W_gate n) * relu(W_up n)), r the residual before post_attention_layernorm, n its norm;
    without the mask when masked is False. -> logits (T, VOCAB)."""
    c = CONFIG
    x = state["model.embed_tokens.weight"][ids]
    for i in range(c["num_hidden_layers"]):
        p = layer_weights(state, i)
        x = reference_attention(x, p, c["num_attention_heads"], c["num_key_value_heads"], c["rope_theta"])
        r, n = x, rms(x, p("post_attention_layernorm"))
        h = torch.relu(n @ p("mlp.gate_proj").T) * torch.relu(n @ p("mlp.up_proj").T)
        if masked:
            score = torch.relu(r @ p("mlp.predictor.fc1").T) @ p("mlp.predictor.fc2").T
            h = h * torch.round(torch.sigmoid(score))
        x = x + h @ p("mlp.down_proj").T
    return rms(x, state["model.norm.weight"]) @ state["lm_head.weight"].T


def reference_greedy(state, prompt: list[int], steps: int, vocab: int, masked: bool = True):
    """(tokens, unrestricted argmaxes): greedy over ids < vocab, and what the raw argmax was."""
    ids, raw = list(prompt), []
    for _ in range(steps):
        logits = reference_logits(state, ids, masked)[-1]
        raw.append(int(logits.argmax()))
        ids.append(int(logits[:vocab].argmax()))
    return ids[len(prompt) :], raw


def test_the_published_layout_loads_natively(published):
    path, state = published
    config = load_config(path)
    assert config.predictor_rank == RANKS  # from the weight shapes: the config names none
    model = load_model(path)
    assert model.dtype == torch.float32  # auto: a small model in fp32, from bf16 shards
    for i, rank in enumerate(RANKS):
        mlp = model.model.layers[i].mlp
        assert mlp.predictor.fc1.weight.shape == (rank, CONFIG["hidden_size"])
        assert torch.equal(mlp.predictor.fc2.weight, state[f"model.layers.{i}.mlp.predictor.fc2.weight"])
    assert torch.equal(model.lm_head.weight, state["lm_head.weight"])  # untied, as published
    packed = pack(model)
    assert [f.threshold for f in packed.ffns] == [0.0] * len(RANKS)  # the published rule: score > 0


def test_generation_reads_every_declaration(published):
    path, _ = published
    tokenizer = load_tokenizer(path)
    generation = read_generation(path, load_config(path), tokenizer)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert generation.stop_ids == {2, im_end}  # config's </s> and the tokenizer's <|im_end|>
    assert generation.vocab == TOKENIZER_IDS == len(tokenizer)
    assert generation.chat and generation.temperature == 0.0  # sampling at 0 -> greedy, said so
    assert any("temperature 0.0" in note for note in generation.notes)
    ids, text = encode_prompt(tokenizer, "hi", system="be brief")
    assert text == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert encode_prompt(tokenizer, "hi", chat=False) == (tokenizer("hi")["input_ids"], "hi")


@pytest.mark.parametrize("engine", [LeanRuntime, TransformersRuntime])
def test_predictor_mode_is_the_published_model(published, engine, backends):
    """Tokens and logits of our predictor mode == the published forward; prefill masked too."""
    path, state = published
    packed = pack(load_model(path))
    prompt = [3, 8, 15, 15, 18, 29, 22, 18, 21, 15, 7]
    expected, raw = reference_greedy(state, prompt, 12, TOKENIZER_IDS)
    assert any(t >= TOKENIZER_IDS for t in raw)  # the padded rows would win: the limit is tested
    for kernels in backends:
        runtime = engine(packed, "predictor", kernels)
        tokens = [s.token for s in runtime.generate(prompt, 12, vocab=TOKENIZER_IDS)]
        assert tokens == expected, kernels.name
        if engine is TransformersRuntime:  # the config's use_cache: false does not turn the cache off
            assert runtime.cache.get_seq_length() == len(prompt) + 11
        full = prompt + tokens
        want = reference_logits(state, full[:-1])
        got = [runtime.prefill(torch.tensor(full[:6]))] + [runtime.decode(t)[0] for t in full[6:-1]]
        torch.testing.assert_close(torch.stack(got), want[5:], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["dense", "exact"])
def test_dense_and_exact_are_drelu_without_the_mask(published, mode, backends):
    path, state = published
    packed = pack(load_model(path))
    prompt = [3, 8, 15, 15, 18, 29]
    expected, _ = reference_greedy(state, prompt, 8, TOKENIZER_IDS, masked=False)
    for kernels in backends:
        steps = LeanRuntime(packed, mode, kernels).generate(prompt, 8, vocab=TOKENIZER_IDS)
        assert [s.token for s in steps] == expected


@pytest.mark.parametrize("engine", [LeanRuntime, TransformersRuntime])
def test_no_padded_id_is_ever_sampled(published, engine, backends):
    path, _ = published
    packed = pack(load_model(path))
    for kernels in backends:
        for mode in ("dense", "predictor"):
            runtime = engine(packed, mode, kernels)
            for seed in range(3):
                steps = runtime.generate([3, 4, 5], 20, Sampling(3.0, 1.0, seed), vocab=TOKENIZER_IDS)
                assert all(s.token < TOKENIZER_IDS for s in steps)


def test_generation_stops_on_every_declared_eos(published):
    path, _ = published
    packed = pack(load_model(path))
    runtime = LeanRuntime(packed, "dense")
    free = [s.token for s in runtime.generate([3, 4, 5], 12, vocab=TOKENIZER_IDS)]
    stop = free[4]
    stopped = [s.token for s in runtime.generate([3, 4, 5], 12, stop_ids={2, stop}, vocab=TOKENIZER_IDS)]
    assert stopped == free[: free.index(stop) + 1]


def test_the_app_runs_the_published_model_as_a_chat_model(published):
    path, _ = published
    store = ModelStore()
    assert model_modes(str(path)) == ["dense", "exact", "predictor", "threshold"]
    settings = Settings(max_new_tokens=6, temperature=0.0, system="be brief")
    left, right = last_round(
        run_compare(store, SideRequest(str(path), "dense"), SideRequest(str(path), "predictor"), "hi", settings)
    )
    assert not left.error and not right.error
    assert right.rendered_prompt.startswith("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi")
    assert "temperature 0.0" in right.notice and "Temperature slider" in right.notice
    assert all(t < TOKENIZER_IDS for t in left.token_ids + right.token_ids)
    asked = SideRequest(str(path), "dense"), SideRequest(str(path), "exact")
    plain, _ = last_round(run_compare(store, *asked, "hi", replace(settings, chat=False)))
    assert plain.rendered_prompt == "hi"


def test_generate_uses_the_chat_template_and_says_what_it_overrode(published, capsys):
    path, _ = published
    assert main(["generate", str(path), "--prompt", "hi", "--mode", "predictor", "--max-new-tokens", "4"]) == 0
    assert "temperature 0.0, which is not a distribution: greedy decoding is used instead" in capsys.readouterr().err
    assert main(["generate", str(path), "--prompt", "hi", "--max-new-tokens", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["chat"] and out["rendered_prompt"].endswith("<|im_start|>assistant\n") and out["temperature"] == 0.0
    assert main(["generate", str(path), "--prompt", "hi", "--no-chat", "--max-new-tokens", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rendered_prompt"] == "hi"

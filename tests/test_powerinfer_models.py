"""PowerInfer's own models and predictor folders load here, and predictor mode is PowerInfer's rule.

Two checkpoints, small, in the layouts PowerInfer runs (../shared/reference/published-formats.md):
ReluLLaMA (SparseLLM/ReluLLaMA-7B: a Llama config with "hidden_act": "relu", fp16 safetensors,
ReGLU h = relu(W_gate x) * (W_up x)) with its predictors in the sibling folder ReluLLaMA-7B-Predictor
(model_{i}.pt of fc1 (r_i, H) and fc2 (I, r_i) in fp32, ranks differing per layer, a config.json with
sparse_threshold 0.1), and Bamboo (PowerInfer/Bamboo-base-v0_1: model_type "bamboo", dReLU, bf16)
with Bamboo-base-v0.1-predictor (no config.json: threshold 0.0). Norm weights are away from 1 and
q, k scaled up 10x, so that attention is far from uniform and the residual r differs from its norm.

The reference forward is written here from the formulas (fp32): RMSNorm, RoPE, causal grouped-query
attention, the FFN, and PowerInfer's rule: neuron i computed iff fc2(relu(fc1 r))_i >= t, r the
residual before post_attention_layernorm. Our predictor mode must match it at every step; the same
comparison fails for a predictor reading the normed input, or one ignoring the threshold.
"""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from turbo_demo.app.engine.catalog import model_modes
from turbo_demo.checkpoints.checkpoint import load_model, load_tokenizer
from turbo_demo.checkpoints.generation import encode_prompt
from turbo_demo.checkpoints.powerinfer import PowerInferPredictor
from turbo_demo.cli import main
from turbo_demo.errors import UserError
from turbo_demo.models.bamboo import BambooConfig, BambooForCausalLM
from turbo_demo.runtime import LeanRuntime, TransformersRuntime, pack
from turbo_demo.runtime.modes import PredictorMode, PredictorOptions

WORDS = ["<unk>", "<s>", "</s>", *[chr(c) for c in range(ord("a"), ord("z") + 1)], " ", *".,!?\n"]
SIZES = {"hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 128, "vocab_size": len(WORDS)}
RELU_LLAMA = {  # SparseLLM/ReluLLaMA-7B's config.json, small
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "relu",
    **SIZES,
    "intermediate_size": 176,
    "num_hidden_layers": 3,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-5,
    "rope_scaling": None,
    "pretraining_tp": 1,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "transformers_version": "4.31.0",
}
BAMBOO = {  # PowerInfer/Bamboo-base-v0_1's config.json (remote code named, never run), small
    "architectures": ["BambooForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_bamboo.BambooConfig",
        "AutoModelForCausalLM": "modeling_bamboo.BambooForCausalLM",
    },
    "model_type": "bamboo",
    "hidden_act": "relu",
    **SIZES,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
}
PROMPT = [3, 8, 15, 15, 18, 29, 22, 18, 21, 15, 7]  # "hello world"


class ReluMLP(nn.Module):
    """A predictor as PowerInfer's converter defines it (fc1, relu, fc2, no biases): its state dict
    is what a model_{i}.pt holds."""

    def __init__(self, hidden: int, rank: int, n_ff: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, rank, bias=False)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(rank, n_ff, bias=False)


def write_predictors(folder, config: dict, ranks: list[int], threshold: float | None, seed: int) -> list:
    """model_{i}.pt per layer (fp32, scores of unit scale), config.json where threshold is given;
    returns [(fc1, fc2)] per layer."""
    folder.mkdir(parents=True)
    torch.manual_seed(seed)
    layers = []
    for i, rank in enumerate(ranks):
        mlp = ReluMLP(config["hidden_size"], rank, config["intermediate_size"])
        nn.init.normal_(mlp.fc1.weight, std=2 / math.sqrt(config["hidden_size"]))
        nn.init.normal_(mlp.fc2.weight, std=1 / math.sqrt(rank))
        torch.save(mlp.state_dict(), folder / f"model_{i}.pt")
        layers.append((mlp.fc1.weight.detach().clone(), mlp.fc2.weight.detach().clone()))
    if threshold is not None:
        (folder / "config.json").write_text(json.dumps({"sparse_threshold": threshold}))
    return layers


def write_model(path, config: dict, model, dtype: torch.dtype) -> dict:
    """config.json as published and model.safetensors in `dtype`: norm weights in [0.25, 1.75],
    q and k 10x, the FFN 3x (so that its mask shows in the logits), the embeddings 25x (a residual
    of RMS ~0.5, whose scores straddle t = 0.1); returns the fp32 weights."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    for name in state:
        if name.endswith("norm.weight"):
            state[name] = torch.rand(state[name].shape, generator=gen) * 1.5 + 0.25
        elif name.endswith(("q_proj.weight", "k_proj.weight")):
            state[name] *= 10
        elif ".mlp." in name:
            state[name] *= 3
        elif name == "model.embed_tokens.weight":
            state[name] *= 25
    state = {k: v.to(dtype).contiguous() for k, v in state.items()}
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return {k: v.float() for k, v in state.items()}


def write_tokenizer(path) -> None:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)


def kwargs(config: dict) -> dict:
    """A published config.json's fields as config class arguments (less what names the class)."""
    return {k: v for k, v in config.items() if k not in ("architectures", "auto_map", "model_type", "torch_dtype")}


class Fixture:
    """A checkpoint written in `root` and what the reference reads: its fp32 weights, its
    predictors and their threshold, whether its FFN is dReLU."""

    def __init__(self, root, name: str, kind: str):
        self.drelu = kind == "bamboo"
        self.config = BAMBOO if self.drelu else RELU_LLAMA
        config_class, model_class = (BambooConfig, BambooForCausalLM) if self.drelu else (LlamaConfig, LlamaForCausalLM)
        self.ranks = [12, 20] if self.drelu else [16, 8, 24]
        # Bamboo's folder as published (v0.1, lower case) and without config.json: t = 0.0
        self.threshold = 0.0 if self.drelu else 0.1
        self.path = root / name
        self.folder = root / ("Bamboo-base-v0.1-predictor" if self.drelu else f"{name}-Predictor")
        torch.manual_seed(0)
        model = model_class(config_class(**kwargs(self.config)))
        self.state = write_model(self.path, self.config, model, torch.bfloat16 if self.drelu else torch.float16)
        write_tokenizer(self.path)
        self.predictors = write_predictors(self.folder, self.config, self.ranks, None if self.drelu else 0.1, seed=2)


@pytest.fixture(scope="module")
def relu_llama(tmp_path_factory):
    return Fixture(tmp_path_factory.mktemp("powerinfer"), "ReluLLaMA-7B", "relu_llama")


@pytest.fixture(scope="module")
def bamboo(tmp_path_factory):
    return Fixture(tmp_path_factory.mktemp("powerinfer"), "Bamboo-base-v0_1", "bamboo")


@pytest.fixture(params=["relu_llama", "bamboo"])
def fixture(request):
    return request.getfixturevalue(request.param)


def rms(x, w, eps=1e-5):
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def attention(n, p, c) -> torch.Tensor:
    """Causal grouped-query attention with RoPE (theta 10000) of the normed n (T, H) -> (T, H)."""
    T, heads, kv = n.shape[0], c["num_attention_heads"], c["num_key_value_heads"]
    hd = n.shape[1] // heads
    angles = torch.arange(T).float()[:, None] * (1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd)))
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    q = (n @ p("self_attn.q_proj").T).view(T, heads, hd).transpose(0, 1)  # (heads, T, hd)
    k = (n @ p("self_attn.k_proj").T).view(T, kv, hd).transpose(0, 1)  # (kv, T, hd)
    v = (n @ p("self_attn.v_proj").T).view(T, kv, hd).transpose(0, 1)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k, v = k.repeat_interleave(heads // kv, 0), v.repeat_interleave(heads // kv, 0)
    scores = (q @ k.transpose(1, 2)) / math.sqrt(hd)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    out = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1) @ v  # (heads, T, hd)
    return out.transpose(0, 1).reshape(T, -1) @ p("self_attn.o_proj").T


def reference_logits(
    fx: Fixture, ids, masked=True, reads="residual", min_score=None, drelu=None, predictors=None
) -> torch.Tensor:
    """The forward of the whole sequence from the formulas (fp32) -> logits (T, V). Per layer:
    x += attention(n1(x)); r = x, n = n2(r); h = relu(W_gate n) * up, up = relu(W_up n) for dReLU,
    W_up n for ReGLU; masked: h_i kept iff fc2(relu(fc1 r))_i >= t (PowerInfer's rule; the fixture's
    predictors and t unless given, r the normed n where reads is "normed"); x += W_down h."""
    c, state = fx.config, fx.state
    drelu = fx.drelu if drelu is None else drelu
    t = fx.threshold if min_score is None else min_score
    predictors = fx.predictors if predictors is None else predictors
    x = state["model.embed_tokens.weight"][ids]
    for i in range(c["num_hidden_layers"]):

        def p(name, i=i):
            return state[f"model.layers.{i}.{name}.weight"]

        x = x + attention(rms(x, p("input_layernorm")), p, c)
        r, n = x, rms(x, p("post_attention_layernorm"))
        up = n @ p("mlp.up_proj").T
        h = torch.relu(n @ p("mlp.gate_proj").T) * (torch.relu(up) if drelu else up)
        if masked:
            fc1, fc2 = predictors[i]
            score = torch.relu((r if reads == "residual" else n) @ fc1.T) @ fc2.T
            h = h * (score >= t)
        x = x + h @ p("mlp.down_proj").T
    return rms(x, state["model.norm.weight"]) @ state["lm_head.weight"].T


def stepped_logits(runtime, ids: list[int], first: int = 5) -> torch.Tensor:
    """The runtime's logits for positions first-1 .. len(ids)-1: a prefill of ids[:first], then one
    decode step per further token."""
    return torch.stack([runtime.prefill(torch.tensor(ids[:first]))] + [runtime.decode(t)[0] for t in ids[first:]])


def assert_matches(got: torch.Tensor, want: torch.Tensor) -> None:
    """fp32 agreement: sums of at most a few hundred terms per layer, three layers deep, are exact to
    ~1e-6 of the values' scale; 2e-5 of the logits' scale leaves room for summation order."""
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5 * float(want.abs().max()))


def test_both_load_natively_and_find_their_predictors_beside_them(fixture):
    model = load_model(fixture.path)
    assert type(model) is (BambooForCausalLM if fixture.drelu else LlamaForCausalLM)
    assert model.dtype == torch.float32  # auto: small, from fp16 / bf16 files
    for mlp, rank, (fc1, fc2) in zip((layer.mlp for layer in model.model.layers), fixture.ranks, fixture.predictors):
        assert isinstance(mlp.predictor, PowerInferPredictor) and mlp.predictor.min_score == fixture.threshold
        assert mlp.predictor.fc1.weight.shape == (rank, 64)
        assert torch.equal(mlp.predictor.fc1.weight, fc1) and torch.equal(mlp.predictor.fc2.weight, fc2)
    packed = pack(model)
    assert all(f.drelu == fixture.drelu and f.act == "relu" for f in packed.ffns)
    # the model's own forward is still the dense network: attaching changed nothing it computes
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT])).logits[0]
    assert_matches(logits, reference_logits(fixture, PROMPT, masked=False))
    alone = fixture.path.parent / "elsewhere" / fixture.path.name
    shutil.copytree(fixture.path, alone)
    assert getattr(load_model(alone).model.layers[0].mlp, "predictor", None) is None  # nothing beside it
    # the app's mode menu offers predictor mode where loading will attach the folder beside it
    assert model_modes(str(fixture.path)) == ["dense", "exact", "predictor", "threshold"]
    assert model_modes(str(alone)) == ["dense", "exact", "threshold"]


@pytest.mark.parametrize("engine", [LeanRuntime, TransformersRuntime])
def test_predictor_mode_is_powerinfers_rule_at_every_step(fixture, engine, backends):
    model = load_model(fixture.path)
    packed = pack(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    want = reference_logits(fixture, PROMPT)
    for kernels in backends:
        runtime = engine(packed, "predictor", kernels)
        assert_matches(stepped_logits(runtime, PROMPT), want[4:])
        steps = list(runtime.generate(PROMPT[:6], 5))
        assert all(0 < c < 1 for s in steps for c in s.computed_share), kernels.name  # some neurons, not all
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the shared model as loaded


def test_the_same_comparison_fails_for_a_predictor_misread(fixture, backends):
    """The check above can fail: reading the normed input, or (ReluLLaMA's t = 0.1) ignoring the
    threshold, gives other masks and logits beyond the tolerance."""
    packed = pack(load_model(fixture.path))
    got = stepped_logits(LeanRuntime(packed, "predictor", backends[0]), PROMPT)
    wrong = [reference_logits(fixture, PROMPT, reads="normed"), reference_logits(fixture, PROMPT, masked=False)]
    if not fixture.drelu:
        wrong.append(reference_logits(fixture, PROMPT, min_score=0.0))
    for logits in wrong:
        with pytest.raises(AssertionError):
            assert_matches(got, logits[4:])


@pytest.mark.parametrize("mode", ["exact", "threshold"])
def test_exact_and_zero_threshold_are_dense(fixture, mode, backends):
    """ReGLU's h = relu(gate) * up is zero wherever the gate is, as dReLU's is: exact mode (and
    threshold mode at |relu(gate)| > 0) computes the dense FFN, which is the unmasked reference;
    dReLU's formula on ReluLLaMA (or ReGLU's on Bamboo) is not."""
    packed = pack(load_model(fixture.path))
    want = reference_logits(fixture, PROMPT, masked=False)
    for kernels in backends:
        dense = stepped_logits(LeanRuntime(packed, "dense", kernels), PROMPT)
        options = {"threshold": 0.0} if mode == "threshold" else {}
        sparse = stepped_logits(LeanRuntime(packed, mode, kernels, **options), PROMPT)
        assert_matches(dense, want[4:])
        assert_matches(sparse, dense)
        steps = list(LeanRuntime(packed, mode, kernels).generate(PROMPT, 4))
        assert all(c < 1 for s in steps for c in s.computed_share)  # it skipped the zero neurons
    with pytest.raises(AssertionError):
        assert_matches(dense, reference_logits(fixture, PROMPT, masked=False, drelu=not fixture.drelu)[4:])


def test_threshold_mode_runs_on_a_target_sparsity(relu_llama, backends):
    packed = pack(load_model(relu_llama.path))
    for kernels in backends:
        steps = list(LeanRuntime(packed, "threshold", kernels, sparsity=0.7).generate(PROMPT, 4))
        assert all(c < 0.5 for s in steps for c in s.computed_share)


def test_a_score_equal_to_the_threshold_is_computed(bamboo, tmp_path, backends):
    """PowerInfer skips a neuron where score < t: at score == t it computes it. A layer whose fc1 is
    zero scores exactly 0 everywhere: with the default t = 0.0 every neuron is computed, where the
    published TurboSparse rule (score > 0, the threshold option) computes none."""
    folder = tmp_path / "zero"
    shutil.copytree(bamboo.folder, folder)
    state = torch.load(folder / "model_0.pt")
    torch.save({**state, "fc1.weight": torch.zeros_like(state["fc1.weight"])}, folder / "model_0.pt")
    w = pack(load_model(bamboo.path, predictors=folder)).ffns[0]
    x, r = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    for kernels in backends:
        assert PredictorMode(w, kernels).step(x, r)[1].computed == w.n, kernels.name
        assert PredictorMode(w, kernels, PredictorOptions(threshold=0.0)).step(x, r)[1].computed == 0


def greedy(fx: Fixture, ids: list[int], steps: int, **reference) -> list[int]:
    """The reference's greedy tokens after ids, up to `steps` or </s> (the config's eos, 2)."""
    tokens: list[int] = []
    while len(tokens) < steps and (not tokens or tokens[-1] != 2):
        tokens.append(int(reference_logits(fx, ids + tokens, **reference)[-1].argmax()))
    return tokens


def test_generate_takes_a_predictor_folder(relu_llama, tmp_path, capsys):
    """--predictors DIR: the greedy tokens of PowerInfer's rule with that folder's predictors (here
    the sibling's with fc2 negated and t = 0.3), not those of the sibling folder."""
    folder = tmp_path / "chosen"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"sparse_threshold": 0.3}))
    chosen = [(fc1, -fc2) for fc1, fc2 in relu_llama.predictors]
    for i, (fc1, fc2) in enumerate(chosen):
        torch.save({"fc1.weight": fc1, "fc2.weight": fc2}, folder / f"model_{i}.pt")
    ids, _ = encode_prompt(load_tokenizer(relu_llama.path), "hello world", chat=False)
    expected = greedy(relu_llama, ids, 6, predictors=chosen, min_score=0.3)
    assert expected != greedy(relu_llama, ids, 6)  # the folder decides the tokens
    argv = ["generate", str(relu_llama.path), "--prompt", "hello world", "--mode", "predictor"]
    assert main([*argv, "--predictors", str(folder), "--max-new-tokens", "6", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == expected
    assert main([*argv, "--predictors", str(tmp_path / "none"), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "predictor folder not found" in err and "none" in err


def broken(folder, fixture) -> dict:
    """What goes wrong in a predictor folder -> (edit of a copy of fixture.folder, words of the error)."""
    hidden, n_ff = 64, fixture.config["intermediate_size"]
    layers = fixture.config["num_hidden_layers"]

    def save(name, state):
        return lambda: torch.save(state, folder / name)

    return {
        "missing": (lambda: (folder / "model_1.pt").unlink(), ["model_1.pt", "missing"]),
        "fc1 shape": (
            save("model_0.pt", {"fc1.weight": torch.zeros(8, hidden + 1), "fc2.weight": torch.zeros(n_ff, 8)}),
            ["model_0.pt", f"(8, {hidden + 1})", f"(rank, {hidden})"],
        ),
        "fc2 shape": (
            save("model_1.pt", {"fc1.weight": torch.zeros(8, hidden), "fc2.weight": torch.zeros(n_ff - 1, 8)}),
            ["model_1.pt", f"({n_ff}, rank)"],
        ),
        "ranks differ": (
            save("model_0.pt", {"fc1.weight": torch.zeros(8, hidden), "fc2.weight": torch.zeros(n_ff, 9)}),
            ["model_0.pt", "(8, 64)"],
        ),
        "keys": (save("model_0.pt", {"w1": torch.zeros(8, hidden)}), ["model_0.pt", "fc1.weight", "w1"]),
        "not torch": (
            lambda: (folder / "model_0.pt").write_bytes(b"not a zip\n\nat all"),
            ["model_0.pt", "torch.save"],
        ),
        "a layer too many": (
            lambda: shutil.copy(folder / "model_0.pt", folder / f"model_{layers}.pt"),
            [f"model_{layers}.pt"],
        ),
        "threshold": (
            lambda: (folder / "config.json").write_text('{"sparse_threshold": "high"}'),
            ["config.json", "sparse_threshold", "'high'"],
        ),
    }


CASES = ["missing", "fc1 shape", "fc2 shape", "ranks differ", "keys", "not torch", "a layer too many", "threshold"]


@pytest.mark.parametrize("case", CASES)
def test_a_bad_predictor_folder_is_one_clear_line(relu_llama, tmp_path, case):
    folder = tmp_path / "ReluLLaMA-7B-Predictor"
    shutil.copytree(relu_llama.folder, folder)
    edit, words = broken(folder, relu_llama)[case]
    edit()
    with pytest.raises(UserError) as error:
        load_model(relu_llama.path, predictors=folder)
    message = str(error.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_what_a_folder_cannot_attach_to(relu_llama, tmp_path):
    """A checkpoint with predictors of its own keeps them (a given folder is refused); a config
    naming BambooForCausalLM under model_type llama is refused rather than run as ReGLU."""
    own = tmp_path / "own"
    BambooForCausalLM(BambooConfig(**kwargs(BAMBOO), predictor_rank=4)).save_pretrained(own)
    with pytest.raises(UserError, match="carries predictors of its own"):
        load_model(own, predictors=relu_llama.folder)
    assert load_model(own).model.layers[0].mlp.predictor.fc1.weight.shape == (4, 64)  # its own, kept
    mislabeled = tmp_path / "mislabeled"
    shutil.copytree(relu_llama.path, mislabeled)
    (mislabeled / "config.json").write_text(json.dumps({**RELU_LLAMA, "architectures": ["BambooForCausalLM"]}))
    with pytest.raises(UserError, match="model_type 'llama'"):
        load_model(mislabeled)

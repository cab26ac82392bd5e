"""Shared fixtures: tiny dense and dReLU checkpoints built in temporary directories, offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from turbo_demo.checkpoint import save_checkpoint  # noqa: E402
from turbo_demo.modeling_bamboo import BambooConfig, BambooForCausalLM  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "assets" / "models"
TINY = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
            sliding_window=None, bos_token_id=0, eos_token_id=0, pad_token_id=0)
TEXT = ("def add(a, b):\n    return a + b\n\nclass Point:\n    \"\"\"A point in the plane.\"\"\"\n"
        "    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n") * 4


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer=trainer)
    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos, pad_token=eos)


def tiny_model(kind: str, seed: int = 0, **overrides):
    """A random tiny model: "dense" (SwiGLU Mistral) or "drelu" (bamboo)."""
    torch.manual_seed(seed)
    fields = {**TINY, "vocab_size": 300, **overrides}
    if kind == "dense":
        return MistralForCausalLM(MistralConfig(**fields, hidden_act="silu")).eval()
    return BambooForCausalLM(BambooConfig(**fields, hidden_act="relu")).eval()


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tokenizer):
    """{"dense": dir, "drelu": dir}: tiny fp32 checkpoints with tokenizer and generation config."""
    root = tmp_path_factory.mktemp("tiny")
    return {kind: save_checkpoint(tiny_model(kind), tokenizer, root / kind, dtype=torch.float32)
            for kind in ("dense", "drelu")}


@pytest.fixture(autouse=True)
def restore_kernel_backend():
    """The app may switch the process-wide kernel backend; every test starts from the one it had."""
    from turbo_demo.runtime import kernels

    before = kernels.backend()
    yield
    kernels.use_backend(before)

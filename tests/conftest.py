"""Shared fixtures: tiny dense and dReLU checkpoints built in temporary directories, offline;
the kernels of both backends; and the switches the test command takes.

TURBO_DEMO_REQUIRE_CPP=1 (CI sets it) turns "C++ kernels unavailable" from a skip into a failure.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

from turbo_demo.checkpoints.checkpoint import save_checkpoint
from turbo_demo.errors import UserError
from turbo_demo.models.bamboo import BambooConfig, BambooForCausalLM
from turbo_demo.runtime import LeanRuntime, TransformersRuntime, pack
from turbo_demo.runtime.kernels import Kernels, load_kernels

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "assets" / "models"
TINY = dict(
    hidden_size=32,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=True,
    sliding_window=None,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
)
TEXT = (
    'def add(a, b):\n    return a + b\n\nclass Point:\n    """A point in the plane."""\n'
    "    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n"
) * 4


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
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
    return {
        kind: save_checkpoint(tiny_model(kind), tokenizer, root / kind, dtype=torch.float32)
        for kind in ("dense", "drelu")
    }


def lean(model, mode="dense", kernels=None, **options) -> LeanRuntime:
    """A lean runtime on a fresh pack of `model`."""
    return LeanRuntime(pack(model), mode, kernels, **options)


def transformers_engine(model, mode="dense", kernels=None, **options) -> TransformersRuntime:
    return TransformersRuntime(pack(model), mode, kernels, **options)


REQUIRE_CPP = os.environ.get("TURBO_DEMO_REQUIRE_CPP", "") not in ("", "0")


@pytest.fixture(scope="session")
def cpp_kernels():
    """The C++ kernels; a skip where they cannot be built, a failure under TURBO_DEMO_REQUIRE_CPP=1."""
    try:
        return load_kernels("cpp")
    except UserError as exc:
        if REQUIRE_CPP:
            pytest.fail(f"TURBO_DEMO_REQUIRE_CPP is set and the C++ kernels are unavailable: {exc}")
        pytest.skip(f"C++ kernels unavailable: {exc}")


@pytest.fixture(scope="session")
def backends():
    """The kernels of every backend here: the PyTorch reference, and the C++ kernels where they
    build (their absence fails under TURBO_DEMO_REQUIRE_CPP=1, as in cpp_kernels)."""
    try:
        return [Kernels(), load_kernels("cpp")]
    except UserError as exc:
        if REQUIRE_CPP:
            pytest.fail(f"TURBO_DEMO_REQUIRE_CPP is set and the C++ kernels are unavailable: {exc}")
        return [Kernels()]


@pytest.fixture(params=["torch", "cpp"])
def any_kernels(request):
    """Each backend in turn: the PyTorch reference, then the C++ kernels (as cpp_kernels)."""
    return Kernels() if request.param == "torch" else request.getfixturevalue("cpp_kernels")


def pytest_addoption(parser):
    parser.addoption(
        "--update-screenshot",
        action="store_true",
        help="the browser test overwrites assets/screenshot.png (README's picture)",
    )

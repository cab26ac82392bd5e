"""The peers a user would pick instead of our runtime, on the same weights, in the same e2e run:

    llama.cpp             (llama-cpp-python) dense decoding of a GGUF of the model, written by
                          our export-gguf writer at f16, q8_0 and q4_0 (embedding and LM head
                          at q8_0); n_threads = the bench's torch threads
    transformers+torchao  transformers' generate after torchao's quantize_ with int8 and int4
                          weight-only configs, eager (no torch.compile)

Each peer decodes `tokens` tokens after the prompt greedily, as our engines do, timed in the
bench's round robin beside them. Both packages are optional: a missing one (or a torchao
without a CPU int4 path: its "opaque" CPU packing is in torchao <= 0.14.1) is a one-line note.

llama.cpp's llama architecture computes SwiGLU: on a dReLU model it runs the same matrices with
another activation, which changes the values but not the bytes a dense step reads or the work
it does. bytes_per_token is what each dense step reads: every matrix but the embedding (which
one token reads one row of), the LM head included, at its stored size; for torchao int8 one
byte per weight plus a bf16 scale per row, for int4 half a byte plus a bf16 scale and zero per
group of TORCHAO_GROUP.
"""

import copy
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import GenerationConfig

from turbo_demo.choices import GGUF_TYPES
from turbo_demo.model.gguf_export import byte_tokenizer, write_gguf

TORCHAO_GROUP = 128
LLAMA_CPP_CONTEXT = 1024  # positions: the bench's longest prompt (512) and its new tokens
LLAMA_CPP_NOTE = (
    "llama.cpp: dense decoding of the same weights as GGUF (export-gguf's writer) through llama-cpp-python, "
    "{threads} threads; on dReLU weights it computes SwiGLU (same matrices, same bytes read)"
)


def note_once(notes: list[str], note: str) -> None:
    if note not in notes:
        notes.append(note)


def tokenizer_of(path: Path | None) -> dict:
    """The tokenizer.json of the checkpoint at `path`, or a byte-level one for random weights."""
    if path is not None and (path / "tokenizer.json").is_file():
        return json.loads((path / "tokenizer.json").read_text())
    return byte_tokenizer()


def gguf_step_bytes(path: Path) -> int:
    """Bytes of the matrices a dense step reads in the GGUF file at `path`: all but token_embd,
    which is the LM head too where the file has no output.weight (tied embeddings)."""
    from gguf import GGUFReader

    matrices = {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors if len(t.shape) == 2}
    embedding = matrices.pop("token_embd.weight")
    return sum(matrices.values()) + (0 if "output.weight" in matrices else embedding)


class LlamaCpp:
    """A GGUF file loaded in llama.cpp: n_threads for decoding and batches alike, prompts of up
    to `n_batch` tokens evaluated as one batch, `n_ctx` positions (at most the model's, or
    llama.cpp warns)."""

    def __init__(self, path: Path, threads: int, n_ctx: int, n_batch: int = 512):
        import llama_cpp

        self.llm = llama_cpp.Llama(
            str(path),
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_ubatch=n_batch,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        self.n_vocab = self.llm.n_vocab()
        self.get_logits = llama_cpp.llama_get_logits

    def next_token(self, ids: list[int]) -> int:
        """Evaluate ids after the cache's tokens; the greedy next token."""
        self.llm.eval(ids)
        return int(np.ctypeslib.as_array(self.get_logits(self.llm.ctx), shape=(self.n_vocab,)).argmax())

    def prefill(self, ids: list[int]) -> None:
        """The prompt ids from position 0, as one batch (the cache's old tokens are overwritten)."""
        self.llm.reset()
        self.next_token(ids)

    def tokens(self, prompt: list[int], tokens: int) -> Iterator[int]:
        """Greedy decoding of `tokens` tokens after `prompt` (one batch from position 0), one
        llama_decode per new token, each yielded as it comes."""
        self.llm.reset()
        token = self.next_token(prompt)
        yield token
        for _ in range(tokens - 1):
            token = self.next_token([token])
            yield token

    def generate(self, prompt: list[int], tokens: int) -> list[int]:
        return list(self.tokens(prompt, tokens))


@dataclass
class Peer:
    run: Callable[[], object]  # decodes the bench's tokens after its prompt
    bytes_per_token: int
    llama_cpp: LlamaCpp | None = None  # llama.cpp's model, for the prompt phases (bench/phases.py)


def llama_cpp_peers(model, tokenizer: dict, prompt, tokens: int, tmp: Path, notes: list[str]) -> dict:
    """{("llama.cpp", type): Peer} for each GGUF type, or {} and a note without the packages."""
    try:
        import gguf  # noqa: F401 (the writer's dependency, checked before the export starts)
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        note_once(notes, f"llama.cpp peers skipped: {exc.name} is not installed (pip install llama-cpp-python gguf)")
        return {}
    state = model.state_dict()
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    threads, n_ctx = torch.get_num_threads(), min(LLAMA_CPP_CONTEXT, model.config.max_position_embeddings)
    peers = {}
    for qtype in GGUF_TYPES:
        path = write_gguf(tmp / f"{qtype}.gguf", model.config, shapes, state.__getitem__, tokenizer, qtype)
        llm = LlamaCpp(path, threads, n_ctx)
        peers["llama.cpp", qtype] = Peer(lambda llm=llm: llm.generate(prompt, tokens), gguf_step_bytes(path), llm)
    note_once(notes, LLAMA_CPP_NOTE.format(threads=threads))
    return peers


def runs_dense(module: nn.Module, name: str) -> bool:
    """Whether `module` is a linear layer a dense step runs: any but a predictor's."""
    return isinstance(module, nn.Linear) and "predictor" not in name


def torchao_bytes(model, quant: str) -> int:
    """Bytes of the weights torchao's weight-only `quant` stores for `model`'s linear layers."""
    total = 0
    for m in (m for n, m in model.named_modules() if runs_dense(m, n)):
        rows, cols = m.weight.shape
        total += rows * cols + 2 * rows if quant == "int8" else rows * cols // 2 + 4 * rows * cols // TORCHAO_GROUP
    return total


def torchao_config(quant: str):
    """torchao's weight-only config for `quant`."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

    if quant == "int8":
        return Int8WeightOnlyConfig()
    # the CPU kernel (PyTorch's _weight_int4pack_mm_for_cpu) is behind the "opaque" packing,
    # which torchao 0.15 removed
    return Int4WeightOnlyConfig(group_size=TORCHAO_GROUP, int4_packing_format="opaque")


def torchao_peers(model, prompt, tokens: int, quants: tuple, notes: list[str]) -> dict:
    """{("transformers+torchao", quant): Peer} on quantized copies of `model`, and a note for
    each quant that cannot run here."""
    try:
        import torchao
        from torchao.quantization import quantize_
    except ImportError:
        note_once(notes, "transformers+torchao peers skipped: torchao is not installed (pip install torchao==0.14.1)")
        return {}
    generation = GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    peers = {}
    for quant in quants:
        try:
            if quant == "int4" and model.config.hidden_size % TORCHAO_GROUP:
                raise ValueError(f"hidden size {model.config.hidden_size} is not a multiple of {TORCHAO_GROUP}")
            quantized = copy.deepcopy(model)
            quantize_(quantized, torchao_config(quant), filter_fn=runs_dense)
        except (ValueError, TypeError, ImportError, RuntimeError, NotImplementedError) as exc:
            hint = "; torchao 0.14.1 has a CPU int4 path" if quant == "int4" else ""
            why = str(exc).splitlines()[0][:200]
            note_once(notes, f"transformers+torchao {quant} skipped (torchao {torchao.__version__}): {why}{hint}")
            continue
        peers["transformers+torchao", quant] = Peer(
            lambda q=quantized: q.generate(torch.tensor([prompt]), generation_config=generation),
            torchao_bytes(model, quant),
        )
    return peers


def all_peers(model, checkpoint: Path | None, prompt, tokens: int, tmp: Path, notes: list[str]) -> dict:
    """Every peer that runs here on `model` (the weights of `checkpoint`, None for random ones)."""
    tmp.mkdir(parents=True, exist_ok=True)
    return {
        **llama_cpp_peers(model, tokenizer_of(checkpoint), prompt, tokens, tmp, notes),
        **torchao_peers(model, prompt, tokens, ("int8", "int4"), notes),
    }

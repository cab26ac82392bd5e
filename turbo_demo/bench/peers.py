"""The peers a user would pick instead of our runtime, on the same weights, in the same e2e run:

    llama.cpp             (llama-cpp-python) dense decoding of a GGUF of the model, written by
                          our export-gguf writer at f16, q8_0 and q4_0 (embedding and LM head
                          at q8_0); n_threads = the bench's torch threads
    transformers+torchao  transformers' generate after torchao's quantize_ with int8 and int4
                          weight-only configs, eager (no torch.compile)

Each peer decodes `tokens` tokens after the prompt greedily, as our engines do, timed in the
bench's round robin beside them. Each runs in its own process (bench/process.py): a peer that
fails to build or crashes, at its start or in any round, is a one-line note and its rows are
left out, and the run goes on. Both packages are optional: a missing one (or a torchao without
a CPU int4 path: its "opaque" CPU packing is in torchao <= 0.14.1) is a one-line note too.

llama.cpp's llama architecture computes SwiGLU: on a dReLU model it runs the same matrices with
another activation, which changes the values but not the bytes a dense step reads or the work
it does. bytes_per_token is what each dense step reads: every matrix but the embedding (which
one token reads one row of), the LM head included, at its stored size; for torchao int8 one
byte per weight plus a bf16 scale per row, for int4 half a byte plus a bf16 scale and zero per
group of TORCHAO_GROUP.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import GenerationConfig

from turbo_demo.bench.llamacpp import LlamaCpp
from turbo_demo.bench.process import PeerFailed, Worker
from turbo_demo.checkpoints.checkpoint import load_model
from turbo_demo.checkpoints.gguf_export import byte_tokenizer, write_gguf
from turbo_demo.choices import GGUF_TYPES

TORCHAO_GROUP = 128
LLAMA_CPP_CONTEXT = 1024  # positions: the bench's longest prompt (512) and its new tokens
LLAMA_CPP_BATCH = 512  # tokens evaluated as one batch: the bench's longest prompt
LLAMA_CPP_NOTE = (
    "llama.cpp: dense decoding of the same weights as GGUF (export-gguf's writer) through llama-cpp-python "
    "{version} ({build}), {threads} threads; on dReLU weights it computes SwiGLU (same matrices, same bytes read)"
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


@dataclass
class Peer:
    worker: Worker  # the peer's engine (LlamaCpp, Torchao) in its own process
    bytes_per_token: int
    prompt: list[int]
    tokens: int

    def run(self) -> list[int]:
        """The bench's tokens decoded after its prompt."""
        return self.worker.call("generate", self.prompt, self.tokens)


def start_llama_cpp(path: Path, qtype: str, threads: int, n_ctx: int, notes: list[str]) -> Worker | None:
    """llama.cpp on the GGUF file at `path` in its own process, tried on a prompt batch and two
    decode steps (where it has crashed): with its extra buffer types, as llama.cpp runs by
    default, else without them; or None and a note if it fails both ways."""
    failures = []
    for extra_bufts in (True, False):
        try:
            worker = Worker(f"llama.cpp {qtype}", LlamaCpp, path, threads, n_ctx, LLAMA_CPP_BATCH, extra_bufts)
            worker.call("generate", [1] * 32, 2)
        except PeerFailed as exc:
            failures.append(str(exc))
            continue
        worker.on_failure = lambda why: note_once(notes, f"{why}; its rows are left out")
        if failures:
            note_once(notes, f"{failures[0]} with llama.cpp's extra buffer types on: run with use_extra_bufts=False")
        return worker
    note_once(notes, f"llama.cpp {qtype} left out: {failures[0]}, and with use_extra_bufts=False: {failures[1]}")
    return None


def llama_cpp_build() -> str:
    """The CPU features llama.cpp was built with (AMX, REPACK ...: which of its paths run here)."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode()  # "CPU : SSE3 = 1 | AVX = 1 | ... | REPACK = 1 | "
    parts = info.split(":", 1)[-1].split("|")
    return " ".join(part.split("=")[0].strip() for part in parts if part.strip().endswith("= 1"))


def llama_cpp_peers(model, tokenizer: dict, prompt, tokens: int, tmp: Path, notes: list[str]) -> dict:
    """{("llama.cpp", type): Peer} for each GGUF type that runs, or {} and a note without the
    packages."""
    try:
        import gguf  # noqa: F401 (the writer's dependency, checked before the export starts)
        import llama_cpp
    except ImportError as exc:
        note_once(notes, f"llama.cpp peers skipped: {exc.name} is not installed (pip install llama-cpp-python gguf)")
        return {}
    state = model.state_dict()
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    threads, n_ctx = torch.get_num_threads(), min(LLAMA_CPP_CONTEXT, model.config.max_position_embeddings)
    peers = {}
    for qtype in GGUF_TYPES:
        path = write_gguf(tmp / f"{qtype}.gguf", model.config, shapes, state.__getitem__, tokenizer, qtype)
        if (worker := start_llama_cpp(path, qtype, threads, n_ctx, notes)) is not None:
            peers["llama.cpp", qtype] = Peer(worker, gguf_step_bytes(path), prompt, tokens)
    note_once(notes, LLAMA_CPP_NOTE.format(version=llama_cpp.__version__, build=llama_cpp_build(), threads=threads))
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


class Torchao:
    """transformers' generate on the checkpoint at `path`, loaded in `dtype` and quantized by
    torchao's weight-only `quant` (a peer's process builds it: bench/process.py)."""

    def __init__(self, path: Path, dtype: torch.dtype, quant: str, threads: int):
        from torchao.quantization import quantize_

        torch.set_num_threads(threads)
        self.model = load_model(path, dtype)
        if quant == "int4" and self.model.config.hidden_size % TORCHAO_GROUP:
            raise ValueError(f"hidden size {self.model.config.hidden_size} is not a multiple of {TORCHAO_GROUP}")
        quantize_(self.model, torchao_config(quant), filter_fn=runs_dense)

    def generate(self, prompt: list[int], tokens: int) -> list[int]:
        generation = GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
        with torch.inference_mode():
            out = self.model.generate(torch.tensor([prompt]), generation_config=generation)
        return out[0, len(prompt) :].tolist()


def torchao_peers(
    model, checkpoint: Path | None, prompt, tokens: int, quants: tuple, tmp: Path, notes: list[str]
) -> dict:
    """{("transformers+torchao", quant): Peer} on the weights of `model` (those of `checkpoint`;
    random ones are saved in tmp first, for the peers' processes to load), each quantized in its
    own process, and a note for each quant that cannot run here."""
    try:
        import torchao
    except ImportError:
        note_once(notes, "transformers+torchao peers skipped: torchao is not installed (pip install torchao==0.14.1)")
        return {}
    if checkpoint is None:
        checkpoint = tmp / "checkpoint"
        model.save_pretrained(checkpoint)
    peers = {}
    for quant in quants:
        try:
            args = (checkpoint, model.dtype, quant, torch.get_num_threads())
            worker = Worker(f"transformers+torchao {quant}", Torchao, *args)
        except PeerFailed as exc:
            hint = "; torchao 0.14.1 has a CPU int4 path" if quant == "int4" else ""
            note_once(notes, f"{exc} (torchao {torchao.__version__}){hint}")
            continue
        worker.on_failure = lambda why: note_once(notes, f"{why}; its rows are left out")
        peers["transformers+torchao", quant] = Peer(worker, torchao_bytes(model, quant), prompt, tokens)
    return peers


def all_peers(model, checkpoint: Path | None, prompt, tokens: int, tmp: Path, notes: list[str]) -> dict:
    """Every peer that runs here on `model` (the weights of `checkpoint`, None for random ones)."""
    tmp.mkdir(parents=True, exist_ok=True)
    return {
        **llama_cpp_peers(model, tokenizer_of(checkpoint), prompt, tokens, tmp, notes),
        **torchao_peers(model, checkpoint, prompt, tokens, ("int8", "int4"), tmp, notes),
    }


def close_all(peers: dict[tuple, Peer] | None) -> None:
    """Stop the peers' processes (and free what they hold) once their rounds are done."""
    for peer in (peers or {}).values():
        peer.worker.close()

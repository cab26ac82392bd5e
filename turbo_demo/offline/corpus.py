"""The training corpus, its held-out split, the tokenizer, and batches.

Corpus: the Python standard library's own sources (code, docstrings and comments, plus the
English prose of `pydoc_data/topics.py`), which every machine with this Python has, read in a
fixed order: nothing is downloaded. The split is by file: a file is held out when
crc32(relative path) % 20 == 0 (about 5%), so held-out text is never trained on, on any machine.
"""

import hashlib
import sysconfig
import zlib
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from turbo_demo.paths import cache_dir

EOS = "<|endoftext|>"
SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings"}


def corpus_files(split: str) -> list[Path]:
    """The stdlib source files of one split ("train" or "heldout"), sorted by relative path."""
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown split {split!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if SKIPPED_DIRS.intersection(rel.split("/")):
            continue
        heldout = zlib.crc32(rel.encode()) % 20 == 0
        if heldout == (split == "heldout"):
            files.append(path)
    return files


def read_texts(files: list[Path]) -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def train_tokenizer(vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the training split; EOS doubles as BOS and padding."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(read_texts(corpus_files("train")), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS)


def encode_split(tokenizer, split: str) -> torch.Tensor:
    """All files of a split as one 1-D int32 tensor, each file followed by EOS; cached on disk.

    The cache key is the tokenizer's vocabulary plus the file list, so a new tokenizer or
    another Python version never reuses stale tokens.
    """
    files = corpus_files(split)
    key = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    key.update("\n".join(str(p) for p in files).encode())
    path = cache_dir() / f"{split}-{key.hexdigest()[:16]}.pt"
    if path.exists():
        return torch.load(path)
    ids = []
    for text in read_texts(files):
        ids.extend(tokenizer(text)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    tokens = torch.tensor(ids, dtype=torch.int32)
    torch.save(tokens, path)
    return tokens


def random_batch(tokens: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator):
    """(inputs, targets), both (B, T) int64: random windows of T + 1 tokens, shifted by one."""
    starts = torch.randint(0, len(tokens) - seq_len - 1, (batch_size,), generator=gen)
    windows = torch.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()]).long()
    return windows[:, :-1], windows[:, 1:]


def sequential_batches(tokens: torch.Tensor, batch_size: int, seq_len: int, max_tokens: int):
    """Non-overlapping windows from the start, for evaluation: yields (inputs, targets) (B, T)."""
    n_windows = min(len(tokens) - 1, max_tokens) // seq_len
    for first in range(0, n_windows, batch_size):
        idx = range(first, min(first + batch_size, n_windows))
        windows = torch.stack([tokens[i * seq_len : i * seq_len + seq_len + 1] for i in idx]).long()
        yield windows[:, :-1], windows[:, 1:]

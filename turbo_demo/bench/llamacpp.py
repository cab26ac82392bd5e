"""llama.cpp as the bench runs it: a GGUF file in llama-cpp-python, decoding greedily. Light on
purpose (numpy and llama_cpp only): it is what a peer's process imports (bench/process.py)."""

from collections.abc import Iterator
from pathlib import Path

import numpy as np


class LlamaCpp:
    """A GGUF file loaded in llama.cpp: n_threads for decoding and batches alike, prompts of up
    to `n_batch` tokens evaluated as one batch, `n_ctx` positions (at most the model's, or
    llama.cpp warns). `extra_bufts=False` turns off llama.cpp's extra buffer types (the CPU
    repacks, AMX among them), its default being on."""

    def __init__(self, path: Path, threads: int, n_ctx: int, n_batch: int = 512, extra_bufts: bool = True):
        import llama_cpp
        import llama_cpp.llama_cpp as api

        defaults = api.llama_model_default_params

        def model_params():
            params = defaults()
            params.use_extra_bufts = extra_bufts
            return params

        # Llama() takes its model parameters from llama_model_default_params() and has no
        # argument for use_extra_bufts: the default is swapped for the duration of the load
        api.llama_model_default_params = model_params
        try:
            self.llm = llama_cpp.Llama(
                str(path),
                n_ctx=n_ctx,
                n_batch=n_batch,
                n_ubatch=n_batch,
                n_threads=threads,
                n_threads_batch=threads,
                verbose=False,
            )
        finally:
            api.llama_model_default_params = defaults
        self.n_vocab = self.llm.n_vocab()
        self.get_logits = api.llama_get_logits

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

"""How a checkpoint wants to be prompted, sampled and stopped, from its own files.

The three places a checkpoint declares these disagree in published models (TurboSparse-Mistral:
config.json ends on `</s>` = 2, the tokenizer on `<|im_end|>` = 32000, the generation config
asks for sampling at temperature 0), so one function reads them all:

    stop ids     every eos id of config.json, generation_config.json and the tokenizer
    vocab        the ids that may be sampled: min(embedding rows, len(tokenizer)); an embedding
                 padded beyond the tokenizer (32064 rows for 32002 ids) has rows no text is made of
    chat         whether the tokenizer has a chat template (then prompts are a user turn)
    defaults     temperature, top_p, max_new_tokens from generation_config.json where they are
                 sane; where they contradict themselves, greedy, and `notes` says what was wrong
                 (each caller adds what it used instead)
"""

import math
from dataclasses import dataclass
from pathlib import Path

from transformers import GenerationConfig

from turbo_demo.errors import UserError


@dataclass(frozen=True)
class Generation:
    stop_ids: frozenset[int]
    vocab: int
    chat: bool
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int | None = None
    notes: tuple[str, ...] = ()


def ids_of(value) -> set[int]:
    """An eos field (None, an int or a list of ints) as a set of ids."""
    if value is None:
        return set()
    values = value if isinstance(value, (list, tuple, set)) else [value]
    return {int(v) for v in values if isinstance(v, int) and v >= 0}


def sampling_defaults(gen: GenerationConfig | None) -> tuple[float, float, int | None, list[str]]:
    """(temperature, top_p, max_new_tokens, notes) from a generation config; temperature 0 means
    greedy. Sampling at temperature <= 0 (transformers refuses it) becomes greedy, with a note."""
    if gen is None:
        return 0.0, 1.0, None, []
    notes = []
    temperature = gen.temperature if isinstance(gen.temperature, (int, float)) else 1.0
    top_p = gen.top_p if isinstance(gen.top_p, (int, float)) and 0 < gen.top_p <= 1 else 1.0
    if not gen.do_sample:
        temperature = 0.0
    elif not math.isfinite(temperature) or temperature <= 0:
        notes.append(
            f"generation_config.json asks for sampling at temperature {gen.temperature}, which is not a distribution"
        )
        temperature = 0.0
    max_new = gen.max_new_tokens if isinstance(gen.max_new_tokens, int) and gen.max_new_tokens > 0 else None
    return float(temperature), float(top_p), max_new, notes


def read_generation(path: Path, config, tokenizer) -> Generation:
    """What `path`'s config, generation_config.json and tokenizer declare (see the module doc)."""
    try:
        gen = GenerationConfig.from_pretrained(path) if (path / "generation_config.json").is_file() else None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path.name}/generation_config.json: {exc}") from exc
    stop = ids_of(getattr(config, "eos_token_id", None)) | ids_of(tokenizer.eos_token_id)
    if gen is not None:
        stop |= ids_of(gen.eos_token_id)
    rows = getattr(config, "vocab_size", None) or len(tokenizer)
    temperature, top_p, max_new, notes = sampling_defaults(gen)
    return Generation(
        stop_ids=frozenset(stop),
        vocab=min(rows, len(tokenizer)),
        chat=bool(getattr(tokenizer, "chat_template", None)),
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new,
        notes=tuple(notes),
    )


def render_prompt(tokenizer, prompt: str, system: str = "", chat: bool = True) -> str:
    """The text the model reads: with chat (and a chat template), the template applied to an
    optional system turn and the prompt as the user's turn, ending in the assistant's prefix;
    otherwise the prompt itself."""
    if not chat or not getattr(tokenizer, "chat_template", None):
        return prompt
    messages = ([{"role": "system", "content": system}] if system.strip() else []) + [
        {"role": "user", "content": prompt}
    ]
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # a template is code (Jinja): any error it raises is the model's
        raise UserError(f"the model's chat template failed: {type(exc).__name__}: {exc}") from exc


def encode_prompt(tokenizer, prompt: str, system: str = "", chat: bool = True) -> tuple[list[int], str]:
    """(token ids, rendered text) of a prompt; a rendered chat template already holds the special
    tokens it wants, so the tokenizer adds none (as transformers' apply_chat_template does)."""
    text = render_prompt(tokenizer, prompt, system, chat)
    templated = chat and bool(getattr(tokenizer, "chat_template", None))
    ids = tokenizer(text, add_special_tokens=not templated)["input_ids"]
    return list(ids), text

"""The tokenizer of an `export-gguf` file: a checkpoint's tokenizer.json (and tokenizer_config.json)
as llama.cpp's tokenizer.ggml.* keys, written as llama.cpp's convert_hf_to_gguf.py writes them.

Two kinds of tokenizer.json are written, each by its own writer (`vocab_writer` picks it once):

    byte-level BPE     GPT-2's scheme (bytes as printable symbols, a ByteLevel pre-tokenizer with
                       GPT-2's regex; what turbo_demo/offline/corpus.py trains): llama.cpp's "gpt2"
                       model with its "gpt-2" pre-tokenizer, the tokens and the merges
    SentencePiece BPE  Llama-2 / Mistral converted to HF's fast format: a BPE with byte_fallback and
                       the 256 pieces <0x00>..<0xFF>, spaces written ▁ (U+2581) by a Prepend/Replace
                       normalizer or a Metaspace pre-tokenizer: llama.cpp's "llama" model, the tokens
                       with a score each instead of merges

Scores. llama.cpp's "llama" tokenizer is sentencepiece's BPE: it splits text into characters and
merges, among adjacent symbols whose concatenation is a token, the pair whose token scores highest
(the leftmost on ties); a character no token covers becomes its bytes' <0xXX> pieces. HF's BPE
applies the listed merge of lowest rank instead. A token's score is therefore minus the rank of the
first merge that makes it: the two merge in the same order where the merges list every split of a
token into two tokens, which is what converting a sentencepiece model gives (transformers lists them
in piece order, as tokenizer.model scores its pieces). Tokens no merge makes (characters, bytes,
special and added tokens, padding) score below every merge. convert_hf_to_gguf.py reads the scores
from tokenizer.model; from tokenizer.json alone (its LlamaHfVocab) it writes -1000 for every token,
with which llama.cpp merges leftmost pairs first, not HF's order.

Token types: special added tokens (<s>, </s>, <unk>, ChatML's <|im_start|> ...) CONTROL, other added
tokens USER_DEFINED, the byte pieces BYTE (llama kind), ids past the tokenizer's up to the
embedding's rows "[PAD{id}]" UNUSED, the rest NORMAL.

Both kinds: the bos/eos/unk/pad ids (tokenizer_config.json's tokens, else config.json's ids, as
convert_hf_to_gguf.py's SpecialVocab reads them), whether a bos / eos is added (the post-processor's
template starts with the bos / ends with the eos: transformers 5 follows the post-processor, not
tokenizer_config.json's add_bos_token), and the chat template (tokenizer_config.json's, else
chat_template.jinja's).
"""

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path

from turbo_demo.errors import UserError

SPACE = "\u2581"  # ▁, sentencepiece's space
BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
PREPEND = {"type": "Prepend", "prepend": SPACE}  # Llama-2's normalizer: Prepend("▁"), Replace(" ", "▁")
REPLACE = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
SPECIALS = ("bos", "eos", "unk", "pad")
NEITHER = (
    "export-gguf writes byte-level BPE (GPT-2 style) and SentencePiece BPE (Llama / Mistral: byte fallback,"
    " ▁ for spaces) tokenizers only; this tokenizer.json is neither: {}"
)


def read_tokenizer(src: Path) -> tuple[dict, dict]:
    """(tokenizer.json, tokenizer_config.json with its chat template) of the checkpoint at `src`; the
    config is {} where the file is missing, its chat_template from chat_template.jinja where it has none."""
    try:
        tokenizer = json.loads((src / "tokenizer.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{src} has no readable tokenizer.json: export-gguf needs one ({exc})") from exc
    try:
        config = json.loads(path.read_text()) if (path := src / "tokenizer_config.json").is_file() else {}
        if "chat_template" not in config and (path := src / "chat_template.jinja").is_file():
            config["chat_template"] = path.read_text()
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc
    return tokenizer, config


def parts(node: dict | None, key: str) -> list[dict]:
    """A normalizer, pre-tokenizer or post-processor as the list of its steps (a Sequence's `key`)."""
    if not node:
        return []
    return [step for child in node[key] for step in parts(child, key)] if node["type"] == "Sequence" else [node]


def not_sentencepiece(tokenizer: dict) -> str | None:
    """Why this tokenizer.json is not a SentencePiece BPE that llama.cpp's "llama" tokenizer splits as
    transformers does; None if it is one. llama.cpp writes every space ▁, may put one ▁ first, and
    merges the whole text at once: a step that does anything else is refused."""
    model = tokenizer.get("model") or {}
    if model.get("type") != "BPE":
        return f"a {model.get('type')} model"
    if not model.get("byte_fallback"):
        return "a BPE model without byte_fallback"
    if (pieces := sum(1 for token in model["vocab"] if BYTE_PIECE.fullmatch(token))) != 256:
        return f"{pieces} of the 256 byte pieces <0x00>..<0xFF>, which llama.cpp's byte fallback looks up"
    normalizer = parts(tokenizer.get("normalizer"), "normalizers")
    pre = parts(tokenizer.get("pre_tokenizer"), "pretokenizers")
    odd = [step for step in normalizer if step not in (PREPEND, REPLACE)]
    odd += [step for step in pre if step["type"] != "Metaspace" or step.get("replacement") != SPACE]
    if odd:
        return f"a {odd[0]['type']} step"
    if REPLACE not in normalizer and not pre:
        return "spaces left spaces, not ▁"
    if any(step.get("split", True) for step in pre):
        return "a Metaspace splitting the text at each ▁"  # "a▁▁b" would not make llama.cpp's "▁▁"
    return None


def space_prefix(tokenizer: dict) -> bool:
    """Whether a SentencePiece BPE puts ▁ before the text (llama.cpp's add_space_prefix): Llama-2's
    Prepend("▁") normalizer, or a Metaspace pre-tokenizer's prepend scheme."""
    pre = parts(tokenizer.get("pre_tokenizer"), "pretokenizers")
    schemes = [step.get("prepend_scheme", "always" if step.get("add_prefix_space", True) else "never") for step in pre]
    return PREPEND in parts(tokenizer.get("normalizer"), "normalizers") or any(s != "never" for s in schemes)


def token_ids(tokenizer: dict) -> dict[int, str]:
    """{id: token} of the model's vocabulary and the added tokens."""
    return {i: t for t, i in tokenizer["model"]["vocab"].items()} | {
        a["id"]: a["content"] for a in tokenizer.get("added_tokens", ())
    }


def base_types(gguf, tokenizer: dict, vocab_size: int) -> list:
    """The type of each id below `vocab_size` (see the module doc), but BYTE, which only the llama
    kind has: special added tokens CONTROL, other added ones USER_DEFINED, padding UNUSED, the rest
    NORMAL."""
    T, by_id = gguf.TokenType, token_ids(tokenizer)
    added = {a["id"]: a for a in tokenizer.get("added_tokens", ())}

    def kind(i: int):
        if i in added:
            return T.CONTROL if added[i].get("special") else T.USER_DEFINED
        return T.NORMAL if i in by_id else T.UNUSED

    return [kind(i) for i in range(vocab_size)]


def tokens_of(tokenizer: dict, vocab_size: int) -> list[str]:
    """The token of each id below `vocab_size`, "[PAD{id}]" past the tokenizer's (convert_hf_to_gguf.py's)."""
    by_id = token_ids(tokenizer)
    return [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]


def write_byte_level(writer, gguf, tokenizer: dict, vocab_size: int) -> None:
    """The "gpt2" model: tokens, types and merges "a b", as convert_hf_to_gguf.py's get_vocab_base."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # byte-level BPE splits words with GPT-2's regex
    writer.add_token_list(tokens_of(tokenizer, vocab_size))
    writer.add_token_types(base_types(gguf, tokenizer, vocab_size))
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]])


def write_sentencepiece(writer, gguf, tokenizer: dict, vocab_size: int) -> None:
    """The "llama" model: tokens, scores and types (see the module doc), and add_space_prefix."""
    merges = tokenizer["model"]["merges"]
    made = {}  # token: rank of the first merge that makes it
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        made.setdefault(left + right, rank)
    tokens = tokens_of(tokenizer, vocab_size)
    byte_ids = {i for token, i in tokenizer["model"]["vocab"].items() if BYTE_PIECE.fullmatch(token)}
    types = [gguf.TokenType.BYTE if i in byte_ids else t for i, t in enumerate(base_types(gguf, tokenizer, vocab_size))]
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores([-float(made.get(t, len(merges))) for t in tokens])
    writer.add_token_types(types)
    writer.add_add_space_prefix(space_prefix(tokenizer))


def vocab_writer(tokenizer: dict) -> Callable:
    """The writer of this tokenizer.json's kind; a UserError saying why if it is neither kind."""
    model, pre = tokenizer.get("model") or {}, tokenizer.get("pre_tokenizer") or {}
    if model.get("type") == "BPE" and pre.get("type") == "ByteLevel":
        if pre.get("use_regex", True):
            return write_byte_level
        why = "a ByteLevel pre-tokenizer without GPT-2's regex"
    elif (why := not_sentencepiece(tokenizer)) is None:
        return write_sentencepiece
    raise UserError(NEITHER.format(why))


def special_ids(tokenizer: dict, tokenizer_config: Mapping, config) -> dict[str, int]:
    """{"bos": id, ...}: tokenizer_config.json's bos/eos/unk/pad tokens as added tokens' ids, else
    config.json's {bos,eos,unk,pad}_token_id, where either says."""
    added = {a["content"]: a["id"] for a in tokenizer.get("added_tokens", ())}
    ids = {}
    for kind in SPECIALS:
        token = tokenizer_config.get(f"{kind}_token")
        content = token.get("content") if isinstance(token, dict) else token
        token_id = added.get(content, getattr(config, f"{kind}_token_id", None))
        if isinstance(token_id, int) and 0 <= token_id < config.vocab_size:
            ids[kind] = token_id
    return ids


def template_ends(tokenizer: dict) -> tuple[int | None, int | None]:
    """The ids of the special tokens the post-processor puts first and last around one sequence (a
    TemplateProcessing, alone or in a Sequence); None where it puts none."""
    processors = parts(tokenizer.get("post_processor"), "processors")
    template = next((p for p in processors if p["type"] == "TemplateProcessing"), None)
    if not template or not template["single"]:
        return None, None
    ids = {name: special["ids"][0] for name, special in template["special_tokens"].items()}
    first, last = (item.get("SpecialToken", {}).get("id") for item in (template["single"][0], template["single"][-1]))
    return ids.get(first), ids.get(last)


def write_specials(writer, tokenizer: dict, tokenizer_config: Mapping, config) -> None:
    """Special token ids, add_bos / add_eos, and the chat template (see the module doc)."""
    ids = special_ids(tokenizer, tokenizer_config, config)
    for kind, token_id in ids.items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    first, last = template_ends(tokenizer)
    writer.add_add_bos_token(first is not None and first == ids.get("bos"))
    writer.add_add_eos_token(last is not None and last == ids.get("eos"))
    if tokenizer_config.get("chat_template"):
        writer.add_chat_template(tokenizer_config["chat_template"])

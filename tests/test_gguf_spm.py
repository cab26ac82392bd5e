"""export-gguf of a SentencePiece-style checkpoint (Llama-2 / Mistral / TurboSparse-Mistral: a BPE
with byte fallback whose spaces are ▁) as llama.cpp's "llama" tokenizer: llama.cpp splits text into
the ids transformers does and decodes them back, the file says which tokens are bytes and which
special, and llama.cpp computes the logits our checkpoint does, within F16's rounding.

The checkpoint is a tiny random Mistral whose tokenizer is built offline as transformers' converter
builds a sentencepiece model's: <unk> <s> </s>, the 256 byte pieces, pieces trained on a small
corpus, the merges every split of a piece into two pieces in piece order, Llama-2's normalizer
(Prepend ▁, Replace " " -> ▁) and decoder, a post-processor adding <s>, ChatML's special tokens, an
added token that is not special, and a chat template."""

import json
import shutil

import gguf
import llama_cpp
import numpy as np
import pytest
import torch
from test_gguf import field
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

from conftest import TEXT
from turbo_demo.bench.llamacpp import LlamaCpp
from turbo_demo.checkpoints.checkpoint import load_model, save_checkpoint
from turbo_demo.checkpoints.gguf_export import export_gguf
from turbo_demo.cli import main

SPACE = "\u2581"
PROSE = (
    "The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore; the shells "
    "she sells are surely sea shells. Peter Piper picked a peck of pickled peppers.\n"
)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
USER_TOKEN = "TurboSparse"  # an added token that is not special: USER_DEFINED
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "either the header or the decoder answered",  # merges out of left-to-right order
    " leading space",
    "  two leading spaces, and  two   inside",
    "def add(a, b):\n    return a + b\n\nclass Point:\n\tpass\n",
    "\n\nnewlines first",
    "café naïve Ünïcödé",  # accents: not in the vocabulary, their bytes' pieces
    "emoji 🎉🚀 and 日本語",
    "use TurboSparse now, TurboSparse!",
    "<|im_start|>user\nsea shells?<|im_end|>\n<|im_start|>assistant\n",
    "a<s>b</s>",
    "",
    " ",
]


def spm_tokenizer() -> PreTrainedTokenizerFast:
    """The checkpoint's tokenizer (see the module doc)."""
    trainer = Tokenizer(models.BPE())
    trainer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always", split=True)  # pieces within words
    trainer.train_from_iterator([TEXT, PROSE * 3], trainers.BpeTrainer(vocab_size=600, show_progress=False))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece, _ in sorted(trainer.get_vocab().items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    splits = [(p[:k], p[k:]) for p in vocab if vocab[p] > 258 for k in range(1, len(p))]
    merges = sorted(((a, b) for a, b in splits if a in vocab and b in vocab), key=lambda m: vocab[m[0] + m[1]])
    tok = Tokenizer(models.BPE(vocab, merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    hf.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    hf.add_tokens([AddedToken(USER_TOKEN, normalized=False, special=False)])
    hf.chat_template = CHAT_TEMPLATE
    return hf


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    """A tiny random fp32 Mistral with the tokenizer, its embedding 13 rows past the tokenizer's ids."""
    tokenizer = spm_tokenizer()
    torch.manual_seed(0)
    config = MistralConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        vocab_size=len(tokenizer) + 13,
        tie_word_embeddings=False,
        sliding_window=None,
        bos_token_id=1,
        eos_token_id=2,
        hidden_act="silu",
        initializer_range=0.1,
    )
    return save_checkpoint(MistralForCausalLM(config).eval(), tokenizer, tmp_path_factory.mktemp("spm"), torch.float32)


@pytest.fixture(scope="module")
def f16_file(spm_dir, tmp_path_factory):
    return export_gguf(spm_dir, tmp_path_factory.mktemp("gguf") / "m.gguf")


def vocab_only(path):
    return llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


def test_llama_cpp_splits_and_joins_text_as_transformers_does(spm_dir, f16_file):
    """The same ids for each text, with and without the <s> our post-processor adds, with special
    tokens read as such (llama.cpp's special=True, transformers' default) and as text; llama.cpp's
    text of the ids is transformers' decoding, the text itself where it names no added token (both
    put a ▁ before the text after an added token, as sentencepiece does before any text)."""
    ours, llm = AutoTokenizer.from_pretrained(spm_dir), vocab_only(f16_file)
    for text in TEXTS:
        for special in (True, False):
            for bos in (True, False):
                expected = ours(text, add_special_tokens=bos, split_special_tokens=not special)["input_ids"]
                assert llm.tokenize(text.encode(), add_bos=bos, special=special) == expected, (text, special, bos)
        ids = ours(text)["input_ids"]
        decoded = llm.detokenize(ids).decode()
        assert decoded == ours.decode(ids, skip_special_tokens=True), text
        assert decoded == text or any(token in text for token in ours.get_added_vocab()), text


def test_the_texts_are_ones_the_scores_decide(spm_dir, tmp_path, monkeypatch):
    """With every score equal, as convert_hf_to_gguf.py's LlamaHfVocab writes a tokenizer.json
    without tokenizer.model (-1000), llama.cpp merges the leftmost pairs first and splits some of the
    texts otherwise: the test above checks the scores' order, not only the tokens."""
    write_scores = gguf.GGUFWriter.add_token_scores
    monkeypatch.setattr(gguf.GGUFWriter, "add_token_scores", lambda w, scores: write_scores(w, [-1000.0] * len(scores)))
    ours, llm = AutoTokenizer.from_pretrained(spm_dir), vocab_only(export_gguf(spm_dir, tmp_path / "m.gguf"))
    differ = [text for text in TEXTS if llm.tokenize(text.encode(), special=True) != ours(text)["input_ids"]]
    assert differ == ["either the header or the decoder answered"]  # "decoder": ...o d er, leftmost first ...o de r


def test_the_file_says_which_tokens_are_bytes_and_which_special(spm_dir, f16_file, tmp_path):
    """The tokens, their types and scores, the special ids, what llama.cpp adds around a text and
    the chat template, as GGUFReader and llama.cpp read them."""
    ours, reader = AutoTokenizer.from_pretrained(spm_dir), gguf.GGUFReader(f16_file)
    rows, n = json.loads((spm_dir / "config.json").read_text())["vocab_size"], len(ours)
    vocab = ours.get_vocab()
    assert field(reader, "tokenizer.ggml.model") == "llama" and field(reader, "tokenizer.ggml.pre") == "default"
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert tokens == ours.convert_ids_to_tokens(list(range(n))) + [f"[PAD{i}]" for i in range(n, rows)]
    types = field(reader, "tokenizer.ggml.token_type")
    T = gguf.TokenType
    by_type = {t: {i for i, k in enumerate(types) if k == t} for t in T}
    assert by_type[T.BYTE] == {vocab[f"<0x{b:02X}>"] for b in range(256)}
    assert by_type[T.CONTROL] == {vocab[t] for t in ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")}
    assert by_type[T.USER_DEFINED] == {vocab[USER_TOKEN]} and by_type[T.UNUSED] == set(range(n, rows))
    assert len(by_type[T.NORMAL]) == n - 256 - 5 - 1
    # HF's merge order is the scores' order; tokens no merge makes score below every merge
    scores = field(reader, "tokenizer.ggml.scores")
    merges = json.loads((spm_dir / "tokenizer.json").read_text())["model"]["merges"]
    merged = [scores[vocab[a + b]] for a, b in merges]
    assert merged == sorted(merged, reverse=True)
    assert max(s for i, s in enumerate(scores) if tokens[i] not in {a + b for a, b in merges}) < min(merged)
    expected = {
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,  # our post-processor puts <s> first
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": True,  # the normalizer's Prepend("▁")
        "tokenizer.chat_template": CHAT_TEMPLATE,  # from chat_template.jinja, where transformers 5 saves it
    }
    assert {key: field(reader, key) for key in expected} == expected
    assert "tokenizer.ggml.padding_token_id" not in reader.fields and "tokenizer.ggml.merges" not in reader.fields
    llm = vocab_only(f16_file)
    assert (llm.token_bos(), llm.token_eos(), llm.metadata["tokenizer.chat_template"]) == (1, 2, CHAT_TEMPLATE)
    # a checkpoint saved before transformers 5 keeps its template in tokenizer_config.json
    copy = shutil.copytree(spm_dir, tmp_path / "ckpt")
    (copy / "chat_template.jinja").unlink()
    config = json.loads((copy / "tokenizer_config.json").read_text()) | {"chat_template": "{{ messages }}"}
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    assert field(gguf.GGUFReader(export_gguf(copy, tmp_path / "m.gguf")), "tokenizer.chat_template") == "{{ messages }}"


def test_llama_cpp_computes_the_logits_of_the_checkpoint_within_f16_rounding(spm_dir, f16_file):
    """llama.cpp on the F16 file and transformers in fp32 on the checkpoint, on a prompt of our
    tokenizer. Budget, to first order: llama.cpp's F16 matmul rounds the weight and the activation
    to fp16 (relative error u = 2^-11 each), so a dot product sum_i w_i x_i is off by at most
    2u sum_i |w_i x_i|; at the LM head that is 2u S, S = max over tokens of sum_i |W_ti h_i| (h the
    normed last hidden state); taken as a first-order budget, as much again for each of the L layers
    before it (the final norm rescales their errors to the size of the hidden state): 2u S (L + 1).
    Measured: 1.1-1.3 u S."""
    ours = AutoTokenizer.from_pretrained(spm_dir)
    ids = ours("either the header or the decoder answered:\n    return a + b  # café 🎉")["input_ids"]
    model = load_model(spm_dir, torch.float32)
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    expected, h = out.logits[0].numpy(), out.hidden_states[-1][0]  # transformers' last state is normed
    S = (model.lm_head.weight.abs() @ h.abs().T).max().item()
    budget = 2 * 2.0**-11 * S * (model.config.num_hidden_layers + 1)
    llm = llama_cpp.Llama(str(f16_file), n_ctx=128, logits_all=True, verbose=False)
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids)])
    assert np.abs(logits - expected).max() < budget
    assert np.abs(logits * 1.05 - expected).max() > budget  # 5% off is outside it
    assert (logits.argmax(-1) == expected.argmax(-1)).all()


def tokenizer_keys(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {key: field(reader, key) for key in reader.fields if key.startswith("tokenizer.")}


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_quantized_files_hold_the_same_tokenizer(spm_dir, f16_file, tmp_path, qtype):
    """The tokenizer keys do not depend on the matrices' type, and llama.cpp runs the file: without
    its extra buffer types, whose AMX kernels die with SIGILL on this project's machine."""
    path = export_gguf(spm_dir, tmp_path / "m.gguf", qtype)
    assert tokenizer_keys(path) == tokenizer_keys(f16_file)
    ids = AutoTokenizer.from_pretrained(spm_dir)(TEXTS[1])["input_ids"]
    llm = LlamaCpp(path, 1, 64, extra_bufts=False)
    assert llm.llm.tokenize(TEXTS[1].encode(), special=True) == ids
    assert len(llm.generate(ids, 3)) == 3


# {why the refusal says it is neither kind: the tokenizer.json edit that makes it so}
NEITHER_KIND = {
    "a BPE model without byte_fallback": lambda t: t["model"].update(byte_fallback=False),
    "255 of the 256 byte pieces": lambda t: t["model"]["vocab"].update({"<0xFF>x": t["model"]["vocab"].pop("<0xFF>")}),
    "spaces left spaces, not ▁": lambda t: t.update(normalizer={"type": "Prepend", "prepend": SPACE}),
    "a Digits step": lambda t: t.update(pre_tokenizer={"type": "Digits", "individual_digits": True}),
    "a Metaspace splitting the text at each ▁": lambda t: t.update(
        normalizer=None, pre_tokenizer={"type": "Metaspace", "replacement": SPACE, "split": True}
    ),
    "a Unigram model": lambda t: t.update(model={"type": "Unigram", "vocab": [["<unk>", 0.0]]}),
    "a ByteLevel pre-tokenizer without GPT-2's regex": lambda t: t.update(
        pre_tokenizer={"type": "ByteLevel", "use_regex": False}
    ),
}


@pytest.mark.parametrize("what", list(NEITHER_KIND))
def test_a_tokenizer_of_neither_kind_is_refused_in_one_line(spm_dir, tmp_path, capsys, what):
    src, dst = shutil.copytree(spm_dir, tmp_path / "ckpt"), tmp_path / "m.gguf"
    tokenizer = json.loads((src / "tokenizer.json").read_text())
    NEITHER_KIND[what](tokenizer)
    (src / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert main(["export-gguf", str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    assert f"this tokenizer.json is neither: {what}" in err and err.count("\n") == 1, err
    assert not dst.exists()


def variant(spm_dir, tmp_path, what: str):
    """A copy of the checkpoint whose tokenizer transformers 5 runs otherwise, its tokenizer.json as
    export-gguf reads it unchanged (the exported tokenizer is the same)."""
    src = shutil.copytree(spm_dir, tmp_path / "ckpt")
    names = ("config.json", "tokenizer_config.json", "tokenizer.json")
    config, tokenizer_config, tokenizer = (json.loads((src / name).read_text()) for name in names)
    if what.startswith("LlamaTokenizer"):
        # Llama-2's files: for a "llama" model (not a "mistral" one, nor TurboSparse's "bamboo")
        # transformers 5 runs tokenizer_class LlamaTokenizer, which puts its own Metaspace in place
        # of tokenizer.json's normalizer
        config["model_type"] = "llama"
        tokenizer_config |= {"tokenizer_class": "LlamaTokenizer", "legacy": what.endswith("legacy")}
    else:  # transformers' default for added tokens: matched in the normalized text
        next(a for a in tokenizer["added_tokens"] if a["content"] == USER_TOKEN)["normalized"] = True
    for name, value in zip(names, (config, tokenizer_config, tokenizer)):
        (src / name).write_text(json.dumps(value))
    return src


# The texts llama.cpp splits otherwise than transformers 5 where transformers runs the tokenizer as
# it runs Llama-2's (tokenizer_class LlamaTokenizer for a "llama" model): its Metaspace puts no ▁
# before a text (the whole text, or a part between added tokens) that starts with a space, and
# without `legacy` none before a part after an added token either; llama.cpp, as sentencepiece and
# tokenizer.json's normalizer, puts one before each. An added token that is not special but
# normalized, transformers matches in the normalized text (▁TurboSparse, the ▁ taken from the
# space before it) and puts no ▁ after it; llama.cpp matches it as written and puts one after it.
SPLIT_OTHERWISE = {
    "LlamaTokenizer, legacy": {
        " leading space",
        "  two leading spaces, and  two   inside",
        " ",
        "use TurboSparse now, TurboSparse!",  # " now" after the added token
    },
    "LlamaTokenizer": {
        " leading space",
        "  two leading spaces, and  two   inside",
        " ",
        "use TurboSparse now, TurboSparse!",
        "<|im_start|>user\nsea shells?<|im_end|>\n<|im_start|>assistant\n",
        "a<s>b</s>",
    },
    "normalized added token": {"use TurboSparse now, TurboSparse!"},
}


@pytest.mark.parametrize("what", list(SPLIT_OTHERWISE))
def test_where_llama_cpp_splits_otherwise_than_transformers(spm_dir, f16_file, tmp_path, what):
    ours, llm = AutoTokenizer.from_pretrained(variant(spm_dir, tmp_path, what)), vocab_only(f16_file)
    differ = {text for text in TEXTS if llm.tokenize(text.encode(), special=True) != ours(text)["input_ids"]}
    assert differ == SPLIT_OTHERWISE[what]

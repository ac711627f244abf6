"""A word-level tokenizer built locally from texts, for the `tiny` test profile (no files needed)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

PAD, UNK, IMAGE, TURN_START, TURN_END = "<pad>", "<unk>", "<image>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, UNK, IMAGE, TURN_START, TURN_END]

# The same turn structure as SmolLM2's ChatML, so prompt code is exercised identically by both profiles.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|> {{ message['role'] }} {{ message['content'] }} <|im_end|> "
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)

_WORD = re.compile(r"\w+|[^\w\s]")


def build_tiny_tokenizer(texts: Iterable[str], extra_words: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """Word-level vocabulary of every lowercased word and punctuation mark in `texts`."""
    words: set[str] = set(extra_words)
    for text in texts:
        words.update(_WORD.findall(text.lower()))
    words.update(["system", "user", "assistant"])
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in sorted(words - set(vocab)):
        vocab[word] = len(vocab)
    backend = Tokenizer(WordLevel(vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        unk_token=UNK,
        eos_token=TURN_END,
        bos_token=None,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE, TURN_START]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer

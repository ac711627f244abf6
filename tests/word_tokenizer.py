"""A word-level tokenizer with a model family's special tokens, for tiny checkpoints laid out as on the
Hub (`tests/gemma3_fixture.py`, `tests/idefics3_fixture.py`): what those tests check is the family's
template and image-token expansion, not its subword vocabulary."""

from __future__ import annotations

import re

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import AddedToken, PreTrainedTokenizerFast

WORDS = ("you are a helpful assistant what is shown in the image which modality is this ct scan mri x ray "
         "there mass yes no liver lung left right chest brain abdomen normal abnormal lesion of on ? . , : "
         "user model assistant")


def word_tokenizer(special: list[str], chat_template: str, *, pad: str, eos: str, bos: str | None, unk: str,
                   named: dict[str, str] | None = None, texts: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """Lowercased words and punctuation of `WORDS` and `texts`, newlines as tokens, every token of
    `special` kept whole; `named` are the tokenizer's extra special-token attributes (Gemma's
    `boi_token`, ...)."""
    words = sorted(set(re.findall(r"\w+|[^\w\s]", " ".join([WORDS, *texts]).lower())))
    vocab = {token: i for i, token in enumerate(special + ["\n"] + [w for w in words if w not in special])}
    backend = Tokenizer(WordLevel(vocab, unk_token=unk))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", behavior="isolated"),
                                                     pre_tokenizers.Split(" ", behavior="removed"),
                                                     pre_tokenizers.Punctuation()])
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=pad, eos_token=eos, bos_token=bos,
                                        unk_token=unk, extra_special_tokens=named or {})
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in special], special_tokens=True)
    tokenizer.chat_template = chat_template
    return tokenizer

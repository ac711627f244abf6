"""`VLM.answer_ids` gives the tokens a chat template writes for an assistant turn
(`pipeline.models.templates.assistant_turn_ids`), on a space-sensitive byte-level BPE tokenizer as
Llama 3 / SmolLM use (built in code), where ` yes` and `yes` are different tokens."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from pipeline.models.templates import assistant_turn_ids

SPECIAL = ["<|end|>", "<pad>"]
# Idefics3 / SmolVLM's turns: `User: ...<end_of_utterance>\nAssistant: answer<end_of_utterance>\n`.
AFTER_A_SPACE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
# ChatML: the answer right after the generation prompt's newline.
CHATML = (
    "{% for m in messages %}<|im|>{{ m['role'] }}\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im|>assistant\n{% endif %}"
)
# llava-hf's LLaVA-1.5 template: every turn ends with a space, and no end-of-turn token.
NO_END_OF_TURN = (
    "{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = ["User: is there a mass in the left lung? Assistant: yes, a mass in the left lung.",
              "yes no left right lung liver mass assistant user", "ASSISTANT: USER: no yes"] * 20
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL + ["<|im|>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|end|>", pad_token="<pad>")


def _turn_ids(tokenizer, template: str, answer: str) -> list[int]:
    def render(messages, add_generation_prompt):
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)

    return assistant_turn_ids(render, lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
                              tokenizer.decode, lambda role, text: {"role": role, "content": text}, answer,
                              tokenizer.eos_token_id)


def test_an_answer_written_after_a_space_starts_with_the_spaced_token(tokenizer):
    ids = _turn_ids(tokenizer, AFTER_A_SPACE, "yes, left lung")
    assert tokenizer.convert_ids_to_tokens(ids[:1]) == ["Ġyes"]
    assert ids[0] != tokenizer.encode("yes", add_special_tokens=False)[0]  # what tokenizing the answer alone gives
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.decode(ids[:-1]) == " yes, left lung"
    # the prompt followed by the answer is the tokenized conversation, up to its end-of-turn token
    messages = [{"role": "user", "content": "is there a mass?"}]
    prompt = tokenizer.apply_chat_template(messages, chat_template=AFTER_A_SPACE, add_generation_prompt=True,
                                           tokenize=False)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": "yes, left lung"}],
                                         chat_template=AFTER_A_SPACE, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert prompt_ids + ids == tokenizer(full, add_special_tokens=False)["input_ids"][: len(prompt_ids) + len(ids)]


def test_an_answer_right_after_the_generation_prompt_is_its_own_tokens(tokenizer):
    ids = _turn_ids(tokenizer, CHATML, "yes, left lung")
    assert ids == tokenizer.encode("yes, left lung", add_special_tokens=False) + [tokenizer.eos_token_id]


def test_a_template_without_end_of_turn_gets_it_after_the_last_non_blank_token(tokenizer):
    ids = _turn_ids(tokenizer, NO_END_OF_TURN, "no")
    assert tokenizer.decode(ids[:-1]) == " no" and ids[-1] == tokenizer.eos_token_id


def test_a_conversation_that_does_not_extend_its_prompt_is_refused(tokenizer):
    # a generation prompt that the assistant turn does not repeat ("Assistant:" vs "Model:")
    template = AFTER_A_SPACE.replace("Assistant:{% endif %}", "Model:{% endif %}")
    with pytest.raises(ValueError, match="generation prompt"):
        _turn_ids(tokenizer, template, "yes")

"""Chat templates: which one builds a model's prompts, judged by what it renders.

A template takes message content either as a plain string with the image placeholders already in
it ("text": the `tiny`/`demo` profiles, converted LLaVA-Med) or as a list of typed parts
(`{"type": "image"}`, `{"type": "text", ...}`: "parts", llava-hf's and Qwen2-VL's).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from jinja2 import TemplateError

ContentStyle = Literal["text", "parts"]

_PROBE = "medalign-template-probe"


def _renders(render, content: Any) -> bool:
    """Whether a template shows `content`'s probe text: a template that reads typed parts renders a
    plain string as nothing, and a string template prints the parts as a Python list."""
    try:
        text = render([{"role": "user", "content": content}])
    except (TemplateError, TypeError, ValueError, KeyError):
        return False
    return _PROBE in text


def tokenizer_renders_text(tokenizer) -> bool:
    """Whether the tokenizer has a chat template that renders plain-string message content."""
    return tokenizer.chat_template is not None and _renders(
        lambda m: tokenizer.apply_chat_template(m, tokenize=False), _PROBE)


def content_style(tokenizer, processor=None, prefer_processor: bool = False) -> ContentStyle:
    """Which chat template prompts are built with, by what it renders.

    The tokenizer's template is used when it renders plain-string content: that is today's prompt
    of every model the pipeline builds or converts, kept byte for byte. Otherwise the processor's
    template (`chat_template.json` / `.jinja`, as llava-hf repositories ship it) must render typed
    parts. Transformers loads a folder's `chat_template.jinja` into both the tokenizer and the
    processor, so where the template lives says nothing; what it renders does.
    `prefer_processor` (families whose processor writes the image block, `Family.uses_processor`)
    tries the processor's template first.
    Raises `ValueError` saying what to add when neither works.
    """
    if not prefer_processor and tokenizer_renders_text(tokenizer):
        return "text"
    if processor is not None and getattr(processor, "chat_template", None) is not None and _renders(
            lambda m: processor.apply_chat_template(m, tokenize=False),
            [{"type": "image"}, {"type": "text", "text": _PROBE}]):
        return "parts"
    has_tokenizer = "a tokenizer template that does not render plain-string messages" \
        if tokenizer.chat_template is not None else "no tokenizer chat template"
    if processor is None:
        has_processor = "no processor loaded"
    elif getattr(processor, "chat_template", None) is None:
        has_processor = "no processor chat template"
    else:
        has_processor = "a processor template that does not render typed-part messages ({'type': 'image'} / 'text')"
    raise ValueError(
        f"cannot build prompts: {has_tokenizer} and {has_processor}. Add the model family's chat template: "
        "`chat_template.json` ({\"chat_template\": ...}) or `chat_template.jinja` beside `processor_config.json` "
        "(llava-hf layout), or `chat_template` in `tokenizer_config.json`"
    )


def tokenizer_renders_parts(tokenizer) -> bool:
    """Whether the tokenizer has a chat template that renders typed-part message content."""
    return tokenizer.chat_template is not None and _renders(
        lambda m: tokenizer.apply_chat_template(m, tokenize=False),
        [{"type": "image"}, {"type": "text", "text": _PROBE}])


def processor_chat_template(source: str | Path) -> str | None:
    """The chat template a checkpoint (folder or hub id) keeps for its processor, in
    `chat_template.jinja` or `chat_template.json`, which `AutoTokenizer` does not read; None if neither."""
    from transformers.utils import cached_file

    for name in ("chat_template.jinja", "chat_template.json"):
        path = cached_file(str(source), name, _raise_exceptions_for_missing_entries=False)
        if path is not None:
            text = Path(path).read_text(encoding="utf-8")
            return text if name.endswith(".jinja") else json.loads(text).get("chat_template")
    return None


# A stand-in question: the assistant turn's tokens follow the generation prompt, whose end does
# not depend on what was asked.
_PROBE_QUESTION = "medalign answer probe"


def assistant_turn_ids(render: Callable[[list[dict[str, Any]], bool], str], tokenize: Callable[[str], list[int]],
                       decode: Callable[[list[int]], str], message: Callable[[str, str], dict[str, Any]],
                       answer: str, end_of_turn_id: int) -> list[int]:
    """The tokens a chat template writes for the assistant turn `answer` after the generation
    prompt, up to and including `end_of_turn_id`.

    These are the tokens the model was trained on: after `Assistant:` (Idefics3, SmolVLM) the
    answer starts with the ` yes` token, not `yes`, and LLaVA-Med's ` yes </s>` keeps its `▁`
    before `</s>`. They are the difference between the tokenized conversation with the answer and
    the tokenized generation prompt. A template that writes no end-of-turn token (llava-hf's
    LLaVA-1.5 template, which ends every turn with a space) gets it appended right after the
    answer's last non-blank token, as LLaVA-1.5 was trained (`yes</s>`).
    `render(messages, add_generation_prompt)` renders with the model's template, `tokenize` adds
    no special tokens, `decode` turns ids back into text, `message(role, text)` builds a message in
    the template's content style.
    """
    user = message("user", _PROBE_QUESTION)
    prompt = tokenize(render([user], True))
    full = tokenize(render([user, message("assistant", answer)], False))
    if full[: len(prompt)] != prompt:
        raise ValueError(
            "the chat template's conversation does not start with its generation prompt once tokenized "
            f"(answer {answer!r}): the tokens of the assistant turn cannot be told apart"
        )
    turn = full[len(prompt):]
    if end_of_turn_id in turn:
        return turn[: turn.index(end_of_turn_id) + 1]
    while turn and not decode(turn[-1:]).strip():
        turn = turn[:-1]
    return turn + [end_of_turn_id]

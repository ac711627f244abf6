"""The vision-language model as the pipeline sees it: a LLaVA-family model plus how to prompt it.

Every stage talks to a `VLM`: it turns (image, question[, answer]) into token ids with the image
placeholder expanded to one token per visual feature, runs the vision tower once per batch, and
runs the language model on embeddings with an explicit attention mask and position ids. Owning
that forward is what lets a stage drop visual tokens by masking (see `pipeline.visual_dropout`)
and run several views of one batch in one call.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from jinja2 import TemplateError
from PIL import Image
from transformers import PreTrainedModel

from pipeline.schema import Turn

IMAGE_TOKEN = "<image>"
SETTINGS_FILE = "medalign.json"

# How a chat template wants message content: "text" is a plain string with the image placeholders
# already in it (the `tiny`/`demo` profiles, converted LLaVA-Med); "parts" is llava-hf's list of
# typed parts (`{"type": "image"}`, `{"type": "text", ...}`), rendered by the family's processor.
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


def content_style(tokenizer, processor=None) -> ContentStyle:
    """Which chat template prompts are built with, by what it renders.

    The tokenizer's template is used when it renders plain-string content: that is today's prompt
    of every model the pipeline builds or converts, kept byte for byte. Otherwise the processor's
    template (`chat_template.json` / `.jinja`, as llava-hf repositories ship it) must render typed
    parts. Transformers loads a folder's `chat_template.jinja` into both the tokenizer and the
    processor, so where the template lives says nothing; what it renders does.
    Raises `ValueError` saying what to add when neither works.
    """
    if tokenizer_renders_text(tokenizer):
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


@dataclass
class PromptSettings:
    """How questions are put to the model; saved beside the weights as `medalign.json`."""

    system_prompt: str | None
    num_image_tokens: int
    profile: str

    def save(self, folder: str | Path) -> None:
        Path(folder, SETTINGS_FILE).write_text(json.dumps(self.__dict__, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> PromptSettings | None:
        path = Path(folder, SETTINGS_FILE)
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()))


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only attended tokens.

    With these, masking a token out of attention is exactly the same as deleting it from the
    sequence (rotary embeddings see the same relative distances), which is what makes
    attention-mask dropout equal to physical removal of visual tokens.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class VLM:
    """A LLaVA-family model with its tokenizer, image processor and prompt settings.

    `processor` (the family's `AutoProcessor`) is needed only for checkpoints whose chat template
    takes typed-part content (llava-hf's): it renders the prompt and expands the image token.
    """

    def __init__(self, model: PreTrainedModel, tokenizer, image_processor, settings: PromptSettings,
                 processor=None):
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.settings = settings
        self.processor = processor
        self.content_style: ContentStyle = content_style(tokenizer, processor)
        self.image_token_id = int(model.config.image_token_id)
        if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != self.image_token_id:
            raise ValueError(
                f"tokenizer maps {IMAGE_TOKEN!r} to {tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}, "
                f"the model expects {self.image_token_id}"
            )
        self.eos_token_id = int(tokenizer.eos_token_id)
        self.pad_token_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_id)

    # ----- parts (LLaVA layout: model.model.{vision_tower, multi_modal_projector, language_model})
    @property
    def language_model(self) -> torch.nn.Module:
        """The decoder stack (no LM head); LoRA wraps this module."""
        return self.model.model.language_model

    @language_model.setter
    def language_model(self, module: torch.nn.Module) -> None:
        self.model.model.language_model = module

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.model.vision_tower

    @property
    def projector(self) -> torch.nn.Module:
        return self.model.model.multi_modal_projector

    @property
    def input_embeddings(self) -> torch.nn.Embedding:
        return self.model.get_input_embeddings()

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.lm_head

    def hidden_states(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states of the language model (no LM head), positions from the mask."""
        return self.model.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
        ).last_hidden_state

    # ----- devices
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ----- text
    def prompt_messages(self, question: str, context: Sequence[Turn] = (), image_text: str | None = None
                        ) -> list[dict[str, Any]]:
        """The chat messages of a prompt: the system prompt (if any), then each earlier turn of
        `context` as a user and an assistant message, then `question`. The image opens the FIRST
        user message, where LLaVA puts it; later questions refer back to it.

        For a "text" template the image is `image_text` (by default one placeholder per visual
        token) before a newline; for a "parts" template it is an `{"type": "image"}` part, which
        the processor expands (`image_text` must then be None).
        """
        if self.content_style == "parts":
            if image_text is not None:
                raise ValueError("image_text applies to plain-string chat templates; this model's template "
                                 "takes typed parts, where the image is {'type': 'image'}")
            return self._part_messages(question, context)
        image = IMAGE_TOKEN * self.settings.num_image_tokens if image_text is None else image_text
        questions = [turn["question"] for turn in context] + [question]
        answers = [turn["answer"] for turn in context]
        messages: list[dict[str, Any]] = []
        if self.settings.system_prompt:
            messages.append({"role": "system", "content": self.settings.system_prompt})
        for k, text in enumerate(questions):
            content = image + "\n" + text.strip() if k == 0 else text.strip()
            messages.append({"role": "user", "content": content})
            if k < len(answers):
                messages.append({"role": "assistant", "content": answers[k].strip()})
        return messages

    def _part_messages(self, question: str, context: Sequence[Turn]) -> list[dict[str, Any]]:
        def text(value: str) -> dict[str, str]:
            return {"type": "text", "text": value.strip()}

        questions = [turn["question"] for turn in context] + [question]
        answers = [turn["answer"] for turn in context]
        messages: list[dict[str, Any]] = []
        if self.settings.system_prompt:
            messages.append({"role": "system", "content": [text(self.settings.system_prompt)]})
        for k, q in enumerate(questions):
            content = [{"type": "image"}, text(q)] if k == 0 else [text(q)]
            messages.append({"role": "user", "content": content})
            if k < len(answers):
                messages.append({"role": "assistant", "content": [text(answers[k])]})
        return messages

    def prompt_ids(self, question: str, context: Sequence[Turn] = ()) -> list[int]:
        """Chat-formatted prompt with the image placeholder expanded, ending where the answer starts.

        `context` is the entry's earlier turns (its `context` column), rendered as real chat turns
        before `question` (`prompt_messages`); with none, the prompt is the single-turn one.
        With a "parts" template the processor renders the prompt and tokenizes it as its own
        `processor(images=..., text=...)` does (its special tokens, its expansion of the image
        token), so the ids are those transformers' LLaVA examples feed the model.
        """
        messages = self.prompt_messages(question, context)
        if self.content_style == "parts":
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            # The expansion depends only on the processed image's size, which the processor fixes.
            ids = list(self.processor(images=[self._blank_image()], text=[text])["input_ids"][0])
        else:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        n_image = sum(1 for i in ids if i == self.image_token_id)
        if n_image != self.settings.num_image_tokens:
            raise ValueError(
                f"prompt has {n_image} image tokens, expected {self.settings.num_image_tokens}: "
                "the tokenizer does not keep the image placeholder as one token, the processor does not expand "
                "it to one token per visual feature (processor_config.json: patch_size, "
                "vision_feature_select_strategy, num_additional_image_tokens), or a question or "
                f"answer of the conversation contains {IMAGE_TOKEN!r}"
            )
        return [int(i) for i in ids]

    def _blank_image(self) -> Image.Image:
        ip = self.image_processor
        size = dict(ip.crop_size if getattr(ip, "do_center_crop", False) else ip.size)
        side = size.get("height") or size.get("shortest_edge")
        if not side:
            raise ValueError(f"the image processor's output size is not fixed ({size})")
        return Image.new("RGB", (int(size.get("width") or side), int(side)))

    def answer_ids(self, answer: str) -> list[int]:
        """The answer's tokens followed by the end-of-turn token the model must learn to emit."""
        return self.tokenizer.encode(answer.strip(), add_special_tokens=False) + [self.eos_token_id]

    def decode(self, ids: list[int]) -> str:
        ids = [i for i in ids if i != self.eos_token_id and i != self.pad_token_id]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    # ----- images
    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        out = self.image_processor([im.convert("RGB") for im in images], return_tensors="pt")
        return out["pixel_values"].to(self.device, self.dtype)

    # ----- forward
    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Input embeddings with the image features written over the image placeholder tokens."""
        if pixel_values is None:
            if (input_ids == self.image_token_id).any():
                raise ValueError("input has image tokens but no pixel values were given")
            return self.input_embeddings(input_ids)
        return self.embed_features(input_ids, self.image_features(pixel_values))

    def embed_features(self, input_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Input embeddings with given (B, num_image_tokens, hidden) image features written over the
        image placeholder tokens (`embed` with the vision tower run by the caller)."""
        image_mask = input_ids == self.image_token_id
        # The placeholder id may lie outside a resized vocabulary's trained rows; its embedding is
        # overwritten anyway, so look up the pad token instead.
        embeds = self.input_embeddings(input_ids.masked_fill(image_mask, self.pad_token_id))
        if features.shape[0] * features.shape[1] != int(image_mask.sum()):
            raise ValueError(
                f"{int(image_mask.sum())} image tokens but {features.shape[0]}x{features.shape[1]} image features"
            )
        return embeds.masked_scatter(image_mask.unsqueeze(-1), features.to(embeds.dtype))

    def image_features(self, pixel_values: torch.Tensor,
                       vision_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, num_image_tokens, hidden) projected visual tokens. `vision_attention_mask`, an additive
        (B, 1, T, T) mask, goes to the vision tower's self-attention (`pipeline.mask_strategies`)."""
        extra = {} if vision_attention_mask is None else {"attention_mask": vision_attention_mask}
        out = self.model.get_image_features(pixel_values=pixel_values, return_dict=True, **extra)
        features = out.pooler_output
        if isinstance(features, (list, tuple)):
            features = torch.stack(list(features))
        return features

    def forward(
        self,
        attention_mask: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache=None,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ):
        """One language-model forward; positions follow the attention mask unless given."""
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values)
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        return self.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
            logits_to_keep=logits_to_keep,
        )

    # ----- persistence
    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)
        if self.processor is not None:
            # Its chat template and processor_config.json (image-token expansion) travel with the
            # weights; without them a reloaded llava-hf model could not build prompts.
            self.processor.save_pretrained(folder)
        self.settings.save(folder)

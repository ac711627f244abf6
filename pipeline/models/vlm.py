"""The vision-language model as the pipeline sees it: a model of a supported family plus how to prompt it.

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
from typing import Any

import torch
from PIL import Image
from transformers import PreTrainedModel

from pipeline.models.families import Family, family_for, position_ids_from_mask
from pipeline.models.image_batch import ImageBatch
from pipeline.models.templates import ContentStyle, assistant_turn_ids, content_style, tokenizer_renders_text
from pipeline.schema import Turn

__all__ = ["IMAGE_TOKEN", "VLM", "ContentStyle", "ImageBatch", "PromptSettings", "content_style", "position_ids_from_mask",
           "tokenizer_renders_text"]

IMAGE_TOKEN = "<image>"
SETTINGS_FILE = "medalign.json"

@dataclass
class PromptSettings:
    """How questions are put to the model; saved beside the weights as `medalign.json`."""

    system_prompt: str | None
    num_image_tokens: int
    profile: str
    # The side every image is resized to, for families that take any size (Qwen2-VL, LLaVA-NeXT),
    # or "native": each image at its own size (LLaVA-NeXT's default, Qwen2-VL's dynamic
    # resolution); None: the family's default (Qwen2-VL: 448 px squares; LLaVA-NeXT: native) or
    # the one size the image processor fixes (LLaVA). Written only when set. With images at their
    # own size `num_image_tokens` is a reference image's count, for information.
    image_size: int | str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.image_size, str) and self.image_size != "native":
            raise ValueError(f"{SETTINGS_FILE}: image_size is a side in pixels or 'native', not {self.image_size!r}")

    def save(self, folder: str | Path) -> None:
        values = {k: v for k, v in self.__dict__.items() if k != "image_size" or v is not None}
        Path(folder, SETTINGS_FILE).write_text(json.dumps(values, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> PromptSettings | None:
        path = Path(folder, SETTINGS_FILE)
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()))


class VLM:
    """A vision-language model with its tokenizer, image processor, prompt settings and family.

    `family` (`pipeline.models.families`) holds everything that differs between architectures:
    where the parts are, how images are processed and encoded, which positions tokens get.
    `processor` (the family's processor, `Family.load_processor`) is needed for checkpoints whose prompts the
    processor builds (llava-hf's typed-part template, Qwen2-VL): it renders the prompt and
    expands the image token.
    """

    def __init__(self, model: PreTrainedModel, tokenizer, image_processor, settings: PromptSettings,
                 processor=None):
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.settings = settings
        self.processor = processor
        self.family: Family = family_for(model, image_processor, settings.image_size, processor)
        self.content_style: ContentStyle = self.family.content_style(tokenizer, processor)
        self.image_token = self.family.image_token(tokenizer, processor)
        self.image_token_id = int(model.config.image_token_id)
        if tokenizer.convert_tokens_to_ids(self.image_token) != self.image_token_id:
            raise ValueError(
                f"tokenizer maps {self.image_token!r} to {tokenizer.convert_tokens_to_ids(self.image_token)}, "
                f"the model expects {self.image_token_id}"
            )
        self.eos_token_id = self.family.end_of_turn_id(tokenizer)
        self._answer_ids: dict[str, list[int]] = {}  # answer text -> its tokens (the template renders each once)
        self.pad_token_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_id)

    # ----- parts (the family knows where they are)
    @property
    def language_model(self) -> torch.nn.Module:
        """The decoder stack (no LM head); LoRA wraps this module."""
        return self.family.language_model

    @language_model.setter
    def language_model(self, module: torch.nn.Module) -> None:
        self.family.language_model = module

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.family.vision_tower

    @property
    def projector(self) -> torch.nn.Module:
        return self.family.projector

    @property
    def input_embeddings(self) -> torch.nn.Embedding:
        return self.model.get_input_embeddings()

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.lm_head

    def position_ids(self, attention_mask: torch.Tensor, image_mask: torch.Tensor | None,
                     image_layout: ImageBatch | None = None) -> torch.Tensor:
        """Positions of a batch whose attention mask may drop visual tokens: (B, T) for 1-D
        rotary families, (3, B, T) for Qwen2-VL's; the last one is `[..., -1:]` either way.
        `image_mask` (True at visual tokens) is required by families whose positions depend on it,
        and `image_layout` (row b's image at b; `ImageBatch.layout()`, no pixels needed) by those
        whose positions follow each image's grid (Qwen2-VL at native resolution)."""
        return self.family.position_ids(attention_mask, image_mask, image_layout)

    def hidden_states(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                      image_mask: torch.Tensor | None = None, image_layout: ImageBatch | None = None
                      ) -> torch.Tensor:
        """Last hidden states of the language model (no LM head), positions from the mask."""
        return self.model.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=self.position_ids(attention_mask, image_mask, image_layout),
            **self.family.forward_kwargs(image_mask, prefill=True),
        ).last_hidden_state

    # ----- devices
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ----- text
    def prompt_messages(self, question: str, context: Sequence[Turn] = (), image_text: str | None = None,
                        image_size: tuple[int, int] | None = None) -> list[dict[str, Any]]:
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
        image = self.image_token * self.image_token_count(image_size) if image_text is None else image_text
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

    def image_token_count(self, image_size: tuple[int, int] | None = None) -> int:
        """Visual tokens of an image of `image_size` (height, width): `settings.num_image_tokens`,
        or, for families whose tokens follow the image's size, the family's count for that size."""
        if not self.family.variable_image_tokens:
            return self.settings.num_image_tokens
        if image_size is None:
            raise ValueError(f"{self.family.name}: an image's visual tokens follow its size; give the prompt its image")
        return self.family.image_token_count(image_size)

    @property
    def variable_image_tokens(self) -> bool:
        """Whether an image's visual tokens follow its size, so a prompt needs its image."""
        return self.family.variable_image_tokens

    def prompt_ids(self, question: str, context: Sequence[Turn] = (),
                   image: Image.Image | bytes | None = None) -> list[int]:
        """Chat-formatted prompt with the image placeholder expanded, ending where the answer starts.

        `context` is the entry's earlier turns (its `context` column), rendered as real chat turns
        before `question` (`prompt_messages`); with none, the prompt is the single-turn one.
        With a "parts" template the processor renders the prompt and tokenizes it as its own
        `processor(images=..., text=...)` does (its special tokens, its expansion of the image
        token), so the ids are those transformers' LLaVA examples feed the model.
        `image` (decoded or encoded) is required where an image's visual tokens follow its size
        (`variable_image_tokens`); only its size is read. Other families ignore it.
        """
        image_size = self._image_size(image) if self.variable_image_tokens else None
        messages = self.prompt_messages(question, context, image_size=image_size)
        ids = self.family.render_prompt(self.tokenizer, self.processor, messages, self.content_style, image_size)
        n_image = sum(1 for i in ids if i == self.image_token_id)
        expected = self.image_token_count(image_size)
        if n_image != expected:
            raise ValueError(
                f"prompt has {n_image} image tokens, expected {expected}: "
                "the tokenizer does not keep the image placeholder as one token, the processor does not expand "
                "it to one token per visual feature (processor_config.json: patch_size, "
                "vision_feature_select_strategy, num_additional_image_tokens), or a question or "
                f"answer of the conversation contains {self.image_token!r}"
            )
        return [int(i) for i in ids]

    @staticmethod
    def _image_size(image: Image.Image | bytes | None) -> tuple[int, int] | None:
        if image is None:
            return None
        if not isinstance(image, Image.Image):
            from pipeline.data.images import decode_image

            image = decode_image(image)
        return image.height, image.width

    def answer_ids(self, answer: str) -> list[int]:
        """The answer's tokens as the chat template writes an assistant turn after the generation
        prompt (a leading space where it writes `Assistant: yes`), up to and including the
        end-of-turn token the model must learn to emit (`assistant_turn_ids`)."""
        answer = answer.strip()
        if answer not in self._answer_ids:
            self._answer_ids[answer] = assistant_turn_ids(self._render_chat, self._tokenize, self.tokenizer.decode,
                                                          self._message, answer, self.eos_token_id)
        return list(self._answer_ids[answer])

    def _render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        # The template `prompt_ids` renders with: the processor's for typed parts where one is loaded.
        owner = self.processor if self.content_style == "parts" and self.processor is not None else self.tokenizer
        return owner.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)

    def _tokenize(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]

    def _message(self, role: str, text: str) -> dict[str, Any]:
        if self.content_style == "parts":
            return {"role": role, "content": [{"type": "text", "text": text}]}
        return {"role": role, "content": text}

    def decode(self, ids: list[int]) -> str:
        ids = [i for i in ids if i != self.eos_token_id and i != self.pad_token_id]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    # ----- images
    def pixel_values(self, images: list[Image.Image], on_model: bool = True) -> ImageBatch:
        """The processed images (`ImageBatch`: one tensor per image in the family's layout, each
        image's size and visual-token count), on the model's device in its dtype; `on_model=False`
        leaves the pixels on the CPU as the processor made them (a collate function's batch, which
        the caller or accelerate moves)."""
        batch = self.family.pixel_values(images, self.settings.num_image_tokens)
        return batch.to(self.device, self.dtype) if on_model else batch

    @property
    def family_name(self) -> str:
        """The model family (`pipeline.models.families`), for messages and reports."""
        return self.family.name

    def tower_view(self, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
        """(left, top, width, height) of an image of `image_size` (width, height) that the vision
        tower's patch grid covers (single-view CLIP towers, `supports_vision_masks`)."""
        return self.family.tower_view(image_size)

    @property
    def supports_vision_masks(self) -> bool:
        """Whether the `pixel`, `patch` and `latent` mask strategies apply (a single-view CLIP tower)."""
        return self.family.supports_vision_masks

    # ----- forward
    def embed(self, input_ids: torch.Tensor, pixel_values: ImageBatch | None) -> torch.Tensor:
        """Input embeddings with the image features written over the image placeholder tokens."""
        if pixel_values is None:
            if (input_ids == self.image_token_id).any():
                raise ValueError("input has image tokens but no pixel values were given")
            return self.input_embeddings(input_ids)
        return self.embed_features(input_ids, self.image_features(pixel_values), pixel_values.token_counts)

    def embed_features(self, input_ids: torch.Tensor, features: torch.Tensor,
                       token_counts: torch.Tensor | None = None) -> torch.Tensor:
        """Input embeddings with given (B, visual tokens, hidden) image features written over the
        image placeholder tokens in order (`embed` with the vision tower run by the caller).
        `token_counts` (B,): the tokens of each image where images differ (rows past it are
        padding); None: every row of `features` is an image's."""
        image_mask = input_ids == self.image_token_id
        # The placeholder id may lie outside a resized vocabulary's trained rows; its embedding is
        # overwritten anyway, so look up the pad token instead.
        embeds = self.input_embeddings(input_ids.masked_fill(image_mask, self.pad_token_id))
        if token_counts is not None and bool((token_counts != features.shape[1]).any()):
            valid = torch.arange(features.shape[1], device=features.device) < token_counts.to(features.device)[:, None]
            features = features[valid]
        else:
            features = features.reshape(-1, features.shape[-1])
        if features.shape[0] != int(image_mask.sum()):
            raise ValueError(f"{int(image_mask.sum())} image tokens but {features.shape[0]} image features")
        return embeds.masked_scatter(image_mask.unsqueeze(-1), features.to(embeds.dtype))

    def image_features(self, images: ImageBatch,
                       vision_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, visual tokens, hidden) projected visual tokens, zero past an image's
        `token_counts` where images differ. `vision_attention_mask`, an additive (B, 1, T, T)
        mask, goes to the vision tower's self-attention (`pipeline.mask_strategies`; CLIP towers
        only)."""
        return self.family.image_features(images, vision_attention_mask)

    def forward(
        self,
        attention_mask: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        pixel_values: ImageBatch | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache=None,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_mask: torch.Tensor | None = None,
        image_layout: ImageBatch | None = None,
    ):
        """One language-model forward. Positions are the family's for the attention mask
        (`position_ids`) unless given; `image_mask` defaults to where `input_ids` has the image
        token; `image_layout` (row b's image at b, for positions that follow each image's grid)
        defaults to `pixel_values`."""
        if image_mask is None and input_ids is not None:
            image_mask = input_ids == self.image_token_id
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values)
        if position_ids is None:
            layout = image_layout if image_layout is not None else pixel_values
            position_ids = self.position_ids(attention_mask, image_mask, layout)
        prefill = cache is None or cache.get_seq_length() == 0
        return self.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
            logits_to_keep=logits_to_keep,
            **self.family.forward_kwargs(image_mask, prefill),
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

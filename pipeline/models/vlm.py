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

import torch
from PIL import Image
from transformers import PreTrainedModel

from pipeline.schema import Turn

IMAGE_TOKEN = "<image>"
SETTINGS_FILE = "medalign.json"


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
    """A LLaVA-family model with its tokenizer, image processor and prompt settings."""

    def __init__(self, model: PreTrainedModel, tokenizer, image_processor, settings: PromptSettings):
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.settings = settings
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
                        ) -> list[dict[str, str]]:
        """The chat messages of a prompt: the system prompt (if any), then each earlier turn of
        `context` as a user and an assistant message, then `question`. The image (`image_text`,
        by default one placeholder per visual token) opens the FIRST user message, where LLaVA puts
        it; later questions refer back to it."""
        image = IMAGE_TOKEN * self.settings.num_image_tokens if image_text is None else image_text
        questions = [turn["question"] for turn in context] + [question]
        answers = [turn["answer"] for turn in context]
        messages = []
        if self.settings.system_prompt:
            messages.append({"role": "system", "content": self.settings.system_prompt})
        for k, text in enumerate(questions):
            content = image + "\n" + text.strip() if k == 0 else text.strip()
            messages.append({"role": "user", "content": content})
            if k < len(answers):
                messages.append({"role": "assistant", "content": answers[k].strip()})
        return messages

    def prompt_ids(self, question: str, context: Sequence[Turn] = ()) -> list[int]:
        """Chat-formatted prompt with the image placeholder expanded, ending where the answer starts.

        `context` is the entry's earlier turns (its `context` column), rendered as real chat turns
        before `question` (`prompt_messages`); with none, the prompt is the single-turn one.
        """
        messages = self.prompt_messages(question, context)
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        n_image = sum(1 for i in ids if i == self.image_token_id)
        if n_image != self.settings.num_image_tokens:
            raise ValueError(
                f"prompt has {n_image} image tokens, expected {self.settings.num_image_tokens}: "
                "the tokenizer does not keep the image placeholder as one token, or a question or "
                f"answer of the conversation contains {IMAGE_TOKEN!r}"
            )
        return ids

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
        self.settings.save(folder)

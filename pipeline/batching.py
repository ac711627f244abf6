"""Turning VQA rows into padded tensors: prompt + answer sequences for training and scoring,
left-padded prompts for generation. Images are decoded here, once per batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from pipeline.data.images import decode_images
from pipeline.models.vlm import VLM, ImageBatch
from pipeline.schema import Turn

IGNORE_INDEX = -100


@dataclass
class SequenceBatch:
    """Right-padded prompt+answer sequences.

    `labels[b, t]` is the token at t where t is an answer position, IGNORE_INDEX elsewhere;
    logits at t-1 predict it. `answer_start[b]` is the index of the first answer token.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    image_mask: torch.Tensor
    answer_start: torch.Tensor
    answer_length: torch.Tensor
    pixel_values: ImageBatch

    def to(self, device: torch.device) -> SequenceBatch:
        return SequenceBatch(**{k: v.to(device) for k, v in self.__dict__.items()})


@dataclass
class PromptBatch:
    """Left-padded prompts, so every row's next token is generated at the same column."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    image_mask: torch.Tensor
    pixel_values: ImageBatch


def collate_sequences(
    vlm: VLM,
    images: Sequence[bytes | Image.Image],
    questions: Sequence[str],
    answers: Sequence[str | Sequence[int]],
    *,
    contexts: Sequence[Sequence[Turn]],
) -> SequenceBatch:
    """Batch (image, question, answer); an answer is text, or token ids (ending with EOS) as made by `sample`.

    `contexts` holds each row's earlier turns (its `context` column, `[]` for a single-turn row):
    they are part of the prompt, never of the labelled answer.
    """
    pil = decode_images(images)
    rows = []
    for image, question, answer, context in zip(pil, questions, answers, contexts, strict=True):
        prompt = vlm.prompt_ids(question, context, image)
        answer_ids = vlm.answer_ids(answer) if isinstance(answer, str) else list(answer)
        rows.append((prompt, answer_ids))
    width = max(len(p) + len(a) for p, a in rows)
    n = len(rows)
    input_ids = torch.full((n, width), vlm.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    answer_start = torch.zeros(n, dtype=torch.long)
    answer_length = torch.zeros(n, dtype=torch.long)
    for b, (prompt, answer_ids) in enumerate(rows):
        seq = prompt + answer_ids
        input_ids[b, : len(seq)] = torch.tensor(seq)
        attention_mask[b, : len(seq)] = 1
        labels[b, len(prompt) : len(seq)] = torch.tensor(answer_ids)
        answer_start[b] = len(prompt)
        answer_length[b] = len(answer_ids)
    return SequenceBatch(
        input_ids=input_ids.to(vlm.device),
        attention_mask=attention_mask.to(vlm.device),
        labels=labels.to(vlm.device),
        image_mask=(input_ids == vlm.image_token_id).to(vlm.device),
        answer_start=answer_start.to(vlm.device),
        answer_length=answer_length.to(vlm.device),
        pixel_values=vlm.pixel_values(pil),
    )


def collate_prompts(vlm: VLM, images: Sequence[bytes | Image.Image], questions: Sequence[str],
                    contexts: Sequence[Sequence[Turn]]) -> PromptBatch:
    """Left-padded prompts of (image, question) rows, each after its earlier turns in `contexts`
    (the rows' `context` column; an empty list for a single-turn row). Required: a multi-turn
    row's prompt without its earlier turns is a different question."""
    pil = decode_images(images)
    prompts = [vlm.prompt_ids(q, c, im) for im, q, c in zip(pil, questions, contexts, strict=True)]
    width = max(len(p) for p in prompts)
    n = len(prompts)
    input_ids = torch.full((n, width), vlm.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    for b, prompt in enumerate(prompts):
        input_ids[b, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[b, width - len(prompt) :] = 1
    return PromptBatch(
        input_ids=input_ids.to(vlm.device),
        attention_mask=attention_mask.to(vlm.device),
        image_mask=(input_ids == vlm.image_token_id).to(vlm.device),
        pixel_values=vlm.pixel_values(pil),
    )


def answer_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) summed log-probabilities of the labelled tokens; logits[:, t-1] predicts labels[:, t]."""
    shifted_logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logp = torch.log_softmax(shifted_logits, dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)

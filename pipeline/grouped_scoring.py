"""Log-probs of several answers to one (image, prompt), with the prompt run once.

A group is one image, one prompt and a few answers (training: the chosen answer and its J
dispreferred ones; sampling: the k candidates of an entry). Answers are a few tokens and the
prompt ~50 (16 visual tokens + chat template + question), so scoring each answer as a full row
mostly re-runs the same prompt. Here the vision tower runs once per group and the prompt once per
group (`share_prompt`); its key/value cache is gathered to the group's answer rows, which run as
a second call on top of it. Gathering the cache is differentiable: under training, gradients of
all the rows of a group sum into the prompt's one pass.

`train` (pipeline/training/preference.py) and `sample` (pipeline/self_contrast.py) both score
through here; tests/test_preference.py checks both paths against scoring each row alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor

from pipeline.batching import IGNORE_INDEX, decode_image
from pipeline.losses import sequence_logprobs
from pipeline.models.vlm import VLM, position_ids_from_mask


def collate_groups(
    vlm: VLM,
    images: Sequence[bytes | Image.Image],
    prompts: Sequence[list[int]],
    answers: Sequence[Sequence[list[int]]],
    width: int | None = None,
) -> dict[str, Tensor]:
    """One batch of CPU tensors for `group_logprobs`.

    - `prompt_ids` / `prompt_mask` (E, P): prompts left-padded, so every prompt ends at column
      P − 1, where the logit predicting the first answer token is read.
    - `answer_ids` / `answer_mask` (R, A): every answer of every group as a right-padded row.
    - `row_entry` (R,): which group (0..E−1) a row belongs to.
    - `slots` (E, width): the row of each group's answer k, −1 where a group has fewer answers
      (`width` defaults to the most answers any group has).
    - `pixel_values` (E, C, H, W).

    Positions follow the attention mask, so padding between prompt and answer is invisible.
    """
    if not (len(images) == len(prompts) == len(answers)) or not prompts:
        raise ValueError(
            f"collate_groups: need as many images, prompts and answer lists, at least one; got "
            f"{len(images)}, {len(prompts)}, {len(answers)}"
        )
    width = max(len(a) for a in answers) if width is None else width
    if width < 1 or any(len(a) > width for a in answers) or any(len(ids) == 0 for a in answers for ids in a):
        raise ValueError("collate_groups: every answer needs a token, and no group more than `width` answers")
    n, prompt_len = len(prompts), max(len(p) for p in prompts)
    prompt_ids = torch.full((n, prompt_len), vlm.pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((n, prompt_len), dtype=torch.long)
    slots = torch.full((n, width), -1, dtype=torch.long)
    rows: list[list[int]] = []
    row_entry: list[int] = []
    for b, (prompt, group) in enumerate(zip(prompts, answers, strict=True)):
        prompt_ids[b, prompt_len - len(prompt):] = torch.tensor(prompt)
        prompt_mask[b, prompt_len - len(prompt):] = 1
        for k, ids in enumerate(group):
            slots[b, k] = len(rows)
            rows.append(list(ids))
            row_entry.append(b)
    if not rows:
        raise ValueError("collate_groups: no answers to score")
    answer_len = max(len(r) for r in rows)
    answer_ids = torch.full((len(rows), answer_len), vlm.pad_token_id, dtype=torch.long)
    answer_mask = torch.zeros((len(rows), answer_len), dtype=torch.long)
    for r, ids in enumerate(rows):
        answer_ids[r, : len(ids)] = torch.tensor(ids)
        answer_mask[r, : len(ids)] = 1
    pil = [im if isinstance(im, Image.Image) else decode_image(im) for im in images]
    pixel_values = vlm.image_processor([im.convert("RGB") for im in pil], return_tensors="pt")["pixel_values"]
    return {
        "pixel_values": pixel_values,
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "answer_ids": answer_ids,
        "answer_mask": answer_mask,
        "row_entry": torch.tensor(row_entry, dtype=torch.long),
        "slots": slots,
    }


def embed_with_features(vlm: VLM, input_ids: Tensor, features: Tensor) -> Tensor:
    """`VLM.embed` with image features computed beforehand (so the tower can run once per group)."""
    image_mask = input_ids == vlm.image_token_id
    if features.shape[0] * features.shape[1] != int(image_mask.sum()):
        raise ValueError(
            f"{int(image_mask.sum())} image tokens but {features.shape[0]}x{features.shape[1]} image features"
        )
    embeds = vlm.embed(input_ids.masked_fill(image_mask, vlm.pad_token_id), None)
    return embeds.masked_scatter(image_mask.unsqueeze(-1), features.to(embeds.dtype))


def group_logprobs(vlm: VLM, batch: dict[str, Tensor], share_prompt: bool) -> Tensor:
    """Summed log-probs of every answer of a `collate_groups` batch (on the model's device), as
    an (E, width) table aligned with `slots` (0 where a slot is empty).

    The vision tower and projector run without a graph (they are frozen wherever this is used);
    the language model carries gradient when the caller has it enabled.
    `share_prompt=False` runs each row with its own copy of the prompt in one forward: the same
    numbers, ~3.5x more tokens; kept as the reference path and for kernels without cache gathering.
    """
    prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]
    answer_ids, answer_mask = batch["answer_ids"], batch["answer_mask"]
    row_entry = batch["row_entry"]
    with torch.no_grad():
        features = vlm.image_features(batch["pixel_values"].to(vlm.dtype))
    prompt_embeds = embed_with_features(vlm, prompt_ids, features)
    answer_embeds = vlm.embed(answer_ids, None)
    mask = torch.cat([prompt_mask[row_entry], answer_mask], dim=1)
    n_prompt, n_answer = prompt_ids.shape[1], answer_ids.shape[1]
    if share_prompt:
        from transformers import DynamicCache

        cache = DynamicCache()
        out = vlm.forward(prompt_mask, inputs_embeds=prompt_embeds, cache=cache, logits_to_keep=1)
        first = out.logits[:, -1]  # (E, V): predicts each group's first answer token
        cache.batch_select_indices(row_entry)
        positions = position_ids_from_mask(mask)[:, n_prompt:]
        keep = torch.arange(n_answer - 1, device=mask.device)
        out = vlm.forward(mask, inputs_embeds=answer_embeds, cache=cache, position_ids=positions,
                          logits_to_keep=keep)
        logits = torch.cat([first[row_entry].unsqueeze(1), out.logits], dim=1)
    else:
        embeds = torch.cat([prompt_embeds[row_entry], answer_embeds], dim=1)
        keep = torch.arange(n_prompt - 1, n_prompt + n_answer - 1, device=mask.device)
        logits = vlm.forward(mask, inputs_embeds=embeds, logits_to_keep=keep).logits
    labels = answer_ids.masked_fill(answer_mask == 0, IGNORE_INDEX)
    row_logps = sequence_logprobs(logits, labels)  # logits[:, t] predicts answer token t
    slots = batch["slots"]
    table = row_logps[slots.clamp(min=0)]
    return torch.where(slots >= 0, table, torch.zeros_like(table))

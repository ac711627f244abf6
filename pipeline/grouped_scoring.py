"""Log-probs of several answers to one (image, prompt), with the prompt run once.

A group is one image, one prompt and a few answers (training: the chosen answer and its J
dispreferred ones; sampling: the k candidates of an entry). Answers are a few tokens and the
prompt ~50 (16 visual tokens + chat template + question), so scoring each answer as a full row
mostly re-runs the same prompt. Here the vision tower runs once per group and the prompt once per
group (`share_prompt`); its key/value cache is gathered to the group's answer rows, which run as
a second call on top of it. Gathering the cache is differentiable: under training, gradients of
all the rows of a group sum into the prompt's one pass.

An answer may also carry its own image (`answer_images`: MMedPO's visual dispreference, the chosen
answer under a noised image x*). It cannot share its group's prompt cache, whose visual tokens
are the group's image, so it gets a prompt row of its own: the same prompt ids with its image,
appended after the groups' rows. That costs one more prompt pass and one more tower image per
such answer, and nothing for the others.

`train` (pipeline/training/preference.py) and `sample` (pipeline/self_contrast.py) both score
through here; tests/test_preference.py and tests/test_visual_training.py check both paths against
scoring each row alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor

from pipeline.batching import IGNORE_INDEX
from pipeline.data.images import decode_images
from pipeline.losses import sequence_logprobs
from pipeline.models.vlm import VLM


def collate_groups(
    vlm: VLM,
    images: Sequence[bytes | Image.Image],
    prompts: Sequence[list[int]],
    answers: Sequence[Sequence[list[int]]],
    width: int | None = None,
    answer_images: Sequence[Sequence[bytes | Image.Image | None]] | None = None,
) -> dict[str, Tensor]:
    """One batch of CPU tensors for `group_logprobs`.

    `answer_images`, aligned with `answers`, gives an answer its own image (None: the group's).
    Such an answer is scored as (its image, the group's prompt, the answer) on a prompt row of its
    own, appended after the E group rows; it still fills its group's slot.

    - `prompt_ids` / `prompt_mask` (E + X, P): prompts left-padded, so every prompt ends at column
      P − 1, where the logit predicting the first answer token is read. Rows 0..E−1 are the
      groups' prompts, rows E.. the X answers with their own image, in answer order.
    - `answer_ids` / `answer_mask` (R, A): every answer of every group as a right-padded row.
    - `row_entry` (R,): the prompt row (0..E+X−1) an answer row runs on: its group's row, or its
      own extra row. `group_logprobs` gathers the prompt's mask and KV cache by it.
    - `slots` (E, width): the row of each group's answer k, −1 where a group has fewer answers
      (`width` defaults to the most answers any group has).
    - `pixel_values` (`ImageBatch`, E + X images): one image per prompt row. An answer's own image
      must have as many visual tokens as its group's (a noised copy of it does).

    Positions follow the attention mask, so padding between prompt and answer is invisible.
    """
    if not (len(images) == len(prompts) == len(answers)) or not prompts:
        raise ValueError(
            f"collate_groups: need as many images, prompts and answer lists, at least one; got "
            f"{len(images)}, {len(prompts)}, {len(answers)}"
        )
    if answer_images is not None and (
        len(answer_images) != len(answers)
        or any(len(ims) != len(group) for ims, group in zip(answer_images, answers, strict=True))
    ):
        raise ValueError("collate_groups: answer_images must give one image (or None) per answer, aligned with answers")
    width = max(len(a) for a in answers) if width is None else width
    if width < 1 or any(len(a) > width for a in answers) or any(len(ids) == 0 for a in answers for ids in a):
        raise ValueError("collate_groups: every answer needs a token, and no group more than `width` answers")
    n = len(prompts)
    # (group, image) of every prompt row past the groups' own: answers that bring their own image
    extra: list[tuple[int, bytes | Image.Image]] = []
    slots = torch.full((n, width), -1, dtype=torch.long)
    rows: list[list[int]] = []
    row_entry: list[int] = []
    for b, group in enumerate(answers):
        own = answer_images[b] if answer_images is not None else [None] * len(group)
        for k, (ids, image) in enumerate(zip(group, own, strict=True)):
            slots[b, k] = len(rows)
            rows.append(list(ids))
            if image is None:
                row_entry.append(b)
            else:
                row_entry.append(n + len(extra))
                extra.append((b, image))
    if not rows:
        raise ValueError("collate_groups: no answers to score")
    row_prompts = list(prompts) + [prompts[b] for b, _ in extra]
    row_images = list(images) + [image for _, image in extra]
    prompt_len = max(len(p) for p in row_prompts)
    prompt_ids = torch.full((len(row_prompts), prompt_len), vlm.pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(row_prompts), prompt_len), dtype=torch.long)
    for b, prompt in enumerate(row_prompts):
        prompt_ids[b, prompt_len - len(prompt):] = torch.tensor(prompt)
        prompt_mask[b, prompt_len - len(prompt):] = 1
    answer_len = max(len(r) for r in rows)
    answer_ids = torch.full((len(rows), answer_len), vlm.pad_token_id, dtype=torch.long)
    answer_mask = torch.zeros((len(rows), answer_len), dtype=torch.long)
    for r, ids in enumerate(rows):
        answer_ids[r, : len(ids)] = torch.tensor(ids)
        answer_mask[r, : len(ids)] = 1
    pixel_values = vlm.pixel_values(decode_images(row_images), on_model=False)
    counts = pixel_values.token_counts.tolist()
    for j, (b, _) in enumerate(extra):
        if counts[n + j] != counts[b]:
            raise ValueError(f"collate_groups: group {b}'s answer image has {counts[n + j]} visual tokens, its prompt "
                             f"{counts[b]}: an answer's own image must be the size of the group's")
    return {
        "pixel_values": pixel_values,
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "answer_ids": answer_ids,
        "answer_mask": answer_mask,
        "row_entry": torch.tensor(row_entry, dtype=torch.long),
        "slots": slots,
    }


def group_logprobs(vlm: VLM, batch: dict[str, Tensor], share_prompt: bool) -> Tensor:
    """Summed log-probs of every answer of a `collate_groups` batch (on the model's device), as
    an (E, width) table aligned with `slots` (0 where a slot is empty).

    The vision tower and projector run without a graph (they are frozen wherever this is used),
    once per prompt row; the language model carries gradient when the caller has it enabled.
    Every answer row reads the prompt row `row_entry` names, so an answer with its own image
    (`collate_groups(answer_images=...)`) runs on its own prompt row with no special case here.
    `share_prompt=False` runs each row with its own copy of the prompt in one forward: the same
    numbers, ~3.5x more tokens; kept as the reference path and for kernels without cache gathering.
    """
    prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]
    answer_ids, answer_mask = batch["answer_ids"], batch["answer_mask"]
    row_entry = batch["row_entry"]
    with torch.no_grad():
        images = batch["pixel_values"].to(vlm.dtype)
        features = vlm.image_features(images)
    prompt_embeds = vlm.embed_features(prompt_ids, features, images.token_counts)
    answer_embeds = vlm.embed(answer_ids, None)
    mask = torch.cat([prompt_mask[row_entry], answer_mask], dim=1)
    prompt_image_mask = prompt_ids == vlm.image_token_id
    image_mask = torch.cat([prompt_image_mask[row_entry], torch.zeros_like(answer_mask, dtype=torch.bool)], dim=1)
    n_prompt, n_answer = prompt_ids.shape[1], answer_ids.shape[1]
    if share_prompt:
        from transformers import DynamicCache

        cache = DynamicCache()
        out = vlm.forward(prompt_mask, inputs_embeds=prompt_embeds, cache=cache, logits_to_keep=1,
                          image_mask=prompt_image_mask, image_layout=images)
        first = out.logits[:, -1]  # (prompt rows, V): predicts the first answer token
        cache.batch_select_indices(row_entry)
        positions = vlm.position_ids(mask, image_mask, images.layout()[row_entry])[..., n_prompt:]
        keep = torch.arange(n_answer - 1, device=mask.device)
        out = vlm.forward(mask, inputs_embeds=answer_embeds, cache=cache, position_ids=positions,
                          logits_to_keep=keep)
        logits = torch.cat([first[row_entry].unsqueeze(1), out.logits], dim=1)
    else:
        embeds = torch.cat([prompt_embeds[row_entry], answer_embeds], dim=1)
        keep = torch.arange(n_prompt - 1, n_prompt + n_answer - 1, device=mask.device)
        logits = vlm.forward(mask, inputs_embeds=embeds, logits_to_keep=keep, image_mask=image_mask,
                             image_layout=images.layout()[row_entry]).logits
    labels = answer_ids.masked_fill(answer_mask == 0, IGNORE_INDEX)
    row_logps = sequence_logprobs(logits, labels)  # logits[:, t] predicts answer token t
    slots = batch["slots"]
    table = row_logps[slots.clamp(min=0)]
    return torch.where(slots >= 0, table, torch.zeros_like(table))

"""Batched greedy decoding with a KV cache, on explicit attention masks (so views can drop tokens)."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from pipeline.batching import PromptBatch
from pipeline.models.vlm import VLM


def greedy_generate(
    vlm: VLM,
    batch: PromptBatch,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
) -> list[list[int]]:
    """Greedy continuation of each prompt, stopping per row at EOS (which is not returned).

    `attention_mask` replaces the batch's own mask, e.g. one with visual tokens dropped.
    """
    return greedy_generate_with_probs(vlm, batch, max_new_tokens, attention_mask)[0]


@torch.no_grad()
def greedy_generate_with_probs(
    vlm: VLM,
    batch: PromptBatch,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
) -> tuple[list[list[int]], list[list[float]]]:
    """`greedy_generate`, plus each returned token's probability (its token-level confidence)."""
    mask = batch.attention_mask if attention_mask is None else attention_mask
    n = mask.shape[0]
    cache = DynamicCache()
    out = vlm.forward(
        attention_mask=mask,
        input_ids=batch.input_ids,
        pixel_values=batch.pixel_values,
        cache=cache,
        logits_to_keep=1,
    )
    positions = vlm.position_ids(mask, batch.image_mask, batch.pixel_values)[..., -1:]
    finished = torch.zeros(n, dtype=torch.bool, device=mask.device)
    tokens: list[list[int]] = [[] for _ in range(n)]
    probs: list[list[float]] = [[] for _ in range(n)]
    embed = vlm.input_embeddings
    for step_index in range(max_new_tokens):
        logits = out.logits[:, -1]
        next_ids = logits.argmax(-1)
        top_p = logits.float().softmax(-1).gather(-1, next_ids.unsqueeze(-1)).squeeze(-1)
        for b in (~finished).nonzero().squeeze(-1).tolist():
            if int(next_ids[b]) == vlm.eos_token_id:
                finished[b] = True
            else:
                tokens[b].append(int(next_ids[b]))
                probs[b].append(float(top_p[b]))
        if bool(finished.all()) or step_index == max_new_tokens - 1:
            break  # no forward whose logits nobody reads
        next_ids = next_ids.masked_fill(finished, vlm.pad_token_id)
        mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=mask.device)], dim=1)
        positions = positions + 1
        out = vlm.forward(
            attention_mask=mask,
            inputs_embeds=embed(next_ids.unsqueeze(-1)),
            cache=out.cache,
            position_ids=positions,
        )
    return tokens, probs

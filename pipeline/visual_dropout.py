"""Visual-token dropout by attention masking (HSCR §3.1, docs/design.md § "Visual-token dropout").

The dropped view must not see the dropped visual tokens at all. Zeroing their attention-mask
entries, with positions counted over attended tokens only (`position_ids_from_mask`), is exactly
equivalent to deleting them from the sequence in every LLM layer, and keeps both views the same
shape so the full and dropped views of a batch run as one forward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def drop_visual_tokens(
    attention_mask: torch.Tensor, image_mask: torch.Tensor, ratio: float, seeds: Sequence[int]
) -> torch.Tensor:
    """A copy of `attention_mask` with round(ratio · n_visual) visual positions of each row masked.

    Which positions are dropped is drawn per row from its own seed, so a row's view does not
    depend on the batch it happens to be in.
    """
    if len(seeds) != attention_mask.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for a batch of {attention_mask.shape[0]}")
    dropped = attention_mask.clone()
    for b, seed in enumerate(seeds):
        positions = image_mask[b].nonzero().squeeze(-1)
        order = dropped_indices(len(positions), ratio, seed)
        if len(order):
            dropped[b, positions[order.to(positions.device)]] = 0
    return dropped


def dropped_indices(count: int, ratio: float, seed: int) -> torch.Tensor:
    """Which round(ratio · count) of `count` places one entry drops, drawn from its own seed (the
    visual tokens here; the patches of `pipeline.mask_strategies`, so both hide the same places)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
    n_drop = int(round(ratio * count))
    if n_drop == 0:
        return torch.zeros(0, dtype=torch.long)
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randperm(count, generator=generator)[:n_drop]


def blind_mask(attention_mask: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
    """Every visual token dropped: the blind control of evaluation."""
    return attention_mask.masked_fill(image_mask, 0)

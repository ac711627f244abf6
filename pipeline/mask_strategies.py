"""Where the degraded view loses the image (HSCR Table 5 and A.5; `sample.mask_strategy`).

Self-contrastive sampling compares the model under the full image with the model under a
degraded one. HSCR A.5 degrades at four depths, each hiding a share `mask_ratio` of the image:

- `token` (HSCR's choice, the default): visual tokens dropped after the projector, by masking
  them out of the language model's attention (`pipeline.visual_dropout`);
- `pixel`: the image itself. A.5 "directly crop[s] 70% of the content from the original image,
  leaving only 30% of the pixels as input": a seeded random crop holding `1 - mask_ratio` of the
  pixels is kept where it is and everything outside it is set to 0 after normalization (the
  processor's mean colour). Kept in place rather than resized up, so the tower sees exactly the
  cropped pixels and no interpolated ones, "left" stays left, and both views keep one shape;
- `patch`: image patches removed before the vision tower, so the tower never sees them and the
  language model gets no token for them. It runs as the tower with the dropped patches masked
  out of its attention as keys (no kept patch attends to them) and their output tokens masked
  out of the language model: exactly the tower on the kept patches alone, since a CLIP tower
  mixes tokens only through attention (tested);
- `latent`: A.5 "modif[ies] the attention mask within the CLIP visual encoder ... randomly
  setting 70% of the mask values to -inf": the dropped patches are masked out of the tower's
  attention as keys, but every patch still gives the language model its token, so a dropped
  patch's own content reaches the language model through its residual stream; only what the
  tower mixes between patches is lost.

Which patches (or tokens) are dropped is drawn per entry from its own seed with the same
`torch.randperm` as `token`, so for one seed `token`, `patch` and `latent` hide the same places.
Every strategy runs the full and the degraded view of a batch as one language-model forward;
`pixel`, `patch` and `latent` also run the tower once over both views stacked.

`patch` and `latent` need a CLIP vision tower (the embedded default's and LLaVA-1.5 / LLaVA-Med's),
whose encoder takes an attention mask; other towers fail with a clear error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

from pipeline.models.vlm import VLM, ImageBatch
from pipeline.visual_dropout import drop_visual_tokens, dropped_indices

MaskStrategy = Literal["token", "pixel", "patch", "latent"]
MASK_STRATEGIES: tuple[str, ...] = ("token", "pixel", "patch", "latent")


def crop_pixels(pixel_values: torch.Tensor, ratio: float, seeds: Sequence[int]) -> torch.Tensor:
    """A copy of (B, C, H, W) normalized pixels keeping, per row, one seeded random crop of
    `1 - ratio` of its area (the same aspect as the image) and 0 elsewhere."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"pixel mask ratio must be in [0, 1), got {ratio}")
    if len(seeds) != pixel_values.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for a batch of {pixel_values.shape[0]}")
    height, width = pixel_values.shape[-2:]
    side = math.sqrt(1.0 - ratio)
    crop_h = max(1, min(height, round(side * height)))
    crop_w = max(1, min(width, round(side * width)))
    out = torch.zeros_like(pixel_values)
    for b, seed in enumerate(seeds):
        generator = torch.Generator().manual_seed(int(seed))
        top = int(torch.randint(height - crop_h + 1, (1,), generator=generator))
        left = int(torch.randint(width - crop_w + 1, (1,), generator=generator))
        out[b, :, top:top + crop_h, left:left + crop_w] = pixel_values[b, :, top:top + crop_h, left:left + crop_w]
    return out


class TowerLayout:
    """How a CLIP tower's tokens map to patches and to the language model's visual tokens."""

    def __init__(self, vlm: VLM) -> None:
        from transformers import CLIPVisionModel

        tower = vlm.vision_tower
        if not isinstance(tower, CLIPVisionModel):
            raise NotImplementedError(
                f"sample.mask_strategy patch and latent mask the vision tower's attention, which is implemented "
                f"for CLIP towers only; this model's is {type(tower).__name__}. Use mask_strategy token or pixel"
            )
        vision = vlm.model.config.vision_config
        self.patches = (vision.image_size // vision.patch_size) ** 2
        self.tower_tokens = self.patches + 1  # CLS first
        strategy = getattr(vlm.model.config, "vision_feature_select_strategy", "default")
        # visual token k of the language model is tower token k + 1 under "default" (CLS cut off)
        self.first_patch_feature = 0 if strategy == "default" else 1
        if vlm.settings.num_image_tokens != self.patches + self.first_patch_feature:
            raise NotImplementedError(
                f"the prompt has {vlm.settings.num_image_tokens} image tokens for a tower of {self.patches} patches "
                f"(feature select strategy {strategy!r}): patch and latent masking need one token per patch"
            )


def tower_key_mask(layout: TowerLayout, dropped: Sequence[torch.Tensor], dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor:
    """(B, 1, T, T) additive attention mask of the tower: row b's dropped patches are -inf as keys
    for every query (its own token included, so it is left with its residual stream)."""
    mask = torch.zeros((len(dropped), 1, layout.tower_tokens, layout.tower_tokens), dtype=dtype, device=device)
    for b, patches in enumerate(dropped):
        if len(patches):
            mask[b, :, :, patches.to(device) + 1] = torch.finfo(dtype).min
    return mask


@torch.no_grad()
def two_view_embeddings(vlm: VLM, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        pixel_values: ImageBatch, strategy: MaskStrategy, ratio: float,
                        seeds: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Input embeddings and attention masks of the stacked [full; degraded] batch, (2B, L, D) and
    (2B, L), for one language-model forward."""
    if len(seeds) != input_ids.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for a batch of {input_ids.shape[0]}")
    image_mask = input_ids == vlm.image_token_id
    if strategy == "token":
        embeds = vlm.embed(input_ids, pixel_values)
        dropped = drop_visual_tokens(attention_mask, image_mask, ratio, seeds)
        return torch.cat([embeds, embeds]), torch.cat([attention_mask, dropped])
    if strategy not in MASK_STRATEGIES:
        raise ValueError(f"unknown mask strategy {strategy!r}; one of {', '.join(MASK_STRATEGIES)}")
    if not vlm.supports_vision_masks:
        raise NotImplementedError(
            f"sample.mask_strategy {strategy} crops the pixels or masks a CLIP tower's attention; the "
            f"{vlm.family_name} family has neither, use mask_strategy token (docs/models.md)"
        )
    ids = torch.cat([input_ids, input_ids])
    if strategy == "pixel":
        cropped = pixel_values.with_pixels(crop_pixels(pixel_values.pixels, ratio, seeds))
        views = ImageBatch.cat([pixel_values, cropped])
        return vlm.embed_features(ids, vlm.image_features(views), views.token_counts), torch.cat(
            [attention_mask, attention_mask])
    if strategy not in ("patch", "latent"):
        raise ValueError(f"unknown mask strategy {strategy!r}; one of {', '.join(MASK_STRATEGIES)}")
    layout = TowerLayout(vlm)
    dropped_patches = [dropped_indices(layout.patches, ratio, seed) for seed in seeds]
    keep_all = [torch.zeros(0, dtype=torch.long)] * len(seeds)
    key_mask = tower_key_mask(layout, keep_all + dropped_patches, vlm.dtype, vlm.device)
    views = ImageBatch.cat([pixel_values, pixel_values])
    features = vlm.image_features(views, vision_attention_mask=key_mask)
    degraded_mask = attention_mask.clone()
    if strategy == "patch":
        for b, patches in enumerate(dropped_patches):
            positions = image_mask[b].nonzero().squeeze(-1)
            degraded_mask[b, positions[patches.to(positions.device) + layout.first_patch_feature]] = 0
    return vlm.embed_features(ids, features, views.token_counts), torch.cat([attention_mask, degraded_mask])

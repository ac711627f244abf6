"""The processed images of a batch, as the vision tower takes them.

Families whose images all become the same tensor (LLaVA-1.5, Gemma 3, Idefics3, Qwen2-VL at one
side) could batch a plain tensor; any-resolution families (LLaVA-NeXT, Qwen2-VL at native
resolution) cannot: an image's tiles or patches, and so its visual tokens, follow its size. An
`ImageBatch` keeps, per image, the pixels (padded along dim 1 to the batch's largest where they
differ), its size, and the number of visual tokens it becomes, so every stage batches, moves,
indexes and concatenates images the same way whatever the family.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional


@dataclass(frozen=True, eq=False)
class ImageBatch:
    """`pixels` (B, ...): one processed image per row (the family's layout, zero-padded along
    dim 1 where images differ in tiles or patches); `sizes` (B, 2): each image's (height, width),
    as given to the processor (Qwen2-VL at native resolution: as the processor resized it, a
    multiple of the patch, which fixes its grid); `token_counts` (B,): the visual tokens each image
    becomes, which its prompt holds (`VLM.prompt_ids(..., image=...)`)."""

    pixels: torch.Tensor
    sizes: torch.Tensor
    token_counts: torch.Tensor

    def __post_init__(self) -> None:
        n = self.pixels.shape[0]
        if self.sizes.shape != (n, 2) or self.token_counts.shape != (n,):
            raise ValueError(f"ImageBatch: {n} images but sizes {tuple(self.sizes.shape)} and token counts "
                             f"{tuple(self.token_counts.shape)}")

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def __getitem__(self, index: int | slice | torch.Tensor | Sequence[int]) -> ImageBatch:
        """The images at `index` (an int keeps a batch of one; a tensor or list holds row indices)."""
        if isinstance(index, int):
            index = slice(index, index + 1 or None)
        if isinstance(index, slice):
            return ImageBatch(self.pixels[index], self.sizes[index], self.token_counts[index])
        if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
            raise TypeError("ImageBatch: index with row numbers, not a boolean mask")
        index = torch.as_tensor(index, dtype=torch.long)
        rows = index.cpu()
        return ImageBatch(self.pixels[index.to(self.pixels.device)], self.sizes[rows], self.token_counts[rows])

    def to(self, *args, **kwargs) -> ImageBatch:
        """Pixels moved or cast as `Tensor.to` does; sizes and counts stay on the CPU (read as
        Python numbers). Accepts what `accelerate.utils.send_to_device` passes (`non_blocking`)."""
        return ImageBatch(self.pixels.to(*args, **kwargs), self.sizes, self.token_counts)

    def layout(self) -> ImageBatch:
        """The sizes and visual-token counts without the pixels (an empty (B, 0) tensor): what
        positions need, cheap to index and stack per row."""
        return ImageBatch(self.pixels.new_empty((len(self), 0)), self.sizes, self.token_counts)

    def with_pixels(self, pixels: torch.Tensor) -> ImageBatch:
        """The same images with other pixels of the same shape (a crop, a noised copy)."""
        if pixels.shape != self.pixels.shape:
            raise ValueError(f"ImageBatch.with_pixels: shape {tuple(pixels.shape)}, expected {tuple(self.pixels.shape)}")
        return ImageBatch(pixels, self.sizes, self.token_counts)

    @property
    def max_tokens(self) -> int:
        return int(self.token_counts.max()) if len(self) else 0

    @staticmethod
    def cat(batches: Sequence[ImageBatch]) -> ImageBatch:
        """The images of `batches` in order, pixels zero-padded along dim 1 to the largest."""
        if not batches:
            raise ValueError("ImageBatch.cat: no batches")
        pixels = [b.pixels for b in batches]
        if pixels[0].dim() > 1:
            width = max(p.shape[1] for p in pixels)
            pad = [0, 0] * (pixels[0].dim() - 2)
            pixels = [p if p.shape[1] == width else functional.pad(p, [*pad, 0, width - p.shape[1]]) for p in pixels]
        return ImageBatch(torch.cat(pixels), torch.cat([b.sizes for b in batches]),
                          torch.cat([b.token_counts for b in batches]))


def mean_visual_token(features: torch.Tensor, token_counts: torch.Tensor) -> torch.Tensor:
    """(B, hidden) mean of each image's visual tokens in (B, max tokens, hidden) `features`,
    whose rows past an image's `token_counts` are padding."""
    counts = token_counts.to(features.device)
    if bool((counts == features.shape[1]).all()):
        # No padding: the plain mean, whose rounding the pooled vectors of fixed-size families
        # (and so `mine`'s artifacts) were made with.
        return features.mean(1)
    valid = torch.arange(features.shape[1], device=features.device) < counts.unsqueeze(1)
    return (features * valid.unsqueeze(-1)).sum(1) / counts.unsqueeze(1)


def pad_features(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B, max tokens, hidden) from one (tokens, hidden) tensor per image, zero-padded."""
    width = max(f.shape[0] for f in features)
    return torch.stack([functional.pad(f, [0, 0, 0, width - f.shape[0]]) for f in features])

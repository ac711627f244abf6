"""`ImageBatch`: a batch of processed images whose tiles and visual tokens may differ per image
(`pipeline/models/image_batch.py`), and the helpers that read padded visual tokens."""

from __future__ import annotations

import pytest
import torch

from pipeline.models.image_batch import ImageBatch, mean_visual_token, pad_features


def _batch(tiles: list[int], tokens: list[int]) -> ImageBatch:
    pixels = torch.zeros(len(tiles), max(tiles), 3, 2, 2)
    for b, n in enumerate(tiles):
        pixels[b, :n] = b + 1  # padding tiles stay zero
    sizes = torch.tensor([[10 * (b + 1), 20] for b in range(len(tiles))])
    return ImageBatch(pixels, sizes, torch.tensor(tokens))


def test_cat_pads_tiles_to_the_largest_and_keeps_each_images_record():
    both = ImageBatch.cat([_batch([3], [70]), _batch([5, 2], [88, 34])])
    assert both.pixels.shape == (3, 5, 3, 2, 2) and len(both) == 3
    assert torch.equal(both.pixels[0, :3], torch.ones(3, 3, 2, 2)) and both.pixels[0, 3:].abs().sum() == 0
    assert both.token_counts.tolist() == [70, 88, 34] and both.sizes[:, 0].tolist() == [10, 10, 20]
    assert both.max_tokens == 88


@pytest.mark.parametrize("index", [torch.tensor([2, 0]), [2, 0]])
def test_indexing_selects_pixels_sizes_and_counts_together(index):
    batch = _batch([1, 2, 3], [4, 5, 6])
    picked = batch[index]
    assert picked.token_counts.tolist() == [6, 4] and picked.sizes[:, 0].tolist() == [30, 10]
    assert torch.equal(picked.pixels[0], batch.pixels[2])
    assert batch[1].token_counts.tolist() == [5] and len(batch[0:2]) == 2


def test_to_casts_the_pixels_only():
    moved = _batch([1, 2], [4, 5]).to(torch.float64, non_blocking=False)
    assert moved.pixels.dtype == torch.float64 and moved.token_counts.dtype == torch.long


def test_inconsistent_records_are_refused():
    with pytest.raises(ValueError, match="2 images but sizes"):
        ImageBatch(torch.zeros(2, 1), torch.zeros(3, 2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        _batch([1, 2], [4, 5]).with_pixels(torch.zeros(2, 1))


def test_padded_features_and_their_mean_ignore_the_padding():
    one, two = torch.arange(6.0).reshape(3, 2), torch.full((1, 2), 10.0)
    features = pad_features([one, two])
    assert features.shape == (2, 3, 2) and features[1, 1:].abs().sum() == 0
    means = mean_visual_token(features, torch.tensor([3, 1]))
    assert torch.equal(means, torch.stack([one.mean(0), two.mean(0)]))
    uniform = torch.randn(2, 4, 3)
    assert torch.equal(mean_visual_token(uniform, torch.tensor([4, 4])), uniform.mean(1))

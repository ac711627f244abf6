"""HSCR Table 5 mask strategies on the tiny model: what each degraded view sees."""

from __future__ import annotations

import pytest
import torch

from pipeline.batching import collate_sequences
from pipeline.mask_strategies import (
    MASK_STRATEGIES,
    TowerLayout,
    crop_pixels,
    dropped_indices,
    two_view_embeddings,
)
from pipeline.models.profiles import build_tiny
from pipeline.self_contrast import sample_batch, two_view_answer_logits, two_view_decode
from pipeline.visual_dropout import drop_visual_tokens
from tests.test_self_contrast import _rows, sample_config


def _batch(vlm, rows, n=3):
    return collate_sequences(vlm, [r["image"] for r in rows[:n]], [r["question"] for r in rows[:n]],
                             ["yes", "no", "left lung"][:n], contexts=[r["context"] for r in rows[:n]])


def _views(vlm, batch, strategy, ratio, seeds):
    embeds, masks = two_view_embeddings(vlm, batch.input_ids, batch.attention_mask, batch.pixel_values,
                                        strategy, ratio, seeds)
    n = batch.input_ids.shape[0]
    return embeds[:n], embeds[n:], masks[:n], masks[n:]


def _image_features(embeds, batch):
    """(B, num_image_tokens, D) the visual tokens written into a view's embeddings."""
    n = batch.input_ids.shape[0]
    return embeds[batch.image_mask].view(n, -1, embeds.shape[-1])


def test_the_full_view_is_the_model_as_it_is(tiny_vlm, rows):
    batch = _batch(tiny_vlm, rows)
    reference = tiny_vlm.embed(batch.input_ids, batch.pixel_values)
    for strategy in MASK_STRATEGIES:
        full, _, full_mask, _ = _views(tiny_vlm, batch, strategy, 0.7, [0, 1, 2])
        torch.testing.assert_close(full, reference, msg=strategy)
        assert torch.equal(full_mask, batch.attention_mask)


def test_token_drops_visual_tokens_in_the_language_model_only(tiny_vlm, rows):
    batch = _batch(tiny_vlm, rows)
    full, degraded, _, degraded_mask = _views(tiny_vlm, batch, "token", 0.5, [0, 1, 2])
    assert torch.equal(full, degraded)
    assert torch.equal(degraded_mask, drop_visual_tokens(batch.attention_mask, batch.image_mask, 0.5, [0, 1, 2]))


def test_pixel_keeps_one_crop_of_the_image_in_place():
    pixels = torch.randn(2, 3, 32, 32)
    cropped = crop_pixels(pixels, 0.75, [5, 6])
    for b in range(2):
        kept = (cropped[b] == pixels[b]).all(0)
        rows_kept, cols_kept = kept.any(1).nonzero().squeeze(-1), kept.any(0).nonzero().squeeze(-1)
        # one 16 x 16 rectangle (a quarter of the area), everything else 0
        assert len(rows_kept) == len(cols_kept) == 16 and int(kept.sum()) == 256
        assert (rows_kept.diff() == 1).all() and (cols_kept.diff() == 1).all()
        assert (cropped[b][:, ~kept] == 0).all()
    assert torch.equal(crop_pixels(pixels, 0.75, [5, 6]), cropped)  # seeded
    assert not torch.equal(crop_pixels(pixels, 0.75, [7, 8]), cropped)
    assert torch.equal(crop_pixels(pixels, 0.0, [5, 6]), pixels)


def test_pixel_runs_the_tower_on_the_cropped_image(tiny_vlm, rows):
    batch = _batch(tiny_vlm, rows)
    _, degraded, _, degraded_mask = _views(tiny_vlm, batch, "pixel", 0.6, [0, 1, 2])
    images = batch.pixel_values
    expected = tiny_vlm.image_features(images.with_pixels(crop_pixels(images.pixels, 0.6, [0, 1, 2])))
    torch.testing.assert_close(_image_features(degraded, batch), expected, atol=1e-5, rtol=1e-4)
    assert torch.equal(degraded_mask, batch.attention_mask)  # the language model sees every token


@torch.no_grad()
def _tower_on_kept_patches(vlm, pixel_values, kept):
    """The CLIP tower run on the CLS token and the kept patches alone, then the projector."""
    tower = vlm.vision_tower
    hidden = tower.embeddings(pixel_values.unsqueeze(0))
    hidden = hidden[:, torch.cat([torch.tensor([0]), kept + 1])]
    hidden = tower.pre_layrnorm(hidden)
    for layer in tower.encoder.layers:
        hidden = layer(hidden, None)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return vlm.projector(hidden[:, 1:])[0]


def test_patch_equals_the_tower_on_the_kept_patches_alone(tiny_vlm, rows):
    batch = _batch(tiny_vlm, rows)
    seeds = [11, 12, 13]
    _, degraded, _, degraded_mask = _views(tiny_vlm, batch, "patch", 0.5, seeds)
    patches = TowerLayout(tiny_vlm).patches
    features = _image_features(degraded, batch)
    for b, seed in enumerate(seeds):
        dropped = dropped_indices(patches, 0.5, seed)
        kept = torch.tensor(sorted(set(range(patches)) - set(dropped.tolist())))
        assert len(kept) == patches // 2
        torch.testing.assert_close(features[b, kept], _tower_on_kept_patches(tiny_vlm, batch.pixel_values.pixels[b], kept),
                                   atol=1e-5, rtol=1e-4)
        # the language model gets no token for a dropped patch, and every other token
        positions = batch.image_mask[b].nonzero().squeeze(-1)
        assert degraded_mask[b, positions[dropped]].eq(0).all()
        assert degraded_mask[b, positions[kept]].eq(1).all()
        assert torch.equal(degraded_mask[b, ~batch.image_mask[b]], batch.attention_mask[b, ~batch.image_mask[b]])
    # token and patch hide the same places for a seed
    assert torch.equal(degraded_mask, drop_visual_tokens(batch.attention_mask, batch.image_mask, 0.5, seeds))


def test_latent_changes_the_tower_only_through_its_attention(rows):
    vlm = build_tiny([r["question"] for r in rows] + [r["answer"] for r in rows], seed=0)
    batch = _batch(vlm, rows)
    full, degraded, _, degraded_mask = _views(vlm, batch, "latent", 0.5, [0, 1, 2])
    assert torch.equal(degraded_mask, batch.attention_mask)  # every visual token reaches the language model
    assert not torch.allclose(_image_features(full, batch), _image_features(degraded, batch))
    with torch.no_grad():  # attention that adds nothing: the mask has nothing left to change
        for layer in vlm.vision_tower.encoder.layers:
            layer.self_attn.out_proj.weight.zero_()
            layer.self_attn.out_proj.bias.zero_()
    full, degraded, _, _ = _views(vlm, batch, "latent", 0.5, [0, 1, 2])
    torch.testing.assert_close(_image_features(full, batch), _image_features(degraded, batch), atol=1e-6, rtol=0)


@pytest.mark.parametrize("strategy", MASK_STRATEGIES)
def test_each_strategy_is_seeded_per_entry(tiny_vlm, rows, strategy):
    batch = _batch(tiny_vlm, rows)
    _, drop = two_view_answer_logits(tiny_vlm, batch, strategy, 0.5, [0, 1, 2])
    _, again = two_view_answer_logits(tiny_vlm, batch, strategy, 0.5, [0, 1, 2])
    _, other = two_view_answer_logits(tiny_vlm, batch, strategy, 0.5, [7, 8, 9])
    assert torch.equal(drop, again)
    assert not torch.allclose(drop, other)
    # an entry's degraded view does not depend on the batch it is in
    alone = collate_sequences(tiny_vlm, [rows[1]["image"]], [rows[1]["question"]], ["no"], contexts=[[]])
    _, drop_alone = two_view_answer_logits(tiny_vlm, alone, strategy, 0.5, [1])
    length = int(alone.answer_length[0])
    torch.testing.assert_close(drop_alone[0, :length], drop[1, :length], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("strategy", MASK_STRATEGIES)
def test_every_strategy_samples_candidates_in_both_modes(tiny_vlm, rows, strategy):
    for mode in ("replace", "decode"):
        out = sample_batch(tiny_vlm, _rows(rows), sample_config(mask_strategy=strategy, mode=mode, max_new_tokens=3))
        assert all(r["candidates"] for r in out), (strategy, mode)
        assert any(s != 0.0 for r in out for s in r["sensitivity"]), (strategy, mode)


def test_decode_continues_under_the_chosen_strategy(tiny_vlm, rows, monkeypatch):
    import pipeline.self_contrast as self_contrast

    rows = _rows(rows)
    prefixes = [tiny_vlm.answer_ids(r["answer"])[:1] for r in rows]
    args = ([r["image"] for r in rows], [r["question"] for r in rows], prefixes, [1, 2, 3, 4], 0.7, 4)
    seen = []

    def spy(vlm, input_ids, attention_mask, pixel_values, strategy, ratio, seeds):
        seen.append((strategy, ratio, list(seeds)))
        return two_view_embeddings(vlm, input_ids, attention_mask, pixel_values, strategy, ratio, seeds)

    monkeypatch.setattr(self_contrast, "two_view_embeddings", spy)
    for strategy in MASK_STRATEGIES:
        tokens, _ = two_view_decode(tiny_vlm, *args, strategy, contexts=[r["context"] for r in rows])
        assert seen[-1] == (strategy, 0.7, [1, 2, 3, 4])
        assert all(t and all(i != tiny_vlm.image_token_id for i in t) for t in tokens)


def test_patch_and_latent_need_a_clip_tower(rows):
    vlm = build_tiny([r["question"] for r in rows] + [r["answer"] for r in rows], seed=0)
    vlm.model.model.vision_tower = torch.nn.Identity()
    batch = _batch(vlm, rows)
    for strategy in ("patch", "latent"):
        with pytest.raises(NotImplementedError, match="CLIP towers only.*Identity.*token or pixel"):
            two_view_embeddings(vlm, batch.input_ids, batch.attention_mask, batch.pixel_values, strategy, 0.5,
                                [0, 1, 2])


def test_an_unknown_strategy_is_an_error(tiny_vlm, rows):
    batch = _batch(tiny_vlm, rows)
    with pytest.raises(ValueError, match="unknown mask strategy 'voxel'"):
        two_view_embeddings(tiny_vlm, batch.input_ids, batch.attention_mask, batch.pixel_values, "voxel", 0.5,
                            [0, 1, 2])

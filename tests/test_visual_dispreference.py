"""MMedPO §3.1's visual dispreference, the sample side: the noise of eq. 2, where the lesion is
(the phantom's annotation, your masks or boxes, the SFT model's saliency) and the column that
`sample` writes and `rerank` and `score` carry on."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.ingest import ingest
from pipeline.data.phantoms import Findings, generate_split, render, render_with_lesions
from pipeline.data.prepare import split_lesions
from pipeline.judges.panel import WeightConfig
from pipeline.judges.weights import visual_weights
from pipeline.params import project_config
from pipeline.self_contrast import SampleConfig
from pipeline.visual_dispreference import (
    VisualDispreferenceConfig,
    add_region_noise,
    alpha_bar,
    annotation_localizer,
    build_visual_dispreferred,
    locate,
    region_from_mask,
    saliency_localizer,
    saliency_region,
    token_grid,
    token_saliency,
)


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def _config(**changes) -> VisualDispreferenceConfig:
    values = {"mode": "lesion", "localizer": "auto", "noise_step": 500, "saliency_fraction": 0.25, "batch_size": 4}
    section = project_config(SampleConfig, "sample").visual_dispreference.to_dict()
    return VisualDispreferenceConfig(**{**section, **values, **changes})


def test_the_schedule_keeps_less_signal_at_later_steps():
    values = [alpha_bar(k) for k in (0, 100, 500, 999)]
    beta_0 = 1 / (1 + np.exp(6)) * (0.5e-2 - 1e-5) + 1e-5  # VCD's sigmoid schedule at step 0
    assert values[0] == pytest.approx(1 - beta_0, abs=1e-9)
    assert all(a > b for a, b in zip(values, values[1:], strict=False))
    assert values[2] == pytest.approx(0.745, abs=1e-3) and 0.0 < values[-1] < 0.1


def test_noise_changes_the_region_only_and_is_seeded(rows):
    image = rows[0]["image"]
    region = np.zeros((32, 32))
    region[8:20, 4:16] = 1
    noisy = add_region_noise(image, region, 500, seed=3)
    original, changed = _pixels(image), _pixels(noisy)
    assert np.array_equal(original[region == 0], changed[region == 0])
    assert np.abs(original[region == 1] - changed[region == 1]).mean() > 20  # half the signal is noise
    assert noisy == add_region_noise(image, region, 500, seed=3)
    assert noisy != add_region_noise(image, region, 500, seed=4)
    assert np.array_equal(_pixels(add_region_noise(image, np.zeros((32, 32)), 999, seed=3)), original)
    with pytest.raises(ValueError, match="region of shape"):
        add_region_noise(image, np.ones((16, 16)), 500, seed=0)


def test_phantom_lesion_masks_cover_the_drawn_lesions_without_changing_a_pixel():
    rows = generate_split(24, "train", seed=0, prior=0.7, image_size=64, lesion_masks=True)
    plain = generate_split(24, "train", seed=0, prior=0.7, image_size=64)
    assert [r["image"] for r in rows] == [r["image"] for r in plain]  # recording draws no randomness
    with_lesion = [r for r in rows if r["lesion_mask"] is not None]
    assert with_lesion and len(with_lesion) < len(rows)  # "no" answers to presence questions have none
    for r in with_lesion:
        mask = region_from_mask(r["lesion_mask"], (64, 64))
        assert 0 < mask.mean() < 0.3
    # A lesion is where the mask is: a rendering with the same streams and no findings differs there.
    rng_state = np.random.default_rng(7)
    findings = Findings(radii=(4.0,))
    image, lesions = render_with_lesions("chest_xray", findings, np.random.default_rng(7), 64)
    assert np.array_equal(image, render("chest_xray", findings, rng_state, 64))
    blank, none = render_with_lesions("chest_xray", Findings(radii=()), np.random.default_rng(7), 64)
    assert none is None and lesions is not None
    differs = np.abs(image.astype(int) - blank.astype(int)).max(-1) > 30
    assert differs.any() and (differs & ~lesions).sum() == 0


def test_prepare_moves_annotations_to_their_own_table():
    rows = generate_split(12, "train", seed=0, prior=0.7, image_size=32, lesion_masks=True)
    expected = {r["id"] for r in rows if r["lesion_mask"] is not None}
    lesions = split_lesions(rows)
    assert {r["id"] for r in lesions} == expected and all(r["source"] == "phantom" for r in lesions)
    assert all("lesion_mask" not in r for r in rows)


def _write_item_file(tmp_path, items):
    (tmp_path / "images").mkdir(exist_ok=True)
    Image.new("RGB", (40, 30), (50, 50, 50)).save(tmp_path / "images/a.png")
    Image.new("L", (40, 30), 0).save(tmp_path / "images/empty_mask.png")
    mask = Image.new("L", (40, 30), 0)
    mask.paste(7, (5, 5, 15, 12))
    mask.save(tmp_path / "images/mask.png")
    Image.new("L", (20, 20), 255).save(tmp_path / "images/small_mask.png")
    (tmp_path / "q.json").write_text(json.dumps(items))
    return tmp_path / "q.json"


def test_files_accept_a_lesion_mask_or_boxes(tmp_path):
    base = {"image": "a.png", "question": "is there a lesion?", "answer": "yes"}
    source = _write_item_file(tmp_path, [
        {**base, "qid": "m", "lesion_mask": "mask.png"},
        {**base, "qid": "b", "lesion_boxes": [[0, 0, 10, 5], [30, 20, 40, 30]]},
        {**base, "qid": "n"},
    ])
    result = ingest(source, fmt=None, image_root=tmp_path / "images", split="train", dataset="unit", skip_bad=False, turns="first")
    by_id = {r["id"]: r for r in result.rows}
    mask = region_from_mask(by_id["m"]["lesion_mask"], (40, 30))
    assert mask.sum() == 10 * 7 and mask[5:12, 5:15].all() and by_id["m"]["lesion_source"] == "mask"
    boxes = region_from_mask(by_id["b"]["lesion_mask"], (40, 30))
    assert boxes.sum() == 50 + 100 and boxes[0:5, 0:10].all() and boxes[20:30, 30:40].all()
    assert "lesion_mask" not in by_id["n"]


@pytest.mark.parametrize("item, message", [
    ({"lesion_mask": "small_mask.png"}, "lesion_mask is 20x20, the image 40x30"),
    ({"lesion_mask": "missing.png"}, "lesion_mask:"),
    ({"lesion_boxes": [[10, 0, 5, 5]]}, "lesion_boxes must be a list of [x0, y0, x1, y1]"),
])
def test_a_bad_lesion_annotation_is_a_bad_row(tmp_path, item, message):
    source = _write_item_file(tmp_path, [{"qid": "x", "image": "a.png", "question": "q?", "answer": "yes", **item}])
    with pytest.raises(Exception, match="bad lesion annotation") as error:
        ingest(source, fmt=None, image_root=tmp_path / "images", split="train", dataset="unit", skip_bad=False, turns="first")
    assert message in str(error.value)


def test_saliency_gives_one_score_per_visual_token_and_a_patch_region(tiny_vlm, rows):
    side, first = token_grid(tiny_vlm)
    assert side * side + first == tiny_vlm.settings.num_image_tokens
    saliency = token_saliency(tiny_vlm, rows[:3])
    assert saliency.shape == (3, tiny_vlm.settings.num_image_tokens) and saliency.abs().sum() > 0
    assert not any(p.grad is not None for p in tiny_vlm.model.parameters())  # the model is left as it was
    region = saliency_region(saliency[0], side, first, 0.25, (32, 32))
    assert region.mask.shape == (32, 32) and region.mask.mean() == pytest.approx(0.25)
    assert 0.25 <= region.confidence <= 1.0  # the top quarter of the tokens carries at least a quarter
    top = int(saliency[0, first:].abs().argmax())
    patch = 32 // side
    assert region.mask[(top // side) * patch, (top % side) * patch] == 1


def test_saliency_region_covers_only_what_the_tower_sees_of_a_non_square_image():
    """With LLaVA-Med's padding the 2 x 2 grid spans a 64 x 64 square around a 64 x 32 image
    (`tower_view` (0, -16, 64, 64)); with a centre crop it spans the middle 32 x 32 square."""
    saliency = torch.tensor([5.0, 0.0, 0.0, 0.0])  # the top-left patch
    padded = saliency_region(saliency, 2, 0, 0.25, (64, 32), view=(0, -16, 64, 64)).mask
    assert padded.shape == (32, 64) and padded[:16, :32].all() and padded.sum() == 16 * 32
    cropped = saliency_region(saliency, 2, 0, 0.25, (64, 32), view=(16, 0, 32, 32)).mask
    assert cropped[:16, 16:32].all() and cropped.sum() == 16 * 16


def test_auto_uses_the_annotation_where_there_is_one_and_saliency_elsewhere(tiny_vlm, rows):
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 8, 8))
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    annotations = annotation_localizer({rows[0]["id"]: buf.getvalue()})
    saliency = saliency_localizer(tiny_vlm, 0.25, batch_size=2)
    regions = locate(rows[:3], _config(), annotations, saliency)
    assert [r.source for r in regions] == ["annotation", "saliency", "saliency"]
    assert regions[0].confidence == 1.0 and regions[0].mask.sum() == 64
    assert [r.source for r in locate(rows[:3], _config(localizer="saliency"), annotations, saliency)] == ["saliency"] * 3
    assert all(r.mask.all() and r.source == "global" for r in locate(rows[:2], _config(mode="global"), None, None))


def test_build_is_seeded_per_entry_and_summarized(tiny_vlm, rows):
    loads = []

    def load():
        loads.append(1)
        return tiny_vlm

    values, summary = build_visual_dispreferred(rows[:4], _config(), 0, {}, load)
    again, _ = build_visual_dispreferred(list(reversed(rows[:4])), _config(), 0, {}, load)
    assert values == again  # the batch an entry is in does not change its x*
    other, _ = build_visual_dispreferred(rows[:4], _config(), 1, {}, load)
    assert values[rows[0]["id"]]["image"] != other[rows[0]["id"]]["image"]
    assert summary["entries"] == 4 and summary["by_region"]["saliency"] == 4 and len(loads) == 3  # once per build
    assert all(v["weight"] is None and v["image"] != r["image"] for r, v in zip(rows, values.values(), strict=False))
    _, none = build_visual_dispreferred(rows[:4], _config(mode="none"), 0, {}, load)
    assert none == {"mode": "none"}
    global_values, global_summary = build_visual_dispreferred(rows[:2], _config(mode="global"), 0, {}, load)
    assert len(loads) == 3 and global_summary["mean_region_fraction"] == 1.0  # no model needed


def test_score_turns_confidences_into_weights_like_the_judges():
    cfg = WeightConfig(mu=1.0, sigma=0.1 ** 0.5, clip=(0.75, 1.25))
    rows = [{"id": str(i), "visual_dispreferred": {"confidence": c, "weight": None}} for i, c in
            enumerate([0.2, 0.4, 0.6, 0.8])] + [{"id": "none", "visual_dispreferred": None}]
    out, summary = visual_weights(rows, cfg)
    weights = [r["visual_dispreferred"]["weight"] for r in out[:4]]
    assert weights == sorted(weights) and weights[0] < 1.0 < weights[-1]
    assert sum(weights) / 4 == pytest.approx(1.0) and out[4]["visual_dispreferred"] is None
    assert summary["responses"] == 4
    same, _ = visual_weights([{"visual_dispreferred": {"confidence": 1.0}}] * 3, cfg)
    assert [r["visual_dispreferred"]["weight"] for r in same] == [1.0] * 3  # annotations: all equally sure

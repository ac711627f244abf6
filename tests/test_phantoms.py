"""Tests for the procedurally generated phantom VQA benchmark (`pipeline.data.phantoms`)."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.data import phantoms as ph
from pipeline.schema import ANSWER_TYPES, VQA_SCHEMA


@pytest.fixture(scope="module")
def train_rows() -> list[dict]:
    return ph.generate_split(48, "train", seed=0, prior=0.7, image_size=64)


def _decode(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


def _template(row: dict) -> ph.Template:
    (t,) = [
        t
        for t in ph.TEMPLATES
        if (t.modality, t.question_type, t.answer_type, t.question)
        == (row["modality"], row["question_type"], row["answer_type"], row["question"])
    ]
    return t


def test_rows_match_vqa_schema(train_rows: list[dict]) -> None:
    assert len(train_rows) == 48
    for i, row in enumerate(train_rows):
        assert set(row) == set(VQA_SCHEMA.names)
        assert row["id"] == f"phantom-train-{i:05d}"
        assert row["dataset"] == "phantom" and row["split"] == "train"
        assert isinstance(row["image"], bytes)
        for key in ("question", "answer", "answer_type", "modality", "question_type"):
            assert isinstance(row[key], str) and row[key]
        assert row["answer_type"] in ANSWER_TYPES
        assert row["modality"] in ph.MODALITIES
        assert row["question_type"] in ph.QUESTION_TYPES
        assert row["answer"] in _template(row).answers
        assert len(row["answer"].split()) == 1
        image = _decode(row["image"])
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (64, 64)
    pa.Table.from_pylist(train_rows, schema=VQA_SCHEMA)  # casts cleanly, no nulls


def test_image_size_is_respected() -> None:
    for row in ph.generate_split(3, "test", seed=1, prior=None, image_size=96):
        assert _decode(row["image"]).size == (96, 96)


def test_same_seed_gives_identical_rows(train_rows: list[dict]) -> None:
    assert ph.generate_split(48, "train", seed=0, prior=0.7, image_size=64) == train_rows


def test_other_seed_and_split_differ(train_rows: list[dict]) -> None:
    other_seed = ph.generate_split(48, "train", seed=1, prior=0.7, image_size=64)
    test_split = ph.generate_split(48, "test", seed=0, prior=0.7, image_size=64)
    for other in (other_seed, test_split):
        assert sum(a["image"] == b["image"] for a, b in zip(train_rows, other, strict=True)) == 0
        assert [r["answer"] for r in other] != [r["answer"] for r in train_rows]


def test_rows_follow_the_plan(train_rows: list[dict]) -> None:
    plan = ph.plan_split(48, "train", seed=0, prior=0.7)
    assert [(t.question, a) for t, a in plan] == [(r["question"], r["answer"]) for r in train_rows]


def test_train_prior_per_template() -> None:
    # Three closed chest X-ray templates share 6000 rows: about 2000 questions each.
    plan = ph.plan_split(6000, "train", seed=3, prior=0.7, closed_fraction=1.0, modalities=["chest_xray"])
    by_template: dict[ph.Template, Counter] = {}
    for t, a in plan:
        by_template.setdefault(t, Counter())[a] += 1
    assert len(by_template) == 3
    for t, counts in by_template.items():
        total = sum(counts.values())
        assert total > 1500
        assert counts[t.majority] / total == pytest.approx(0.7, abs=0.04)


def test_train_prior_spreads_the_rest_evenly() -> None:
    t = next(t for t in ph.TEMPLATES if t.question_type == "count")
    assert ph.answer_distribution(t, "train", 0.7) == pytest.approx({"1": 0.7, "2": 0.15, "3": 0.15})
    with pytest.raises(ValueError):
        ph.answer_distribution(t, "train", 1.5)


@pytest.mark.parametrize(("split", "prior"), [("test", 0.7), ("val", 0.9), ("train", None)])
def test_balanced_answers_without_the_prior(split: str, prior: float | None) -> None:
    plan = ph.plan_split(6000, split, seed=3, prior=prior, closed_fraction=0.0, modalities=["ct"])
    by_template: dict[ph.Template, Counter] = {}
    for t, a in plan:
        by_template.setdefault(t, Counter())[a] += 1
    for t, counts in by_template.items():
        total = sum(counts.values())
        assert max(counts.values()) / total == pytest.approx(1 / len(t.answers), abs=0.04)


def test_closed_fraction_is_exact() -> None:
    for fraction in (0.0, 0.3, 1.0):
        plan = ph.plan_split(200, "train", seed=0, prior=0.7, closed_fraction=fraction)
        assert sum(t.answer_type == "closed" for t, _ in plan) == round(200 * fraction)


def test_coverage_of_modalities_and_answer_types() -> None:
    rows = ph.generate_split(40, "test", seed=2, prior=None, image_size=64)
    assert {r["modality"] for r in rows} == set(ph.MODALITIES)
    assert {r["answer_type"] for r in rows} == {"closed", "open"}
    assert len(ph.MODALITIES) >= 4
    for m in ph.MODALITIES:
        assert {t.answer_type for t in ph.TEMPLATES if t.modality == m} == {"closed", "open"}
    restricted = ph.generate_split(10, "test", seed=2, prior=None, modalities=["histology"], image_size=64)
    assert {r["modality"] for r in restricted} == {"histology"}


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError):
        ph.generate_split(2, "train", seed=0, prior=0.7, modalities=["ultrasound"], image_size=64)
    with pytest.raises(ValueError):
        ph.generate_split(2, "train", seed=0, prior=0.7, closed_fraction=1.5, image_size=64)
    with pytest.raises(ValueError):
        ph.findings_for(ph.TEMPLATES[0], "maybe", np.random.default_rng(0))


def _changed(modality: str, a: ph.Findings, b: ph.Findings, seed: int = 5) -> np.ndarray:
    """Pixels where two renderings from the same rng state differ by more than noise could."""
    img_a = ph.render(modality, a, np.random.default_rng(seed), image_size=64).astype(int)
    img_b = ph.render(modality, b, np.random.default_rng(seed), image_size=64).astype(int)
    return np.abs(img_a - img_b).max(axis=2) > 40


@pytest.mark.parametrize("modality", ph.MODALITIES)
def test_a_lesion_is_rendered_where_present(modality: str) -> None:
    changed = _changed(modality, ph.Findings(), ph.Findings(radii=(3.5,)))
    # A radius-3.5 lesion covers about 38 pixels; anatomy and noise are shared, so nothing else moves.
    assert 15 <= changed.sum() <= 120
    ys, xs = np.nonzero(changed)
    assert np.ptp(ys) <= 14 and np.ptp(xs) <= 14


@pytest.mark.parametrize("modality", ["chest_xray", "brain_mri"])
def test_laterality_follows_the_radiological_convention(modality: str) -> None:
    for seed in range(4):
        left = _changed(modality, ph.Findings(), ph.Findings(radii=(3.5,), side="left"), seed)
        right = _changed(modality, ph.Findings(), ph.Findings(radii=(3.5,), side="right"), seed)
        # The patient's left is on the image's right.
        assert np.nonzero(left)[1].mean() > 34 and np.nonzero(right)[1].mean() < 30


@pytest.mark.parametrize("modality", ["ct", "brain_mri"])
def test_large_and_small_lesions_differ(modality: str) -> None:
    small = _changed(modality, ph.Findings(), ph.Findings(radii=(3.5,))).sum()
    large = _changed(modality, ph.Findings(), ph.Findings(radii=(8.0,))).sum()
    assert large > 3 * small


@pytest.mark.parametrize("modality", ["chest_xray", "brain_mri", "histology"])
def test_organ_enlargement_is_rendered(modality: str) -> None:
    assert _changed(modality, ph.Findings(enlarged=False), ph.Findings(enlarged=True)).sum() > 80


def test_counted_lesions_are_all_rendered() -> None:
    rng = np.random.default_rng(0)
    t = next(t for t in ph.TEMPLATES if t.modality == "ct" and t.question_type == "count")
    areas = []
    for answer in t.answers:
        f = ph.findings_for(t, answer, rng)
        assert len(f.radii) == int(answer)
        areas.append(_changed("ct", ph.Findings(), ph.Findings(radii=f.radii)).sum())
    assert areas[0] < areas[1] < areas[2]


def test_crowded_scenes_still_fit() -> None:
    # The tightest cases: three large-ish nodules or lesions, the largest mass beside big ventricles.
    crowded = [
        ("ct", ph.Findings(radii=(4.5, 4.5, 4.5))),
        ("ct", ph.Findings(radii=(9.0,))),
        ("chest_xray", ph.Findings(radii=(4.5, 4.5, 4.5), enlarged=True)),
        ("chest_xray", ph.Findings(radii=(4.5,), side="left", enlarged=True)),
        ("brain_mri", ph.Findings(radii=(9.0,), side="left", enlarged=True)),
        ("brain_mri", ph.Findings(radii=(5.0,), side="right", enlarged=True, avoid_organ=True)),
        ("histology", ph.Findings(radii=(3.6, 3.6, 3.6))),
    ]
    for seed in range(10):
        for modality, findings in crowded:
            assert ph.render(modality, findings, np.random.default_rng(seed), image_size=64).shape == (64, 64, 3)

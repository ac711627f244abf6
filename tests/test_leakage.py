"""Train/test leakage: found by pixels and normalized questions, reported by `prepare`, refused
unless `prepare.files.allow_leakage`; the phantom benchmark never leaks."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipeline.data.leakage import (
    ALLOW_PARAM,
    LeakageError,
    check_leakage,
    find_leakage,
    image_key,
    leakage_report,
    normalize_question,
)
from pipeline.data.prepare import PrepareConfig, prepare_splits
from pipeline.params import project_config


def png(value: int, compress_level: int = 6, size: int = 8) -> bytes:
    arr = np.full((size, size, 3), value, dtype=np.uint8)
    arr[0, 0] = (255, 0, 0)
    buf = io.BytesIO()
    Image.fromarray(arr, mode="RGB").save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def row(row_id: str, image: bytes, question: str) -> dict[str, Any]:
    return {"id": row_id, "image": image, "question": question}


def test_image_key_compares_pixels_not_bytes() -> None:
    a, b = png(100, compress_level=0), png(100, compress_level=9)
    assert a != b and image_key(a) == image_key(b)
    assert image_key(png(101)) != image_key(a)
    assert image_key(png(100, size=9)) != image_key(png(100, size=8))


def test_normalize_question() -> None:
    assert normalize_question("  Is there\ta  MASS?\n") == "is there a mass?"


def test_find_leakage_counts_both_kinds_with_examples() -> None:
    seen, unseen = png(10), png(20)
    train = [row("tr0", seen, "Is there a mass?"), row("tr1", seen, "Which lobe?"), row("tr2", png(30), "Any?")]
    test = [
        row("te0", png(10, compress_level=0), "is there  a mass?"),  # same pixels and question: both kinds
        row("te1", seen, "What size is it?"),  # same image, new question: image only
        row("te2", unseen, "Is there a mass?"),  # a train question about an unseen image: neither
    ]
    leakage = find_leakage(train, test)
    assert leakage.found
    assert leakage.shared_images == 1 and leakage.test_rows_on_shared_images == 2
    assert leakage.image_examples == (("te0", "tr0"), ("te1", "tr0"))
    assert leakage.test_rows_with_train_question == 1 and leakage.question_examples == (("te0", "tr0"),)
    report = leakage_report(leakage, allowed=True)
    assert report == {
        "allowed": True,
        "image": {"shared_images": 1, "test_rows": 2,
                  "examples": [{"test": "te0", "train": "tr0"}, {"test": "te1", "train": "tr0"}]},
        "question": {"test_rows": 1, "examples": [{"test": "te0", "train": "tr0"}]},
    }
    capped = find_leakage(train, test, max_examples=1)
    assert capped.image_examples == (("te0", "tr0"),) and capped.test_rows_on_shared_images == 2
    clean = find_leakage(train, [row("te2", unseen, "Is there a mass?")])
    assert not clean.found and clean.shared_images == 0 and clean.image_examples == ()


def test_check_leakage_refuses_unless_allowed() -> None:
    leakage = find_leakage([row("tr0", png(10), "Is there a mass?")], [row("te0", png(10), "IS THERE A MASS?")])
    with pytest.raises(LeakageError) as err:
        check_leakage(leakage, allowed=False, source="files")
    msg = str(err.value)
    assert "1 test rows use one of 1 images that are also in train" in msg and "test te0 / train tr0" in msg
    assert "1 test rows ask a train row's question about the same image" in msg
    assert f"set {ALLOW_PARAM}: true" in msg
    check_leakage(leakage, allowed=True, source="files")
    check_leakage(find_leakage([row("tr0", png(10), "q")], [row("te0", png(11), "q")]), allowed=False,
                  source="files")
    with pytest.raises(LeakageError, match="bug of pipeline/data/phantoms.py"):
        check_leakage(leakage, allowed=False, source="phantom")


# ---------------------------------------------------------------------------------------------
# through `prepare`: VQA-RAD's combined file, both splits from one file with `where`


def write_png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png(value))


def vqa_rad_root(tmp_path: Path, test_image: str) -> Path:
    """One combined file: three train questions on a.png, two test questions on `test_image`."""
    root = tmp_path / "vqa_rad"
    write_png(root / "images" / "a.png", 50)
    write_png(root / "images" / "b.png", 150)
    write_png(root / "images" / "a_copy.png", 50)  # a.png's pixels under another name
    items = [
        {"qid": 1, "image_name": "a.png", "question": "Is there a mass?", "answer": "yes", "answer_type": "CLOSED",
         "phrase_type": "freeform"},
        {"qid": 2, "image_name": "a.png", "question": "Is a mass present?", "answer": "yes", "answer_type": "CLOSED",
         "phrase_type": "para"},
        {"qid": 3, "image_name": "a.png", "question": "How many masses?", "answer": 1, "answer_type": "OPEN",
         "phrase_type": "freeform"},
        {"qid": 4, "image_name": test_image, "question": "Is there  a MASS?", "answer": "no", "answer_type": "CLOSED",
         "phrase_type": "test_freeform"},
        {"qid": 5, "image_name": test_image, "question": "Which side?", "answer": "left", "answer_type": "OPEN",
         "phrase_type": "test_para"},
    ]
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(items))
    return root


def files_config(root: Path, allow_leakage: bool) -> PrepareConfig:
    def split(values: list[str]) -> dict[str, Any]:
        return {"path": "VQA_RAD Dataset Public.json", "format": None, "image_root": "images",
                "where": {"field": "phrase_type", "values": values}}

    files = {"root": str(root), "dataset": "vqa-rad", "skip_bad": False, "turns": "first",
             "allow_leakage": allow_leakage, "train": split(["freeform", "para"]),
             "test": split(["test_freeform", "test_para"]), "benchmarks": [], "report": None}
    return project_config(PrepareConfig, "prepare", source="files", files=files)


def test_prepare_splits_one_file_by_phrase_type_without_leakage(tmp_path: Path) -> None:
    splits, skipped, report = prepare_splits(files_config(vqa_rad_root(tmp_path, "b.png"), allow_leakage=False))
    assert [r["id"] for r in splits["train"]] == ["1", "2", "3"] and [r["id"] for r in splits["test"]] == ["4", "5"]
    assert splits["train"][2]["answer"] == "1" and skipped == []
    assert report["train_excluded_by_where"] == 2 and report["test_excluded_by_where"] == 3
    assert report["train_turns_left_out"] == 0
    assert report["leakage"] == {"allowed": False, "image": {"shared_images": 0, "test_rows": 0, "examples": []},
                                 "question": {"test_rows": 0, "examples": []}}


def test_prepare_refuses_leaking_splits_and_reports_them_when_allowed(tmp_path: Path) -> None:
    root = vqa_rad_root(tmp_path, "a_copy.png")  # the test questions are about train's image
    with pytest.raises(LeakageError) as err:
        prepare_splits(files_config(root, allow_leakage=False))
    msg = str(err.value)
    assert "2 test rows use one of 1 images that are also in train" in msg and "test 4 / train 1" in msg
    assert "1 test rows ask a train row's question about the same image" in msg
    assert "prepare.files.allow_leakage: true" in msg

    splits, _, report = prepare_splits(files_config(root, allow_leakage=True))
    assert len(splits["test"]) == 2
    assert report["leakage"] == {
        "allowed": True,
        "image": {"shared_images": 1, "test_rows": 2,
                  "examples": [{"test": "4", "train": "1"}, {"test": "5", "train": "1"}]},
        "question": {"test_rows": 1, "examples": [{"test": "4", "train": "1"}]},
    }
    json.dumps(report)  # reports/prepare.json is JSON


# ---------------------------------------------------------------------------------------------
# the phantom benchmark


def phantom_config(**phantom: int) -> PrepareConfig:
    cfg = project_config(PrepareConfig, "prepare", source="phantom")
    return cfg.replace(phantom=cfg.phantom.replace(**phantom)) if phantom else cfg


def test_phantom_splits_never_leak() -> None:
    # the project's seed, prior and image size; fewer rows (every row is drawn from its own stream)
    _, _, report = prepare_splits(phantom_config(n_train=300, n_test=120))
    assert report["leakage"]["question"]["test_rows"] == 0
    assert report["leakage"]["image"] == {"shared_images": 0, "test_rows": 0, "examples": []}


@pytest.mark.slow
def test_default_phantom_splits_never_leak() -> None:
    """The exact default `prepare` (params.yaml): no test question about a train image."""
    _, _, report = prepare_splits(phantom_config())
    assert report["leakage"]["question"]["test_rows"] == 0
    assert report["leakage"]["image"]["test_rows"] == 0

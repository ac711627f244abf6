"""The R2Gen-layout reader for report-generation datasets (pipeline.data.reports), on tiny files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.data.reports import ReportDataError, read_report_annotation
from pipeline.errors import DataError, InputNotFoundError


def iu_entry(case: str, split: str, report: str = "The lungs are clear. No effusion.") -> dict:
    # As in R2Gen's IU-Xray annotation.json: a frontal and a lateral view per case.
    return {"id": case, "report": report, "image_path": [f"{case}/0.png", f"{case}/1.png"], "split": split}


def write(tmp_path: Path, data, images: bool = True) -> tuple[Path, Path]:
    annotation = tmp_path / "annotation.json"
    annotation.write_text(json.dumps(data) if not isinstance(data, str) else data, encoding="utf-8")
    root = tmp_path / "images"
    root.mkdir(exist_ok=True)
    if images and isinstance(data, dict):
        for entries in data.values():
            for entry in entries:
                paths = entry.get("image_path") if isinstance(entry, dict) else None
                for rel in paths if isinstance(paths, list) else []:
                    (root / rel).parent.mkdir(parents=True, exist_ok=True)
                    (root / rel).write_bytes(b"\x89PNG")
    return annotation, root


@pytest.fixture
def iu(tmp_path):
    data = {
        "train": [iu_entry("CXR2384_IM-0942", "train"), iu_entry("CXR2926_IM-1328", "train")],
        "val": [iu_entry("CXR1451_IM-0291", "val")],
        "test": [iu_entry("CXR3030_IM-1405", "test", "Normal cardiomediastinal silhouette."),
                 iu_entry("CXR38_IM-1911", "test")],
    }  # fmt: skip
    return write(tmp_path, data)


def test_reads_every_split_in_order(iu):
    annotation, root = iu
    rows = read_report_annotation(annotation, root, images_per_case=2)
    assert [(r["split"], r["id"]) for r in rows] == [
        ("train", "CXR2384_IM-0942"), ("train", "CXR2926_IM-1328"), ("val", "CXR1451_IM-0291"),
        ("test", "CXR3030_IM-1405"), ("test", "CXR38_IM-1911"),
    ]  # fmt: skip
    test = rows[3]
    assert test["report"] == "Normal cardiomediastinal silhouette."
    assert test["image_paths"] == [str(root / "CXR3030_IM-1405/0.png"), str(root / "CXR3030_IM-1405/1.png")]
    assert all(Path(p).is_file() for r in rows for p in r["image_paths"])


def test_reads_only_the_splits_asked_for(iu):
    annotation, root = iu
    rows = read_report_annotation(str(annotation), str(root), splits=("test",))
    assert [r["id"] for r in rows] == ["CXR3030_IM-1405", "CXR38_IM-1911"]
    rows = read_report_annotation(annotation, root, splits=("val", "train"))
    assert [r["split"] for r in rows] == ["val", "train", "train"]
    with pytest.raises(ValueError, match="splits"):
        read_report_annotation(annotation, root, splits=("dev",))


def test_mimic_layout_one_image_and_extra_fields(tmp_path):
    entry = {
        "id": "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014",
        "study_id": 50414267,
        "subject_id": 10000032,
        "report": "impression: No acute cardiopulmonary process.",
        "image_path": ["p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg"],
        "split": "test",
    }
    annotation, root = write(tmp_path, {"train": [], "val": [], "test": [entry]})
    (row,) = read_report_annotation(annotation, root, splits=("test",), images_per_case=1)
    assert row == {
        "id": entry["id"],
        "split": "test",
        "image_paths": [str(root / entry["image_path"][0])],
        "report": entry["report"],
    }


def test_missing_image_names_the_file(iu):
    annotation, root = iu
    (root / "CXR38_IM-1911/1.png").unlink()
    with pytest.raises(InputNotFoundError) as info:
        read_report_annotation(annotation, root)
    message = str(info.value)
    assert str(root / "CXR38_IM-1911/1.png") in message
    assert "'CXR38_IM-1911'" in message and "1 image file(s) not found" in message
    # Without the check, the rows still come back (e.g. to list a dataset before unpacking it).
    assert len(read_report_annotation(annotation, root, check_images=False)) == 5


def test_missing_files_and_folders(tmp_path, iu):
    annotation, root = iu
    with pytest.raises(InputNotFoundError, match="annotation.json: file not found"):
        read_report_annotation(tmp_path / "nowhere" / "annotation.json", root)
    with pytest.raises(InputNotFoundError, match="image root is not a directory"):
        read_report_annotation(annotation, tmp_path / "no-images")
    with pytest.raises(ReportDataError, match="is a directory"):
        read_report_annotation(tmp_path, root)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "the file is empty"),
        ('{"train": [', "line 1, column 12: invalid JSON"),
        ("[]", "got a JSON list"),
        ('{"train": [], "val": []}', r"no \['test'\] list \(the file has \['train', 'val'\]\)"),
        ('{"train": {}, "val": [], "test": []}', '"train": expected a list of entries, got dict'),
        ('{"train": [], "val": [], "test": []}', "lists are empty"),
    ],
)
def test_malformed_files(tmp_path, content, message):
    annotation, root = write(tmp_path, content)
    with pytest.raises(ReportDataError, match=message) as info:
        read_report_annotation(annotation, root)
    assert isinstance(info.value, DataError)
    assert str(annotation) in str(info.value)


def test_bad_entries_are_all_named(tmp_path):
    good = iu_entry("CXR1_IM-1", "test")
    data = {
        "train": [iu_entry("CXR1_IM-1", "train"), {"id": "CXR2_IM-2", "report": " ", "image_path": [], "split": "train"}],
        "val": ["not an object", iu_entry("CXR3_IM-3", "train")],
        "test": [good, {"report": "No effusion.", "image_path": ["a/0.png"]},
                 {"id": "CXR4_IM-4", "report": "No effusion.", "image_path": "CXR4_IM-4/0.png"}],
    }  # fmt: skip
    annotation, root = write(tmp_path, data)
    with pytest.raises(ReportDataError) as info:
        read_report_annotation(annotation, root)
    message = str(info.value)
    assert "6 bad entries" in message
    assert "train[1] (id 'CXR2_IM-2'): \"report\" must be non-empty text" in message
    assert '"image_path" must be a non-empty list of paths, got []' in message
    assert "val[0]: expected an object, got str" in message
    assert "val[1] (id 'CXR3_IM-3'): \"split\" is 'train' but the entry is in the 'val' list" in message
    # The same case in two splits would leak test reports into training.
    assert "test[0]: duplicate id 'CXR1_IM-1' (also at train[0])" in message
    assert 'test[1] (id None): "id" must be a non-empty string' in message
    assert "(and 1 more)" in message and "CXR4_IM-4" not in message  # only the first five are shown


def test_images_per_case(iu, tmp_path):
    annotation, root = iu
    with pytest.raises(ReportDataError, match=r"train\[0\] \(id 'CXR2384_IM-0942'\): 2 images, expected 1"):
        read_report_annotation(annotation, root, images_per_case=1)
    with pytest.raises(ValueError, match="images_per_case"):
        read_report_annotation(annotation, root, images_per_case=0)

"""Reading report-generation datasets (IU-Xray, MIMIC-CXR) in R2Gen's annotation layout.

R2Gen (cuhksz-nlp/R2Gen) ships both datasets as one `annotation.json` beside an image folder,
and its successors (R2GenGPT, MMedPO, MMed-RAG) reuse those files::

    {"train": [{"id": "CXR2384_IM-0942",
                "report": "The heart size and pulmonary vascularity appear within normal limits. ...",
                "image_path": ["CXR2384_IM-0942/0.png", "CXR2384_IM-0942/1.png"],
                "split": "train"}, ...],
     "val": [...], "test": [...]}

IU-Xray cases have two images (a frontal and a lateral view, ``<id>/0.png`` and ``<id>/1.png``;
R2Gen feeds both, in file order); MIMIC-CXR entries have one image
(``p10/p10000032/s50414267/<dicom_id>.jpg``) and also carry `study_id` and `subject_id`, which
are not read. Image paths are relative to the image folder (R2Gen's `--image_dir`).

`read_report_annotation` returns one `ReportRow` per entry, in file order within each split,
with the image paths resolved against the image root. It checks what a later stage would
otherwise trip over, and names the file and the entry in every message: a missing or unreadable
file, a missing split, an entry without an id, a report or images, a duplicate id (within or
across splits: a case in two splits leaks test data into training), an entry whose `split`
disagrees with the list it is in, and image files that do not exist (all of them are listed, up
to `MAX_LISTED`). Errors are `pipeline.errors` expected failures: `ReportDataError` (a
`DataError`) for a bad file, `InputNotFoundError` for a missing file, image root or image.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict

from pipeline.errors import DataError, InputNotFoundError

SPLITS: tuple[str, ...] = ("train", "val", "test")
MAX_LISTED = 5  # entries named per problem in an error message

_LAYOUT = (
    'expected R2Gen\'s layout {"train": [...], "val": [...], "test": [...]}, each entry an object '
    'with "id", "report", "image_path" (a list of paths) and "split" (see docs/data-formats.md)'
)


class ReportDataError(DataError):
    """An annotation file cannot be read as a report-generation dataset."""


class ReportRow(TypedDict):
    """One case: its id, split, image files (resolved, in file order) and reference report."""

    id: str
    split: str
    image_paths: list[str]
    report: str


def _lines(items: Sequence[str]) -> str:
    """The first `MAX_LISTED` items, one per indented line, and how many more there are."""
    shown = [f"\n  {item}" for item in items[:MAX_LISTED]]
    if len(items) > MAX_LISTED:
        shown.append(f"\n  (and {len(items) - MAX_LISTED} more)")
    return "".join(shown)


def _load(annotation: Path) -> dict[str, Any]:
    if annotation.is_dir():
        raise ReportDataError(f"{annotation}: is a directory; point at the annotation.json file inside it")
    if not annotation.is_file():
        raise InputNotFoundError(
            f"{annotation}: file not found; download the dataset's annotation.json (R2Gen's layout, "
            "see docs/data-formats.md) and check the path"
        )
    try:
        text = annotation.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ReportDataError(f"{annotation}: not UTF-8 text ({e}); re-save the file as UTF-8") from e
    if not text.strip():
        raise ReportDataError(f"{annotation}: the file is empty; {_LAYOUT}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ReportDataError(
            f"{annotation}: line {e.lineno}, column {e.colno}: invalid JSON ({e.msg}); fix the file "
            "(is it truncated?)"
        ) from e
    if not isinstance(data, dict):
        raise ReportDataError(f"{annotation}: {_LAYOUT}; got a JSON {type(data).__name__}")
    return data


def _entry_problems(entry: Any, split: str) -> list[str]:
    if not isinstance(entry, dict):
        return [f"expected an object, got {type(entry).__name__}"]
    problems = []
    entry_id = entry.get("id")
    if not isinstance(entry_id, str) or not entry_id.strip():
        problems.append(f'"id" must be a non-empty string, got {entry_id!r}')
    report = entry.get("report")
    if not isinstance(report, str) or not report.strip():
        problems.append(f'"report" must be non-empty text, got {report!r}')
    paths = entry.get("image_path")
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p.strip() for p in paths):
        problems.append(f'"image_path" must be a non-empty list of paths, got {paths!r}')
    if "split" in entry and entry["split"] != split:
        problems.append(f'"split" is {entry["split"]!r} but the entry is in the {split!r} list')
    return problems


def read_report_annotation(
    annotation: str | Path,
    image_root: str | Path,
    splits: Sequence[str] = SPLITS,
    *,
    images_per_case: int | None = None,
    check_images: bool = True,
) -> list[ReportRow]:
    """The cases of `splits` in an R2Gen-layout `annotation` file, images resolved against `image_root`.

    Rows come split by split in the order of `splits`, entries in file order. `images_per_case`
    (e.g. 2 for IU-Xray's frontal + lateral pairs) makes any other count an error. With
    `check_images` (the default) every image file must exist; `InputNotFoundError` lists the
    missing ones. Raises `ReportDataError` for a malformed file (every bad entry is named).
    """
    annotation = Path(annotation)
    root = Path(image_root)
    if not splits:
        raise ValueError(f"splits must name at least one of {SPLITS}")
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or len(set(splits)) != len(splits):
        raise ValueError(f"splits must be distinct names from {SPLITS}, got {list(splits)}")
    if images_per_case is not None and images_per_case < 1:
        raise ValueError(f"images_per_case must be at least 1 (or None), got {images_per_case}")
    data = _load(annotation)
    missing_splits = [s for s in splits if s not in data]
    if missing_splits:
        raise ReportDataError(
            f"{annotation}: no {missing_splits} list (the file has {sorted(data)}); {_LAYOUT}"
        )
    if check_images and not root.is_dir():
        raise InputNotFoundError(
            f"{root}: image root is not a directory; give the folder the entries' image_path values "
            f"are relative to (R2Gen's --image_dir, e.g. data/iu_xray/images) for {annotation}"
        )

    rows: list[ReportRow] = []
    problems: list[str] = []
    seen: dict[str, str] = {}  # id -> where it first occurs
    for split in splits:
        entries = data[split]
        if not isinstance(entries, list):
            problems.append(f'"{split}": expected a list of entries, got {type(entries).__name__}')
            continue
        for index, entry in enumerate(entries):
            where = f"{split}[{index}]"
            entry_problems = _entry_problems(entry, split)
            if entry_problems:
                label = f"{where} (id {entry.get('id')!r})" if isinstance(entry, dict) else where
                problems.append(f"{label}: {', '.join(entry_problems)}")
                continue
            entry_id = entry["id"]
            if entry_id in seen:
                problems.append(f"{where}: duplicate id {entry_id!r} (also at {seen[entry_id]})")
                continue
            seen[entry_id] = where
            paths = entry["image_path"]
            if images_per_case is not None and len(paths) != images_per_case:
                problems.append(
                    f"{where} (id {entry_id!r}): {len(paths)} images, expected {images_per_case}: {paths}"
                )
                continue
            rows.append(
                ReportRow(
                    id=entry_id,
                    split=split,
                    image_paths=[str(root / p) for p in paths],
                    report=entry["report"],
                )
            )
    if problems:
        what = "entry" if len(problems) == 1 else "entries"
        raise ReportDataError(f"{annotation}: {len(problems)} bad {what}; {_LAYOUT}:{_lines(problems)}")
    if not rows:
        raise ReportDataError(f"{annotation}: the {list(splits)} lists are empty; {_LAYOUT}")
    if check_images:
        missing = [
            f"{path} ({row['split']} id {row['id']!r})"
            for row in rows
            for path in row["image_paths"]
            if not Path(path).is_file()
        ]
        if missing:
            raise InputNotFoundError(
                f"{annotation}: {len(missing)} image file(s) not found under the image root {root}; "
                "check the image root (R2Gen's --image_dir) and that the images have been unpacked "
                f"there:{_lines(missing)}"
            )
    return rows

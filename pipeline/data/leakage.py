"""Train/test leakage: test entries whose image, or whose (question, image) pair, is also in train.

A test question asked about an image the model was trained on measures memory as much as
understanding, and one asked in the same words about the same image measures memory only. Both
are found after `prepare` has built the two splits, from the rows alone (pure functions):

* **image**: the same image in both splits. Images are compared by a SHA-256 of their decoded
  pixels (width, height and the 8-bit RGB values), not of their files: one picture stored twice
  (two file names, PNG and DICOM copies with equal pixels, PNG files written by different
  encoders) is one image. Near-duplicates (a re-compressed JPEG, a resized copy) are not found.
* **question**: the same question about the same image in both splits, questions compared after
  lower-casing and collapsing whitespace ("Is there  a mass?" = "is there a mass?").

`prepare` writes `leakage_report` into reports/prepare.json and refuses leaking splits
(`check_leakage`) unless `prepare.files.allow_leakage` is true (docs/data-formats.md#traintest-leakage);
the phantom benchmark never leaks (its splits come from separate random streams).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.data.images import decode_image
from pipeline.errors import DataError

MAX_EXAMPLES = 10  # example id pairs per kind in the report and the error message
ALLOW_PARAM = "prepare.files.allow_leakage"


class LeakageError(DataError):
    """The test split shares images or questions with the train split and that was not allowed."""


@dataclass(frozen=True)
class Leakage:
    """What the test split shares with the train split. Examples are (test id, train id) pairs."""

    shared_images: int  # distinct images found in both splits
    test_rows_on_shared_images: int  # test entries whose image is also a train image
    image_examples: tuple[tuple[str, str], ...]
    test_rows_with_train_question: int  # test entries asking a train entry's question about its image
    question_examples: tuple[tuple[str, str], ...]

    @property
    def found(self) -> bool:
        return self.test_rows_on_shared_images > 0 or self.test_rows_with_train_question > 0


def image_key(image: bytes) -> str:
    """SHA-256 of an encoded image's decoded pixels (size and 8-bit RGB values)."""
    pil = decode_image(image)
    digest = hashlib.sha256(f"{pil.width}x{pil.height}:".encode())
    digest.update(pil.tobytes())
    return digest.hexdigest()


def normalize_question(question: str) -> str:
    """The question as leakage compares it: lower case, whitespace runs collapsed to one space."""
    return " ".join(question.lower().split())


def find_leakage(train: Sequence[Mapping[str, Any]], test: Sequence[Mapping[str, Any]],
                 max_examples: int = MAX_EXAMPLES) -> Leakage:
    """Compare two splits of VQA rows (`id`, `image` bytes, `question`); see the module docstring."""
    keys: dict[bytes, str] = {}  # the same bytes decode to the same pixels: decode each once

    def key(image: bytes) -> str:
        digest = hashlib.sha256(image).digest()
        if digest not in keys:
            keys[digest] = image_key(image)
        return keys[digest]

    train_image: dict[str, str] = {}  # pixel key -> first train id with that image
    train_pair: dict[tuple[str, str], str] = {}  # (pixel key, question) -> first train id
    for row in train:
        k = key(row["image"])
        train_image.setdefault(k, row["id"])
        train_pair.setdefault((k, normalize_question(row["question"])), row["id"])

    shared: set[str] = set()
    on_shared, same_question = 0, 0
    image_examples: list[tuple[str, str]] = []
    question_examples: list[tuple[str, str]] = []
    for row in test:
        k = key(row["image"])
        if k in train_image:
            shared.add(k)
            on_shared += 1
            if len(image_examples) < max_examples:
                image_examples.append((row["id"], train_image[k]))
        pair = (k, normalize_question(row["question"]))
        if pair in train_pair:
            same_question += 1
            if len(question_examples) < max_examples:
                question_examples.append((row["id"], train_pair[pair]))
    return Leakage(shared_images=len(shared), test_rows_on_shared_images=on_shared,
                   image_examples=tuple(image_examples), test_rows_with_train_question=same_question,
                   question_examples=tuple(question_examples))


def leakage_report(leakage: Leakage, allowed: bool) -> dict[str, Any]:
    """The `leakage` entry of reports/prepare.json."""
    return {
        "allowed": allowed,
        "image": {
            "shared_images": leakage.shared_images,
            "test_rows": leakage.test_rows_on_shared_images,
            "examples": [{"test": t, "train": r} for t, r in leakage.image_examples],
        },
        "question": {
            "test_rows": leakage.test_rows_with_train_question,
            "examples": [{"test": t, "train": r} for t, r in leakage.question_examples],
        },
    }


def check_leakage(leakage: Leakage, allowed: bool, source: str) -> None:
    """Raise `LeakageError` naming the counts and examples when the splits leak and `allowed` is false.

    `source` is prepare's: the phantom benchmark draws each split from its own random stream, so
    a phantom leak is a bug of the generator, not something to allow.
    """
    if not leakage.found or allowed:
        return
    parts = []
    if leakage.test_rows_on_shared_images:
        shown = ", ".join(f"test {t} / train {r}" for t, r in leakage.image_examples)
        parts.append(f"{leakage.test_rows_on_shared_images} test rows use one of {leakage.shared_images} images "
                     f"that are also in train (same pixels), e.g. {shown}")
    if leakage.test_rows_with_train_question:
        shown = ", ".join(f"test {t} / train {r}" for t, r in leakage.question_examples)
        parts.append(f"{leakage.test_rows_with_train_question} test rows ask a train row's question about the "
                     f"same image (case and spacing ignored), e.g. {shown}")
    if source == "phantom":
        raise LeakageError("the phantom test split leaks into train: " + "; ".join(parts) + ". Each split is drawn "
                           "from its own random stream, so this is a bug of pipeline/data/phantoms.py: report it")
    raise LeakageError(
        "the test split leaks into train: " + "; ".join(parts) + ". Scores on such rows measure memory. Split "
        f"the data by image (and remove the repeated questions), or, if the split is a published one you must "
        f"keep (VQA-RAD's reuses images), set {ALLOW_PARAM}: true; the findings are then recorded under "
        "`leakage` in reports/prepare.json"
    )

"""The embedded report-generation benchmark: phantom images with a templated reference report.

Each row is one phantom (`pipeline.data.phantoms.render`) drawn from findings sampled first, and a
short report written from those findings: the study, the lesions (how many, small or large, and
on which side where the modality has one) or their absence, and the organ size. For example::

    Axial CT of the abdomen. A large lesion in the liver. No other abnormality.

The prompt is fixed (`REPORT_PROMPT`). The benchmark is zero-shot: no model of the pipeline is
trained on reports (the SFT data is the VQA train split), so its scores are expected to be low;
it exists so that report generation and its metrics (BLEU, ROUGE-L, METEOR) run offline and are
measured on every run (docs/benchmark.md § Report generation).

The rows come from a random stream of their own, keyed by (seed, "report"), so the VQA splits are
byte-for-byte the same whatever `n_report` is.
"""

from __future__ import annotations

import numpy as np

from pipeline.data.phantoms import (
    _ANY_RADIUS,
    _LARGE,
    _MAX_PRESENT,
    _SMALL,
    DATASET,
    MODALITIES,
    SIDES,
    Findings,
    _split_key,
    encode_png,
    render,
)

REPORT_PROMPT = "Describe the findings of this image."
REPORT_SPLIT = "test"
# R2Gen's IU-Xray cleaner (pipeline.report_metrics): the phantom reports are short single-line
# sentences, which both cleaners treat alike; IU-Xray's is the one for one-line reports.
REPORT_CLEANING = "iu_xray"
# Share of images without a lesion: enough normal studies that "No ..." is a report to get right.
_NORMAL_P = 0.3

_STUDY = {
    "chest_xray": "Frontal chest X-ray.",
    "ct": "Axial CT of the abdomen.",
    "brain_mri": "Axial T1-weighted MRI of the brain.",
    "histology": "H&E stained histology section.",
}
_LESION = {"chest_xray": "nodule", "ct": "lesion", "brain_mri": "mass", "histology": "mitotic figure"}
_NONE = {
    "chest_xray": "No lung nodule.",
    "ct": "No liver lesion.",
    "brain_mri": "No intracranial mass.",
    "histology": "No mitotic figure is visible.",
}
_ORGAN = {
    "chest_xray": ("The heart is enlarged.", "The heart size is normal."),
    "brain_mri": ("The ventricles are enlarged.", "The ventricles are normal in size."),
    "histology": ("The nuclei are enlarged.", "The nuclei are normal in size."),
}
_COUNT_WORDS = {1: "A", 2: "Two", 3: "Three"}


def report_findings(modality: str, rng: np.random.Generator) -> tuple[Findings, str | None]:
    """Findings for one report image of `modality` and the size class of its lesions ("small",
    "large"; None when the report does not state one: no lesion, or histology's mitotic figures)."""
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; known: {list(MODALITIES)}")
    enlarged = bool(rng.random() < 0.5)
    if rng.random() < _NORMAL_P:
        return Findings((), None, enlarged, avoid_organ=True), None
    count = int(rng.integers(1, _MAX_PRESENT[modality] + 1))
    # CT's lesions lie in the liver, which is always on the patient's right: no side to report.
    # Several nodules do not fit in one lung field: only a single nodule has a side.
    sided = modality == "brain_mri" or (modality == "chest_xray" and count == 1)
    side = SIDES[int(rng.integers(2))] if sided else None
    if modality in ("chest_xray", "histology"):
        # A large nodule does not fit in one lung field, and mitotic figures come in one size: the
        # VQA benchmark asks no size question of either, and the report states none.
        radii = tuple(float(rng.uniform(*_ANY_RADIUS[modality])) for _ in range(count))
        return Findings(radii, side, enlarged), None
    # Several large lesions do not fit in one organ; a single lesion may be either size.
    size = "large" if count == 1 and rng.random() < 0.5 else "small"
    radii = tuple(float(rng.uniform(*(_LARGE if size == "large" else _SMALL))) for _ in range(count))
    return Findings(radii, side, enlarged), size


def report_text(modality: str, findings: Findings, size: str | None) -> str:
    """The reference report of an image of `modality` showing `findings` (see the module docstring)."""
    if modality not in _STUDY:
        raise ValueError(f"unknown modality {modality!r}; known: {list(MODALITIES)}")
    sentences = [_STUDY[modality]]
    count = len(findings.radii)
    if count == 0:
        sentences.append(_NONE[modality])
    else:
        noun = _LESION[modality] + ("s" if count > 1 else "")
        words = [_COUNT_WORDS[count]] + ([size] if size is not None else []) + [noun]
        if modality == "chest_xray":
            where = " in the lungs" if findings.side is None else f" in the {findings.side} lung"
        elif modality == "brain_mri":
            where = f" in the {findings.side} hemisphere"
        elif modality == "ct":
            where = " in the liver"
        else:
            where = " is visible" if count == 1 else " are visible"
        sentences.append(" ".join(words) + where + ".")
    if modality in _ORGAN:
        sentences.append(_ORGAN[modality][0 if findings.enlarged else 1])
    if count == 0 and not (modality in _ORGAN and findings.enlarged):
        sentences.append("No other abnormality.")
    return " ".join(sentences)


def generate_reports(n: int, seed: int, image_size: int) -> list[dict]:
    """`n` REPORT_SCHEMA rows of the phantom report benchmark (split `test`), reproducible from
    `seed`: the same arguments give byte-identical rows. Modalities are uniform."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    key = _split_key("report")  # not a VQA split's key: the VQA streams are never touched
    plan = np.random.default_rng([seed, key, 0]).integers(len(MODALITIES), size=n)
    rows = []
    for i, m in enumerate(plan):
        modality = MODALITIES[int(m)]
        # One stream per row, so a row does not depend on how many rows precede it.
        rng = np.random.default_rng([seed, key, 1, i])
        findings, size = report_findings(modality, rng)
        rows.append({
            "id": f"{DATASET}-report-{i:05d}",
            "dataset": DATASET,
            "split": REPORT_SPLIT,
            "image": encode_png(render(modality, findings, rng, image_size)),
            "prompt": REPORT_PROMPT,
            "report": report_text(modality, findings, size),
            "modality": modality,
            "cleaning": REPORT_CLEANING,
        })
    return rows

"""The `prepare` stage's library: the embedded phantom benchmark, or the user's VQA files, as
VQA_SCHEMA train and test splits.

With `source: files`, the files are named relative to `files.root`, a folder that dvc.yaml lists
as a dependency of `prepare` (`${prepare.files.root}`): editing a question file or replacing an
image under it makes `dvc status` report `prepare` as changed. A path that leaves the root is
refused, because DVC would not see it change.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.errors import InputNotFoundError
from pipeline.params import Config

SPLITS = ("train", "test")


class PhantomConfig(Config):
    """The embedded benchmark (docs/benchmark.md)."""

    n_train: int = Field(ge=1, description="rows of the train split")
    n_test: int = Field(ge=1, description="rows of the test split")
    prior: float = Field(ge=0.0, le=1.0, description="train-split language prior: the majority answer's share")
    image_size: int = Field(ge=16, description="side of the square phantom images, in pixels")
    n_report: int = Field(ge=0, description="rows of the phantom report-generation benchmark (zero-shot, never "
                          "trained on; data/prepared/reports.parquet); 0 = no report benchmark")


def _inside_root(value: str | None) -> str | None:
    if value is None:
        return None
    path = PurePosixPath(value)
    if path.is_absolute() or ".." in path.parts or not value.strip():
        raise ValueError(
            f"must be a path relative to files.root without '..', got {value!r}: DVC watches files.root "
            "for changes, so every input file must lie under it (set files.root to the folder that holds them)"
        )
    return value


class RowFilterConfig(Config):
    """Keep only the rows of a question file whose `field` has one of `values` (docs/data-formats.md)."""

    field: str = Field(min_length=1, description="the field of the question file to select on (VQA-RAD: phrase_type)")
    values: list[str] = Field(min_length=1, description="the values kept, compared exactly as text (e.g. "
                              "[test_freeform, test_para])")


class FileSplitConfig(Config):
    """One split of the user's data."""

    path: str = Field(description="the question file (.json, .jsonl or .parquet), relative to files.root")
    format: Literal["json", "jsonl", "parquet"] | None = Field(description="null: from the file's suffix")
    image_root: str | None = Field(description="folder image paths are resolved against, relative to files.root; "
                                   "null: the folder of the question file")
    where: RowFilterConfig | None = Field(description="null: every row of the file; else only the rows it selects, "
                                          "so train and test can share one file (VQA-RAD's combined JSON)")

    _check_path = field_validator("path", "image_root")(_inside_root)


class BenchmarkFilesConfig(FileSplitConfig):
    """One more VQA benchmark, from another dataset, evaluated beside the test split (HSCR Table 1:
    VQA-RAD, SLAKE and PathVQA zero-shot). Never trained on; its rows join the test split under
    their own `dataset`, their ids prefixed `<dataset>/`."""

    dataset: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$",
                         description="the benchmark's name: its rows' `dataset`, its key under `by_dataset` in the "
                         "metrics and the prefix of its ids")


class ReportFilesConfig(Config):
    """A report-generation benchmark of the user's, in R2Gen's `annotation.json` layout (IU-Xray,
    MIMIC-CXR; pipeline.data.reports). Evaluated only, never trained on."""

    path: str = Field(description="the R2Gen-layout annotation.json, relative to files.root")
    image_root: str = Field(description="folder the entries' image_path values are relative to (R2Gen's "
                            "--image_dir), relative to files.root")
    split: Literal["train", "val", "test"] = Field(description="the list of the annotation file evaluated")
    dataset: str = Field(min_length=1, description="the benchmark's name: its rows' `dataset` and its key under "
                         "<model>_report_generation in the metrics")
    modality: str = Field(min_length=1, description="modality recorded in every row (chest_xray for IU-Xray and "
                          "MIMIC-CXR)")
    cleaning: Literal["iu_xray", "mimic_cxr"] = Field(description="R2Gen's text cleaner the metrics apply to "
                                                      "predictions and references (pipeline.report_metrics)")

    _check_path = field_validator("path", "image_root")(_inside_root)


class FilesConfig(Config):
    """The user's own VQA files (docs/data-formats.md)."""

    root: str = Field(min_length=1, description="folder holding every input file; a dep of `prepare` in dvc.yaml")
    dataset: str = Field(min_length=1, description="dataset name recorded in every row (vqa-rad, slake, ...)")
    skip_bad: bool = Field(description="leave out unusable rows (each listed in the skipped-rows report) instead of failing")
    turns: Literal["first", "all"] = Field(description="multi-turn conversations: first: the first question of each; "
                                           "all: one entry per question, the earlier turns as its context")
    allow_leakage: bool = Field(description="accept a test split that shares images or (question, image) pairs "
                                "with train (found either way, reported in reports/prepare.json)")
    train: FileSplitConfig = Field(description="the training split")
    test: FileSplitConfig = Field(description="the test split")
    benchmarks: list[BenchmarkFilesConfig] = Field(
        strict=False, description="more VQA benchmarks from other datasets, evaluated beside the test split and "
        "reported per dataset; [] = none")
    report: ReportFilesConfig | None = Field(description="a report-generation benchmark evaluated beside the VQA "
                                             "test split; null = none")


    @model_validator(mode="after")
    def _distinct_benchmarks(self) -> FilesConfig:
        names = [self.dataset] + [b.dataset for b in self.benchmarks]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"prepare.files: dataset name(s) {twice} used twice; every benchmark needs its own name "
                             "(files.dataset is the train and test splits')")
        return self


class PrepareConfig(Config):
    """The `prepare:` section."""

    source: Literal["phantom", "files"] = Field(description="phantom: the embedded benchmark; files: your own VQA files")
    seed: int = Field(ge=0, description="seeds the phantom generator")
    phantom: PhantomConfig = Field(description="settings of source: phantom")
    files: FilesConfig = Field(description="settings of source: files")


def split_summary(rows: list[dict]) -> dict[str, Any]:
    summary = {
        "rows": len(rows),
        "answer_type": dict(Counter(r["answer_type"] for r in rows)),
        "modality": dict(Counter(r["modality"] for r in rows)),
        "question_type": dict(Counter(r["question_type"] for r in rows)),
    }
    datasets = Counter(r["dataset"] for r in rows)
    if len(datasets) > 1:  # only then: a one-dataset split keeps exactly its keys
        summary["dataset"] = dict(datasets)
    return summary


def split_lesions(rows: list[dict]) -> list[dict]:
    """Take each row's optional `lesion_mask` (PNG bytes or None) out of it, and return the
    LESION_SCHEMA rows of those that have one (MMedPO's visual dispreference noises them)."""
    lesions = []
    for row in rows:
        mask = row.pop("lesion_mask", None)
        source = row.pop("lesion_source", "phantom")
        if mask is not None:
            lesions.append({"id": row["id"], "mask": mask, "source": source})
    return lesions


def report_rows(cfg: PrepareConfig) -> list[dict]:
    """The REPORT_SCHEMA rows of the report-generation benchmark: the phantom's (`phantom.n_report`
    rows; none for 0) or the user's annotation file (`files.report`; none for null). A case of
    several images keeps its first (IU-Xray's frontal view): the models take one image per prompt."""
    if cfg.source == "phantom":
        from pipeline.data.phantom_reports import generate_reports

        return generate_reports(cfg.phantom.n_report, cfg.seed, cfg.phantom.image_size)
    spec = cfg.files.report
    if spec is None:
        return []
    from pipeline.data.images import encode_png, load_image
    from pipeline.data.phantom_reports import REPORT_PROMPT
    from pipeline.data.reports import read_report_annotation

    root = Path(cfg.files.root)
    cases = read_report_annotation(root / spec.path, root / spec.image_root, [spec.split])
    return [{"id": case["id"], "dataset": spec.dataset, "split": case["split"],
             "image": encode_png(load_image(case["image_paths"][0])), "prompt": REPORT_PROMPT,
             "report": case["report"], "modality": spec.modality, "cleaning": spec.cleaning}
            for case in cases]


def prepare_splits(cfg: PrepareConfig) -> tuple[dict[str, list[dict]], list[dict], dict[str, Any]]:
    """The train and test rows, every skipped row (source: files with skip_bad) and the report.
    `splits["reports"]` holds the report-generation benchmark's rows (`report_rows`).

    Train rows that carry a lesion annotation (the phantom's drawn lesions; a `lesion_mask` or
    `lesion_boxes` field in your files) keep it in `splits["lesions"]` (LESION_SCHEMA rows), not
    in the VQA rows, so the train split's bytes do not depend on it.

    The report's `leakage` says which test rows share an image, or a question about the same
    image, with train (`pipeline.data.leakage`); such splits are a `LeakageError` unless
    `files.allow_leakage` (source: files; the phantom benchmark never leaks, and a leak would be
    its bug).
    """
    from pipeline.data.leakage import check_leakage, find_leakage, leakage_report

    report: dict[str, Any] = {"source": cfg.source}
    skipped: list[dict] = []
    if cfg.source == "phantom":
        from pipeline.data.phantoms import generate_dataset

        ph = cfg.phantom
        train, test = generate_dataset(n_train=ph.n_train, n_test=ph.n_test, seed=cfg.seed, prior=ph.prior,
                                       image_size=ph.image_size, lesion_masks=True)
        splits = {"train": train, "test": test}
    else:
        from pipeline.data.ingest import RowFilter, ingest

        files = cfg.files
        root = Path(files.root)
        if not root.is_dir():
            raise InputNotFoundError(f"prepare.files.root: folder {root} not found; create it and put the data there")

        def read(spec: FileSplitConfig, split: str, dataset: str):
            where = None if spec.where is None else RowFilter(spec.where.field, tuple(spec.where.values))
            return ingest(
                root / spec.path, fmt=spec.format,
                image_root=root / spec.image_root if spec.image_root is not None else None,
                split=split, dataset=dataset, skip_bad=files.skip_bad, turns=files.turns, where=where,
            )

        splits = {}
        for split in SPLITS:
            result = read(getattr(files, split), split, files.dataset)
            skipped.extend({"split": split, **row} for row in result.skipped)
            report[f"{split}_skipped"] = len(result.skipped)
            report[f"{split}_excluded_by_where"] = result.excluded
            report[f"{split}_turns_left_out"] = result.turns_left_out
            splits[split] = result.rows
        for bench in files.benchmarks:
            result = read(bench, "test", bench.dataset)
            skipped.extend({"split": f"test:{bench.dataset}", **row} for row in result.skipped)
            report.setdefault("benchmarks", {})[bench.dataset] = {
                "rows": len(result.rows), "skipped": len(result.skipped), "excluded_by_where": result.excluded,
                "turns_left_out": result.turns_left_out}
            # Datasets number their questions alike (VQA-RAD's qid 1, SLAKE's qid 1): the prefix keeps
            # every id of the combined test split unique.
            splits["test"].extend({**row, "id": f"{bench.dataset}/{row['id']}"} for row in result.rows)
    leakage = find_leakage(splits["train"], splits["test"])
    allowed = cfg.source == "files" and cfg.files.allow_leakage
    report["leakage"] = leakage_report(leakage, allowed)
    check_leakage(leakage, allowed, cfg.source)
    splits["lesions"] = split_lesions(splits["train"])
    for row in splits["test"]:  # the test split is only answered, never noised
        row.pop("lesion_mask", None)
        row.pop("lesion_source", None)
    for split in SPLITS:
        report[split] = split_summary(splits[split])
    report["train_lesion_annotations"] = len(splits["lesions"])
    # After the VQA splits, from streams of its own: it cannot change a VQA row.
    splits["reports"] = report_rows(cfg)
    report["reports"] = {"rows": len(splits["reports"]),
                         "dataset": dict(Counter(r["dataset"] for r in splits["reports"])),
                         "modality": dict(Counter(r["modality"] for r in splits["reports"]))}
    return splits, skipped, report

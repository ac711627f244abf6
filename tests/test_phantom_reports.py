"""The report-generation benchmark: the phantom generator, the user's R2Gen-layout files, evaluate's
reports and scores (resumable), and the report stage's merging of them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import pipeline.evaluation as evaluation
from pipeline.data import phantom_reports as pr
from pipeline.data.images import decode_image
from pipeline.data.phantoms import Findings, _split_key, encode_png, render_with_lesions
from pipeline.data.prepare import PrepareConfig, prepare_splits, report_rows
from pipeline.errors import DataError
from pipeline.evaluation import EvaluateConfig, combine_reports, evaluate_models, score_reports
from pipeline.params import load_params, project_config, project_params_path
from pipeline.report_metrics import METRICS
from pipeline.schema import REPORT_SCHEMA, read_rows, write_rows

SEED, SIZE = 3, 32


def prepare_config(**changes: object) -> PrepareConfig:
    section = load_params(project_params_path())["prepare"]
    section["phantom"].update(n_train=12, n_test=8, image_size=16)
    for key, value in changes.items():
        target = section
        *path, last = key.split(".")
        for part in path:
            target = target[part]
        target[last] = value
    return PrepareConfig.model_validate(section)


# ----- the phantom generator ----------------------------------------------------------------------


def test_same_seed_same_rows_other_seed_other_rows():
    rows = pr.generate_reports(16, SEED, SIZE)
    assert rows == pr.generate_reports(16, SEED, SIZE)
    assert rows[:8] == pr.generate_reports(8, SEED, SIZE)  # a row does not depend on how many follow
    other = pr.generate_reports(16, SEED + 1, SIZE)
    assert [r["image"] for r in rows] != [r["image"] for r in other]
    assert set(rows[0]) == set(REPORT_SCHEMA.names)
    assert {r["prompt"] for r in rows} == {pr.REPORT_PROMPT} and {r["split"] for r in rows} == {"test"}
    assert len({r["id"] for r in rows}) == 16


def test_report_text_states_the_findings():
    assert pr.report_text("ct", Findings((8.0,), None, False), "large") == (
        "Axial CT of the abdomen. A large lesion in the liver.")
    assert pr.report_text("chest_xray", Findings((3.0,), "left", True), None) == (
        "Frontal chest X-ray. A nodule in the left lung. The heart is enlarged.")
    assert pr.report_text("chest_xray", Findings((3.0, 3.5), None, False), None) == (
        "Frontal chest X-ray. Two nodules in the lungs. The heart size is normal.")
    assert pr.report_text("brain_mri", Findings((), None, False), None) == (
        "Axial T1-weighted MRI of the brain. No intracranial mass. The ventricles are normal in size. "
        "No other abnormality.")
    assert pr.report_text("histology", Findings((3.0, 3.0, 3.0), None, True), None) == (
        "H&E stained histology section. Three mitotic figures are visible. The nuclei are enlarged.")


def _centroid_x(mask: np.ndarray) -> float:
    return float(np.nonzero(mask)[1].mean())


def test_every_generated_report_matches_its_image():
    """Replaying each row's stream gives its image, and the lesions drawn agree with its text:
    none where it says "No", the number it names, on the side it names (patient's left = image right)."""
    n = 80
    rows = pr.generate_reports(n, SEED, SIZE)
    words = {"A": 1, "Two": 2, "Three": 3}
    seen_sides = set()
    for i, row in enumerate(rows):
        rng = np.random.default_rng([SEED, _split_key("report"), 1, i])
        findings, size = pr.report_findings(row["modality"], rng)
        pixels, mask = render_with_lesions(row["modality"], findings, rng, SIZE)
        assert encode_png(pixels) == row["image"]
        assert row["report"] == pr.report_text(row["modality"], findings, size)
        sentence = row["report"].split(". ")[1]
        if sentence.startswith("No "):
            assert mask is None and not findings.radii
            continue
        assert mask is not None and len(findings.radii) == words[sentence.split()[0]]
        for side in ("left", "right"):
            if f" {side} " in f" {sentence} ":
                seen_sides.add(side)
                on_right_of_image = _centroid_x(mask) > SIZE / 2
                assert on_right_of_image == (side == "left"), (i, row["report"])
        if size is not None:
            assert f" {size} " in f" {sentence} "
            assert all(r >= 7.0 for r in findings.radii) == (size == "large")
    assert seen_sides == {"left", "right"}
    assert {r["modality"] for r in rows} == {"chest_xray", "ct", "brain_mri", "histology"}
    assert any(r["report"].split(". ")[1].startswith("No ") for r in rows)


def test_the_vqa_splits_do_not_depend_on_the_report_benchmark():
    without, _, report0 = prepare_splits(prepare_config(**{"phantom.n_report": 0}))
    with_reports, _, report100 = prepare_splits(prepare_config(**{"phantom.n_report": 100}))
    assert without["reports"] == [] and len(with_reports["reports"]) == 100
    for split in ("train", "test", "lesions"):
        assert with_reports[split] == without[split]
    assert report100["reports"]["rows"] == 100 and report0["reports"]["rows"] == 0
    assert {k: v for k, v in report100.items() if k != "reports"} == {k: v for k, v in report0.items() if k != "reports"}
    assert with_reports["reports"] == pr.generate_reports(100, 0, 16)


def test_a_users_r2gen_annotation_becomes_report_rows(tmp_path):
    """The first image of each case (IU-Xray's frontal view), the chosen split, the named benchmark."""
    root = tmp_path / "raw"
    for case, colour in (("c1", 10), ("c2", 200)):
        (root / "images" / case).mkdir(parents=True)
        Image.new("RGB", (8, 8), (colour, 0, 0)).save(root / "images" / case / "0.png")
        Image.new("RGB", (8, 8), (0, colour, 0)).save(root / "images" / case / "1.png")
    entry = {"c1": "The heart is normal.", "c2": "Small left effusion."}
    data = {"train": [], "val": [],
            "test": [{"id": c, "report": text, "image_path": [f"{c}/0.png", f"{c}/1.png"], "split": "test"}
                     for c, text in entry.items()]}
    (root / "ann.json").write_text(json.dumps(data))
    spec = {"path": "ann.json", "image_root": "images", "split": "test", "dataset": "iu_xray",
            "modality": "chest_xray", "cleaning": "iu_xray"}
    cfg = prepare_config(source="files", **{"files.root": str(root), "files.report": spec})
    rows = report_rows(cfg)
    assert [r["id"] for r in rows] == ["c1", "c2"] and [r["report"] for r in rows] == list(entry.values())
    assert {(r["dataset"], r["modality"], r["cleaning"], r["split"]) for r in rows} == {
        ("iu_xray", "chest_xray", "iu_xray", "test")}
    assert decode_image(rows[1]["image"]).getpixel((0, 0)) == (200, 0, 0)  # 0.png, the first view
    assert pr.REPORT_PROMPT == rows[0]["prompt"]
    assert prepare_config(source="files").files.report is None  # the default: no report benchmark of yours
    with pytest.raises(ValueError, match="relative to files.root"):
        prepare_config(source="files", **{"files.report": {**spec, "path": "../ann.json"}})


# ----- evaluate ------------------------------------------------------------------------------------


MODELS = [("sft", "models/sft"), ("aligned", "models/aligned")]


def eval_config(**changes: object) -> EvaluateConfig:
    base = dict(batch_size=4, max_new_tokens={"closed": 3, "open": 3}, report_max_new_tokens=5, max_rows=None)
    return project_config(EvaluateConfig, "evaluate", **{**base, **changes})


def test_evaluate_writes_scores_and_resumes_the_reports(tmp_path, monkeypatch, tiny_vlm, rows):
    reports = pr.generate_reports(6, SEED, SIZE)
    inputs = {"input": "t", "reports": "r", "models": {"sft": "a", "aligned": "b"}}
    cfg = eval_config()
    clean = evaluate_models(lambda folder: tiny_vlm, MODELS, rows, cfg, tmp_path / "clean", inputs,
                            report_rows=reports)
    for key in ("sft", "sft_blind", "aligned", "aligned_blind"):
        generated = clean.report_predictions[key]
        assert [r["id"] for r in generated] == [r["id"] for r in reports]
        assert [r["report"] for r in generated] == [r["report"] for r in reports]
        assert {r["model"] for r in generated} == {key}
        scores = clean.report[f"{key}_report_generation"]
        assert list(scores) == ["phantom"] and scores["phantom"]["n"] == 6
        assert scores["phantom"]["max_new_tokens"] == 5
        assert set(METRICS) <= set(scores["phantom"])
        expected = score_reports(generated, {"phantom": "iu_xray"})[1]["phantom"]
        assert {m: scores["phantom"][m] for m in METRICS} == pytest.approx({m: expected[m] for m in METRICS})
    # the VQA report is what it is without reports
    plain = evaluate_models(lambda folder: tiny_vlm, MODELS, rows, cfg, tmp_path / "plain",
                            {k: v for k, v in inputs.items() if k != "reports"})
    assert {k: v for k, v in clean.report.items() if not k.endswith("_report_generation")} == plain.report
    assert plain.report_predictions == {}
    # a rerun in the same work folder reuses every report batch (2 per pass) and loads nothing
    work = tmp_path / "work"
    evaluate_models(lambda folder: tiny_vlm, MODELS, rows, cfg, work, inputs, report_rows=reports)
    calls = []
    monkeypatch.setattr(evaluation, "predict_report_batch", lambda *a, **k: calls.append(1) or [])
    resumed = evaluate_models(lambda folder: pytest.fail("loaded a model"), MODELS, rows, cfg, work, inputs,
                              report_rows=reports)
    assert calls == [] and resumed.report == clean.report
    assert resumed.work["sft"]["reports_blind"] == {"batches": 2, "reused": 2, "computed": 0}
    # a longer report cap, or other report rows, is a new key: nothing is reused
    keys = evaluation.report_work_keys(MODELS, cfg, inputs)
    assert evaluation.report_work_keys(MODELS, eval_config(report_max_new_tokens=6), inputs)["sft"] != keys["sft"]
    assert evaluation.report_work_keys(MODELS, cfg, {**inputs, "reports": "other"})["aligned"] != keys["aligned"]
    assert set(keys["sft"].values()).isdisjoint(evaluation.work_keys(MODELS, cfg, inputs)["sft"].values())


def test_reports_are_scored_per_benchmark_with_its_cleaner():
    def row(dataset: str, prediction: str, report: str) -> dict:
        return {"id": f"{dataset}-{prediction}", "model": "m", "dataset": dataset, "modality": "ct", "prompt": "p",
                "report": report, "prediction": prediction, "rouge_l": None, "meteor": None}

    rows = [row("phantom", "no liver lesion.", "No liver lesion."), row("iu_xray", "", "The heart is normal."),
            row("iu_xray", "the heart is normal.", "The heart is normal.")]
    scored, scores = score_reports(rows, {"phantom": "iu_xray", "iu_xray": "iu_xray"})
    assert list(scores) == ["iu_xray", "phantom"]  # sorted: metrics files diff cleanly
    assert scores["phantom"]["n"] == 1 and scores["iu_xray"]["n"] == 2
    assert scores["phantom"]["rouge_l"] == pytest.approx(1.0)
    assert scores["iu_xray"]["rouge_l"] == pytest.approx(0.5)  # one perfect report, one empty (scores 0)
    assert [r["rouge_l"] for r in scored] == pytest.approx([1.0, 0.0, 1.0])
    with pytest.raises(DataError, match="no text cleaner"):
        score_reports(rows, {"phantom": "iu_xray"})
    with pytest.raises(DataError, match="different `cleaning`"):
        evaluation.report_cleaning([{"dataset": "x", "cleaning": "iu_xray"}, {"dataset": "x", "cleaning": "mimic_cxr"}])


def test_several_test_datasets_get_per_dataset_metrics(tmp_path, tiny_vlm, rows):
    mixed = [{**r, "dataset": "a" if i % 2 else "b"} for i, r in enumerate(rows)]
    done = evaluate_models(lambda folder: tiny_vlm, MODELS[:1], mixed, eval_config(), tmp_path / "w",
                           {"input": "t", "models": {"sft": "a"}})
    for key in ("sft", "sft_blind"):
        by = done.report[key]["by_dataset"]
        assert sorted(by) == ["a", "b"] and by["a"]["n_closed"] + by["b"]["n_closed"] == done.report[key]["n_closed"]
        odd = [p["score"] for i, p in enumerate(done.predictions[key]) if i % 2]
        assert by["a"]["closed_accuracy"] == pytest.approx(sum(odd) / len(odd))


# ----- the report stage ----------------------------------------------------------------------------


def test_the_report_stage_merges_report_scores_and_their_deltas():
    def model(name: str, bleu: float) -> dict:
        vqa = {"closed_accuracy": 0.5, "open_recall": 0.5, "n_closed": 1, "n_open": 1}
        gen = {"phantom": {**{m: bleu for m in METRICS}, "n": 4, "max_new_tokens": 5}}
        return {name: vqa, f"{name}_blind": vqa, f"{name}_image_reliance": {"closed_accuracy": 0.0, "open_recall": 0.0},
                f"{name}_report_generation": gen, f"{name}_blind_report_generation": gen}

    sft, aligned = model("sft", 0.25), model("aligned", 0.75)
    report = combine_reports(["sft", "aligned"], [sft, aligned], {})
    for part in (sft, aligned):
        for key, value in part.items():
            assert report[key] == value
    assert report["report_generation_deltas"] == {"aligned_minus_sft": {"phantom": {m: 0.5 for m in METRICS}}}
    assert not any("_minus_" in k and "report" in k for k in report)  # the VQA delta keys are untouched
    plain = combine_reports(["sft", "aligned"], [{k: v for k, v in p.items() if "report" not in k}
                                                 for p in (sft, aligned)], {})
    assert "report_generation_deltas" not in plain
    assert plain["aligned_minus_sft"] == report["aligned_minus_sft"]


def test_read_rows_round_trip(tmp_path):
    rows = pr.generate_reports(3, SEED, 16)
    write_rows(rows, tmp_path / "reports.parquet", REPORT_SCHEMA)
    assert read_rows(tmp_path / "reports.parquet", REPORT_SCHEMA) == rows

"""More VQA benchmarks in one `prepare` (`prepare.files.benchmarks`, HSCR Table 1's VQA-RAD + SLAKE +
PathVQA): their rows join the test split under their own dataset with prefixed ids, leakage is
checked against train for them too, and LLaVA-Med's legacy numbers come per benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.data.leakage import LeakageError
from pipeline.data.prepare import PrepareConfig, prepare_splits
from pipeline.errors import ParamsError
from pipeline.legacy_metrics import legacy_reports, legacy_reports_by_dataset
from pipeline.params import project_config
from tests.test_leakage import vqa_rad_root, write_png


def slake_root(root: Path, image_value: int) -> None:
    """A SLAKE-style file beside VQA-RAD's: its qids 4 and 5 collide with VQA-RAD's test qids."""
    write_png(root / "slake" / "imgs" / "s1.png", image_value)
    items = [
        {"qid": 4, "img_name": "s1.png", "question": "Is the lung healthy?", "answer": "No", "answer_type": "CLOSED"},
        {"qid": 5, "img_name": "s1.png", "question": "Which organ is abnormal?", "answer": "Lung", "answer_type": "OPEN"},
        {"qid": 6, "img_name": "s1.png", "question": "What modality is used?", "answer": "CT", "answer_type": "OPEN"},
    ]
    (root / "slake" / "test.json").write_text(json.dumps(items))


def config(root: Path, benchmarks: list[dict], allow_leakage: bool = False) -> PrepareConfig:
    def split(values: list[str]) -> dict:
        return {"path": "VQA_RAD Dataset Public.json", "format": None, "image_root": "images",
                "where": {"field": "phrase_type", "values": values}}

    files = {"root": str(root), "dataset": "vqa-rad", "skip_bad": False, "turns": "first",
             "allow_leakage": allow_leakage, "train": split(["freeform", "para"]),
             "test": split(["test_freeform", "test_para"]), "benchmarks": benchmarks, "report": None}
    return project_config(PrepareConfig, "prepare", source="files", files=files)


SLAKE = {"dataset": "slake", "path": "slake/test.json", "format": None, "image_root": "slake/imgs", "where": None}


def test_benchmarks_join_the_test_split_under_their_own_dataset_and_prefixed_ids(tmp_path):
    root = vqa_rad_root(tmp_path, "b.png")
    slake_root(root, 200)
    splits, _, report = prepare_splits(config(root, [SLAKE]))
    test = splits["test"]
    assert [(r["id"], r["dataset"]) for r in test] == [
        ("4", "vqa-rad"), ("5", "vqa-rad"), ("slake/4", "slake"), ("slake/5", "slake"), ("slake/6", "slake")]
    assert [r["answer_type"] for r in test[2:]] == ["closed", "open", "open"]
    assert len({r["id"] for r in test}) == len(test)
    assert report["benchmarks"] == {"slake": {"rows": 3, "skipped": 0, "excluded_by_where": 0, "turns_left_out": 0}}
    assert report["test"]["dataset"] == {"vqa-rad": 2, "slake": 3}
    assert "dataset" not in report["train"]  # one dataset: the summary keeps exactly its keys
    assert [r["id"] for r in splits["train"]] == ["1", "2", "3"]


def test_a_benchmark_leaking_train_images_is_refused(tmp_path):
    root = vqa_rad_root(tmp_path, "b.png")
    slake_root(root, 50)  # the pixels of train's a.png
    with pytest.raises(LeakageError, match="3 test rows use one of 1 images that are also in train"):
        prepare_splits(config(root, [SLAKE]))
    splits, _, report = prepare_splits(config(root, [SLAKE], allow_leakage=True))
    assert report["leakage"]["image"]["test_rows"] == 3 and len(splits["test"]) == 5


def test_a_benchmark_name_used_twice_is_a_params_error(tmp_path):
    root = vqa_rad_root(tmp_path, "b.png")
    with pytest.raises(ParamsError, match=r"dataset name\(s\) \['slake'\] used twice"):
        config(root, [SLAKE, SLAKE])
    with pytest.raises(ParamsError, match=r"\['vqa-rad'\] used twice"):
        config(root, [{**SLAKE, "dataset": "vqa-rad"}])
    with pytest.raises(ParamsError, match="benchmarks"):
        config(root, [{**SLAKE, "dataset": "sla ke"}])  # the name is an id prefix and a metrics key


def _row(id_: str, answer: str, prediction: str, answer_type: str) -> dict:
    return {"id": id_, "question": "q", "answer": answer, "prediction": prediction, "answer_type": answer_type}


def test_legacy_numbers_per_benchmark_use_that_benchmarks_candidate_answers():
    rows = [_row("1", "yes", "yes", "closed"), _row("2", "left", "the left lung", "open"),
            _row("slake/1", "no", "no", "closed"), _row("slake/2", "liver", "liver", "open"),
            _row("slake/3", "lung", "left", "open")]
    dataset_of = {"1": "vqa-rad", "2": "vqa-rad", "slake/1": "slake", "slake/2": "slake", "slake/3": "slake"}
    predictions = {"sft": rows, "sft_blind": [{**r, "prediction": "no"} for r in rows]}
    by_dataset = legacy_reports_by_dataset(predictions, dataset_of)
    assert set(by_dataset) == {"sft", "sft_blind"} and set(by_dataset["sft"]) == {"vqa-rad", "slake"}
    for dataset in ("vqa-rad", "slake"):
        alone = legacy_reports({k: [r for r in v if dataset_of[r["id"]] == dataset] for k, v in predictions.items()})
        assert by_dataset["sft"][dataset] == alone["sft"] and by_dataset["sft_blind"][dataset] == alone["sft_blind"]
    # the candidate list is the benchmark's own: "left" is a VQA-RAD answer, not a SLAKE one
    assert by_dataset["sft"]["slake"] != legacy_reports(predictions)["sft"]
    assert legacy_reports_by_dataset({"sft": rows[:2]}, dataset_of) == {}  # one dataset: nothing per dataset

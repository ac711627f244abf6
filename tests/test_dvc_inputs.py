"""DVC sees every input: the user's data folder, local model folders and the judge prompts file are
deps of the stages that read them, so a change makes `dvc status` report the stage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tests.conftest import sh

REPO = Path(__file__).resolve().parents[1]


def stage_deps() -> dict[str, set[str]]:
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        return {stage.name: {str(Path(dep.def_path)) for dep in stage.deps} for stage in repo.index.stages}


def test_folders_a_param_can_point_into_are_deps_of_their_stage():
    deps = stage_deps()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert params["prepare"]["files"]["root"] in deps["prepare"]  # ${prepare.files.root}
    assert params["score"]["prompts"] in deps["score"]  # ${score.prompts}
    assert "models/base" in deps["sft"]
    assert "models/embedders" in deps["rerank"]
    assert "models/judges" in deps["score"]
    for folder in ("data/raw", "models/base", "models/embedders", "models/judges"):
        assert (REPO / folder).is_dir(), f"{folder} must exist in a fresh clone (a dep DVC hashes)"


def test_the_sft_evaluation_depends_on_nothing_an_ablation_changes():
    """`evaluate@sft` reads only what `prepare` and `sft` make: a `sample`, `score` or `train` param
    (every ablation) leaves it cached, and `report` combines both evaluations."""
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        stages = {s.name: s for s in repo.index.stages}
        made_by = {Path(out.def_path): s.name for s in stages.values() for out in s.outs}

        def producers(dep: Path) -> set[str]:  # an output folder makes every file under it
            return {made_by[p] for p in (dep, *dep.parents) if p in made_by}

        def upstream(name: str) -> set[str]:
            direct = set().union(*(producers(Path(d.def_path)) for d in stages[name].deps))
            return direct.union(*(upstream(u) for u in direct))

    assert upstream("evaluate@sft") == {"prepare", "sft"}
    assert {"train", "sample", "score"} <= upstream("evaluate@aligned")
    assert {"evaluate@sft", "evaluate@aligned", "train"} <= upstream("report")


def write_dataset(root: Path, answers: list[str]) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    items = []
    for i, answer in enumerate(answers):
        Image.new("RGB", (16, 16), (40 * i, 40, 40)).save(root / "images" / f"img{i}.png")
        items.append({"qid": f"q{i}", "image": f"img{i}.png", "question": f"is there a lesion {i}?",
                      "answer": answer, "answer_type": "CLOSED", "modality": "ct"})
    (root / "train.json").write_text(json.dumps(items))
    tests = []  # about images of their own: `prepare` refuses a test split that leaks into train
    for i, answer in enumerate(answers[:2]):
        Image.new("RGB", (16, 16), (40, 40 * i, 200)).save(root / "images" / f"test{i}.png")
        tests.append({"qid": f"t{i}", "image": f"test{i}.png", "question": f"is there a lesion {i}?",
                      "answer": answer, "answer_type": "CLOSED", "modality": "ct"})
    (root / "test.json").write_text(json.dumps(tests))


@pytest.mark.slow
def test_editing_a_question_file_or_replacing_an_image_reruns_prepare(tmp_path):
    if shutil.which("dvc") is None:
        pytest.skip("dvc is not on PATH")
    work = tmp_path / "repo"
    sh(f"git clone -q {REPO} {work}", tmp_path)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["prepare"]["source"] = "files"
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_dataset(work / "data" / "raw", ["yes", "no", "yes"])
    sh("dvc repro prepare", work)
    assert "prepare" not in sh("dvc status prepare", work).replace("Data and pipelines are up to date", "")

    questions = json.loads((work / "data/raw/train.json").read_text())
    questions[0]["answer"] = "no"
    (work / "data/raw/train.json").write_text(json.dumps(questions))
    status = sh("dvc status prepare", work)
    assert "prepare:" in status and "data/raw" in status
    out = sh("dvc repro prepare", work)
    assert "Running stage 'prepare'" in out
    assert "Data and pipelines are up to date" in sh("dvc status prepare", work)

    Image.new("RGB", (16, 16), (255, 0, 0)).save(work / "data/raw/images/img1.png")
    status = sh("dvc status prepare", work)
    assert "prepare:" in status and "data/raw" in status

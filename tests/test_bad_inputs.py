"""The bad-input matrix of docs/bad-inputs.md, run for real.

Every row of the page's table is one scenario here, keyed by its `case` id: a tiny workspace in
`tmp_path` that is valid for the row's stage except for the one bad input, the stage run in
process as `python -m pipeline.stages.<stage>` runs it (its arguments taken from dvc.yaml), and
the row's exit code and message excerpt checked against what the stage printed. A row without a
scenario, or a scenario without a row, fails the test, so the page and the code cannot drift.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.data.phantoms import generate_split
from pipeline.models.profiles import build_tiny
from pipeline.params import load_params, project_params_path
from pipeline.schema import (
    CANDIDATES_SCHEMA,
    LESION_SCHEMA,
    POOL_SCHEMA,
    RANKED_SCHEMA,
    REPORT_SCHEMA,
    SCORED_SCHEMA,
    VQA_SCHEMA,
    write_rows,
)
from pipeline.stages._cli import run
from tests.conftest import stage_commands

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "bad-inputs.md"
COLUMNS = ["case", "stage", "what is wrong", "message (excerpt)", "exit"]


# ---------------------------------------------------------------------------------------------
# the table of docs/bad-inputs.md


@dataclass(frozen=True)
class Row:
    case: str
    stage: str
    wrong: str
    excerpt: str
    exit: int


def _code_span(cell: str) -> str:
    """The text of a markdown code span (`x`, or ``x `y` `` when the text holds backticks)."""
    match = re.fullmatch(r"(`+)(.+?)\1", cell)
    assert match, f"not a code span: {cell!r}"
    text = match.group(2)
    if text.startswith(" ") and text.endswith(" ") and text.strip():
        text = text[1:-1]
    return text


def _cells(line: str) -> list[str]:
    line = line.strip()
    assert line.startswith("|") and line.endswith("|"), f"not a table line: {line!r}"
    return [cell.strip() for cell in line[1:-1].split("|")]


def doc_rows() -> list[Row]:
    text = DOC.read_text(encoding="utf-8").splitlines()
    at = [i for i, line in enumerate(text) if line.lstrip().startswith("|")]
    assert at, f"{DOC}: no table"
    # The first table is the bad-input matrix (the interruption table after it is not run here).
    end = next((k for k in range(1, len(at)) if at[k] != at[k - 1] + 1), len(at))
    lines = [text[i] for i in at[:end]]
    assert len(lines) >= 3, f"{DOC}: a table without rows"
    assert _cells(lines[0]) == COLUMNS, f"{DOC}: the table's columns must be exactly {COLUMNS}"
    assert all(re.fullmatch(r":?-+:?", cell) for cell in _cells(lines[1])), f"{DOC}: bad separator line"
    rows = []
    for line in lines[2:]:
        cells = _cells(line)
        assert len(cells) == len(COLUMNS), f"{DOC}: row with {len(cells)} cells (a `|` in a cell?): {line}"
        case, stage, wrong, excerpt, code = cells
        rows.append(Row(case.strip("`"), stage.strip("`"), wrong, _code_span(excerpt), int(code)))
    return rows


ROWS = doc_rows()
STAGES = ("prepare", "sft", "mine", "sample", "rerank", "score", "train", "evaluate", "report")


# docs/bad-inputs.md names a stage's module; `evaluate` runs as evaluate@aligned, one of its items.
COMMANDS = {**stage_commands(), "evaluate": stage_commands()["evaluate@aligned"]}


# ---------------------------------------------------------------------------------------------
# a tiny workspace that every stage accepts, and the one bad change of each scenario

DELETE = object()


def _set(params: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = params
    for part in parents:
        node = node[part]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value


def _png(path: Path, value: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8), mode="RGB").save(path)


def _item(qid: str, **changes: Any) -> dict:
    return {"qid": qid, "image": "a.png", "question": f"Is there a lesion ({qid})?", "answer": "yes", **changes}


def openai_judge(**changes: Any) -> dict:
    judge = {"name": "remote", "role": "radiologist", "backend": "openai", "model": "med42",
             "base_url": "http://127.0.0.1:8000/v1", "api_key_env": "MEDALIGN_JUDGE_KEY", "timeout_s": 5.0,
             "max_concurrency": 1, "max_new_tokens": 48, "temperature": 0.0, "extra_body": {},
             "preflight": True, "structured_output": "none", "sampling_fields": {}}
    return {**judge, **changes}


class Workspace:
    """The repository's layout in `root` (the working directory): the inputs of every stage,
    each tiny and valid, and the project's params.yaml (written by `write_params`)."""

    def __init__(self, root: Path, model: Path) -> None:
        self.root = root
        self.params = load_params(project_params_path())
        self.args_override: list[str] | None = None
        self.params_text: str | None = None  # the params file as text, when it is not YAML of `params`
        self.cleanups: list[Callable[[], None]] = []  # run after the stage (e.g. stop a loopback server)
        rows = generate_split(4, "train", seed=0, prior=0.7, image_size=16)
        test_rows = generate_split(4, "test", seed=0, prior=None, image_size=16)
        write_rows(rows, "data/prepared/train.parquet", VQA_SCHEMA)
        write_rows(test_rows, "data/prepared/test.parquet", VQA_SCHEMA)
        write_rows([{**r, "mine_strategy": "balanced", "mine_score": None} for r in rows], "data/pool.parquet",
                   POOL_SCHEMA)
        write_rows([], "data/prepared/lesions.parquet", LESION_SCHEMA)
        write_rows([], "data/prepared/reports.parquet", REPORT_SCHEMA)  # no report benchmark
        candidates = [{**r, "chosen_token_ids": [1], "chosen_logprob": -1.0, "sensitivity": [0.5],
                       "candidates": [{"text": f"not {r['answer']}", "token_ids": [2], "level": 1, "positions": [0],
                                       "original_tokens": [r["answer"]], "replacement_tokens": ["x"],
                                       "logprob": -2.0}]} for r in rows]
        write_rows(candidates, "data/candidates.parquet", CANDIDATES_SCHEMA)
        ranked = [{**r, "rejected": [{"text": f"not {r['answer']}", "similarity": 0.5, "level": 1, "logprob": -2.0}]}
                  for r in rows]
        write_rows(ranked, "data/ranked.parquet", RANKED_SCHEMA)
        judgement = {"score": 5.0, "rounds": 1, "agreed": True, "weight": 1.0, "transcript": "[]"}
        write_rows([{**r, "judgements": [judgement]} for r in ranked], "data/scored.parquet", SCORED_SCHEMA)
        for folder in ("models/base", "models/embedders", "models/judges", "data/raw"):
            Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copytree(model, "models/sft")
        shutil.copytree(model, "models/aligned")
        # score.prompts is a path relative to the repository root, as in the project
        prompts = Path(self.params["score"]["prompts"])
        prompts.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / prompts, prompts)

    def set(self, **changes: Any) -> None:
        """Change params: `set(**{"sft.epochs": DELETE, "sft.epoch": 2})`."""
        for dotted, value in changes.items():
            _set(self.params, dotted, value)

    def files_source(self, train: list[dict] | None = None) -> None:
        """`prepare.source: files` with 3 good questions per split (or `train`) under data/raw; the test
        questions are about their own image (t.png), so the splits do not leak."""
        split = {"format": None, "image_root": "images", "where": None}
        self.set(**{"prepare.source": "files", "prepare.files.root": "data/raw",
                    "prepare.files.train": {"path": "train.json", **split},
                    "prepare.files.test": {"path": "test.json", **split}})
        _png(Path("data/raw/images/a.png"))
        _png(Path("data/raw/images/t.png"), value=170)
        self.question_file("data/raw/train.json", json.dumps(train or [_item(f"q{i}") for i in range(3)]))
        self.question_file("data/raw/test.json", json.dumps([_item(f"t{i}", image="t.png") for i in range(3)]))

    @staticmethod
    def question_file(path: str, text: str | bytes) -> None:
        Path(path).write_bytes(text if isinstance(text, bytes) else text.encode())

    def args(self, stage: str) -> list[str]:
        return self.args_override if self.args_override is not None else list(COMMANDS[stage])

    def write_params(self) -> None:
        text = yaml.safe_dump(self.params, sort_keys=False) if self.params_text is None else self.params_text
        Path("params.yaml").write_text(text)


def _replace_arg(args: list[str], flag: str, value: str | None, occurrence: int = 0) -> list[str]:
    """`args` with the value of the `occurrence`-th `flag` replaced (None: the flag removed)."""
    at = [i for i, a in enumerate(args) if a == flag][occurrence]
    if value is None:
        return args[:at] + args[at + 2:]
    return args[:at + 1] + [value] + args[at + 2:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# One function per `case` of the table: it makes the workspace bad in exactly the way the row says.
Scenario = Callable[[Workspace, pytest.MonkeyPatch], None]
SCENARIOS: dict[str, Scenario] = {}


def scenario(case: str) -> Callable[[Scenario], Scenario]:
    def register(fn: Scenario) -> Scenario:
        assert case not in SCENARIOS, case
        SCENARIOS[case] = fn
        return fn
    return register


# ----- params.yaml ---------------------------------------------------------------------------


@scenario("unknown-top-level-key")
def _(w, mp):
    w.set(mask_ratio=DELETE, mask_ratoi=0.5)


@scenario("typo-in-section")
def _(w, mp):
    w.set(**{"sft.epochs": DELETE, "sft.epoch": 2})


@scenario("missing-key")
def _(w, mp):
    w.set(**{"mine.seed": DELETE})


@scenario("missing-section")
def _(w, mp):
    w.set(mine=DELETE)


@scenario("wrong-type")
def _(w, mp):
    w.set(**{"train.batch_size": "eight"})


@scenario("evaluate-batch-size-zero")
def _(w, mp):
    w.set(**{"evaluate.batch_size": 0})


@scenario("sample-k-zero")
def _(w, mp):
    w.set(**{"sample.k": 0})


@scenario("mask-ratio-out-of-range")
def _(w, mp):
    w.set(mask_ratio=1.5)


@scenario("top-level-key-in-section")
def _(w, mp):
    w.set(mask_ratio=DELETE, **{"sample.mask_ratio": 0.7})


@scenario("rerank-j-above-sample-k")
def _(w, mp):
    w.set(**{"rerank.j": 10, "sample.k": 6})


@scenario("rerank-min-keep-above-j")
def _(w, mp):
    w.set(**{"rerank.min_keep": 5, "rerank.j": 3})


@scenario("phantom-n-test-zero")
def _(w, mp):
    w.set(**{"prepare.phantom.n_test": 0})


@scenario("unknown-train-loss")
def _(w, mp):
    w.set(**{"train.loss": "ipo"})


@scenario("train-visual-without-visual-dispreferred")
def _(w, mp):
    w.set(**{"train.dispreferred": "both"})  # the scored entries were sampled without visual_dispreference


@scenario("bad-lesion-boxes")
def _(w, mp):
    w.files_source(train=[_item("q0", lesion_boxes=[[8, 0, 2, 4]]), _item("q1"), _item("q2")])


@scenario("unknown-sample-mode")
def _(w, mp):
    w.set(**{"sample.mode": "beam"})


@scenario("mine-hard-threshold-zero")
def _(w, mp):
    w.set(**{"mine.strategy": "hard", "mine.hard.confidence_threshold": 0})


@scenario("reversed-weight-clip")
def _(w, mp):
    w.set(**{"score.weights.clip": [1.25, 0.75]})


@scenario("judge-unknown-backend")
def _(w, mp):
    w.params["score"]["judges"][0]["backend"] = "vllm"


SECRET = "sk-proj-4f9aQz7Lm2"


@scenario("judge-api-key-in-params")
def _(w, mp):
    w.set(**{"score.judges": [openai_judge(api_key_env=SECRET)]})


@scenario("judge-duplicate-names")
def _(w, mp):
    w.params["score"]["judges"][1]["name"] = w.params["score"]["judges"][0]["name"]


@scenario("judge-unknown-role")
def _(w, mp):
    w.params["score"]["judges"][0]["role"] = "surgeon"


@scenario("files-path-escapes-root")
def _(w, mp):
    w.files_source()
    w.set(**{"prepare.files.train.path": "../x.json"})


@scenario("model-outside-model-root")
def _(w, mp):
    shutil.copytree("models/sft", "elsewhere/embedder")  # any existing folder outside --model-root
    w.set(**{"rerank.model": "elsewhere/embedder"})


@scenario("empty-params-file")
def _(w, mp):
    w.params_text = ""


@scenario("invalid-yaml")
def _(w, mp):
    # a flow mapping left open, e.g. by a hand edit
    w.params_text = yaml.safe_dump(w.params, sort_keys=False).replace("evaluate:\n", "evaluate: {\n")


@scenario("params-file-not-found")
def _(w, mp):
    w.args_override = _replace_arg(COMMANDS["mine"], "--params", "params.yml")


# ----- command line --------------------------------------------------------------------------


@scenario("input-not-found")
def _(w, mp):
    Path("data/prepared/train.parquet").unlink()


@scenario("evaluate-model-without-name")
def _(w, mp):
    w.args_override = _replace_arg(COMMANDS["evaluate"], "--model", "models/sft")


@scenario("evaluate-model-folder-without-config")
def _(w, mp):
    shutil.rmtree("models/aligned")
    Path("models/aligned").mkdir()


def _evaluation_reports(*names: str) -> None:
    """`reports/evaluate/<name>.json` as `evaluate` writes them, for the `report` stage."""
    Path("reports/evaluate").mkdir(parents=True, exist_ok=True)
    Path("reports/predictions").mkdir(parents=True, exist_ok=True)
    for name in names:
        healthy = {"n": 2, "empty_share": 0.0, "top_prediction": "yes", "top_share": 0.5, "distinct_answers": 2,
                   "mostly_empty": False, "constant": False, "flagged": False}
        metrics = {"closed_accuracy": 0.5, "open_recall": 0.5, "n_closed": 2, "n_open": 2,
                   "degenerate": {"closed": healthy, "open": healthy}}
        report = {name: metrics, f"{name}_blind": metrics,
                  f"{name}_image_reliance": {"closed_accuracy": 0.0, "open_recall": 0.0}}
        Path(f"reports/evaluate/{name}.json").write_text(json.dumps(report))


@scenario("report-evaluation-of-another-model")
def _(w, mp):
    _evaluation_reports("sft")
    shutil.copy("reports/evaluate/sft.json", "reports/evaluate/aligned.json")


@scenario("report-model-not-evaluated")
def _(w, mp):
    _evaluation_reports("sft", "aligned")
    w.args_override = [*COMMANDS["report"], "--model", "base=models/sft"]


# ----- data and files ------------------------------------------------------------------------


@scenario("empty-parquet")
def _(w, mp):
    Path("data/prepared/train.parquet").write_bytes(b"")


@scenario("corrupt-parquet")
def _(w, mp):
    path = Path("data/prepared/train.parquet")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@scenario("wrong-parquet-schema")
def _(w, mp):
    shutil.copy("data/prepared/train.parquet", "data/pool.parquet")  # a split, not a pool from `mine`


@scenario("files-root-not-found")
def _(w, mp):
    w.files_source()
    w.set(**{"prepare.files.root": "data/raw_vqa"})


@scenario("question-file-not-found")
def _(w, mp):
    w.files_source()
    w.set(**{"prepare.files.train.path": "vqa_rad/train.json"})


@scenario("json-with-bom")
def _(w, mp):
    w.files_source()
    w.question_file("data/raw/train.json", b"\xef\xbb\xbf" + json.dumps([_item(f"q{i}") for i in range(3)]).encode())


@scenario("empty-question-file")
def _(w, mp):
    w.files_source()
    w.question_file("data/raw/train.json", b"")


@scenario("truncated-jsonl-line")
def _(w, mp):
    w.files_source()
    lines = [json.dumps(_item(f"q{i}")) for i in range(3)] + ['{"qid": "q3", "question": "Is th']
    w.question_file("data/raw/train.jsonl", "\n".join(lines))
    w.set(**{"prepare.files.train.path": "train.jsonl"})


@scenario("bad-rows")
def _(w, mp):
    w.files_source(train=[_item(f"q{i}") for i in range(3)] + [_item("q3", image="gone.png")])


@scenario("skip-bad")
def _(w, mp):
    w.files_source(train=[_item(f"q{i}") for i in range(3)] + [_item("q3", image="gone.png")])
    w.set(**{"prepare.files.skip_bad": True})


@scenario("duplicate-ids")
def _(w, mp):
    w.files_source(train=[_item("q0"), _item("q1"), _item("q0")])


@scenario("train-test-leakage")
def _(w, mp):
    w.files_source()
    w.question_file("data/raw/test.json", json.dumps([_item(f"t{i}") for i in range(3)]))  # train's image


@scenario("train-test-leakage-allowed")
def _(w, mp):
    w.files_source()
    w.question_file("data/raw/test.json", json.dumps([_item(f"t{i}") for i in range(3)]))
    w.set(**{"prepare.files.allow_leakage": True})


@scenario("where-field-missing")
def _(w, mp):
    w.files_source()
    w.set(**{"prepare.files.test.where": {"field": "phrase_type", "values": ["test_freeform"]}})


@scenario("truncated-safetensors")
def _(w, mp):
    weights = Path("models/sft/model.safetensors")
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])


@scenario("model-weights-missing")
def _(w, mp):
    Path("models/sft/model.safetensors").unlink()


@scenario("empty-split-to-mine")
def _(w, mp):
    write_rows([], "data/prepared/train.parquet", VQA_SCHEMA)


@scenario("empty-stage-input")
def _(w, mp):
    write_rows([], "data/pool.parquet", POOL_SCHEMA)


@scenario("prompts-file-not-found")
def _(w, mp):
    w.set(**{"score.prompts": "pipeline/judges/missing.yaml"})


@scenario("broken-judge-folder")
def _(w, mp):
    Path("models/judges/broken").mkdir(parents=True)
    Path("models/judges/broken/config.json").write_text('{"model_type": "llama"}')
    w.params["score"]["judges"] = [{**w.params["score"]["judges"][0], "model": "models/judges/broken"}]


@scenario("broken-embedder-folder")
def _(w, mp):
    Path("models/embedders/broken").mkdir(parents=True)
    Path("models/embedders/broken/config.json").write_text("{}")
    w.set(**{"rerank.model": "models/embedders/broken"})


@scenario("model-folder-without-config")
def _(w, mp):
    Path("models/sft/config.json").unlink()


@scenario("unknown-model-name")
def _(w, mp):
    w.set(**{"sft.model": "llava-med"})


@scenario("judge-api-key-unset")
def _(w, mp):
    mp.delenv("MEDALIGN_JUDGE_KEY", raising=False)
    w.set(**{"score.judges": [openai_judge()]})


@scenario("judge-unreachable")
def _(w, mp):
    mp.setenv("MEDALIGN_JUDGE_KEY", "any-value")
    w.set(**{"score.judges": [openai_judge(base_url=f"http://127.0.0.1:{_free_port()}/v1")],
             "score.request_retry.max_retries": 0})


@scenario("judge-url-without-scheme")
def _(w, mp):
    mp.setenv("MEDALIGN_JUDGE_KEY", "any-value")
    w.set(**{"score.judges": [openai_judge(base_url="localhost:8000/v1")]})


@scenario("judge-sampling-field-unknown")
def _(w, mp):
    mp.setenv("MEDALIGN_JUDGE_KEY", "any-value")
    w.set(**{"score.judges": [openai_judge(sampling_fields={"top_p": None})]})


def _loopback_judge_server(w: Workspace):
    from tests.test_judges_openai import ChatServer

    server = ChatServer().__enter__()
    w.cleanups.append(lambda: server.__exit__(None, None, None))
    return server


@scenario("judge-model-not-served")
def _(w, mp):
    mp.setenv("MEDALIGN_JUDGE_KEY", "any-value")
    server = _loopback_judge_server(w)
    w.set(**{"score.judges": [openai_judge(base_url=server.url, model="med42")]})  # it serves judge-a, judge-b


@scenario("judge-wrong-path")
def _(w, mp):
    mp.setenv("MEDALIGN_JUDGE_KEY", "any-value")
    server = _loopback_judge_server(w)
    w.set(**{"score.judges": [openai_judge(base_url=server.url.removesuffix("/v1"), model="judge-a")]})


@scenario("rerank-keeps-nothing")
def _(w, mp):
    pass  # the workspace's candidates: one per entry, fewer than rerank.min_keep (2)


@scenario("model-param-is-a-file")
def _(w, mp):
    Path("models/embedders/model.safetensors").write_bytes(b"weights")
    w.set(**{"rerank.model": "models/embedders/model.safetensors"})


@scenario("model-folder-is-a-file")
def _(w, mp):
    shutil.rmtree("models/sft")
    Path("models/sft").write_bytes(b"an archive, not unpacked")


@scenario("unreadable-image")
def _(w, mp):
    w.files_source(train=[_item(f"q{i}") for i in range(3)] + [_item("q3", image="b.png")])
    Path("data/raw/images/b.png").write_text("<html>404 Not Found</html>")


@scenario("dicom-without-extra")
def _(w, mp):
    from pydicom import uid

    from tests.test_dicom import hide_extra_decoders, write_jpeg_ls

    w.files_source(train=[_item(f"q{i}") for i in range(3)] + [_item("q3", image="scan.dcm")])
    write_jpeg_ls(Path("data/raw/images/scan.dcm"), np.arange(64, dtype=np.uint16).reshape(8, 8) * 64, 12)
    hide_extra_decoders(mp, uid.JPEGLSLossless)


@scenario("dicom-no-meta-compressed")
def _(w, mp):
    import io

    from pydicom import Dataset, dcmwrite
    from pydicom.encaps import encapsulate

    from tests.test_dicom import IMG8, encode_lossless_jpeg, mono_dataset

    w.files_source(train=[_item(f"q{i}") for i in range(3)] + [_item("q3", image="old.dcm")])
    ds = mono_dataset(IMG8, 8)  # an old scanner's file: no preamble, no file meta, JPEG pixel data
    ds.PixelData = encapsulate([encode_lossless_jpeg(IMG8, 8)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    buf = io.BytesIO()
    dcmwrite(buf, Dataset(dict(ds.items())), implicit_vr=False, little_endian=True, enforce_file_format=False)
    Path("data/raw/images/old.dcm").write_bytes(buf.getvalue())


@scenario("prompts-without-prefill")
def _(w, mp):
    prompts = yaml.safe_load(Path(w.params["score"]["prompts"]).read_text())
    del prompts["prefill"]
    Path("prompts.yaml").write_text(yaml.safe_dump(prompts))
    w.set(**{"score.prompts": "prompts.yaml"})


def _external_writer(w: Workspace, **changes: Any) -> None:
    """`sample.source: external`, with the writer's prompts file where params.yaml names it."""
    prompts = Path(w.params["sample"]["external"]["prompts"])
    prompts.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / prompts, prompts)
    w.set(**{"sample.source": "external", **changes})


@scenario("external-send-image-hf")
def _(w, mp):
    _external_writer(w, **{"sample.external.send_image": True})


@scenario("external-writer-unknown-role")
def _(w, mp):
    _external_writer(w, **{"sample.external.writer.role": "surgeon"})


@scenario("external-too-many-failed")
def _(w, mp):
    mp.setenv("MEDALIGN_JUDGE_KEY", "any-value")
    server = _loopback_judge_server(w)
    server.chat_error = (400, b'{"error": {"message": "this model does not write lists"}}')
    writer = openai_judge(base_url=server.url, model="judge-a", role="writer")
    _external_writer(w, **{"sample.external.writer": writer})


# Extra checks of the rows that need more than an exit code and a message.
CHECKS: dict[str, Callable[[str], None]] = {
    "judge-api-key-in-params": lambda output: _assert(SECRET not in output, "the key is echoed"),
    "skip-bad": lambda output: _check_skipped_report(),
    "train-test-leakage-allowed": lambda output: _assert(
        json.loads(Path("reports/prepare.json").read_text())["leakage"]["image"]["test_rows"] == 3, "not reported"),
    "json-with-bom": lambda output: _assert(
        [r["row"] for r in json.loads(Path("reports/prepare_skipped.json").read_text())] == [], "rows skipped"),
}


def _assert(condition: bool, what: str) -> None:
    assert condition, what


def _check_skipped_report() -> None:
    skipped = json.loads(Path("reports/prepare_skipped.json").read_text())
    assert [(s["split"], s["file"], s["row"], s["id"]) for s in skipped] == [
        ("train", "data/raw/train.json", "index 3", "q3")
    ]
    assert skipped[0]["reason"] == "missing image: data/raw/images/gone.png not found"


# ---------------------------------------------------------------------------------------------
# the tests


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny") / "model"
    rows = generate_split(4, "train", seed=0, prior=0.7, image_size=16)
    build_tiny([r["question"] for r in rows] + [r["answer"] for r in rows], seed=0).save(folder)
    return folder


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model: Path) -> Iterator[Workspace]:
    monkeypatch.chdir(tmp_path)
    workspace = Workspace(tmp_path, tiny_model)
    yield workspace
    for cleanup in workspace.cleanups:
        cleanup()


def _no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bad params and command lines must fail before any model is loaded."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was loaded before the params / command line were checked")

    for target in ("pipeline.models.profiles.load_vlm", "pipeline.models.profiles.initial_model",
                   "pipeline.stages.rerank.load_embedder", "pipeline.rerank.load_embedder",
                   "pipeline.judges.backends.hf.load_model"):
        monkeypatch.setattr(target, refuse)


def _plain(text: str) -> str:
    """Output as one line of words: no colours, no box drawing (Typer's usage errors), no wrapping."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    text = re.sub(r"[\u2500-\u257f]", " ", text)
    return " ".join(text.split())


def test_the_table_has_one_scenario_per_row() -> None:
    cases = [row.case for row in ROWS]
    assert len(cases) == len(set(cases)), "duplicate case ids in docs/bad-inputs.md"
    assert not set(cases) - set(SCENARIOS), f"rows without a scenario here: {sorted(set(cases) - set(SCENARIOS))}"
    assert not set(SCENARIOS) - set(cases), f"scenarios without a row: {sorted(set(SCENARIOS) - set(cases))}"
    for row in ROWS:
        assert row.stage in STAGES, f"{row.case}: unknown stage {row.stage!r}"
        assert row.exit in (0, 1, 2), f"{row.case}: exit {row.exit}"
        assert row.excerpt.strip() and "|" not in row.excerpt, row.case


@pytest.mark.parametrize("row", ROWS, ids=[row.case for row in ROWS])
def test_bad_input(row: Row, workspace: Workspace, monkeypatch: pytest.MonkeyPatch,
                   capsys: pytest.CaptureFixture[str]) -> None:
    assert row.case in SCENARIOS, f"docs/bad-inputs.md row {row.case!r} has no scenario in {__file__}"
    SCENARIOS[row.case](workspace, monkeypatch)
    workspace.write_params()
    if row.exit == 2:
        _no_model_loads(monkeypatch)
    module = importlib.import_module(f"pipeline.stages.{row.stage}")
    monkeypatch.setattr(sys, "argv", [row.stage, *workspace.args(row.stage)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(module.app)
    out, err = capsys.readouterr()
    code = exit_info.value.code or 0
    assert code == row.exit, f"exit {code}, expected {row.exit}; stderr:\n{err}"
    assert "Traceback" not in err + out
    shown = err if row.exit else out + err
    assert _plain(row.excerpt) in _plain(shown), f"excerpt {row.excerpt!r} not in:\n{shown}"
    if row.exit:  # after any progress bar: the error message, or Typer's usage block
        assert re.search(r"(^|[\r\n])(error|Usage): ", err), err
    if row.case in CHECKS:
        CHECKS[row.case](out + err)


def test_real_entry_point_prints_no_traceback(workspace: Workspace) -> None:
    """`python -m pipeline.stages.evaluate` itself: exit 2, the message, no traceback."""
    workspace.set(**{"evaluate.batch_size": 0})
    workspace.write_params()
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.stages.evaluate", *COMMANDS["evaluate"]],
        cwd=workspace.root, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: params.yaml: `evaluate.batch_size` must be greater than or equal to 1")
    assert "Traceback" not in result.stderr

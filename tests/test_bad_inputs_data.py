"""Bad inputs to the data and model loaders fail as `pipeline.errors` expected failures whose
messages name the file (and row, line, column) and say what to do."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.data.images import ImageError
from pipeline.data.ingest import IngestError, ingest
from pipeline.errors import DataError, InputNotFoundError, ModelLoadError, PipelineError
from pipeline.models.profiles import load_vlm
from pipeline.models.sources import is_hub_id
from pipeline.schema import VQA_SCHEMA, SchemaError, read_rows, read_table, write_rows

BOM = b"\xef\xbb\xbf"


@pytest.fixture
def images(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    Image.fromarray(np.full((6, 8, 3), 90, dtype=np.uint8), mode="RGB").save(root / "a.png")
    return root


def item(i: int, **changes: object) -> dict:
    return {"qid": f"q{i}", "image": "a.png", "question": f"Question {i}?", "answer": "yes", **changes}


def jsonl(items: list[dict]) -> str:
    return "".join(json.dumps(x) + "\n" for x in items)


# ---------------------------------------------------------------------------------------------
# error classes and missing / unreadable files


def test_data_errors_are_pipeline_errors_and_still_value_errors() -> None:
    for cls in (IngestError, ImageError, SchemaError):
        assert issubclass(cls, DataError) and issubclass(cls, PipelineError) and issubclass(cls, ValueError)


def test_missing_input_file_is_input_not_found_naming_the_path(tmp_path: Path, images: Path) -> None:
    missing = tmp_path / "raw" / "train.json"
    with pytest.raises(InputNotFoundError) as err:
        ingest(missing, None, images, "train", "x", skip_bad=False, turns="first")
    assert isinstance(err.value, FileNotFoundError)
    assert str(err.value) == (
        f"{missing}: file not found; check the path (prepare.files in params.yaml) and that the "
        "dataset has been put there (see docs/data-formats.md)"
    )


def test_read_rows_missing_parquet_names_the_path_and_dvc_repro(tmp_path: Path) -> None:
    path = tmp_path / "data" / "pool.parquet"
    with pytest.raises(InputNotFoundError) as err:
        read_rows(path, VQA_SCHEMA)
    assert isinstance(err.value, FileNotFoundError)
    assert str(err.value) == f"{path}: file not found; run the upstream stage that writes it first (`dvc repro`)"


def test_read_table_corrupt_or_empty_parquet_is_a_data_error_naming_the_path(tmp_path: Path) -> None:
    good = tmp_path / "good.parquet"
    write_rows([], good, VQA_SCHEMA)
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(DataError) as err:
        read_table(truncated, VQA_SCHEMA)
    msg = str(err.value)
    assert msg.startswith(f"{truncated}: not a readable Parquet file (")
    assert msg.endswith("it is corrupt or truncated: re-create it by re-running the stage that writes it (`dvc repro`)")

    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    with pytest.raises(DataError) as err:
        read_rows(empty, VQA_SCHEMA)
    assert str(err.value) == (
        f"{empty}: the file is empty (0 bytes), expected a Parquet table; re-create it by re-running "
        "the stage that writes it (`dvc repro`)"
    )


def test_read_table_schema_mismatch_says_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"id": ["a"]}), path)
    with pytest.raises(SchemaError) as err:
        read_table(path, VQA_SCHEMA)
    assert str(err.value) == (
        f"{path}: missing column 'dataset'; is it the right file? If so, re-create it with the current "
        "code (`dvc repro`)"
    )


# ---------------------------------------------------------------------------------------------
# byte-order marks


def test_json_and_jsonl_with_a_utf8_bom_are_read(tmp_path: Path, images: Path) -> None:
    src_json = tmp_path / "bom.json"
    src_json.write_bytes(BOM + json.dumps([item(0), item(1)]).encode())
    rows = ingest(src_json, None, images, "train", "x", skip_bad=False, turns="first").rows
    assert [r["id"] for r in rows] == ["q0", "q1"]

    src_jsonl = tmp_path / "bom.jsonl"
    src_jsonl.write_bytes(BOM + jsonl([item(0), item(1)]).encode())
    result = ingest(src_jsonl, None, images, "train", "x", skip_bad=False, turns="first")
    assert [r["id"] for r in result.rows] == ["q0", "q1"] and result.skipped == []


# ---------------------------------------------------------------------------------------------
# empty files


JSON_EXPECTED = (
    "expected a JSON list of question objects, each with an image, a question and an answer "
    "(see docs/data-formats.md)"
)
JSONL_EXPECTED = (
    "expected one JSON question object per line, each with an image, a question and an answer "
    "(see docs/data-formats.md)"
)
PARQUET_EXPECTED = (
    "expected a Parquet table with one row per question, each with an image, a question and an "
    "answer (see docs/data-formats.md)"
)


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("zero.json", b"", JSON_EXPECTED),
        ("spaces.json", b"  \n\t\n", JSON_EXPECTED),
        ("bom-only.json", BOM + b"\n", JSON_EXPECTED),
        ("zero.jsonl", b"", JSONL_EXPECTED),
        ("blank.jsonl", b"\n\n   \n", JSONL_EXPECTED),
    ],
)
def test_empty_text_file_says_it_is_empty(
    tmp_path: Path, images: Path, name: str, content: bytes, expected: str
) -> None:
    src = tmp_path / name
    src.write_bytes(content)
    for skip_bad in (False, True):
        with pytest.raises(IngestError) as err:
            ingest(src, None, images, "train", "x", skip_bad=skip_bad, turns="first")
        assert str(err.value) == f"{src}: the file is empty; {expected}"


def test_empty_json_list_and_parquet_without_rows_say_they_have_no_rows(tmp_path: Path, images: Path) -> None:
    src = tmp_path / "list.json"
    src.write_text("[ ]\n")
    with pytest.raises(IngestError) as err:
        ingest(src, None, images, "train", "x", skip_bad=True, turns="first")
    assert str(err.value) == f"{src}: the file has no rows (an empty JSON list); {JSON_EXPECTED}"

    zero = tmp_path / "zero.parquet"
    zero.write_bytes(b"")
    with pytest.raises(IngestError) as err:
        ingest(zero, None, images, "train", "x", skip_bad=False, turns="first")
    assert str(err.value) == f"{zero}: the file is empty (0 bytes); {PARQUET_EXPECTED}"

    no_rows = tmp_path / "no_rows.parquet"
    pq.write_table(pa.table({"image": pa.array([], pa.string()), "question": pa.array([], pa.string()),
                             "answer": pa.array([], pa.string())}), no_rows)
    with pytest.raises(IngestError) as err:
        ingest(no_rows, None, images, "train", "x", skip_bad=False, turns="first")
    assert str(err.value) == f"{no_rows}: the file has no rows; {PARQUET_EXPECTED}"


# ---------------------------------------------------------------------------------------------
# malformed JSON / JSONL: line and column


def test_truncated_jsonl_line_names_file_line_and_column(tmp_path: Path, images: Path) -> None:
    truncated = '{"qid": "q3", "question": "Is th'
    assert truncated.index('"Is') + 1 == 27
    src = tmp_path / "data.jsonl"
    # line 1, a blank line 2 (still counted), line 3, the cut-off line 4
    src.write_text(json.dumps(item(0)) + "\n\n" + json.dumps(item(1)) + "\n" + truncated)
    with pytest.raises(IngestError) as err:
        ingest(src, None, images, "train", "x", skip_bad=False, turns="first")
    msg = str(err.value)
    assert msg.startswith(f"{src}: 1 of 3 rows are bad; fix them, or set skip_bad: true")
    assert "  invalid row: 1 rows, e.g. line 4, column 27: invalid JSON (Unterminated string starting at)" in msg

    # skip_bad keeps today's behaviour: a bad line is a bad row, skipped and reported
    result = ingest(src, None, images, "train", "x", skip_bad=True, turns="first")
    assert [r["id"] for r in result.rows] == ["q0", "q1"]
    assert result.skipped == [
        {
            "file": str(src),
            "row": "line 4",
            "id": None,
            "reason": "invalid row: line 4, column 27: invalid JSON (Unterminated string starting at)",
        }
    ]


def test_jsonl_column_is_within_the_line_and_unicode_separators_do_not_split_lines(
    tmp_path: Path, images: Path
) -> None:
    # U+2028 is valid unescaped inside a JSON string; it must not start a new "line".
    src = tmp_path / "data.jsonl"
    first = json.dumps(item(0, question="Left\u2028lung?"), ensure_ascii=False)
    src.write_bytes(BOM + (first + "\n" + '{"qid": "q1", "answer": yes}\n').encode())
    result = ingest(src, None, images, "train", "x", skip_bad=True, turns="first")
    assert [r["question"] for r in result.rows] == ["Left\u2028lung?"]
    assert result.skipped[0]["row"] == "line 2"
    assert result.skipped[0]["reason"] == "invalid row: line 2, column 25: invalid JSON (Expecting value)"


def test_malformed_json_file_names_line_and_column(tmp_path: Path, images: Path) -> None:
    src = tmp_path / "data.json"
    src.write_text('[\n  {"qid": "q0", "image": "a.png",\n   "question": "Is it?" "answer": "yes"}\n]\n')
    with pytest.raises(IngestError) as err:
        ingest(src, None, images, "train", "x", skip_bad=True, turns="first")
    assert str(err.value) == (
        f"{src}: line 3, column 25: invalid JSON (Expecting ',' delimiter); fix the file (is it truncated?)"
    )

    cut = tmp_path / "cut.json"
    cut.write_text(json.dumps([item(0), item(1)], indent=1)[:40])
    with pytest.raises(IngestError, match=r"cut.json: line \d+, column \d+: invalid JSON \(.*is it truncated"):
        ingest(cut, None, images, "train", "x", skip_bad=False, turns="first")


# ---------------------------------------------------------------------------------------------
# skip_bad: every skipped row, structured


def test_skipped_holds_every_bad_row_as_a_report_ready_dict(tmp_path: Path, images: Path) -> None:
    items = [item(i) for i in range(3)]
    items += [item(i, answer=" ") for i in range(3, 28)]  # 25 bad rows: more than any listing shows
    items.append(item(28, image="absent.png", question=""))  # two problems in one row
    src = tmp_path / "train.json"
    src.write_text(json.dumps(items))
    result = ingest(src, None, images, "train", "x", skip_bad=True, turns="first")
    assert [r["id"] for r in result.rows] == ["q0", "q1", "q2"]
    assert len(result.skipped) == 26
    assert result.skipped[0] == {"file": str(src), "row": "index 3", "id": "q3", "reason": "empty answer: no answer text"}
    assert [s["row"] for s in result.skipped] == [f"index {i}" for i in range(3, 29)]
    assert [s["id"] for s in result.skipped] == [f"q{i}" for i in range(3, 29)]
    assert result.skipped[-1]["reason"] == (
        f"empty question: no question text; missing image: {images / 'absent.png'} not found"
    )
    assert json.loads(json.dumps(result.skipped)) == result.skipped  # writable as a report


def test_skipped_ids_are_none_when_the_file_has_no_ids(tmp_path: Path, images: Path) -> None:
    src = tmp_path / "t.parquet"
    pq.write_table(pa.table({"image": ["a.png", "gone.png"], "question": ["q?", "q?"], "answer": ["a", "b"]}), src)
    result = ingest(src, None, images, "train", "x", skip_bad=True, turns="first")
    assert [r["id"] for r in result.rows] == ["train-000000"]
    assert result.skipped == [
        {"file": str(src), "row": "row 1", "id": None, "reason": f"missing image: {images / 'gone.png'} not found"}
    ]


# ---------------------------------------------------------------------------------------------
# model folders


RECREATE = (
    "re-create it (`dvc repro -f sft` for models/sft, `dvc repro -f train` for models/aligned) "
    "or re-download the checkpoint"
)


def test_truncated_safetensors_is_a_model_load_error_naming_folder_and_file(tiny_vlm, tmp_path: Path) -> None:
    folder = tmp_path / "sft"
    tiny_vlm.save(folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError) as err:
        load_vlm(folder, device="cpu", dtype=torch.float32)
    assert isinstance(err.value, OSError)
    msg = str(err.value)
    assert msg.startswith(f"{folder}: model.safetensors is truncated or corrupt (")
    assert msg.endswith(f"the model folder is incomplete or corrupt: {RECREATE}")

    weights.write_bytes(b"\x01")  # not even a header
    with pytest.raises(ModelLoadError, match=r"sft: model.safetensors is truncated or corrupt .*header"):
        load_vlm(folder, device="cpu", dtype=torch.float32)

    weights.unlink()  # weights missing altogether: transformers' error, with the folder and the fix
    with pytest.raises(ModelLoadError) as err:
        load_vlm(folder, device="cpu", dtype=torch.float32)
    msg = str(err.value)
    assert msg.startswith(f"{folder}: cannot load the model (OSError: ") and "model.safetensors" in msg
    assert msg.endswith(f"the folder is incomplete or corrupt: {RECREATE}")


def test_folder_without_config_is_a_model_load_error(tmp_path: Path) -> None:
    folder = tmp_path / "half"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError) as err:
        load_vlm(folder, device="cpu")
    assert str(err.value) == (
        f"{folder}: config.json is missing, so this is not a (complete) Hugging Face model folder; "
        f"check the path, or, if it is right, the folder is incomplete or corrupt: {RECREATE}"
    )


def test_missing_local_model_path_is_input_not_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fix = "model folder not found; check the path, run the stage that writes it first (`dvc repro`), " \
          "or give a Hugging Face hub id (`org/name`)"
    missing = tmp_path / "models" / "sft"
    with pytest.raises(InputNotFoundError) as err:
        load_vlm(missing, device="cpu")
    assert str(err.value) == f"{missing}: {fix}"
    # `models/sft` has the shape of a hub id, but `models/` is a local folder: a path, not the hub
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(InputNotFoundError, match=r"^models/sft: model folder not found"):
        load_vlm("models/sft", device="cpu")
    with pytest.raises(InputNotFoundError, match=r"^sft: model folder not found"):
        load_vlm("sft", device="cpu")


def test_hub_ids_are_still_recognised() -> None:
    assert is_hub_id("llava-hf/llava-1.5-7b-hf")
    assert is_hub_id("microsoft/llava-med-v1.5-mistral-7b")
    for path in ("./models/sft", "/abs/models/sft", "sft", "a/b/c", "org--x/name", "../up/model"):
        assert not is_hub_id(path), path

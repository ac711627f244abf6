"""Tests for image decoding (PNG/JPEG/DICOM) and VQA file ingestion into VQA_SCHEMA rows.

All fixtures are generated in tmp_path; DICOM samples come from pydicom's bundled test files
(never downloaded) or are built here with pydicom.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.pixels import pixel_array
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from pipeline.data.images import ImageError, decode_image, encode_png, load_image
from pipeline.data.ingest import IngestError, IngestResult, RowFilter, infer_answer_type, ingest
from pipeline.errors import DataError, InputNotFoundError
from pipeline.schema import VQA_SCHEMA, read_rows, write_rows

# ---------------------------------------------------------------------------------------------
# helpers


def bundled(name: str) -> str:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom test file {name} is not bundled"
    return str(path)


def grey(img: Image.Image) -> np.ndarray:
    """The single channel of a grey RGB image (checking that it is grey)."""
    arr = np.asarray(img)
    assert img.mode == "RGB"
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    return arr[..., 0].astype(int)


def write_png(path: Path, value: int = 100, size: tuple[int, int] = (8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size[1], size[0], 3), value, dtype=np.uint8)
    arr[0, 0] = (255, 0, 0)  # a coloured pixel so channel order is checked
    Image.fromarray(arr, mode="RGB").save(path)
    return path


def png_bytes(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), value, dtype=np.uint8), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def mono_dicom(
    path: Path,
    frames: np.ndarray,
    photometric: str = "MONOCHROME2",
    **tags: object,
) -> Path:
    """Write an uncompressed 16-bit unsigned greyscale DICOM; `frames` is (rows, cols) or (n, rows, cols)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = 1
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.Rows, ds.Columns = frames.shape[-2:]
    if frames.ndim == 3:
        ds.NumberOfFrames = frames.shape[0]
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = frames.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


RAMP = np.tile(np.arange(0, 1001, 10, dtype=np.uint16), (4, 1))  # 4 x 101, values 0..1000


# ---------------------------------------------------------------------------------------------
# images: PNG / JPEG


def test_png_and_jpeg_load_as_rgb(tmp_path: Path) -> None:
    png = write_png(tmp_path / "a.png", value=100)
    img = load_image(png)
    assert img.mode == "RGB" and img.size == (8, 6)
    assert tuple(np.asarray(img)[0, 0]) == (255, 0, 0)
    assert tuple(np.asarray(img)[1, 1]) == (100, 100, 100)

    jpg = tmp_path / "a.jpg"
    Image.fromarray(np.full((6, 8), 150, dtype=np.uint8), mode="L").save(jpg, quality=95)
    arr = np.asarray(load_image(jpg))
    assert arr.shape == (6, 8, 3) and abs(int(arr.mean()) - 150) <= 2

    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (3, 3), (10, 20, 30, 40)).save(rgba)
    assert tuple(np.asarray(load_image(rgba))[0, 0]) == (10, 20, 30)


def test_16bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    # convert("RGB") alone would clip every value above 255 to white.
    arr = np.array([[0, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    assert grey(load_image(path)).tolist() == [[0, 128, 255]]


def test_encode_decode_round_trip(tmp_path: Path) -> None:
    img = load_image(write_png(tmp_path / "a.png"))
    data = encode_png(img)
    assert data.startswith(b"\x89PNG")
    assert np.array_equal(np.asarray(decode_image(data)), np.asarray(img))


def test_image_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="nope.png"):
        load_image(tmp_path / "nope.png")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match="junk.png"):
        load_image(junk)
    bad_dcm = tmp_path / "junk.dcm"
    bad_dcm.write_bytes(b"\0" * 300)
    with pytest.raises(ImageError, match="junk.dcm"):
        load_image(bad_dcm)
    with pytest.raises(ImageError, match="no pixel data"):
        load_image(bundled("rtplan.dcm"))
    with pytest.raises(ImageError, match="<5 bytes>"):
        decode_image(b"xxxxx")
    assert issubclass(ImageError, DataError) and issubclass(ImageError, ValueError)


# ---------------------------------------------------------------------------------------------
# images: DICOM


def test_bundled_ct_without_window_is_stretched() -> None:
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    assert "WindowCenter" not in ds  # so the HU range itself is stretched to 0..255
    hu = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = np.round((hu - hu.min()) / (hu.max() - hu.min()) * 255)
    out = grey(load_image(bundled("CT_small.dcm")))
    assert out.shape == (128, 128)
    assert np.abs(out - expected).max() <= 1


def test_bundled_mr_applies_its_window() -> None:
    ds = pydicom.dcmread(bundled("MR_small.dcm"))
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    v = ds.pixel_array.astype(float)
    # PS3.3 C.11.2.1.2.1 LINEAR window, mapped onto 0..255
    expected = np.round(np.clip((v - (center - 0.5)) / (width - 1) + 0.5, 0, 1) * 255)
    out = grey(load_image(bundled("MR_small.dcm")))
    assert np.abs(out - expected).max() <= 1
    assert out.max() == 255  # the window saturates the brightest tissue


def test_monochrome1_ramp_is_reversed(tmp_path: Path) -> None:
    mono2 = grey(load_image(mono_dicom(tmp_path / "m2.dcm", RAMP, "MONOCHROME2")))
    mono1 = grey(load_image(mono_dicom(tmp_path / "m1.dcm", RAMP, "MONOCHROME1")))
    assert mono2[0, 0] == 0 and mono2[0, -1] == 255
    assert (np.diff(mono2[0]) >= 0).all()
    assert mono1[0, 0] == 255 and mono1[0, -1] == 0
    assert np.array_equal(mono1, 255 - mono2)


def test_window_saturates_outside_and_respects_rescale(tmp_path: Path) -> None:
    plain = grey(load_image(mono_dicom(tmp_path / "plain.dcm", RAMP)))
    windowed = grey(load_image(mono_dicom(tmp_path / "w.dcm", RAMP, WindowCenter=500, WindowWidth=200)))
    values = RAMP[0].astype(int)
    assert (windowed[0][values <= 399] == 0).all()
    assert (windowed[0][values > 600] == 255).all()
    inside = (values > 420) & (values < 580)
    assert (np.diff(windowed[0][inside]) > 0).all()
    assert not np.array_equal(plain, windowed)
    # The same window in rescaled units (stored 0..1000 -> -1000..0) selects the same pixels.
    rescaled = grey(
        load_image(
            mono_dicom(
                tmp_path / "r.dcm",
                RAMP,
                RescaleSlope=1,
                RescaleIntercept=-1000,
                WindowCenter=-500,
                WindowWidth=200,
            )
        )
    )
    assert np.array_equal(rescaled, windowed)


def test_voi_lut_sequence_is_applied(tmp_path: Path) -> None:
    item = Dataset()
    # Both elements have ambiguous VRs, so they are added with explicit ones.
    # 16-bit entries: pydicom 3.0 indexes 8-bit LUTs through uint8, which wraps beyond 256 entries.
    item.add_new("LUTDescriptor", "US", [1001, 0, 16])
    # A step LUT: stored values < 500 -> 0, >= 500 -> 3000 (the table's maximum maps to 255).
    item.add_new("LUTData", "US", [0] * 500 + [3000] * 501)
    path = mono_dicom(tmp_path / "lut.dcm", RAMP, VOILUTSequence=[item])
    out = grey(load_image(path))
    values = RAMP[0]
    assert (out[0][values < 500] == 0).all() and (out[0][values >= 500] == 255).all()


def test_multiframe_takes_middle_frame(tmp_path: Path) -> None:
    frames = np.zeros((5, 4, 6), dtype=np.uint16)
    for k in range(5):
        frames[k, :, k] = 1000  # frame k is marked by a bright column k
    out = grey(load_image(mono_dicom(tmp_path / "mf.dcm", frames)))
    assert out.shape == (4, 6)
    assert (out[:, 2] == 255).all() and (np.delete(out, 2, axis=1) == 0).all()


def test_enhanced_multiframe_window_from_functional_groups(tmp_path: Path) -> None:
    frames = np.stack([RAMP] * 3)
    voi = Dataset()
    voi.WindowCenter = 500
    voi.WindowWidth = 200
    shared = Dataset()
    shared.FrameVOILUTSequence = [voi]
    path = mono_dicom(tmp_path / "enh.dcm", frames, SharedFunctionalGroupsSequence=[shared])
    top_level = grey(load_image(mono_dicom(tmp_path / "w.dcm", RAMP, WindowCenter=500, WindowWidth=200)))
    assert np.array_equal(grey(load_image(path)), top_level)


def test_rgb_dicoms(tmp_path: Path) -> None:
    ds = pydicom.dcmread(bundled("SC_rgb_rle.dcm"))
    assert np.array_equal(np.asarray(load_image(bundled("SC_rgb_rle.dcm"))), ds.pixel_array)
    # multi-frame colour: the middle of 2 frames is frame 1
    two = bundled("SC_rgb_rle_2frame.dcm")
    assert np.array_equal(np.asarray(load_image(two)), pixel_array(two, index=1))
    # 16-bit colour is scaled by its bit depth, not clipped
    deep = bundled("SC_rgb_rle_16bit.dcm")
    expected = np.round(pixel_array(deep).astype(float) / 65535 * 255)
    assert np.abs(np.asarray(load_image(deep)).astype(int) - expected).max() <= 1
    # YBR (JPEG baseline) comes back as RGB
    assert load_image(bundled("SC_rgb_jpeg_dcmtk.dcm")).mode == "RGB"


def test_dicom_detected_by_magic_without_suffix(tmp_path: Path) -> None:
    plain = tmp_path / "scan"  # PACS exports often have no suffix
    shutil.copy(bundled("CT_small.dcm"), plain)
    expected = np.asarray(load_image(bundled("CT_small.dcm")))
    assert np.array_equal(np.asarray(load_image(plain)), expected)
    assert np.array_equal(np.asarray(decode_image(plain.read_bytes())), expected)


# ---------------------------------------------------------------------------------------------
# ingest: happy paths


@pytest.fixture
def images(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    write_png(root / "synpic1.png", 50)
    write_png(root / "sub" / "synpic2.png", 150)
    Image.fromarray(np.full((6, 8), 200, dtype=np.uint8), mode="L").save(root / "photo.jpg")
    shutil.copy(bundled("MR_small.dcm"), root / "mr.dcm")
    return root


def round_trip(result: IngestResult, tmp_path: Path) -> list[dict]:
    path = tmp_path / "out.parquet"
    write_rows(result.rows, path, VQA_SCHEMA)
    back = read_rows(path, VQA_SCHEMA)
    assert back == result.rows
    assert set(back[0]) == set(VQA_SCHEMA.names)
    assert len({r["id"] for r in back}) == len(back)
    return back


def write_json(path: Path, items: list) -> Path:
    path.write_text(json.dumps(items))
    return path


def test_json_vqa_rad_and_slake_fields(tmp_path: Path, images: Path) -> None:
    items = [
        {
            "qid": 1,
            "image_name": "synpic1.png",
            "question": "Is there a fracture?",
            "answer": "No",
            "answer_type": "CLOSED",
            "question_type": "PRES",
            "phrase_type": "freeform",
        },
        {
            "qid": 2,
            "image_name": "synpic1.png",
            "question": "How many lesions?",
            "answer": 2,  # VQA-RAD has numeric answers
            "answer_type": "OPEN",
            "question_type": "COUNT",
        },
        {
            "qid": 3,
            "img_name": "sub/synpic2.png",
            "question": "  Which organ is abnormal? ",
            "answer": "Liver ",
            "answer_type": "open",
            "q_lang": "en",
            "modality": "CT",
            "content_type": "Organ",
        },
        {
            "qid": "4",
            "image": "mr.dcm",
            "question": "Is it an MRI?",
            "answer": "yes",
            "answer_type": "yes/no",
        },
    ]
    src = write_json(tmp_path / "train.json", items)
    result = ingest(src, None, images, "train", "vqa-rad", skip_bad=False, turns="first")
    assert result.skipped == []
    rows = round_trip(result, tmp_path)
    assert [r["id"] for r in rows] == ["1", "2", "3", "4"]
    assert [r["answer_type"] for r in rows] == ["closed", "open", "open", "closed"]
    assert rows[1]["answer"] == "2"
    assert rows[2]["question"] == "Which organ is abnormal?" and rows[2]["answer"] == "Liver"
    assert [r["modality"] for r in rows] == ["unknown", "unknown", "CT", "unknown"]
    assert [r["question_type"] for r in rows] == ["PRES", "COUNT", "Organ", "unknown"]
    assert {r["dataset"] for r in rows} == {"vqa-rad"} and {r["split"] for r in rows} == {"train"}
    assert all(r["image"].startswith(b"\x89PNG") for r in rows)
    assert np.array_equal(
        np.asarray(decode_image(rows[2]["image"])), np.asarray(load_image(images / "sub/synpic2.png"))
    )
    assert np.array_equal(
        np.asarray(decode_image(rows[3]["image"])), np.asarray(load_image(images / "mr.dcm"))
    )


def test_jsonl_flat_and_conversation_format(tmp_path: Path, images: Path) -> None:
    lines = [
        {
            "question_id": "a",
            "image": "photo.jpg",
            "text": "<image>\nWhat stain is used?",
            "gt_answer": "H&E",
            "gpt4_answer": "hematoxylin",
            "answer_type": "OPEN",
        },
        {
            "id": "b",
            "image": "synpic1.png",
            "conversations": [
                {"from": "human", "value": "<image>\nIs the heart enlarged?"},
                {"from": "gpt", "value": "Yes"},
            ],
            "answer_type": "CLOSED",
        },
    ]
    src = tmp_path / "test.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    rows = round_trip(ingest(src, None, images, "test", "pathvqa", skip_bad=False, turns="first"), tmp_path)
    assert [r["id"] for r in rows] == ["a", "b"]
    assert rows[0]["question"] == "What stain is used?" and rows[0]["answer"] == "H&E"
    assert rows[1]["question"] == "Is the heart enlarged?" and rows[1]["answer"] == "Yes"
    assert [r["answer_type"] for r in rows] == ["open", "closed"]


def test_explicit_format_overrides_suffix(tmp_path: Path, images: Path) -> None:
    src = tmp_path / "data.txt"
    src.write_text(json.dumps({"id": 1, "image": "synpic1.png", "question": "q?", "answer": "a"}) + "\n")
    with pytest.raises(IngestError, match="data.txt.*suffix"):
        ingest(src, None, images, "train", "x", skip_bad=False, turns="first")
    assert len(ingest(src, "jsonl", images, "train", "x", skip_bad=False, turns="first").rows) == 1
    with pytest.raises(IngestError, match="unknown format 'csv'"):
        ingest(src, "csv", images, "train", "x", skip_bad=False, turns="first")


def test_image_root_defaults_to_source_directory(tmp_path: Path) -> None:
    write_png(tmp_path / "img.png")
    src = write_json(tmp_path / "d.json", [{"id": 1, "image": "img.png", "question": "q?", "answer": "a"}])
    assert len(ingest(src, None, None, "train", "x", skip_bad=False, turns="first").rows) == 1


def test_parquet_struct_images_infers_answer_type_and_ids(tmp_path: Path) -> None:
    struct = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
    table = pa.table(
        {
            "image": pa.array(
                [
                    {"bytes": png_bytes(10), "path": "a.png"},
                    {"bytes": png_bytes(20), "path": None},
                    {"bytes": png_bytes(10), "path": "a.png"},
                ],
                type=struct,
            ),
            "question": ["Is this normal?", "Where is the mass?", "Is there effusion?"],
            "answer": ["yes", "left lung", "No."],
        }
    )
    src = tmp_path / "train-00000.parquet"
    pq.write_table(table, src)
    rows = round_trip(ingest(src, None, None, "train", "vqa-rad", skip_bad=False, turns="first"), tmp_path)
    assert [r["id"] for r in rows] == ["train-000000", "train-000001", "train-000002"]
    assert [r["answer_type"] for r in rows] == ["closed", "open", "closed"]
    assert np.asarray(decode_image(rows[1]["image"]))[0, 0].tolist() == [20, 20, 20]


def test_parquet_binary_images_with_ids_and_types(tmp_path: Path) -> None:
    table = pa.table(
        {
            "id": ["p1", "p2"],
            "image": pa.array([png_bytes(30), bundled_bytes("CT_small.dcm")], type=pa.binary()),
            "question": ["What organ?", "Is there a bleed?"],
            "answer": ["brain", "no"],
            "answer_type": ["OPEN", "CLOSED"],
            "modality": ["MRI", "CT"],
        }
    )
    src = tmp_path / "test.parquet"
    pq.write_table(table, src)
    rows = round_trip(ingest(src, None, None, "test", "slake", skip_bad=False, turns="first"), tmp_path)
    assert [r["id"] for r in rows] == ["p1", "p2"]
    assert [r["answer_type"] for r in rows] == ["open", "closed"]
    assert [r["modality"] for r in rows] == ["MRI", "CT"]
    assert decode_image(rows[1]["image"]).size == (128, 128)  # DICOM bytes found by their magic


def bundled_bytes(name: str) -> bytes:
    return Path(bundled(name)).read_bytes()


def test_parquet_image_paths_resolve_against_image_root(tmp_path: Path, images: Path) -> None:
    table = pa.table({"image": ["synpic1.png"], "question": ["q?"], "answer": ["a"]})
    src = tmp_path / "paths.parquet"
    pq.write_table(table, src)
    assert len(ingest(src, None, images, "train", "x", skip_bad=False, turns="first").rows) == 1


def test_infer_answer_type() -> None:
    assert infer_answer_type(" Yes. ") == "closed"
    assert infer_answer_type("NO") == "closed"
    assert infer_answer_type("yes, on the left") == "open"
    assert infer_answer_type("2") == "open"


# ---------------------------------------------------------------------------------------------
# ingest: bad input


def good(i: int) -> dict:
    return {
        "qid": f"q{i}",
        "image_name": "synpic1.png",
        "question": f"Question {i}?",
        "answer": "yes",
        "answer_type": "CLOSED",
    }


BAD_CASES = {
    "missing image": ({"image_name": "absent.png"}, "absent.png not found"),
    "unreadable image": ({"image_name": "junk.png"}, "junk.png"),
    "empty question": ({"question": "<image>\n  "}, "no question text"),
    "empty answer": ({"answer": ""}, "no answer text"),
    "unknown answer type": ({"answer_type": "NUMBER"}, "'NUMBER'"),
}


@pytest.mark.parametrize("kind", sorted(BAD_CASES))
def test_bad_row_is_an_error_naming_file_and_row(tmp_path: Path, images: Path, kind: str) -> None:
    (images / "junk.png").write_bytes(b"garbage")
    change, detail = BAD_CASES[kind]
    items = [good(0), {**good(1), "qid": "bad1", **change}, good(2)]
    src = write_json(tmp_path / "train.json", items)
    with pytest.raises(IngestError) as err:
        ingest(src, None, images, "train", "vqa-rad", skip_bad=False, turns="first")
    msg = str(err.value)
    assert str(src) in msg and "1 of 3 rows are bad" in msg
    assert f"{kind}: 1 rows" in msg and "bad1 (index 1)" in msg and detail in msg
    assert "q0" not in msg and "q2" not in msg

    result = ingest(src, None, images, "train", "vqa-rad", skip_bad=True, turns="first")
    assert [r["id"] for r in result.rows] == ["q0", "q2"]
    assert len(result.skipped) == 1
    skipped = result.skipped[0]
    assert skipped["file"] == str(src) and skipped["row"] == "index 1" and skipped["id"] == "bad1"
    assert skipped["reason"].startswith(f"{kind}: ") and detail in skipped["reason"]


def test_many_bad_rows_list_the_first_few_and_the_count(tmp_path: Path, images: Path) -> None:
    items = [good(i) for i in range(3)] + [{**good(i), "answer": " "} for i in range(3, 10)]
    src = write_json(tmp_path / "train.json", items)
    with pytest.raises(IngestError) as err:
        ingest(src, None, images, "train", "x", skip_bad=False, turns="first")
    msg = str(err.value)
    assert "7 of 10 rows are bad" in msg and "empty answer: 7 rows" in msg
    assert all(f"q{i} (index {i})" in msg for i in range(3, 8)) and "q8" not in msg
    assert "and 2 more" in msg
    result = ingest(src, None, images, "train", "x", skip_bad=True, turns="first")
    assert len(result.rows) == 3 and len(result.skipped) == 7


def test_several_problems_in_one_row_are_all_reported(tmp_path: Path, images: Path) -> None:
    src = write_json(tmp_path / "t.json", [good(0), {**good(1), "image_name": "absent.png", "answer": None}])
    with pytest.raises(IngestError) as err:
        ingest(src, None, images, "train", "x", skip_bad=False, turns="first")
    assert "missing image: 1 rows" in str(err.value) and "empty answer: 1 rows" in str(err.value)


def test_duplicate_ids_are_an_error_even_with_skip_bad(tmp_path: Path, images: Path) -> None:
    items = [good(0), good(1), {**good(2), "qid": "q0"}, {**good(3), "qid": "q1"}]
    src = write_json(tmp_path / "train.json", items)
    for skip_bad in (False, True):
        with pytest.raises(IngestError) as err:
            ingest(src, None, images, "train", "x", skip_bad=skip_bad, turns="first")
        msg = str(err.value)
        assert str(src) in msg and "2 duplicate ids" in msg
        assert "'q0' at index 0, index 2" in msg and "'q1' at index 1, index 3" in msg


def test_no_rows_is_an_error(tmp_path: Path, images: Path) -> None:
    empty = write_json(tmp_path / "empty.json", [])
    with pytest.raises(IngestError, match=r"empty.json: the file has no rows \(an empty JSON list\); expected"):
        ingest(empty, None, images, "train", "x", skip_bad=True, turns="first")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n")
    with pytest.raises(IngestError, match=r"blank.jsonl: the file is empty; expected one JSON question object"):
        ingest(blank, None, images, "train", "x", skip_bad=False, turns="first")
    pq.write_table(
        pa.table(
            {
                "image": pa.array([], pa.binary()),
                "question": pa.array([], pa.string()),
                "answer": pa.array([], pa.string()),
            }
        ),
        tmp_path / "empty.parquet",
    )
    with pytest.raises(IngestError, match=r"empty.parquet: the file has no rows; expected a Parquet table"):
        ingest(tmp_path / "empty.parquet", None, images, "train", "x", skip_bad=False, turns="first")


def test_everything_skipped_is_an_error(tmp_path: Path, images: Path) -> None:
    src = write_json(tmp_path / "t.json", [{**good(0), "image_name": "absent.png"}])
    with pytest.raises(IngestError, match=r"t.json: no usable rows: all 1 rows are bad"):
        ingest(src, None, images, "train", "x", skip_bad=True, turns="first")


def test_malformed_rows_and_files(tmp_path: Path, images: Path) -> None:
    # a row without an id in a file that has ids, a broken conversation, a non-object
    src = tmp_path / "t.jsonl"
    src.write_text(
        "\n".join(
            [
                json.dumps(good(0)),
                json.dumps({**good(1), "qid": None, "answer_type": None}),
                json.dumps(
                    {
                        "qid": "c",
                        "image": "synpic1.png",
                        "answer_type": "open",
                        "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}],
                    }
                ),
                "{not json",
                "[1, 2]",
            ]
        )
    )
    with pytest.raises(IngestError) as err:
        ingest(src, None, images, "train", "x", skip_bad=False, turns="first")
    msg = str(err.value)
    assert "4 of 5 rows are bad" in msg
    assert "missing id: 1 rows, e.g. line 2" in msg and "missing answer type: 1 rows, e.g. line 2" in msg
    assert "c (line 3): `conversations[1]` is a human turn where a gpt turn was expected" in msg
    assert "invalid row: 3 rows" in msg and "line 5: expected an object, got list" in msg
    assert "line 4, column 2: invalid JSON (Expecting property name enclosed in double quotes)" in msg

    with pytest.raises(IngestError, match=r"no row has an answer field"):
        ingest(
            write_json(tmp_path / "noans.json", [{"image": "x.png", "question": "q"}]), None, images, "t", "x",
            skip_bad=False, turns="first",
        )
    with pytest.raises(IngestError, match=r"obj.json: expected a JSON list.*got a dict"):
        ingest(write_json(tmp_path / "obj.json", {"data": []}), None, images, "t", "x", skip_bad=False, turns="first")  # type: ignore[arg-type]
    jsonl_named_json = tmp_path / "lines.json"
    jsonl_named_json.write_text(json.dumps(good(0)) + "\n" + json.dumps(good(1)) + "\n")
    with pytest.raises(IngestError, match=r"lines.json: line 2, column 1: invalid JSON \(Extra data\).*format: jsonl"):
        ingest(jsonl_named_json, None, images, "t", "x", skip_bad=False, turns="first")
    with pytest.raises(InputNotFoundError, match=r"missing.json: file not found; check the path"):
        ingest(tmp_path / "missing.json", None, images, "t", "x", skip_bad=False, turns="first")
    with pytest.raises(InputNotFoundError, match=r"image_root .*nodir is not a directory \(it does not exist\)"):
        ingest(write_json(tmp_path / "ok.json", [good(0)]), None, tmp_path / "nodir", "t", "x", skip_bad=False, turns="first")
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"nope")
    with pytest.raises(IngestError, match=r"junk.parquet: not a readable Parquet file"):
        ingest(junk, None, images, "t", "x", skip_bad=False, turns="first")


# ---------------------------------------------------------------------------------------------
# multi-turn conversations (LLaVA / LLaVA-Med instruction data)


def conv(*texts: str) -> list[dict]:
    """A LLaVA `conversations` list: texts alternate human, gpt, human, ..."""
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(texts)]


LONG = "The scan shows a well-circumscribed hypodense lesion in the left lobe, about 2 cm across."


def instruct_60k_im() -> list[dict]:
    """LLaVA-Med's 60K-IM layout: `id` names the image, so two records about synpic1 share it."""
    return [
        {"id": "img1", "image": "synpic1.png",
         "conversations": conv("<image>\nWhat modality is this?", "CT", "Is there a mass?", "Yes.",
                               "Where is it?", LONG)},
        {"id": "img1", "image": "synpic1.png",
         "conversations": conv("Describe the image.\n<image>", "An axial CT slice of the abdomen.")},
        {"id": "img2", "image": "sub/synpic2.png", "conversations": conv("<image>\nIs it normal?", "no")},
    ]


def test_multi_turn_first_keeps_each_records_first_question(tmp_path: Path, images: Path) -> None:
    src = write_json(tmp_path / "instruct.json", instruct_60k_im())
    result = ingest(src, None, images, "train", "llava-med", skip_bad=False, turns="first")
    rows = round_trip(result, tmp_path)
    assert [r["id"] for r in rows] == ["img1", "img1-r1", "img2"]
    assert [r["question"] for r in rows] == ["What modality is this?", "Describe the image.", "Is it normal?"]
    assert [r["answer"] for r in rows] == ["CT", "An axial CT slice of the abdomen.", "no"]
    assert [r["context"] for r in rows] == [[], [], []]
    # no answer_type field: inferred per answer (closed only for a bare yes/no)
    assert [r["answer_type"] for r in rows] == ["open", "open", "closed"]
    assert result.turns_left_out == 2 and result.skipped == [] and result.excluded == 0


def test_multi_turn_all_makes_one_entry_per_question_with_its_context(tmp_path: Path, images: Path) -> None:
    src = write_json(tmp_path / "instruct.json", instruct_60k_im())
    result = ingest(src, None, images, "train", "llava-med", skip_bad=False, turns="all")
    rows = round_trip(result, tmp_path)
    by_id = {r["id"]: r for r in rows}
    assert [r["id"] for r in rows] == ["img1", "img1-t1", "img1-t2", "img1-r1", "img2"]
    assert by_id["img1"]["context"] == []
    assert by_id["img1-t1"]["question"] == "Is there a mass?" and by_id["img1-t1"]["answer"] == "Yes."
    assert by_id["img1-t1"]["context"] == [{"question": "What modality is this?", "answer": "CT"}]
    assert by_id["img1-t2"]["question"] == "Where is it?" and by_id["img1-t2"]["answer"] == LONG
    assert by_id["img1-t2"]["context"] == [
        {"question": "What modality is this?", "answer": "CT"},
        {"question": "Is there a mass?", "answer": "Yes."},
    ]
    assert by_id["img1-r1"]["context"] == [] and by_id["img1-r1"]["question"] == "Describe the image."
    # "Yes." is a bare yes: closed; the long free-text answer is open
    assert [by_id[k]["answer_type"] for k in ("img1", "img1-t1", "img1-t2")] == ["open", "closed", "open"]
    assert by_id["img1-t2"]["image"] == by_id["img1"]["image"] == by_id["img1-r1"]["image"]
    assert result.turns_left_out == 0
    # the first question's entry has the same id whichever `turns` is used
    first = ingest(src, None, images, "train", "llava-med", skip_bad=False, turns="first").rows
    assert {r["id"]: r for r in first}["img1"] == by_id["img1"]


def test_shared_ids_only_for_conversations_about_one_image(tmp_path: Path, images: Path) -> None:
    items = instruct_60k_im()
    items[1]["image"] = "sub/synpic2.png"  # two conversations share `id` but not the image
    src = write_json(tmp_path / "instruct.json", items)
    for skip_bad in (False, True):
        with pytest.raises(IngestError, match=r"1 duplicate ids .*'img1' at index 0, index 1"):
            ingest(src, None, images, "train", "x", skip_bad=skip_bad, turns="all")
    flat = [{"id": "a", "image": "synpic1.png", "question": f"q{i}?", "answer": "yes"} for i in range(2)]
    with pytest.raises(IngestError, match=r"'a' at index 0, index 1"):
        ingest(write_json(tmp_path / "flat.json", flat), None, images, "train", "x", skip_bad=False, turns="first")


def test_a_suffixed_id_that_collides_with_a_file_id_is_an_error(tmp_path: Path, images: Path) -> None:
    items = [{"id": "a", "image": "synpic1.png", "conversations": conv("<image>\nq1?", "yes", "q2?", "no")},
             {"id": "a-t1", "image": "synpic1.png", "conversations": conv("<image>\nq3?", "yes")}]
    src = write_json(tmp_path / "c.json", items)
    assert [r["id"] for r in ingest(src, None, images, "train", "x", skip_bad=False, turns="first").rows] == [
        "a", "a-t1"]
    with pytest.raises(IngestError, match=r"entry id 'a-t1' is given twice: to question 1 of the conversation at "
                                          r"index 0 and to index 1"):
        ingest(src, None, images, "train", "x", skip_bad=False, turns="all")


BAD_CONVERSATIONS = {
    "not-alternating": (conv("<image>\nq?", "yes") + [{"from": "gpt", "value": "no"}],
                        "`conversations[2]` is a gpt turn where a human turn was expected"),
    "ends-on-human": (conv("<image>\nq?", "yes", "and then?"),
                      "`conversations` ends on a human turn (conversations[2]) that no gpt turn answers"),
    "image-in-later-turn": (conv("<image>\nq?", "yes", "<image>\nand this one?", "no"),
                            "`conversations[2]` has the image placeholder <image>; only the first human turn may"),
    "unknown-role": ([{"from": "system", "value": "be brief"}] + conv("<image>\nq?", "yes"),
                     "`conversations[0]` is from 'system'"),
    "empty": ([], "`conversations` is empty"),
    "empty-later-answer": (conv("<image>\nq?", "yes", "and?", " "), "no answer text in conversations[3]"),
}


@pytest.mark.parametrize("turns", ["first", "all"])
def test_bad_conversations_are_bad_rows_listed_when_skipped(tmp_path: Path, images: Path, turns: str) -> None:
    items = [{"id": "good", "image": "synpic1.png", "conversations": conv("<image>\nq?", "yes", "sure?", "yes")}]
    items += [{"id": name, "image": "synpic1.png", "conversations": turns_} for name, (turns_, _) in
              BAD_CONVERSATIONS.items()]
    src = write_json(tmp_path / "c.json", items)
    with pytest.raises(IngestError) as err:
        ingest(src, None, images, "train", "x", skip_bad=False, turns=turns)
    assert f"{len(BAD_CONVERSATIONS)} of {len(items)} rows are bad" in str(err.value)
    result = ingest(src, None, images, "train", "x", skip_bad=True, turns=turns)
    assert {r["id"] for r in result.rows} == ({"good", "good-t1"} if turns == "all" else {"good"})
    assert [s["id"] for s in result.skipped] == list(BAD_CONVERSATIONS)
    for skipped, (_, detail) in zip(result.skipped, BAD_CONVERSATIONS.values(), strict=True):
        assert detail in skipped["reason"], skipped
        assert skipped["file"] == str(src) and skipped["row"].startswith("index ")


def test_one_answer_type_for_several_entries_is_ambiguous(tmp_path: Path, images: Path) -> None:
    items = [{"id": "a", "image": "synpic1.png", "answer_type": "CLOSED",
              "conversations": conv("<image>\nIs there a mass?", "yes", "Where?", "left lobe")}]
    src = write_json(tmp_path / "c.json", items)
    rows = ingest(src, None, images, "train", "x", skip_bad=False, turns="first").rows
    assert [(r["id"], r["answer_type"]) for r in rows] == [("a", "closed")]
    with pytest.raises(IngestError, match=r"ambiguous answer type: 1 rows, e.g. a \(index 0\): one `answer_type` "
                                          r"\('CLOSED'\) for a conversation of 2 questions"):
        ingest(src, None, images, "train", "x", skip_bad=False, turns="all")


# ---------------------------------------------------------------------------------------------
# `where`: VQA-RAD's combined public file, split by its own phrase_type field

VQA_RAD_PUBLIC = "VQA_RAD Dataset Public.json"


def vqa_rad_public() -> list[dict]:
    """The layout of VQA-RAD's one file: `phrase_type` says the split (freeform/para: train,
    test_freeform/test_para: test); answers may be numbers; answer_type CLOSED/OPEN."""
    def item(qid: int, phrase: str, question: str, answer: object, answer_type: str, image: str) -> dict:
        return {"qid": qid, "image_name": image, "image_case_url": f"https://medpix.example/{image}",
                "image_organ": "CHEST", "answer": answer, "answer_type": answer_type, "question_type": "PRES",
                "question": question, "phrase_type": phrase, "evaluation": "given", "question_rephrase": "NULL",
                "qid_linked_id": f"0{qid}", "question_frame": "NULL"}

    return [
        item(1, "freeform", "Is there a pneumothorax?", "No", "CLOSED", "synpic1.png"),
        item(2, "para", "Is a pneumothorax present?", "No", "CLOSED", "synpic1.png"),
        item(3, "test_freeform", "How many nodules are there?", 2, "OPEN", "sub/synpic2.png"),
        item(4, "freeform", "Which organ is shown?", "lung", "OPEN ", "synpic1.png"),
        item(5, "test_para", "Count the nodules.", 2, "OPEN", "sub/synpic2.png"),
    ]


def test_where_splits_the_vqa_rad_combined_file(tmp_path: Path, images: Path) -> None:
    src = write_json(tmp_path / VQA_RAD_PUBLIC, vqa_rad_public())
    train = ingest(src, None, images, "train", "vqa-rad", skip_bad=False, turns="first",
                   where=RowFilter("phrase_type", ("freeform", "para")))
    test = ingest(src, None, images, "test", "vqa-rad", skip_bad=False, turns="first",
                  where=RowFilter("phrase_type", ("test_freeform", "test_para")))
    assert [r["id"] for r in train.rows] == ["1", "2", "4"] and train.excluded == 2
    assert [r["id"] for r in test.rows] == ["3", "5"] and test.excluded == 3
    assert [r["answer"] for r in test.rows] == ["2", "2"]  # numeric answers as text
    assert [r["answer_type"] for r in train.rows] == ["closed", "closed", "open"]  # "OPEN " too
    assert {r["split"] for r in test.rows} == {"test"}
    assert len(ingest(src, None, images, "train", "vqa-rad", skip_bad=False, turns="first").rows) == 5  # no filter: all


def test_where_errors_name_the_field_and_what_the_file_has(tmp_path: Path, images: Path) -> None:
    src = write_json(tmp_path / VQA_RAD_PUBLIC, vqa_rad_public())
    with pytest.raises(IngestError) as err:
        ingest(src, None, images, "test", "vqa-rad", skip_bad=False, turns="first", where=RowFilter("split", ("test",)))
    msg = str(err.value)
    assert VQA_RAD_PUBLIC in msg and "on the field 'split', which no row has" in msg
    assert "'phrase_type'" in msg and "'image_name'" in msg and "prepare.files.test.where.field" in msg
    with pytest.raises(IngestError) as err:
        ingest(src, None, images, "test", "vqa-rad", skip_bad=False, turns="first",
               where=RowFilter("phrase_type", ("test_freeform", "test-para")))
    msg = str(err.value)
    assert "no row has ['test-para']" in msg and "values found: ['freeform', 'para', 'test_freeform', 'test_para']" in msg


def test_a_row_without_the_where_field_is_a_bad_row(tmp_path: Path, images: Path) -> None:
    items = vqa_rad_public()
    del items[3]["phrase_type"]  # a train question: with the field gone, which split is it in?
    src = write_json(tmp_path / VQA_RAD_PUBLIC, items)
    where = RowFilter("phrase_type", ("freeform", "para"))
    with pytest.raises(IngestError, match=r"missing filter field: 1 rows, e.g. 4 \(index 3\): `where` selects on "
                                          r"'phrase_type'"):
        ingest(src, None, images, "train", "vqa-rad", skip_bad=False, turns="first", where=where)
    result = ingest(src, None, images, "train", "vqa-rad", skip_bad=True, turns="first", where=where)
    assert [r["id"] for r in result.rows] == ["1", "2"] and [s["id"] for s in result.skipped] == ["4"]
    assert result.excluded == 2  # the two test questions; the row without the field is skipped, not excluded

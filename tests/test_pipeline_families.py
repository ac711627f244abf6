"""The whole pipeline on model families other than the embedded LLaVA: tiny random Qwen2-VL, Gemma 3
and LLaVA-NeXT checkpoints, laid out as on the Hub, imported by `sft` (`sft.epochs: 0`), then
every stage with dvc.yaml's command lines, the judge being the random tiny LM of
tests/test_pipeline_tiny.py. For LLaVA-NeXT the prepared images are given three sizes, so every
stage batches images with different numbers of visual tokens. No stage knows which family it runs."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from pipeline.data.images import decode_image, encode_png
from pipeline.models.profiles import load_vlm
from tests.gemma3_fixture import write_gemma3_checkpoint
from tests.llava_next_fixture import write_llava_next_checkpoint
from tests.qwen2_vl_fixture import write_qwen2_vl_checkpoint
from tests.test_families import native_resolution
from tests.test_pipeline_tiny import run, save_tiny_judge, tiny_params

WRITERS = {"qwen2_vl": write_qwen2_vl_checkpoint, "gemma3": write_gemma3_checkpoint,
           # a byte-fallback tokenizer: it needs no vocabulary from the texts
           "llava_next": lambda folder, texts: write_llava_next_checkpoint(folder),
           "qwen2_vl_native": lambda folder, texts: native_resolution(write_qwen2_vl_checkpoint(folder, texts=texts))}
FAMILY = {"qwen2_vl_native": "qwen2_vl"}
# each image at its own size: every stage batches images of different visual tokens or grids
MIXED = ("llava_next", "qwen2_vl_native")
# (width, height) of the images LLaVA-NeXT gets: 70, 40 and 34 visual tokens
MIXED_SIZES = [(48, 40), (40, 120), (120, 40)]


def give_images_mixed_sizes(path: str) -> None:
    """Resize a prepared split's images in turn to MIXED_SIZES."""
    table = pq.read_table(path)
    images = [encode_png(decode_image(data).resize(MIXED_SIZES[k % 3])) for k, data in
              enumerate(table.column("image").to_pylist())]
    pq.write_table(table.set_column(table.schema.get_field_index("image"), "image",
                                    pa.array(images, type=table.schema.field("image").type)), path)


@pytest.mark.parametrize("family", list(WRITERS))
def test_pipeline_runs_on_another_family(family, tmp_path, monkeypatch):
    save_tiny_judge(tmp_path / "models/judges/tiny")
    for folder in ("models/base", "models/embedders", "data/raw"):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    params = tiny_params("models/judges/tiny")
    params["sft"].update(model=f"models/base/tiny-{family}", epochs=0, vision_epochs=0)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    run("prepare")
    if family in MIXED:
        for split in ("train", "test"):
            give_images_mixed_sizes(f"data/prepared/{split}.parquet")
    rows = pq.read_table("data/prepared/train.parquet", columns=["question", "answer"]).to_pylist()
    WRITERS[family](Path(params["sft"]["model"]), texts=tuple(r["question"] + " " + r["answer"] for r in rows))
    run("sft")
    sft = load_vlm("models/sft", device="cpu", dtype=torch.float32)
    assert sft.family.name == FAMILY.get(family, family)
    if family in MIXED:  # the stages below batch images of three sizes and visual-token layouts
        images = pq.read_table("data/prepared/train.parquet", columns=["image"]).column("image").to_pylist()
        sizes = {decode_image(data).size for data in images}
        layouts = {tuple(sft.pixel_values([decode_image(d)], on_model=False).sizes[0].tolist()) for d in images}
        assert len(sizes) == 3 and len(layouts) == 3
    run("mine")
    run("sample")
    candidates = pq.read_table("data/candidates.parquet").to_pylist()
    assert len(candidates) == 12 and all(r["candidates"] for r in candidates)
    run("rerank")
    run("score")
    run("train")
    aligned = load_vlm("models/aligned", device="cpu", dtype=torch.float32)
    assert aligned.family.name == FAMILY.get(family, family)
    if family == "qwen2_vl_native":  # kept through sft and train (medalign.json)
        assert sft.settings.image_size == aligned.settings.image_size == "native"
    changed = [n for n, p in aligned.language_model.named_parameters()
               if not torch.equal(p, dict(sft.language_model.named_parameters())[n])]
    assert any("q_proj" in n for n in changed) and any("v_proj" in n for n in changed)  # the merged LoRA targets
    assert all(torch.equal(p, q) for p, q in zip(aligned.vision_tower.parameters(), sft.vision_tower.parameters(),
                                                 strict=True))  # train touches the language model only
    run("evaluate@sft")
    run("evaluate@aligned")
    run("report")
    metrics = json.loads(Path("reports/metrics.json").read_text())
    for key in ("sft", "sft_blind", "aligned", "aligned_blind"):
        assert metrics[key]["n_closed"] + metrics[key]["n_open"] == 32
        assert pq.read_metadata(f"reports/predictions/{key}.parquet").num_rows == 32

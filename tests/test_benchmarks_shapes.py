"""The LLaVA-Med-shaped benchmark model (benchmarks/shapes.py) at a depth a CPU runs, so the GPU
benchmark path cannot rot before a GPU runs it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from shapes import build_llava_med_shape, parameters, parse_layers  # noqa: E402


def test_the_model_name_gives_the_depth():
    assert parse_layers("llava-med-7b") is None
    assert parse_layers("llava-med-7b:layers=2") == 2
    for bad in ("llava-med-7b:layers=0", "llava-med-7b:layers=x", "llava-med-7b:2"):
        with pytest.raises(ValueError, match="llava-med-7b:layers=N"):
            parse_layers(bad)


def test_one_layer_has_every_width_of_llava_med_and_its_576_visual_tokens():
    vlm = build_llava_med_shape("llava-med-7b:layers=1", torch.device("cpu"), torch.float32)
    text, vision = vlm.model.config.text_config, vlm.model.config.vision_config
    assert (text.hidden_size, text.intermediate_size, text.num_attention_heads, text.num_key_value_heads) == (
        4096, 14336, 32, 8)
    assert (vision.hidden_size, vision.image_size, vision.patch_size) == (1024, 336, 14)
    assert text.num_hidden_layers == vision.num_hidden_layers == 1
    assert vlm.settings.num_image_tokens == 576
    # embeddings + LM head (49,153 x 4096 each), one Mistral layer (~218 M), one CLIP-L layer, the projector
    assert 600e6 < parameters(vlm) < 700e6
    ids = vlm.prompt_ids("Is there a mass?")
    assert sum(i == vlm.image_token_id for i in ids) == 576


def test_eval_benchmark_runs_on_the_shape_and_answers_alike(tmp_path):
    from eval_vs_generate import run

    out = tmp_path / "eval.json"
    report = run(model="llava-med-7b:layers=1", questions=2, threads=1, device="cpu", dtype="float32", out=out)
    assert report["identical_predictions"] is True and report["questions"] == 2
    assert report["batched"]["flops"] > 0 and report["generate"]["flops"] > 0
    assert "llava-med-7b:layers=1/cpu" in json.loads(out.read_text())["runs"]

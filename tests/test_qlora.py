"""QLoRA (`train.quantize_base: 4bit`): the SFT model's language model in 4-bit NF4 (bitsandbytes,
whose CPU backend runs these tests), LoRA adapters trained on top, and the merged model written from
the full-precision SFT weights."""

from __future__ import annotations

import json
import subprocess
import sys

import bitsandbytes  # noqa: F401  (installed by scripts/install.sh, the qlora extra: CI must have it)
import pytest
import torch
from PIL import Image
from torch import nn

from pipeline.errors import ModelLoadError
from pipeline.models.profiles import load_vlm
from pipeline.training.preference import PreferenceTrainer, lora_parameters
from tests.conftest import stage_commands
from tests.test_preference import config, scored_rows, tiny
from tests.test_resume_kill import ENV, _params, _workspace


def _kinds(vlm) -> dict[str, set[str]]:
    """The class names of the linear layers under each top-level part of the model."""
    parts: dict[str, set[str]] = {}
    for name, module in vlm.model.named_modules():
        if isinstance(module, nn.Linear):
            part = name.split(".")[1] if name.startswith("model.") else name.split(".")[0]
            parts.setdefault(part, set()).add(type(module).__name__)
    return parts


@pytest.fixture
def sft_folder(tmp_path):
    tiny().save(tmp_path / "sft")
    return tmp_path / "sft"


def test_a_4bit_base_quantizes_the_language_model_only(sft_folder):
    full = load_vlm(sft_folder, device="cpu")
    four = load_vlm(sft_folder, device="cpu", quantize="4bit")
    assert _kinds(four) == {"language_model": {"Linear4bit"}, "vision_tower": {"Linear"},
                            "multi_modal_projector": {"Linear"}, "lm_head": {"Linear"}}
    assert _kinds(full)["language_model"] == {"Linear"}
    ids = torch.tensor([full.prompt_ids("is there a lesion?")])
    pixels = full.pixel_values([Image.new("RGB", (32, 32))])
    with torch.no_grad():
        a = full.forward(torch.ones_like(ids), ids, pixels).logits.flatten()
        b = four.forward(torch.ones_like(ids), ids, pixels).logits.flatten()
    assert not torch.equal(a, b)  # rounded to 4 bits...
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.95  # ...but the same model


def test_qlora_trains_the_adapters_and_merges_them_into_the_full_precision_weights(sft_folder, tmp_path):
    vlm = load_vlm(sft_folder, device="cpu", quantize="4bit")
    frozen = {n: p.detach().clone() for n, p in vlm.model.named_parameters()}
    trainer = PreferenceTrainer(vlm, scored_rows(8), config(quantize_base="4bit", epochs=3))
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert abs(before["reward_margin"]) < 1e-4 and after["reward_margin"] > 1e-3  # policy == reference at first
    adapter = {n: p.detach().clone() for n, p in lora_parameters(vlm).items()}
    assert all(torch.equal(p, frozen[n]) for n, p in vlm.model.named_parameters() if n in frozen)
    with pytest.raises(ValueError, match="needs `full_precision`"):
        trainer.save(tmp_path / "nowhere")
    trainer.save(tmp_path / "aligned", full_precision=lambda: load_vlm(sft_folder, device="cpu"))
    aligned, base = load_vlm(tmp_path / "aligned", device="cpu"), load_vlm(sft_folder, device="cpu")
    assert _kinds(aligned)["language_model"] == {"Linear"}
    assert json.loads((tmp_path / "aligned/adapter/adapter_config.json").read_text())["r"] == 16
    # every adapted layer: the full-precision weight plus B A times alpha / r, nothing else moved
    scale = config().lora_alpha / config().lora_r
    layers = {n.split(".lora_A")[0] for n in adapter if ".lora_A." in n}
    assert layers
    for layer in layers:
        a = next(v for n, v in adapter.items() if n.startswith(layer + ".lora_A."))
        b = next(v for n, v in adapter.items() if n.startswith(layer + ".lora_B."))
        name = layer.replace("base_model.model.", "").replace(".base_layer", "") + ".weight"
        got = dict(aligned.model.named_parameters())[name]
        torch.testing.assert_close(got, dict(base.model.named_parameters())[name] + scale * b @ a)


def test_no_bitsandbytes_is_a_clear_error(sft_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ModelLoadError, match=r"pip install 'medalign\[qlora\]'"):
        load_vlm(sft_folder, device="cpu", quantize="4bit")


def test_the_train_stage_with_a_4bit_base_writes_a_full_precision_model(tmp_path):
    import yaml

    root = _workspace(tmp_path / "ws")
    _params(root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"].update(quantize_base="4bit", epochs=1, checkpoint_every=None)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    done = subprocess.run([sys.executable, "-m", "pipeline.stages.train", *stage_commands()["train"]], cwd=root,
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    aligned = load_vlm(root / "models/aligned", device="cpu")
    assert _kinds(aligned)["language_model"] == {"Linear"}
    assert json.loads((root / "reports/train.json").read_text())["optimizer_steps"] > 0

"""`sft` and `train` data parallel under `accelerate launch` with two real CPU processes (DDP over
gloo): each process trains on its share of every batch, the gradients are averaged, and the main
process alone writes the model, the metrics and the curves. Two processes split a batch's rows, so
their run is not the one-process run; what must hold is that both processes ran, the model is
written once and loads, training moved it, and the loss fell."""

from __future__ import annotations

import json

import torch

from pipeline.models.profiles import load_vlm
from tests.test_resume_kill import _workspace
from tests.test_sharding import launch


def test_sft_phase_two_runs_data_parallel_in_two_processes(tmp_path):
    root = _workspace(tmp_path / "ws")
    out = launch("sft", root, 2)
    assert out.count("sft: saved models/sft") == 1  # the main process alone writes
    assert json.loads((root / "reports/timings/sft.json").read_text())["processes"] == 2
    report = json.loads((root / "reports/sft.json").read_text())
    assert report["sft_final_loss"] < report["sft_first_loss"]
    vlm = load_vlm(root / "models/sft", device="cpu", dtype=torch.float32)
    assert vlm.prompt_ids("what is shown?")
    # phase 2: 48 rows in batches of 8 for 3 epochs = 18 steps, one curve row each, logged once
    curves = (root / "reports/live/sft/plots/metrics/lm/loss.tsv").read_text().splitlines()
    assert len(curves) == 1 + 18


def test_train_runs_data_parallel_in_two_processes(tmp_path):
    root = _workspace(tmp_path / "ws")
    before = {n: p.clone() for n, p in load_vlm(root / "models/sft", device="cpu").model.named_parameters()}
    out = launch("train", root, 2)
    assert out.count("saved models/aligned") == 1
    summary = json.loads((root / "reports/train.json").read_text())
    assert summary["processes"] == 2 and summary["optimizer_steps"] == 18
    assert summary["final_train_reward_margin"] > 0  # policy == reference at the start: margin 0
    margins = (root / "reports/live/train/plots/metrics/train/reward_margin.tsv").read_text().splitlines()
    assert len(margins) == 1 + 18
    aligned = load_vlm(root / "models/aligned", device="cpu").model
    changed = [n for n, p in aligned.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all("language_model" in n for n in changed)

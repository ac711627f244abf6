"""`sft` (phase 2) and `train` under DeepSpeed ZeRO-2 with two real CPU processes (DeepSpeed's CPU
accelerator over gloo, configs/accelerate/deepspeed_zero2_cpu_test.yaml): the same weights as the
DDP run of tests/test_ddp_training.py up to float rounding, the model written once, and a run
killed after a phase-2 checkpoint resumes to the bytes of an uninterrupted one. Skipped without
deepspeed (not a dependency of this project)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.models.profiles import load_vlm
from tests.conftest import stage_commands
from tests.test_resume_kill import _workspace
from tests.test_sharding import ENV, free_port, launch

pytest.importorskip("deepspeed")
psutil = pytest.importorskip("psutil")

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/accelerate/deepspeed_zero2_cpu_test.yaml"
OUTPUT = {"sft": "models/sft", "train": "models/aligned"}


def _argv(stage: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG), "--main_process_port",
            str(free_port()), "-m", f"pipeline.stages.{stage}", *stage_commands()[stage]]


def launch_deepspeed(stage: str, root: Path) -> str:
    done = subprocess.run(_argv(stage), cwd=root, env={**ENV, "DS_ACCELERATOR": "cpu"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("stage", ["sft", "train"])
def test_zero2_trains_the_weights_of_ddp(tmp_path, stage):
    ddp = _workspace(tmp_path / "ddp")
    zero = tmp_path / "zero"
    shutil.copytree(ddp, zero)
    launch(stage, ddp, 2)
    out = launch_deepspeed(stage, zero)
    assert out.count(f"saved {OUTPUT[stage]}") == 1  # the main process alone writes
    report = json.loads((zero / f"reports/{stage}.json").read_text())
    if stage == "train":
        assert report["processes"] == 2 and report["optimizer_steps"] == 18
    else:
        assert report["sft_final_loss"] < report["sft_first_loss"]
    a, b = _weights(ddp / OUTPUT[stage]), _weights(zero / OUTPUT[stage])
    assert sorted(a) == sorted(b)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    assert load_vlm(zero / OUTPUT[stage], device="cpu", dtype=torch.float32).prompt_ids("what is shown?")


def test_zero2_resumes_phase_two_to_the_same_bytes(tmp_path):
    """Each process holds its own part of the ZeRO optimizer state: the resumed run must get its own back."""
    whole = _workspace(tmp_path / "whole")
    killed = tmp_path / "killed"
    shutil.copytree(whole, killed)
    launch_deepspeed("sft", whole)
    process = subprocess.Popen(_argv("sft"), cwd=killed, env={**ENV, "DS_ACCELERATOR": "cpu"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            work = killed / "data/work/sft"
            if work.exists() and [p for p in work.glob("*/checkpoint-phase2-*") if not p.name.endswith(".tmp")]:
                break
            if process.poll() is not None:
                pytest.fail("sft ended before its first phase-2 checkpoint")
            time.sleep(0.02)
    finally:
        # torchrun starts its workers in sessions of their own: kill each by pid
        procs = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
        for p in procs:
            p.kill()
        psutil.wait_procs(procs)
    out = launch_deepspeed("sft", killed)
    assert "resuming from" in out and "phase 2" in out
    assert (killed / "models/sft/model.safetensors").read_bytes() == (whole / "models/sft/model.safetensors").read_bytes()

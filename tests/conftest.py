"""Shared fixtures: tiny models built from configs in code, tiny VQA rows made with PIL."""

from __future__ import annotations

import io
import random
import shlex
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image, ImageDraw

from pipeline.models.profiles import build_tiny

REPO = Path(__file__).resolve().parents[1]

# Tiny models gain nothing from threads, and OpenMP spin-waits badly when the cores are shared.
torch.set_num_threads(1)


def make_rows(n: int, seed: int = 0, size: int = 32) -> list[dict]:
    """A one-template VQA set: a bright disc is present or not; the answer needs the image."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        present = rng.random() < 0.5
        image = Image.new("RGB", (size, size), (20, 20, 20))
        if present:
            x, y = rng.randint(4, size - 16), rng.randint(4, size - 16)
            ImageDraw.Draw(image).ellipse([x, y, x + 11, y + 11], fill=(240, 240, 240))
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        rows.append(
            {
                "id": f"row-{i:04d}",
                "dataset": "unit",
                "split": "train",
                "image": buf.getvalue(),
                "question": "is there a lesion in the left lung ?",
                "answer": "yes" if present else "no",
                "answer_type": "closed",
                "modality": "ct",
                "question_type": "presence",
                "context": [],
            }
        )
    return rows


@pytest.fixture
def rows() -> list[dict]:
    return make_rows(16)


@pytest.fixture
def tiny_vlm(rows):
    torch.manual_seed(0)
    texts = [r["question"] for r in rows] + ["yes", "no", "left", "right", "large", "small", "1", "2", "3"]
    return build_tiny(texts, seed=0)


def stage_commands() -> dict[str, list[str]]:
    """Each stage's arguments exactly as dvc.yaml passes them (after `-m pipeline.stages.<module>`),
    keyed by DVC's stage name: a `foreach` stage gives one entry per item (`evaluate@sft`)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    commands = {}
    for name, stage in stages.items():
        if "foreach" in stage:
            for item in stage["foreach"]:
                commands[f"{name}@{item}"] = _stage_argv(stage["do"]["cmd"].replace("${item}", str(item)))
        else:
            commands[name] = _stage_argv(stage["cmd"])
    return commands


def stage_module(stage: str) -> str:
    """The module a stage runs (`evaluate@sft` runs `pipeline.stages.evaluate`)."""
    return f"pipeline.stages.{stage.split('@')[0]}"


def _stage_argv(cmd: str) -> list[str]:
    argv = shlex.split(cmd)
    at = next(i for i, a in enumerate(argv) if a.startswith("pipeline.stages."))
    return argv[at + 1:]


def sh(cmd: str, cwd: Path) -> str:
    """Run a shell command; fail the test with its output's tail if it fails."""
    done = subprocess.run(cmd, shell=True, cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr

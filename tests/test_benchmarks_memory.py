"""benchmarks/memory_7b.py on the LLaVA-Med-7B shape at one layer (every width of the real model), on
CPU, so the GPU benchmark cannot rot before a GPU runs it.

One entry at batch 1: the 1-layer full-width model (656 M parameters, 576 visual tokens) runs
2 entries at batch 2 in about a minute on one core of the 2-core test machine (sampling scores
6 candidates per entry over the full prompt); one entry keeps every phase's code path at about
half that.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import typer

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from typer.testing import CliRunner  # noqa: E402

from benchmarks.memory_7b import PHASES, app, measure, precision  # noqa: E402


def test_mixed_precision_names_the_weights_and_the_autocast():
    cpu = torch.device("cpu")
    assert precision("no", cpu) == (torch.float32, False)
    assert precision("bf16", cpu) == (torch.bfloat16, True)
    assert precision("auto", cpu) == (torch.float32, False)
    with pytest.raises(typer.BadParameter, match="auto, bf16 or no"):
        precision("fp16", cpu)
    with pytest.raises(typer.BadParameter, match="llava-med-7b"):
        measure("tiny", 1, 1, "no", "cpu", 1, False, False)


def test_one_layer_shape_reports_every_phase_with_memory_and_a_trained_adapter(tmp_path):
    out = tmp_path / "memory_7b.json"
    args = ["--model", "llava-med-7b:layers=1", "--entries", "1", "--batch-size", "1", "--device", "cpu",
            "--mixed-precision", "no", "--threads", "1", "--no-warmup", "--no-isolated", "--output", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads(out.read_text())["runs"]["llava-med-7b:layers=1/cpu"]

    assert report["device"].startswith("cpu: ") and report["dtype"] == "float32"
    assert report["visual_tokens"] == 576
    assert 600e6 < report["parameters"]["total"] < 700e6 and report["parameters"]["lora"] > 0
    phases = report["phases"]
    assert set(phases) == set(PHASES)
    assert phases["sample"]["entries_per_second"] > 0 and phases["sample"]["candidates"] > 0
    assert phases["sample"]["mask_ratio"] == 0.7
    assert phases["train_step"]["entries_per_second"] > 0 and phases["train_step"]["seconds_per_step"] > 0
    assert phases["evaluate"]["questions_per_second"] > 0 and phases["evaluate"]["questions"] == 1
    for name, phase in phases.items():
        # the phase's own peak, with the model (2.6 GB of float32 weights) resident
        assert phase["peak_rss_mib"] >= phase["rss_before_phase_mib"] > 2000, name
    assert phases["train_step"]["lora_weights_changed"] is True
    assert phases["train_step"]["lora_max_abs_change"] > 0

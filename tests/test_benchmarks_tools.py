"""The benchmark tooling around the comparisons: the stage profiler's command handling and the
summary that run_all writes into the docs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import profile_repro  # noqa: E402
import run_all  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_every_dvc_stage_is_profiled_with_its_own_command():
    commands = dict(profile_repro.stage_commands(REPO))
    assert {"prepare", "sft", "train", "evaluate@sft", "evaluate@aligned", "report"} <= set(commands)
    assert "data/work/evaluate/sft" in profile_repro.scratch_paths(commands["evaluate@sft"])
    assert profile_repro.scratch_paths(commands["score"]) == ["data/work/judge_cache.sqlite"]


def test_python_and_accelerate_commands_run_their_module_under_cprofile(tmp_path):
    prof = tmp_path / "x.prof"
    plain = profile_repro.profiled(["python", "-m", "pipeline.stages.mine", "--params", "p.yaml"], prof)
    assert plain[1:] == ["-m", "cProfile", "-o", str(prof), "-m", "pipeline.stages.mine", "--params", "p.yaml"]
    launched = profile_repro.profiled(["accelerate", "launch", "--config_file", "c.yaml", "-m", "pipeline.stages.train",
                                       "--params", "p.yaml"], prof)
    assert launched[0].endswith("accelerate") and launched[1:4] == ["launch", "--config_file", "c.yaml"]
    assert launched[4:] == ["-m", "cProfile", "-o", str(prof), "-m", "pipeline.stages.train", "--params", "p.yaml"]
    with pytest.raises(ValueError, match="expected a `python -m`"):
        profile_repro.profiled(["bash", "run.sh"], prof)


def _eval_run(speedup: float, when: str) -> dict:
    path = {"questions_per_second": 2.0, "fraction_of_measured_peak": 0.5}
    return {"questions": 10, "device": "cpu: test", "batched": {**path, "questions_per_second": 2.0 * speedup},
            "generate": path, "speedup": speedup, "speedup_target": 5.0, "meets_target": speedup >= 5.0,
            "identical_predictions": True, "measured_at": when}


def test_the_summary_takes_the_latest_real_run_and_fills_only_the_marked_block(tmp_path, monkeypatch):
    monkeypatch.setattr(run_all, "REPORTS", tmp_path)
    runs = {"tiny/cpu": _eval_run(99.0, "2026-12-07T00:00:00+00:00"),
            "models/sft/cpu": _eval_run(1.5, "2026-12-05T00:00:00+00:00"),
            "llava-med-7b/cuda": _eval_run(6.0, "2026-12-06T00:00:00+00:00")}
    (tmp_path / "eval_vs_generate.json").write_text(json.dumps({"runs": runs}))
    docs = tmp_path / "results.md"
    docs.write_text(f"# Results\nbefore\n{run_all.BEGIN}\nold table\n{run_all.END}\nafter\n")
    text = run_all.write_summary(docs)
    assert "6.0×" in text and "≥ 5.0×: met" in text and "99.0×" not in text and "1.5×" not in text
    page = docs.read_text()
    assert "old table" not in page and page.startswith("# Results\nbefore\n") and page.endswith("after\n")
    assert (tmp_path / "summary.md").read_text() == text

    docs.write_text("# Results without markers\n")
    with pytest.raises(SystemExit, match="no <!-- benchmarks:begin -->"):
        run_all.write_summary(docs)

"""`evaluate` resumes: a run killed with SIGKILL and started again redoes only the unfinished
batches, and writes exactly the bytes an uninterrupted run writes.

The stage runs as `python -m pipeline.stages.evaluate` with the arguments dvc.yaml gives
`evaluate@aligned`, in a subprocess of a tiny workspace, not through `dvc repro` (whose run cache
would hide the resume path). Fast in-process tests check the keys of the predictions and of the
`report` stage's log-prob gaps: a changed model, input or config reuses nothing and removes the
stale parts.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import pipeline.evaluation as evaluation
from pipeline.data.phantoms import generate_split
from pipeline.errors import DataError
from pipeline.evaluation import EvaluateConfig, evaluate_models, logprob_gap_report
from pipeline.models.profiles import build_tiny
from pipeline.params import load_params, project_config, project_params_path
from pipeline.schema import REPORT_SCHEMA, VQA_SCHEMA, write_rows
from tests.conftest import stage_commands

REPO = Path(__file__).resolve().parents[1]
ARGS = stage_commands()["evaluate@aligned"]
WORK = Path(ARGS[ARGS.index("--work-dir") + 1])
TIMINGS = Path(ARGS[ARGS.index("--timings") + 1])
OUTPUTS = [Path(ARGS[ARGS.index(flag) + 1]) for flag in ("--output", "--log-samples", "--metrics")]
N_TEST, BATCH = 24, 2  # 12 + 12 batches: the predictions and the blind control


def parts(work: Path) -> list[Path]:
    return sorted(work.glob("*/part-*.parquet")) if work.exists() else []


def scored(rows: list[dict]) -> list[dict]:
    """Preference entries with one dispreferred answer each (what `score` writes, reduced)."""
    judgement = {"score": 5.0, "rounds": 1, "agreed": True, "weight": 1.0, "transcript": "[]"}
    return [{**r, "mine_strategy": "balanced", "mine_score": None, "chosen_token_ids": [1], "chosen_logprob": -1.0,
             "sensitivity": [0.5], "candidates": [],
             "rejected": [{"text": "no" if r["answer"] == "yes" else "yes", "similarity": 0.5, "level": 1,
                           "logprob": -2.0}],
             "judgements": [judgement]} for r in rows]


def make_workspace(root: Path) -> None:
    """The evaluate stage's inputs at the paths dvc.yaml names."""
    test_rows = generate_split(N_TEST, "test", seed=0, prior=None, image_size=16)
    args = dict(zip(ARGS[::2], ARGS[1::2], strict=True))
    write_rows(test_rows, root / args["--input"], VQA_SCHEMA)
    write_rows([], root / args["--reports"], REPORT_SCHEMA)  # reports resume in-process (test_phantom_reports)
    texts = [r["question"] for r in test_rows] + ["yes", "no", "left", "right", "1", "2", "3"]
    for seed, spec in enumerate(a for flag, a in zip(ARGS, ARGS[1:], strict=False) if flag == "--model"):
        build_tiny(texts, seed=seed).save(root / spec.partition("=")[2])
    params = load_params(project_params_path())
    params["evaluate"].update(batch_size=BATCH, max_new_tokens={"closed": 4, "open": 4}, max_rows=None)
    (root / args["--params"]).write_text(yaml.safe_dump(params, sort_keys=False))


def start(root: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "pipeline.stages.evaluate", *ARGS], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen) -> str:
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out[-3000:]
    return out


def output_bytes(root: Path) -> dict[str, bytes]:
    files = {}
    for out in OUTPUTS:
        for file in sorted([root / out] if (root / out).is_file() else (root / out).rglob("*")):
            files[str(file.relative_to(root))] = file.read_bytes()
    return files


def test_evaluate_killed_and_restarted_matches_an_uninterrupted_run(tmp_path):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    make_workspace(clean)
    shutil.copytree(clean, killed)

    finish(start(clean))
    clean_report = json.loads((clean / TIMINGS).read_text())
    total = clean_report["batches"]
    assert total == 2 * N_TEST // BATCH
    assert clean_report["reused"] == 0 and clean_report["computed"] == total
    assert not parts(clean / WORK)

    # Kill it once the predictions and part of the blind control are on disk.
    process = start(killed)
    deadline = time.monotonic() + 240
    while len(parts(killed / WORK)) < total * 2 // 3:
        assert process.poll() is None, "the stage finished before it could be killed: make the work larger"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    at_kill = len(parts(killed / WORK))
    assert 0 < at_kill < total
    assert not (killed / TIMINGS).exists()

    out = finish(start(killed))
    report = json.loads((killed / TIMINGS).read_text())
    assert report["batches"] == total
    assert report["reused"] >= at_kill  # a part may land between the count and the kill
    assert report["computed"] == total - report["reused"] > 0
    assert report["resumed_from"] == str(WORK)
    for name, passes in report["models"].items():
        for pass_, work in passes.items():
            assert work["computed"] == work["batches"] - work["reused"], (name, pass_)
    assert "resuming" in out and str(WORK) in out
    assert not parts(killed / WORK)  # cleared once every output is written

    clean_files, resumed_files = output_bytes(clean), output_bytes(killed)
    assert sorted(resumed_files) == sorted(clean_files)
    assert sum(f.endswith(".parquet") for f in clean_files) == 2 and any(f.endswith(".json") for f in clean_files)
    assert sum(f.endswith("_samples.jsonl") for f in clean_files) == 2
    for name, data in clean_files.items():
        assert resumed_files[name] == data, f"{name} differs from the uninterrupted run"


# ---------------------------------------------------------------------------------------------
# in process: what the keys depend on


REAL_PREDICT, REAL_GAP = evaluation.predict_batch, evaluation.logprob_gap_batch


class Interrupt(Exception):
    pass


def counted(monkeypatch: pytest.MonkeyPatch, fail_at: int | None = None) -> list[int]:
    """Count the batches computed (predictions and gaps); raise (the process dies) at `fail_at`."""
    calls: list[int] = []

    def step() -> None:
        if fail_at is not None and len(calls) == fail_at:
            raise Interrupt
        calls.append(1)

    def predict_batch(vlm, rows, max_new_tokens, blind=False):
        step()
        return REAL_PREDICT(vlm, rows, max_new_tokens, blind)

    def logprob_gap_batch(vlm, rows):
        step()
        return REAL_GAP(vlm, rows)

    monkeypatch.setattr(evaluation, "predict_batch", predict_batch)
    monkeypatch.setattr(evaluation, "logprob_gap_batch", logprob_gap_batch)
    return calls


MODELS = [("sft", "models/sft"), ("aligned", "models/aligned")]


def test_evaluation_keys_follow_model_input_and_config(tmp_path, monkeypatch, tiny_vlm, rows):
    cfg = project_config(EvaluateConfig, "evaluate", batch_size=4, max_new_tokens={"closed": 3, "open": 3},
                         max_rows=None)
    inputs = {"input": "test-digest", "models": {"sft": "a", "aligned": "b"}}
    loads: list[str] = []

    def load(folder):
        loads.append(folder)
        return tiny_vlm

    work = tmp_path / "work"
    total = 2 * (16 // 4 + 16 // 4)
    clean = evaluate_models(load, MODELS, rows, cfg, tmp_path / "clean", inputs)
    assert sum(p["computed"] for m in clean.work.values() for p in m.values()) == total

    counted(monkeypatch, fail_at=10)  # the first model (8 batches) and 2 of the second's
    with pytest.raises(Interrupt):
        evaluate_models(load, MODELS, rows, cfg, work, inputs)
    assert len(parts(work)) == 10
    calls, loads[:] = counted(monkeypatch), []
    resumed = evaluate_models(load, MODELS, rows, cfg, work, inputs)
    assert len(calls) == total - 10 and loads == ["models/aligned"]  # sft's work is all on disk: not loaded
    assert resumed.work["sft"] == {p: {"batches": 4, "reused": 4, "computed": 0} for p in ("predictions", "blind")}
    assert resumed.work["aligned"]["predictions"] == {"batches": 4, "reused": 2, "computed": 2}
    assert resumed.report == clean.report and resumed.predictions == clean.predictions
    assert len(parts(work)) == total  # kept until the stage has written its outputs

    keys = evaluation.work_keys(MODELS, cfg, inputs)
    changes = [
        ({"models": {"sft": "a", "aligned": "retrained"}}, None, {"aligned"}),
        ({"input": "another-test-split"}, None, {"sft", "aligned"}),
        ({}, cfg.replace(max_new_tokens={"closed": 4, "open": 3}), {"sft", "aligned"}),
    ]
    for change, new_cfg, affected in changes:
        new_inputs = {**inputs, **change}
        new_keys = evaluation.work_keys(MODELS, new_cfg or cfg, new_inputs)
        changed = {(name, p) for name in new_keys for p in new_keys[name] if new_keys[name][p] != keys[name][p]}
        assert {name for name, _ in changed} == affected, change
        calls = counted(monkeypatch)
        evaluate_models(load, MODELS, rows, new_cfg or cfg, work, new_inputs)
        assert len(calls) == len(changed) * 4, change
        # the parts of every key no longer current are gone; the others were reused
        current = {k for passes in new_keys.values() for k in passes.values()}
        assert {p.parent.name for p in parts(work)} == current
        keys, inputs, cfg = new_keys, new_inputs, new_cfg or cfg


def test_gap_keys_follow_model_preferences_and_batch_size(tmp_path, monkeypatch, tiny_vlm, rows):
    preferences = scored(rows[:8]) + [{**scored(rows[8:9])[0], "rejected": []}]  # one without a rejected answer
    inputs = {"preferences": "pref-digest", "models": {"sft": "a", "aligned": "b"}}
    work = tmp_path / "work"
    clean = logprob_gap_report(lambda folder: tiny_vlm, MODELS, preferences, 4, tmp_path / "clean", inputs)
    assert clean.report["sft_logprob_gap"]["n"] == 8  # the entry without a dispreferred answer is left out
    assert sum(w["computed"] for w in clean.work.values()) == 4
    assert sum(row["sft"] for table in clean.histograms.values() for row in table) == 8

    counted(monkeypatch, fail_at=3)
    with pytest.raises(Interrupt):
        logprob_gap_report(lambda folder: tiny_vlm, MODELS, preferences, 4, work, inputs)
    calls = counted(monkeypatch)
    resumed = logprob_gap_report(lambda folder: tiny_vlm, MODELS, preferences, 4, work, inputs)
    assert len(calls) == 1 and resumed.report == clean.report and resumed.histograms == clean.histograms

    keys = evaluation.gap_keys(MODELS, 4, inputs)
    assert evaluation.gap_keys(MODELS, 4, {**inputs, "models": {"sft": "a", "aligned": "c"}})["sft"] == keys["sft"]
    assert evaluation.gap_keys(MODELS, 4, {**inputs, "models": {"sft": "a", "aligned": "c"}})["aligned"] != keys["aligned"]
    assert set(evaluation.gap_keys(MODELS, 4, {**inputs, "preferences": "other"}).values()).isdisjoint(keys.values())
    assert set(evaluation.gap_keys(MODELS, 2, inputs).values()).isdisjoint(keys.values())
    assert logprob_gap_report(lambda folder: tiny_vlm, MODELS, [], 4, work, inputs).report == {}


def test_combine_reports_adds_deltas_and_refuses_missing_or_duplicate_models():
    def metrics(name, closed, open_, blind_closed):
        return {name: {"closed_accuracy": closed, "open_recall": open_},
                f"{name}_blind": {"closed_accuracy": blind_closed, "open_recall": 0.1},
                f"{name}_image_reliance": {"closed_accuracy": closed - blind_closed, "open_recall": open_ - 0.1}}

    sft, aligned = metrics("sft", 0.5, 0.4, 0.45), metrics("aligned", 0.7, 0.5, 0.45)
    report = evaluation.combine_reports(["sft", "aligned"], [sft, aligned], {"sft_logprob_gap": {"mean": 1.0}})
    assert report["aligned_minus_sft"]["closed_accuracy"] == pytest.approx(0.2)
    assert report["aligned_minus_sft"]["open_recall"] == pytest.approx(0.1)
    assert report["aligned_minus_sft"]["image_reliance_closed_accuracy"] == pytest.approx(0.2)
    assert report["sft_logprob_gap"] == {"mean": 1.0} and "sft_minus_aligned" not in report
    with pytest.raises(DataError, match=r"no metrics for model\(s\) \['aligned'\]"):
        evaluation.combine_reports(["sft", "aligned"], [sft], {})
    with pytest.raises(DataError, match="appear in two evaluation reports"):
        evaluation.combine_reports(["sft"], [sft, sft], {})


def test_logprob_gap_equals_scoring_each_full_sequence(tiny_vlm, rows):
    """The grouped gap (prompt once, logits at the answers only) equals log p(answer) − log
    p(rejected) from a full forward of each whole sequence."""
    import torch

    from pipeline.batching import answer_logprobs, collate_sequences

    entries = scored(rows[:6])
    entries[1]["rejected"][0]["text"] = "left"  # answers of different lengths in one batch
    gaps = evaluation.logprob_gap_batch(tiny_vlm, entries)
    with torch.no_grad():
        batch = collate_sequences(tiny_vlm, [r["image"] for r in entries] * 2, [r["question"] for r in entries] * 2,
                                  [r["answer"] for r in entries] + [r["rejected"][0]["text"] for r in entries],
                                  contexts=[r["context"] for r in entries] * 2)
        logp = answer_logprobs(tiny_vlm.forward(batch.attention_mask, batch.input_ids, batch.pixel_values).logits,
                               batch.labels)
    assert gaps == pytest.approx((logp[:6] - logp[6:]).tolist(), abs=1e-4)
    assert len({round(g, 3) for g in gaps}) > 1

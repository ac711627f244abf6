"""HSCR Fig. 4 on held-out test entries (`pipeline.heldout_gaps`): the stratified sample, the
sampler's candidates and the gaps they give."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from pipeline import evaluation
from pipeline.batching import answer_logprobs, collate_sequences
from pipeline.errors import DataError
from pipeline.evaluation import EvaluateConfig, GapConfig
from pipeline.heldout_gaps import HELDOUT_DATA, heldout_entries, heldout_gap_report, stratified_sample
from pipeline.metrics import normalize_answer
from pipeline.params import build_config, project_config
from pipeline.self_contrast import SampleConfig, sample_pool
from tests.conftest import make_rows


def modal_rows() -> list[dict]:
    rows = make_rows(33)
    for i, r in enumerate(rows):
        r["id"] = f"test-{i:04d}"
        r["modality"] = "ct" if i < 10 else "mri" if i < 13 else "xray"
    return rows


def gap_config(entries: int, seed: int = 0) -> GapConfig:
    return build_config(GapConfig, {"entries": entries, "seed": seed})


def test_the_sample_is_even_over_modalities_seeded_and_independent_of_row_order():
    rows = modal_rows()
    picked = stratified_sample(rows, 12, seed=0)
    # one per modality per round; mri runs out after 3, so ct and xray share the rest
    assert Counter(r["modality"] for r in picked) == {"ct": 5, "mri": 3, "xray": 4}
    ids = [r["id"] for r in picked]
    assert ids == [r["id"] for r in rows if r["id"] in set(ids)]  # in the rows' order
    assert [r["id"] for r in stratified_sample(rows, 12, seed=0)] == ids
    assert {r["id"] for r in stratified_sample(rows[::-1], 12, seed=0)} == set(ids)
    assert {r["id"] for r in stratified_sample(rows, 12, seed=1)} != set(ids)
    assert len(stratified_sample(rows, 100, seed=0)) == len(rows)
    with pytest.raises(DataError, match="repeat an id"):
        stratified_sample(rows + rows[:1], 12, seed=0)


def sample_cfg() -> SampleConfig:
    return project_config(SampleConfig, "sample", k=3, batch_size=4)


def multi_token(rows: list[dict]) -> list[dict]:
    rows = [dict(r) for r in rows]
    for r in rows[::3]:
        r["answer"] = "left lung is large"
    return rows


def test_candidates_come_from_the_sampler_and_none_is_the_ground_truth(tmp_path, tiny_vlm, rows):
    rows = multi_token(rows[:8])
    sampled = sample_pool(tiny_vlm, rows, sample_cfg(), tmp_path, {"pool": "p", "model": "m"}).table.to_pylist()
    entries, counts = heldout_entries(sampled, rows)
    assert counts["entries"] == 8 and len(entries) == 8 - counts["without_candidate"] > 0
    by_id = {s["id"]: s for s in sampled}
    for entry in entries:
        (rejected,) = entry["rejected"]
        candidates = by_id[entry["id"]]["candidates"]
        # the first candidate of the highest level the sampler made
        assert rejected["level"] == max(c["level"] for c in candidates)
        top = next(c for c in candidates if c["level"] == rejected["level"])
        assert rejected["text"] == top["text"]
        truth = tiny_vlm.answer_ids(entry["answer"])
        assert len(top["token_ids"]) == len(truth) and top["token_ids"] != truth  # a replaced token
        assert normalize_answer(rejected["text"]) != normalize_answer(entry["answer"])
    assert {len(tiny_vlm.answer_ids(e["answer"])) for e in entries} != {2}  # a multi-token answer is among them

    # a candidate that reads as the ground truth is no hallucination: left out and counted
    fake = [{**sampled[0], "candidates": [{**sampled[0]["candidates"][0], "text": rows[0]["answer"].upper()}]}]
    assert heldout_entries(fake, rows[:1]) == ([], {"entries": 1, "without_candidate": 1,
                                                     "candidates_equal_to_truth": 1})


def full_sequence_gaps(vlm, entries: list[dict]) -> list[float]:
    n = len(entries)
    with torch.no_grad():
        batch = collate_sequences(vlm, [r["image"] for r in entries] * 2, [r["question"] for r in entries] * 2,
                                  [r["answer"] for r in entries] + [r["rejected"][0]["text"] for r in entries],
                                  contexts=[r["context"] for r in entries] * 2)
        logp = answer_logprobs(vlm.forward(batch.attention_mask, batch.input_ids, batch.pixel_values).logits,
                               batch.labels)
    return (logp[:n] - logp[n:]).tolist()


def test_heldout_gaps_equal_scoring_each_whole_sequence(tmp_path, tiny_vlm):
    rows = multi_token(modal_rows())
    loads: list[str] = []

    def load(folder: str):
        loads.append(folder)
        return tiny_vlm

    inputs = {"test": "test-digest", "models": {"sft": "a"}}
    result = heldout_gap_report(load, [("sft", "models/sft")], "sft", rows, {"train-0001"}, sample_cfg(),
                                gap_config(9), 4, tmp_path / "work", inputs)
    picked = stratified_sample(rows, 9, seed=0)
    sampled = sample_pool(tiny_vlm, picked, sample_cfg(), tmp_path / "again", {"pool": "p", "model": "m"})
    entries, counts = heldout_entries(sampled.table.to_pylist(), picked)
    expected = full_sequence_gaps(tiny_vlm, entries)
    summary = result.report["sft_logprob_gap"]
    assert summary["data"] == HELDOUT_DATA and summary["entries"] == 9 == counts["entries"]
    assert summary["n"] == len(entries) > 0
    assert summary["mean"] == pytest.approx(sum(expected) / len(expected), abs=1e-4)
    for modality in ("ct", "mri", "xray"):
        mine = [g for g, e in zip(expected, entries, strict=True) if e["modality"] == modality]
        assert summary["by_modality"][modality]["n"] == len(mine)
        assert summary["by_modality"][modality]["mean"] == pytest.approx(sum(mine) / len(mine), abs=1e-4)
    assert sorted(result.histograms) == ["ct", "mri", "xray"]
    assert sum(row["sft"] for table in result.histograms.values() for row in table) == len(entries)
    assert len({round(g, 3) for g in expected}) > 1
    assert result.work["sample"]["computed"] == 3  # 9 entries, sample.batch_size 4

    # resumed: the sampler's batches and the gaps are on disk, nothing is computed again
    again = heldout_gap_report(load, [("sft", "models/sft")], "sft", rows, set(), sample_cfg(), gap_config(9), 4,
                               tmp_path / "work", inputs)
    assert again.report == result.report and again.work["sample"]["reused"] == 3 and again.work["sft"]["computed"] == 0


def test_a_heldout_entry_in_the_training_pool_or_an_unknown_sampler_is_an_error(tmp_path, tiny_vlm):
    rows = modal_rows()
    picked = stratified_sample(rows, 4, seed=0)
    args = (sample_cfg(), gap_config(4), 4, tmp_path, {"test": "t", "models": {"sft": "a"}})
    with pytest.raises(DataError, match="in the training preference pool"):
        heldout_gap_report(lambda f: tiny_vlm, [("sft", "x")], "sft", rows, {picked[1]["id"]}, *args)
    with pytest.raises(DataError, match="sampler 'base' is not one of the models"):
        heldout_gap_report(lambda f: tiny_vlm, [("sft", "x")], "base", rows, set(), *args)


def test_a_new_gap_sample_keeps_the_answers_resume_keys():
    cfg = project_config(EvaluateConfig, "evaluate")
    other = cfg.replace(heldout_gap={"entries": 7, "seed": 3})
    models = [("sft", "models/sft")]
    inputs = {"input": "i", "reports": "r", "models": {"sft": "a"}}
    assert evaluation.work_keys(models, other, inputs) == evaluation.work_keys(models, cfg, inputs)
    assert evaluation.report_work_keys(models, other, inputs) == evaluation.report_work_keys(models, cfg, inputs)
    assert evaluation.work_keys(models, cfg.replace(batch_size=3), inputs) != evaluation.work_keys(models, cfg, inputs)

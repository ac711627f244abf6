"""CheXPO hard-example mining: hard entries, neighbours, the cap, balance, and the stage end to end."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from pipeline.errors import DataError
from pipeline.generation import greedy_generate, greedy_generate_with_probs
from pipeline.hard_mining import (
    HardMiningConfig,
    expand,
    joint_embeddings,
    mine_hard,
    sample_candidates,
    select_balanced,
)
from pipeline.params import build_config, load_params, project_params_path
from pipeline.schema import POOL_SCHEMA, VQA_SCHEMA, read_rows, write_rows
from tests.conftest import make_rows


def _cfg(**changes) -> HardMiningConfig:
    values = {"confidence_threshold": 0.8, "neighbours": 2, "embedder": "all-MiniLM-L6-v2", "batch_size": 4,
              "max_new_tokens": 3, "candidates": None, **changes}
    return build_config(HardMiningConfig, values)


def _rows(n: int, cells: list[tuple[str, str, str]] | None = None) -> list[dict]:
    cells = cells or [("closed", "ct", "presence")]
    return [{"id": f"e{i:03d}", "question": f"q{i}", "answer": "yes", "answer_type": cells[i % len(cells)][0],
             "modality": cells[i % len(cells)][1], "question_type": cells[i % len(cells)][2], "context": []}
            for i in range(n)]


def _answers(n: int, wrong=(), unsure=()) -> list[dict]:
    """A scripted SFT model: wrong on `wrong`, right but unsure (mean p 0.5) on `unsure`, else sure."""
    return [{"id": f"e{i:03d}", "prediction": "no" if i in wrong else "yes", "score": 0.0 if i in wrong else 1.0,
             "mean_prob": 0.5 if i in unsure else (0.7 if i in wrong else 0.95), "min_prob": 0.4} for i in range(n)]


def test_the_hard_entries_are_exactly_the_wrong_and_the_unsure_ones():
    rows = _rows(12)
    answers = _answers(12, wrong={1, 5}, unsure={7})
    # a right answer exactly at the threshold is not hard; below it is
    answers[9]["mean_prob"] = 0.8
    rng = np.random.default_rng(0)
    result = mine_hard(rows, size=12, seed=0, cfg=_cfg(neighbours=0), answers=answers,
                       visual=rng.normal(size=(12, 4)), question=rng.normal(size=(12, 3)))
    reasons = {r["id"]: r["mine_reason"] for r in result.pool}
    assert reasons == {"e001": "wrong", "e005": "wrong", "e007": "low-confidence"}
    assert all(r["mine_strategy"] == "hard" for r in result.pool)
    assert {r["id"]: r["mine_score"] for r in result.pool} == pytest.approx({"e001": 0.3, "e005": 0.3, "e007": 0.5})
    assert result.report["hard"] == {"low-confidence": 1, "wrong": 2}
    assert result.report["sft_on_split"]["closed_accuracy"] == pytest.approx(10 / 12)


def test_nothing_hard_is_an_error_that_says_what_to_change():
    rows = _rows(4)
    with pytest.raises(DataError, match="nothing is hard. Raise mine.hard.confidence_threshold"):
        mine_hard(rows, 4, 0, _cfg(), _answers(4), np.eye(4), np.eye(4))


def test_neighbours_are_the_true_nearest_and_the_cap_holds():
    # 1-D positions on a circle: the cosine falls with the angle, so the nearest are known by hand.
    angles = np.array([0.0, 0.1, 0.25, 0.5, 1.0, 3.0, 3.05, 3.2, 2.0])
    vectors = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    embeddings = joint_embeddings(vectors, vectors)  # image and question agree
    got = expand([0, 5], embeddings, cap=2)
    assert [(e, s) for e, s, _ in got] == [(1, 0), (6, 5), (2, 0), (7, 5)]  # rank 1 of both seeds, then rank 2
    assert got[0][2] == pytest.approx(np.cos(0.1))
    assert Counter(s for _, s, _ in expand([0], embeddings, cap=3)) == {0: 3}  # one seed: at most the cap
    assert expand([0, 5], embeddings, cap=0) == []
    # a neighbour two seeds share goes to the first that reaches it, the other takes its next nearest
    close = expand([1, 2], embeddings, cap=1)
    assert [(e, s) for e, s, _ in close] == [(0, 1), (3, 2)]


def test_joint_similarity_is_the_mean_of_image_and_question_cosines():
    visual = np.array([[1.0, 0.0], [0.0, 3.0]])
    question = np.array([[2.0, 0.0, 0.0], [2.0, 2.0, 0.0]])
    joint = joint_embeddings(visual, question)
    assert joint[0] @ joint[1] == pytest.approx((0.0 + np.cos(np.pi / 4)) / 2)
    assert joint[0] @ joint[0] == pytest.approx(1.0)


def test_the_pool_keeps_the_splits_cell_shares():
    cells = [("closed", "ct", "presence")] * 6 + [("open", "ct", "organ")] * 3 + [("closed", "mri", "presence")]
    rows = _rows(400, cells)
    rng = random.Random(0)
    candidates = rng.sample(range(400), 200)  # plenty in every cell
    chosen = select_balanced(candidates, rows, 50, random.Random(1))
    shares = Counter((rows[i]["answer_type"], rows[i]["modality"]) for i in chosen)
    assert len(chosen) == 50 and set(chosen) <= set(candidates)
    assert shares == {("closed", "ct"): 30, ("open", "ct"): 15, ("closed", "mri"): 5}


def test_a_cell_short_of_candidates_gives_its_slots_to_the_others_in_priority_order():
    cells = [("closed", "ct", "presence"), ("open", "ct", "organ")]
    rows = _rows(40, cells)  # 20 closed (even ids), 20 open (odd ids)
    candidates = [1, 3, 0, 2, 4, 6, 8, 10, 12, 14]  # only two open ones
    chosen = select_balanced(candidates, rows, 8, random.Random(0))
    assert sorted(chosen) == sorted([1, 3, 0, 2, 4, 6, 8, 10])  # both open, then closed in the given order


def test_hard_entries_come_before_neighbours_within_a_cell():
    rows = _rows(30)
    answers = _answers(30, wrong={3, 4})
    angles = np.linspace(0, 3, 30)
    vectors = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    result = mine_hard(rows, size=4, seed=0, cfg=_cfg(neighbours=5), answers=answers, visual=vectors,
                       question=vectors)
    reasons = sorted(r["mine_reason"] for r in result.pool)
    assert reasons[:2] == ["neighbour-of:e003", "neighbour-of:e004"] and reasons[2:] == ["wrong", "wrong"]
    assert result.report["neighbours_found"] == 10 and result.report["pool_reasons"] == {"neighbour": 2, "wrong": 2}


def test_greedy_probabilities_belong_to_the_greedy_tokens(tiny_vlm, rows):
    from pipeline.batching import collate_prompts

    batch = collate_prompts(tiny_vlm, [r["image"] for r in rows[:4]], [r["question"] for r in rows[:4]], [[]] * 4)
    tokens, probs = greedy_generate_with_probs(tiny_vlm, batch, 3)
    assert tokens == greedy_generate(tiny_vlm, batch, 3)
    assert [len(p) for p in probs] == [len(t) for t in tokens]
    assert all(0.0 < p <= 1.0 for row in probs for p in row)
    # the first token's probability is the softmax of the prompt's last logits at that token
    with torch.no_grad():
        out = tiny_vlm.forward(batch.attention_mask, batch.input_ids, batch.pixel_values)
    first = out.logits[:, -1].float().softmax(-1)
    for b, row in enumerate(tokens):
        if row:
            assert probs[b][0] == pytest.approx(float(first[b, row[0]]), rel=1e-4)


def test_the_candidates_are_a_seeded_sample_stratified_by_cell():
    cells = [("closed", "ct", "presence")] * 6 + [("open", "ct", "organ")] * 3 + [("closed", "mri", "presence")]
    rows = _rows(400, cells)
    picked = sample_candidates(rows, 100, seed=0)
    assert len(picked) == len(set(picked)) == 100 and picked == sorted(picked)
    shares = Counter((rows[i]["answer_type"], rows[i]["modality"]) for i in picked)
    assert shares == {("closed", "ct"): 60, ("open", "ct"): 30, ("closed", "mri"): 10}
    assert sample_candidates(rows, 100, seed=0) == picked
    assert sample_candidates(rows, 100, seed=1) != picked
    # uniform within a cell: over seeds, every entry of the small cell (40 rows, 10 drawn) turns up
    small = {i for seed in range(20) for i in sample_candidates(rows, 100, seed) if i % 10 == 9}
    assert small == {i for i in range(400) if i % 10 == 9}
    assert sample_candidates(rows, None, seed=0) == list(range(400))
    assert sample_candidates(rows, 400, seed=3) == list(range(400))


def _stage_args(tmp_path):
    """The mine stage's options, every file under `tmp_path`."""
    return ["--params", str(tmp_path / "params.yaml"), "--input", str(tmp_path / "train.parquet"),
            "--model", str(tmp_path / "sft"), "--model-root", str(tmp_path / "embedders"),
            "--output", str(tmp_path / "pool.parquet"), "--metrics", str(tmp_path / "mine.json"),
            "--work-dir", str(tmp_path / "work"), "--timings", str(tmp_path / "timings.json")]


def test_mine_stage_hard_end_to_end(tmp_path, tiny_vlm):
    from pipeline.stages.mine import app

    rows = make_rows(24)
    for i, row in enumerate(rows):  # two cells
        row.update(answer_type="open" if i % 4 == 0 else "closed", question_type="organ" if i % 4 == 0 else "presence")
    write_rows(rows, tmp_path / "train.parquet", VQA_SCHEMA)
    tiny_vlm.save(tmp_path / "sft")
    (tmp_path / "embedders").mkdir()
    mine = load_params(project_params_path())["mine"]
    mine.update(strategy="hard", size=10, hard={**mine["hard"], "batch_size": 8, "confidence_threshold": 1.0})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"mine": mine}))
    args = _stage_args(tmp_path)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    pool = read_rows(tmp_path / "pool.parquet", POOL_SCHEMA)
    assert len(pool) == 10
    assert all(r["mine_reason"] in ("wrong", "low-confidence") or r["mine_reason"].startswith("neighbour-of:")
               for r in pool)
    report = yaml.safe_load((tmp_path / "mine.json").read_text())
    # confidence_threshold 1.0: every entry is hard (wrong, or right with a probability below 1)
    assert sum(report["hard"].values()) == 24 and report["sft_on_split"]["entries"] == 24
    assert report["composition"]["answer_type"]["pool"]["open"] in (0.2, 0.3)  # 6 of 24 -> 2.5 of 10 (a seeded tie)
    timings = yaml.safe_load((tmp_path / "timings.json").read_text())
    assert timings["reuse"]["answers"] == {"batches": 3, "reused": 0, "computed": 3}
    assert not (tmp_path / "work").exists()  # cleared once the pool is written
    again = CliRunner().invoke(app, args)  # deterministic
    assert again.exit_code == 0 and read_rows(tmp_path / "pool.parquet", POOL_SCHEMA) == pool


def test_mine_stage_hard_answers_only_the_candidates(tmp_path, tiny_vlm):
    from pipeline.stages.mine import app

    rows = make_rows(24)
    write_rows(rows, tmp_path / "train.parquet", VQA_SCHEMA)
    tiny_vlm.save(tmp_path / "sft")
    (tmp_path / "embedders").mkdir()
    mine = load_params(project_params_path())["mine"]
    mine.update(strategy="hard", size=6,
                hard={**mine["hard"], "batch_size": 8, "confidence_threshold": 1.0, "candidates": 16})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"mine": mine}))
    args = _stage_args(tmp_path)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = yaml.safe_load((tmp_path / "mine.json").read_text())
    assert report["candidates"] == 16 and report["sft_on_split"]["entries"] == 16
    assert sum(report["hard"].values()) == 16
    timings = yaml.safe_load((tmp_path / "timings.json").read_text())
    assert timings["reuse"]["answers"] == {"batches": 2, "reused": 0, "computed": 2}
    sampled = {rows[i]["id"] for i in sample_candidates(rows, 16, mine["seed"])}
    pool = read_rows(tmp_path / "pool.parquet", POOL_SCHEMA)
    assert len(pool) == 6 and {r["id"] for r in pool} <= sampled

"""`rerank`: the gap rule on hand cases and random cases, and re-ranking with the packaged MiniLM."""

from __future__ import annotations

import io
import random
from itertools import pairwise

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from pipeline.errors import ParamsError
from pipeline.metrics import normalize_answer
from pipeline.params import build_config, project_config
from pipeline.reporting import read_json
from pipeline.rerank import GAP_TOLERANCE, RerankConfig, load_embedder, rerank, select_with_gaps
from pipeline.schema import CANDIDATES_SCHEMA, RANKED_SCHEMA, VQA_SCHEMA, read_rows, write_rows

# --- select_with_gaps -----------------------------------------------------------------------


def rerank_config(**overrides) -> RerankConfig:
    return project_config(RerankConfig, "rerank", **overrides)


@pytest.mark.parametrize(
    ("sims", "j", "gap", "max_sim", "expected"),
    [
        ([0.95, 0.9, 0.8, 0.75, 0.6, 0.3], 3, 0.1, 1.0, [0, 2, 4]),  # the brief's case: 0.95, 0.8, 0.6
        ([0.3, 0.6, 0.75, 0.8, 0.9, 0.95], 3, 0.1, 1.0, [5, 3, 1]),  # input order does not matter
        ([0.95, 0.9, 0.8, 0.75, 0.6, 0.3], 3, 0.1, 0.92, [1, 2, 4]),  # 0.95 above max: 0.9, 0.8, 0.6
        ([0.9, 0.8, 0.7], 3, 0.1, 1.0, [0, 1, 2]),  # gaps of exactly min_gap count despite float error
        ([0.9, 0.85, 0.82], 3, 0.1, 1.0, [0]),  # nothing far enough below the first
        ([0.5, 0.5, 0.2], 3, 0.1, 1.0, [0, 2]),  # ties: the first one is kept
        ([0.9, 0.7, 0.5, 0.3], 2, 0.1, 1.0, [0, 1]),  # stops at j
        ([0.99, 0.995], 3, 0.1, 0.99, [0]),  # max_similarity is inclusive
        ([], 3, 0.1, 0.99, []),
        ([0.2, -0.3], 3, 0.1, 0.99, [0, 1]),  # cosines can be negative
    ],
)
def test_select_with_gaps_hand_cases(sims, j, gap, max_sim, expected):
    assert select_with_gaps(sims, j, gap, max_sim) == expected


def test_select_with_gaps_rejects_bad_arguments():
    with pytest.raises(ValueError, match="j must be >= 1"):
        select_with_gaps([0.5], 0, 0.1, 0.99)
    with pytest.raises(ValueError, match="min_gap"):
        select_with_gaps([0.5], 3, -0.1, 0.99)
    with pytest.raises(ValueError, match="finite"):
        select_with_gaps([0.5, float("nan")], 3, 0.1, 0.99)


def test_select_with_gaps_property_random_cases():
    # hypothesis is not installed: a seeded loop over random cases plays its part.
    rng = random.Random(0)
    for _ in range(2000):
        n = rng.randint(0, 12)
        sims = [round(rng.uniform(-1, 1), rng.choice([1, 2, 6])) for _ in range(n)]  # coarse values make ties
        j = rng.randint(1, 5)
        gap = rng.choice([0.0, 0.05, 0.1, 0.3])
        max_sim = rng.choice([0.5, 0.9, 0.99, 1.0])
        kept = select_with_gaps(sims, j, gap, max_sim)
        case = (sims, j, gap, max_sim, kept)
        assert len(kept) <= j and len(set(kept)) == len(kept), case
        assert all(sims[i] <= max_sim for i in kept), case
        assert all(sims[a] >= sims[b] for a, b in pairwise(kept)), case  # descending
        assert all(
            sims[a] - sims[b] >= gap - GAP_TOLERANCE for x, a in enumerate(kept) for b in kept[x + 1 :]
        ), case
        # Greedy is maximal: a candidate left out was above max, came after the j-th, or was too
        # close below a kept one.
        for i in set(range(n)) - set(kept):
            assert (
                sims[i] > max_sim
                or (len(kept) == j and (-sims[i], i) > (-sims[kept[-1]], kept[-1]))
                or any(0 <= sims[k] - sims[i] < gap - GAP_TOLERANCE for k in kept)
            ), (case, i)


# --- rerank with the packaged all-MiniLM-L6-v2 ----------------------------------------------


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def _candidate(text: str, level: int) -> dict:
    return {
        "text": text,
        "token_ids": [level, level + 1],
        "level": level,
        "positions": [0],
        "original_tokens": ["x"],
        "replacement_tokens": ["y"],
        "logprob": -float(level),
    }


def candidate_rows() -> list[dict]:
    """Hand-made CANDIDATES_SCHEMA rows with similarities (MiniLM) noted where the test relies on them."""
    entries = [
        (
            "lung",
            "Right lung",
            [
                "right lung.",  # equal after normalization
                "left lung",  # 0.92
                "left lung",  # duplicate
                "Right Lung",  # equal after normalization
                "  ",  # empty
                "right kidney",  # 0.64
                "right upper lobe",  # 0.61: within 0.1 of right kidney
                "the liver",  # 0.37
                "brain",  # 0.22
            ],
        ),
        ("yes", "yes", ["Yes", "no"]),  # one candidate left: too few
        (
            "effusion",
            "pleural effusion",
            [
                "pericardial effusion",
                "pleural thickening",
                "pneumothorax",
                "rib fracture",
                "normal study",
                "pleural effusions",
            ],  # 0.60, 0.71, 0.59, 0.31, 0.06, 0.96
        ),
        ("empty", "no", []),  # sample produced nothing
    ]
    image = _png()
    return [
        {
            "id": key,
            "dataset": "unit",
            "split": "train",
            "image": image,
            "question": f"what about the {key}?",
            "answer": answer,
            "answer_type": "open",
            "modality": "xray",
            "question_type": "finding",
            "context": [],
            "chosen_token_ids": [1, 2],
            "chosen_logprob": -0.5,
            "sensitivity": [0.1, 0.2],
            "candidates": [_candidate(text, level) for level, text in enumerate(cands, start=1)],
        }
        for key, answer, cands in entries
    ]


@pytest.fixture(scope="module")
def embedder():
    # One thread: on a small shared machine torch's intra-op threads contend with other
    # processes and a 20-text encode goes from 0.1 s to over 1 s.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_embedder("all-MiniLM-L6-v2", device="cpu")
    torch.set_num_threads(threads)


class CountingEmbedder:
    """Delegates to the real embedder and counts `encode` calls."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = 0

    def encode(self, *args, **kwargs):
        self.calls += 1
        return self.inner.encode(*args, **kwargs)


def _check_gap_rule(ranked: list[dict], j: int, min_gap: float, max_similarity: float) -> None:
    for row in ranked:
        sims = [r["similarity"] for r in row["rejected"]]
        assert len(sims) <= j
        assert all(s <= max_similarity for s in sims)
        assert sims == sorted(sims, reverse=True)
        assert all(a - b >= min_gap - GAP_TOLERANCE for a, b in pairwise(sims))


def test_rerank_with_minilm(embedder):
    rows = candidate_rows()
    counting = CountingEmbedder(embedder)
    ranked, metrics = rerank(rows, counting, rerank_config(j=3, min_gap=0.1, max_similarity=0.99, min_keep=None))
    assert counting.calls == 1  # every text of every entry in one batched call

    _check_gap_rule(ranked, 3, 0.1, 0.99)
    by_id = {r["id"]: r for r in ranked}
    assert sorted(by_id) == ["effusion", "lung"]
    assert [r["text"] for r in by_id["lung"]["rejected"]] == ["left lung", "right kidney", "the liver"]
    assert [r["text"] for r in by_id["effusion"]["rejected"]] == [
        "pleural effusions",
        "pleural thickening",
        "pericardial effusion",
    ]
    for row in ranked:
        assert all(normalize_answer(r["text"]) != normalize_answer(row["answer"]) for r in row["rejected"])
        assert {k: row[k] for k in VQA_SCHEMA.names} == {
            k: v for k, v in rows_by_id(rows)[row["id"]].items() if k in VQA_SCHEMA.names
        }
    # level and logprob travel with their text
    assert by_id["lung"]["rejected"][0] == {**by_id["lung"]["rejected"][0], "level": 2, "logprob": -2.0}

    # similarity is the cosine of the two embeddings
    e = embedder.encode(["Right lung", "right kidney"], normalize_embeddings=True)
    assert by_id["lung"]["rejected"][1]["similarity"] == pytest.approx(float(e[0] @ e[1]), abs=1e-5)

    assert metrics["entries_in"] == 4 and metrics["entries_out"] == 2 and metrics["dropped_too_few"] == 2
    assert metrics["removed_equal_to_chosen"] == 3  # "right lung.", "Right Lung", "Yes"
    assert metrics["removed_duplicate"] == 1 and metrics["removed_empty"] == 1
    assert metrics["candidates_in"] == 17
    assert metrics["selected_per_entry_histogram"] == {"0": 1, "1": 1, "2": 0, "3": 2}
    assert metrics["mean_kept_per_entry"] == 3
    per_rank = metrics["mean_similarity_per_rank"]
    assert per_rank["1"] > per_rank["2"] > per_rank["3"]
    assert per_rank["1"] == pytest.approx(
        (by_id["lung"]["rejected"][0]["similarity"] + by_id["effusion"]["rejected"][0]["similarity"]) / 2
    )

    # the rows fit the artifact's schema
    import pyarrow as pa

    pa.Table.from_pylist(ranked, schema=RANKED_SCHEMA)


def rows_by_id(rows: list[dict]) -> dict[str, dict]:
    return {r["id"]: r for r in rows}


def test_rerank_is_deterministic(embedder):
    rows = candidate_rows()
    assert rerank(rows, embedder, rerank_config()) == rerank(rows, embedder, rerank_config())


def test_rerank_max_similarity_and_min_keep(embedder):
    ranked, metrics = rerank(candidate_rows(), embedder,
                             rerank_config(j=3, min_gap=0.1, max_similarity=0.95, min_keep=1))
    _check_gap_rule(ranked, 3, 0.1, 0.95)
    by_id = {r["id"]: r for r in ranked}
    assert sorted(by_id) == ["effusion", "lung", "yes"]  # "yes" kept with one rejected answer
    assert [r["text"] for r in by_id["yes"]["rejected"]] == ["no"]
    assert [r["text"] for r in by_id["effusion"]["rejected"]] == [
        "pleural thickening",
        "pericardial effusion",
        "rib fracture",  # "pleural effusions" (0.96) above max
    ]
    assert metrics["removed_above_max_similarity"] == 1 and metrics["dropped_too_few"] == 1
    assert metrics["min_keep"] == 1
    assert metrics["mean_kept_per_entry"] == pytest.approx(7 / 3)


def test_config_rejects_bad_values():
    with pytest.raises(ParamsError, match=r"rerank.min_keep \(4\) must be <= rerank.j \(3\)"):
        rerank_config(j=3, min_keep=4)
    with pytest.raises(ParamsError, match="`rerank.j` must be greater than or equal to 1"):
        rerank_config(j=0)
    with pytest.raises(ParamsError, match=r"rerank.j \(10\) is more than sample.k \(6\)"):
        rerank_config(j=10)  # the project's sample.k is 6
    with pytest.raises(ParamsError, match="`rerank.batch_size` is missing"):
        build_config(RerankConfig, {k: v for k, v in rerank_config().to_dict().items() if k != "batch_size"}, "rerank")
    with pytest.raises(ParamsError, match="unknown key `rerank.gap`; did you mean `rerank.min_gap`"):
        rerank_config(gap=0.2)


def test_stage_end_to_end(tmp_path, monkeypatch, embedder):
    import pipeline.stages.rerank as stage

    loaded = []
    monkeypatch.setattr(stage, "load_embedder", lambda model: loaded.append(model) or embedder)
    write_rows(candidate_rows(), tmp_path / "candidates.parquet", CANDIDATES_SCHEMA)
    params = {
        "sample": {"k": 6},
        "rerank": {
            "model": "all-MiniLM-L6-v2",
            "j": 3,
            "min_gap": 0.1,
            "max_similarity": 0.99,
            "min_keep": 3,
            "batch_size": 8,
        },
    }
    (tmp_path / "models").mkdir()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    args = [
        "--params",
        str(tmp_path / "params.yaml"),
        "--input",
        str(tmp_path / "candidates.parquet"),
        "--output",
        str(tmp_path / "ranked.parquet"),
        "--metrics",
        str(tmp_path / "rerank.json"),
        "--model-root",
        str(tmp_path / "models"),
    ]
    result = CliRunner().invoke(stage.app, args)
    assert result.exit_code == 0, result.output
    assert loaded == ["all-MiniLM-L6-v2"]
    ranked = read_rows(tmp_path / "ranked.parquet", RANKED_SCHEMA)
    assert [r["id"] for r in ranked] == ["lung", "effusion"]
    report = read_json(tmp_path / "rerank.json")
    assert report["entries_out"] == 2 and report["dropped_too_few"] == 2 and report["j"] == 3
    assert np.isfinite(report["mean_similarity_per_rank"]["3"])

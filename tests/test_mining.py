"""`mine`: strategy registry, seeded random mining, the stage end to end."""

from __future__ import annotations

import io

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from pipeline.errors import ParamsError
from pipeline.mining import STRATEGIES, MineConfig, get_strategy, mine, mining_summary
from pipeline.params import build_config, load_params, project_config, project_params_path
from pipeline.reporting import read_json
from pipeline.schema import POOL_SCHEMA, VQA_SCHEMA, read_rows, write_rows

MODALITIES = ("ct", "mri", "xray")
HARD = load_params(project_params_path())["mine"]["hard"]


def mine_config(**values) -> MineConfig:
    return project_config(MineConfig, "mine", **values)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def vqa_rows(n: int) -> list[dict]:
    image = _png()
    return [
        {
            "id": f"q{i:03d}",
            "dataset": "unit",
            "split": "train",
            "image": image,
            "question": f"question {i}?",
            "answer": "yes" if i % 2 else "left lung",
            "answer_type": "closed" if i % 2 else "open",
            "modality": MODALITIES[i % 3],
            "question_type": "presence",
            "context": [],
        }
        for i in range(n)
    ]


def _ids(rows: list[dict]) -> list[str]:
    return [r["id"] for r in rows]


def test_random_is_seeded():
    rows = vqa_rows(50)
    random = get_strategy("random")
    a = random.select(rows, 10, seed=0)
    assert _ids(a) == _ids(random.select(rows, 10, seed=0))
    assert _ids(a) != _ids(random.select(rows, 10, seed=1))


def test_random_respects_size_and_returns_pool_rows():
    rows = vqa_rows(50)
    pool = STRATEGIES["random"].select(rows, 7, seed=3)
    assert len(pool) == 7
    assert len(set(_ids(pool))) == 7  # without replacement
    assert _ids(pool) == sorted(_ids(pool))  # input order kept
    assert all(r["mine_strategy"] == "random" and r["mine_score"] is None for r in pool)
    assert set(POOL_SCHEMA.names) <= set(pool[0])
    by_id = {r["id"]: r for r in rows}
    assert all({k: r[k] for k in VQA_SCHEMA.names} == by_id[r["id"]] for r in pool)


def test_random_size_above_available_takes_all_and_reports_it():
    rows = vqa_rows(5)
    pool, report = mine(rows, mine_config(strategy="random", size=20, seed=0))
    assert _ids(pool) == _ids(rows)
    assert report["capped"] and report["size"] == 5 and report["requested_size"] == 20


@pytest.mark.parametrize("size", [0, -3])
def test_random_rejects_size_below_one(size):
    with pytest.raises(ValueError, match="size must be >= 1"):
        get_strategy("random").select(vqa_rows(5), size, seed=0)


def test_random_rejects_empty_input_duplicates_and_options():
    random = get_strategy("random")
    with pytest.raises(ValueError, match="empty"):
        random.select([], 3, seed=0)
    rows = vqa_rows(3)
    with pytest.raises(ValueError, match="duplicate ids"):
        random.select(rows + rows[:1], 2, seed=0)
    with pytest.raises(ValueError, match="no options"):
        random.select(rows, 2, seed=0, threshold=0.5)


def test_unknown_strategy_lists_available():
    with pytest.raises(ValueError, match="unknown mining strategy 'hardest'.*available strategies: balanced, random"):
        get_strategy("hardest")


def test_hard_strategy_runs_through_the_hard_miner_not_the_registry():
    with pytest.raises(ValueError, match="'hard' needs the SFT model.*model-free strategies: balanced, random"):
        get_strategy("hard")
    assert mine_config(strategy="hard").hard.neighbours == HARD["neighbours"]


def test_config_is_strict():
    with pytest.raises(ParamsError, match="`mine.seed` is missing"):
        build_config(MineConfig, {"strategy": "random", "size": 2, "hard": HARD}, "mine")
    with pytest.raises(ParamsError, match="unknown key `mine.sise`; did you mean `mine.size`"):
        build_config(MineConfig, {"strategy": "random", "size": 2, "seed": 0, "sise": 3, "hard": HARD}, "mine")
    with pytest.raises(ParamsError, match="`mine.size` must be greater than or equal to 1"):
        build_config(MineConfig, {"strategy": "random", "size": 0, "seed": 0, "hard": HARD}, "mine")


def test_summary_counts_groups():
    rows = vqa_rows(6)
    report = mining_summary(
        STRATEGIES["random"].select(rows, 6, seed=0),
        requested=6,
        available=6,
        config=mine_config(strategy="random", size=6, seed=0),
    )
    assert report["modality"] == {"ct": 2, "mri": 2, "xray": 2}
    assert report["answer_type"] == {"closed": 3, "open": 3}
    assert report["size"] == 6 and not report["capped"]


def test_stage_end_to_end(tmp_path):
    from pipeline.stages.mine import app

    rows = vqa_rows(12)
    write_rows(rows, tmp_path / "train.parquet", VQA_SCHEMA)
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({"mine": {"strategy": "random", "size": 4, "seed": 0, "hard": HARD}})
    )
    (tmp_path / "sft").mkdir()  # a random draw reads no model: an empty folder will do
    args = [
        "--params", str(tmp_path / "params.yaml"), "--input", str(tmp_path / "train.parquet"),
        "--model", str(tmp_path / "sft"), "--model-root", str(tmp_path),
        "--output", str(tmp_path / "pool.parquet"), "--metrics", str(tmp_path / "mine.json"),
        "--work-dir", str(tmp_path / "work"), "--timings", str(tmp_path / "timings.json"),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    pool = read_rows(tmp_path / "pool.parquet", POOL_SCHEMA)
    assert _ids(pool) == _ids(get_strategy("random").select(rows, 4, seed=0))
    report = read_json(tmp_path / "mine.json")
    assert report["size"] == 4 and sum(report["modality"].values()) == 4


def test_balanced_strategy_evens_out_the_language_prior():
    from collections import Counter

    from pipeline.mining import get_strategy

    rows = [{"id": f"r{i}", "question": "is there a lesion?", "answer": "no" if i % 10 < 7 else "yes",
             "answer_type": "closed", "modality": "ct", "question_type": "presence"} for i in range(200)]
    pool = get_strategy("balanced").select(rows, 40, seed=0)
    counts = Counter(r["answer"] for r in pool)
    assert counts == {"no": 20, "yes": 20}
    assert pool == get_strategy("balanced").select(rows, 40, seed=0)
    assert [r["id"] for r in pool] != [r["id"] for r in get_strategy("balanced").select(rows, 40, seed=1)]


def _diverse_split(n: int = 2000, seed: int = 7) -> list[dict]:
    """An independently made split: nearly every question distinct (far more strata than a pool's
    size), a quarter open, modalities and question types in unequal shares, and a yes/no prior."""
    import random as stdlib_random

    rng = stdlib_random.Random(seed)
    rows = []
    for i in range(n):
        open_question = rng.random() < 0.25
        modality = rng.choices(["ct", "mri", "xray"], weights=[0.5, 0.3, 0.2])[0]
        qtype = rng.choices(["presence", "position", "organ"], weights=[0.6, 0.25, 0.15])[0]
        answer = f"finding {rng.randrange(10**6)}" if open_question else ("no" if rng.random() < 0.7 else "yes")
        # "does ..." questions sort first: the old round-robin over sorted strata took only those
        verb = "does" if not open_question else "what"
        question = f"{verb} image {i} show finding {rng.randrange(10**6)}?"
        rows.append({"id": f"s{i:05d}", "dataset": "unit", "question": question, "answer": answer,
                     "answer_type": "open" if open_question else "closed", "modality": modality,
                     "question_type": qtype})
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_balanced_pool_keeps_the_splits_mix_when_strata_outnumber_the_size(seed):
    from collections import Counter

    rows = _diverse_split()
    size = 128
    pool = get_strategy("balanced").select(rows, size, seed=seed)
    assert len(pool) == size and len({r["id"] for r in pool}) == size
    for field in ("answer_type", "modality", "question_type"):
        split_share = Counter(r[field] for r in rows)
        pool_share = Counter(r[field] for r in pool)
        for value, n in split_share.items():
            # apportioned per (answer type, modality, question type) cell: off by rounding only
            assert abs(pool_share[value] / size - n / len(rows)) < 0.03, (field, value)
    closed = [r for r in pool if r["answer_type"] == "closed"]
    answers = Counter(r["answer"] for r in closed)  # the split's 70% "no" evened out within each cell
    assert abs(answers["no"] - answers["yes"]) <= 9  # at most one per cell (9 closed cells)


def test_balanced_pools_of_two_seeds_differ_and_one_seed_repeats():
    rows = _diverse_split()
    ids = [[r["id"] for r in get_strategy("balanced").select(rows, 128, seed=s)] for s in (0, 1, 0)]
    assert ids[0] == ids[2]
    assert len(set(ids[0]) & set(ids[1])) < 40  # two seeds share about 128 * 128 / 2000 entries, not all


def test_balanced_draw_is_uniform_within_a_cell_and_answer():
    """Every row of one (cell, answer) group is equally likely to be drawn."""
    from collections import Counter

    rows = [{"id": f"u{i}", "question": f"q{i}", "answer": f"a{i}", "answer_type": "open", "modality": "ct",
             "question_type": "organ"} for i in range(10)]
    picked = Counter(r["id"] for seed in range(3000) for r in get_strategy("balanced").select(rows, 3, seed=seed))
    # each row: expected 900 of 3000 draws (3 of 10); binomial sd ~25
    assert all(abs(n - 900) < 120 for n in picked.values()) and len(picked) == 10


def test_apportion_is_proportional_and_never_exceeds_a_group():
    import random as stdlib_random

    from pipeline.balance import apportion

    quota = apportion(10, {"a": 50, "b": 30, "c": 20}, stdlib_random.Random(0))
    assert quota == {"a": 5, "b": 3, "c": 2}
    quota = apportion(7, {"a": 1, "b": 1, "c": 5, "d": 3}, stdlib_random.Random(0))
    assert sum(quota.values()) == 7 and all(quota[g] <= n for g, n in {"a": 1, "b": 1, "c": 5, "d": 3}.items())
    assert apportion(10, {"a": 4, "b": 6}, stdlib_random.Random(0)) == {"a": 4, "b": 6}


def test_mine_report_puts_the_pools_mix_beside_the_splits():
    rows = _diverse_split(400)
    pool, report = mine(rows, mine_config(strategy="balanced", size=100, seed=0))
    composition = report["composition"]["answer_type"]
    assert set(composition) == {"pool", "split"}
    assert abs(composition["pool"]["open"] - composition["split"]["open"]) < 0.03

"""pipeline.compare and the compare command: the report over hand-made prediction tables in tmp
folders, with every expected number worked out by hand; runs read at a git revision through DVC."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.compare import (
    Run,
    compare_runs,
    load_folder,
    load_rev,
    load_run,
    parse_run,
    prediction_models,
    render_markdown,
)
from pipeline.errors import DataError
from pipeline.schema import PREDICTION_SCHEMA
from pipeline.stages.compare import app

CLOSED = ["c1", "c2", "c3", "c4"]
OPEN = ["o1", "o2", "o3", "o4"]

# model → (closed 0/1 scores on c1..c4, open recall on o1..o4); the metric is the mean of each list.
DEFAULT_SEED0 = {
    "sft": ([1, 1, 0, 0], [1.0, 0.5, 0.0, 0.5]),  # 0.5, 0.5
    "sft_blind": ([1, 0, 0, 0], [0.5, 0.0, 0.0, 0.5]),  # 0.25, 0.25
    "aligned": ([1, 1, 1, 0], [1.0, 1.0, 0.5, 0.5]),  # 0.75, 0.75
    "aligned_blind": ([1, 0, 0, 0], [0.0, 0.0, 0.0, 0.5]),  # 0.25, 0.125
}
DEFAULT_SEED1 = {
    "sft": ([1, 0, 1, 0], [1.0, 0.5, 0.0, 0.5]),  # 0.5, 0.5
    "sft_blind": ([1, 0, 0, 0], [0.5, 0.0, 0.0, 0.5]),  # 0.25, 0.25
    "aligned": ([1, 1, 1, 1], [1.0, 1.0, 1.0, 0.5]),  # 1.0, 0.875
    "aligned_blind": ([0, 0, 0, 0], [0.0, 0.0, 0.0, 0.5]),  # 0.0, 0.125
}
HARD_SEED7 = {
    "aligned": ([1, 1, 1, 1], [0.5, 0.5, 0.0, 0.5]),  # 1.0, 0.375
    "aligned_blind": ([1, 1, 0, 0], [0.5, 0.5, 0.0, 0.5]),  # 0.5, 0.375
}


def table_rows(model: str, closed: list[float], open_: list[float],
               closed_ids: list[str] = CLOSED, open_ids: list[str] = OPEN) -> list[dict]:
    rows = []
    for ids, scores, kind in ((closed_ids, closed, "closed"), (open_ids, open_, "open")):
        for i, s in zip(ids, scores, strict=True):
            rows.append({"id": i, "model": model, "question": f"question {i}", "answer": "yes",
                         "prediction": "yes" if s else "no", "answer_type": kind, "modality": "ct",
                         "question_type": "presence", "score": float(s)})
    return rows


def write_folder(folder: Path, models: dict[str, tuple[list[float], list[float]]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for model, (closed, open_) in models.items():
        table = pa.Table.from_pylist(table_rows(model, closed, open_), schema=PREDICTION_SCHEMA)
        pq.write_table(table, folder / f"{model}.parquet")
    return folder


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    return {"default:0": write_folder(tmp_path / "run0", DEFAULT_SEED0),
            "default:1": write_folder(tmp_path / "run1", DEFAULT_SEED1),
            "hard:7": write_folder(tmp_path / "hard7", HARD_SEED7)}


def row(report: dict, config: str, model: str, metric: str) -> dict:
    (found,) = [r for r in report["rows"] if (r["config"], r["model"], r["metric"]) == (config, model, metric)]
    return found


def runs_from(folders: dict[str, Path], *names: str) -> list[Run]:
    return [load_run(f"{name}={folders[name]}") for name in names]


def test_report_means_std_and_deltas_over_two_seeds(folders: dict[str, Path]) -> None:
    report = compare_runs(runs_from(folders, "default:0", "default:1"), "default/sft", resamples=999, seed=0)
    assert report["baseline"] == "default/sft"

    sft = row(report, "default", "sft", "closed_accuracy")
    assert sft["role"] == "baseline" and sft["vs_baseline"] is None
    assert sft["per_seed"] == {"0": 0.5, "1": 0.5}
    assert (sft["mean"], sft["std"], sft["n_seeds"], sft["n_items"]) == (0.5, 0.0, 2, 4)

    closed = row(report, "default", "aligned", "closed_accuracy")
    assert closed["per_seed"] == {"0": 0.75, "1": 1.0}
    assert closed["mean"] == pytest.approx(0.875)
    assert closed["std"] == pytest.approx(0.125 * 2**0.5)  # sqrt(2 * 0.125^2 / (2 - 1))
    assert closed["ci"]["over"] == "items, per-item scores averaged over 2 seeds"
    assert closed["ci"]["low"] <= closed["mean"] <= closed["ci"]["high"]
    v = closed["vs_baseline"]
    assert v["seed_pairs"] == [[0, 0], [1, 1]]  # paired by seed
    assert v["per_seed_difference"] == {"0": 0.25, "1": 0.5}
    assert v["difference"] == pytest.approx(0.375)
    # Seed-averaged closed scores are not 0/1: permutation test. Per-item differences averaged
    # over the two seeds: c1..c4 = 0, .5, .5, .5; only the all-positive sign pattern of the three
    # non-zero ones reaches a sum >= 1.5: one-sided 1/8, two-sided 1/4.
    assert v["test"] == "paired permutation"
    assert v["p_value"] == pytest.approx(0.25)
    assert not v["significant"] and v["verdict"].startswith("inside the noise")

    open_ = row(report, "default", "aligned", "open_recall")
    assert open_["mean"] == pytest.approx(0.8125)
    assert open_["std"] == pytest.approx(0.0625 * 2**0.5)
    assert open_["vs_baseline"]["difference"] == pytest.approx(0.3125)

    # Image reliance = model − blind: aligned 0.5 and 1.0, sft 0.25 and 0.25.
    reliance = row(report, "default", "aligned", "image_reliance_closed_accuracy")
    assert reliance["per_seed"] == {"0": 0.5, "1": 1.0}
    assert reliance["vs_baseline"]["baseline"] == "default/sft"
    assert reliance["vs_baseline"]["difference"] == pytest.approx(0.5)
    assert row(report, "default", "sft", "image_reliance_open_recall")["mean"] == pytest.approx(0.25)
    # A blind control is compared with the baseline's blind control; it has no reliance of its own.
    blind = row(report, "default", "aligned_blind", "closed_accuracy")
    assert blind["vs_baseline"]["baseline"] == "default/sft_blind"
    assert blind["vs_baseline"]["difference"] == pytest.approx((0.25 + 0.0) / 2 - 0.25)
    assert row(report, "default", "sft_blind", "closed_accuracy")["role"] == "baseline"
    assert not [r for r in report["rows"] if r["model"].endswith("_blind") and "reliance" in r["metric"]]
    assert len(report["rows"]) == 2 * 4 + 2 * 2

    assert compare_runs(runs_from(folders, "default:0", "default:1"), "default/sft", resamples=999,
                        seed=0) == report  # same runs + seed, same report


def test_single_seed_closed_uses_mcnemar_against_the_baselines_first_seed(folders: dict[str, Path]) -> None:
    report = compare_runs(runs_from(folders, "default:1", "default:0", "hard:7"), "default/sft", resamples=999, seed=0)
    closed = row(report, "hard", "aligned", "closed_accuracy")
    assert closed["std"] is None and closed["ci"]["over"] == "items"
    v = closed["vs_baseline"]
    assert v["seed_pairs"] == [[7, 0]]  # the baseline has no seed 7: its first (lowest) seed
    # aligned 1,1,1,1 against sft seed 0 1,1,0,0: discordant 2/0, two-sided binomial 2 * (1/2)^2.
    assert v["test"] == "exact McNemar" and v["discordant"] == [2, 0]
    assert v["p_value"] == pytest.approx(0.5)
    assert v["difference"] == pytest.approx(0.5)
    # Open recall: 0.375 against 0.5, a paired permutation test on the single pair of runs.
    open_ = row(report, "hard", "aligned", "open_recall")["vs_baseline"]
    assert open_["test"] == "paired permutation" and open_["difference"] == pytest.approx(-0.125)
    # Within a config the rows follow the --run order of configs; seeds are sorted.
    assert row(report, "default", "sft", "closed_accuracy")["seeds"] == [0, 1]


def test_markdown_table(folders: dict[str, Path]) -> None:
    report = compare_runs(runs_from(folders, "default:0", "default:1", "hard:7"), "default/sft", resamples=999, seed=0)
    text = render_markdown(report)
    assert text.startswith("# Run comparison against default/sft")
    assert "## closed accuracy" in text and "## open recall" in text
    assert "| config | model | seeds | mean ± std | 95% CI | Δ vs baseline [95% CI] | p | significant? |" in text
    lines = text.splitlines()
    (aligned,) = [line for line in lines if line.startswith("| default | aligned | 0, 1 | 87.5 ± 17.7 |")]
    assert "| +37.5 [" in aligned and "| 0.250 (permutation) | no: inside the noise |" in aligned
    (hard,) = [line for line in lines if line.startswith("| hard | aligned | 7 | 100.0 |")]
    assert "| 0.500 (McNemar) |" in hard
    assert "| default | sft | 0, 1 | 50.0 ± 0.0 |" in text and "| baseline |" in text


def test_significant_difference_is_marked(tmp_path: Path) -> None:
    n = 12
    ids = [f"c{i}" for i in range(n)]
    base = Run("default", 0, {"sft": table_rows("sft", [0] * n, [0.0], ids, ["o1"])})
    better = Run("new", 0, {"aligned": table_rows("aligned", [1] * n, [1.0], ids, ["o1"])})
    report = compare_runs([base, better], "default/sft", resamples=999, seed=0)
    v = row(report, "new", "aligned", "closed_accuracy")["vs_baseline"]
    assert v["p_value"] == pytest.approx(2 / 2**n) and v["significant"]  # 12/0 discordant
    assert "| **yes** |" in render_markdown(report)


def test_mismatched_item_ids_raise_naming_them(folders: dict[str, Path], tmp_path: Path) -> None:
    other = Run("other", 0, {"aligned": table_rows("aligned", [1, 1, 1, 1], [0.5] * 4,
                                                     ["c1", "c2", "c3", "c5"])})
    with pytest.raises(DataError, match=r"only in other:0/aligned: c5; only in default:0/sft: c4"):
        compare_runs([*runs_from(folders, "default:0"), other], "default/sft", resamples=99, seed=0)
    # Seeds of one config must cover the same items too (their scores are averaged per item).
    other1 = Run("default", 1, {"sft": table_rows("sft", [1, 1, 1], [0.5] * 4, ["c1", "c2", "c9"])})
    with pytest.raises(DataError, match=r"c3, c4.*c9"):
        compare_runs([*runs_from(folders, "default:0"), other1], "default/sft", resamples=99, seed=0)


def test_bad_baselines_and_duplicate_runs(folders: dict[str, Path]) -> None:
    runs = runs_from(folders, "default:0")
    with pytest.raises(DataError, match="baseline config 'nope'"):
        compare_runs(runs, "nope/sft", seed=0)
    with pytest.raises(DataError, match="baseline model 'rlhf'"):
        compare_runs(runs, "default/rlhf", seed=0)
    with pytest.raises(DataError, match="CONFIG/MODEL"):
        compare_runs(runs, "sft", seed=0)
    with pytest.raises(DataError, match="given twice"):
        compare_runs(runs * 2, "default/sft", seed=0)


def test_parse_run_and_load_folder(folders: dict[str, Path], tmp_path: Path) -> None:
    assert parse_run("default:0=reports/predictions") == ("default", 0, "reports/predictions")
    assert parse_run("mask:0.5:3=rev:exp-1") == ("mask:0.5", 3, "rev:exp-1")
    for bad in ("default=reports/predictions", "default:0", "default:x=folder"):
        with pytest.raises(DataError):
            parse_run(bad)
    tables = load_folder(folders["default:0"])
    assert sorted(tables) == ["aligned", "aligned_blind", "sft", "sft_blind"]
    assert len(tables["sft"]) == 8
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no prediction tables"):
        load_folder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        load_folder(tmp_path / "missing")


def _metrics_report(models: list[str]) -> dict:
    entry = {"closed_accuracy": 0.5, "open_recall": 0.5, "n_closed": 4, "n_open": 4}
    out: dict = {m: dict(entry) for m in models}
    out["sft_image_reliance"] = {"closed_accuracy": 0.25, "open_recall": 0.25}
    out["aligned_minus_sft"] = {"closed_accuracy": 0.25, "open_recall": 0.25}
    out["sft_logprob_gap"] = {"mean": 1.0, "median": 1.0, "n": 3, "by_modality": {}}
    return out


def test_load_rev_reads_the_models_listed_in_the_metrics_report(folders: dict[str, Path]) -> None:
    report = _metrics_report(["sft", "sft_blind"])
    assert prediction_models(report) == ["sft", "sft_blind"]
    reads: list[tuple[str, str]] = []

    def read(path: str, rev: str) -> bytes:  # a stand-in for dvc.api.open
        reads.append((path, rev))
        if path == "reports/metrics.json":
            return json.dumps(report).encode()
        return (folders["default:0"] / Path(path).name).read_bytes()

    tables = load_rev("exp-1", read=read)
    assert sorted(tables) == ["sft", "sft_blind"]
    assert tables["sft"] == load_folder(folders["default:0"])["sft"]
    assert reads == [("reports/metrics.json", "exp-1"), ("reports/predictions/sft.parquet", "exp-1"),
                     ("reports/predictions/sft_blind.parquet", "exp-1")]
    with pytest.raises(DataError, match="no model entries"):
        load_rev("exp-1", read=lambda path, rev: b'{"aligned_minus_sft": {}}')
    with pytest.raises(DataError, match="not a readable Parquet"):
        load_rev("exp-1", read=lambda path, rev: json.dumps(report).encode() if path.endswith(".json") else b"junk")


def _git(repo: Path, *args: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, env=env)


def test_rev_source_reads_a_dvc_tracked_folder_at_an_older_commit(folders: dict[str, Path], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys

    def dvc(*args: str) -> None:
        # DVC's CLI in a subprocess: in-process, its logger keeps a handle on whatever stream an
        # earlier test's capture left behind, and fails on the closed file.
        subprocess.run([sys.executable, "-m", "dvc", *args, "-q"], cwd=repo, check=True)

    repo = tmp_path / "project"
    repo.mkdir()
    _git(repo, "init", "-q")
    dvc("init")
    predictions = write_folder(repo / "reports" / "predictions", {"sft": DEFAULT_SEED0["sft"]})
    (repo / "reports" / "metrics.json").write_text(json.dumps(_metrics_report(["sft"])))
    dvc("add", str(predictions))
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "seed 0")
    # The working copy moves on to another run; the old one stays readable at HEAD~1 (from the cache).
    write_folder(predictions, {"sft": DEFAULT_SEED1["sft"]})
    dvc("add", str(predictions))
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "seed 1")

    monkeypatch.chdir(repo)
    old = load_run("default:0=rev:HEAD~1")
    new = load_run("default:1=rev:HEAD")
    assert old.tables["sft"] == load_folder(folders["default:0"])["sft"]
    assert new.tables["sft"] == load_folder(folders["default:1"])["sft"]
    with pytest.raises(FileNotFoundError, match="unknown Git revision"):
        load_run("default:2=rev:no-such-experiment")


def test_cli_end_to_end(folders: dict[str, Path], tmp_path: Path) -> None:
    out, md = tmp_path / "out" / "compare.json", tmp_path / "out" / "compare.md"
    args = ["--run", f"default:0={folders['default:0']}", "--run", f"default:1={folders['default:1']}",
            "--run", f"hard:7={folders['hard:7']}", "--baseline", "default/sft", "--output", str(out),
            "--markdown", str(md), "--resamples", "999", "--seed", "3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["seed"] == 3 and report["resamples"] == 999
    assert [(r["config"], r["seed"]) for r in report["runs"]] == [("default", 0), ("default", 1), ("hard", 7)]
    assert row(report, "default", "aligned", "closed_accuracy")["vs_baseline"]["difference"] == pytest.approx(0.375)
    assert row(report, "hard", "aligned", "closed_accuracy")["vs_baseline"]["p_value"] == pytest.approx(0.5)
    assert md.read_text() == result.output  # the Markdown is printed as written
    assert "no: inside the noise" in result.output

    bad = CliRunner().invoke(app, ["--run", "default=somewhere", "--baseline", "default/sft", "--output",
                                   str(out), "--markdown", str(md), "--seed", "0"])
    assert bad.exit_code != 0 and "NAME:SEED=SOURCE" in str(bad.exception)


def test_unknown_answer_type_is_a_data_error() -> None:
    rows = table_rows("sft", [1, 0], [0.5], ["c1", "c2"], ["o1"])
    rows[0]["answer_type"] = "yes/no"
    with pytest.raises(DataError, match="default:0/sft.*'yes/no'"):
        compare_runs([Run("default", 0, {"sft": rows})], "default/sft", seed=0)

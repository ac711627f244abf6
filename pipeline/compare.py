"""Compare evaluation runs over seeds: means ± std, bootstrap intervals, paired tests against a baseline.

A run is one `evaluate` output: a config name (what was changed, e.g. `default`, `hard`), the
seed it was trained with, and its per-question prediction tables (`reports/predictions/<model>.parquet`,
`pipeline.schema.PREDICTION_SCHEMA`), one per model key (`sft`, `sft_blind`, `aligned`, ...).
`compare_runs` turns several runs into a report with, per config, model and metric:

- the metric per seed, with the definitions of `pipeline.metrics.summarize` (closed accuracy: the
  mean 0/1 score of the closed questions; open recall: the mean token recall of the open ones),
  and `image_reliance_<metric>` = model − `<model>_blind` where a blind table exists
  (`pipeline.evaluation.model_metrics`);
- their mean and sample standard deviation over seeds (`pipeline.statistics.over_seeds`);
- a 95% BCa bootstrap interval over test items (`pipeline.statistics.bootstrap_ci`): of the item
  scores for a single seed, of the per-item scores averaged over the seeds for several (so the
  interval is the test-set noise of the seed-averaged metric; the seed noise is the std);
- the paired difference against a baseline (config/model, e.g. `default/sft`) on the same items:
  each seed of the row is paired with the baseline run of the same seed when the baseline has
  it, else with the baseline's first (lowest) seed; the per-item differences are averaged over
  those pairs. Closed accuracy with one seed on each side is tested with the exact McNemar test,
  everything else (open recall, image reliance, seed-averaged closed scores, which are no longer
  0/1) with the paired permutation test; p < `alpha` (0.05) is significant, anything else is
  reported as inside the noise. A blind control `X_blind` is compared with the baseline model's
  blind control.

Reading runs: `load_folder` reads a folder of prediction tables; `load_rev` reads them at a git
revision or DVC experiment name through `dvc.api.open` (`dvc_read`, the only DVC-aware code here),
with the model list from that revision's `reports/metrics.json`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import DataError, InputNotFoundError
from pipeline.evaluation import prediction_models
from pipeline.metrics import summarize
from pipeline.schema import PREDICTION_SCHEMA, read_rows
from pipeline.statistics import (
    ALPHA,
    DEFAULT_CONFIDENCE,
    DEFAULT_RESAMPLES,
    MCNEMAR,
    PairedTest,
    bootstrap_ci,
    mcnemar_test,
    over_seeds,
    paired_scores,
    permutation_test_paired,
)

HEADLINE = ("closed_accuracy", "open_recall")
RELIANCE = tuple(f"image_reliance_{m}" for m in HEADLINE)
METRICS = HEADLINE + RELIANCE
ANSWER_TYPE = {"closed_accuracy": "closed", "open_recall": "open"}
LABELS = {"closed_accuracy": "closed accuracy", "open_recall": "open recall",
          "image_reliance_closed_accuracy": "image reliance, closed accuracy (model − blind)",
          "image_reliance_open_recall": "image reliance, open recall (model − blind)"}
BLIND = "_blind"
REV_PREFIX = "rev:"

Rows = Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class Run:
    """One evaluation run: its config name, its seed, and its prediction rows per model key."""

    config: str
    seed: int
    tables: Mapping[str, Rows]
    source: str = ""

    @property
    def name(self) -> str:
        return f"{self.config}:{self.seed}"


# ---------------------------------------------------------------------------------------------
# Per-run metrics and per-item scores


def item_scores(rows: Rows, answer_type: str, where: str = "table") -> dict[str, float]:
    """id → score of the rows of one answer type (`closed` or `open`, any case and padding, as
    in `pipeline.metrics`); an id that occurs twice is an error (items could not be paired)."""
    out: dict[str, float] = {}
    for row in rows:
        if str(row["answer_type"]).strip().lower() != answer_type:
            continue
        if row["id"] in out:
            raise DataError(f"{where}: item id {row['id']!r} occurs twice among the {answer_type} questions")
        out[row["id"]] = float(row["score"])
    return out


@dataclass(frozen=True)
class _Metric:
    value: float
    items: dict[str, float]


def run_metrics(run: Run) -> dict[str, dict[str, _Metric]]:
    """Per model key of `run`, per metric it has: the value and the per-item scores.

    The value is `summarize`'s (or model − blind for image reliance, as `model_metrics`); a metric
    with no question of its answer type is left out.
    """
    out: dict[str, dict[str, _Metric]] = {}
    summaries: dict[str, dict[str, Any]] = {}
    for model, rows in run.tables.items():
        try:
            summaries[model] = summarize([dict(r) for r in rows])
        except ValueError as e:  # an unknown answer_type
            raise DataError(f"{run.name}/{model} ({run.source or 'in memory'}): {e}") from e
    for model, rows in run.tables.items():
        where = f"{run.name}/{model}"
        metrics: dict[str, _Metric] = {}
        for metric in HEADLINE:
            if summaries[model][metric] is not None:
                metrics[metric] = _Metric(summaries[model][metric], item_scores(rows, ANSWER_TYPE[metric], where))
        blind = model + BLIND
        if blind in run.tables:
            for metric in HEADLINE:
                if metric in metrics and summaries[blind][metric] is not None:
                    blind_items = item_scores(run.tables[blind], ANSWER_TYPE[metric], f"{run.name}/{blind}")
                    ids, x, y = paired_scores(metrics[metric].items, blind_items, (where, f"{run.name}/{blind}"))
                    metrics[f"image_reliance_{metric}"] = _Metric(
                        metrics[metric].value - summaries[blind][metric], dict(zip(ids, (x - y).tolist(), strict=True)))
        out[model] = metrics
    return out


def _average(items: Sequence[tuple[str, dict[str, float]]]) -> dict[str, float]:
    """Per-item mean over several runs' scores; every run must cover the same ids."""
    (first_name, first), *rest = items
    for name, other in rest:
        paired_scores(first, other, (first_name, name))
    ids = sorted(first)
    return dict(zip(ids, np.mean([[s[i] for i in ids] for _, s in items], axis=0).tolist(), strict=True))


# ---------------------------------------------------------------------------------------------
# The report


def parse_baseline(spec: str) -> tuple[str, str]:
    """`CONFIG/MODEL` → (config, model)."""
    config, _, model = spec.partition("/")
    if not config or not model:
        raise DataError(f"the baseline is CONFIG/MODEL (e.g. default/sft), got {spec!r}")
    return config, model


def compare_runs(
    runs: Sequence[Run],
    baseline: str | tuple[str, str],
    *,
    seed: int,
    confidence: float = DEFAULT_CONFIDENCE,
    resamples: int = DEFAULT_RESAMPLES,
    alpha: float = ALPHA,
) -> dict[str, Any]:
    """The comparison report of `runs` against `baseline` (`CONFIG/MODEL`), as a JSON-able dict.

    `rows` holds one entry per config, model and metric (see the module doc); every bootstrap
    and permutation uses `seed`, so the same runs and seed give the same report.
    """
    base_config, base_model = parse_baseline(baseline) if isinstance(baseline, str) else baseline
    if not runs:
        raise DataError("no runs to compare")
    by_config: dict[str, dict[int, Run]] = {}
    for run in runs:
        seeds = by_config.setdefault(run.config, {})
        if run.seed in seeds:
            raise DataError(f"run {run.name} is given twice ({seeds[run.seed].source!r} and {run.source!r})")
        seeds[run.seed] = run
    if base_config not in by_config:
        raise DataError(f"baseline config {base_config!r} is not among the runs ({', '.join(by_config)})")
    metrics = {run.name: run_metrics(run) for run in runs}

    notes: list[str] = []
    models: dict[str, list[str]] = {}
    for config, seeds in by_config.items():
        sets = [set(seeds[s].tables) for s in sorted(seeds)]
        common = set.intersection(*sets)
        if set.union(*sets) - common:
            notes.append(f"{config}: models {sorted(set.union(*sets) - common)} are not in every seed's run; "
                         "left out")
        models[config] = sorted(common)
    if base_model not in models[base_config]:
        raise DataError(f"baseline model {base_model!r} is not in every run of config {base_config!r} "
                        f"(models: {', '.join(models[base_config])})")
    base_runs = by_config[base_config]
    first_base_seed = min(base_runs)

    rows: list[dict[str, Any]] = []
    for metric in METRICS:
        for config, seeds in by_config.items():
            for model in models[config]:
                order = sorted(seeds)
                if not all(metric in metrics[seeds[s].name][model] for s in order):
                    continue
                values = {s: metrics[seeds[s].name][model][metric] for s in order}
                spread = over_seeds([values[s].value for s in order])
                pooled = _average([(f"{seeds[s].name}/{model}", values[s].items) for s in order])
                over = "items" if len(order) == 1 else f"items, per-item scores averaged over {len(order)} seeds"
                row: dict[str, Any] = {
                    "config": config, "model": model, "metric": metric, "seeds": order,
                    "per_seed": {str(s): values[s].value for s in order},
                    "mean": spread.mean, "std": spread.std, "n_seeds": spread.n, "n_items": len(pooled),
                    "ci": bootstrap_ci(list(pooled.values()), confidence, resamples, seed=seed).to_dict() | {"over": over},
                }
                ref_model = base_model + BLIND if model.endswith(BLIND) else base_model
                if config == base_config and model == ref_model:
                    row["role"] = "baseline"
                    row["vs_baseline"] = None
                elif ref_model not in models[base_config] or not all(
                        metric in metrics[base_runs[s].name][ref_model] for s in base_runs):
                    row["role"] = "no baseline"
                    row["vs_baseline"] = None
                else:
                    row["role"] = "compared"
                    pairs = [(s, s if s in base_runs else first_base_seed) for s in order]
                    row["vs_baseline"] = _versus(config, model, metric, values, pairs, base_config, ref_model,
                                                 metrics, base_runs, confidence, resamples, seed, alpha)
                rows.append(row)
    return {
        "baseline": f"{base_config}/{base_model}",
        "confidence": confidence, "alpha": alpha, "resamples": resamples, "seed": seed,
        "methods": {
            "std": "sample standard deviation over seeds (ddof=1); null for a single seed",
            "ci": "BCa bootstrap of the mean over test items (degenerate [mean, mean] for constant "
                  "scores, percentile where BCa is undefined); with several seeds, over the per-item "
                  "scores averaged over the seeds",
            "pairing": "each seed is paired with the baseline run of the same seed, else with the "
                       "baseline's first seed; per-item differences are averaged over the pairs",
            "test": "exact McNemar (closed accuracy, one seed on each side) or paired permutation test "
                    "of the mean difference (everything else); two-sided; no correction for multiple "
                    "comparisons",
            "blind": "a blind control X_blind is compared with the baseline model's blind control",
        },
        "runs": [{"config": r.config, "seed": r.seed, "source": r.source, "models": sorted(r.tables)}
                 for r in runs],
        "notes": notes,
        "rows": rows,
    }


def _versus(config: str, model: str, metric: str, values: Mapping[int, _Metric], pairs: list[tuple[int, int]],
            base_config: str, base_model: str, metrics: Mapping[str, dict[str, dict[str, _Metric]]],
            base_runs: Mapping[int, Run], confidence: float, resamples: int, seed: int, alpha: float
            ) -> dict[str, Any]:
    base = {b: metrics[base_runs[b].name][base_model][metric] for _, b in pairs}
    names = (f"{config}/{model}", f"{base_config}/{base_model}")
    for s, b in pairs:  # a clear error naming both runs when their items differ
        paired_scores(values[s].items, base[b].items, (f"{config}:{s}/{model}", f"{base_config}:{b}/{base_model}"))
    test: PairedTest
    if metric == "closed_accuracy" and len(pairs) == 1:
        (s, b), = pairs
        test = mcnemar_test(values[s].items, base[b].items, seed=seed, confidence=confidence, resamples=resamples,
                            names=names)
    else:
        mine = _average([(f"{config}:{s}/{model}", values[s].items) for s, _ in pairs])
        theirs = _average([(f"{base_config}:{b}/{base_model}", base[b].items) for _, b in pairs])
        test = permutation_test_paired(mine, theirs, seed=seed, confidence=confidence, resamples=resamples,
                                       names=names)
    significant = test.significant(alpha)
    return {
        "baseline": f"{base_config}/{base_model}",
        "seed_pairs": [list(p) for p in pairs],
        "baseline_mean": test.mean_b,
        "difference": test.difference,
        "ci": test.ci.to_dict(),
        "per_seed_difference": {str(s): values[s].value - base[b].value for s, b in pairs},
        "test": test.test,
        "discordant": list(test.discordant) if test.discordant is not None else None,
        "p_value": test.p_value,
        "significant": significant,
        "verdict": f"significant (p < {alpha:g})" if significant else f"inside the noise (p >= {alpha:g})",
    }


# ---------------------------------------------------------------------------------------------
# Markdown


def _pct(x: float | None, sign: bool = False) -> str:
    if x is None:
        return "—"
    value = round(100 * x, 1) + 0.0  # no "-0.0"
    return f"{value:+.1f}" if sign else f"{value:.1f}"


def _p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown: one table per metric, values in percent (points for differences)."""
    conf = f"{100 * report['confidence']:g}%"
    alpha = f"{report['alpha']:g}"
    lines = [
        f"# Run comparison against {report['baseline']}",
        "",
        f"Mean ± sample std over seeds, in %. {conf} CI: BCa bootstrap over test items "
        f"({report['resamples']} resamples, seed {report['seed']}); with several seeds, over the per-item "
        f"scores averaged over the seeds. Δ: paired difference with the baseline on the same items, in "
        f"points, with its {conf} CI; seeds paired by seed, else with the baseline's first seed. "
        f"p: exact McNemar (closed accuracy, one seed each) or paired permutation test, two-sided; "
        f"significant at p < {alpha}, no correction for multiple comparisons.",
    ]
    for metric in METRICS:
        rows = [r for r in report["rows"] if r["metric"] == metric]
        if not rows:
            continue
        lines += ["", f"## {LABELS[metric]}", "",
                  f"| config | model | seeds | mean ± std | {conf} CI | Δ vs baseline [{conf} CI] | p | significant? |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            spread = _pct(r["mean"]) + (f" ± {_pct(r['std'])}" if r["std"] is not None else "")
            ci = f"[{_pct(r['ci']['low'])}, {_pct(r['ci']['high'])}]"
            seeds = ", ".join(str(s) for s in r["seeds"])
            v = r["vs_baseline"]
            if v is None:
                delta, p, sig = ("baseline", "", "") if r["role"] == "baseline" else ("no baseline", "", "")
            else:
                delta = (f"{_pct(v['difference'], sign=True)} [{_pct(v['ci']['low'], sign=True)}, "
                         f"{_pct(v['ci']['high'], sign=True)}]")
                p = f"{_p(v['p_value'])} ({'McNemar' if v['test'] == MCNEMAR else 'permutation'})"
                sig = "**yes**" if v["significant"] else "no: inside the noise"
            lines.append(f"| {r['config']} | {r['model']} | {seeds} | {spread} | {ci} | {delta} | {p} | {sig} |")
    for note in report.get("notes", []):
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Reading runs


def parse_run(spec: str) -> tuple[str, int, str]:
    """`NAME:SEED=SOURCE` → (config name, seed, source); SOURCE is a folder or `rev:<rev>`."""
    left, eq, source = spec.partition("=")
    config, colon, seed = left.rpartition(":")
    if not eq or not colon or not config or not source:
        raise DataError(f"a run is NAME:SEED=SOURCE (e.g. default:0=reports/predictions or "
                        f"hard:1=rev:my-experiment), got {spec!r}")
    try:
        return config, int(seed), source
    except ValueError:
        raise DataError(f"{spec!r}: the seed must be an integer, got {seed!r}") from None


def load_folder(folder: str | Path) -> dict[str, list[dict]]:
    """The prediction tables of a folder (e.g. `reports/predictions`), keyed by file stem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputNotFoundError(f"{folder}: no such folder of prediction tables (the `evaluate` stage's "
                                 "--output, e.g. reports/predictions)")
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise DataError(f"{folder}: no prediction tables (*.parquet) in it")
    return {f.stem: read_rows(f, PREDICTION_SCHEMA) for f in files}


def rows_from_bytes(data: bytes, where: str) -> list[dict]:
    """The rows of a prediction table given as Parquet bytes, checked against its schema."""
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{where}: not a readable Parquet file ({e})") from e
    for field in PREDICTION_SCHEMA:
        if field.name not in table.column_names:
            raise DataError(f"{where}: missing column {field.name!r}; not a prediction table")
        if table.schema.field(field.name).type != field.type:
            raise DataError(f"{where}: column {field.name!r} is {table.schema.field(field.name).type}, "
                            f"expected {field.type}")
    return table.select(PREDICTION_SCHEMA.names).to_pylist()


def dvc_read(path: str, rev: str, repo: str | None = None) -> bytes:
    """The bytes of `path` at git revision or DVC experiment `rev` (`dvc.api.open`, from the DVC
    cache or remote); `repo` defaults to the project around the current directory."""
    import dvc.api
    from dvc.exceptions import DvcException

    try:
        with dvc.api.open(path, repo=repo, rev=rev, mode="rb") as f:
            return f.read()
    except (DvcException, OSError) as e:
        raise InputNotFoundError(
            f"{path} at {rev!r}: cannot read it through DVC ({type(e).__name__}: {e}); check the revision or "
            "experiment name (`dvc exp list`), and that its outputs are in the cache or the remote "
            "(`dvc exp pull` / `dvc pull`)"
        ) from e


def load_rev(
    rev: str,
    predictions: str = "reports/predictions",
    metrics: str = "reports/metrics.json",
    repo: str | None = None,
    read: Callable[[str, str], bytes] | None = None,
) -> dict[str, list[dict]]:
    """The prediction tables of a run at a git revision or DVC experiment name.

    The models are those of `metrics` (the `evaluate` report) at `rev`; each table is
    `<predictions>/<model>.parquet` at `rev`. `read(path, rev)` fetches a file's bytes
    (default: `dvc_read` in `repo`), so everything but the DVC access is testable on plain files.
    """
    if read is None:
        def read(path: str, rev: str) -> bytes:
            return dvc_read(path, rev, repo)

    try:
        report = json.loads(read(metrics, rev))
    except json.JSONDecodeError as e:
        raise DataError(f"{metrics} at {rev!r}: not valid JSON ({e})") from e
    models = prediction_models(report) if isinstance(report, Mapping) else []
    if not models:
        raise DataError(f"{metrics} at {rev!r}: no model entries (with n_closed / n_open); is it the "
                        "`evaluate` stage's metrics report?")
    return {m: rows_from_bytes(read(f"{predictions}/{m}.parquet", rev), f"{predictions}/{m}.parquet at {rev!r}")
            for m in models}


def load_source(source: str, predictions: str = "reports/predictions", metrics: str = "reports/metrics.json",
                repo: str | None = None) -> dict[str, list[dict]]:
    """The prediction tables of `source`: `rev:<git rev or DVC experiment>` or a folder."""
    if source.startswith(REV_PREFIX):
        rev = source[len(REV_PREFIX):]
        if not rev:
            raise DataError(f"{source!r}: give a git revision or experiment name after {REV_PREFIX!r}")
        return load_rev(rev, predictions, metrics, repo)
    return load_folder(source)


def load_run(spec: str, predictions: str = "reports/predictions", metrics: str = "reports/metrics.json",
             repo: str | None = None) -> Run:
    """A `Run` from a `NAME:SEED=SOURCE` spec (see `parse_run` and `load_source`)."""
    config, seed, source = parse_run(spec)
    return Run(config, seed, load_source(source, predictions, metrics, repo), source)

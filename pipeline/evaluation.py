"""Benchmark evaluation: batched greedy answers, LLaVA-Med metrics, and the blind control.

The blind control is the same model with every visual token dropped (attention-masked). The gap
between a model's score and its blind score is how much it relies on the image: HSCR's modality
misalignment shows up as a small gap.

Each model's work (its predictions, its blind predictions; its log-prob gaps in the `report`
stage) runs batch by batch through `pipeline.resume`: every finished batch is kept under the
stage's work folder, keyed by the model folder's bytes, the input's bytes, the config and the code
version, so an interrupted run started again redoes only the unfinished batches.

Answers are decoded in batches of one answer type, each with its type's cap
(`evaluate.max_new_tokens.closed` / `.open`): an open answer needs more room than "yes", and
greedy decoding stops at the end-of-turn token, so a larger cap changes only answers it would cut.

Report generation (docs/evaluation.md § Report generation): every model, and its blind control,
also writes a report for each row of the report-generation benchmark(s) (`data/prepared/
reports.parquet`: the phantom's, and/or the user's IU-Xray / MIMIC-CXR), greedy, capped at
`evaluate.report_max_new_tokens`, resumable like the answers; the reports are scored per benchmark
with BLEU-1..4, ROUGE-L and METEOR (`pipeline.report_metrics`) under `<model>_report_generation`.

The `evaluate` stage runs once per model (a DVC `foreach`), so an ablation that changes only the
aligned model does not evaluate the unchanged SFT model again; the `report` stage combines the
per-model reports into `reports/metrics.json` (`combine_reports`). `lmms_eval_samples` writes the
per-question predictions in lmms-eval's `--log_samples` layout for other tools (docs/evaluation.md).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import Field
from tqdm.auto import tqdm

from pipeline.batching import collate_prompts
from pipeline.errors import DataError
from pipeline.fingerprint import code_version, fingerprint
from pipeline.generation import greedy_generate
from pipeline.metrics import normalize_answer, score_prediction, summarize
from pipeline.models.vlm import VLM
from pipeline.params import Config
from pipeline.resume import BatchRun, BatchStore, run_batches
from pipeline.schema import ANSWER_TYPES
from pipeline.sharding import Shard
from pipeline.visual_dropout import blind_mask

HEADLINE = ("closed_accuracy", "open_recall")


class MaxNewTokens(Config):
    """`evaluate.max_new_tokens`: the cap on an answer's length per answer type, in tokens."""

    closed: int = Field(ge=1, description="cap on the answer to a closed question (yes/no, one of a few words), "
                        "in tokens")
    open: int = Field(ge=1, description="cap on the answer to an open question (a word or a phrase), in tokens")

    def for_type(self, answer_type: str) -> int:
        """The cap of `answer_type` ("closed"/"open", any case, as `pipeline.metrics` reads it)."""
        kind = answer_type.strip().lower()
        if kind not in ANSWER_TYPES:
            raise DataError(f"answer_type must be one of {ANSWER_TYPES} (any case), got {answer_type!r}")
        return getattr(self, kind)


# A new answer type in pipeline.schema needs its own decoding cap (and its key in params.yaml).
if set(MaxNewTokens.model_fields) != set(ANSWER_TYPES):
    raise RuntimeError(f"MaxNewTokens has limits for {sorted(MaxNewTokens.model_fields)}, but "
                       f"pipeline.schema.ANSWER_TYPES is {ANSWER_TYPES}: give every answer type a limit")


class GapConfig(Config):
    """`evaluate.heldout_gap`: the held-out entries of the log-prob gap analysis (HSCR Fig. 4)."""

    entries: int = Field(ge=1, description="test rows whose log-prob gaps `report` computes (HSCR Fig. 4), a "
                         "sample stratified by modality: as even over the modalities as their rows allow; all test "
                         "rows if there are fewer")
    seed: int = Field(ge=0, description="seeds that sample (the candidates use sample.seed, as in `sample`)")


class EvaluateConfig(Config):
    """The `evaluate:` section."""

    batch_size: int = Field(ge=1, description="questions per generation batch (also the log-prob gap batch, in entries)")
    max_new_tokens: MaxNewTokens = Field(description="cap on an answer's length per answer type, in tokens; each "
                                         "batch holds one answer type and decodes with its cap")
    report_max_new_tokens: int = Field(ge=1, description="cap on a generated report's length, in tokens (the "
                                       "report-generation benchmark: data/prepared/reports.parquet)")
    max_rows: int | None = Field(ge=1, description="evaluate only the first N test rows and the first N report "
                                 "rows (quick checks); null = all")
    heldout_gap: GapConfig = Field(description="`report` only: the held-out test entries of the log-prob gap analysis "
                           "(HSCR Fig. 4; pipeline/heldout_gaps.py)")


def predict_batch(vlm: VLM, rows: list[dict], max_new_tokens: int, blind: bool = False) -> list[str]:
    """Greedy answers for one batch of rows (temperature 0, so the numbers are reproducible)."""
    batch = collate_prompts(vlm, [r["image"] for r in rows], [r["question"] for r in rows],
                            [r["context"] for r in rows])
    mask = blind_mask(batch.attention_mask, batch.image_mask) if blind else None
    return [vlm.decode(ids) for ids in greedy_generate(vlm, batch, max_new_tokens, attention_mask=mask)]


def predict_report_batch(vlm: VLM, rows: list[dict], max_new_tokens: int, blind: bool = False) -> list[str]:
    """Greedy reports for one batch of report-benchmark rows (REPORT_SCHEMA: `prompt`, no earlier turns)."""
    batch = collate_prompts(vlm, [r["image"] for r in rows], [r["prompt"] for r in rows], [[] for _ in rows])
    mask = blind_mask(batch.attention_mask, batch.image_mask) if blind else None
    return [vlm.decode(ids) for ids in greedy_generate(vlm, batch, max_new_tokens, attention_mask=mask)]


def report_prediction_rows(name: str, rows: list[dict], predictions: list[str]) -> list[dict]:
    """REPORT_PREDICTION_SCHEMA rows, unscored (`score_reports` fills `rouge_l` and `meteor`)."""
    return [{"id": r["id"], "model": name, "dataset": r["dataset"], "modality": r["modality"], "prompt": r["prompt"],
             "report": r["report"], "prediction": p, "rouge_l": None, "meteor": None}
            for r, p in zip(rows, predictions, strict=True)]


def score_reports(predictions: list[dict], cleaning: Mapping[str, str]) -> tuple[list[dict], dict[str, dict]]:
    """Per benchmark (`dataset`), BLEU-1..4, ROUGE-L and METEOR of the predicted reports against
    their references (`pipeline.report_metrics.report_scores`, with the benchmark's R2Gen cleaner
    from `cleaning`), plus its report count `n`; and the rows with their per-report ROUGE-L and METEOR."""
    from pipeline.report_metrics import report_scores
    from pipeline.statistics import bootstrap_ci

    scored = [dict(r) for r in predictions]
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(scored):
        groups.setdefault(row["dataset"], []).append(i)
    out: dict[str, dict] = {}
    for dataset in sorted(groups):  # sorted so that reports diff cleanly between runs
        idx = groups[dataset]
        if dataset not in cleaning:
            raise DataError(f"report benchmark {dataset!r} has no text cleaner (its rows' `cleaning`)")
        done = report_scores([scored[i]["prediction"] for i in idx], [scored[i]["report"] for i in idx],
                             dataset=cleaning[dataset])
        for j, i in enumerate(idx):
            for metric, values in done.per_item.items():
                scored[i][metric] = values[j]
        # ROUGE-L is the mean of per-report scores, so it has an interval over the reports; BLEU and
        # METEOR are corpus-level scores (their n-gram counts are pooled first) and get none.
        ci = bootstrap_ci([scored[i]["rouge_l"] for i in idx], seed=0)
        out[dataset] = {**done.scores, "rouge_l_ci95": [ci.low, ci.high], "n": len(idx)}
    return scored, out


def report_cleaning(rows: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """The R2Gen cleaner of each benchmark of the report rows; a benchmark with two is an error."""
    cleaning: dict[str, set[str]] = {}
    for row in rows:
        cleaning.setdefault(row["dataset"], set()).add(row["cleaning"])
    mixed = {d: sorted(c) for d, c in cleaning.items() if len(c) > 1}
    if mixed:
        raise DataError(f"report benchmarks with rows of different `cleaning`: {mixed}; one cleaner per benchmark")
    return {d: c.pop() for d, c in cleaning.items()}


def type_batches(rows: Sequence[Mapping[str, Any]], batch_size: int) -> list[list[int]]:
    """The row indices cut into batches of one answer type each, so that every batch decodes with
    its own type's cap: the rows of each type (in `ANSWER_TYPES` order) in input order, `batch_size`
    at a time. The order is fixed by the input alone, so a resumed run cuts the same batches."""
    groups: dict[str, list[int]] = {kind: [] for kind in ANSWER_TYPES}
    for i, row in enumerate(rows):
        kind = str(row["answer_type"]).strip().lower()
        if kind not in groups:
            raise DataError(f"row {row.get('id', i)!r}: answer_type must be one of {ANSWER_TYPES} (any case), "
                            f"got {row['answer_type']!r}")
        groups[kind].append(i)
    return [indices[j : j + batch_size] for indices in groups.values() for j in range(0, len(indices), batch_size)]


def batch_answer_type(rows: Sequence[Mapping[str, Any]]) -> str:
    """The one answer type of a batch cut by `type_batches`."""
    kinds = {str(r["answer_type"]).strip().lower() for r in rows}
    if len(kinds) != 1:
        raise DataError(f"a generation batch mixes answer types {sorted(kinds)}: each needs its own cap")
    return kinds.pop()


def in_input_order(batches: Sequence[Sequence[int]], outputs: Sequence[Any]) -> list[Any]:
    """`outputs`, one per index of `batches` in batch order, put back in the rows' input order."""
    order = [i for batch in batches for i in batch]
    if len(order) != len(outputs) or sorted(order) != list(range(len(order))):
        raise DataError(f"{len(outputs)} outputs for batches over {len(order)} rows: not one output per row")
    placed: list[Any] = [None] * len(order)
    for i, out in zip(order, outputs, strict=True):
        placed[i] = out
    return placed


def predict(vlm: VLM, rows: list[dict], batch_size: int, max_new_tokens: MaxNewTokens, blind: bool = False,
            desc: str = "evaluate") -> list[str]:
    """Greedy answers for `rows` in input order, `batch_size` at a time, each batch of one answer
    type decoded with that type's cap (`type_batches`), as `evaluate` answers."""
    batches = type_batches(rows, batch_size)
    answers: list[str] = []
    for indices in tqdm(batches, desc=desc, unit="batch"):
        batch = [rows[i] for i in indices]
        answers.extend(predict_batch(vlm, batch, max_new_tokens.for_type(batch_answer_type(batch)), blind))
    return in_input_order(batches, answers)


def prediction_rows(name: str, rows: list[dict], predictions: list[str]) -> list[dict]:
    return [
        {
            "id": r["id"],
            "model": name,
            "question": r["question"],
            "answer": r["answer"],
            "prediction": p,
            "answer_type": r["answer_type"],
            "modality": r["modality"],
            "question_type": r["question_type"],
            "score": score_prediction(p, r["answer"], r["answer_type"]),
        }
        for r, p in zip(rows, predictions, strict=True)
    ]


# lmms-eval's per-sample log (`--log_samples`: `<output>/<model>/<date>_samples_<task>.jsonl`), as
# written by its release v0.7.2 (EvolvingLMMs-Lab/lmms-eval cb45ac4d: `evaluator.py` builds the
# line, `loggers/evaluation_tracker.py` flattens and saves it), with the per-sample metric record
# of its medical VQA task `slake` (`tasks/slake/utils.py`, `slake_process_results`).
# docs/evaluation.md § Predictions for other tools maps every field.
LMMS_EVAL_METRICS = HEADLINE  # lmms-eval gives every line every metric key of its task


def lmms_eval_samples(predictions: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One lmms-eval `--log_samples` line per prediction row (`prediction_rows`), in their order.

    `doc_id` is the row's position (lmms-eval's index of the document in its task); the metric
    record under each metric key holds our strict score and the normalizations it compared.
    """
    lines = []
    for doc_id, row in enumerate(predictions):
        doc = {key: row[key] for key in ("id", "question", "answer", "answer_type", "modality", "question_type")}
        record = {
            "id": row["id"],
            "prediction": row["prediction"],
            "prediction_normalized": normalize_answer(row["prediction"]),
            "target": row["answer"],
            "target_normalized": normalize_answer(row["answer"]),
            "answer_type": str(row["answer_type"]).strip().lower(),
            "modality": row["modality"],
            "content_type": row["question_type"],
            "is_correct": row["score"] == 1.0,
            "score": row["score"],
        }
        lines.append({
            "doc_id": doc_id,
            "target": str(row["answer"]),
            "filtered_resps": row["prediction"],
            "token_counts": [None],  # what lmms-eval writes for a backend that does not count tokens
            # lmms-eval hashes its document as indented JSON (sha256); ours is the question's fields
            "doc_hash": hashlib.sha256(json.dumps(doc, indent=2, ensure_ascii=False).encode("utf-8")).hexdigest(),
            **{metric: dict(record) for metric in LMMS_EVAL_METRICS},
            "input": row["question"],
        })
    return lines


def model_metrics(name: str, predictions: dict[str, list[dict]]) -> dict[str, dict]:
    """Metrics of `name` and `name_blind` from their prediction rows, plus the image reliance."""
    metrics = {key: summarize(predictions[key]) for key in (name, f"{name}_blind")}
    metrics[f"{name}_image_reliance"] = {
        k: _diff(metrics[name][k], metrics[f"{name}_blind"][k]) for k in HEADLINE
    }
    return metrics


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def logprob_gaps(vlm: VLM, rows: list[dict], batch_size: int) -> list[float]:
    """log p(ground truth) − log p(top-ranked hallucinated candidate), full image (HSCR Fig. 4).

    `rows` are preference entries (`answer` = ground truth, `rejected[0]` = the dispreferred
    response most similar to it). A larger gap means the model separates them better.
    """
    gaps: list[float] = []
    for i in range(0, len(rows), batch_size):
        gaps.extend(logprob_gap_batch(vlm, rows[i : i + batch_size]))
    return gaps


def logprob_gap_batch(vlm: VLM, rows: list[dict]) -> list[float]:
    """`logprob_gaps` of one batch of preference entries.

    Both answers of an entry are scored as one group (`pipeline.grouped_scoring`): the tower and
    the prompt run once per entry and only the answer positions get logits, the same scoring
    `train` uses for its reference log-probs (a full forward per sequence spent most of its time
    on the vocabulary projection of every prompt position).
    """
    import torch

    from pipeline.grouped_scoring import collate_groups, group_logprobs

    with torch.no_grad():
        batch = collate_groups(
            vlm, [r["image"] for r in rows], [vlm.prompt_ids(r["question"], r["context"], r["image"]) for r in rows],
            [[vlm.answer_ids(r["answer"]), vlm.answer_ids(r["rejected"][0]["text"])] for r in rows],
        )
        table = group_logprobs(vlm, {k: v.to(vlm.device) for k, v in batch.items()}, share_prompt=True)
        return (table[:, 0] - table[:, 1]).tolist()


def gap_histograms(gaps: dict[str, list[float]], modalities: list[str], bins: int = 20
                   ) -> dict[str, list[dict]]:
    """Per modality, one table of bin centre → count per model (a DVC plot per modality)."""
    values = [g for model_gaps in gaps.values() for g in model_gaps]
    lo, hi = min(values), max(values)
    width = (hi - lo) / bins or 1.0
    tables: dict[str, list[dict]] = {}
    for modality in sorted(set(modalities)):
        table = [{"gap": round(lo + (b + 0.5) * width, 4)} | {m: 0 for m in gaps} for b in range(bins)]
        for model, model_gaps in gaps.items():
            for g, mod in zip(model_gaps, modalities, strict=True):
                if mod == modality:
                    table[min(bins - 1, int((g - lo) / width))][model] += 1
        tables[modality] = table
    return tables


def gap_summary(gaps: list[float], modalities: list[str]) -> dict:
    """Mean, median and count of the gaps, overall and per modality, each mean with its 95%
    bootstrap interval over the entries (`pipeline.statistics.bootstrap_ci`, seeded: the same gaps
    give the same interval)."""
    from pipeline.statistics import bootstrap_ci

    def stats(xs: list[float]) -> dict:
        xs = sorted(xs)
        if not xs:
            return {}
        ci = bootstrap_ci(xs, seed=0)
        return {"mean": sum(xs) / len(xs), "mean_ci95": [ci.low, ci.high], "median": xs[len(xs) // 2], "n": len(xs)}

    return {**stats(gaps), "by_modality": {m: stats([g for g, mm in zip(gaps, modalities, strict=True) if mm == m])
                                           for m in sorted(set(modalities))}}


def deltas(metrics: dict[str, dict], model: str, baseline: str) -> dict[str, float | None]:
    """`model` minus `baseline` on the headline numbers and on the image reliance."""
    out = {k: _diff(metrics[model][k], metrics[baseline][k]) for k in HEADLINE}
    for k in HEADLINE:
        out[f"image_reliance_{k}"] = _diff(metrics[f"{model}_image_reliance"][k],
                                           metrics[f"{baseline}_image_reliance"][k])
    return out


# Everything whose code determines a prediction or a gap: a change to any of them gives new resume keys.
EVALUATE_CODE = ("pipeline.evaluation", "pipeline.generation", "pipeline.batching", "pipeline.visual_dropout",
                 "pipeline.metrics", "pipeline.models", "pipeline.grouped_scoring", "pipeline.losses")
GAP_SCHEMA = pa.schema([pa.field("id", pa.string(), nullable=False), pa.field("gap", pa.float64())])


@dataclass
class Evaluation:
    """What `evaluate_models` returns: the metrics per model key (`sft`, `sft_blind`,
    `sft_image_reliance`, `sft_report_generation`, ...), the prediction rows per model key, the
    generated reports per model key, and per model and pass how many
    batches there were, how many were reused from an interrupted run and how many were computed
    (`{"sft": {"predictions": {"batches": 5, "reused": 3, "computed": 2}, ...}}`)."""

    report: dict[str, Any]
    predictions: dict[str, list[dict]]
    work: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    # Per model key (`sft`, `sft_blind`), its generated reports (REPORT_PREDICTION_SCHEMA rows, scored).
    report_predictions: dict[str, list[dict]] = field(default_factory=dict)


@dataclass
class GapReport:
    """What `logprob_gap_report` returns: `<model>_logprob_gap` summaries, the per-modality
    histograms (one DVC plot per modality) and the batches per model (as in `Evaluation.work`)."""

    report: dict[str, Any]
    histograms: dict[str, list[dict]]
    work: dict[str, dict[str, int]] = field(default_factory=dict)


def _shared_key_parts(cfg: Mapping[str, Any]) -> tuple:
    import torch
    import transformers

    return (dict(cfg), code_version(EVALUATE_CODE), torch.__version__, transformers.__version__)


def _answer_config(cfg: EvaluateConfig) -> dict[str, Any]:
    # `heldout_gap` shapes only the `report` stage's held-out gaps: a new gap sample must not void the answers.
    return {k: v for k, v in cfg.to_dict().items() if k != "heldout_gap"}


def work_keys(models: Sequence[tuple[str, str]], cfg: EvaluateConfig, inputs: Mapping[str, Any]
              ) -> dict[str, dict[str, str]]:
    """The resume key of every model's prediction passes: `{name: {"predictions": key, "blind": key}}`.

    `inputs` holds content digests: `{"input": <test split>, "models": {name: <model folder>}}`.
    A key includes the model's name, which its rows carry.
    """
    shared = _shared_key_parts(_answer_config(cfg))
    return {name: {pass_: fingerprint("evaluate", pass_, name, inputs["input"], inputs["models"][name], *shared)
                   for pass_ in ("predictions", "blind")}
            for name, _ in models}


def report_work_keys(models: Sequence[tuple[str, str]], cfg: EvaluateConfig, inputs: Mapping[str, Any]
                     ) -> dict[str, dict[str, str]]:
    """The resume key of every model's report passes: `{name: {"reports": key, "reports_blind": key}}`;
    `inputs` holds `{"reports": <report benchmark digest>, "models": {name: <model folder digest>}}`."""
    if "reports" not in inputs:
        raise ValueError("inputs has no `reports` digest: the report rows' resume keys need it")
    shared = _shared_key_parts(_answer_config(cfg))
    return {name: {pass_: fingerprint("evaluate", pass_, name, inputs["reports"], inputs["models"][name], *shared)
                   for pass_ in ("reports", "reports_blind")}
            for name, _ in models}


def gap_keys(models: Sequence[tuple[str, str]], batch_size: int, inputs: Mapping[str, Any]) -> dict[str, str]:
    """The resume key of every model's log-prob gaps: `{name: key}`; `inputs` holds content digests
    `{"preferences": <preference entries>, "models": {name: <model folder>}}`. Only the batch size
    of the `evaluate:` section shapes a gap (padding), so only it is in the key."""
    shared = _shared_key_parts({"batch_size": batch_size})
    return {name: fingerprint("evaluate", "logprob_gap", inputs["preferences"], inputs["models"][name], *shared)
            for name, _ in models}


class _LazyModel:
    """Loads the model the first time a batch needs it: a model whose work is all on disk is
    never loaded."""

    def __init__(self, load: Callable[[str], VLM], folder: str) -> None:
        self.load, self.folder, self.vlm = load, folder, None

    def __call__(self) -> VLM:
        if self.vlm is None:
            self.vlm = self.load(self.folder)
        return self.vlm


def _counts(run: BatchRun) -> dict[str, int]:
    return {"batches": run.batches, "reused": run.reused, "computed": run.computed}


def evaluate_models(
    load: Callable[[str], VLM],
    models: Sequence[tuple[str, str]],
    rows: list[dict],
    cfg: EvaluateConfig,
    work_dir: str | Path,
    inputs: Mapping[str, Any],
    on_model: Callable[[str, dict[str, dict]], None] | None = None,
    report_rows: Sequence[dict] = (),
    shard: Shard | None = None,
) -> Evaluation:
    """Evaluate every (name, folder) model and its blind control on the test rows.

    With `report_rows` (REPORT_SCHEMA rows; `inputs["reports"]` is their digest), each also writes
    a report per row, `cfg.batch_size` at a time, capped at `cfg.report_max_new_tokens`, kept and
    reused like the answers (keys: `report_work_keys`), scored per benchmark (`score_reports`)
    under `<name>_report_generation` / `<name>_blind_report_generation`. When the test rows hold
    several `dataset` values, each model key also gets `by_dataset`: its metrics per dataset.

    Returns each model's metrics (`model_metrics`, plus the `max_new_tokens` caps used), its
    prediction rows (in the order of `rows`) and its batch counts. Each batch holds one answer type
    (`type_batches`) and decodes with that type's cap. Finished batches are kept under `work_dir`
    (keys: `work_keys(models, cfg, inputs)`) and reused by a restarted run; they stay there until
    the caller has written its outputs and calls `pipeline.resume.clear_all(work_dir)`.

    `shard`: this process's share of every pass's batches under `accelerate launch`
    (`pipeline.sharding`). Only the main process reads the parts back, scores them and calls
    `on_model`; on any other process the result is empty (it has nothing to write).
    """
    from pipeline.schema import PREDICTION_SCHEMA, REPORT_PREDICTION_SCHEMA

    if cfg.max_rows is not None:
        rows = rows[: cfg.max_rows]
    keys = work_keys(models, cfg, inputs)
    every_key = {key for passes in keys.values() for key in passes.values()}
    report_rows = list(report_rows[: cfg.max_rows] if cfg.max_rows is not None else report_rows)
    report_keys = report_work_keys(models, cfg, inputs) if report_rows else {}
    every_key |= {key for passes in report_keys.values() for key in passes.values()}
    cleaning = report_cleaning(report_rows)
    datasets = [r["dataset"] for r in rows]
    # One work item per batch (`run_batches` with a batch size of 1): the batches are cut per answer
    # type, which consecutive slices of the rows would not respect.
    batches = type_batches(rows, cfg.batch_size)
    limits = cfg.max_new_tokens.to_dict()
    result = Evaluation(report={}, predictions={})
    for name, folder in models:
        vlm = _LazyModel(load, folder)
        work: dict[str, BatchRun] = {}
        for pass_, label, blind in (("predictions", name, False), ("blind", f"{name}_blind", True)):
            def answer(item: list[list[int]], vlm: _LazyModel = vlm, label: str = label, blind: bool = blind
                       ) -> list[dict]:
                (indices,) = item
                batch = [rows[i] for i in indices]
                cap = cfg.max_new_tokens.for_type(batch_answer_type(batch))
                return prediction_rows(label, batch, predict_batch(vlm(), batch, cap, blind))

            store = BatchStore(work_dir, keys[name][pass_], PREDICTION_SCHEMA, siblings=every_key)
            work[pass_] = run_batches(batches, 1, answer, store, desc=f"evaluate {label}", clear=False, shard=shard)
        if report_rows:
            for pass_, label, blind in (("reports", name, False), ("reports_blind", f"{name}_blind", True)):
                def write(batch: list[dict], vlm: _LazyModel = vlm, label: str = label, blind: bool = blind
                          ) -> list[dict]:
                    return report_prediction_rows(
                        label, batch, predict_report_batch(vlm(), batch, cfg.report_max_new_tokens, blind))

                store = BatchStore(work_dir, report_keys[name][pass_], REPORT_PREDICTION_SCHEMA, siblings=every_key)
                work[pass_] = run_batches(report_rows, cfg.batch_size, write, store, desc=f"reports {label}",
                                          clear=False, shard=shard)
        vlm.vlm = None  # free it before the next model loads
        if work["predictions"].table is None:
            continue  # not the main process: its batches are on disk, the main process scores them
        for pass_, label in (("predictions", name), ("blind", f"{name}_blind")):
            result.predictions[label] = in_input_order(batches, work[pass_].table.to_pylist())
        metrics = model_metrics(name, result.predictions)
        for label in (name, f"{name}_blind"):  # the caps the answers were decoded with, beside their scores
            metrics[label]["max_new_tokens"] = dict(limits)
            if len(set(datasets)) > 1:  # only then: a one-dataset report keeps exactly its keys
                metrics[label]["by_dataset"] = {
                    d: summarize([p for p, pd in zip(result.predictions[label], datasets, strict=True) if pd == d])
                    for d in sorted(set(datasets))}
        if report_rows:
            for pass_, label in (("reports", name), ("reports_blind", f"{name}_blind")):
                scored, scores = score_reports(work[pass_].table.to_pylist(), cleaning)
                result.report_predictions[label] = scored
                metrics[f"{label}_report_generation"] = {
                    d: {**s, "max_new_tokens": cfg.report_max_new_tokens} for d, s in scores.items()}
        result.report.update(metrics)
        result.work[name] = {p: _counts(r) for p, r in work.items()}
        if on_model:
            on_model(name, metrics)
    return result


def logprob_gap_report(
    load: Callable[[str], VLM],
    models: Sequence[tuple[str, str]],
    preferences: list[dict],
    batch_size: int,
    work_dir: str | Path,
    inputs: Mapping[str, Any],
) -> GapReport:
    """HSCR Fig. 4 for every (name, folder) model: its log-prob gaps on the preference entries that
    have a dispreferred response, summarised (`<name>_logprob_gap`) and histogrammed per modality
    on shared bins. Resumable like `evaluate_models` (keys: `gap_keys(models, batch_size, inputs)`).
    No entry with a dispreferred response gives an empty report."""
    preferences = [r for r in preferences if r["rejected"]]
    result = GapReport(report={}, histograms={})
    if not preferences:
        return result
    keys = gap_keys(models, batch_size, inputs)
    modalities = [r["modality"] for r in preferences]
    gaps: dict[str, list[float]] = {}
    for name, folder in models:
        vlm = _LazyModel(load, folder)

        def gap(batch: list[dict], vlm: _LazyModel = vlm) -> list[dict]:
            return [{"id": r["id"], "gap": g} for r, g in zip(batch, logprob_gap_batch(vlm(), batch), strict=True)]

        store = BatchStore(work_dir, keys[name], GAP_SCHEMA, siblings=set(keys.values()))
        done = run_batches(preferences, batch_size, gap, store, desc=f"logprob gap {name}", clear=False)
        gaps[name] = done.table.column("gap").to_pylist()
        result.report[f"{name}_logprob_gap"] = gap_summary(gaps[name], modalities)
        result.work[name] = _counts(done)
        vlm.vlm = None
    result.histograms = gap_histograms(gaps, modalities)
    return result


def prediction_models(metrics: Mapping[str, Any]) -> list[str]:
    """The model keys of a metrics report that have a prediction table (`sft`, `sft_blind`, ...:
    the entries with question counts, not the deltas or the log-prob gaps)."""
    return [k for k, v in metrics.items() if isinstance(v, Mapping) and "n_closed" in v and "n_open" in v]


def combine_reports(names: Sequence[str], evaluations: Sequence[Mapping[str, Any]],
                    gaps: Mapping[str, Any]) -> dict[str, Any]:
    """The run's metrics report: every model's metrics (from the per-model `evaluate` reports, its
    `<model>_report_generation` scores included), its log-prob gap summary, and
    `<model>_minus_<names[0]>` deltas for every other model (and, where both generated reports,
    `report_generation_deltas: {<model>_minus_<names[0]>: {<benchmark>: {metric: delta}}}`).

    Each name must have its metrics in exactly one of `evaluations`; a key in two is an error
    (two reports of the same model would silently overwrite each other).
    """
    report: dict[str, Any] = {}
    for evaluation in evaluations:
        clash = report.keys() & evaluation.keys()
        if clash:
            raise DataError(f"metrics of {sorted(clash)} appear in two evaluation reports")
        report.update(evaluation)
    missing = [n for n in names if n not in report or f"{n}_image_reliance" not in report]
    if missing:
        raise DataError(f"no metrics for model(s) {missing} in the evaluation reports (they have "
                         f"{sorted(k for k in report if not k.endswith(('_blind', '_image_reliance')))})")
    report.update(gaps)
    generation: dict[str, dict] = {}
    for name in names[1:]:
        report[f"{name}_minus_{names[0]}"] = deltas(report, name, names[0])
        delta = report_generation_deltas(report, name, names[0])
        if delta:
            generation[f"{name}_minus_{names[0]}"] = delta
    # One key of its own (no top-level `_minus_` key): readers of the VQA deltas (the html page's
    # table) take every `*_minus_*` entry to hold VQA metrics.
    if generation:
        report["report_generation_deltas"] = generation
    return report


def report_generation_deltas(metrics: Mapping[str, Any], model: str, baseline: str) -> dict[str, dict[str, float]]:
    """`model` minus `baseline` on every report metric of every benchmark both were scored on
    (`<name>_report_generation`); empty when either has none."""
    from pipeline.report_metrics import METRICS

    ours = metrics.get(f"{model}_report_generation", {})
    theirs = metrics.get(f"{baseline}_report_generation", {})
    return {bench: {m: ours[bench][m] - theirs[bench][m] for m in METRICS} for bench in sorted(ours.keys() & theirs)}

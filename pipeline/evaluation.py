"""Benchmark evaluation: batched greedy answers, LLaVA-Med metrics, and the blind control.

The blind control is the same model with every visual token dropped (attention-masked). The gap
between a model's score and its blind score is how much it relies on the image: HSCR's modality
misalignment shows up as a small gap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from pydantic import Field
from tqdm.auto import tqdm

from pipeline.batching import collate_prompts
from pipeline.generation import greedy_generate
from pipeline.metrics import score_prediction, summarize
from pipeline.models.vlm import VLM
from pipeline.params import Config
from pipeline.visual_dropout import blind_mask

HEADLINE = ("closed_accuracy", "open_recall")


class EvaluateConfig(Config):
    """The `evaluate:` section."""

    batch_size: int = Field(ge=1, description="questions per generation batch (also the log-prob gap batch, in entries)")
    max_new_tokens: int = Field(ge=1, description="cap on an answer's length, in tokens")
    max_rows: int | None = Field(ge=1, description="evaluate only the first N test rows (quick checks); null = all")


def predict(vlm: VLM, rows: list[dict], batch_size: int, max_new_tokens: int, blind: bool = False,
            desc: str = "evaluate") -> list[str]:
    """Greedy answers for `rows` (temperature 0, so the numbers are reproducible)."""
    predictions: list[str] = []
    for i in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch"):
        chunk = rows[i : i + batch_size]
        batch = collate_prompts(vlm, [r["image"] for r in chunk], [r["question"] for r in chunk])
        mask = blind_mask(batch.attention_mask, batch.image_mask) if blind else None
        for ids in greedy_generate(vlm, batch, max_new_tokens, attention_mask=mask):
            predictions.append(vlm.decode(ids))
    return predictions


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


def evaluate_model(vlm: VLM, name: str, rows: list[dict], batch_size: int, max_new_tokens: int
                   ) -> tuple[dict[str, dict], dict[str, list[dict]]]:
    """Metrics and per-question predictions for `name` and `name_blind`, plus the image reliance."""
    metrics: dict[str, dict] = {}
    predictions: dict[str, list[dict]] = {}
    for key, blind in ((name, False), (f"{name}_blind", True)):
        answers = predict(vlm, rows, batch_size, max_new_tokens, blind=blind, desc=f"evaluate {key}")
        predictions[key] = prediction_rows(key, rows, answers)
        metrics[key] = summarize(predictions[key])
    metrics[f"{name}_image_reliance"] = {
        k: _diff(metrics[name][k], metrics[f"{name}_blind"][k]) for k in HEADLINE
    }
    return metrics, predictions


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def logprob_gaps(vlm: VLM, rows: list[dict], batch_size: int) -> list[float]:
    """log p(ground truth) − log p(top-ranked hallucinated candidate), full image (HSCR Fig. 4).

    `rows` are preference entries (`answer` = ground truth, `rejected[0]` = the dispreferred
    response most similar to it). A larger gap means the model separates them better.
    """
    import torch

    from pipeline.batching import answer_logprobs, collate_sequences

    gaps: list[float] = []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            images = [r["image"] for r in chunk] * 2
            questions = [r["question"] for r in chunk] * 2
            answers = [r["answer"] for r in chunk] + [r["rejected"][0]["text"] for r in chunk]
            batch = collate_sequences(vlm, images, questions, answers)
            out = vlm.forward(batch.attention_mask, batch.input_ids, batch.pixel_values)
            logp = answer_logprobs(out.logits, batch.labels)
            n = len(chunk)
            gaps.extend((logp[:n] - logp[n:]).tolist())
    return gaps


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
    def stats(xs: list[float]) -> dict:
        xs = sorted(xs)
        return {"mean": sum(xs) / len(xs), "median": xs[len(xs) // 2], "n": len(xs)} if xs else {}

    return {**stats(gaps), "by_modality": {m: stats([g for g, mm in zip(gaps, modalities, strict=True) if mm == m])
                                           for m in sorted(set(modalities))}}


def deltas(metrics: dict[str, dict], model: str, baseline: str) -> dict[str, float | None]:
    """`model` minus `baseline` on the headline numbers and on the image reliance."""
    out = {k: _diff(metrics[model][k], metrics[baseline][k]) for k in HEADLINE}
    for k in HEADLINE:
        out[f"image_reliance_{k}"] = _diff(metrics[f"{model}_image_reliance"][k],
                                           metrics[f"{baseline}_image_reliance"][k])
    return out


def evaluate_models(
    load: Callable[[str], VLM],
    models: Sequence[tuple[str, str]],
    rows: list[dict],
    preferences: list[dict],
    cfg: EvaluateConfig,
    on_model: Callable[[str, dict[str, dict]], None] | None = None,
) -> tuple[dict[str, Any], dict[str, list[dict]], dict[str, list[dict]]]:
    """Evaluate every (name, folder) model and its blind control on the test rows.

    Returns the metrics report (with `<model>_minus_<first>` deltas and, when `preferences` has
    entries with a dispreferred response, the HSCR Fig. 4 log-prob gaps), the prediction rows per
    model key, and the per-modality gap histograms.
    """
    if cfg.max_rows is not None:
        rows = rows[: cfg.max_rows]
    preferences = [r for r in preferences if r["rejected"]]
    report: dict[str, Any] = {}
    predictions: dict[str, list[dict]] = {}
    gaps: dict[str, list[float]] = {}
    modalities = [r["modality"] for r in preferences]
    for name, folder in models:
        vlm = load(folder)
        results, preds = evaluate_model(vlm, name, rows, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens)
        report.update(results)
        if preferences:
            gaps[name] = logprob_gaps(vlm, preferences, cfg.batch_size)
            report[f"{name}_logprob_gap"] = gap_summary(gaps[name], modalities)
        predictions.update(preds)
        if on_model:
            on_model(name, results)
    names = [name for name, _ in models]
    for name in names[1:]:
        report[f"{name}_minus_{names[0]}"] = deltas(report, name, names[0])
    histograms = gap_histograms(gaps, modalities) if gaps else {}
    return report, predictions, histograms

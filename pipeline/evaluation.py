"""Benchmark evaluation: batched greedy answers, LLaVA-Med metrics, and the blind control.

The blind control is the same model with every visual token dropped (attention-masked). The gap
between a model's score and its blind score is how much it relies on the image: HSCR's modality
misalignment shows up as a small gap.
"""

from __future__ import annotations

from tqdm.auto import tqdm

from pipeline.batching import collate_prompts
from pipeline.generation import greedy_generate
from pipeline.metrics import score_prediction, summarize
from pipeline.models.vlm import VLM
from pipeline.visual_dropout import blind_mask

HEADLINE = ("closed_accuracy", "open_recall")


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

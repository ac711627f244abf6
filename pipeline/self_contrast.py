"""Token-level self-contrastive rewarding (HSCR §3.1, A.4–A.5; decisions in docs/design.md).

For each entry the preferred answer y_w is teacher-forced under two views of the image, the full
view and a degraded view that hides a share `mask_ratio` of the image: by default visual tokens
dropped (attention-masked, which is the same as removing them), or pixels, patches or the vision
tower's attention (`sample.mask_strategy`, HSCR Table 5: `pipeline.mask_strategies`). Both views
run as one batched forward. Then:

- sensitivity at answer position t: logit_full[t, y_t] - logit_drop[t, y_t], how much the image
  supports the token that is there; the top-n positions are the modality-coupled tokens;
- replacement tokens at a sensitive position are the ones plausible without the image (dropped
  view probability >= cutoff * its max, at least `min_plausible` of them), excluding y_t and
  special tokens, ranked by ascending P_diff = softmax((1+β)·logit_full − β·logit_drop): the
  token the language prior likes and the image contradicts. A seeded Gumbel draw at a
  temperature orders them, so candidates differ;
- candidate r of k replaces the top m_r sensitive positions, m_r growing with r (graded
  incorrectness); a one-token answer still yields k different replacements.

`mode="decode"` keeps the prefix up to the first replaced position, puts the replacement there
and lets the dropped view continue greedily, so the hallucination carries on. That runs both
views autoregressively with their own KV-cache rows (stacked in one batch), the full view scoring
the continuation. Reusing one view's cache for the other is the VCD bug this avoids.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import Field
from transformers import DynamicCache

from pipeline.batching import SequenceBatch, collate_sequences
from pipeline.data.images import decode_images
from pipeline.external_dispreferred import ExternalSourceConfig
from pipeline.fingerprint import code_version, fingerprint
from pipeline.grouped_scoring import collate_groups, group_logprobs
from pipeline.mask_strategies import MaskStrategy, two_view_embeddings
from pipeline.models.vlm import VLM, ImageBatch
from pipeline.params import Config
from pipeline.resume import BatchRun, BatchStore, run_batches
from pipeline.schema import VQA_NAMES, Turn
from pipeline.sharding import Shard
from pipeline.visual_dispreference import VisualDispreferenceConfig


class SampleConfig(Config):
    """The `sample:` section (and the top-level `mask_ratio`): HSCR §3.1 self-contrastive sampling."""

    top_level: ClassVar[tuple[str, ...]] = ("mask_ratio",)

    mask_ratio: float = Field(ge=0.0, lt=1.0, description="share of the image hidden in the degraded view, in [0, 1)")
    mask_strategy: MaskStrategy = Field(
        description="where the degraded view loses it (HSCR Table 5): token: visual tokens dropped after the "
        "projector | pixel: a random crop of 1 - mask_ratio of the image kept | patch: patches removed before the "
        "vision tower | latent: patches masked inside the tower's attention"
    )
    mode: Literal["replace", "decode"] = Field(
        description="replace: in-place token replacement (HSCR A.4); decode: continue under the dropped view"
    )
    n_sensitive: int = Field(ge=1, description="HSCR n: most image-sensitive answer positions, capped by the answer length")
    k: int = Field(ge=1, description="graded dispreferred candidates per entry")
    beta: float = Field(ge=0.0, description="contrast strength of P_diff = softmax((1+beta) full - beta dropped)")
    plausibility: float = Field(
        ge=0.0, le=1.0, description="replacement tokens need p_drop >= plausibility * max p_drop ..."
    )
    min_plausible: int = Field(ge=1, description="... and at least this many top dropped-view tokens are considered")
    temperature: float = Field(ge=0.0, description="of the seeded Gumbel draw over ascending P_diff; 0 = strictly ascending")
    max_new_tokens: int = Field(ge=1, description="decode mode: cap on the continuation's length")
    seed: int = Field(ge=0, description="seeds the dropout pattern and the draw, per entry")
    batch_size: int = Field(ge=1, description="pool entries per forward batch (also the unit of resume)")
    source: Literal["self", "external"] = Field(
        description="where the dispreferred candidates come from: self: this model's own answers under the "
        "degraded view (HSCR §3.1); external: k wrong answers written by another model (`sample.external`, "
        "HSCR Table 3's baseline)"
    )
    external: ExternalSourceConfig = Field(
        description="source external only: the writer model, its prompts and how many failed entries are tolerated"
    )
    visual_dispreference: VisualDispreferenceConfig = Field(
        description="MMedPO §3.1: the chosen answer under a noisy image x* as one more dispreferred (train.dispreferred)"
    )


def entry_seed(seed: int, entry_id: str) -> int:
    """A per-entry seed that does not depend on batch composition or order."""
    return zlib.crc32(f"{seed}:{entry_id}".encode())


@torch.no_grad()
def two_view_answer_logits(vlm: VLM, batch: SequenceBatch, strategy: MaskStrategy, ratio: float,
                           seeds: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, V) logits predicting each answer token, for the full and the degraded view
    (`strategy` at `ratio`, each row's pattern from its seed: `pipeline.mask_strategies`).

    One forward over the stacked [full; degraded] batch. Row b's answer token i sits at column
    answer_start[b] + i and is predicted at the column before.
    """
    embeds, masks = two_view_embeddings(vlm, batch.input_ids, batch.attention_mask, batch.pixel_values,
                                        strategy, ratio, seeds)
    image_mask = batch.image_mask.repeat(2, 1)
    layout = batch.pixel_values.layout()
    hidden = vlm.hidden_states(embeds, masks, image_mask, ImageBatch.cat([layout, layout]))
    n = batch.input_ids.shape[0]
    length = int(batch.answer_length.max())
    cols = batch.answer_start.unsqueeze(1) - 1 + torch.arange(length, device=hidden.device).unsqueeze(0)
    cols = cols.clamp(max=hidden.shape[1] - 1).repeat(2, 1)
    picked = hidden.gather(1, cols.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    logits = vlm.lm_head(picked).float()
    return logits[:n], logits[n:]


def _special_ids(vlm: VLM) -> torch.Tensor:
    ids = set(vlm.tokenizer.all_special_ids) | {vlm.eos_token_id, vlm.pad_token_id, vlm.image_token_id}
    return torch.tensor(sorted(ids))


def _surface_form(vlm: VLM) -> Callable[[int], str]:
    """A token's text as an answer compares: stripped, lowercased, punctuation-insensitive."""
    from pipeline.metrics import normalize_answer

    cache: dict[int, str] = {}

    def surface(token: int) -> str:
        if token not in cache:
            cache[token] = normalize_answer(vlm.tokenizer.decode([token]))
        return cache[token]

    return surface


def replacement_order(logit_full: torch.Tensor, logit_drop: torch.Tensor, token: int, cfg: SampleConfig,
                      special: torch.Tensor, generator: torch.Generator,
                      surface: Callable[[int], str] | None = None) -> list[int]:
    """Replacement tokens for one position, best first (docs/design.md § "Replacement").

    The pool: tokens above the plausibility cutoff of the dropped view, extended down its ranking
    until it holds max(`min_plausible`, k) tokens. With `surface`, tokens whose text equals y_t's or an
    earlier token's ("Yes", " yes", "yes") are skipped: a replacement must change the answer.
    """
    surface = surface or str
    p_drop = torch.softmax(logit_drop, -1)
    banned = torch.zeros_like(p_drop, dtype=torch.bool)
    banned[special.clamp(max=p_drop.shape[0] - 1)] = True
    banned[token] = True
    p_drop = p_drop.masked_fill(banned, 0.0)
    cutoff = cfg.plausibility * p_drop.max()
    ranked = p_drop.topk(min(256, int((p_drop > 0).sum()))).indices.tolist()
    seen = {surface(token)}
    pool: list[int] = []
    # at least k, so that a one-token answer still yields k different candidates
    need = max(cfg.min_plausible, cfg.k)
    for candidate in ranked:
        if p_drop[candidate] < cutoff and len(pool) >= need:
            break
        key = surface(candidate)
        if key and key not in seen:
            seen.add(key)
            pool.append(candidate)
    if not pool:
        return []
    plausible = torch.tensor(pool, device=logit_full.device)
    log_p_diff = torch.log_softmax((1 + cfg.beta) * logit_full - cfg.beta * logit_drop, -1)[plausible]
    score = -log_p_diff.cpu()  # ascending P_diff first
    if cfg.temperature > 0:
        u = torch.rand(score.shape, generator=generator).clamp(1e-9, 1 - 1e-9)
        score = score / cfg.temperature - torch.log(-torch.log(u))
    return [pool[i] for i in score.argsort(descending=True).tolist()]


def levels(n_positions: int, k: int) -> list[int]:
    """How many sensitive positions candidate r = 1..k replaces: from one up to all n."""
    if n_positions <= 0:
        return []
    return [max(1, math.ceil(r * n_positions / k)) for r in range(1, k + 1)]


@dataclass
class EntryPlan:
    """The replacements of one entry: per candidate the (position, token) pairs."""

    sensitivity: list[float]
    candidates: list[list[tuple[int, int]]]


def plan_entry(answer: list[int], logit_full: torch.Tensor, logit_drop: torch.Tensor, cfg: SampleConfig,
               special: torch.Tensor, seed: int, surface: Callable[[int], str] | None = None) -> EntryPlan:
    """Sensitive positions and replacement tokens for one entry; `answer` ends with EOS."""
    body = len(answer) - 1  # the final end-of-turn token is never replaced
    positions = torch.arange(body)
    tokens = torch.tensor(answer[:body])
    shift = logit_full[positions, tokens] - logit_drop[positions, tokens]
    n = min(cfg.n_sensitive, body)
    top = shift.argsort(descending=True)[:n].tolist()
    generator = torch.Generator().manual_seed(seed)
    orders = {t: replacement_order(logit_full[t], logit_drop[t], answer[t], cfg, special, generator, surface)
              for t in top}
    candidates = []
    for r, m in enumerate(levels(n, cfg.k)):
        chosen = [t for t in top[:m] if orders[t]]
        candidates.append([(t, orders[t][r % len(orders[t])]) for t in sorted(chosen)])
    return EntryPlan(sensitivity=shift.tolist(), candidates=candidates)


def apply_replacements(answer: list[int], replacements: list[tuple[int, int]]) -> list[int]:
    out = list(answer)
    for position, token in replacements:
        out[position] = token
    return out


@torch.no_grad()
def two_view_decode(vlm: VLM, images: list, questions: list[str], prefixes: list[list[int]],
                    dropped_seeds: list[int], mask_ratio: float, max_new_tokens: int,
                    strategy: MaskStrategy, *, contexts: Sequence[Sequence[Turn]]
                    ) -> tuple[list[list[int]], list[float]]:
    """Continue each answer prefix greedily under the dropped view, scoring under the full view.

    Rows of both views are stacked in one batch with their own KV-cache rows. Returns the
    continuations (EOS appended when reached) and the full-view log-probability of each
    continuation's tokens, EOS included. `contexts` holds each row's earlier turns (`[]`: none).
    """
    pil = decode_images(images)
    rows = [vlm.prompt_ids(q, c, im) + p for im, q, c, p in zip(pil, questions, contexts, prefixes, strict=True)]
    width = max(len(r) for r in rows)
    n = len(rows)
    device = vlm.device
    input_ids = torch.full((n, width), vlm.pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for b, r in enumerate(rows):
        input_ids[b, width - len(r):] = torch.tensor(r)
        mask[b, width - len(r):] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    pixel_values = vlm.pixel_values(pil)
    embeds, masks = two_view_embeddings(vlm, input_ids, mask, pixel_values, strategy, mask_ratio, dropped_seeds)
    cache = DynamicCache()
    image_mask = (input_ids == vlm.image_token_id).repeat(2, 1)
    views = ImageBatch.cat([pixel_values.layout(), pixel_values.layout()])
    out = vlm.forward(masks, inputs_embeds=embeds, cache=cache, logits_to_keep=1, image_mask=image_mask,
                      image_layout=views)
    positions = vlm.position_ids(masks, image_mask, views)[..., -1:]
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    tokens: list[list[int]] = [[] for _ in range(n)]
    logprob = torch.zeros(n, dtype=torch.float64, device=device)
    embed = vlm.input_embeddings
    # A continuation is text: never the image placeholder, padding or another special token
    # (a weak model's dropped view can rank one first), only the end of turn.
    banned = _special_ids(vlm)
    banned = banned[(banned != vlm.eos_token_id) & (banned < out.logits.shape[-1])].to(device)
    for step_index in range(max_new_tokens):
        logits = out.logits[:, -1].float()
        full_logp = torch.log_softmax(logits[:n], -1)
        # the dropped view decides: the language prior speaks
        next_ids = logits[n:].index_fill(-1, banned, float("-inf")).argmax(-1)
        step_logp = full_logp.gather(-1, next_ids.unsqueeze(-1)).squeeze(-1).double()
        logprob += step_logp.masked_fill(finished, 0.0)
        for b in (~finished).nonzero().squeeze(-1).tolist():
            tokens[b].append(int(next_ids[b]))
            if int(next_ids[b]) == vlm.eos_token_id:
                finished[b] = True
        if bool(finished.all()) or step_index == max_new_tokens - 1:
            break  # no forward whose logits nobody reads
        step = next_ids.masked_fill(finished, vlm.pad_token_id).repeat(2)
        masks = torch.cat([masks, torch.ones((2 * n, 1), dtype=masks.dtype, device=device)], dim=1)
        positions = positions + 1
        out = vlm.forward(masks, inputs_embeds=embed(step.unsqueeze(-1)), cache=out.cache,
                          position_ids=positions)
    return tokens, logprob.tolist()


@torch.no_grad()
def score_candidates(vlm: VLM, images: list, questions: list[str], candidates: list[tuple[int, list[int]]],
                     *, contexts: Sequence[Sequence[Turn]]) -> list[float]:
    """log p(candidate | full image, question) for (entry index, token ids) pairs, in their order;
    each entry's question comes after its earlier turns in `contexts` (`[]`: none).

    The entry's prompt and image run once and its candidates share the prompt's KV cache
    (pipeline/grouped_scoring.py): with one-word answers that is ~4x fewer tokens than a full row
    per candidate.
    """
    entries = sorted({b for b, _ in candidates})
    group_of = {b: g for g, b in enumerate(entries)}
    answers: list[list[list[int]]] = [[] for _ in entries]
    where = []
    for b, ids in candidates:
        where.append((group_of[b], len(answers[group_of[b]])))
        answers[group_of[b]].append(ids)
    batch = collate_groups(vlm, [images[b] for b in entries],
                           [vlm.prompt_ids(questions[b], contexts[b], images[b]) for b in entries], answers)
    # Candidates always share their entry's prompt cache here (sampling has no switch for it).
    table = group_logprobs(vlm, {k: v.to(vlm.device) for k, v in batch.items()}, share_prompt=True).tolist()
    return [table[g][k] for g, k in where]


@torch.no_grad()
def sample_batch(vlm: VLM, rows: list[dict], cfg: SampleConfig) -> list[dict]:
    """CANDIDATES_SCHEMA rows for a batch of VQA rows."""
    seeds = [entry_seed(cfg.seed, r["id"]) for r in rows]
    images = [r["image"] for r in rows]
    questions = [r["question"] for r in rows]
    contexts = [r["context"] for r in rows]
    batch = collate_sequences(vlm, images, questions, [r["answer"] for r in rows], contexts=contexts)
    logit_full, logit_drop = two_view_answer_logits(vlm, batch, cfg.mask_strategy, cfg.mask_ratio, seeds)
    special = _special_ids(vlm)
    surface = _surface_form(vlm)
    plans, answers, chosen_logprob = [], [], []
    for b, _row in enumerate(rows):
        length = int(batch.answer_length[b])
        start = int(batch.answer_start[b])
        answer = batch.input_ids[b, start:start + length].tolist()
        answers.append(answer)
        chosen_logprob.append(float(torch.log_softmax(logit_full[b, :length], -1)
                                    .gather(-1, torch.tensor(answer, device=logit_full.device).unsqueeze(-1)).sum()))
        plans.append(plan_entry(answer, logit_full[b, :length], logit_drop[b, :length], cfg, special, seeds[b], surface))

    # Build every candidate's token ids, then score them all under the full image in one pass.
    flat: list[tuple[int, list[int], list[tuple[int, int]], int]] = []
    for b, plan in enumerate(plans):
        for level, replacements in enumerate(plan.candidates, start=1):
            if replacements:
                flat.append((b, apply_replacements(answers[b], replacements), replacements, level))
    logprobs: list[float] = []
    if flat and cfg.mode == "decode":
        prefixes, decode_seeds = [], []
        for b, ids, replacements, _level in flat:
            first = min(p for p, _ in replacements)
            prefixes.append(ids[: first + 1])
            decode_seeds.append(seeds[b])
        cont, cont_logp = two_view_decode(vlm, [images[b] for b, *_ in flat], [questions[b] for b, *_ in flat],
                                          prefixes, decode_seeds, cfg.mask_ratio, cfg.max_new_tokens,
                                          cfg.mask_strategy, contexts=[contexts[b] for b, *_ in flat])
        new_flat = []
        for (b, _ids, replacements, level), prefix, tail in zip(flat, prefixes, cont, strict=True):
            first = min(p for p, _ in replacements)
            ids = prefix + tail
            if ids[-1] != vlm.eos_token_id:
                ids = ids + [vlm.eos_token_id]
            new_flat.append((b, ids, [(p, t) for p, t in replacements if p == first], level))
        flat = new_flat
    if flat:
        logprobs = score_candidates(vlm, images, questions, [(b, ids) for b, ids, _, _ in flat], contexts=contexts)

    results = []
    for b, row in enumerate(rows):
        candidates = []
        for (fb, ids, replacements, level), lp in zip(flat, logprobs, strict=True):
            if fb != b:
                continue
            candidates.append({
                "text": vlm.decode(ids),
                "token_ids": ids,
                "level": level,
                "positions": [p for p, _ in replacements],
                "original_tokens": vlm.tokenizer.convert_ids_to_tokens([answers[b][p] for p, _ in replacements]),
                "replacement_tokens": vlm.tokenizer.convert_ids_to_tokens([t for _, t in replacements]),
                "logprob": lp,
            })
        results.append({
            **{k: row[k] for k in VQA_NAMES},
            "chosen_token_ids": answers[b],
            "chosen_logprob": chosen_logprob[b],
            "sensitivity": plans[b].sensitivity,
            "candidates": candidates,
        })
    return results


# Everything whose code determines a candidate: a change to any of them gives a new resume key.
SAMPLE_CODE = ("pipeline.self_contrast", "pipeline.grouped_scoring", "pipeline.batching", "pipeline.visual_dropout",
               "pipeline.mask_strategies", "pipeline.models", "pipeline.losses")


def sample_pool(vlm: VLM, rows: list[dict], cfg: SampleConfig, work_dir: str | Path, inputs: dict[str, str],
                shard: Shard | None = None) -> BatchRun:
    """CANDIDATES_SCHEMA rows for every pool row, batch by batch, resumable.

    `inputs` holds content digests of what the rows and the model came from ({"pool": ...,
    "model": ...}); with the config, the code version and the library versions they key the
    finished batches kept under `work_dir`, so an interrupted run redoes only unfinished batches.
    `shard`: this process's share of the batches under `accelerate launch` (`pipeline.sharding`).
    """
    import transformers

    from pipeline.schema import CANDIDATES_SCHEMA

    key = fingerprint("sample", inputs, cfg.to_dict(), code_version(SAMPLE_CODE),
                      torch.__version__, transformers.__version__)
    store = BatchStore(work_dir, key, CANDIDATES_SCHEMA)
    torch.manual_seed(cfg.seed)
    # The parts stay until the stage has written its output (it calls `pipeline.resume.clear_all`).
    return run_batches(rows, cfg.batch_size, lambda batch: sample_batch(vlm, batch, cfg), store, desc="sample",
                       clear=False, shard=shard)


def summarize_candidates(rows: list[dict]) -> dict:
    """Stage metrics of CANDIDATES_SCHEMA rows: counts, replaced positions, log-probs by level."""
    n_cand = [len(r["candidates"]) for r in rows]
    replaced = [len(c["positions"]) for r in rows for c in r["candidates"]]
    cand_lp = [c["logprob"] for r in rows for c in r["candidates"]]
    by_level: dict[int, list[float]] = {}
    for r in rows:
        for c in r["candidates"]:
            by_level.setdefault(c["level"], []).append(c["logprob"])

    def mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    return {
        "entries": len(rows),
        "candidates": sum(n_cand),
        "candidates_per_entry": mean(n_cand),
        "entries_without_candidates": sum(1 for n in n_cand if n == 0),
        "mean_replaced_positions": mean(replaced),
        "mean_logprob_chosen": mean([r["chosen_logprob"] for r in rows]),
        "mean_logprob_candidates": mean(cand_lp),
        "mean_logprob_by_level": {str(k): mean(v) for k, v in sorted(by_level.items())},
        "distinct_candidate_share": mean(
            [len({c["text"] for c in r["candidates"]}) / len(r["candidates"]) for r in rows if r["candidates"]]
        ),
    }

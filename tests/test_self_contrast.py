"""HSCR §3.1 mechanism on the tiny model: dropout views, sensitive tokens, graded candidates, decoding."""

from __future__ import annotations

import torch

from pipeline.batching import collate_sequences
from pipeline.mask_strategies import MASK_STRATEGIES
from pipeline.models.vlm import position_ids_from_mask
from pipeline.params import project_config
from pipeline.self_contrast import (
    SampleConfig,
    entry_seed,
    levels,
    sample_batch,
    two_view_answer_logits,
    two_view_decode,
)
from pipeline.visual_dropout import drop_visual_tokens


def sample_config(**overrides):
    """The project's `sample:` params with `overrides` (every field is required; params.yaml holds the values)."""
    return project_config(SampleConfig, "sample", **overrides)


def _rows(rows):
    rows = [dict(r) for r in rows[:4]]
    rows[1]["answer"] = "left lung is large"
    rows[2]["answer"] = "right lung"
    return rows


def test_mask_ratio_zero_gives_identical_views(tiny_vlm, rows):
    batch = collate_sequences(tiny_vlm, [r["image"] for r in rows[:3]], [r["question"] for r in rows[:3]],
                              ["yes", "no", "left lung"], contexts=[r["context"] for r in rows[:3]])
    for strategy in MASK_STRATEGIES:
        full, dropped = two_view_answer_logits(tiny_vlm, batch, strategy, 0.0, [0, 1, 2])
        torch.testing.assert_close(full, dropped, rtol=0, atol=0, msg=strategy)
        out = sample_batch(tiny_vlm, _rows(rows), sample_config(mask_ratio=0.0, mask_strategy=strategy))
        assert all(s == 0.0 for r in out for s in r["sensitivity"]), strategy


def test_two_view_logits_match_separate_forwards(tiny_vlm, rows):
    batch = collate_sequences(tiny_vlm, [r["image"] for r in rows[:2]], [r["question"] for r in rows[:2]],
                              ["left lung", "no"], contexts=[r["context"] for r in rows[:2]])
    dropped = drop_visual_tokens(batch.attention_mask, batch.image_mask, 0.7, [3, 4])
    full, drop = two_view_answer_logits(tiny_vlm, batch, "token", 0.7, [3, 4])
    for mask, got in ((batch.attention_mask, full), (dropped, drop)):
        logits = tiny_vlm.forward(mask, batch.input_ids, batch.pixel_values).logits
        for b in range(2):
            start, length = int(batch.answer_start[b]), int(batch.answer_length[b])
            torch.testing.assert_close(got[b, :length], logits[b, start - 1:start - 1 + length], atol=1e-5, rtol=1e-4)


def test_candidates_differ_exactly_at_replaced_positions(tiny_vlm, rows):
    out = sample_batch(tiny_vlm, _rows(rows), sample_config(k=4, mode="replace"))
    for r in out:
        assert r["candidates"], r["answer"]
        chosen = r["chosen_token_ids"]
        for c in r["candidates"]:
            diff = [i for i, (a, b) in enumerate(zip(chosen, c["token_ids"], strict=True)) if a != b]
            assert diff == sorted(c["positions"])
            assert c["original_tokens"] == tiny_vlm.tokenizer.convert_ids_to_tokens([chosen[p] for p in diff])
            assert chosen[-1] == c["token_ids"][-1] == tiny_vlm.eos_token_id


def test_replaced_positions_rise_with_level(tiny_vlm, rows):
    assert levels(4, 4) == [1, 2, 3, 4]
    assert levels(10, 4) == [3, 5, 8, 10]
    assert levels(1, 4) == [1, 1, 1, 1]
    out = sample_batch(tiny_vlm, _rows(rows), sample_config(k=4))
    long = next(r for r in out if r["answer"] == "left lung is large")
    counts = [len(c["positions"]) for c in sorted(long["candidates"], key=lambda c: c["level"])]
    assert counts == sorted(counts) and counts[-1] > counts[0]


def test_one_token_answer_still_yields_k_different_candidates(tiny_vlm, rows):
    out = sample_batch(tiny_vlm, _rows(rows)[:1], sample_config(k=4))
    texts = [c["text"] for c in out[0]["candidates"]]
    assert len(texts) == 4 and len(set(texts)) == 4
    assert out[0]["answer"].lower() not in texts


@torch.no_grad()
def test_candidate_logprob_is_full_image_score(tiny_vlm, rows):
    # Candidates are scored on their entry's shared prompt cache; each must equal a full row alone.
    out = sample_batch(tiny_vlm, _rows(rows), sample_config(k=3))
    checked = 0
    for r in out:
        for c in r["candidates"]:
            batch = collate_sequences(tiny_vlm, [r["image"]], [r["question"]], [c["token_ids"]], contexts=[r["context"]])
            logits = tiny_vlm.forward(batch.attention_mask, batch.input_ids, batch.pixel_values).logits
            start = int(batch.answer_start[0])
            logp = torch.log_softmax(logits[0, start - 1:-1], -1).gather(
                -1, batch.input_ids[0, start:].unsqueeze(-1)).sum()
            assert abs(float(logp) - c["logprob"]) < 1e-4
            checked += 1
    assert checked >= 8  # several entries, several candidates each, answers of different lengths


@torch.no_grad()
def test_candidates_are_scored_after_their_entrys_context(tiny_vlm, rows):
    # A later question of a conversation is asked after its earlier turns, in sampling as everywhere.
    entries = _rows(rows)
    context = [{"question": "is there a lesion in the left lung ?", "answer": "no"}]
    entries[0]["context"] = entries[2]["context"] = context
    for mode in ("replace", "decode"):
        out = sample_batch(tiny_vlm, entries, sample_config(k=3, mode=mode))
        assert [r["context"] for r in out] == [e["context"] for e in entries]
        moved = 0
        for r in out:
            for c in r["candidates"]:
                scores = {}
                for key, ctx in (("own", r["context"]), ("none", [])):
                    batch = collate_sequences(tiny_vlm, [r["image"]], [r["question"]], [c["token_ids"]], contexts=[ctx])
                    logits = tiny_vlm.forward(batch.attention_mask, batch.input_ids, batch.pixel_values).logits
                    start = int(batch.answer_start[0])
                    scores[key] = float(torch.log_softmax(logits[0, start - 1:-1], -1).gather(
                        -1, batch.input_ids[0, start:].unsqueeze(-1)).sum())
                assert abs(scores["own"] - c["logprob"]) < 1e-4, mode
                moved += r["context"] != [] and abs(scores["none"] - c["logprob"]) > 1e-3
        assert moved > 0, mode  # the context changed the scores: it was in the prompt


def test_sampling_builds_no_autograd_graph(tiny_vlm, rows, monkeypatch):
    # Sampling is inference: a graph would hold every activation of the batch in memory.
    grad_modes = []
    forward = type(tiny_vlm).forward

    def recording_forward(self, *args, **kwargs):
        grad_modes.append(torch.is_grad_enabled())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(tiny_vlm), "forward", recording_forward)
    sample_batch(tiny_vlm, _rows(rows), sample_config(k=3))
    assert grad_modes and not any(grad_modes)


def test_same_seed_same_candidates_other_seed_differs(tiny_vlm, rows):
    a = sample_batch(tiny_vlm, _rows(rows), sample_config(seed=1))
    b = sample_batch(tiny_vlm, _rows(rows), sample_config(seed=1))
    c = sample_batch(tiny_vlm, _rows(rows), sample_config(seed=2))
    assert a == b
    assert [x["candidates"] for x in a] != [x["candidates"] for x in c]
    # an entry's candidates do not depend on the batch it is in
    # (padding to another width changes float sums in the last bits, nothing else)
    alone = sample_batch(tiny_vlm, _rows(rows)[1:2], sample_config(seed=1))
    assert [c["token_ids"] for c in alone[0]["candidates"]] == [c["token_ids"] for c in a[1]["candidates"]]
    torch.testing.assert_close(alone[0]["sensitivity"], a[1]["sensitivity"])


@torch.no_grad()
def _reference_decode(vlm, image, question, prefix, seed, ratio, max_new):
    """No cache, one sequence at a time: rerun the whole sequence for every token."""
    from pipeline.batching import collate_prompts

    batch = collate_prompts(vlm, [image], [question], [[]])
    ids = batch.input_ids[0].tolist() + prefix
    image_mask = torch.tensor(ids) == vlm.image_token_id
    dropped = drop_visual_tokens(torch.ones(1, len(ids), dtype=torch.long), image_mask.unsqueeze(0), ratio, [seed])
    tokens, logprob = [], 0.0
    for _ in range(max_new):
        input_ids = torch.tensor([ids])
        embeds = vlm.embed(input_ids, batch.pixel_values)
        full_mask = torch.ones_like(input_ids)
        drop_mask = torch.cat([dropped, torch.ones(1, len(ids) - dropped.shape[1], dtype=torch.long)], 1)
        full = vlm.model(inputs_embeds=embeds, attention_mask=full_mask,
                         position_ids=position_ids_from_mask(full_mask)).logits[0, -1]
        drop = vlm.model(inputs_embeds=embeds, attention_mask=drop_mask,
                         position_ids=position_ids_from_mask(drop_mask)).logits[0, -1]
        nxt = int(drop.argmax())
        logprob += float(torch.log_softmax(full, -1)[nxt])
        tokens.append(nxt)
        ids.append(nxt)
        if nxt == vlm.eos_token_id:
            break
    return tokens, logprob


def test_two_view_decode_matches_no_cache_reference(tiny_vlm, rows):
    rows = _rows(rows)
    prefixes = [tiny_vlm.answer_ids(r["answer"])[:1] for r in rows]
    seeds = [entry_seed(0, r["id"]) for r in rows]
    got, got_lp = two_view_decode(tiny_vlm, [r["image"] for r in rows], [r["question"] for r in rows],
                                  prefixes, seeds, 0.7, 6, "token", contexts=[r["context"] for r in rows])
    for b, r in enumerate(rows):
        ref, ref_lp = _reference_decode(tiny_vlm, r["image"], r["question"], prefixes[b], seeds[b], 0.7, 6)
        assert got[b] == ref
        assert abs(got_lp[b] - ref_lp) < 1e-3


def test_decode_mode_keeps_prefix_and_replacement(tiny_vlm, rows):
    out = sample_batch(tiny_vlm, _rows(rows), sample_config(mode="decode", max_new_tokens=4))
    for r in out:
        for c in r["candidates"]:
            first = c["positions"][0]
            assert c["token_ids"][:first] == r["chosen_token_ids"][:first]
            assert c["token_ids"][first] != r["chosen_token_ids"][first]
            assert c["token_ids"][-1] == tiny_vlm.eos_token_id

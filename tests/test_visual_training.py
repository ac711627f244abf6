"""MMedPO §3.1 visual dispreference on the training side (`train.dispreferred`): the chosen answer
scored under a noised image x*, on a prompt row of its own, as one more (explicit-only) dispreferred."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.images import decode_image
from pipeline.errors import DataError, ParamsError
from pipeline.grouped_scoring import collate_groups, group_logprobs
from pipeline.training.preference import (
    GroupedScorer,
    PreferenceTrainer,
    build_entries,
    lora_parameters,
    resume_key,
)
from tests.test_preference import assert_only_lora_trained, config, perturb_adapter, scored_rows, tiny

VISUAL_WEIGHT = 1.1


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # As in test_preference.py: the tiny model's ops are too small to share between threads.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def noised(image: bytes, seed: int, sigma: float = 60.0) -> bytes:
    """x*: the image with Gaussian noise on every pixel, encoded as PNG (as `sample` would write it)."""
    pixels = np.asarray(decode_image(image).convert("RGB"), dtype=np.float32)
    noise = np.random.default_rng(seed).normal(0.0, sigma, pixels.shape)
    out = Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()


def visual_rows(n: int = 8, every: int = 1, weight: float | None = VISUAL_WEIGHT) -> list[dict]:
    """`scored_rows` with a `visual_dispreferred` on every `every`-th row (None on the others)."""
    rows = scored_rows(n)
    for i, row in enumerate(rows):
        row["visual_dispreferred"] = None if i % every else {
            "image": noised(row["image"], seed=i), "region": "global", "region_fraction": 1.0,
            "confidence": 0.9, "weight": weight,
        }
    return rows


# ----- grouped scoring with an answer's own image ---------------------------------------------------


@pytest.mark.parametrize("share_prompt", [True, False])
def test_an_answer_with_its_own_image_scores_as_its_own_group(share_prompt):
    vlm = tiny()
    rows = visual_rows(3)
    prompts = [vlm.prompt_ids(r["question"]) for r in rows]
    answers = [[vlm.answer_ids(r["answer"])] + [vlm.answer_ids(x["text"]) for x in r["rejected"]]
               + [vlm.answer_ids(r["answer"])] for r in rows]
    own = [[None] * (len(a) - 1) + [r["visual_dispreferred"]["image"]] for a, r in zip(answers, rows, strict=True)]
    own[1][-1] = None  # entry 1 scores its last answer on its own image: no extra row
    images = [r["image"] for r in rows]

    batch = collate_groups(vlm, images, prompts, answers, answer_images=own)
    assert batch["prompt_ids"].shape[0] == len(batch["pixel_values"]) == 3 + 2  # E + 2 extra rows
    assert batch["slots"].shape == (3, max(len(a) for a in answers))
    last = batch["slots"][torch.arange(3), torch.tensor([len(a) - 1 for a in answers])]
    assert batch["row_entry"][last].tolist() == [3, 1, 4]  # the answer's own prompt row, or its group's
    seen: list[int] = []
    hook = vlm.vision_tower.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            table = group_logprobs(vlm, batch, share_prompt=share_prompt)
    finally:
        hook.remove()
    assert seen == [5]  # once per prompt row, all in one call

    with torch.no_grad():
        plain = group_logprobs(vlm, collate_groups(vlm, images, prompts, answers), share_prompt=share_prompt)
        alone = group_logprobs(vlm, collate_groups(vlm, [rows[0]["visual_dispreferred"]["image"],
                                                         rows[2]["visual_dispreferred"]["image"]],
                                                   [prompts[0], prompts[2]], [[answers[0][-1]], [answers[2][-1]]]),
                               share_prompt=share_prompt)
    for b, k in ((0, len(answers[0]) - 1), (2, len(answers[2]) - 1)):
        assert table[b, k].item() == pytest.approx(alone[b // 2, 0].item(), abs=1e-4)
        assert abs(table[b, k].item() - plain[b, k].item()) > 1e-3  # x* differs from the entry image
    # every answer without its own image: the same numbers as without answer_images
    keep = torch.ones_like(table, dtype=torch.bool)
    keep[0, len(answers[0]) - 1] = keep[2, len(answers[2]) - 1] = False
    torch.testing.assert_close(table[keep], plain[keep], atol=1e-5, rtol=1e-5)


def test_answer_images_must_align_with_answers():
    vlm = tiny()
    row = visual_rows(1)[0]
    with pytest.raises(ValueError, match="answer_images"):
        collate_groups(vlm, [row["image"]], [vlm.prompt_ids(row["question"])], [[vlm.answer_ids("yes")]],
                       answer_images=[[None, None]])


# ----- entries ------------------------------------------------------------------------------------


def test_entries_in_each_mode():
    vlm = tiny()
    rows = visual_rows(4, every=2)  # rows 0 and 2 have a visual dispreferred, 1 and 3 none
    rows[0]["visual_dispreferred"]["weight"] = 0.8

    textual = build_entries(vlm, rows, config(max_rejected=2))
    assert [len(e.rejected) for e in textual] == [2, 2, 2, 2]
    assert all(e.rejected_images == [None, None] and e.ranked == [True, True] for e in textual)

    visual = build_entries(vlm, rows, config(dispreferred="visual"))
    assert [e.id for e in visual] == [rows[0]["id"], rows[2]["id"]]  # the others are left out
    for e, row in zip(visual, (rows[0], rows[2]), strict=True):
        assert e.rejected == [vlm.answer_ids(row["answer"])] == [e.chosen]  # the chosen text again
        assert e.rejected_images == [row["visual_dispreferred"]["image"]]
        assert e.ranked == [False]
    assert [e.weights for e in visual] == [[0.8], [VISUAL_WEIGHT]]
    assert all(e.weights == [1.0] for e in build_entries(vlm, rows, config(dispreferred="visual", weighted=False)))

    both = build_entries(vlm, rows, config(dispreferred="both", max_rejected=2))
    assert [len(e.rejected) for e in both] == [3, 2, 3, 2]  # the textual cap, then the visual one last
    e0 = both[0]
    assert e0.rejected[:2] == [vlm.answer_ids(r["text"]) for r in rows[0]["rejected"][:2]]
    assert e0.rejected[2] == e0.chosen
    assert e0.rejected_images == [None, None, rows[0]["visual_dispreferred"]["image"]]
    assert e0.ranked == [True, True, False]
    assert e0.weights == [rows[0]["judgements"][j]["weight"] for j in range(2)] + [0.8]
    assert both[1].rejected_images == [None, None] and both[1].ranked == [True, True]  # textual only

    dpo = build_entries(vlm, rows, config(loss="dpo", dispreferred="both"))
    assert [len(e.rejected) for e in dpo] == [2, 1, 2, 1]  # the top-ranked textual + the visual one
    assert dpo[2].rejected == [vlm.answer_ids(rows[2]["rejected"][0]["text"]), dpo[2].chosen]
    assert dpo[2].ranked == [True, False]


def test_visual_text_is_the_chosen_sequence_with_rationales():
    vlm = tiny()
    rows = visual_rows(2)
    for i, row in enumerate(rows):
        row["rationale"] = {"text": f"why {i}.", "judge": "A", "prompt_version": "v", "cache_key": "k"}
        row["counterfactuals"] = [{"text": f"for {r['text']}.", "judge": "A", "prompt_version": "v",
                                   "cache_key": "k"} for r in row["rejected"]]
    rows[1]["counterfactuals"][0] = None  # entry 1 falls back to the plain texts, its visual one too
    entries = build_entries(vlm, rows, config(dispreferred="both", rationales=True))
    assert entries[0].augmented and entries[0].chosen == vlm.answer_ids(f"{rows[0]['answer']} why 0.")
    assert not entries[1].augmented and entries[1].chosen == vlm.answer_ids(rows[1]["answer"])
    assert all(e.rejected[-1] == e.chosen for e in entries)


def test_no_visual_dispreferred_at_all_is_a_clear_error():
    vlm = tiny()
    rows = scored_rows(2)  # as `sample` writes them with sample.visual_dispreference.mode: none
    for row in rows:
        row["visual_dispreferred"] = None
    for mode in ("visual", "both"):
        with pytest.raises(DataError, match="set sample.visual_dispreference.mode"):
            build_entries(vlm, rows, config(dispreferred=mode))
    build_entries(vlm, rows, config(dispreferred="textual"))


def test_missing_visual_weight_is_an_error_only_when_weighted():
    vlm = tiny()
    rows = visual_rows(2, weight=None)
    with pytest.raises(DataError, match="visual dispreferred has no weight"):
        build_entries(vlm, rows, config(dispreferred="both", weighted=True))
    build_entries(vlm, rows, config(dispreferred="both", weighted=False))
    build_entries(vlm, rows, config(dispreferred="textual", weighted=True))  # not read


def test_visual_needs_the_explicit_term():
    with pytest.raises(ParamsError, match="explicit term"):
        config(loss="mlpo", explicit=False, dispreferred="both")
    config(loss="mlpo", implicit=False, dispreferred="visual")


# ----- training -----------------------------------------------------------------------------------


def test_visual_pair_is_scored_under_x_star():
    vlm = tiny()
    rows = visual_rows(4)
    trainer = PreferenceTrainer(vlm, rows, config(dispreferred="both"))
    perturb_adapter(vlm)
    table = trainer.score()
    assert table.shape == (4, 1 + 3 + 1)
    last = [len(e.rejected) for e in trainer.entries]  # the visual one's column
    batch = trainer.collator([0, 1, 2, 3])
    assert batch["implicit_mask"].tolist() == [[True] * (k - 1) + [False] + [False] * (4 - k) for k in last]
    # the same answers, every one on the entry's own image
    own = collate_groups(vlm, [e.image for e in trainer.entries], [e.prompt for e in trainer.entries],
                         [[e.chosen] + e.rejected for e in trainer.entries], width=5)
    with torch.no_grad():
        on_entry_image = GroupedScorer(vlm, share_prompt=True).eval()(own)
    for i, k in enumerate(last):
        assert table[i, k].item() != pytest.approx(on_entry_image[i, k].item(), abs=1e-3)
        # the chosen answer under x and under x*: the same tokens, different images
        assert on_entry_image[i, k].item() == pytest.approx(table[i, 0].item(), abs=1e-4)
        torch.testing.assert_close(table[i, :k], on_entry_image[i, :k], atol=1e-4, rtol=1e-5)


def test_mlpo_ranks_only_the_textual_dispreferred():
    results = {}
    for mode in ("textual", "both"):
        vlm = tiny()
        trainer = PreferenceTrainer(vlm, visual_rows(6), config(dispreferred=mode))
        trainer.compute_reference()
        perturb_adapter(vlm)
        results[mode] = trainer.evaluate()
    # the visual pair adds explicit terms, and no implicit one
    assert results["both"]["implicit"] == pytest.approx(results["textual"]["implicit"], abs=1e-5)
    assert results["both"]["ranking_accuracy"] == pytest.approx(results["textual"]["ranking_accuracy"])
    assert results["both"]["explicit"] > results["textual"]["explicit"] + 1e-4


def test_dpo_both_trains_two_weighted_pairs_and_raises_the_margin():
    vlm = tiny()
    frozen_before = {n: p.detach().clone() for n, p in vlm.model.named_parameters()}
    rows = visual_rows(8, every=2)  # half the entries have a visual pair
    trainer = PreferenceTrainer(vlm, rows, config(loss="dpo", weighted=True, dispreferred="both", epochs=3))
    assert trainer.n_rejected == 2  # the top-ranked textual + the visual one
    lora_before = {n: p.detach().clone() for n, p in lora_parameters(vlm).items()}
    before = trainer.evaluate()
    summary = trainer.train()
    after = trainer.evaluate()
    assert_only_lora_trained(vlm, frozen_before, lora_before)
    assert abs(before["reward_margin"]) < 1e-4  # policy == reference at the start
    assert after["reward_margin"] > before["reward_margin"] + 1e-3
    assert after["loss"] < before["loss"]
    assert all(h["implicit"] == 0 and "ranking_accuracy" not in h for h in trainer.history)
    assert summary["visual_pairs"] == 4 and summary["entries_left_out"] == 0
    assert summary["dispreferred"] == "both"


def test_dpo_both_loss_is_the_weighted_sum_of_its_pairs():
    vlm = tiny()
    rows = visual_rows(4)
    trainer = PreferenceTrainer(vlm, rows, config(loss="dpo", dispreferred="both"))
    trainer.compute_reference()
    perturb_adapter(vlm)
    policy, reference = trainer.score(), trainer.reference
    weights = torch.tensor([e.weights for e in trainer.entries])
    r = trainer.cfg.gamma * (policy - reference)
    terms = -torch.nn.functional.logsigmoid(r[:, :1] - r[:, 1:]) * weights
    assert trainer.evaluate()["explicit"] == pytest.approx(terms.sum(1).mean().item(), abs=1e-5)


def test_visual_mode_leaves_out_entries_without_one_and_reports_them():
    trainer = PreferenceTrainer(tiny(), visual_rows(8, every=2), config(dispreferred="visual", epochs=1))
    assert len(trainer.entries) == 4 and trainer.n_rejected == 1
    summary = trainer.train()
    assert summary["entries"] == 4 and summary["visual_pairs"] == 4 and summary["entries_left_out"] == 4


def test_textual_mode_ignores_the_visual_column():
    histories = []
    for rows in (scored_rows(8), visual_rows(8)):
        trainer = PreferenceTrainer(tiny(), rows, config(epochs=1))
        summary = trainer.train()
        assert summary["visual_pairs"] == 0 and summary["entries_left_out"] == 0
        histories.append([(h["loss"], h["explicit"], h["implicit"]) for h in trainer.history])
    assert histories[0] == histories[1]


def test_resume_key_changes_with_dispreferred():
    keys = {resume_key(config(dispreferred=mode), "input", "model", 1) for mode in ("textual", "visual", "both")}
    assert len(keys) == 3

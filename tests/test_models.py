"""The model core: profiles, prompts, persistence, visual-token dropout and greedy decoding."""

from __future__ import annotations

import pytest
import torch

from pipeline.batching import IGNORE_INDEX, collate_prompts, collate_sequences
from pipeline.generation import greedy_generate
from pipeline.models.profiles import build_tiny, load_vlm
from pipeline.models.vlm import IMAGE_TOKEN, position_ids_from_mask
from pipeline.visual_dropout import blind_mask, drop_visual_tokens
from tests.conftest import make_rows


def test_tiny_profile_is_small_llava(tiny_vlm):
    n_params = sum(p.numel() for p in tiny_vlm.model.parameters())
    assert 10_000 < n_params < 5_000_000
    assert type(tiny_vlm.model).__name__ == "LlavaForConditionalGeneration"


def test_prompt_expands_image_placeholder(tiny_vlm):
    ids = tiny_vlm.prompt_ids("is there a lesion ?")
    assert sum(i == tiny_vlm.image_token_id for i in ids) == tiny_vlm.settings.num_image_tokens
    assert tiny_vlm.answer_ids("yes")[-1] == tiny_vlm.eos_token_id


def _single_turn_ids(vlm, question):
    """`VLM.prompt_ids` as it was before multi-turn contexts: one user message, image first."""
    content = IMAGE_TOKEN * vlm.settings.num_image_tokens + "\n" + question.strip()
    messages = [{"role": "user", "content": content}]
    if vlm.settings.system_prompt:
        messages.insert(0, {"role": "system", "content": vlm.settings.system_prompt})
    text = vlm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return vlm.tokenizer.encode(text, add_special_tokens=False)


CONTEXT = [{"question": "what modality is this ?", "answer": "ct"},
           {"question": "is there a mass ?", "answer": "yes , in the liver"}]
WORDS = ["where is it ?", "left lobe", "you are a radiologist ."] + [t[k] for t in CONTEXT for k in t]


@pytest.mark.parametrize("system_prompt", [None, "you are a radiologist ."])
def test_prompt_without_context_is_the_single_turn_prompt(system_prompt):
    vlm = build_tiny(WORDS, seed=0, system_prompt=system_prompt)
    for question in ("where is it ?", "  is there a mass ? "):
        assert vlm.prompt_ids(question) == _single_turn_ids(vlm, question)
        assert vlm.prompt_ids(question, []) == vlm.prompt_ids(question, ())


@pytest.mark.parametrize("system_prompt", [None, "you are a radiologist ."])
def test_prompt_renders_context_as_earlier_chat_turns(system_prompt):
    vlm = build_tiny(WORDS, seed=0, system_prompt=system_prompt)
    ids = vlm.prompt_ids("where is it ?", CONTEXT)
    n_image = vlm.settings.num_image_tokens
    tokens = vlm.tokenizer.convert_ids_to_tokens(ids)
    # the turns as ChatML messages, in order; the image opens the first user message only
    turns = " ".join(tokens).replace("<image> " * n_image, "<image>*n ").split("<|im_end|>")
    expected = ([f"<|im_start|> system {system_prompt}"] if system_prompt else []) + [
        "<|im_start|> user <image>*n what modality is this ?",
        "<|im_start|> assistant ct",
        "<|im_start|> user is there a mass ?",
        "<|im_start|> assistant yes , in the liver",
        "<|im_start|> user where is it ?",
        "<|im_start|> assistant",
    ]
    assert [t.strip() for t in turns] == expected
    assert sum(i == vlm.image_token_id for i in ids) == n_image
    # the single-turn prompt of the first question is where the multi-turn prompt starts
    first = _single_turn_ids(vlm, CONTEXT[0]["question"])[:-2]  # without the generation prompt
    assert ids[: len(first)] == first
    with pytest.raises(ValueError, match="image tokens"):
        vlm.prompt_ids("where is it ?", [{"question": "<image> again ?", "answer": "ct"}])


def test_sequences_label_only_the_last_answer_after_the_context():
    vlm = build_tiny(WORDS, seed=0)
    images = [make_rows(1)[0]["image"]] * 2
    batch = collate_sequences(vlm, images, ["where is it ?"] * 2, ["left lobe"] * 2, contexts=[CONTEXT, []])
    for b, context in enumerate((CONTEXT, [])):
        prompt = vlm.prompt_ids("where is it ?", context)
        assert int(batch.answer_start[b]) == len(prompt)
        assert batch.input_ids[b, : len(prompt)].tolist() == prompt
        labelled = batch.labels[b][batch.labels[b] != IGNORE_INDEX].tolist()
        assert labelled == vlm.answer_ids("left lobe")
    prompts = collate_prompts(vlm, images, ["where is it ?"] * 2, [CONTEXT, []])
    width = prompts.input_ids.shape[1]
    assert prompts.input_ids[0].tolist() == vlm.prompt_ids("where is it ?", CONTEXT)  # the longest: no padding
    short = vlm.prompt_ids("where is it ?")
    assert prompts.input_ids[1, width - len(short):].tolist() == short


def test_save_load_round_trip_gives_same_logits(tiny_vlm, rows, tmp_path):
    batch = collate_sequences(tiny_vlm, [r["image"] for r in rows[:3]], [r["question"] for r in rows[:3]],
                              [r["answer"] for r in rows[:3]], contexts=[r["context"] for r in rows[:3]])
    before = tiny_vlm.forward(batch.attention_mask, batch.input_ids, batch.pixel_values).logits
    tiny_vlm.save(tmp_path / "m")
    loaded = load_vlm(tmp_path / "m", device="cpu", dtype=torch.float32)
    assert loaded.settings == tiny_vlm.settings
    batch2 = collate_sequences(loaded, [r["image"] for r in rows[:3]], [r["question"] for r in rows[:3]],
                               [r["answer"] for r in rows[:3]], contexts=[r["context"] for r in rows[:3]])
    assert torch.equal(batch.input_ids, batch2.input_ids)
    after = loaded.forward(batch2.attention_mask, batch2.input_ids, batch2.pixel_values).logits
    torch.testing.assert_close(before, after)


def _removed_logits(vlm, batch, keep_mask):
    """Reference: physically delete the masked tokens and run the shorter sequences one by one."""
    embeds = vlm.embed(batch.input_ids, batch.pixel_values)
    out = []
    for b in range(embeds.shape[0]):
        keep = keep_mask[b].bool()
        e = embeds[b][keep].unsqueeze(0)
        mask = torch.ones(1, e.shape[1], dtype=torch.long)
        logits = vlm.model(inputs_embeds=e, attention_mask=mask,
                           position_ids=position_ids_from_mask(mask)).logits[0]
        out.append((logits, keep))
    return out


def test_saved_config_names_the_folder_it_was_loaded_from_not_a_machine_path(tiny_vlm, tmp_path):
    # peft records this name as an adapter's base; a machine-specific path in it would also make
    # identical weights hash differently for DVC on every machine.
    import json

    tiny_vlm.save(tmp_path / "sft")
    loaded = load_vlm(tmp_path / "sft", device="cpu", dtype=torch.float32)
    assert loaded.language_model.name_or_path == str(tmp_path / "sft")
    loaded.save(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert saved["text_config"]["_name_or_path"] == str(tmp_path / "sft")


def test_dropout_by_masking_equals_removing_visual_tokens(tiny_vlm, rows):
    batch = collate_sequences(tiny_vlm, [r["image"] for r in rows[:4]], [r["question"] for r in rows[:4]],
                              ["yes", "no", "left lung", "no"], contexts=[r["context"] for r in rows[:4]])
    dropped = drop_visual_tokens(batch.attention_mask, batch.image_mask, 0.7, seeds=[1, 2, 3, 4])
    masked = tiny_vlm.forward(dropped, batch.input_ids, batch.pixel_values).logits
    for b, (ref, keep) in enumerate(_removed_logits(tiny_vlm, batch, dropped)):
        torch.testing.assert_close(masked[b][keep], ref, atol=1e-5, rtol=1e-4)


def test_dropout_counts_seeds_and_ratio_zero(tiny_vlm, rows):
    batch = collate_prompts(tiny_vlm, [r["image"] for r in rows[:3]], [r["question"] for r in rows[:3]], [[]] * 3)
    n_visual = tiny_vlm.settings.num_image_tokens
    same = drop_visual_tokens(batch.attention_mask, batch.image_mask, 0.0, seeds=[0, 1, 2])
    assert torch.equal(same, batch.attention_mask)
    a = drop_visual_tokens(batch.attention_mask, batch.image_mask, 0.5, seeds=[0, 1, 2])
    b = drop_visual_tokens(batch.attention_mask, batch.image_mask, 0.5, seeds=[0, 1, 2])
    c = drop_visual_tokens(batch.attention_mask, batch.image_mask, 0.5, seeds=[5, 6, 7])
    assert torch.equal(a, b) and not torch.equal(a, c)
    dropped_per_row = (batch.attention_mask - a).sum(-1)
    assert dropped_per_row.tolist() == [round(0.5 * n_visual)] * 3
    # only visual positions are ever dropped
    assert not ((batch.attention_mask != a) & ~batch.image_mask).any()
    blind = blind_mask(batch.attention_mask, batch.image_mask)
    assert int((batch.attention_mask - blind).sum()) == 3 * n_visual


def test_blind_answers_ignore_the_image(tiny_vlm, rows):
    questions = [rows[0]["question"]] * 2
    images = [rows[0]["image"], rows[1]["image"]]
    batch = collate_prompts(tiny_vlm, images, questions, [[]] * len(questions))
    blind = greedy_generate(tiny_vlm, batch, 5, attention_mask=blind_mask(batch.attention_mask, batch.image_mask))
    assert blind[0] == blind[1]


def test_cached_greedy_matches_no_cache_reference(tiny_vlm, rows):
    batch = collate_prompts(tiny_vlm, [r["image"] for r in rows[:4]],
                            [r["question"] for r in rows[:3]] + ["is there ?"], [[]] * 4)
    got = greedy_generate(tiny_vlm, batch, 6)
    embeds = tiny_vlm.embed(batch.input_ids, batch.pixel_values)
    for b in range(4):
        keep = batch.attention_mask[b].bool()
        e = embeds[b][keep].unsqueeze(0)
        ref: list[int] = []
        for _ in range(6):
            mask = torch.ones(1, e.shape[1], dtype=torch.long)
            logits = tiny_vlm.model(inputs_embeds=e, attention_mask=mask,
                                    position_ids=position_ids_from_mask(mask)).logits
            nxt = int(logits[0, -1].argmax())
            if nxt == tiny_vlm.eos_token_id:
                break
            ref.append(nxt)
            e = torch.cat([e, tiny_vlm.model.get_input_embeddings()(torch.tensor([[nxt]]))], dim=1)
        assert got[b] == ref


def test_params_read_exponent_floats_as_numbers(tmp_path):
    from pipeline.params import load_params

    (tmp_path / "params.yaml").write_text("train:\n  lr: 2e-05\n  gamma: 0.1\n  name: 1e5x\n")
    params = load_params(tmp_path / "params.yaml")
    assert params["train"]["lr"] == 2e-05 and params["train"]["gamma"] == 0.1
    assert params["train"]["name"] == "1e5x"

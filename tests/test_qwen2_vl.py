"""Qwen2-VL and Qwen2.5-VL through the one `VLM` interface, on tiny random checkpoints of the real
architectures (`tests/qwen2_vl_fixture.py`), each checked against transformers' own model: the
prompt and its image-token expansion, multimodal rotary positions, the forward, the dropped and
blind views, grouped scoring, batched greedy decoding, a LoRA preference step, save and reload."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForImageTextToText, Qwen2VLProcessor

from pipeline.batching import answer_logprobs, collate_prompts, collate_sequences
from pipeline.generation import greedy_generate
from pipeline.grouped_scoring import collate_groups, group_logprobs
from pipeline.losses import dpo_loss
from pipeline.mask_strategies import two_view_embeddings
from pipeline.models.profiles import load_vlm
from pipeline.training.common import LoraSettings, wrap_lora
from pipeline.visual_dropout import blind_mask, drop_visual_tokens
from tests.llava_med_fixture import random_image
from tests.qwen2_vl_fixture import IMAGE_SIZE, NUM_IMAGE_TOKENS, write_qwen2_vl_checkpoint

QUESTION = "what is shown in the image?"
CONTEXT = [{"question": "which modality is this?", "answer": "a ct scan."},
           {"question": "is there a mass?", "answer": "yes, in the liver."}]


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def folder(request, tmp_path_factory):
    return write_qwen2_vl_checkpoint(tmp_path_factory.mktemp(request.param) / "tiny", model_type=request.param)


@pytest.fixture(scope="module")
def vlm(folder):
    return load_vlm(folder, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def reference(folder):
    return AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()


def _images(n: int):
    # not square and not 32 px: every image is resized to the family's side first
    return [random_image((48 + 8 * k, 40), seed=k) for k in range(n)]


def _reference_inputs(vlm, image, ids: list[int]) -> dict:
    """What Qwen2VLProcessor gives the model for one prompt: its image processor's patches and
    grid, and `mm_token_type_ids` (1 at image tokens), from which the model numbers its positions."""
    side = vlm.family.image_size
    out = vlm.image_processor(images=[image.convert("RGB").resize((side, side))], return_tensors="pt")
    input_ids = torch.tensor([ids])
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"],
            "mm_token_type_ids": (input_ids == vlm.image_token_id).int()}


# ----------------------------------------------------------------------------- prompts


def test_loads_as_the_qwen2_vl_family(vlm, folder):
    assert vlm.family.name == "qwen2_vl"
    assert vlm.content_style == "parts" and vlm.processor is None
    assert vlm.image_token == "<|image_pad|>"
    assert vlm.settings.num_image_tokens == NUM_IMAGE_TOKENS and vlm.settings.image_size == IMAGE_SIZE


@pytest.mark.parametrize("context", [[], CONTEXT], ids=["single-turn", "with-context"])
def test_prompt_is_qwens_template_with_the_processors_expansion(vlm, context):
    ids = vlm.prompt_ids(QUESTION, context)
    text = vlm.tokenizer.apply_chat_template(vlm.prompt_messages(QUESTION, context), add_generation_prompt=True,
                                             tokenize=False)
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    expected = {  # Qwen's template's own default system prompt; the image opens the first user turn only
        0: f"{system}<|im_start|>user\n{image}{QUESTION}<|im_end|>\n<|im_start|>assistant\n",
        2: f"{system}<|im_start|>user\n{image}which modality is this?<|im_end|>\n<|im_start|>assistant\n"
           "a ct scan.<|im_end|>\n<|im_start|>user\nis there a mass?<|im_end|>\n<|im_start|>assistant\n"
           f"yes, in the liver.<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n",
    }[len(context)]
    assert text == expected
    assert ids == vlm.tokenizer(text.replace("<|image_pad|>", "<|image_pad|>" * NUM_IMAGE_TOKENS))["input_ids"]
    # as many image tokens as transformers' Qwen2VLProcessor writes for the processed image's grid
    grid = vlm.image_processor(images=[random_image((IMAGE_SIZE, IMAGE_SIZE))], return_tensors="pt")["image_grid_thw"]
    stub = SimpleNamespace(image_processor=vlm.image_processor, image_token=vlm.image_token)
    expanded = Qwen2VLProcessor.replace_image_token(stub, {"image_grid_thw": grid}, 0)
    assert sum(i == vlm.image_token_id for i in ids) == len(expanded) // len(vlm.image_token) == NUM_IMAGE_TOKENS


# ----------------------------------------------------------------------------- positions and forward


def test_positions_equal_the_models_rope_index(vlm):
    batch = collate_prompts(vlm, _images(2), [QUESTION, QUESTION], [[], CONTEXT])
    ours = vlm.position_ids(batch.attention_mask, batch.image_mask)
    assert ours.shape == (3, 2, batch.input_ids.shape[1])
    grids = vlm.family.grid_thw.repeat(2, 1)
    theirs, _ = vlm.model.model.get_rope_index(batch.input_ids, mm_token_type_ids=batch.image_mask.int(),
                                               image_grid_thw=grids, attention_mask=batch.attention_mask)
    attended = batch.attention_mask.bool()
    assert torch.equal(ours[:, attended], theirs[:, attended])
    # the image is a 4 x 4 grid: heights and widths span 4 values each, time is constant
    image = ours[:, 0, batch.image_mask[0]]
    assert image[0].unique().numel() == 1 and image[1].unique().numel() == 4 and image[2].unique().numel() == 4


def test_forward_equals_the_models_own_forward(vlm, reference):
    images = _images(2)
    batch = collate_prompts(vlm, images, [QUESTION, QUESTION], [CONTEXT, []])
    with torch.no_grad():
        ours = vlm.forward(batch.attention_mask, batch.input_ids, batch.pixel_values).logits
        for b, (image, context) in enumerate(zip(images, [CONTEXT, []], strict=True)):
            ids = vlm.prompt_ids(QUESTION, context)
            theirs = reference(**_reference_inputs(vlm, image, ids)).logits[0]
            assert torch.allclose(ours[b, -len(ids):], theirs, atol=1e-4, rtol=1e-4)


def test_dropped_view_equals_the_visual_tokens_physically_removed(vlm, reference):
    images = _images(2)
    batch = collate_prompts(vlm, images, [QUESTION, QUESTION], [[], CONTEXT])
    dropped = drop_visual_tokens(batch.attention_mask, batch.image_mask, 0.5, seeds=[3, 4])
    full_positions = vlm.position_ids(batch.attention_mask, batch.image_mask)
    positions = vlm.position_ids(dropped, batch.image_mask)
    kept = dropped.bool()
    # the definition: every kept token, visual or text, has its full-view position
    assert torch.equal(positions[:, kept], full_positions[:, kept])
    with torch.no_grad():
        embeds = vlm.embed(batch.input_ids, batch.pixel_values)
        masked = vlm.forward(dropped, inputs_embeds=embeds, image_mask=batch.image_mask).logits
        for b in range(2):
            keep = kept[b]
            assert int((batch.image_mask[b] & ~keep).sum()) == NUM_IMAGE_TOKENS // 2
            removed = reference(inputs_embeds=embeds[b:b + 1, keep], attention_mask=torch.ones(1, int(keep.sum())),
                                position_ids=positions[:, b:b + 1, keep]).logits[0]
            assert torch.allclose(masked[b, keep], removed, atol=1e-4, rtol=1e-4)
            # and dropping changed what the model predicts
            assert not torch.allclose(masked[b, -1], vlm.forward(batch.attention_mask[b:b + 1], inputs_embeds=embeds[b:b + 1],
                                                                  image_mask=batch.image_mask[b:b + 1]).logits[0, -1])


def test_blind_view_equals_the_model_without_the_image(vlm, reference):
    images = _images(2)
    batch = collate_prompts(vlm, images, [QUESTION, QUESTION], [[], CONTEXT])
    blind = blind_mask(batch.attention_mask, batch.image_mask)
    with torch.no_grad():
        logits = vlm.forward(blind, batch.input_ids, batch.pixel_values).logits
        for b in range(2):
            keep = blind[b].bool()
            text_only = batch.input_ids[b:b + 1, keep]  # the prompt with the image tokens cut out
            # no pixels: the model numbers the text itself, 0, 1, 2, ...
            theirs = reference(input_ids=text_only, attention_mask=torch.ones_like(text_only)).logits[0]
            assert torch.allclose(logits[b, keep], theirs, atol=1e-4, rtol=1e-4)


def test_token_strategy_two_views_and_others_refused(vlm):
    batch = collate_prompts(vlm, _images(2), [QUESTION, QUESTION], [[], []])
    embeds, masks = two_view_embeddings(vlm, batch.input_ids, batch.attention_mask, batch.pixel_values,
                                        "token", 0.5, [1, 2])
    assert embeds.shape[0] == 4 and int((masks[2:] == 0).sum() - (masks[:2] == 0).sum()) == NUM_IMAGE_TOKENS
    for strategy in ("pixel", "patch", "latent"):
        with pytest.raises(NotImplementedError, match="qwen2_vl family"):
            two_view_embeddings(vlm, batch.input_ids, batch.attention_mask, batch.pixel_values, strategy, 0.5, [1, 2])


# ----------------------------------------------------------------------------- scoring and decoding


def test_grouped_scoring_equals_scoring_each_row_alone(vlm):
    images = _images(2)
    contexts = [[], CONTEXT]
    answers = [["yes, in the liver.", "no."], ["a ct scan.", "the left lung.", "normal chest."]]
    prompts = [vlm.prompt_ids(QUESTION, c) for c in contexts]
    groups = [[vlm.answer_ids(a) for a in group] for group in answers]
    with torch.no_grad():
        table = group_logprobs(vlm, collate_groups(vlm, images, prompts, groups), share_prompt=True)
        unshared = group_logprobs(vlm, collate_groups(vlm, images, prompts, groups), share_prompt=False)
        for b, group in enumerate(answers):
            for k, answer in enumerate(group):
                alone = collate_sequences(vlm, [images[b]], [QUESTION], [answer], contexts=[contexts[b]])
                logits = vlm.forward(alone.attention_mask, alone.input_ids, alone.pixel_values).logits
                expected = answer_logprobs(logits, alone.labels)[0]
                assert torch.allclose(table[b, k], expected, atol=1e-4), (b, k)
                assert torch.allclose(unshared[b, k], expected, atol=1e-4), (b, k)


def test_batched_greedy_decoding_equals_generate(vlm, reference):
    images = _images(3)
    contexts = [[], CONTEXT, []]
    ours = greedy_generate(vlm, collate_prompts(vlm, images, [QUESTION] * 3, contexts), 6)
    for image, context, got in zip(images, contexts, ours, strict=True):
        inputs = _reference_inputs(vlm, image, vlm.prompt_ids(QUESTION, context))
        out = reference.generate(**inputs, do_sample=False, max_new_tokens=6)
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        if vlm.eos_token_id in new:  # ours stops at EOS and does not return it
            new = new[: new.index(vlm.eos_token_id)]
        assert got == new and len(got) > 0


# ----------------------------------------------------------------------------- training and persistence


def test_one_preference_step_changes_the_lora_weights(folder):
    vlm = load_vlm(folder, device="cpu", dtype=torch.float32)
    images = _images(2)
    prompts = [vlm.prompt_ids(QUESTION, c) for c in ([], CONTEXT)]
    groups = [[vlm.answer_ids("yes, in the liver."), vlm.answer_ids("no.")],
              [vlm.answer_ids("a ct scan."), vlm.answer_ids("normal chest.")]]
    batch = collate_groups(vlm, images, prompts, groups)
    with torch.no_grad():
        ref = group_logprobs(vlm, batch, share_prompt=True)
    peft_lm = wrap_lora(vlm, LoraSettings(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_targets=("q_proj", "v_proj")))
    lora = {n: p for n, p in peft_lm.named_parameters() if "lora_B" in n}
    assert lora and all(float(p.detach().abs().sum()) == 0 for p in lora.values())  # peft starts B at zero
    optimizer = torch.optim.AdamW([p for p in peft_lm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        policy = group_logprobs(vlm, batch, share_prompt=True)
        out = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], gamma=0.1)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(float(out.loss.detach()))
    assert all(float(p.detach().abs().sum()) > 0 for p in lora.values())
    assert losses[0] == pytest.approx(-torch.nn.functional.logsigmoid(torch.tensor(0.0)).item(), abs=1e-5)
    assert losses[-1] < losses[0]


def test_save_and_reload_give_the_same_logits(vlm, tmp_path):
    batch = collate_prompts(vlm, _images(2), [QUESTION, QUESTION], [[], CONTEXT])
    vlm.save(tmp_path / "sft")
    assert json.loads((tmp_path / "sft" / "medalign.json").read_text())["image_size"] == IMAGE_SIZE
    again = load_vlm(tmp_path / "sft", device="cpu", dtype=torch.float32)
    assert again.family.name == "qwen2_vl" and again.prompt_ids(QUESTION, CONTEXT) == vlm.prompt_ids(QUESTION, CONTEXT)
    with torch.no_grad():
        before = vlm.forward(batch.attention_mask, batch.input_ids, batch.pixel_values).logits
        after = again.forward(batch.attention_mask, batch.input_ids, again.pixel_values(_images(2))).logits
    assert torch.equal(before, after)

"""Every model family through the one `VLM` interface, on tiny random checkpoints of the real
architectures laid out as on the Hub, each checked against transformers' own model given what the
family's processor gives it: load, prompt with image, forward, the dropped view equal to the
dropped tokens physically removed, the blind view equal to the model without the image, grouped
scoring equal to scoring each row alone, batched greedy decoding equal to `generate`, one LoRA
preference step, save and reload. Family-specific checks: tests/test_qwen2_vl.py,
tests/test_llava_hf.py."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from pipeline.batching import answer_logprobs, collate_prompts, collate_sequences
from pipeline.generation import greedy_generate
from pipeline.grouped_scoring import collate_groups, group_logprobs
from pipeline.losses import dpo_loss
from pipeline.mask_strategies import two_view_embeddings
from pipeline.models.profiles import load_vlm
from pipeline.models.vlm import PromptSettings
from pipeline.training.common import LoraSettings, wrap_lora
from pipeline.visual_dropout import blind_mask, drop_visual_tokens
from tests.gemma3_fixture import write_gemma3_checkpoint
from tests.idefics3_fixture import write_idefics3_checkpoint
from tests.llava_hf_fixture import write_llava_hf_checkpoint
from tests.llava_med_fixture import random_image
from tests.llava_next_fixture import write_llava_next_checkpoint
from tests.qwen2_vl_fixture import write_qwen2_vl_checkpoint
from tests.smolvlm_fixture import write_smolvlm_checkpoint

QUESTION = "what is shown in the image?"
CONTEXT = [{"question": "which modality is this?", "answer": "a ct scan."},
           {"question": "is there a mass?", "answer": "yes, in the liver."}]

WRITERS = {
    "llava": lambda folder: write_llava_hf_checkpoint(folder),
    "llava_next": lambda folder: write_llava_next_checkpoint(folder),
    "qwen2_vl": lambda folder: write_qwen2_vl_checkpoint(folder, model_type="qwen2_vl"),
    "qwen2_5_vl": lambda folder: write_qwen2_vl_checkpoint(folder, model_type="qwen2_5_vl"),
    "qwen2_vl_native": lambda folder: native_resolution(write_qwen2_vl_checkpoint(folder, model_type="qwen2_vl")),
    "gemma3": lambda folder: write_gemma3_checkpoint(folder),
    "idefics3": lambda folder: write_idefics3_checkpoint(folder),
    "smolvlm": lambda folder: write_smolvlm_checkpoint(folder),
}
FAMILY = {"llava": "llava", "llava_next": "llava_next", "qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_vl",
          "qwen2_vl_native": "qwen2_vl", "gemma3": "gemma3",
          "idefics3": "idefics3", "smolvlm": "smolvlm"}


def native_resolution(folder):
    """The checkpoint with `medalign.json` asking for each image at its own size."""
    PromptSettings(system_prompt=None, num_image_tokens=16, profile="external", image_size="native").save(folder)
    return folder


@pytest.fixture(scope="module", params=list(WRITERS))
def checkpoint(request, tmp_path_factory):
    return request.param, WRITERS[request.param](tmp_path_factory.mktemp(request.param) / "tiny")


@pytest.fixture(scope="module")
def vlm(checkpoint):
    return load_vlm(checkpoint[1], device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def reference(checkpoint):
    return AutoModelForImageTextToText.from_pretrained(checkpoint[1], dtype=torch.float32).eval()


IMAGE_SIZES = [(48, 40), (40, 120), (120, 40)]  # (width, height): none square or the processed size


def _images(n: int):
    # LLaVA-NeXT keeps each size, and these three differ in tiles and visual tokens (70, 40, 34)
    return [random_image(IMAGE_SIZES[k], seed=k) for k in range(n)]


def _reference_inputs(vlm, image, context) -> dict:
    """What the family's own processor hands its model for one prompt. Qwen2VLProcessor needs
    torchvision (not installed here), so for Qwen its image processor's output and the
    `mm_token_type_ids` it would add are assembled as the processor does. Qwen and LLaVA-NeXT take
    any size; the pipeline resizes every image to one side first, and so does the reference."""
    ids = vlm.prompt_ids(QUESTION, context, image)
    if vlm.family.name == "qwen2_vl":
        side = vlm.family.image_size  # None at native resolution: the processor resizes within its pixel bounds
        image = image.convert("RGB")
        out = vlm.image_processor(images=[image.resize((side, side)) if side else image], return_tensors="pt")
        input_ids = torch.tensor([ids])
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                "pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"],
                "mm_token_type_ids": (input_ids == vlm.image_token_id).int()}
    processor = vlm.processor or AutoProcessor.from_pretrained(vlm.model.name_or_path)
    text = processor.apply_chat_template(vlm.prompt_messages(QUESTION, context), add_generation_prompt=True,
                                         tokenize=False)
    kwargs = {"do_image_splitting": False} if vlm.family.name in ("idefics3", "smolvlm") else {}
    inputs = dict(processor(images=[image], text=[text], return_tensors="pt", **kwargs))
    assert inputs["input_ids"][0].tolist() == ids  # the family's prompt is the processor's
    return inputs


def _removed_kwargs(vlm, image_mask: torch.Tensor) -> dict:
    """What the model needs besides embeddings for a sequence whose visual tokens are `image_mask`:
    Gemma 3's image tokens attend to each other both ways (the processor's token_type_ids)."""
    return {"token_type_ids": image_mask.long()} if vlm.family.name == "gemma3" else {}


def test_loads_as_its_family(checkpoint, vlm):
    assert vlm.family.name == FAMILY[checkpoint[0]]
    image = _images(1)[0]
    ids = vlm.prompt_ids(QUESTION, CONTEXT, image)
    assert sum(i == vlm.image_token_id for i in ids) == vlm.image_token_count((image.height, image.width)) >= 12
    if not vlm.variable_image_tokens:
        assert vlm.image_token_count() == vlm.settings.num_image_tokens


@pytest.mark.parametrize("context", [[], CONTEXT], ids=["single-turn", "with-context"])
def test_forward_equals_the_models_own_forward(vlm, reference, context):
    images = _images(2)
    batch = collate_prompts(vlm, images, [QUESTION, QUESTION], [context, []])
    counts, sizes = batch.pixel_values.token_counts.tolist(), batch.pixel_values.sizes.tolist()
    if vlm.variable_image_tokens:  # LLaVA-NeXT: 70 and 40 tokens; Qwen2-VL native: 3 x 4 and 6 x 2 grids
        assert counts[0] != counts[1] or sizes[0] != sizes[1]
    else:
        assert counts[0] == counts[1]
    with torch.no_grad():
        ours = vlm.forward(batch.attention_mask, batch.input_ids, batch.pixel_values).logits
        for b, (image, ctx) in enumerate(zip(images, [context, []], strict=True)):
            inputs = _reference_inputs(vlm, image, ctx)
            theirs = reference(**inputs).logits[0]
            assert torch.allclose(ours[b, -theirs.shape[0]:], theirs, atol=1e-4, rtol=1e-4)


def test_dropped_view_equals_the_visual_tokens_physically_removed(vlm, reference):
    batch = collate_prompts(vlm, _images(2), [QUESTION, QUESTION], [[], CONTEXT])
    dropped = drop_visual_tokens(batch.attention_mask, batch.image_mask, 0.5, seeds=[3, 4])
    positions = vlm.position_ids(dropped, batch.image_mask, batch.pixel_values)
    kept = dropped.bool()
    with torch.no_grad():
        embeds = vlm.embed(batch.input_ids, batch.pixel_values)
        masked = vlm.forward(dropped, inputs_embeds=embeds, image_mask=batch.image_mask,
                             image_layout=batch.pixel_values).logits
        full = vlm.forward(batch.attention_mask, inputs_embeds=embeds, image_mask=batch.image_mask,
                           image_layout=batch.pixel_values).logits
        for b in range(2):
            keep = kept[b]
            assert int((batch.image_mask[b] & ~keep).sum()) == round(int(batch.image_mask[b].sum()) / 2)
            removed = reference(inputs_embeds=embeds[b:b + 1, keep], attention_mask=torch.ones(1, int(keep.sum())),
                                position_ids=positions[..., b:b + 1, keep],
                                **_removed_kwargs(vlm, batch.image_mask[b:b + 1, keep])).logits[0]
            assert torch.allclose(masked[b, keep], removed, atol=1e-4, rtol=1e-4)
            assert not torch.allclose(masked[b, -1], full[b, -1], atol=1e-3)  # dropping changed the prediction


def test_blind_view_equals_the_model_without_the_image(vlm, reference):
    batch = collate_prompts(vlm, _images(2), [QUESTION, QUESTION], [[], CONTEXT])
    blind = blind_mask(batch.attention_mask, batch.image_mask)
    with torch.no_grad():
        logits = vlm.forward(blind, batch.input_ids, batch.pixel_values).logits
        for b in range(2):
            keep = blind[b].bool()
            text_only = batch.input_ids[b:b + 1, keep]  # the prompt with the image tokens cut out
            theirs = reference(input_ids=text_only, attention_mask=torch.ones_like(text_only)).logits[0]
            assert torch.allclose(logits[b, keep], theirs, atol=1e-4, rtol=1e-4)


def test_token_strategy_gives_two_views(vlm):
    batch = collate_prompts(vlm, _images(2), [QUESTION, QUESTION], [[], []])
    embeds, masks = two_view_embeddings(vlm, batch.input_ids, batch.attention_mask, batch.pixel_values,
                                        "token", 0.5, [1, 2])
    dropped = int((masks[2:] == 0).sum() - (masks[:2] == 0).sum())
    assert embeds.shape[0] == 4 and dropped == sum(round(int(row.sum()) / 2) for row in batch.image_mask)
    if not vlm.family.supports_vision_masks:
        for strategy in ("pixel", "patch", "latent"):
            with pytest.raises(NotImplementedError, match=f"{vlm.family.name} family"):
                two_view_embeddings(vlm, batch.input_ids, batch.attention_mask, batch.pixel_values, strategy, 0.5,
                                    [1, 2])


def test_grouped_scoring_equals_scoring_each_row_alone(vlm):
    images = _images(2)
    contexts = [[], CONTEXT]
    answers = [["yes, in the liver.", "no."], ["a ct scan.", "the left lung.", "normal chest."]]
    prompts = [vlm.prompt_ids(QUESTION, c, im) for c, im in zip(contexts, images, strict=True)]
    groups = [[vlm.answer_ids(a) for a in group] for group in answers]
    with torch.no_grad():
        shared = group_logprobs(vlm, collate_groups(vlm, images, prompts, groups), share_prompt=True)
        unshared = group_logprobs(vlm, collate_groups(vlm, images, prompts, groups), share_prompt=False)
        for b, group in enumerate(answers):
            for k, answer in enumerate(group):
                alone = collate_sequences(vlm, [images[b]], [QUESTION], [answer], contexts=[contexts[b]])
                logits = vlm.forward(alone.attention_mask, alone.input_ids, alone.pixel_values).logits
                expected = answer_logprobs(logits, alone.labels)[0]
                assert torch.allclose(shared[b, k], expected, atol=1e-4), (b, k)
                assert torch.allclose(unshared[b, k], expected, atol=1e-4), (b, k)


def test_batched_greedy_decoding_equals_generate(vlm, reference):
    images = _images(3)
    contexts = [[], CONTEXT, []]
    ours = greedy_generate(vlm, collate_prompts(vlm, images, [QUESTION] * 3, contexts), 6)
    for image, context, got in zip(images, contexts, ours, strict=True):
        inputs = _reference_inputs(vlm, image, context)
        out = reference.generate(**inputs, do_sample=False, max_new_tokens=6, eos_token_id=vlm.eos_token_id,
                                 pad_token_id=vlm.pad_token_id)
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        if vlm.eos_token_id in new:  # ours stops at EOS and does not return it
            new = new[: new.index(vlm.eos_token_id)]
        assert got == new and len(got) > 0


def test_one_preference_step_changes_the_lora_weights(checkpoint):
    vlm = load_vlm(checkpoint[1], device="cpu", dtype=torch.float32)
    images = _images(2)
    prompts = [vlm.prompt_ids(QUESTION, c, im) for c, im in zip(([], CONTEXT), images, strict=True)]
    groups = [[vlm.answer_ids("yes, in the liver."), vlm.answer_ids("no.")],
              [vlm.answer_ids("a ct scan."), vlm.answer_ids("normal chest.")]]
    batch = collate_groups(vlm, images, prompts, groups)
    with torch.no_grad():
        ref = group_logprobs(vlm, batch, share_prompt=True)
    peft_lm = wrap_lora(vlm, LoraSettings(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_targets=("q_proj", "v_proj")))
    lora = {n: p for n, p in peft_lm.named_parameters() if "lora_B" in n}
    assert lora and all(float(p.detach().abs().sum()) == 0 for p in lora.values())  # peft starts B at zero
    frozen = {n: p.detach().clone() for n, p in vlm.model.named_parameters() if "lora_" not in n}
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
    assert all(torch.equal(p, frozen[n]) for n, p in vlm.model.named_parameters() if n in frozen)
    assert losses[0] == pytest.approx(-torch.nn.functional.logsigmoid(torch.tensor(0.0)).item(), abs=1e-5)
    assert losses[-1] < losses[0]


def test_save_and_reload_give_the_same_logits(vlm, tmp_path):
    images = _images(2)
    batch = collate_prompts(vlm, images, [QUESTION, QUESTION], [[], CONTEXT])
    vlm.save(tmp_path / "sft")
    again = load_vlm(tmp_path / "sft", device="cpu", dtype=torch.float32)
    assert again.family.name == vlm.family.name and again.settings == vlm.settings
    assert again.prompt_ids(QUESTION, CONTEXT, images[1]) == vlm.prompt_ids(QUESTION, CONTEXT, images[1])
    with torch.no_grad():
        before = vlm.forward(batch.attention_mask, batch.input_ids, batch.pixel_values).logits
        after = again.forward(batch.attention_mask, batch.input_ids, again.pixel_values(images)).logits
    assert torch.equal(before, after)


def test_smolvlm_prompt_is_smolvlm_processors_own_expansion(tmp_path):
    """SmolVLMProcessor needs torchvision, so SmolVLM's prompt is built by Idefics3Processor; it must
    be what SmolVLMProcessor writes: its template, then its `get_image_prompt_string` for an image
    that is not split."""
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    vlm = load_vlm(write_smolvlm_checkpoint(tmp_path / "smolvlm"), device="cpu", dtype=torch.float32)
    text = vlm.processor.apply_chat_template(vlm.prompt_messages(QUESTION, CONTEXT), add_generation_prompt=True,
                                             tokenize=False)
    assert text.startswith("<|im_start|>User:<image>") and text.count("<image>") == 1
    block = get_image_prompt_string(0, 0, vlm.settings.num_image_tokens, "<fake_token_around_image>", "<image>",
                                    "<global-img>")
    expected = vlm.tokenizer.encode(text.replace("<image>", block), add_special_tokens=False)
    assert vlm.prompt_ids(QUESTION, CONTEXT) == expected
    assert vlm.tokenizer.convert_ids_to_tokens(expected).count("<image>") == 16


def test_an_answer_image_with_other_visual_tokens_is_refused(tmp_path):
    """An answer's own image (visual dispreference: a noised copy) reuses its group's prompt, so it
    must have the group image's visual tokens; LLaVA-NeXT counts them per size."""
    vlm = load_vlm(write_llava_next_checkpoint(tmp_path / "next"), device="cpu", dtype=torch.float32)
    image, other = _images(2)
    prompt = vlm.prompt_ids(QUESTION, [], image)
    answers = [[vlm.answer_ids("yes."), vlm.answer_ids("no.")]]
    same_size = random_image(IMAGE_SIZES[0], seed=9)
    batch = collate_groups(vlm, [image], [prompt], answers, answer_images=[[None, same_size]])
    assert batch["pixel_values"].token_counts.tolist() == [70, 70]
    with pytest.raises(ValueError, match="answer image has 40 visual tokens, its prompt 70"):
        collate_groups(vlm, [image], [prompt], answers, answer_images=[[None, other]])

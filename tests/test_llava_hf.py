"""llava-hf checkpoints (chat template in the processor, typed-part messages) against transformers' own
LLaVA, and the plain-string prompts of the `tiny`/`demo` profiles and converted LLaVA-Med unchanged."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from pipeline.batching import collate_prompts
from pipeline.errors import ModelLoadError
from pipeline.generation import greedy_generate
from pipeline.models.profiles import build_demo, build_tiny, load_vlm
from pipeline.models.vlm import IMAGE_TOKEN
from tests.llava_hf_fixture import NUM_IMAGE_TOKENS, write_llava_hf_checkpoint
from tests.llava_med_fixture import png_bytes, random_image

QUESTION = "what is shown in the image?"
CONTEXT = [{"question": "which modality is this?", "answer": "a ct scan"},
           {"question": "is there a mass?", "answer": "yes, in the liver"}]


@pytest.fixture(scope="module", params=["chat_template.json", "chat_template.jinja"])
def folder(request, tmp_path_factory):
    """Both layouts the Hub has: `chat_template.json` (processor only) and `chat_template.jinja`
    (which transformers also loads into the tokenizer)."""
    return write_llava_hf_checkpoint(tmp_path_factory.mktemp("llava_hf") / "llava-1.5-tiny-hf",
                                     template_file=request.param)


@pytest.fixture(scope="module")
def vlm(folder):
    return load_vlm(folder, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def processor(folder):
    return AutoProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def reference(folder):
    return LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()


def _hf_prompt(processor, question: str, context=()) -> str:
    """The prompt as transformers' LLaVA examples build it: the processor's template on typed parts."""
    conversation = []
    for k, turn in enumerate(list(context) + [{"question": question}]):
        content = [{"type": "text", "text": turn["question"]}]
        conversation.append({"role": "user", "content": ([{"type": "image"}] if k == 0 else []) + content})
        if "answer" in turn:
            conversation.append({"role": "assistant", "content": [{"type": "text", "text": turn["answer"]}]})
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


# ----------------------------------------------------------------------------- prompts


def test_template_comes_from_the_processor(folder, vlm):
    assert vlm.content_style == "parts"
    assert vlm.processor is not None and vlm.processor.chat_template is not None
    if (folder / "chat_template.json").exists():
        # the layout of the report: the tokenizer alone has no template
        assert vlm.tokenizer.chat_template is None


@pytest.mark.parametrize("context", [[], CONTEXT], ids=["single-turn", "with-context"])
def test_prompt_ids_are_the_llava_15_format_expanded_by_the_processor(vlm, processor, context):
    ids = vlm.prompt_ids(QUESTION, context)
    assert sum(i == vlm.image_token_id for i in ids) == NUM_IMAGE_TOKENS == vlm.settings.num_image_tokens
    text = vlm.processor.apply_chat_template(vlm.prompt_messages(QUESTION, context), add_generation_prompt=True)
    expected = {
        0: f"USER: {IMAGE_TOKEN}\n{QUESTION} ASSISTANT:",
        2: f"USER: {IMAGE_TOKEN}\nwhich modality is this? ASSISTANT: a ct scan USER: is there a mass? "
           f"ASSISTANT: yes, in the liver USER: {QUESTION} ASSISTANT:",
    }[len(context)]
    assert text == expected == _hf_prompt(processor, QUESTION, context)
    # one image placeholder per visual token, after the tokenizer's BOS, as the processor does it
    expanded = vlm.tokenizer(expected.replace(IMAGE_TOKEN, IMAGE_TOKEN * NUM_IMAGE_TOKENS))["input_ids"]
    assert ids == expanded
    assert ids[0] == vlm.tokenizer.bos_token_id
    assert ids == processor(images=random_image((48, 40)), text=expected)["input_ids"][0]


def test_pixel_values_are_the_processors_resize_and_centre_crop(vlm, processor):
    image = random_image((48, 40))  # not square: the shortest edge is resized to 32, then the centre cropped
    ours = vlm.pixel_values([image]).pixels
    width, height = image.size
    side = min(width, height)  # the processor's shortest-edge resize and centre crop keep this square
    assert vlm.tower_view(image.size) == ((width - side) // 2, (height - side) // 2, side, side)
    torch.testing.assert_close(ours, processor(images=image, text=IMAGE_TOKEN, return_tensors="pt")["pixel_values"])
    ip = vlm.image_processor
    assert ip.do_center_crop and dict(ip.size) == {"shortest_edge": 32}
    assert dict(ip.crop_size) == {"height": 32, "width": 32}


# ----------------------------------------------------------------------------- against transformers


@pytest.mark.parametrize("context", [[], CONTEXT], ids=["single-turn", "with-context"])
def test_forward_equals_transformers_llava(vlm, processor, reference, context):
    image = random_image((48, 40))
    batch = collate_prompts(vlm, [png_bytes(image)], [QUESTION], [context])
    with torch.no_grad():
        ours = vlm.forward(batch.attention_mask, batch.input_ids, batch.pixel_values).logits
        inputs = processor(images=image, text=_hf_prompt(processor, QUESTION, context), return_tensors="pt")
        theirs = reference(**inputs).logits
    assert batch.input_ids.tolist() == inputs["input_ids"].tolist()
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_greedy_decoding_equals_generate(vlm, processor, reference):
    images = [random_image((48, 40), seed=s) for s in range(3)]
    batch = collate_prompts(vlm, [png_bytes(im) for im in images], [QUESTION] * 3, [[], CONTEXT, []])
    ours = greedy_generate(vlm, batch, 3)
    for image, context, got in zip(images, [[], CONTEXT, []], ours, strict=True):
        inputs = processor(images=image, text=_hf_prompt(processor, QUESTION, context), return_tensors="pt")
        out = reference.generate(**inputs, do_sample=False, max_new_tokens=3)
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        if vlm.eos_token_id in new:  # ours stops at EOS and does not return it
            new = new[: new.index(vlm.eos_token_id)]
        assert got == new


def test_save_keeps_the_processor_template(vlm, tmp_path):
    vlm.save(tmp_path / "sft")
    loaded = load_vlm(tmp_path / "sft", device="cpu", dtype=torch.float32)
    assert loaded.content_style == "parts"
    assert loaded.prompt_ids(QUESTION, CONTEXT) == vlm.prompt_ids(QUESTION, CONTEXT)


def test_no_template_anywhere_is_a_clear_error(tmp_path):
    folder = write_llava_hf_checkpoint(tmp_path / "no-template", template_file=None)
    with pytest.raises(ModelLoadError, match="no-template.*no tokenizer chat template.*no processor chat template"
                       ".*chat_template.json"):
        load_vlm(folder, device="cpu", dtype=torch.float32)


# ----------------------------------------------------------------------------- plain-string templates unchanged


def _todays_ids(vlm, question: str) -> list[int]:
    """The prompt as it was built before processor templates: system message, then one user message
    `"<image>"*N + "\\n" + question`, through the tokenizer's template, no special tokens added."""
    messages = [{"role": "user", "content": IMAGE_TOKEN * vlm.settings.num_image_tokens + "\n" + question.strip()}]
    if vlm.settings.system_prompt:
        messages.insert(0, {"role": "system", "content": vlm.settings.system_prompt})
    text = vlm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return vlm.tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("system_prompt", [None, "answer in one word ."])
def test_tiny_prompt_ids_unchanged(system_prompt, tmp_path):
    vlm = build_tiny(["is there a lesion ?", "answer in one word ."], seed=0, system_prompt=system_prompt)
    assert vlm.content_style == "text" and vlm.processor is None
    assert vlm.prompt_ids("is there a lesion ?") == _todays_ids(vlm, "is there a lesion ?")
    # a saved folder's chat_template.jinja reaches the processor too; the tokenizer's template still wins
    vlm.save(tmp_path / "m")
    loaded = load_vlm(tmp_path / "m", device="cpu", dtype=torch.float32)
    assert loaded.content_style == "text" and loaded.processor is None
    assert loaded.prompt_ids("is there a lesion ?") == _todays_ids(vlm, "is there a lesion ?")


def test_demo_prompt_ids_unchanged():
    vlm = build_demo(seed=0, vision=None, system_prompt="Answer in one word.")
    assert vlm.content_style == "text" and vlm.processor is None
    for question in ("Is there a lesion in the left lung?", "  what organ is shown ? "):
        assert vlm.prompt_ids(question) == _todays_ids(vlm, question)


def test_converted_llava_med_keeps_its_tokenizer_template(tmp_path):
    from pipeline.convert_llava_med import convert
    from tests.llava_med_fixture import write_clip_tower, write_original_checkpoint

    tower = write_clip_tower(tmp_path / "clip")
    original = write_original_checkpoint(tmp_path / "llava-med")
    convert(original, tmp_path / "out", vision_tower=str(tower))
    vlm = load_vlm(tmp_path / "out", device="cpu", dtype=torch.float32)
    assert vlm.content_style == "text" and vlm.processor is None
    assert vlm.prompt_ids("is it ?") == _todays_ids(vlm, "is it ?")

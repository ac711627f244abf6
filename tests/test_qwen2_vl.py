"""What is Qwen2-VL's own (Qwen2-VL and Qwen2.5-VL, tiny random checkpoints of the real architectures,
`tests/qwen2_vl_fixture.py`): its template and image-token expansion, its multimodal rotary positions
against transformers' `get_rope_index`. The checks every family passes are in tests/test_families.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForImageTextToText, Qwen2VLProcessor

from pipeline.batching import collate_prompts
from pipeline.models.profiles import load_vlm
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


def test_template_only_in_the_processors_file_is_read(tmp_path):
    """A folder whose template is only in chat_template.json (the processor's file, which
    AutoTokenizer does not read) still gets Qwen's prompt; with no template anywhere, a clear error."""
    from pipeline.errors import ModelLoadError

    folder = write_qwen2_vl_checkpoint(tmp_path / "q")
    expected = load_vlm(folder, device="cpu", dtype=torch.float32).prompt_ids(QUESTION, CONTEXT)
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_vlm(folder, device="cpu", dtype=torch.float32).prompt_ids(QUESTION, CONTEXT) == expected
    (folder / "chat_template.json").unlink()
    with pytest.raises(ModelLoadError, match="no chat template that renders typed parts"):
        load_vlm(folder, device="cpu", dtype=torch.float32)


def test_native_resolution_positions_follow_each_images_grid(tmp_path):
    """`image_size: native`: each image keeps its aspect within the processor's pixel bounds, so a
    batch holds grids of different shapes (here 3 x 4 and 6 x 2 visual tokens, the same count);
    positions equal `get_rope_index` given those grids, and without the images they are refused."""
    from pipeline.models.vlm import PromptSettings

    folder = write_qwen2_vl_checkpoint(tmp_path / "q")
    PromptSettings(system_prompt=None, num_image_tokens=16, profile="external", image_size="native").save(folder)
    vlm = load_vlm(folder, device="cpu", dtype=torch.float32)
    images = [random_image((48, 40), seed=0), random_image((40, 120), seed=1)]
    batch = collate_prompts(vlm, images, [QUESTION, QUESTION], [CONTEXT, []])
    patches = batch.pixel_values.sizes // vlm.family.patch_size
    grids = torch.cat([torch.ones(2, 1, dtype=torch.long), patches], dim=1)
    assert grids.tolist() == [[1, 6, 8], [1, 12, 4]] and batch.pixel_values.token_counts.tolist() == [12, 12]
    ours = vlm.position_ids(batch.attention_mask, batch.image_mask, batch.pixel_values)
    theirs, _ = vlm.model.model.get_rope_index(batch.input_ids, mm_token_type_ids=batch.image_mask.int(),
                                               image_grid_thw=grids, attention_mask=batch.attention_mask)
    attended = batch.attention_mask.bool()
    assert torch.equal(ours[:, attended], theirs[:, attended])
    tall = ours[:, 1, batch.image_mask[1]]
    assert tall[1].unique().numel() == 6 and tall[2].unique().numel() == 2
    with pytest.raises(ValueError, match="pass the batch's images"):
        vlm.position_ids(batch.attention_mask, batch.image_mask)
    with pytest.raises(ValueError, match="side in pixels or 'native'"):
        PromptSettings(system_prompt=None, num_image_tokens=16, profile="external", image_size="any")

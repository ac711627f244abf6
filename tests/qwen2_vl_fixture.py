"""A tiny random checkpoint laid out like the Qwen2-VL repositories on the Hub.

`Qwen/Qwen2-VL-2B-Instruct` holds a `Qwen2VLForConditionalGeneration` config (multimodal rotary
positions, `image_token_id`, `vision_start_token_id`), a tokenizer with Qwen's special tokens, the
chat template (`chat_template.json`, which also renders plain strings) and a
`preprocessor_config.json` for `Qwen2VLImageProcessor` (`min_pixels` / `max_pixels`, 14-px
patches merged 2 x 2). Here the language model has 2 layers of width 64, the vision tower 2
blocks of width 32 on 4-px patches, and `max_pixels` allows 32 x 32 images: 8 x 8 patches, merged
to 4 x 4 = 16 visual tokens. The tokenizer is word-level (`build_tiny_tokenizer`) with Qwen's
special tokens; only the template and the processor's expansion matter here. `Qwen2.5-VL` is the
same layout with its own config class (`model_type="qwen2_5_vl"`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.models.tiny_tokenizer import build_tiny_tokenizer
from tests.llava_med_fixture import randomize

IMAGE_SIZE, PATCH, MERGE = 32, 4, 2
NUM_IMAGE_TOKENS = (IMAGE_SIZE // (PATCH * MERGE)) ** 2
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
           "<|endoftext|>"]

# Qwen2-VL-Instruct's chat_template.json, as published.
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

WORDS = ("you are a helpful assistant what is shown in the image which modality is this ct scan mri x ray "
         "there mass yes no liver lung left right chest brain abdomen normal abnormal lesion of on ? . ,")


def write_qwen2_vl_checkpoint(folder: Path, seed: int = 0, model_type: str = "qwen2_vl",
                              texts: tuple[str, ...] = ()) -> Path:
    """Write the checkpoint; `model_type` is `qwen2_vl` or `qwen2_5_vl`; `texts` add their words to the
    vocabulary (a dataset's questions and answers)."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
    )

    folder.mkdir(parents=True)
    tokenizer = build_tiny_tokenizer([WORDS, *texts])
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = QWEN2_VL_TEMPLATE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL}
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=(PATCH * MERGE) ** 2, max_pixels=IMAGE_SIZE ** 2, patch_size=PATCH, merge_size=MERGE,
        temporal_patch_size=2, image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711])
    # The Hub layout, written file by file: a Qwen2VLProcessor cannot be built here without a video
    # processor, which needs torchvision; AutoProcessor loads these files without one.
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2_VL_TEMPLATE}, indent=2))

    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
                bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=tokenizer.pad_token_id)
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=2, in_channels=3)
    if model_type == "qwen2_5_vl":
        vision.update(intermediate_size=64, out_hidden_size=64, fullatt_block_indexes=[1], window_size=16)
        vision.pop("mlp_ratio"), vision.pop("embed_dim")
        vision["hidden_size"] = 32
    config_cls, model_cls = {"qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
                             "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration)}[model_type]
    config = config_cls(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = model_cls(config)
    randomize(model, seed)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    json.loads((folder / "config.json").read_text())  # written and readable
    return folder

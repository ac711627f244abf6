"""A tiny random checkpoint laid out like the llava-hf LLaVA-1.5 repositories on the Hub.

`llava-hf/llava-1.5-7b-hf` holds a `LlavaForConditionalGeneration` config (`vision_feature_layer:
-2`, `vision_feature_select_strategy: default`, `image_token_index`), a Llama tokenizer with
`<image>` and `<pad>` added and NO chat template, the chat template in the PROCESSOR's files
(`chat_template.json`; `chat_template.jinja` as newer transformers save it), a CLIP
`preprocessor_config.json` (resize the shortest edge, centre crop) and a `processor_config.json`
(patch size, feature strategy: what the processor needs to expand `<image>`). Here the Llama is a
2-layer one with the Mistral-style byte-fallback tokenizer of `tests/llava_med_fixture.py`, and
the CLIP tower is 32x32 pixels in 8x8 patches (16 image tokens for llava-hf's 576).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.llava_med_fixture import CLIP_MEAN, CLIP_STD, TEXT, VISION, randomize, write_mistral_tokenizer

NUM_IMAGE_TOKENS = (VISION["image_size"] // VISION["patch_size"]) ** 2

# The llava-1.5 conversation, "USER: <image>\n{question} ASSISTANT:", for typed-part messages:
# per message the role in capitals (none for system), its images, then its texts each followed by
# a space; written here to render what llava-hf's template renders.
LLAVA_15_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'] | upper }}{{ ': ' }}{% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{{ ' ' }}{% endif %}"
    "{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def write_llava_tokenizer(folder: Path):
    """The llava-hf tokenizer in `folder`: the Mistral-style one of `tests/llava_med_fixture.py`
    with `<image>` and `<pad>` added, and no chat template (llava-hf keeps it in the processor)."""
    from transformers import AddedToken, AutoTokenizer

    write_mistral_tokenizer(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    assert tokenizer.chat_template is None
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink()
    tokenizer.save_pretrained(folder)
    return tokenizer


def write_llava_hf_checkpoint(folder: Path, seed: int = 0, template_file: str | None = "chat_template.json") -> Path:
    """Write the checkpoint; `template_file` is `chat_template.json`, `chat_template.jinja` or None (no
    template anywhere)."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    folder.mkdir(parents=True)
    tokenizer = write_llava_tokenizer(folder)
    image_id, pad_id = tokenizer.convert_tokens_to_ids("<image>"), tokenizer.pad_token_id

    text = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=256, rms_norm_eps=1e-5,
                       bos_token_id=1, eos_token_id=2, pad_token_id=pad_id, tie_word_embeddings=False, **TEXT)
    vision = CLIPVisionConfig(hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=16, **VISION)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", image_seq_length=NUM_IMAGE_TOKENS, pad_token_id=pad_id)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    randomize(model, seed)
    model.save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())
    saved["image_token_index"] = image_id  # llava-hf's config names it so (transformers reads both)
    (folder / "config.json").write_text(json.dumps(saved, indent=2))

    side = VISION["image_size"]
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": side, "width": side}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": CLIP_MEAN,
        "image_processor_type": "CLIPImageProcessor", "image_std": CLIP_STD, "processor_class": "LlavaProcessor",
        "resample": 3, "rescale_factor": 1 / 255, "size": {"shortest_edge": side},
    }, indent=2))
    (folder / "processor_config.json").write_text(json.dumps({
        "image_token": "<image>", "num_additional_image_tokens": 1, "patch_size": VISION["patch_size"],
        "processor_class": "LlavaProcessor", "vision_feature_select_strategy": "default",
    }, indent=2))
    if template_file == "chat_template.json":
        (folder / template_file).write_text(json.dumps({"chat_template": LLAVA_15_TEMPLATE}, indent=2))
    elif template_file == "chat_template.jinja":
        (folder / template_file).write_text(LLAVA_15_TEMPLATE)
    elif template_file is not None:
        raise ValueError(f"unknown template file {template_file!r}")
    return folder

"""A tiny random checkpoint laid out like the llava-hf LLaVA-NeXT repositories on the Hub.

`llava-hf/llava-v1.6-mistral-7b-hf` holds a `LlavaNextForConditionalGeneration` config
(`image_grid_pinpoints`, `vision_feature_layer: -2`, `image_token_index`), a tokenizer with `<image>`,
the chat template in the processor's files, a `LlavaNextImageProcessor` config (the pinpoints, the
crop size of one view) and a `processor_config.json` (patch size, feature strategy). Here the CLIP
tower sees 16 px views in 4 px patches (16 patches a view), the pinpoints are 16 x 32, 32 x 16 and
32 x 32, and the language model and tokenizer are those of `tests/llava_hf_fixture.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.llava_hf_fixture import LLAVA_15_TEMPLATE, write_llava_tokenizer
from tests.llava_med_fixture import CLIP_MEAN, CLIP_STD, TEXT, randomize

VIEW, PATCH = 16, 4
PINPOINTS = [[16, 32], [32, 16], [32, 32]]


def write_llava_next_checkpoint(folder: Path, seed: int = 0) -> Path:
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
    )

    folder.mkdir(parents=True)
    tokenizer = write_llava_tokenizer(folder)
    image_id, pad_id = tokenizer.convert_tokens_to_ids("<image>"), tokenizer.pad_token_id

    text = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=1,
                       eos_token_id=2, pad_token_id=pad_id, tie_word_embeddings=False, **TEXT)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=VIEW, patch_size=PATCH, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                              projection_dim=16)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                             image_grid_pinpoints=PINPOINTS, vision_feature_layer=-2,
                             vision_feature_select_strategy="default", projector_hidden_act="gelu",
                             pad_token_id=pad_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    randomize(model, seed)
    model.save_pretrained(folder)

    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": VIEW, "width": VIEW}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True, "image_grid_pinpoints": PINPOINTS,
        "image_mean": CLIP_MEAN, "image_processor_type": "LlavaNextImageProcessor", "image_std": CLIP_STD,
        "processor_class": "LlavaNextProcessor", "resample": 3, "rescale_factor": 1 / 255,
        "size": {"shortest_edge": VIEW},
    }, indent=2))
    (folder / "processor_config.json").write_text(json.dumps({
        "image_token": "<image>", "num_additional_image_tokens": 1, "patch_size": PATCH,
        "processor_class": "LlavaNextProcessor", "vision_feature_select_strategy": "default",
    }, indent=2))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": LLAVA_15_TEMPLATE}, indent=2))
    return folder

"""A LLaVA-Med v1.5-shaped model with random weights, for the benchmarks at the scale people run.

LLaVA-Med v1.5 is Mistral-7B-Instruct-v0.2 (32 layers, hidden 4096, 32 query and 8 key-value
heads, MLP 14336, RoPE θ = 1e6) behind CLIP ViT-L/14 at 336 px (24 layers, hidden 1024, 576
patch tokens from its second-to-last layer, the class token dropped) and a two-layer GELU
projector. No registry ships those weights, and speed and memory do not depend on their values,
so the benchmarks build the architecture with random weights.

    --model llava-med-7b            the full shape (a GPU: about 15 GB of bf16 weights)
    --model llava-med-7b:layers=2   every width of the real model, 2 language and 2 vision layers:
                                    the same code path at a size a CPU runs (the tests use it)

The tokenizer is SmolLM2's with `<image>` added (the only one available offline): its 49,153
entries make the embedding and LM head 17,153 rows larger than Mistral's 32,000: 7.71 B
parameters in all, against 7.57 B at Mistral's vocabulary.
"""

from __future__ import annotations

import re

import torch

PREFIX = "llava-med-7b"
SYSTEM_PROMPT = "Answer in one word."

MISTRAL_7B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1e6,
                  sliding_window=None)
CLIP_VIT_L14_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                        image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")


def is_shape(model: str) -> bool:
    return model == PREFIX or model.startswith(PREFIX + ":")


def parse_layers(model: str) -> int | None:
    """`llava-med-7b:layers=N` -> N; `llava-med-7b` -> None (the real depth)."""
    if model == PREFIX:
        return None
    match = re.fullmatch(re.escape(PREFIX) + r":layers=(\d+)", model)
    if not match or int(match.group(1)) < 1:
        raise ValueError(f"expected {PREFIX} or {PREFIX}:layers=N (N >= 1), got {model!r}")
    return int(match.group(1))


def build_llava_med_shape(model: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The random-weight LLaVA-Med-shaped VLM named by `model`, built directly on `device`."""
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        MistralConfig,
    )

    from pipeline.models.profiles import _image_processor
    from pipeline.models.smollm2 import smollm2_dir
    from pipeline.models.vlm import IMAGE_TOKEN, VLM, PromptSettings

    layers = parse_layers(model)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    text = MistralConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **{**MISTRAL_7B, **({"num_hidden_layers": layers} if layers else {})})
    vision = CLIPVisionConfig(num_channels=3, **{**CLIP_VIT_L14_336, **({"num_hidden_layers": layers} if layers
                                                                        else {})})
    tokens = (vision.image_size // vision.patch_size) ** 2
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), image_seq_length=tokens,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu")
    torch.manual_seed(seed)
    with torch.device(device):
        net = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    settings = PromptSettings(system_prompt=SYSTEM_PROMPT, num_image_tokens=tokens, profile=model)
    return VLM(net.eval(), tokenizer, _image_processor(vision.image_size), settings)


def parameters(vlm) -> int:
    return sum(p.numel() for p in vlm.model.parameters())

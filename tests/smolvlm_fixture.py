"""A tiny random checkpoint laid out like the SmolVLM repositories on the Hub.

`HuggingFaceTB/SmolVLM-256M-Instruct` holds a `SmolVLMForConditionalGeneration` config (Idefics3's
architecture: `scale_factor`, `image_token_id`), a tokenizer with `<fake_token_around_image>`,
`<image>`, `<end_of_utterance>` and `<global-img>`, the chat template (typed parts only, turns
opened by `<|im_start|>`), a `SmolVLMImageProcessor` config and `processor_config.json`
(`image_seq_len`, `processor_class: SmolVLMProcessor`). The sizes are tests/idefics3_fixture.py's:
32 px images in 4 px patches, shuffled 2 x 2 to 16 visual tokens, a 2-layer Llama of width 64.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.idefics3_fixture import IMAGE_SIZE, NUM_IMAGE_TOKENS, PATCH
from tests.llava_med_fixture import randomize
from tests.word_tokenizer import word_tokenizer

SPECIAL = ["<|im_end|>", "<|im_start|>", "<unk>", "<fake_token_around_image>", "<image>", "<end_of_utterance>",
           "<global-img>", "<pad>"]

# SmolVLM-256M-Instruct's chat template, as published.
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def write_smolvlm_checkpoint(folder: Path, seed: int = 0) -> Path:
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil

    folder.mkdir(parents=True)
    tokenizer = word_tokenizer(SPECIAL, SMOLVLM_TEMPLATE, pad="<pad>", eos="<|im_end|>", bos="<|im_start|>",
                               unk="<unk>")
    tokenizer.save_pretrained(folder)
    SmolVLMImageProcessorPil(size={"longest_edge": IMAGE_SIZE}, max_image_size={"longest_edge": IMAGE_SIZE},
                             do_image_splitting=False, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    (folder / "processor_config.json").write_text(json.dumps(
        {"image_seq_len": NUM_IMAGE_TOKENS, "processor_class": "SmolVLMProcessor"}, indent=2))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": SMOLVLM_TEMPLATE}, indent=2))
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL}
    text = dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rms_norm_eps=1e-5, pad_token_id=ids["<pad>"], bos_token_id=ids["<|im_start|>"],
                eos_token_id=ids["<end_of_utterance>"], tie_word_embeddings=False)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=IMAGE_SIZE, patch_size=PATCH)
    config = SmolVLMConfig(text_config=text, vision_config=vision, scale_factor=2, image_token_id=ids["<image>"],
                           pad_token_id=ids["<pad>"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = SmolVLMForConditionalGeneration(config)
    randomize(model, seed)
    model.generation_config.eos_token_id = ids["<end_of_utterance>"]
    model.generation_config.pad_token_id = ids["<pad>"]
    model.save_pretrained(folder)
    return folder

"""A tiny random checkpoint laid out like the Idefics3 repositories on the Hub.

`HuggingFaceM4/Idefics3-8B-Llama3` holds an `Idefics3ForConditionalGeneration` config (`scale_factor`,
`image_token_id`), a Llama-3 tokenizer with `<fake_token_around_image>`, `<image>`,
`<end_of_utterance>` and `<global-img>`, the chat template (typed parts only), an
`Idefics3ImageProcessor` config (`max_image_size`, `do_image_splitting`) and `processor_config.json`
(`image_seq_len`). Here the SigLIP tower has 2 layers on 32 px images in 4 px patches (64 patches),
shuffled 2 x 2 by the connector to 16 visual tokens, and the Llama 2 layers of width 64. The tokenizer
is word-level with Idefics3's special tokens (`tests/word_tokenizer.py`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.llava_med_fixture import randomize
from tests.word_tokenizer import word_tokenizer

IMAGE_SIZE, PATCH, NUM_IMAGE_TOKENS = 32, 4, 16
SPECIAL = ["<|finetune_right_pad_id|>", "<|begin_of_text|>", "<|end_of_text|>", "<unk>", "<fake_token_around_image>",
           "<image>", "<end_of_utterance>", "<global-img>"]

# Idefics3-8B-Llama3's chat template, as published.
IDEFICS3_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def write_idefics3_checkpoint(folder: Path, seed: int = 0) -> Path:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil

    return write_idefics3_layout(folder, seed, special=SPECIAL, template=IDEFICS3_TEMPLATE,
                                 pad="<|finetune_right_pad_id|>", eos="<|end_of_text|>", bos="<|begin_of_text|>",
                                 config_class=Idefics3Config, model_class=Idefics3ForConditionalGeneration,
                                 image_processor_class=Idefics3ImageProcessorPil, processor_class="Idefics3Processor")


def write_idefics3_layout(folder: Path, seed: int, *, special: list[str], template: str, pad: str, eos: str, bos: str,
                          config_class, model_class, image_processor_class, processor_class: str) -> Path:
    """A tiny checkpoint of Idefics3's architecture and Hub layout (Idefics3, and SmolVLM with its
    own classes, tokens and template): the sizes of this module's docstring."""
    folder.mkdir(parents=True)
    tokenizer = word_tokenizer(special, template, pad=pad, eos=eos, bos=bos, unk="<unk>")
    tokenizer.save_pretrained(folder)
    image_processor_class(size={"longest_edge": IMAGE_SIZE}, max_image_size={"longest_edge": IMAGE_SIZE},
                          do_image_splitting=False, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    (folder / "processor_config.json").write_text(json.dumps(
        {"image_seq_len": NUM_IMAGE_TOKENS, "processor_class": processor_class}, indent=2))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=2))
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in special}
    text = dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rms_norm_eps=1e-5, pad_token_id=ids[pad], bos_token_id=ids[bos],
                eos_token_id=ids["<end_of_utterance>"], tie_word_embeddings=False)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=IMAGE_SIZE, patch_size=PATCH)
    config = config_class(text_config=text, vision_config=vision, scale_factor=2, image_token_id=ids["<image>"],
                          pad_token_id=ids[pad], tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = model_class(config)
    randomize(model, seed)
    model.generation_config.eos_token_id = ids["<end_of_utterance>"]
    model.generation_config.pad_token_id = ids[pad]
    model.save_pretrained(folder)
    return folder

"""A tiny random checkpoint laid out like the Gemma 3 repositories on the Hub (MedGemma's base).

`google/gemma-3-4b-it` holds a `Gemma3ForConditionalGeneration` config (`mm_tokens_per_image`,
`boi_token_index`, `image_token_index`), a tokenizer whose extra special tokens name
`<start_of_image>`, `<end_of_image>` and `<image_soft_token>`, the chat template (which renders
plain strings and typed parts), a `Gemma3ImageProcessor` config and `processor_config.json`
(`image_seq_length`). Here the language model has one local (sliding-window) and one global layer
of width 64, the SigLIP tower 2 layers on 32 px images in 4 px patches (64 patches), pooled to
4 x 4 = 16 visual tokens. The tokenizer is word-level with Gemma's special tokens
(`tests/word_tokenizer.py`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.llava_med_fixture import randomize
from tests.word_tokenizer import word_tokenizer

IMAGE_SIZE, PATCH, NUM_IMAGE_TOKENS = 32, 4, 16
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
           "<image_soft_token>"]

# gemma-3-4b-it's chat template, as published.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)


def _tokenizer(texts: tuple[str, ...] = ()):
    return word_tokenizer(SPECIAL, GEMMA3_TEMPLATE, pad="<pad>", eos="<eos>", bos="<bos>", unk="<unk>",
                          named={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                 "image_token": "<image_soft_token>"}, texts=texts)


def write_gemma3_checkpoint(folder: Path, seed: int = 0, texts: tuple[str, ...] = ()) -> Path:
    """Write the checkpoint; `texts` add their words to the vocabulary (a dataset's questions and answers)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil

    folder.mkdir(parents=True)
    tokenizer = _tokenizer(texts)
    tokenizer.save_pretrained(folder)
    Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=[0.5] * 3,
                            image_std=[0.5] * 3, do_pan_and_scan=False).save_pretrained(folder)
    (folder / "processor_config.json").write_text(json.dumps(
        {"image_seq_length": NUM_IMAGE_TOKENS, "processor_class": "Gemma3Processor"}, indent=2))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": GEMMA3_TEMPLATE}, indent=2))
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL}
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                sliding_window=512, layer_types=["sliding_attention", "full_attention"], max_position_embeddings=1024,
                pad_token_id=ids["<pad>"], eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]], bos_token_id=ids["<bos>"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=IMAGE_SIZE, patch_size=PATCH, vision_use_head=False)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=NUM_IMAGE_TOKENS,
                          boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
                          image_token_index=ids["<image_soft_token>"])
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    randomize(model, seed)
    model.generation_config.eos_token_id = [ids["<eos>"], ids["<end_of_turn>"]]
    model.generation_config.pad_token_id = ids["<pad>"]
    model.save_pretrained(folder)
    return folder

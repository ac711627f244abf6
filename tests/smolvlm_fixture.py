"""A tiny random checkpoint laid out like the SmolVLM repositories on the Hub.

`HuggingFaceTB/SmolVLM-256M-Instruct` holds a `SmolVLMForConditionalGeneration` config (Idefics3's
architecture: `scale_factor`, `image_token_id`), a tokenizer with `<fake_token_around_image>`,
`<image>`, `<end_of_utterance>` and `<global-img>`, the chat template (typed parts only, turns
opened by `<|im_start|>`), a `SmolVLMImageProcessor` config and `processor_config.json`
(`image_seq_len`, `processor_class: SmolVLMProcessor`). The sizes are tests/idefics3_fixture.py's:
32 px images in 4 px patches, shuffled 2 x 2 to 16 visual tokens, a 2-layer Llama of width 64.
"""

from __future__ import annotations

from pathlib import Path

from tests.idefics3_fixture import write_idefics3_layout

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

    return write_idefics3_layout(folder, seed, special=SPECIAL, template=SMOLVLM_TEMPLATE, pad="<pad>",
                                 eos="<|im_end|>", bos="<|im_start|>", config_class=SmolVLMConfig,
                                 model_class=SmolVLMForConditionalGeneration,
                                 image_processor_class=SmolVLMImageProcessorPil, processor_class="SmolVLMProcessor")

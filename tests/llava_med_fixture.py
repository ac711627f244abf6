"""A tiny random LLaVA-Med v1.5 checkpoint in its ORIGINAL layout, and a tiny CLIP tower folder.

The checkpoint is what `microsoft/llava-med-v1.5-mistral-7b` looks like on disk, shrunk:
`config.json` of a `LlavaMistralForCausalLM` (Mistral fields + LLaVA's `mm_*` and training
fields), two safetensors shards with an index, named as LLaVA-Med's code (transformers 4.36)
names them, and a Mistral-style tokenizer (byte-fallback BPE, `<unk>`/`<s>`/`</s>` at 0/1/2,
BOS added). Key names and shapes are written out here, not taken from the installed
transformers, so the fixture stays the original layout whatever version runs the tests.

The tower folder is what `openai/clip-vit-large-patch14-336` is: a full CLIP checkpoint (vision
and text halves) with a legacy `preprocessor_config.json` (integer `size` / `crop_size`).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8)
NUM_IMAGE_TOKENS = (VISION["image_size"] // VISION["patch_size"]) ** 2  # 16, LLaVA-Med's 576 at 336/14
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
TOWER_ID = "openai/clip-vit-large-patch14-336"

_CHARS = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,?!:;'\"()[]/<>-_=+*&%#@|"))


def mistral_tokenizer_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Mistral's special tokens and 256 byte-fallback tokens, then `▁` and single characters,
    with a few merges (enough for multi-character tokens such as `▁[INST]`)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    vocab["▁"] = len(vocab)
    for char in _CHARS:
        vocab[char] = len(vocab)
    merges = []
    for word in ("▁[INST]", "▁[/INST]", "▁is", "▁the"):
        current = word[0]
        for char in word[1:]:
            merges.append((current, char))
            current += char
            vocab.setdefault(current, len(vocab))
    return vocab, merges


def write_mistral_tokenizer(folder: Path) -> int:
    """Mistral-style tokenizer files (tokenizer.json as transformers 4.36 saved Mistral's); returns its size."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    vocab, merges = mistral_tokenizer_vocab()
    tokenizer = Tokenizer(BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", 1)])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": None, "add_bos_token": True, "add_eos_token": False, "legacy": True, "model_max_length": 2048,
        "padding_side": "right", "clean_up_tokenization_spaces": False,
    }, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2))
    return len(vocab)


def original_shapes(vocab_size: int, tower: bool) -> dict[str, tuple[int, ...]]:
    """Every key of a `LlavaMistralForCausalLM` state dict (transformers 4.36 names) with its shape."""
    h, inter, heads, kv = TEXT["hidden_size"], TEXT["intermediate_size"], TEXT["num_attention_heads"], \
        TEXT["num_key_value_heads"]
    head_dim = h // heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab_size, h)}
    for i in range(TEXT["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (heads * head_dim, h),
            p + "self_attn.k_proj.weight": (kv * head_dim, h),
            p + "self_attn.v_proj.weight": (kv * head_dim, h),
            p + "self_attn.o_proj.weight": (h, heads * head_dim),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        })
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (vocab_size, h)
    mm = VISION["hidden_size"]
    shapes.update({"model.mm_projector.0.weight": (h, mm), "model.mm_projector.0.bias": (h,),
                   "model.mm_projector.2.weight": (h, h), "model.mm_projector.2.bias": (h,)})
    if tower:
        shapes.update({f"model.vision_tower.vision_tower.{k}": s for k, s in clip_vision_shapes().items()})
    return shapes


def clip_vision_shapes() -> dict[str, tuple[int, ...]]:
    """A `CLIPVisionModel` state dict as transformers 4.36 names it (`vision_model.*`)."""
    d, inter, p = VISION["hidden_size"], VISION["intermediate_size"], VISION["patch_size"]
    positions = (VISION["image_size"] // p) ** 2 + 1
    shapes: dict[str, tuple[int, ...]] = {
        "vision_model.embeddings.class_embedding": (d,),
        "vision_model.embeddings.patch_embedding.weight": (d, 3, p, p),
        "vision_model.embeddings.position_embedding.weight": (positions, d),
        "vision_model.pre_layrnorm.weight": (d,), "vision_model.pre_layrnorm.bias": (d,),
    }
    for i in range(VISION["num_hidden_layers"]):
        q = f"vision_model.encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes[q + f"self_attn.{proj}.weight"] = (d, d)
            shapes[q + f"self_attn.{proj}.bias"] = (d,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[q + f"{norm}.weight"] = (d,)
            shapes[q + f"{norm}.bias"] = (d,)
        shapes.update({q + "mlp.fc1.weight": (inter, d), q + "mlp.fc1.bias": (inter,),
                       q + "mlp.fc2.weight": (d, inter), q + "mlp.fc2.bias": (d,)})
    shapes.update({"vision_model.post_layernorm.weight": (d,), "vision_model.post_layernorm.bias": (d,)})
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Values of a trained-looking scale: norms near 1, small biases, 1/sqrt(fan-in) weights."""
    noise = torch.randn(shape, generator=generator)
    if len(shape) == 1:
        # 1-D weights are norm scales; biases and the class embedding are offsets.
        return 1 + 0.1 * noise if name.endswith("weight") else 0.1 * noise
    if name.endswith("embed_tokens.weight") or name.endswith("position_embedding.weight"):
        return 0.5 * noise
    fan_in = 1
    for s in shape[1:]:
        fan_in *= s
    return noise / fan_in ** 0.5


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter with `random_tensor`'s trained-looking values, drawn in parameter
    order from a generator seeded with `seed` (greedy choices are then not near-ties of a
    0.02-std init)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.copy_(random_tensor(name, tuple(param.shape), generator))


def original_config(vocab_size: int, vision_tower: str = TOWER_ID) -> dict:
    """config.json of LLaVA-Med v1.5, its Mistral sizes shrunk."""
    return {
        "_name_or_path": "/mnt/output/llava-med-v1.5-mistral-7b",
        "architectures": ["LlavaMistralForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "feature_outs": "encoder+decoder",
        "freeze_mm_mlp_adapter": False,
        "hidden_act": "silu",
        "hidden_size": TEXT["hidden_size"],
        "image_aspect_ratio": "pad",
        "img_size": 640,
        "initializer_range": 0.02,
        "intermediate_size": TEXT["intermediate_size"],
        "max_position_embeddings": 32768,
        "mm_hidden_size": VISION["hidden_size"],
        "mm_patch_merge_type": "flat",
        "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu",
        "mm_resampler_type": None,
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": vision_tower,
        "model_type": "llava_mistral",
        "num_attention_heads": TEXT["num_attention_heads"],
        "num_hidden_layers": TEXT["num_hidden_layers"],
        "num_key_value_heads": TEXT["num_key_value_heads"],
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "segtok_posembed": "sincos",
        "sliding_window": None,
        "tie_word_embeddings": False,
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
        "torch_dtype": "float32",
        "transformers_version": "4.36.2",
        "tune_mm_mlp_adapter": False,
        "tune_mm_vision_resampler": False,
        "unfreeze_mm_vision_tower": False,
        "use_cache": False,
        "use_mm_proj": True,
        "vision_backbone": "convnext-large",
        "vocab_size": vocab_size,
    }


def write_original_checkpoint(folder: Path, seed: int = 0, tower: bool = False, vision_tower: str = TOWER_ID,
                              extra: dict[str, torch.Tensor] | None = None, drop: tuple[str, ...] = (),
                              config_changes: dict | None = None) -> Path:
    """Write the checkpoint; `tower` also saves tower weights (`model.vision_tower.vision_tower.*`),
    `extra` adds tensors, `drop` removes keys, `config_changes` edits config.json (None deletes)."""
    folder.mkdir(parents=True)
    vocab_size = write_mistral_tokenizer(folder)
    config = original_config(vocab_size, vision_tower)
    for key, value in (config_changes or {}).items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: random_tensor(name, shape, generator)
               for name, shape in original_shapes(vocab_size, tower).items() if name not in drop}
    tensors.update(extra or {})
    # Two shards and an index, as the published checkpoint has (there: 4 shards).
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: tensors[k].contiguous() for k in keys}, str(folder / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in keys})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return folder


def write_clip_tower(folder: Path, seed: int = 1, hidden_size: int = VISION["hidden_size"]) -> Path:
    """A tiny full CLIP checkpoint (vision + text) with an openai-style preprocessor_config.json."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    vision = {**VISION, "hidden_size": hidden_size, "hidden_act": "quick_gelu", "projection_dim": 16,
              "layer_norm_eps": 1e-5}
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                max_position_embeddings=16, projection_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=16))
    randomize(model.vision_model, seed)
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": VISION["image_size"], "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
        "resample": 3, "size": VISION["image_size"],
    }, indent=2))
    return folder


def random_image(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A seeded RGB noise image of `size` (width, height)."""
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy())


def png_bytes(image: Image.Image) -> bytes:
    """`image` encoded as PNG, as the pipeline's artifacts store images."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()

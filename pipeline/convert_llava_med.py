"""Convert a LLaVA-Med v1.5 checkpoint in its original layout into a transformers LLaVA folder.

    python -m pipeline.convert_llava_med --input llava-med-v1.5-mistral-7b \
        --output models/base/llava-med-v1.5 --vision-tower clip-vit-large-patch14-336

The input is the `microsoft/llava-med-v1.5-mistral-7b` repository as published: `config.json`
with `model_type: llava_mistral` (a `MistralConfig` plus LLaVA's `mm_*` fields), safetensors
shards in the layout of `LlavaMistralForCausalLM` (`model.embed_tokens`, `model.layers.N`,
`model.norm`, `lm_head`, `model.mm_projector.{0,2}`, possibly
`model.vision_tower.vision_tower.vision_model.*`) and Mistral's tokenizer files. The output is a
`LlavaForConditionalGeneration` folder (config, weights, tokenizer with `<image>` added, a CLIP
image processor, a chat template reproducing LLaVA-Med's `mistral_instruct` conversation) that
`pipeline.models.profiles.load_vlm` loads as `sft.model`, with `llava_med_conversion.json`
recording what was mapped, left out and what differs.

What LLaVA-Med's code does, and how the converted model matches it:

- Vision: `CLIPVisionModel.from_pretrained(mm_vision_tower)`, hidden states of layer
  `mm_vision_select_layer` (-2), the CLS token dropped for `mm_vision_select_feature: patch`:
  `vision_feature_layer` / `vision_feature_select_strategy: default` (`cls_patch`: `full`).
  LLaVA-Med builds its tower with `delay_load=True` and then loads it from `mm_vision_tower`, so
  tower weights saved inside the checkpoint are never used by its own loader; the converter takes
  the tower from `--vision-tower` by default for the same reason (`--tower-weights checkpoint`
  takes the saved ones instead), and reports whether the two differ.
- Projector `mlp2x_gelu`: `Linear -> GELU (erf) -> Linear` = LLaVA's `multi_modal_projector`.
- The image placeholder: LLaVA-Med splits the prompt at `<image>` and splices the visual tokens
  in for the id -200; here `<image>` is a real token (id = the old vocabulary size) repeated once
  per visual token. Its embedding row is never looked up (its positions are overwritten) and its
  LM-head row is the mean of the others, so its logit is the mean of the real logits: never the
  maximum (greedy decoding never emits it) and it lowers a real token's log-probability by at
  most log(1 + 1/V) (3.1e-5 for V = 32000) against LLaVA-Med's V-way softmax.
- Prompt: `conv_mistral_instruct` (`SeparatorStyle.LLAMA_2`, empty system, `sep2: </s>`):
  `<s>[INST] <image>\\n{question} [/INST]`, an answer as ` {answer} </s>`, a system prompt (if
  any) as `<<SYS>>\\n{system}\\n<</SYS>>\\n\\n` opening the first user turn (`CHAT_TEMPLATE`).

What differs (also in docs/models.md, "Converting LLaVA-Med v1.5"):

- `image_aspect_ratio: pad`. LLaVA-Med pads every image to a square with the image processor's
  mean colour (`expand2square`) before CLIP's resize (shortest edge) and centre crop.
  `CLIPImageProcessor` has no such step, so the converted folder's processor alone **centre-crops
  a non-square image** where LLaVA-Med shrinks the whole image into the square. The converter
  keeps `image_aspect_ratio: pad` in the converted config.json (transformers ignores it); the
  pipeline reads it and pads each image first (`pipeline.models.families.pad_to_square`, in
  `VLM.pixel_values`), so through the pipeline a non-square image is processed as LLaVA-Med
  processes it. Plain transformers code using the folder must pad itself.
- `tokenizer_model_max_length` (2048): LLaVA-Med truncates the spliced sequence (text + 576
  visual tokens) to that length; transformers' LLaVA does not truncate.
- `mm_use_im_patch_token` true (or absent): LLaVA-Med's loader adds an unused `<im_patch>` token
  with a randomly initialised row at load time; it is not reproduced.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
import typer

from pipeline.errors import ModelLoadError, PipelineError
from pipeline.models.vlm import IMAGE_TOKEN

ORIGINAL_MODEL_TYPE = "llava_mistral"
ORIGINAL_ARCHITECTURE = "LlavaMistralForCausalLM"
REPORT_FILE = "llava_med_conversion.json"

# LLaVA-Med pins transformers 4.36.2: a field missing from the original config took that
# version's MistralConfig default, which later versions changed (e.g. rms_norm_eps, rope).
MISTRAL_4_36_DEFAULTS: dict[str, Any] = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, hidden_act="silu", max_position_embeddings=4096 * 32, initializer_range=0.02,
    rms_norm_eps=1e-6, use_cache=True, pad_token_id=None, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    rope_theta=10000.0, sliding_window=4096, attention_dropout=0.0,
)
# Fields of LlavaMistralConfig that change what the model computes; the converter reads them.
LLAVA_FIELDS = frozenset({
    "mm_vision_tower", "mm_hidden_size", "mm_projector_type", "mm_vision_select_layer", "mm_vision_select_feature",
    "image_aspect_ratio", "mm_use_im_start_end", "mm_use_im_patch_token", "mm_patch_merge_type",
    "tokenizer_model_max_length",
})
# LLaVA training bookkeeping that LLaVA-Med's inference never reads: not carried over (listed in
# the conversion report).
TRAINING_ONLY_FIELDS = frozenset({
    "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "use_mm_proj", "mm_projector_lr", "mm_vision_tower_lr",
    "unfreeze_mm_vision_tower", "tokenizer_padding_side", "feature_outs", "img_size", "vision_backbone",
    "segtok_posembed", "mm_resampler_type", "tune_mm_vision_resampler", "freeze_mm_vision_resampler",
    "image_grid_pinpoints", "freeze_backbone", "pretrain_mm_mlp_adapter", "mm_vision_select_feature_layers",
})
# Saved by every transformers config; not model hyperparameters.
BOOKKEEPING_FIELDS = frozenset({"_name_or_path", "architectures", "model_type", "transformers_version",
                                "torch_dtype", "dtype"})
# The text-model fields the converted MistralConfig takes (those of LlavaMistralConfig's base).
MISTRAL_FIELDS = frozenset(MISTRAL_4_36_DEFAULTS) | {"rope_scaling", "head_dim"}
# Buffers transformers recomputes from the config; old saves may hold them. Not copied.
_DERIVED_BUFFER = re.compile(r".*(\.rotary_emb\.inv_freq|\.embeddings\.position_ids)$")

_ORIGINAL_TOWER = "model.vision_tower.vision_tower."
_PROJECTOR_LAYERS = {"0": "linear_1", "2": "linear_2"}

# LLaVA-Med's `conv_mistral_instruct` (SeparatorStyle.LLAMA_2, system "", sep "", sep2 "</s>"),
# which `get_prompt` renders as `[INST] {user} [/INST]` + ` {assistant} </s>` per turn, the system
# prompt (if set) wrapped in <<SYS>> at the start of the first user turn, nothing for the
# generation prompt. The BOS token is what `tokenizer_image_token` gets from the first chunk.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_message = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set system_message = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['content'] is not string -%}"
    "{{- raise_exception('LLaVA-Med chat template: message content must be a string') -}}{%- endif -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) "
    "or message['role'] not in ['user', 'assistant'] -%}"
    "{{- raise_exception('LLaVA-Med conversations alternate user and assistant turns, user first') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.first and system_message -%}"
    "{{- '[INST] <<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] + ' [/INST]' -}}"
    "{%- else -%}{{- '[INST] ' + message['content'] + ' [/INST]' -}}{%- endif -%}"
    "{%- else -%}{{- ' ' + message['content'] + ' ' + eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
)


class ConversionError(ModelLoadError):
    """The input is not a LLaVA-Med v1.5 checkpoint this converter can map exactly."""


class TowerWeights(str, Enum):
    vision_tower = "vision-tower"
    checkpoint = "checkpoint"


class DtypeChoice(str, Enum):
    auto = "auto"
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class LlavaMedSettings:
    """The LLaVA fields of the original config that decide what the model computes."""

    vision_tower: str
    mm_hidden_size: int
    vision_feature_layer: int
    vision_feature_select_strategy: str
    image_aspect_ratio: str | None
    tokenizer_model_max_length: int | None
    use_im_patch_token: bool


@dataclass
class OriginalConfig:
    """The original config.json split by what the converter does with each field."""

    settings: LlavaMedSettings
    mistral: dict[str, Any]
    defaulted: dict[str, Any]
    training_only: list[str]
    ignored: list[str]


def read_original_config(config: Mapping[str, Any], ignore_fields: Iterable[str] = ()) -> OriginalConfig:
    """Validate a LLaVA-Med v1.5 `config.json` and split it into LLaVA settings and Mistral fields.

    Raises `ConversionError` for another architecture, a LLaVA option this converter cannot map
    exactly (projector other than `mlp2x_gelu`, `mm_use_im_start_end`, any-resolution patch
    merging) and for fields it does not know, listed, unless named in `ignore_fields`.
    """
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if model_type != ORIGINAL_MODEL_TYPE or ORIGINAL_ARCHITECTURE not in architectures:
        raise ConversionError(
            f"config.json has model_type {model_type!r} and architectures {architectures}, not the LLaVA-Med v1.5 "
            f"layout (model_type {ORIGINAL_MODEL_TYPE!r}, {ORIGINAL_ARCHITECTURE}); a checkpoint already in the "
            "transformers LLaVA format (model_type 'llava') needs no conversion: give it to sft.model as is"
        )
    ignore = set(ignore_fields)
    unknown = sorted(k for k in config if k not in LLAVA_FIELDS | TRAINING_ONLY_FIELDS | BOOKKEEPING_FIELDS
                     | MISTRAL_FIELDS | ignore)
    if unknown:
        raise ConversionError(
            f"config.json has fields this converter does not know: {', '.join(unknown)}; if they do not change "
            "what the model computes, pass --ignore-config-field NAME for each"
        )
    for name in ("mm_vision_tower", "mm_hidden_size"):
        if name not in config:
            raise ConversionError(f"config.json lacks {name!r}, which every LLaVA-Med v1.5 config has")
    projector = config.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        raise ConversionError(
            f"mm_projector_type is {projector!r}; transformers' LLaVA projector is LLaVA's 'mlp2x_gelu' "
            "(Linear, GELU, Linear) only"
        )
    if config.get("mm_use_im_start_end", False):
        raise ConversionError("mm_use_im_start_end is true (<im_start><image><im_end> prompts): not supported")
    if config.get("image_aspect_ratio") == "anyres":
        raise ConversionError("image_aspect_ratio is 'anyres' (LLaVA-NeXT tiling): not supported; LLaVA-Med v1.5 "
                              "uses 'pad'")
    if config.get("mm_patch_merge_type", "flat") != "flat":
        raise ConversionError(f"mm_patch_merge_type is {config['mm_patch_merge_type']!r}: only 'flat' is supported")
    feature = config.get("mm_vision_select_feature", "patch")
    strategies = {"patch": "default", "cls_patch": "full"}
    if feature not in strategies:
        raise ConversionError(f"mm_vision_select_feature is {feature!r}; expected 'patch' or 'cls_patch'")
    layer = config.get("mm_vision_select_layer", -1)
    if not isinstance(layer, int):
        raise ConversionError(f"mm_vision_select_layer is {layer!r}; expected one layer index")
    if config.get("rope_scaling") is not None:
        raise ConversionError(f"rope_scaling is {config['rope_scaling']!r}: not supported (LLaVA-Med v1.5 has none)")
    settings = LlavaMedSettings(
        vision_tower=str(config["mm_vision_tower"]),
        mm_hidden_size=int(config["mm_hidden_size"]),
        vision_feature_layer=layer,
        vision_feature_select_strategy=strategies[feature],
        image_aspect_ratio=config.get("image_aspect_ratio"),
        tokenizer_model_max_length=config.get("tokenizer_model_max_length"),
        # LLaVA-Med's builder reads it with a default of True.
        use_im_patch_token=bool(config.get("mm_use_im_patch_token", True)),
    )
    mistral = {k: config[k] for k in MISTRAL_FIELDS if k in config and k != "rope_scaling"}
    defaulted = {k: v for k, v in MISTRAL_4_36_DEFAULTS.items() if k not in mistral}
    return OriginalConfig(
        settings=settings,
        mistral={**defaulted, **mistral},
        defaulted=defaulted,
        training_only=sorted(k for k in config if k in TRAINING_ONLY_FIELDS),
        ignored=sorted(k for k in config if k in ignore),
    )


def text_config(mistral: Mapping[str, Any], vocab_size: int):
    """The MistralConfig of the converted language model, `vocab_size` including `<image>`."""
    from transformers import MistralConfig

    fields = dict(mistral)
    fields["vocab_size"] = vocab_size
    # LLaVA-Med saves `use_cache: false` from training; inference (and its own `generate`) caches.
    fields["use_cache"] = True
    return MistralConfig(**fields)


def llava_config(text, vision, settings: LlavaMedSettings, image_token_id: int):
    """The LlavaConfig equivalent to the original LLaVA fields."""
    from transformers import LlavaConfig

    if vision.hidden_size != settings.mm_hidden_size:
        raise ConversionError(
            f"the vision tower {settings.vision_tower!r} has hidden size {vision.hidden_size}, but the checkpoint's "
            f"projector expects mm_hidden_size {settings.mm_hidden_size}: the wrong tower (give --vision-tower "
            "the one the checkpoint was trained with)"
        )
    tokens = (vision.image_size // vision.patch_size) ** 2
    if settings.vision_feature_select_strategy == "full":
        tokens += 1
    extra = {}
    if settings.image_aspect_ratio is not None:
        # Not read by transformers; kept so that the pipeline can pad (see the module docstring).
        extra["image_aspect_ratio"] = settings.image_aspect_ratio
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=tokens,
        vision_feature_layer=settings.vision_feature_layer,
        vision_feature_select_strategy=settings.vision_feature_select_strategy,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
        **extra,
    )


# ----------------------------------------------------------------------------- state dict


@dataclass(frozen=True)
class TargetPrefixes:
    """Where the installed transformers puts each part of `LlavaForConditionalGeneration`.

    Found from the model's own state-dict keys: transformers 4.x names the language model
    `language_model.model.*` and the tower `vision_tower.vision_model.*`, 5.x
    `model.language_model.*` and `model.vision_tower.*`.
    """

    language_model: str
    lm_head: str
    projector: str
    vision_tower: str


def _prefix_before(keys: Iterable[str], suffix: str) -> str:
    found = [k[: -len(suffix)] for k in keys if k.endswith(suffix)]
    if len(found) != 1:
        raise RuntimeError(f"expected one state-dict key ending in {suffix!r}, found {found}")
    return found[0]


def target_prefixes(target_keys: Iterable[str]) -> TargetPrefixes:
    keys = list(target_keys)
    return TargetPrefixes(
        language_model=_prefix_before(keys, "embed_tokens.weight"),
        lm_head=_prefix_before(keys, "lm_head.weight") + "lm_head.weight",
        projector=_prefix_before(keys, "linear_1.weight"),
        vision_tower=_prefix_before(keys, "embeddings.patch_embedding.weight"),
    )


@dataclass
class KeyMapping:
    """Original checkpoint key -> converted key, by part; `unknown` keys have no counterpart."""

    language_model: dict[str, str] = field(default_factory=dict)
    projector: dict[str, str] = field(default_factory=dict)
    vision_tower: dict[str, str] = field(default_factory=dict)
    derived_buffers: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)


def map_checkpoint_keys(keys: Iterable[str], prefixes: TargetPrefixes) -> KeyMapping:
    """Map the keys of a `LlavaMistralForCausalLM` state dict onto `LlavaForConditionalGeneration`'s.

    `model.{embed_tokens,layers,norm}.*` -> the language model, `lm_head.weight` -> the LM head,
    `model.mm_projector.{0,2}.*` -> `multi_modal_projector.linear_{1,2}.*`,
    `model.vision_tower.vision_tower.vision_model.*` -> the vision tower. Recomputed buffers
    (`rotary_emb.inv_freq`, `position_ids`) are listed apart; anything else is `unknown`.
    """
    mapping = KeyMapping()
    for key in sorted(keys):
        if _DERIVED_BUFFER.fullmatch(key):
            mapping.derived_buffers.append(key)
        elif key == "lm_head.weight":
            mapping.language_model[key] = prefixes.lm_head
        elif re.fullmatch(r"model\.(embed_tokens|norm)\.weight|model\.layers\.\d+\..+", key):
            mapping.language_model[key] = prefixes.language_model + key[len("model."):]
        elif match := re.fullmatch(r"model\.mm_projector\.(\d+)\.(weight|bias)", key):
            layer = _PROJECTOR_LAYERS.get(match.group(1))
            if layer is None:
                mapping.unknown.append(key)
            else:
                mapping.projector[key] = f"{prefixes.projector}{layer}.{match.group(2)}"
        elif key.startswith(_ORIGINAL_TOWER + "vision_model."):
            rest = key[len(_ORIGINAL_TOWER + "vision_model."):]
            mapping.vision_tower[key] = prefixes.vision_tower + rest
        else:
            mapping.unknown.append(key)
    return mapping


def _check_against_targets(mapping: KeyMapping, targets: Mapping[str, torch.Size], prefixes: TargetPrefixes,
                           tower_from_checkpoint: bool) -> None:
    """Every converted key must exist in the installed model, and every model key be provided."""
    parts = [mapping.language_model, mapping.projector] + ([mapping.vision_tower] if tower_from_checkpoint else [])
    mapped = {old: new for part in parts for old, new in part.items()}
    unknown = sorted(mapping.unknown + [old for old, new in mapped.items() if new not in targets])
    if unknown:
        raise ConversionError(
            f"the checkpoint has {len(unknown)} key(s) with no place in a LLaVA model: {_listing(unknown)}; "
            "this is not the LLaVA-Med v1.5 layout (LlavaMistralForCausalLM with an mlp2x_gelu projector)"
        )
    provided = set(mapped.values())
    missing = sorted(k for k in targets if k not in provided
                     and (tower_from_checkpoint or not k.startswith(prefixes.vision_tower)))
    projector = [k for k in missing if k.startswith(prefixes.projector)]
    if projector:
        raise ConversionError(
            f"the checkpoint lacks the projector weights {_listing(projector)} (model.mm_projector.0/2.weight/bias): "
            "a language-model-only checkpoint, or a projector saved apart (mm_projector.bin) that must be merged in"
        )
    if missing:
        raise ConversionError(f"the checkpoint lacks {len(missing)} weight(s): {_listing(missing)}")


def _listing(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def pad_vocabulary_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """`weight` with `rows` new rows, each the mean of the existing ones (computed in float32).

    For the LM head this makes a new token's logit the mean of the others: never the maximum.
    """
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(rows, -1)], dim=0)


# ----------------------------------------------------------------------------- tokenizer & images


def add_image_token(tokenizer) -> int:
    """Add `<image>` as one special, unnormalised token and return its id (the old vocabulary size)."""
    from transformers import AddedToken

    if IMAGE_TOKEN in tokenizer.get_vocab():
        raise ConversionError(f"the tokenizer already has {IMAGE_TOKEN!r}; LLaVA-Med v1.5's (Mistral's) does not")
    old_size = len(tokenizer)
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False, lstrip=False, rstrip=False)],
                         special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_id != old_size or len(tokenizer) != old_size + 1:
        raise RuntimeError(f"adding {IMAGE_TOKEN!r} gave id {image_id}, expected {old_size}")
    tokenizer.chat_template = CHAT_TEMPLATE
    return image_id


def _processor_output_size(processor) -> tuple[int, int]:
    size = processor.crop_size if processor.do_center_crop else processor.size
    if "height" in size:
        return int(size["height"]), int(size["width"])
    raise ConversionError(f"the image processor's output size is not fixed ({dict(size)}); a CLIP processor crops "
                          "to a fixed size")


# ----------------------------------------------------------------------------- conversion


@dataclass
class ConversionReport:
    """What `convert` did; written to the output folder as `llava_med_conversion.json`."""

    source: str
    vision_tower: str
    tower_weights: str
    dtype: str
    image_token_id: int
    original_vocab_size: int
    num_image_tokens: int
    mapped: dict[str, int]
    derived_buffers_not_copied: list[str]
    unused_checkpoint_tower: dict[str, Any] | None
    config_defaults_applied: dict[str, Any]
    config_training_only_fields_dropped: list[str]
    config_fields_ignored_by_request: list[str]
    differences: list[str]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str) + "\n"


def _load_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in folder.glob("*.bin"))
        raise ConversionError(
            f"{folder}: no safetensors weights" + (f" (found {', '.join(bins)}; only safetensors are read)" if bins
                                                   else "")
        )
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    if key in tensors:
                        raise ConversionError(f"{folder}: key {key} is in more than one shard")
                    tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise ConversionError(f"{path}: unreadable safetensors file ({e})") from e
    return tensors


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Mute transformers' load warnings where this module checks the same things itself (a full CLIP
    checkpoint's text half reported as unexpected; `llava_mistral` unknown to AutoConfig)."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _load_tower_parts(source: str, need_weights: bool):
    """(CLIPVisionConfig, CLIP image processor, CLIPVisionModel or None) of a local folder or hub id."""
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    try:
        vision = CLIPVisionConfig.from_pretrained(source)
        # The PIL processor: LLaVA-Med (transformers 4.36) resized with PIL.
        processor = CLIPImageProcessorPil.from_pretrained(source)
        model = None
        if need_weights:
            with _quiet_transformers():
                model, info = CLIPVisionModel.from_pretrained(source, dtype=torch.float32, output_loading_info=True)
    except OSError as e:
        raise ConversionError(
            f"cannot load the vision tower {source!r} ({type(e).__name__}: {str(e)[:300]}); offline, give "
            "--vision-tower a local folder holding its config.json and preprocessor_config.json (and its weights "
            "unless --tower-weights checkpoint)"
        ) from e
    if model is not None:
        # A full CLIP checkpoint also holds the text half: those keys are expected to be left out.
        stray = sorted(k for k in info["unexpected_keys"]
                       if not k.startswith(("text_model.", "text_projection", "visual_projection", "logit_scale")))
        bad = sorted(info["missing_keys"]) + sorted(k if isinstance(k, str) else k[0] for k in info["mismatched_keys"])
        if bad or stray:
            raise ConversionError(
                f"the vision tower {source!r} does not load as a complete CLIP vision model: missing or mismatched "
                f"{_listing(bad)}; unexpected {_listing(stray)}"
            )
    return vision, processor, model


def _tower_difference(checkpoint: dict[str, torch.Tensor], tower: dict[str, torch.Tensor]) -> dict[str, Any]:
    common = sorted(set(checkpoint) & set(tower))
    max_diff = 0.0
    for key in common:
        a, b = checkpoint[key].float(), tower[key].float()
        if a.shape != b.shape:
            return {"identical": False, "note": f"{key} has shape {tuple(a.shape)} vs {tuple(b.shape)}"}
        max_diff = max(max_diff, float((a - b).abs().max()) if a.numel() else 0.0)
    same_keys = set(checkpoint) == set(tower)
    return {"identical": same_keys and max_diff == 0.0, "max_abs_difference": max_diff, "same_keys": same_keys}


def convert(input_dir: str | Path, output_dir: str | Path, vision_tower: str | None = None,
            tower_weights: TowerWeights | str = TowerWeights.vision_tower, dtype: DtypeChoice | str = DtypeChoice.auto,
            ignore_config_fields: Iterable[str] = ()) -> ConversionReport:
    """Convert the LLaVA-Med v1.5 checkpoint in `input_dir` into a transformers LLaVA folder `output_dir`.

    `vision_tower` (default: the config's `mm_vision_tower`) gives the tower's config and image
    processor, and its weights unless `tower_weights` is `checkpoint` (then the checkpoint's own
    `model.vision_tower.*` weights are used). `dtype` `auto` keeps the checkpoint's language-model
    dtype. Raises `ConversionError` (a `PipelineError`) naming what is wrong.
    """
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from pipeline.reporting import write_folder

    input_dir, output_dir = Path(input_dir), Path(output_dir)
    tower_weights = TowerWeights(tower_weights)
    dtype = DtypeChoice(dtype)
    if not (input_dir / "config.json").is_file():
        raise ConversionError(f"{input_dir}: no config.json; give the folder of the original LLaVA-Med checkpoint")
    if output_dir.exists():
        raise ConversionError(f"{output_dir} exists; remove it or choose another --output")
    try:
        original_config = json.loads((input_dir / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{input_dir / 'config.json'}: not valid JSON ({e})") from e
    original = read_original_config(original_config, ignore_config_fields)
    settings = original.settings
    tower_source = vision_tower or settings.vision_tower

    tensors = _load_checkpoint(input_dir)
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(input_dir))
    except (OSError, ValueError) as e:
        raise ConversionError(
            f"{input_dir}: cannot load the tokenizer ({type(e).__name__}: {str(e)[:300]}); a folder with only "
            "tokenizer.model needs the `sentencepiece` package"
        ) from e
    embed = tensors.get("model.embed_tokens.weight")
    if embed is None:
        raise ConversionError(f"{input_dir}: the checkpoint lacks model.embed_tokens.weight")
    original_vocab = embed.shape[0]
    if len(tokenizer) != original_vocab or original.mistral["vocab_size"] != original_vocab:
        # LLaVA-Med's loader resizes the embeddings to the tokenizer's length; equal sizes make
        # that a no-op, anything else would change rows.
        raise ConversionError(
            f"the tokenizer has {len(tokenizer)} tokens, config.json says vocab_size {original.mistral['vocab_size']} "
            f"and model.embed_tokens.weight has {original_vocab} rows; they must agree"
        )
    target_dtype = embed.dtype if dtype is DtypeChoice.auto else getattr(torch, dtype.value)
    image_token_id = add_image_token(tokenizer)

    tower_in_checkpoint = any(k.startswith(_ORIGINAL_TOWER) for k in tensors)
    if tower_weights is TowerWeights.checkpoint and not tower_in_checkpoint:
        raise ConversionError("--tower-weights checkpoint, but the checkpoint holds no model.vision_tower.* weights")
    vision, processor, tower_model = _load_tower_parts(
        tower_source, need_weights=tower_weights is TowerWeights.vision_tower)
    if _processor_output_size(processor) != (vision.image_size, vision.image_size):
        raise ConversionError(
            f"the image processor of {tower_source!r} outputs {_processor_output_size(processor)} images, the tower "
            f"takes {vision.image_size}x{vision.image_size}"
        )
    config = llava_config(text_config(original.mistral, original_vocab + 1), vision, settings, image_token_id)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    targets = {k: v.shape for k, v in model.state_dict().items()}
    prefixes = target_prefixes(targets)
    mapping = map_checkpoint_keys(tensors, prefixes)
    use_checkpoint_tower = tower_weights is TowerWeights.checkpoint
    _check_against_targets(mapping, targets, prefixes, tower_from_checkpoint=use_checkpoint_tower)

    state: dict[str, torch.Tensor] = {}
    for part in (mapping.language_model, mapping.projector):
        for old, new in part.items():
            state[new] = tensors[old]
    if use_checkpoint_tower:
        state.update({new: tensors[old] for old, new in mapping.vision_tower.items()})
        unused_tower = None
    else:
        assert tower_model is not None
        own = tower_model.state_dict()
        own_prefix = _prefix_before(own, "embeddings.patch_embedding.weight")
        tower_state = {prefixes.vision_tower + k.removeprefix(own_prefix): v for k, v in own.items()}
        stray = sorted(k for k in tower_state if k not in targets)
        if stray:
            raise ConversionError(f"the vision tower {tower_source!r} has weights with no place in the LLaVA tower: "
                                  f"{_listing(stray)}")
        state.update(tower_state)
        unused_tower = None
        if mapping.vision_tower:
            saved = {new: tensors[old] for old, new in mapping.vision_tower.items()}
            unused_tower = {"keys": len(saved), **_tower_difference(saved, tower_state)}
    for key in (prefixes.language_model + "embed_tokens.weight", prefixes.lm_head):
        state[key] = pad_vocabulary_rows(state[key], 1)
    missing = sorted(set(targets) - set(state))
    if missing:
        raise ConversionError(f"no weights for {_listing(missing)}")
    mismatched = sorted(f"{k}: {tuple(v.shape)} vs {tuple(targets[k])}" for k, v in state.items()
                        if v.shape != targets[k])
    if mismatched:
        raise ConversionError(f"weights of the wrong shape for this config: {_listing(mismatched)}")
    model.load_state_dict({k: v.to(target_dtype) for k, v in state.items()}, strict=True, assign=True)
    model.config.dtype = target_dtype

    report = ConversionReport(
        source=str(input_dir),
        vision_tower=tower_source,
        tower_weights=tower_weights.value,
        dtype=str(target_dtype).removeprefix("torch."),
        image_token_id=image_token_id,
        original_vocab_size=original_vocab,
        num_image_tokens=config.image_seq_length,
        mapped={"language_model": len(mapping.language_model), "projector": len(mapping.projector),
                "vision_tower": len(mapping.vision_tower) if use_checkpoint_tower else 0},
        derived_buffers_not_copied=mapping.derived_buffers,
        unused_checkpoint_tower=unused_tower,
        config_defaults_applied=original.defaulted,
        config_training_only_fields_dropped=original.training_only,
        config_fields_ignored_by_request=original.ignored,
        differences=_differences(settings),
    )

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        processor.save_pretrained(folder)
        (folder / REPORT_FILE).write_text(report.to_json())

    write_folder(output_dir, write)
    return report


def _differences(settings: LlavaMedSettings) -> list[str]:
    notes = [
        f"{IMAGE_TOKEN} is a real token (one LM-head row, the mean of the others) where LLaVA-Med uses the "
        "placeholder id -200 outside the vocabulary: logits of the original tokens are unchanged; log-probabilities "
        "shift by at most log(1 + 1/V)",
    ]
    if settings.image_aspect_ratio == "pad":
        notes.append(
            "image_aspect_ratio pad: LLaVA-Med pads images to a square with the processor's mean colour before the "
            "CLIP resize and centre crop; the converted image processor alone does not (the pipeline does, from the "
            "config's image_aspect_ratio), so outside the pipeline a non-square image is centre-cropped unless the "
            "caller applies pipeline.models.families.pad_to_square first"
        )
    if settings.tokenizer_model_max_length:
        notes.append(
            f"LLaVA-Med truncates the spliced sequence to tokenizer_model_max_length "
            f"({settings.tokenizer_model_max_length}) tokens; the converted model does not truncate"
        )
    if settings.use_im_patch_token:
        notes.append(
            "mm_use_im_patch_token is true (or absent): LLaVA-Med's loader adds an unused <im_patch> token with a "
            "randomly initialised row; not reproduced"
        )
    return notes


# ----------------------------------------------------------------------------- CLI

app = typer.Typer(add_completion=False, help=__doc__.split("\n\n")[0], pretty_exceptions_show_locals=False)


@app.command(help="Convert a LLaVA-Med v1.5 checkpoint (original layout) into a transformers LLaVA folder.")
def main(
    input: Path = typer.Option(..., "--input", exists=True, file_okay=False,
                               help="the original checkpoint folder (config.json model_type llava_mistral)"),
    output: Path = typer.Option(..., "--output", help="the LLaVA folder to write (must not exist); under "
                                "models/base/ to use it as sft.model"),
    vision_tower: str | None = typer.Option(
        None, "--vision-tower", help="CLIP tower folder or hub id for the tower's config, image processor and "
        "(unless --tower-weights checkpoint) weights; default: the config's mm_vision_tower"),
    tower_weights: TowerWeights = typer.Option(
        TowerWeights.vision_tower, "--tower-weights", help="vision-tower: the --vision-tower weights, as "
        "LLaVA-Med's own loader does; checkpoint: the model.vision_tower.* weights saved in the checkpoint"),
    dtype: DtypeChoice = typer.Option(DtypeChoice.auto, "--dtype",
                                      help="dtype of the written weights; auto: the checkpoint's"),
    ignore_config_field: list[str] = typer.Option(
        [], "--ignore-config-field", help="a config.json field to leave out although the converter does not know "
        "it (repeatable)"),
) -> None:
    report = convert(input, output, vision_tower=vision_tower, tower_weights=tower_weights, dtype=dtype,
                     ignore_config_fields=ignore_config_field)
    typer.echo(f"convert_llava_med: wrote {output} ({report.mapped['language_model']} language-model, "
               f"{report.mapped['projector']} projector tensors; tower from {report.vision_tower} "
               f"[{report.tower_weights}]; {report.num_image_tokens} image tokens; dtype {report.dtype})")
    if report.unused_checkpoint_tower:
        typer.echo(f"  checkpoint tower weights not used (as by LLaVA-Med's loader): {report.unused_checkpoint_tower}")
    for note in report.differences:
        typer.echo(f"  differs from LLaVA-Med: {note}")
    typer.echo(f"  details: {output / REPORT_FILE}")


def run() -> None:
    """The CLI: an expected failure prints one line and exits with its code, without a traceback."""
    try:
        app()
    except PipelineError as error:
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        sys.exit(error.exit_code)


if __name__ == "__main__":
    run()


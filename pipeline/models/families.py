"""Model families: what differs between LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Gemma 3 and Idefics3 behind one `VLM`.

A `Family` says, for one architecture, where its parts are (the decoder that LoRA wraps, the
vision tower, the projector), which token stands for a visual feature, how images become the
`ImageBatch` the pipeline batches (and, for any-resolution families, how many visual tokens an
image of a given size becomes), how the vision tower turns that into one row of visual tokens per
image, and which positions every token gets, also when visual tokens are dropped. Stages and
library code call the `VLM`; only this module knows the family (docs/models.md § "Model
families").

What a dropped visual token means is the same for every family: it is masked out of attention in
every language-model layer, so no other token sees it. The families differ in the positions the
kept tokens get, each defined so that the masked view equals the model run with the dropped
tokens physically removed from the sequence and given those positions:

- LLaVA (1-D rotary positions): positions count attended tokens only (`position_ids_from_mask`),
  which is what the shortened sequence would get from the model itself.
- Qwen2-VL / Qwen2.5-VL (multimodal rotary positions, an image is a (1, h, w) grid): a kept
  visual token keeps its own (t, h, w) position, and text keeps the positions it has in the full
  view, so a dropped token leaves a hole instead of shifting its neighbours' spatial meaning.
  An image whose every token is dropped (the blind control) takes no positions at all: the text
  is then numbered exactly as the model numbers a prompt without the image.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from PIL import Image

from pipeline.models.image_batch import ImageBatch, pad_features
from pipeline.models.templates import (
    ContentStyle,
    content_style,
    processor_chat_template,
    tokenizer_renders_parts,
)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only attended tokens.

    With these, masking a token out of attention is exactly the same as deleting it from the
    sequence (rotary embeddings see the same relative distances), which is what makes
    attention-mask dropout equal to physical removal of visual tokens.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# `PromptSettings.image_size` for any-resolution families: each image at its own size.
NATIVE = "native"


def square_images(images: list[Image.Image], side: int) -> list[Image.Image]:
    """RGB copies resized to `side` x `side` (bicubic): one grid, one visual-token count for all."""
    return [im.convert("RGB").resize((side, side), Image.Resampling.BICUBIC) for im in images]


def pad_to_square(image: Image.Image, image_mean: Iterable[float]) -> Image.Image:
    """LLaVA-Med's `image_aspect_ratio: pad`: the image centred on a square of the mean colour.

    The colour is `int(255 * m)` per channel of the image processor's `image_mean` (for a
    grey-scale image, of their average). LLaVA-Med's `process_images` places the image at a
    random offset of `d // 2` or `d // 2 + 1` pixels (d: side difference); this uses `d // 2`,
    as upstream LLaVA does. An L image is padded with a grey, as LLaVA-Med pads the grey-scale
    files it opens; the pipeline decodes every image to RGB (`decode_image`), so there a
    grey-scale file gets the RGB mean colour.
    """
    if image.mode not in ("L", "RGB"):
        raise ValueError(f"pad_to_square takes an L or RGB image, got mode {image.mode!r}; convert it first")
    mean = list(image_mean)
    width, height = image.size
    if width == height:
        return image
    colour: int | tuple[int, ...]
    if image.mode == "L":
        colour = int(255 * sum(mean) / len(mean))
    else:
        colour = tuple(int(m * 255) for m in mean)
    side = max(width, height)
    square = Image.new(image.mode, (side, side), colour)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def refuse_vision_mask(family: str, vision_attention_mask: torch.Tensor | None) -> None:
    """The `patch` and `latent` strategies mask a single-view CLIP tower's attention; refuse them."""
    if vision_attention_mask is not None:
        raise NotImplementedError(f"{family}: masking the vision tower's attention is implemented for single-view "
                                  "CLIP towers only; use sample.mask_strategy token")


class Family:
    """One model family. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    # Module names (as bitsandbytes' `llm_int8_skip_modules` matches them) kept in full precision
    # when the language model is loaded in 4 bits (QLoRA): the vision side and the LM head.
    full_precision_modules: ClassVar[tuple[str, ...]] = ("vision_tower", "multi_modal_projector", "lm_head")
    # The token an instruction-tuned model ends a turn with, where it is not the tokenizer's EOS
    # (used when the vocabulary has it); None: the EOS.
    end_of_turn_token: ClassVar[str | None] = None
    # crop (`pixel`) and vision-attention (`patch`, `latent`) mask strategies need a CLIP tower
    # on (B, C, H, W) pixels; families without one support the `token` strategy only.
    supports_vision_masks: ClassVar[bool] = False
    # Whether an image's visual tokens follow its size (any resolution): prompts then need the
    # image (`VLM.prompt_ids(..., image=...)`), and a batch's images may differ in tokens.
    variable_image_tokens: bool = False
    # Whether `image_size: native` (each image at its own size) applies.
    takes_native_resolution: ClassVar[bool] = False

    def __init__(self, model: torch.nn.Module, image_processor: Any, image_size: int | str | None = None,
                 processor: Any | None = None) -> None:
        if image_size == NATIVE and not self.takes_native_resolution:
            raise ValueError(f"{self.name}: image_size 'native' is for any-resolution families (LLaVA-NeXT, Qwen2-VL); "
                             "this family processes every image at one size")
        self.model = model
        self.image_processor = image_processor
        self.image_size = image_size
        self.processor = processor

    # ----- parts
    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.language_model

    @language_model.setter
    def language_model(self, module: torch.nn.Module) -> None:
        self.model.model.language_model = module

    @property
    def vision_tower(self) -> torch.nn.Module:
        raise NotImplementedError

    @property
    def projector(self) -> torch.nn.Module:
        raise NotImplementedError

    # ----- prompts
    def image_token(self, tokenizer: Any, processor: Any | None) -> str:
        """The placeholder token that stands for one visual feature in the prompt."""
        return "<image>"

    def uses_processor(self, tokenizer_renders_text: bool) -> bool:
        """Whether prompts are built by the family's processor (typed-part chat template and its
        expansion of the image token) rather than the tokenizer's plain-string template."""
        return not tokenizer_renders_text

    def load_processor(self, source: str) -> Any:
        """The family's multimodal processor for a checkpoint (folder or hub id)."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(source)

    def content_style(self, tokenizer: Any, processor: Any | None) -> ContentStyle:
        """How prompts are rendered (`pipeline.models.templates`); `ValueError` saying what to add
        when the checkpoint has no usable template."""
        return content_style(tokenizer, processor, prefer_processor=processor is not None)

    def render_prompt(self, tokenizer: Any, processor: Any | None, messages: list[dict[str, Any]],
                      style: ContentStyle, image_size: tuple[int, int] | None = None) -> list[int]:
        """Token ids of the chat-formatted `messages` with the generation prompt, the image token
        expanded to one per visual token (of an image of `image_size`, (height, width), for
        families with `variable_image_tokens`)."""
        if style == "parts":
            text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            # The expansion depends only on the image's size.
            return [int(i) for i in processor(images=[self.prompt_image(image_size)], text=[text])["input_ids"][0]]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer.encode(text, add_special_tokens=False)

    def prompt_image(self, image_size: tuple[int, int] | None = None) -> Image.Image:
        """A blank image for the processor to expand the image token for, which depends only on
        the image's size: the one size every image is processed at, or `image_size` (height,
        width) for families with `variable_image_tokens`."""
        raise NotImplementedError

    def image_token_count(self, image_size: tuple[int, int]) -> int:
        """Visual tokens of an image of `image_size` (height, width); families with
        `variable_image_tokens` only."""
        raise NotImplementedError(f"{self.name}: every image has the same visual tokens")

    def default_image_tokens(self, processor: Any | None = None) -> int:
        """Visual tokens per image of a checkpoint made elsewhere (no `medalign.json`)."""
        raise NotImplementedError

    # ----- images
    def pixel_values(self, images: list[Image.Image], image_tokens: int) -> ImageBatch:
        """The batch's processed images; `image_tokens`: every image's visual tokens (families
        with `variable_image_tokens` count their own)."""
        sizes = torch.tensor([[im.height, im.width] for im in images], dtype=torch.long).reshape(len(images), 2)
        return ImageBatch(self.processed_pixels(images), sizes, torch.full((len(images),), image_tokens))

    def processed_pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """(B, ...) one processed tensor per image, all of one shape."""
        raise NotImplementedError

    def image_features(self, images: ImageBatch,
                       vision_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, visual tokens, hidden) projected visual tokens of `images` (rows past an image's
        `token_counts` are zero where images differ in tokens)."""
        raise NotImplementedError

    def end_of_turn_id(self, tokenizer: Any) -> int:
        """The token an answer ends with, which the model learns to emit and decoding stops at:
        `end_of_turn_token` where the vocabulary has it, else the tokenizer's EOS."""
        if self.end_of_turn_token is not None:
            token = tokenizer.convert_tokens_to_ids(self.end_of_turn_token)
            if token is not None and token != tokenizer.unk_token_id:
                return int(token)
        return int(tokenizer.eos_token_id)

    # ----- positions and attention
    def position_ids(self, attention_mask: torch.Tensor, image_mask: torch.Tensor | None,
                     image_layout: ImageBatch | None = None) -> torch.Tensor:
        """Position ids of a (B, T) batch whose attention mask may drop visual tokens
        (`image_layout`: the batch's images, one per row, for families whose positions follow
        each image's grid)."""
        return position_ids_from_mask(attention_mask)

    def forward_kwargs(self, image_mask: torch.Tensor | None, prefill: bool) -> dict[str, Any]:
        """Extra arguments of the model's forward for a batch with visual tokens at `image_mask`
        (`prefill`: the forward sees the whole prompt, not a decoding step on a cache)."""
        return {}


class LlavaFamily(Family):
    """LLaVA-1.5 (`LlavaForConditionalGeneration`): the `tiny` and `demo` profiles, llava-hf
    checkpoints and converted LLaVA-Med. A fixed number of visual tokens per image, 1-D positions."""

    name = "llava"
    model_types = ("llava",)
    supports_vision_masks = True

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.model.vision_tower

    @property
    def projector(self) -> torch.nn.Module:
        return self.model.model.multi_modal_projector

    def prompt_image(self, image_size: tuple[int, int] | None = None) -> Image.Image:
        ip = self.image_processor
        size = dict(ip.crop_size if getattr(ip, "do_center_crop", False) else ip.size)
        side = size.get("height") or size.get("shortest_edge")
        if not side:
            raise ValueError(f"the image processor's output size is not fixed ({size})")
        return Image.new("RGB", (int(size.get("width") or side), int(side)))

    def tower_view(self, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
        """(left, top, width, height): the part of an image of `image_size` (width, height), in its
        pixels, that the tower's square patch grid covers: the padded square for
        `image_aspect_ratio: pad` (reaching past the image), the centred square the processor's
        shortest-edge resize and centre crop keep, or the whole image for a processor that
        resizes to a fixed size without cropping."""
        width, height = image_size
        if getattr(self.model.config, "image_aspect_ratio", None) == "pad":
            side = max(width, height)
            return -((side - width) // 2), -((side - height) // 2), side, side
        ip = self.image_processor
        if getattr(ip, "do_center_crop", False) and (dict(ip.size).get("shortest_edge")):
            side = min(width, height)
            return (width - side) // 2, (height - side) // 2, side, side
        return 0, 0, width, height

    def default_image_tokens(self, processor: Any | None = None) -> int:
        vision = self.model.config.vision_config
        n = (vision.image_size // vision.patch_size) ** 2
        if getattr(self.model.config, "vision_feature_select_strategy", "default") == "full":
            n += 1
        return n

    def processed_pixels(self, images: list[Image.Image]) -> torch.Tensor:
        # LLaVA's `process_images`: `image_aspect_ratio: pad` (LLaVA-Med v1.5, kept in a converted
        # config) pads to a square of the mean colour before the processor's resize and crop.
        aspect = getattr(self.model.config, "image_aspect_ratio", None)
        if aspect == "pad":
            mean = self.image_processor.image_mean
            images = [pad_to_square(im if im.mode in ("L", "RGB") else im.convert("RGB"), mean) for im in images]
        elif aspect == "anyres":
            raise NotImplementedError(f"{self.name}: image_aspect_ratio 'anyres' is LLaVA-NeXT's; load the model as "
                                      "LlavaNextForConditionalGeneration (model_type llava_next)")
        return self.image_processor([im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]

    def image_features(self, images: ImageBatch,
                       vision_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        extra = {} if vision_attention_mask is None else {"attention_mask": vision_attention_mask}
        out = self.model.get_image_features(pixel_values=images.pixels, return_dict=True, **extra)
        features = out.pooler_output
        if isinstance(features, (list, tuple)):
            features = torch.stack(list(features))
        return features


class Qwen2VLFamily(Family):
    """Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`,
    `Qwen2_5_VLForConditionalGeneration`): the base of Lingshu and HuatuoGPT-Vision.

    By default every image is resized to one square side (`PromptSettings.image_size`, a multiple
    of the patch size times the merge size) before the family's own image processor, so every
    image has the same (1, h, w) grid and the same number of visual tokens. With `image_size:
    native` each image keeps Qwen's native dynamic resolution: the processor resizes it within its
    `min_pixels` / `max_pixels` keeping its aspect, its grid and visual tokens follow, and the
    positions of a batch are computed from each row's image grid (docs/models.md).
    """

    name = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    takes_native_resolution = True
    full_precision_modules = ("visual", "lm_head")
    # The side used for a checkpoint made elsewhere: 448 px, 16 x 16 = 256 visual tokens.
    DEFAULT_SIDE: ClassVar[int] = 448

    def __init__(self, model: torch.nn.Module, image_processor: Any, image_size: int | str | None = None,
                 processor: Any | None = None) -> None:
        super().__init__(model, image_processor, image_size, processor)
        vision = model.config.vision_config
        self.patch_size = int(vision.patch_size)
        self.merge_size = int(vision.spatial_merge_size)
        self.factor = self.patch_size * self.merge_size
        self._token_grids: dict[tuple[int, int], tuple[int, int]] = {}
        self.variable_image_tokens = self.image_size == NATIVE
        if self.variable_image_tokens:
            self.image_size = None  # each image its own
            self.llm_grid = None
            return
        if self.image_size is None:
            self.image_size = self.default_side()
        if self.image_size % self.factor:
            raise ValueError(f"{self.name}: image_size {self.image_size} is not a multiple of patch size x merge size "
                             f"({self.factor})")
        self.llm_grid = self.image_size // self.factor  # visual tokens per side
        self.grid_thw = torch.tensor([1, self.llm_grid * self.merge_size, self.llm_grid * self.merge_size])

    def default_side(self) -> int:
        """448 px, or the largest multiple of the factor the processor's `max_pixels` allows."""
        size = getattr(self.image_processor, "size", None) or {}
        max_pixels = size.get("longest_edge") or getattr(self.image_processor, "max_pixels", None)
        side = self.DEFAULT_SIDE
        if max_pixels:
            side = min(side, math.isqrt(int(max_pixels)) // self.factor * self.factor)
        return max(side, self.factor)

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.model.visual

    @property
    def projector(self) -> torch.nn.Module:
        return self.model.model.visual.merger

    def image_token(self, tokenizer: Any, processor: Any | None) -> str:
        return getattr(processor, "image_token", None) or "<|image_pad|>"

    def uses_processor(self, tokenizer_renders_text: bool) -> bool:
        # Qwen2VLProcessor cannot be built without torchvision (its video half), which has no CPU
        # build this project can install; the tokenizer carries the same chat template, and the
        # processor's one step on top of it, the image token's expansion, is `render_prompt`'s.
        return False

    def content_style(self, tokenizer: Any, processor: Any | None) -> ContentStyle:
        # Qwen's template renders plain strings too, but only typed parts get the
        # <|vision_start|><|image_pad|><|vision_end|> block the model was trained on.
        if not tokenizer_renders_parts(tokenizer):
            raise ValueError(f"{self.name}: the tokenizer has no chat template that renders typed parts "
                             "({'type': 'image'}); add the model's chat_template to tokenizer_config.json "
                             "or as chat_template.jinja")
        return "parts"

    def render_prompt(self, tokenizer: Any, processor: Any | None, messages: list[dict[str, Any]],
                      style: ContentStyle, image_size: tuple[int, int] | None = None) -> list[int]:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        token = self.image_token(tokenizer, processor)
        # Qwen2VLProcessor.replace_image_token: one token per merged patch of the image's grid.
        count = self.image_token_count(image_size) if self.variable_image_tokens else self.default_image_tokens()
        text = text.replace(token, token * count)
        return [int(i) for i in tokenizer(text)["input_ids"]]

    def prompt_image(self, image_size: tuple[int, int] | None = None) -> Image.Image:
        if self.variable_image_tokens:
            height, width = image_size or (self.DEFAULT_SIDE, self.DEFAULT_SIDE)
            return Image.new("RGB", (width, height))
        return Image.new("RGB", (self.image_size, self.image_size))

    def default_image_tokens(self, processor: Any | None = None) -> int:
        if self.variable_image_tokens:  # for information: a DEFAULT_SIDE square's
            return self.image_token_count((self.DEFAULT_SIDE, self.DEFAULT_SIDE))
        return self.llm_grid ** 2

    def token_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(rows, columns) of visual tokens of an image of `image_size` (height, width) at native
        resolution: the image processor's grid for that size, merged (cached per size)."""
        size = (int(image_size[0]), int(image_size[1]))
        if size not in self._token_grids:
            grid = self.image_processor(images=[self.prompt_image(size)], return_tensors="pt")["image_grid_thw"][0]
            self._token_grids[size] = (int(grid[1]) // self.merge_size, int(grid[2]) // self.merge_size)
        return self._token_grids[size]

    def image_token_count(self, image_size: tuple[int, int]) -> int:
        rows, columns = self.token_grid(image_size)
        return rows * columns

    def processed_pixels(self, images: list[Image.Image]) -> torch.Tensor:
        side = self.image_size
        out = self.image_processor(images=square_images(images, side), return_tensors="pt")
        grids = out["image_grid_thw"]
        if not bool((grids == self.grid_thw).all()):
            raise ValueError(f"{self.name}: the image processor made grids {grids.tolist()} for {side} px images, "
                             f"expected {self.grid_thw.tolist()}: its min_pixels / max_pixels exclude {side}x{side}")
        pixels = out["pixel_values"]
        return pixels.reshape(len(images), -1, pixels.shape[-1])

    def pixel_values(self, images: list[Image.Image], image_tokens: int) -> ImageBatch:
        if not self.variable_image_tokens:
            return super().pixel_values(images, image_tokens)
        out = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        grids = out["image_grid_thw"]  # (B, 3): t, h, w in patches
        pixels = pad_features(out["pixel_values"].split(grids.prod(-1).tolist()))
        sizes = grids[:, 1:] * self.patch_size  # the processed image, in pixels
        return ImageBatch(pixels, sizes.long(), (grids.prod(-1) // self.merge_size ** 2).long())

    def image_features(self, images: ImageBatch,
                       vision_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        refuse_vision_mask(self.name, vision_attention_mask)
        pixel_values = images.pixels
        n = pixel_values.shape[0]
        if not self.variable_image_tokens:
            grid = self.grid_thw.to(pixel_values.device).repeat(n, 1)
            flat = pixel_values.reshape(-1, pixel_values.shape[-1])
        else:
            patch_grid = images.sizes // self.patch_size
            grid = torch.cat([torch.ones(n, 1, dtype=torch.long), patch_grid], dim=1).to(pixel_values.device)
            flat = torch.cat([pixel_values[b, : int(grid[b].prod())] for b in range(n)])
        out = self.model.model.get_image_features(pixel_values=flat, image_grid_thw=grid, return_dict=True)
        return pad_features(list(out.pooler_output))

    def row_grids(self, image_mask: torch.Tensor, image_layout: ImageBatch | None) -> list[tuple[int, int]]:
        """(rows, columns) of visual tokens of each batch row's images: the one square grid, or at
        native resolution row b's image's (`image_layout`, one image per row)."""
        if not self.variable_image_tokens:
            return [(self.llm_grid, self.llm_grid)] * image_mask.shape[0]
        if image_layout is None or len(image_layout) != image_mask.shape[0]:
            raise ValueError(f"{self.name}: at native resolution positions follow each image's grid; pass the "
                             "batch's images (image_layout, one per row)")
        return [(int(h) // self.factor, int(w) // self.factor) for h, w in image_layout.sizes.tolist()]

    def position_ids(self, attention_mask: torch.Tensor, image_mask: torch.Tensor | None,
                     image_layout: ImageBatch | None = None) -> torch.Tensor:
        """(3, B, T) temporal / height / width positions (module docstring).

        A run of `image_mask` tokens holds whole images of a row's grid (h x w tokens in
        row-major order: one square for all rows, or at native resolution each row's image's,
        from `image_layout`); its first token is at p, token (i, j) gets (p, p + i, p + j), and the
        text after it starts at p + max(h, w), as Qwen's `get_rope_index` numbers it. An image
        with no attended token takes no positions. Masked tokens' positions are never read.
        """
        if image_mask is None:
            raise ValueError(f"{self.name}: positions depend on where the visual tokens are; pass image_mask "
                             "(or position_ids)")
        batch, length = attention_mask.shape
        device = attention_mask.device
        attended = attention_mask.bool()
        grids = self.row_grids(image_mask, image_layout)
        # Each token's advance of the running position: 1 per attended text token, plus an
        # image's extent after its last token when any of it is attended.
        step = (attended & ~image_mask).long()
        starts: list[tuple[int, int]] = []  # (row, first column) of every image
        for b in range(batch):
            per_image, extent = grids[b][0] * grids[b][1], max(grids[b])
            columns = image_mask[b].nonzero().squeeze(-1).tolist()
            if len(columns) % per_image:
                raise ValueError(f"{self.name}: row {b} has {len(columns)} visual tokens, not a multiple of "
                                 f"{per_image} per image")
            for first in columns[::per_image]:
                if columns[columns.index(first) + per_image - 1] != first + per_image - 1:
                    raise ValueError(f"{self.name}: row {b}'s visual tokens of one image are not contiguous")
                starts.append((b, first))
                if attended[b, first:first + per_image].any():
                    step[b, first + per_image - 1] += extent
        before = step.cumsum(-1) - step  # the running position at each token
        positions = before.unsqueeze(0).repeat(3, 1, 1)
        for b, first in starts:
            height, width = grids[b]
            rows = torch.arange(height, device=device).repeat_interleave(width)
            cols = torch.arange(width, device=device).repeat(height)
            p = before[b, first]
            span = slice(first, first + height * width)
            positions[0, b, span] = p
            positions[1, b, span] = p + rows
            positions[2, b, span] = p + cols
        return positions


class Gemma3Family(LlavaFamily):
    """Gemma 3 (`Gemma3ForConditionalGeneration`): the base of MedGemma. A SigLIP tower pooled to
    `mm_tokens_per_image` visual tokens, the prompt built by `Gemma3Processor` (its template and
    its `<start_of_image>` block), 1-D positions as LLaVA's.

    Gemma 3 lets an image's tokens attend to each other both ways (`token_type_ids`), which the
    forward gets on every prefill; a dropped visual token is masked as a key for all of them.
    Its local layers attend within a window of token indices, not positions, so masking equals
    removal only while a sequence with dropped tokens is shorter than `sliding_window` (1,024 in
    the released models); longer ones are refused.
    """

    name = "gemma3"
    model_types = ("gemma3",)
    supports_vision_masks = False
    end_of_turn_token = "<end_of_turn>"  # the instruction-tuned models' turn end, not <eos>

    def image_token(self, tokenizer: Any, processor: Any | None) -> str:
        # Gemma3Processor's `image_token` is <start_of_image>, what the template writes; the
        # placeholder of each visual token is the tokenizer's <image_soft_token>.
        return getattr(tokenizer, "image_token", None) or "<image_soft_token>"

    def uses_processor(self, tokenizer_renders_text: bool) -> bool:
        # Gemma's template renders plain strings too, but only the processor writes the image block.
        return True

    def default_image_tokens(self, processor: Any | None = None) -> int:
        return int(self.model.config.mm_tokens_per_image)


    def position_ids(self, attention_mask: torch.Tensor, image_mask: torch.Tensor | None,
                     image_layout: ImageBatch | None = None) -> torch.Tensor:
        window = getattr(self.model.config.get_text_config(), "sliding_window", None)
        if window and attention_mask.shape[1] > window:
            attended = attention_mask.bool()
            after_first = attended.long().cumsum(-1) > 0
            before_last = attended.flip(-1).long().cumsum(-1).flip(-1) > 0
            if bool((~attended & after_first & before_last).any()):
                raise ValueError(f"{self.name}: a sequence of {attention_mask.shape[1]} tokens with dropped tokens inside "
                                 f"is longer than the sliding window ({window}), where masking is not removal")
        return position_ids_from_mask(attention_mask)

    def forward_kwargs(self, image_mask: torch.Tensor | None, prefill: bool) -> dict[str, Any]:
        if image_mask is None or not prefill:
            return {}
        return {"token_type_ids": image_mask.long()}


class Idefics3Family(LlavaFamily):
    """Idefics3 (`Idefics3ForConditionalGeneration`): a SigLIP tower, a pixel-shuffle connector, a
    Llama. The prompt is `Idefics3Processor`'s (`<fake_token_around_image><global-img>`, then
    `image_seq_len` image tokens). Images are not split into tiles (`do_image_splitting` off):
    every image is resized to one `max_image_size` square, so every image has the same tokens.

    SmolVLM is the same architecture (`SmolVLMFamily`).
    """

    name = "idefics3"
    model_types = ("idefics3",)
    full_precision_modules = ("vision_model", "connector", "lm_head")
    end_of_turn_token = "<end_of_utterance>"
    supports_vision_masks = False

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.text_model

    @language_model.setter
    def language_model(self, module: torch.nn.Module) -> None:
        self.model.model.text_model = module

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.model.vision_model

    @property
    def projector(self) -> torch.nn.Module:
        return self.model.model.connector

    def uses_processor(self, tokenizer_renders_text: bool) -> bool:
        return True

    def render_prompt(self, tokenizer: Any, processor: Any | None, messages: list[dict[str, Any]],
                      style: ContentStyle, image_size: tuple[int, int] | None = None) -> list[int]:
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        out = processor(images=[self.prompt_image(image_size)], text=[text], do_image_splitting=False)
        return [int(i) for i in out["input_ids"][0]]

    def prompt_image(self, image_size: tuple[int, int] | None = None) -> Image.Image:
        side = int(self.image_processor.max_image_size["longest_edge"])
        return Image.new("RGB", (side, side))

    def default_image_tokens(self, processor: Any | None = None) -> int:
        config = self.model.config
        patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
        return patches // config.scale_factor ** 2


    def processed_pixels(self, images: list[Image.Image]) -> torch.Tensor:
        out = self.image_processor([[im.convert("RGB")] for im in images], do_image_splitting=False,
                                   return_tensors="pt")
        return out["pixel_values"]  # (B, 1 image, C, side, side)


class SmolVLMFamily(Idefics3Family):
    """SmolVLM (`SmolVLMForConditionalGeneration`): Idefics3's architecture, parts and prompt for
    one image. `SmolVLMProcessor` cannot be built without torchvision (its video processor needs
    it), so the prompt is built by `Idefics3Processor` over the checkpoint's own tokenizer, image
    processor (`SmolVLMImageProcessorPil`) and chat template: for an image that is not split,
    both processors expand `<image>` to `<fake_token_around_image><global-img>`, `image_seq_len`
    image tokens and `<fake_token_around_image>` (tests/test_families.py checks it against
    SmolVLM's own `get_image_prompt_string`). A saved model keeps that processor's
    `processor_config.json` (`Idefics3Processor`)."""

    name = "smolvlm"
    model_types = ("smolvlm",)

    def load_processor(self, source: str) -> Any:
        from transformers import AutoTokenizer, Idefics3Processor

        tokenizer = AutoTokenizer.from_pretrained(source)
        template = tokenizer.chat_template or processor_chat_template(source)
        # image_seq_len is a property of the model (patches / scale_factor²), which the processor's
        # config repeats; taking it from the model cannot disagree with the visual features.
        return Idefics3Processor(image_processor=self.image_processor, tokenizer=tokenizer,
                                 image_seq_len=self.default_image_tokens(), chat_template=template)


class LlavaNextFamily(LlavaFamily):
    """LLaVA-NeXT (`LlavaNextForConditionalGeneration`, "any resolution"): an image is a base view
    plus tiles at the best of `image_grid_pinpoints`, packed with a newline feature per row, so its
    visual tokens follow its size. Each image keeps its own size (`variable_image_tokens`): its
    prompt is `LlavaNextProcessor`'s expansion for that size, and a batch pads the tiles of its
    images to the most any has, as the processor does. `PromptSettings.image_size`, when set,
    resizes every image to that square first instead (one count for all). 1-D positions as LLaVA's.
    """

    name = "llava_next"
    model_types = ("llava_next",)
    supports_vision_masks = False
    variable_image_tokens = True
    takes_native_resolution = True

    def __init__(self, model: torch.nn.Module, image_processor: Any, image_size: int | str | None = None,
                 processor: Any | None = None) -> None:
        super().__init__(model, image_processor, image_size, processor)
        if self.image_size == NATIVE:  # the default: each image its own size
            self.image_size = None
        self._token_counts: dict[tuple[int, int], int] = {}

    def uses_processor(self, tokenizer_renders_text: bool) -> bool:
        return True

    def processed_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """The (height, width) the processor sees for an image of `image_size`."""
        return (self.image_size, self.image_size) if self.image_size else image_size

    def crop_side(self) -> int:
        crop = getattr(self.image_processor, "crop_size", None) or {}
        return int(crop.get("height") or self.image_processor.size["shortest_edge"])

    def prompt_image(self, image_size: tuple[int, int] | None = None) -> Image.Image:
        height, width = self.processed_size(image_size or (self.crop_side(),) * 2)
        return Image.new("RGB", (width, height))

    def image_token_count(self, image_size: tuple[int, int]) -> int:
        """The processor's expansion of the image token for an image of that size (cached per size)."""
        size = self.processed_size(tuple(int(v) for v in image_size))
        if size not in self._token_counts:
            self._token_counts[size] = self._expanded_tokens(self.processor, size)
        return self._token_counts[size]

    def _expanded_tokens(self, processor: Any | None, size: tuple[int, int]) -> int:
        if processor is None:
            raise ValueError(f"{self.name}: the visual-token count comes from the processor's expansion")
        ids = processor(images=[self.prompt_image(size)], text=[processor.image_token])["input_ids"][0]
        return sum(1 for i in ids if int(i) == int(self.model.config.image_token_id))

    def default_image_tokens(self, processor: Any | None = None) -> int:
        """The visual tokens of a crop-size square image (a reference count: each image has its own)."""
        return self._expanded_tokens(processor, self.processed_size((self.crop_side(),) * 2))

    def pixel_values(self, images: list[Image.Image], image_tokens: int) -> ImageBatch:
        images = [im.convert("RGB") for im in images]
        if self.image_size:
            images = square_images(images, self.image_size)
        out = self.image_processor(images, return_tensors="pt")  # tiles padded to the batch's most
        sizes = torch.as_tensor(out["image_sizes"], dtype=torch.long).reshape(len(images), 2)
        counts = torch.tensor([self.image_token_count((h, w)) for h, w in sizes.tolist()], dtype=torch.long)
        return ImageBatch(out["pixel_values"], sizes, counts)

    def image_features(self, images: ImageBatch,
                       vision_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        refuse_vision_mask(self.name, vision_attention_mask)
        out = self.model.get_image_features(pixel_values=images.pixels,
                                            image_sizes=images.sizes.to(images.pixels.device), return_dict=True)
        features = list(out.pooler_output)
        counts = [f.shape[0] for f in features]
        if counts != images.token_counts.tolist():
            raise ValueError(f"{self.name}: the model made {counts} visual tokens, the processor's expansion "
                             f"{images.token_counts.tolist()}")
        return pad_features(features)


FAMILIES: tuple[type[Family], ...] = (LlavaFamily, LlavaNextFamily, Qwen2VLFamily, Gemma3Family, Idefics3Family,
                                      SmolVLMFamily)


def family_class(model_type: str | None) -> type[Family]:
    """The family of a config's `model_type`; a clear error for any other."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise NotImplementedError(
        f"model_type {model_type!r} has no adapter yet; supported: {supported} (docs/models.md § Model families)"
    )


def family_for(model: torch.nn.Module, image_processor: Any, image_size: int | str | None = None,
               processor: Any | None = None) -> Family:
    """The family of a loaded model, by its config's `model_type`; a clear error for any other."""
    return family_class(getattr(model.config, "model_type", None))(model, image_processor, image_size, processor)

"""MMedPO §3.1's visual dispreference: the chosen answer paired with a degraded image x*.

MMedPO adds noise to the lesion region h of each image (eq. 2, a diffusion forward step inside
the region only):

    x* = √ξ̄_k · (x ⊙ h) + √(1 − ξ̄_k) · (ε ⊙ h) + x ⊙ (1 − h),   ε ~ N(0, I)

and takes (x, y) as preferred over (x*, y): the same ground-truth answer, but an image whose
critical region the model can no longer read. Its Table 4 ablation noises the whole image
instead (h = 1 everywhere, `mode: global`).

- **The schedule.** ξ̄_k is the cumulative product of VCD's sigmoid schedule over 1,000 steps
  (β from 1e-5 to 5e-3; the `add_diffusion_noise` of VCD and POVID, which MMedPO's code base
  descends from), at `noise_step` k. The image is scaled to [−1, 1] before the step and back to
  uint8 after it (clipped), so x* is an ordinary PNG in the artifact, not a float tensor.
- **Where the lesion is** (`localizer`). MMedPO asks MedKLIP for a heatmap of "disease"; no such
  tool ships offline, so the region comes from, in order:
  1. the dataset's own annotation (`auto`): the phantom benchmark records every lesion it draws,
     and `prepare` accepts a mask image or boxes per question for your files (SLAKE ships both);
     `prepare` writes them to `data/prepared/lesions.parquet`;
  2. else a saliency map of the SFT model itself (`auto` without an annotation, or `saliency`
     always): gradient × input of log p(answer | image, question) on each visual token, whose
     largest-magnitude `saliency_fraction` of tokens are the region (their patches, on the
     tower's patch grid). Its confidence s_v, which MMedPO takes from the visual tool, is the
     share of the attribution mass those tokens carry.
  An annotation has confidence 1; `score` normalizes the confidences into weights as it does the
  judges' scores. The localizer is a seam: `Localizer` is any callable from rows to regions.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from pipeline.batching import answer_logprobs, collate_sequences
from pipeline.data.images import decode_image
from pipeline.models.vlm import VLM
from pipeline.params import Config

SCHEDULE_STEPS = 1000


class VisualDispreferenceConfig(Config):
    """`sample.visual_dispreference`: MMedPO §3.1's noisy-image dispreference (docs/sampling.md)."""

    mode: Literal["none", "lesion", "global"] = Field(
        description="none | lesion: noise on the lesion region (MMedPO) | global: on the whole image (its ablation)")
    localizer: Literal["auto", "saliency"] = Field(
        description="lesion only: auto = the dataset's annotation, else the SFT model's saliency; saliency = always it")
    noise_step: int = Field(ge=0, lt=SCHEDULE_STEPS, description="k of MMedPO eq. 2 on VCD's 1,000-step schedule")
    saliency_fraction: float = Field(gt=0.0, le=1.0, description="saliency: share of the visual tokens (patches) noised")
    batch_size: int = Field(ge=1, description="entries per saliency batch (one forward and backward pass)")


def alpha_bar(noise_step: int) -> float:
    """ξ̄_k: the share of the signal's variance left after k steps of VCD's sigmoid schedule."""
    betas = torch.sigmoid(torch.linspace(-6, 6, SCHEDULE_STEPS, dtype=torch.float64)) * (0.5e-2 - 1e-5) + 1e-5
    return float(torch.cumprod(1 - betas, dim=0)[noise_step])


def add_region_noise(image: bytes | Image.Image, region: np.ndarray, noise_step: int, seed: int) -> bytes:
    """x* of MMedPO eq. 2 as PNG bytes: `region` (H, W), 1 inside h and 0 outside, at the image's size."""
    pil = image if isinstance(image, Image.Image) else decode_image(image)
    x = np.asarray(pil.convert("RGB"), dtype=np.float64) / 127.5 - 1.0
    if region.shape != x.shape[:2]:
        raise ValueError(f"region of shape {region.shape} for an image of {x.shape[:2]}")
    h = region.astype(np.float64)[..., None]
    eps = np.random.default_rng(seed).standard_normal(x.shape)
    a = alpha_bar(noise_step)
    noisy = math.sqrt(a) * x * h + math.sqrt(1 - a) * eps * h + x * (1 - h)
    pixels = np.clip(np.rint((noisy + 1.0) * 127.5), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def region_from_mask(mask_png: bytes, size: tuple[int, int]) -> np.ndarray:
    """A stored lesion mask (nonzero = lesion) as a 0/1 array of `size` (width, height)."""
    mask = Image.open(io.BytesIO(mask_png)).convert("L")
    if mask.size != size:
        mask = mask.resize(size, Image.NEAREST)
    return (np.asarray(mask) > 0).astype(np.float64)


@dataclass
class Region:
    """Where an image is noised: a 0/1 map at the image's size, what found it, how sure it is."""

    mask: np.ndarray
    source: Literal["annotation", "saliency", "global"]
    confidence: float


Localizer = Callable[[Sequence[dict]], list[Region | None]]


def token_grid(vlm: VLM) -> tuple[int, int]:
    """(side, first): the tower's patch grid side and the index of the first patch's visual token."""
    from pipeline.mask_strategies import TowerLayout

    try:
        layout = TowerLayout(vlm)
    except NotImplementedError as e:
        raise NotImplementedError(
            f"the saliency localizer maps visual tokens to image patches on a CLIP tower's grid: {e}. Give the "
            "lesions as annotations in `prepare` (docs/data-formats.md) or use visual_dispreference.mode global"
        ) from e
    return math.isqrt(layout.patches), layout.first_patch_feature


def token_saliency(vlm: VLM, rows: Sequence[dict]) -> torch.Tensor:
    """(B, visual tokens) gradient × input of log p(answer | image, question) per visual token."""
    batch = collate_sequences(vlm, [r["image"] for r in rows], [r["question"] for r in rows],
                              [r["answer"] for r in rows], contexts=[r["context"] for r in rows])
    device = vlm.device
    with torch.no_grad():
        images = batch.pixel_values.to(device, vlm.dtype)
        features = vlm.image_features(images)
    features = features.detach().requires_grad_(True)
    with torch.enable_grad():
        embeds = vlm.embed_features(batch.input_ids.to(device), features, images.token_counts)
        logits = vlm.forward(batch.attention_mask.to(device), inputs_embeds=embeds, image_layout=images,
                             image_mask=batch.image_mask.to(device)).logits
        logp = answer_logprobs(logits, batch.labels.to(device)).sum()
        (grad,) = torch.autograd.grad(logp, features)
    return (grad * features).sum(-1).detach().float().cpu()


def saliency_region(saliency: torch.Tensor, side: int, first: int, fraction: float, size: tuple[int, int],
                    view: tuple[int, int, int, int] | None = None) -> Region:
    """The patches of the `fraction` largest-|attribution| visual tokens, on an image of `size`
    (w, h): the patch grid stretched over `view` (left, top, width, height: what the tower sees
    of the image, `VLM.tower_view`; default the whole image), nothing outside it."""
    scores = saliency[first: first + side * side].abs()
    k = max(1, round(fraction * side * side))
    top = torch.topk(scores, k).indices
    total = float(scores.sum())
    confidence = float(scores[top].sum()) / total if total > 0 else 0.0
    grid = np.zeros((side, side), dtype=np.uint8)
    grid.flat[top.numpy()] = 255
    left, top, width, height = view or (0, 0, *size)
    mask = Image.new("L", size, 0)
    mask.paste(Image.fromarray(grid, mode="L").resize((width, height), Image.NEAREST), (left, top))
    return Region((np.asarray(mask) > 0).astype(np.float64), "saliency", confidence)


def saliency_localizer(vlm: VLM, fraction: float, batch_size: int) -> Localizer:
    """A localizer from the SFT model's own saliency (see the module docstring)."""
    def localize(rows: Sequence[dict]) -> list[Region | None]:
        side, first = token_grid(vlm)
        regions: list[Region | None] = []
        for i in range(0, len(rows), batch_size):
            chunk = rows[i: i + batch_size]
            for row, sal in zip(chunk, token_saliency(vlm, chunk), strict=True):
                size = decode_image(row["image"]).size
                regions.append(saliency_region(sal, side, first, fraction, size, vlm.tower_view(size)))
        return regions
    return localize


def annotation_localizer(lesions: Mapping[str, bytes]) -> Localizer:
    """A localizer from the dataset's lesion masks (`id` → mask PNG); None where a row has none."""
    def localize(rows: Sequence[dict]) -> list[Region | None]:
        out: list[Region | None] = []
        for row in rows:
            mask = lesions.get(row["id"])
            if mask is None:
                out.append(None)
                continue
            region = region_from_mask(mask, decode_image(row["image"]).size)
            out.append(Region(region, "annotation", 1.0) if region.any() else None)
        return out
    return localize


def locate(rows: Sequence[dict], cfg: VisualDispreferenceConfig, annotations: Localizer | None,
           saliency: Localizer | None) -> list[Region | None]:
    """Each row's region under `cfg`: the whole image (global), its annotation, else its saliency."""
    if cfg.mode == "global":
        return [Region(np.ones(decode_image(r["image"]).size[::-1]), "global", 1.0) for r in rows]
    regions: list[Region | None] = [None] * len(rows)
    if cfg.localizer == "auto" and annotations is not None:
        regions = annotations(rows)
    missing = [i for i, r in enumerate(regions) if r is None]
    if missing and saliency is not None:
        for i, region in zip(missing, saliency([rows[i] for i in missing]), strict=True):
            regions[i] = region
    return regions


def visual_dispreferred(rows: Sequence[dict], regions: Sequence[Region | None], noise_step: int,
                        seeds: Sequence[int]) -> list[dict | None]:
    """The VISUAL_DISPREFERRED_TYPE value of each row (None where it has no region)."""
    out: list[dict | None] = []
    for row, region, seed in zip(rows, regions, seeds, strict=True):
        if region is None or not region.mask.any():
            out.append(None)
            continue
        out.append({
            "image": add_region_noise(row["image"], region.mask, noise_step, seed),
            "region": region.source,
            "region_fraction": float(region.mask.mean()),
            "confidence": region.confidence,
            "weight": None,
        })
    return out


def build_visual_dispreferred(rows: Sequence[dict], cfg: VisualDispreferenceConfig, seed: int,
                              lesions: Mapping[str, bytes], load: Callable[[], VLM]
                              ) -> tuple[dict[str, dict | None], dict]:
    """`visual_dispreferred` of every pool row, by id, and the stage's summary of them.

    `seed` is `sample.seed`; each entry's noise is seeded from it and the entry's id (as the
    dropout draws are), so an entry's x* does not depend on the batch it was in. `load` gives
    the SFT model, loaded only when the saliency localizer is used.
    """
    from pipeline.self_contrast import entry_seed

    if cfg.mode == "none":
        return {}, {"mode": "none"}
    saliency = None
    if cfg.mode == "lesion":
        lazy: list[VLM] = []

        def saliency(batch: Sequence[dict]) -> list[Region | None]:
            if not lazy:
                lazy.append(load())
            return saliency_localizer(lazy[0], cfg.saliency_fraction, cfg.batch_size)(batch)

    regions = locate(rows, cfg, annotation_localizer(lesions), saliency)
    values = visual_dispreferred(rows, regions, cfg.noise_step, [entry_seed(seed, r["id"]) for r in rows])
    made = [v for v in values if v is not None]
    summary = {
        "mode": cfg.mode,
        "entries": len(made),
        "entries_without": len(values) - len(made),
        "by_region": {source: sum(v["region"] == source for v in made)
                      for source in ("annotation", "saliency", "global")},
        "mean_region_fraction": float(np.mean([v["region_fraction"] for v in made])) if made else None,
        "mean_confidence": float(np.mean([v["confidence"] for v in made])) if made else None,
        "alpha_bar": alpha_bar(cfg.noise_step),
    }
    return {r["id"]: v for r, v in zip(rows, values, strict=True)}, summary

"""Supervised fine-tuning of the embedded default (and the `tiny` test profile).

Two phases, both on the train split:

1. Vision pre-training. The vision tower starts from random weights (no registry ships vision
   weights), and a from-scratch ViT learns slowly through a frozen 30-layer LM. So the tower first
   learns the images through a light question-conditioned answer classifier: an MLP over all patch
   features (flattened) and the question's mean token embedding (from the LM's frozen embedding
   table) picks the answer among the train split's answers. This costs seconds, not minutes.
2. LLaVA SFT. The two-layer GELU projector and LoRA adapters on the LM (and, at a small learning
   rate `tower_lr`, the tower) are trained on the answer tokens (prompt tokens are not scored);
   the adapters are merged back, so
   `models/sft` is a plain LLaVA checkpoint. `language_model: full` trains the whole LM instead
   (sensible for `tiny`), `frozen` trains only the projector.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn
from tqdm.auto import tqdm

from pipeline.batching import IGNORE_INDEX, collate_sequences, decode_image
from pipeline.errors import DataError
from pipeline.metrics import normalize_answer
from pipeline.models.vlm import VLM
from pipeline.training.common import LoraSettings, merge_lora, warmup_cosine, wrap_lora

LogFn = Callable[[str, dict[str, float]], None]


class SFTConfig(LoraSettings):
    """The `sft:` section: build (or import) the SFT model, then train it in two phases."""

    model: str = Field(min_length=1, description="demo | tiny | a LLaVA-family folder under models/base | a hub id")
    seed: int = Field(ge=0, description="seeds the fresh weights, the shuffles and the phase-2 row draw")
    system_prompt: str | None = Field(description="system prompt of fresh profiles (demo, tiny); null for none")
    vision: dict[str, int | float | str] = Field(
        strict=False, description="overrides of the fresh vision tower's CLIPVisionConfig, e.g. {num_hidden_layers: 6}"
    )
    # phase 1: vision pre-training (fresh profiles only)
    vision_epochs: int = Field(ge=0, description="phase 1 epochs of the answer classifier; 0 skips phase 1")
    vision_lr: float = Field(gt=0.0, description="phase 1 peak learning rate (tower + classifier)")
    vision_batch_size: int = Field(ge=1, description="phase 1 images per step")
    vision_weight_decay: float = Field(ge=0.0, description="phase 1 AdamW weight decay")
    vision_warmup_fraction: float = Field(ge=0.0, lt=1.0, description="phase 1 share of steps in linear warm-up")
    # phase 2: LLaVA SFT
    epochs: int = Field(ge=0, description="phase 2 epochs; 0 imports a given checkpoint unchanged")
    batch_size: int = Field(ge=1, description="phase 2 rows per step")
    lr: float = Field(gt=0.0, description="phase 2 peak learning rate of the projector")
    lm_lr: float = Field(gt=0.0, description="phase 2 peak learning rate of the LoRA adapters (or the full LM)")
    tower_lr: float = Field(ge=0.0, description="phase 2 learning rate of the vision tower; 0 keeps it frozen")
    weight_decay: float = Field(ge=0.0, description="phase 2 AdamW weight decay")
    warmup_fraction: float = Field(ge=0.0, lt=1.0, description="phase 2 share of steps in linear warm-up")
    max_grad_norm: float | None = Field(gt=0.0, description="gradient-norm clip of both phases; null = no clipping")
    language_model: Literal["lora", "full", "frozen"] = Field(
        description="phase 2: LoRA adapters merged back | the whole LM | projector only"
    )
    lm_train_rows: int | None = Field(ge=1, description="phase 2 sees this many drawn rows (the CPU budget); null = all")

    @field_validator("vision")
    @classmethod
    def _known_vision_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        from transformers import CLIPVisionConfig

        known = set(CLIPVisionConfig().to_dict())
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown CLIPVisionConfig key(s) {unknown}; e.g. hidden_size, num_hidden_layers, patch_size")
        return value


class VisionProbe(nn.Module):
    """Answer classifier over all patch features (flattened, so where a finding is stays known)
    and the question embedding. Attention pooling to one vector was tried first: it loses
    position and count, and the tower then learned the phantoms far worse (docs/models.md)."""

    def __init__(self, text_dim: int, vision_dim: int, n_tokens: int, n_answers: int, width: int = 256):
        super().__init__()
        self.patches = nn.Linear(vision_dim * n_tokens, width)
        self.head = nn.Sequential(
            nn.GELU(), nn.Linear(width + text_dim, width), nn.GELU(), nn.Linear(width, n_answers)
        )

    def forward(self, patches: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.patches(patches.flatten(1)), question], dim=-1))


def _patch_features(vlm: VLM, pixel_values: torch.Tensor) -> torch.Tensor:
    config = vlm.model.config
    out = vlm.vision_tower(pixel_values, output_hidden_states=True)
    hidden = out.hidden_states[config.vision_feature_layer]
    return hidden[:, 1:] if config.vision_feature_select_strategy == "default" else hidden


def pretrain_vision(vlm: VLM, rows: list[dict], cfg: SFTConfig, log: LogFn | None = None) -> dict[str, float]:
    """Phase 1. Returns the classifier's final-epoch training accuracy."""
    if cfg.vision_epochs <= 0:
        return {}
    device = vlm.device
    answers = sorted({normalize_answer(r["answer"]) for r in rows})
    answer_index = {a: i for i, a in enumerate(answers)}
    embed = vlm.input_embeddings
    tower = vlm.vision_tower
    probe = VisionProbe(embed.weight.shape[1], vlm.model.config.vision_config.hidden_size,
                        vlm.settings.num_image_tokens, len(answers)).to(device)
    params = list(tower.parameters()) + list(probe.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.vision_lr, weight_decay=cfg.vision_weight_decay)
    rng = random.Random(cfg.seed)
    order = list(range(len(rows)))
    steps_per_epoch = math.ceil(len(rows) / cfg.vision_batch_size)
    total = steps_per_epoch * cfg.vision_epochs
    warmup = max(1, int(cfg.vision_warmup_fraction * total))
    scheduler = warmup_cosine(optimizer, warmup, total, warmup_from_first_step=True)
    # The question embeddings and pixels do not change across epochs: compute them once.
    with torch.no_grad():
        question_vecs = []
        for r in rows:
            ids = vlm.tokenizer.encode(r["question"], add_special_tokens=False)
            question_vecs.append(embed(torch.tensor(ids, device=device)).mean(0))
        question_vecs = torch.stack(question_vecs).float()
    pixels = torch.cat(
        [vlm.pixel_values([decode_image(r["image"]) for r in rows[i : i + 256]]) for i in range(0, len(rows), 256)]
    )
    targets = torch.tensor([answer_index[normalize_answer(r["answer"])] for r in rows], device=device)
    tower.train()
    step = 0
    accuracy = 0.0
    bar = tqdm(total=total, desc="sft: vision pre-training", unit="step")
    for epoch in range(cfg.vision_epochs):
        rng.shuffle(order)
        correct = 0
        for i in range(0, len(order), cfg.vision_batch_size):
            idx = torch.tensor(order[i : i + cfg.vision_batch_size], device=device)
            logits = probe(_patch_features(vlm, pixels[idx]).float(), question_vecs[idx])
            loss = nn.functional.cross_entropy(logits, targets[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            correct += int((logits.argmax(-1) == targets[idx]).sum())
            if log:
                log("vision", {"loss": loss.item()})
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch)
        accuracy = correct / len(order)
        if log:
            log("vision_epoch", {"train_accuracy": accuracy})
    bar.close()
    tower.eval()
    return {"vision_probe_train_accuracy": accuracy}


def _trainable_lm(vlm: VLM, cfg: SFTConfig):
    """Make the LM trainable as configured; returns (lm params, a function that finalizes the LM)."""
    if cfg.language_model == "frozen":
        return [], lambda: None
    if cfg.language_model == "full":
        params = list(vlm.language_model.parameters()) + list(vlm.lm_head.parameters())
        for p in params:
            p.requires_grad_(True)
        return list({id(p): p for p in params}.values()), lambda: None
    peft_lm = wrap_lora(vlm, cfg)
    params = [p for p in peft_lm.parameters() if p.requires_grad]
    return params, lambda: merge_lora(vlm, peft_lm)


def train_llava(vlm: VLM, rows: list[dict], cfg: SFTConfig, log: LogFn | None = None) -> dict[str, float]:
    """Phase 2: projector (+ LM adapters) on answer tokens; the vision tower stays frozen."""
    if cfg.epochs <= 0:
        return {}
    for p in vlm.model.parameters():
        p.requires_grad_(False)
    projector = vlm.projector
    for p in projector.parameters():
        p.requires_grad_(True)
    lm_params, finalize = _trainable_lm(vlm, cfg)
    groups = [{"params": list(projector.parameters()), "lr": cfg.lr}]
    tower = vlm.vision_tower
    if cfg.tower_lr > 0:
        for p in tower.parameters():
            p.requires_grad_(True)
        groups.append({"params": list(tower.parameters()), "lr": cfg.tower_lr})
    if lm_params:
        groups.append({"params": lm_params, "lr": cfg.lm_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    rng = random.Random(cfg.seed + 1)
    order = list(range(len(rows)))
    steps_per_epoch = math.ceil(len(rows) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = max(1, int(cfg.warmup_fraction * total))
    scheduler = warmup_cosine(optimizer, warmup, total, warmup_from_first_step=True)
    vlm.model.train()
    bar = tqdm(total=total, desc="sft: LLaVA fine-tuning", unit="step")
    losses: list[float] = []
    for _epoch in range(cfg.epochs):
        rng.shuffle(order)
        for i in range(0, len(order), cfg.batch_size):
            chunk = [rows[j] for j in order[i : i + cfg.batch_size]]
            batch = collate_sequences(vlm, [r["image"] for r in chunk], [r["question"] for r in chunk],
                                      [r["answer"] for r in chunk])
            # A frozen tower builds no graph; gradients reach the projector and the adapters.
            out = vlm.forward(batch.attention_mask, batch.input_ids, batch.pixel_values)
            logits = out.logits[:, :-1].float()
            targets = batch.labels[:, 1:]
            loss = nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            if log:
                log("lm", {"loss": losses[-1], "lr": scheduler.get_last_lr()[0]})
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    finalize()
    for p in vlm.model.parameters():
        p.requires_grad_(False)
    vlm.model.eval()
    tail = losses[-max(1, len(losses) // 10) :]
    return {"sft_first_loss": losses[0], "sft_final_loss": sum(tail) / len(tail)}


def train_sft(vlm: VLM, rows: list[dict], cfg: SFTConfig, fresh: bool, log: LogFn | None = None
              ) -> dict[str, float]:
    """Both phases; returns summary numbers for the stage report.

    Phase 1 runs only on a `fresh` model (a profile built here): a given checkpoint's vision tower
    is pretrained, so phase 1 never runs on it.
    """
    if not rows:
        raise DataError("sft: the train split has no rows")
    torch.manual_seed(cfg.seed)
    summary = pretrain_vision(vlm, rows, cfg, log) if fresh else {}
    lm_rows = rows
    if cfg.lm_train_rows is not None:
        lm_rows = random.Random(cfg.seed).sample(rows, min(cfg.lm_train_rows, len(rows)))
    summary.update(train_llava(vlm, lm_rows, cfg, log))
    return summary

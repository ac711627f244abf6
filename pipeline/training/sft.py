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
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline.batching import IGNORE_INDEX, collate_sequences, decode_image
from pipeline.metrics import normalize_answer
from pipeline.models.vlm import VLM

LogFn = Callable[[str, dict[str, float]], None]


@dataclass
class SFTConfig:
    seed: int = 0
    # phase 1: vision pre-training
    vision_epochs: int = 4
    vision_lr: float = 1e-3
    vision_batch_size: int = 32
    # phase 2: LLaVA SFT
    epochs: int = 1
    batch_size: int = 8
    lr: float = 1e-3  # projector
    lm_lr: float = 2e-4  # LoRA adapters (or the full LM)
    tower_lr: float = 0.0  # phase 2 learning rate of the vision tower; 0 keeps it frozen
    language_model: str = "lora"  # lora | full | frozen
    lora_r: int = 16
    lora_alpha: int = 32
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    warmup_fraction: float = 0.05
    lm_train_rows: int | None = None  # phase 2 sees the first N shuffled rows (CPU budget); None = all


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


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
    out = vlm.model.model.vision_tower(pixel_values, output_hidden_states=True)
    hidden = out.hidden_states[config.vision_feature_layer]
    return hidden[:, 1:] if config.vision_feature_select_strategy == "default" else hidden


def pretrain_vision(vlm: VLM, rows: list[dict], cfg: SFTConfig, log: LogFn | None = None) -> dict[str, float]:
    """Phase 1. Returns the classifier's final-epoch training accuracy."""
    if cfg.vision_epochs <= 0:
        return {}
    device = vlm.device
    answers = sorted({normalize_answer(r["answer"]) for r in rows})
    answer_index = {a: i for i, a in enumerate(answers)}
    embed = vlm.model.get_input_embeddings()
    tower = vlm.model.model.vision_tower
    probe = VisionProbe(embed.weight.shape[1], vlm.model.config.vision_config.hidden_size,
                        vlm.settings.num_image_tokens, len(answers)).to(device)
    params = list(tower.parameters()) + list(probe.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.vision_lr, weight_decay=0.01)
    rng = random.Random(cfg.seed)
    order = list(range(len(rows)))
    steps_per_epoch = math.ceil(len(rows) / cfg.vision_batch_size)
    total = steps_per_epoch * cfg.vision_epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine(s, total, max(1, total // 10)))
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
            torch.nn.utils.clip_grad_norm_(params, 1.0)
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
    language_model = vlm.model.model.language_model
    if cfg.language_model == "frozen":
        return [], lambda: None
    if cfg.language_model == "full":
        params = list(language_model.parameters()) + list(vlm.model.lm_head.parameters())
        for p in params:
            p.requires_grad_(True)
        return list({id(p): p for p in params}.values()), lambda: None
    if cfg.language_model != "lora":
        raise ValueError(f"sft.language_model must be lora, full or frozen, got {cfg.language_model!r}")
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=cfg.lora_targets)
    peft_lm = get_peft_model(language_model, lora)
    vlm.model.model.language_model = peft_lm
    params = [p for p in peft_lm.parameters() if p.requires_grad]

    def merge() -> None:
        vlm.model.model.language_model = peft_lm.merge_and_unload()

    return params, merge


def train_llava(vlm: VLM, rows: list[dict], cfg: SFTConfig, log: LogFn | None = None) -> dict[str, float]:
    """Phase 2: projector (+ LM adapters) on answer tokens; the vision tower stays frozen."""
    if cfg.epochs <= 0:
        return {}
    for p in vlm.model.parameters():
        p.requires_grad_(False)
    projector = vlm.model.model.multi_modal_projector
    for p in projector.parameters():
        p.requires_grad_(True)
    lm_params, finalize = _trainable_lm(vlm, cfg)
    groups = [{"params": list(projector.parameters()), "lr": cfg.lr}]
    tower = vlm.model.model.vision_tower
    if cfg.tower_lr > 0:
        for p in tower.parameters():
            p.requires_grad_(True)
        groups.append({"params": list(tower.parameters()), "lr": cfg.tower_lr})
    if lm_params:
        groups.append({"params": lm_params, "lr": cfg.lm_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    rng = random.Random(cfg.seed + 1)
    order = list(range(len(rows)))
    steps_per_epoch = math.ceil(len(rows) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = max(1, int(cfg.warmup_fraction * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine(s, total, warmup))
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
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
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


def train_sft(vlm: VLM, rows: list[dict], cfg: SFTConfig, log: LogFn | None = None) -> dict[str, float]:
    """Both phases; returns summary numbers for the stage report."""
    if not rows:
        raise ValueError("sft: the train split has no rows")
    torch.manual_seed(cfg.seed)
    summary = pretrain_vision(vlm, rows, cfg, log)
    lm_rows = rows
    if cfg.lm_train_rows is not None:
        lm_rows = random.Random(cfg.seed).sample(rows, min(cfg.lm_train_rows, len(rows)))
    summary.update(train_llava(vlm, lm_rows, cfg, log))
    return summary

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
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate.utils import DistributedType
from pydantic import Field, field_validator
from torch import nn
from tqdm.auto import tqdm

from pipeline.batching import IGNORE_INDEX, collate_sequences
from pipeline.data.images import decode_image
from pipeline.errors import DataError
from pipeline.metrics import normalize_answer
from pipeline.models.vlm import VLM, ImageBatch
from pipeline.training.checkpoints import Checkpoints, Delegate, LoopState, TrainedWeights
from pipeline.training.common import (
    LoraSettings,
    check_whole_parameters,
    configure_deepspeed,
    gradient_checkpointing,
    merge_lora,
    warmup_cosine,
    wrap_lora,
)

LogFn = Callable[[str, dict[str, float]], None]


class SFTRun:
    """What both phases share for resuming: the checkpoints, the loop state, the logger.

    Every value the phases log goes through `log`, which keeps it in the loop state: a resumed
    run replays the finished steps' values into the logger, so its curves equal an uninterrupted
    run's. Without `work_dir` nothing is saved (library use).
    """

    def __init__(self, cfg: SFTConfig, log: LogFn | None, work_dir: str | Path | None, key: str | None) -> None:
        from accelerate import Accelerator

        if (work_dir is None) != (key is None):
            raise ValueError("train_sft: give both work_dir and key, or neither")
        self.cfg = cfg
        self.sink = log
        self.state = LoopState()
        self.optimizer, self.scheduler = Delegate(), Delegate()
        # Used for its checkpointing only (save_state / load_state); the loops move tensors themselves.
        self.accelerator = Accelerator()
        check_whole_parameters(self.accelerator)
        self.accelerator.register_for_checkpointing(self.optimizer, self.scheduler)
        self.checkpoints = Checkpoints(self.accelerator, work_dir, key or "", cfg.checkpoint_every,
                                       TrainedWeights([]), self.state, "sft")
        self.state.values = {"logged": [], "summary": {}}
        self.resumed_from: str | None = None
        self.steps_run = 0  # optimizer steps this process ran (a resumed run skips the finished ones)

    def log(self, phase: str, values: dict[str, float]) -> None:
        if self.checkpoints.folder is not None:
            self.state.values["logged"].append((phase, dict(values)))
        if self.sink:
            self.sink(phase, values)

    def restore(self, tag: str) -> bool:
        """Load the newest checkpoint if it is of phase `tag`, and replay what it had logged."""
        if not self.checkpoints.restore(tag):
            return False
        self.resumed_from = self.state.values.get("where")
        if self.sink:
            for phase, values in self.state.values["logged"]:
                self.sink(phase, values)
        return True

    def save(self, at_step: int, tag: str, **position: Any) -> None:
        self.state.values.update(position)
        self.checkpoints.save(at_step, tag)


class SFTConfig(LoraSettings):
    """The `sft:` section: build (or import) the SFT model, then train it in two phases."""

    model: str = Field(min_length=1, description="demo | tiny | a folder under models/base of a supported model family (docs/models.md) | a hub id")
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
    checkpoint_every: int | None = Field(
        ge=1, description="save a resumable checkpoint every N steps of either phase (under --work-dir); null = never"
    )
    gradient_checkpointing: bool = Field(
        description="phase 2: recompute activations in the backward pass (less memory, ~1/3 more compute; 7B on one GPU)"
    )

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


def pretrain_vision(vlm: VLM, rows: list[dict], cfg: SFTConfig, run: SFTRun) -> dict[str, float]:
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
    pixels = ImageBatch.cat(
        [vlm.pixel_values([decode_image(r["image"]) for r in rows[i : i + 256]]) for i in range(0, len(rows), 256)]
    )
    targets = torch.tensor([answer_index[normalize_answer(r["answer"])] for r in rows], device=device)
    run.optimizer.target, run.scheduler.target = optimizer, scheduler
    run.checkpoints.weights = TrainedWeights(
        [(f"tower.{n}", p) for n, p in tower.named_parameters()] + [(f"probe.{n}", p) for n, p in probe.named_parameters()]
    )
    step, start_epoch, start_i, correct, accuracy = 0, 0, 0, 0, 0.0
    if run.restore("phase1"):
        at = run.state.values
        step, start_epoch, start_i, correct, accuracy = at["step"], at["epoch"], at["i"], at["correct"], at["accuracy"]
        order = list(at["order"])
        rng.setstate(at["rng"])
    tower.train()
    bar = tqdm(total=total, initial=step, desc="sft: vision pre-training", unit="step")
    for epoch in range(start_epoch, cfg.vision_epochs):
        if not (epoch == start_epoch and start_i > 0):
            rng.shuffle(order)
            correct = 0
        for i in range(start_i if epoch == start_epoch else 0, len(order), cfg.vision_batch_size):
            idx = torch.tensor(order[i : i + cfg.vision_batch_size], device=device)
            logits = probe(_patch_features(vlm, pixels[idx].pixels).float(), question_vecs[idx])
            loss = nn.functional.cross_entropy(logits, targets[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            correct += int((logits.argmax(-1) == targets[idx]).sum())
            run.log("vision", {"loss": loss.item()})
            step += 1
            run.steps_run += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch)
            next_i = i + cfg.vision_batch_size
            if run.checkpoints.due(step) and next_i < len(order):  # epoch ends are saved below
                run.save(step, "phase1", step=step, epoch=epoch, i=next_i, correct=correct, accuracy=accuracy,
                         order=list(order), rng=rng.getstate(), where=f"phase 1, step {step} of {total}")
        accuracy = correct / len(order)
        run.log("vision_epoch", {"train_accuracy": accuracy})
        if run.checkpoints.folder is not None and (run.checkpoints.due(step) or epoch == cfg.vision_epochs - 1):
            # The end of phase 1 is always saved: a kill in phase 2 never redoes phase 1.
            run.save(step, "phase1", step=step, epoch=epoch + 1, i=0, correct=0, accuracy=accuracy,
                     order=list(order), rng=rng.getstate(), where=f"phase 1, step {step} of {total}")
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


class AnswerLoss(nn.Module):
    """Mean cross-entropy of a batch's answer tokens. An nn.Module so that accelerate can wrap it
    (DDP, autocast); the parameters are the VLM's."""

    def __init__(self, vlm: VLM):
        super().__init__()
        self.model = vlm.model
        self.vlm = vlm

    def forward(self, batch) -> torch.Tensor:
        # A frozen tower builds no graph; gradients reach the projector and the adapters.
        out = self.vlm.forward(batch.attention_mask, batch.input_ids, batch.pixel_values)
        logits = out.logits[:, :-1].float()
        targets = batch.labels[:, 1:]
        return nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
        )


def train_llava(vlm: VLM, rows: list[dict], cfg: SFTConfig, run: SFTRun, tower_trained: bool) -> dict[str, float]:
    """Phase 2: projector (+ LM adapters, + the tower at `tower_lr`) on answer tokens.

    `tower_trained`: phase 1 changed the tower, so phase 2's checkpoints keep it too.

    The loop runs through `accelerate` (`run.accelerator`): one process on the CPU or a GPU, or
    data parallel under `accelerate launch`, where each process takes its share of every batch's
    rows (rank r the rows r, r + N, ...) and DDP averages the gradients. One process is exactly
    the plain loop.
    """
    if cfg.epochs <= 0:
        return {}
    for p in vlm.model.parameters():
        p.requires_grad_(False)
    projector = vlm.projector
    for p in projector.parameters():
        p.requires_grad_(True)
    lm_params, finalize = _trainable_lm(vlm, cfg)
    lm_ids = {id(p) for p in lm_params}
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
    accelerator = run.accelerator
    processes = accelerator.num_processes
    # A prepared scheduler advances once per process at every optimizer step.
    warmup = max(1, int(cfg.warmup_fraction * total))
    scheduler = warmup_cosine(optimizer, warmup * processes, total * processes, warmup_from_first_step=True)
    run.optimizer.target, run.scheduler.target = optimizer, scheduler
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # ZeRO partitions the optimizer state: the engine's checkpoint holds each process's part. The
        # slot is saved by the main process alone and loaded by all, which would give every process
        # the main process's part.
        run.optimizer.target = None
    # each process's share of a batch's rows (below)
    configure_deepspeed(accelerator, math.ceil(cfg.batch_size / processes), cfg.max_grad_norm)
    model, prepared_optimizer, prepared_scheduler = accelerator.prepare(AnswerLoss(vlm), optimizer, scheduler)
    trained = [p for g in groups for p in g["params"]]
    # What phase 1 or 2 changes: the tower (phase 1, or tower_lr), the projector, the LM's trained part.
    tower_ids = {id(p) for p in vlm.vision_tower.parameters()} if tower_trained else set()
    run.checkpoints.weights = TrainedWeights(
        [(n, p) for n, p in vlm.model.named_parameters() if p.requires_grad or id(p) in lm_ids or id(p) in tower_ids]
    )
    step, start_epoch, start_i = 0, 0, 0
    losses: list[float] = []
    if run.restore("phase2"):
        at = run.state.values
        step, start_epoch, start_i, losses = at["step"], at["epoch"], at["i"], list(at["losses"])
        order = list(at["order"])
        rng.setstate(at["rng"])
    vlm.model.train()
    gradient_checkpointing(vlm, cfg.gradient_checkpointing)
    bar = tqdm(total=total, initial=step, desc="sft: LLaVA fine-tuning", unit="step",
               disable=not accelerator.is_main_process)
    for epoch in range(start_epoch, cfg.epochs):
        if not (epoch == start_epoch and start_i > 0):
            rng.shuffle(order)
        for i in range(start_i if epoch == start_epoch else 0, len(order), cfg.batch_size):
            chunk = [rows[j] for j in order[i : i + cfg.batch_size]][accelerator.process_index::processes]
            batch = collate_sequences(vlm, [r["image"] for r in chunk], [r["question"] for r in chunk],
                                      [r["answer"] for r in chunk], contexts=[r["context"] for r in chunk])
            loss = model(batch)
            prepared_optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if cfg.max_grad_norm is not None:
                accelerator.clip_grad_norm_(trained, cfg.max_grad_norm)
            prepared_optimizer.step()
            prepared_scheduler.step()
            losses.append(float(accelerator.reduce(loss.detach(), reduction="mean")))
            run.log("lm", {"loss": losses[-1], "lr": scheduler.get_last_lr()[0]})
            step += 1
            run.steps_run += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if run.checkpoints.due(step) and step < total:
                next_epoch, next_i = (epoch, i + cfg.batch_size) if i + cfg.batch_size < len(order) else (epoch + 1, 0)
                run.save(step, "phase2", step=step, epoch=next_epoch, i=next_i, losses=list(losses),
                         order=list(order), rng=rng.getstate(), where=f"phase 2, step {step} of {total}")
    bar.close()
    gradient_checkpointing(vlm, False)
    finalize()
    for p in vlm.model.parameters():
        p.requires_grad_(False)
    vlm.model.eval()
    tail = losses[-max(1, len(losses) // 10) :]
    return {"sft_first_loss": losses[0], "sft_final_loss": sum(tail) / len(tail)}


def train_sft(vlm: VLM, rows: list[dict], cfg: SFTConfig, fresh: bool, log: LogFn | None = None,
              work_dir: str | Path | None = None, key: str | None = None) -> tuple[dict[str, float], SFTRun]:
    """Both phases; returns summary numbers for the stage report, and the run (what it resumed,
    its checkpoints: clear them once the model is saved).

    Phase 1 runs only on a `fresh` model (a profile built here): a given checkpoint's vision tower
    is pretrained, so phase 1 never runs on it. With `work_dir` and `key` (a content fingerprint:
    `resume_key`), both phases checkpoint every `cfg.checkpoint_every` steps and a restarted run
    continues from the newest checkpoint to the same weights.
    """
    if not rows:
        raise DataError("sft: the train split has no rows")
    torch.manual_seed(cfg.seed)
    run = SFTRun(cfg, log, work_dir, key)
    in_phase2 = run.checkpoints.latest_tag() == "phase2"
    summary: dict[str, float] = {}
    if fresh and not in_phase2:
        summary = pretrain_vision(vlm, rows, cfg, run)
        run.state.values["summary"] = dict(summary)
    lm_rows = rows
    if cfg.lm_train_rows is not None:
        lm_rows = random.Random(cfg.seed).sample(rows, min(cfg.lm_train_rows, len(rows)))
    phase2 = train_llava(vlm, lm_rows, cfg, run, tower_trained=fresh and cfg.vision_epochs > 0)
    summary = {**run.state.values["summary"], **phase2}
    return summary, run


def resume_key(cfg: SFTConfig, input_digest: str, model_digest: str | None, processes: int = 1) -> str:
    """The content key of an SFT run's checkpoints: the rows, the config, the start model, the code,
    and the number of processes (phase 2 splits each batch among them)."""
    from pipeline.fingerprint import code_version, fingerprint

    code = code_version(["pipeline.training", "pipeline.batching", "pipeline.models", "pipeline.metrics"])
    steps = {k: v for k, v in cfg.to_dict().items() if k != "checkpoint_every"}  # how often is not what
    if processes == 1:  # the key of every run made before processes counted
        return fingerprint("sft", input_digest, model_digest, steps, code)
    return fingerprint("sft", input_digest, model_digest, steps, code, processes)

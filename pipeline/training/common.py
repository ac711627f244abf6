"""What both trainers (SFT and preference training) share: LoRA wrapping and the learning-rate
schedule, one helper each (the bf16 decision is `pipeline.device.use_bf16`)."""

from __future__ import annotations

import warnings

from pydantic import Field
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from pipeline.models.vlm import VLM
from pipeline.params import Config


class LoraSettings(Config):
    """The LoRA keys both trainers' sections carry (`sft:` and `train:`)."""

    lora_r: int = Field(ge=1, description="LoRA rank")
    lora_alpha: int = Field(ge=1, description="LoRA alpha (scale = alpha / r)")
    lora_dropout: float = Field(ge=0.0, lt=1.0, description="LoRA dropout")
    lora_targets: tuple[str, ...] = Field(strict=False, min_length=1, description="LM modules that get adapters")


def wrap_lora(vlm: VLM, settings: LoraSettings):
    """Put LoRA adapters (peft) on the VLM's language model, in place; returns the peft model.

    peft freezes the language model's own weights; what else trains is the caller's choice.
    """
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                      target_modules=list(settings.lora_targets))
    with warnings.catch_warnings():
        # peft (0.21) probes the deprecated `is_gradient_checkpointing` of transformers 5 models with
        # getattr; the warning is about peft's call, not ours. Only that message is silenced.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_lm = get_peft_model(vlm.language_model, lora)
    vlm.language_model = peft_lm
    return peft_lm


def gradient_checkpointing(vlm: VLM, enabled: bool) -> None:
    """Recompute every layer's activations in the backward pass instead of keeping them
    (transformers' non-reentrant checkpointing): far less activation memory for about a third
    more compute, what a 7B model on one GPU needs. Off again before the model is used or saved.

    A layer under checkpointing drops any KV cache it is given while gradients flow, so a trainer
    that shares a prompt's cache between forwards (`train.share_prompt`) cannot use it."""
    if enabled:
        vlm.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif vlm.model.is_activation_checkpointing:
        vlm.model.activation_checkpointing_disable()


def check_whole_parameters(accelerator) -> None:
    """Refuse the launch modes that shard the parameters themselves (FSDP, DeepSpeed ZeRO-3).

    The trainers merge the LoRA adapters into the language model and save it from the main
    process's copy of the weights; with the parameters sharded that copy is a shard, and gathering
    it is not implemented. DDP and ZeRO-1/2 keep every parameter whole on every process."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    stage = None
    if kind == DistributedType.DEEPSPEED:
        stage = accelerator.state.deepspeed_plugin.zero_stage
    if kind == DistributedType.FSDP or stage == 3:
        name = "FSDP" if kind == DistributedType.FSDP else "DeepSpeed ZeRO-3"
        raise NotImplementedError(
            f"{name} shards the parameters, and saving the merged model from sharded parameters is not implemented; "
            "launch with DDP (several GPUs) or DeepSpeed ZeRO-2 (configs/accelerate/deepspeed_zero2.yaml), with "
            "gradient_checkpointing for a 7B model (docs/training.md § Large models)"
        )


def configure_deepspeed(accelerator, micro_batch: int, max_grad_norm: float | None) -> None:
    """Under DeepSpeed, before `accelerator.prepare(model, optimizer, scheduler)`: what accelerate
    cannot fill in itself. No-op under any other launch mode.

    - `train_micro_batch_size_per_gpu`: accelerate takes it from a DataLoader passed to the same
      `prepare` call; `train` prepares its loader in a call of its own and `sft`'s phase 2 has none
      (it draws its rows itself), so both would fail with "requires you to pass at least one of
      training or evaluation dataloaders". DeepSpeed uses it for its bookkeeping only (the loops
      feed their own batches).
    - `gradient_clipping`: under DeepSpeed the engine clips inside `accelerator.backward` and
      `accelerator.clip_grad_norm_` ignores its max_norm, so the config's value (1.0 unless the
      accelerate config says otherwise) would win over the trainer's `max_grad_norm`.
    - `gradient_accumulation_steps`: a number in the accelerate config (not `auto`) silently
      replaces the Accelerator's (`train.grad_accum`).
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = micro_batch
    config["train_batch_size"] = "auto"  # micro batch x accumulation x processes, filled by prepare
    config["gradient_clipping"] = max_grad_norm or 0.0  # 0: DeepSpeed does not clip
    config["gradient_accumulation_steps"] = accelerator.gradient_accumulation_steps


def merge_lora(vlm: VLM, peft_lm) -> None:
    """Fold the adapters into the language model's weights: the VLM is a plain model again."""
    vlm.language_model = peft_lm.merge_and_unload()


def warmup_cosine(optimizer: Optimizer, warmup_steps: int, total_steps: int,
                  warmup_from_first_step: bool = False) -> LambdaLR:
    """transformers' schedule: linear warm-up, then cosine decay to 0 at `total_steps`.

    transformers' warm-up gives the first step a learning rate of 0. With
    `warmup_from_first_step` the warm-up counts the first step as step 1 (rates 1/w, 2/w, ...,
    1), the same curve shifted by one step during warm-up only; SFT has trained that way since
    its first version, and keeping it keeps the embedded default's checkpoints (and every number
    measured on them) as they are.
    """
    from transformers import get_cosine_schedule_with_warmup

    schedule = get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    if not warmup_from_first_step:
        return schedule
    curve = schedule.lr_lambdas[0]
    return LambdaLR(optimizer, lambda step: curve(step + 1) if step < warmup_steps else curve(step))


"""The helpers both trainers share: the schedule, LoRA wrapping and the bf16 decision."""

from __future__ import annotations

import pytest
import torch

from pipeline.device import use_bf16
from pipeline.training.common import LoraSettings, merge_lora, warmup_cosine, wrap_lora


def rates(schedule, optimizer, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    return out


def optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


def test_warmup_cosine_is_transformers_schedule():
    opt = optimizer()
    assert rates(warmup_cosine(opt, 2, 6), opt, 6) == pytest.approx([0.0, 0.5, 1.0, 0.8535534, 0.5, 0.1464466])


def test_warmup_from_first_step_shifts_only_the_warmup():
    opt = optimizer()
    assert rates(warmup_cosine(opt, 2, 6, warmup_from_first_step=True), opt, 6) == pytest.approx(
        [0.5, 1.0, 1.0, 0.8535534, 0.5, 0.1464466])


def test_lora_wraps_the_language_model_and_merges_back(tiny_vlm):
    ids = torch.tensor([tiny_vlm.tokenizer.encode("is there a lesion", add_special_tokens=False)])
    mask = torch.ones_like(ids)
    before = tiny_vlm.forward(mask, input_ids=ids, pixel_values=None).logits
    peft_lm = wrap_lora(tiny_vlm, LoraSettings(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_targets=("q_proj", "v_proj")))
    assert tiny_vlm.language_model is peft_lm
    trainable = [n for n, p in peft_lm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)  # the LM's own weights are frozen
    with torch.no_grad():
        for n, p in peft_lm.named_parameters():
            if "lora_B" in n:
                p.normal_()
        adapted = tiny_vlm.forward(mask, input_ids=ids, pixel_values=None).logits
    assert not torch.allclose(adapted, before)
    merge_lora(tiny_vlm, peft_lm)
    assert not any("lora_" in n for n, _ in tiny_vlm.model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(tiny_vlm.forward(mask, input_ids=ids, pixel_values=None).logits, adapted,
                                   atol=1e-5, rtol=1e-4)


def test_bf16_only_on_a_cuda_device_that_has_it():
    assert use_bf16("cpu") is False
    if not torch.cuda.is_available():
        assert use_bf16() is False

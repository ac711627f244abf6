"""One place that decides device and dtype: CUDA with bf16 when present, CPU with fp32 otherwise."""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def use_bf16(device: torch.device | str | None = None) -> bool:
    """bf16 (weights, or autocast in training) on a CUDA device that supports it; fp32 elsewhere."""
    device = torch.device(device) if device is not None else default_device()
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def default_dtype(device: torch.device | None = None) -> torch.dtype:
    return torch.bfloat16 if use_bf16(device) else torch.float32

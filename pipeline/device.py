"""One place that decides device and dtype: CUDA with bf16 when present, CPU with fp32 otherwise."""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device | None = None) -> torch.dtype:
    device = device or default_device()
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32

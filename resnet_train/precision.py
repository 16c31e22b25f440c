"""Mixed precision and memory format: the autocast context of trainer.precision and the layout of
trainer.channels_last, shared by training and inference."""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """fp32: no autocast; fp16/bf16: torch.autocast on the device's type."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def channels_last_for(setting: bool | None, device: torch.device) -> bool:
    """trainer.channels_last; null = on for the CPU and CUDA. Measured with the trainer's step
    (scripts/benchmark_variants.py, fp32, 2-core AVX2 CPU): ResNet-20 1.25x, ResNet-56 1.20x,
    PreAct-164 1.37x, WRN-16-8 1.10x, ResNet-18 1.13x the images/s of the contiguous layout; on
    GPUs it is what cuDNN's fastest kernels expect."""
    if setting is not None:
        return setting
    return device.type in ("cpu", "cuda")

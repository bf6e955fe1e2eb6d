"""Which number format a run computes in (`train.precision`), for training and evaluation alike.

fp32 everywhere by default on a CPU; bf16 mixed precision (autocast: weights and optimiser state stay float32, matrix
products run in bf16) on a GPU that supports it, or on a CPU with native bf16 (AVX512-BF16 or AMX). Elsewhere bf16 is
emulated and slower than fp32, so it is refused there.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (oneDNN's check: AVX512-BF16 or AMX)."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve(precision: str) -> str:
    """`auto` -> bf16 on a bf16-capable GPU, else fp32; an explicit choice is checked against the hardware."""
    gpu = torch.cuda.is_available()
    if precision == "auto":
        return "bf16" if gpu and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and not gpu:
        raise ValueError("train.precision=fp16 needs a GPU; use bf16 (on a CPU with AVX512-BF16 or AMX) or fp32")
    if precision == "bf16" and not gpu and not cpu_has_bf16():
        raise ValueError("train.precision=bf16: this CPU has no native bf16 (AVX512-BF16 or AMX), where bf16 runs "
                         "slower than fp32; use fp32 (or auto)")
    return precision


def autocast(precision: str, device) -> "torch.autocast | nullcontext":
    """The mixed-precision context evaluation runs in (training gets the same from accelerate)."""
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve(precision))
    if low is None:
        return nullcontext()
    return torch.autocast(torch.device(device or "cpu").type, dtype=low)

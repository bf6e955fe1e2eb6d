"""Full fine-tuning: every parameter trains. The reference point every PEFT result is compared against.

Takes any model; gives it back unchanged with all its parameters owned (kinds: base weights, biases, norms, and on
RETRO the added modules as 'retro').
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .core import MethodConfig, Owned, classify_existing


@dataclass
class FullConfig(MethodConfig):
    method = "full"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layers != "all":
            raise ValueError(f"FullConfig.layers={self.layers!r}: full fine-tuning trains every layer; "
                             "leave layers='all' (use adapters or LoRA to train a subset)")


def apply_full(model: nn.Module, config: FullConfig) -> tuple[nn.Module, Owned]:
    kinds = classify_existing(model)
    return model, [(p, kinds[id(p)]) for p in model.parameters()]

"""LoRA and IA3, both through Hugging Face peft.

Takes a causal LM or a RETRO model and a config; gives on a plain HF model a `peft.PeftModel` (saved in the HF PEFT
format), and on RETRO the same module with peft layers injected into the wrapped decoder and/or the added modules.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import peft
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .core import MethodConfig, Owned, as_str_tuple, classify_existing, positive, probability
from .targets import is_retro, resolve_targets
from transformers.pytorch_utils import Conv1D


@dataclass
class LoRAConfig(MethodConfig):
    """Low-rank update W + (alpha/r) B A on the target linear layers (B starts at zero)."""

    method = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("attention",)
    bias: Literal["none", "lora_only", "all"] = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(self, "r")
        probability(self, "dropout")
        as_str_tuple(self, "targets")
        if self.bias not in ("none", "lora_only", "all"):
            raise ValueError(f"LoRAConfig.bias={self.bias!r}: choose 'none', 'lora_only' or 'all'")


@dataclass
class IA3Config(MethodConfig):
    """Learned rescaling vectors (initialised to one); MLP output projections scale their input, others their output."""

    method = "ia3"
    targets: tuple[str, ...] = ("attention", "mlp_out")

    def __post_init__(self) -> None:
        super().__post_init__()
        as_str_tuple(self, "targets")


def _inject(model: nn.Module, peft_config: peft.PeftConfig) -> tuple[nn.Module, Owned]:
    existing = classify_existing(model)
    with warnings.catch_warnings():
        # peft warns each time it flips fan_in_fan_out between GPT-2's Conv1D and nn.Linear; that flip is what we want.
        warnings.simplefilter("ignore", UserWarning)
        if is_retro(model):
            out = peft.inject_adapter_in_model(peft_config, model)
        else:
            out = peft.get_peft_model(model, peft_config)
    adapter_ids = {id(p) for m in out.modules() if isinstance(m, BaseTunerLayer)
                   for attr in m.adapter_layer_names for p in getattr(m, attr).parameters()}
    owned = [(p, "adapter" if id(p) in adapter_ids else existing.get(id(p), "base"))
             for p in out.parameters() if p.requires_grad]
    return out, owned


def _fan_in_fan_out(model: nn.Module, names: list[str]) -> bool:
    return isinstance(model.get_submodule(names[0]), Conv1D)


def apply_lora(model: nn.Module, config: LoRAConfig) -> tuple[nn.Module, Owned]:
    names = resolve_targets(model, config.targets, config.layers)
    peft_config = peft.LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                  target_modules=names, bias=config.bias,
                                  fan_in_fan_out=_fan_in_fan_out(model, names))
    return _inject(model, peft_config)


def apply_ia3(model: nn.Module, config: IA3Config) -> tuple[nn.Module, Owned]:
    names = resolve_targets(model, config.targets, config.layers)
    mlp_out = set(resolve_targets(model, ("mlp_out",), config.layers))
    peft_config = peft.IA3Config(target_modules=names, feedforward_modules=[n for n in names if n in mlp_out],
                                 fan_in_fan_out=_fan_in_fan_out(model, names))
    return _inject(model, peft_config)

"""LoRA and its variants (DoRA, rsLoRA), VeRA and IA3, all through Hugging Face peft.

Takes a causal LM or a RETRO model and a config; gives on a plain HF model a `peft.PeftModel` (task type CAUSAL_LM,
saved in the HF PEFT format), and on RETRO the same module with peft layers injected into the wrapped decoder and/or
the added modules.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal, Optional

import peft
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .core import MethodConfig, Owned, as_str_tuple, choice, classify_existing, positive, probability
from .targets import is_retro, resolve_targets
from transformers.pytorch_utils import Conv1D


@dataclass
class LoRAConfig(MethodConfig):
    """Low-rank update W + (alpha/r) B A on the target linear layers (B starts at zero)."""

    method = "lora"
    r: int = 8  # rank of the update
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.0  # dropout on the adapted layers' input
    targets: tuple[str, ...] = ("attention",)  # presets (attention, attention_qv, mlp, cca, ...) or module names
    bias: Literal["none", "lora_only", "all"] = "none"  # which biases train: none | lora_only | all

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(self, "r")
        probability(self, "dropout")
        as_str_tuple(self, "targets")
        if self.bias not in ("none", "lora_only", "all"):
            raise ValueError(f"LoRAConfig.bias={self.bias!r}: choose 'none', 'lora_only' or 'all'")


@dataclass
class DoRAConfig(LoRAConfig):
    """DoRA (Liu et al. 2024): LoRA on the direction of each weight plus a learned magnitude per output feature."""

    method = "dora"


@dataclass
class RsLoRAConfig(LoRAConfig):
    """rsLoRA (Kalajdzievski 2023): LoRA scaled by alpha / sqrt(r) instead of alpha / r, stable at high rank."""

    method = "rslora"


@dataclass
class VeRAConfig(MethodConfig):
    """VeRA (Kopiczko et al. 2024): frozen random A, B shared by all layers; trains per-layer scaling vectors d (r)
    and b (out). peft's default rank 256; b starts at zero, so the model starts equal to the base."""

    method = "vera"
    r: int = 256  # rank of the shared random A, B
    dropout: float = 0.0  # dropout on the adapted layers' input
    d_initial: float = 0.1  # initial value of the scaling vector d
    targets: tuple[str, ...] = ("attention",)  # presets (attention, attention_qv, mlp, cca, ...) or module names

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(self, "r")
        probability(self, "dropout")
        as_str_tuple(self, "targets")


# IA3 placements: the paper's (Liu et al. 2022: rescale keys, values and the FFN intermediate activation, i.e. the
# input of the MLP output projection) and the wider one this project used before (all attention projections).
IA3_PLACEMENTS = {"paper": ("attention_kv", "mlp_out"), "attention_mlp_out": ("attention", "mlp_out")}


@dataclass
class IA3Config(MethodConfig):
    """Learned rescaling vectors (initialised to one); MLP output projections scale their input, others their output.

    `placement` names a set of targets (default: the paper's); `targets` given explicitly overrides it.
    """

    method = "ia3"
    placement: str = "paper"
    targets: Optional[tuple[str, ...]] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        choice(self, "placement", IA3_PLACEMENTS)
        if self.targets is None:
            self.targets = IA3_PLACEMENTS[self.placement]
        as_str_tuple(self, "targets")


def _inject(model: nn.Module, peft_config: peft.PeftConfig) -> tuple[nn.Module, Owned]:
    existing = classify_existing(model)
    with warnings.catch_warnings():
        # peft warns each time it flips fan_in_fan_out between GPT-2's Conv1D and nn.Linear; that flip is what we want.
        warnings.simplefilter("ignore", UserWarning)
        if is_retro(model) and isinstance(peft_config, peft.VeraConfig):
            # VeRA's shared projections live on its tuner, which inject_adapter_in_model refuses to build; the
            # tuner injects in place and each layer keeps a reference to the shared projections.
            out = peft.tuners.VeraModel(model, peft_config, "default").model
        elif is_retro(model):
            out = peft.inject_adapter_in_model(peft_config, model)
        else:
            peft_config.task_type = peft.TaskType.CAUSAL_LM
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
                                  fan_in_fan_out=_fan_in_fan_out(model, names),
                                  use_dora=config.method == "dora", use_rslora=config.method == "rslora")
    return _inject(model, peft_config)


def apply_vera(model: nn.Module, config: VeRAConfig) -> tuple[nn.Module, Owned]:
    names = resolve_targets(model, config.targets, config.layers)
    peft_config = peft.VeraConfig(r=config.r, target_modules=names, vera_dropout=config.dropout,
                                  d_initial=config.d_initial, fan_in_fan_out=_fan_in_fan_out(model, names))
    return _inject(model, peft_config)


def apply_ia3(model: nn.Module, config: IA3Config) -> tuple[nn.Module, Owned]:
    names = resolve_targets(model, config.targets, config.layers)
    mlp_out = set(resolve_targets(model, ("mlp_out",), config.layers))
    peft_config = peft.IA3Config(target_modules=names, feedforward_modules=[n for n in names if n in mlp_out],
                                 fan_in_fan_out=_fan_in_fan_out(model, names))
    return _inject(model, peft_config)

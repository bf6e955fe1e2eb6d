"""BitFit (Ben Zaken et al. 2022): train only the bias terms of the selected layers, which HF peft does not provide.

Takes a causal LM or RETRO model; gives it back unchanged with the biases of its selected decoder layers owned
(linear biases as kind 'bias', the biases of LayerNorms as kind 'norm'). A model without biases (LLaMA, SmolLM2) is
refused: BitFit would train nothing there.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .core import MethodConfig, Owned, classify_existing
from .targets import selected_blocks


@dataclass
class BitFitConfig(MethodConfig):
    method = "bitfit"


def bias_parameters(model: nn.Module, layers) -> list[nn.Parameter]:
    """The biases of the selected decoder layers; on a model built on the meta device too (a check before loading).
    ValueError when there are none: BitFit would train nothing."""
    biases = [p for _, block in selected_blocks(model, layers)
              for name, p in block.layer.named_parameters() if name.rsplit(".", 1)[-1] == "bias"]
    if not biases:
        raise ValueError(f"bitfit: the selected layers of {type(model).__name__} have no bias parameters (e.g. LLaMA "
                         "and SmolLM2 are built without biases), so BitFit would train nothing; use ia3 or lora")
    return biases


def apply_bitfit(model: nn.Module, config: BitFitConfig) -> tuple[nn.Module, Owned]:
    kinds = classify_existing(model)
    return model, [(p, kinds[id(p)]) for p in bias_parameters(model, config.layers)]

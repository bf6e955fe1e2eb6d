"""Bottleneck adapters in the Houlsby placement, which HF peft does not provide.

Takes a causal LM or RETRO model; gives the same module with an adapter h + up(act(down(h))) after the attention
block and after the MLP block of each selected layer (forward hooks, so no model code is forked). The
up-projection starts at zero, so the adapted model starts equal to the base. LoRETTA_adp reuses this placement
with tensor-train projections (see `loretta.py`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .core import MethodConfig, Owned, as_str_tuple, positive
from .targets import BLOCKS, Block, adapter_blocks

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
ADAPTER_ATTR = "peft_adapter"  # child of the attention / MLP block, so it moves with .to() and shows in state_dict


@dataclass
class AdapterConfig(MethodConfig):
    """Houlsby bottleneck adapters; `blocks` may add RETRO's neighbour encoder layers to the decoder layers.

    Houlsby et al. (2019) also train the layer norms of the adapted layers, hence `train_norms=True` by default.
    """

    method = "adapter"
    train_norms: bool = True  # Houlsby et al. train the adapted layers' norms
    bottleneck: int = 64  # adapter width between the down and up projections
    activation: str = "gelu"  # between the projections: relu | gelu | silu | tanh
    blocks: tuple[str, ...] = ("decoder",)  # decoder and/or retro_encoder layers get adapters

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(self, "bottleneck")
        as_str_tuple(self, "blocks", BLOCKS)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"{type(self).__name__}.activation={self.activation!r}: choose from {sorted(ACTIVATIONS)}")


class BottleneckAdapter(nn.Module):
    def __init__(self, down: nn.Module, up: nn.Module, activation: str):
        super().__init__()
        self.down, self.act, self.up = down, ACTIVATIONS[activation](), up

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        return hidden + self.up(self.act(self.down(hidden)))


def _adapt_output(module: nn.Module, args, output):
    """Forward hook: pass the block's output through the adapter it carries (found on the module, so copies work)."""
    adapter = getattr(module, ADAPTER_ATTR)
    if isinstance(output, tuple):  # attention blocks return (hidden, weights, ...); only hidden states are adapted
        return (adapter(output[0]),) + tuple(output[1:])
    return adapter(output)


def _width(block: Block) -> int:
    # Pre/post-norms act on the residual stream, so their width is the width the adapters must have.
    norms = block.norms()
    if norms and getattr(norms[0], "weight", None) is not None:
        return norms[0].weight.shape[0]
    raise ValueError(f"cannot tell the hidden width of {block.name}: it has no norm with a weight")


def place_adapters(model: nn.Module, config, make: Callable[[int], BottleneckAdapter]) -> Owned:
    """Hook an adapter (built by `make(width)`) after attention and MLP of every chosen block; return what it owns."""
    owned: Owned = []
    for block in adapter_blocks(model, config.blocks, config.layers):
        reference = next(block.layer.parameters())
        for _, module in (block.attention, block.mlp):
            adapter = make(_width(block)).to(reference.device, reference.dtype)
            module.add_module(ADAPTER_ATTR, adapter)
            module.register_forward_hook(_adapt_output)
            owned += [(p, "adapter") for p in adapter.parameters()]
    return owned


def apply_adapter(model: nn.Module, config: AdapterConfig) -> tuple[nn.Module, Owned]:
    def make(width: int) -> BottleneckAdapter:
        down, up = nn.Linear(width, config.bottleneck), nn.Linear(config.bottleneck, width)
        nn.init.zeros_(up.weight)
        nn.init.zeros_(up.bias)
        return BottleneckAdapter(down, up, config.activation)

    return model, place_adapters(model, config, make)

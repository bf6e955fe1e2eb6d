"""LoRETTA (Yang et al. 2024): tensor-train adapters (_adp) and tensor-train low-rank updates (_rep).

Takes a causal LM or RETRO model; gives the same module adapted in place. Unlike the reference code, both variants
are exact no-ops at initialisation (the last TT core of the up/B factor is zero), _rep merges by contracting the
train into a dense update, and _adp really unfreezes (and counts) the layer norms it trains.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .adapters import ACTIVATIONS, BottleneckAdapter, place_adapters
from .core import MethodConfig, Owned, as_str_tuple, positive, probability
from .targets import BLOCKS, linear_dims, replace_module, resolve_targets
from .tensor_train import TTMatrix


def _check_tt(config: MethodConfig) -> None:
    positive(config, "tt_rank", "n_cores")


@dataclass
class LorettaAdpConfig(MethodConfig):
    """Houlsby adapters whose down/up projections are tensor-train matrices; layer norms trained by default."""

    method = "loretta_adp"
    bottleneck: int = 64
    tt_rank: int = 5
    n_cores: int = 3
    activation: str = "gelu"
    blocks: tuple[str, ...] = ("decoder",)
    train_norms: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(self, "bottleneck")
        _check_tt(self)
        as_str_tuple(self, "blocks", BLOCKS)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"LorettaAdpConfig.activation={self.activation!r}: choose from {sorted(ACTIVATIONS)}")


@dataclass
class LorettaRepConfig(MethodConfig):
    """W + (alpha/r) A B with A (in, r) and B (r, out) tensor-train matrices; B's last core starts at zero."""

    method = "loretta_rep"
    r: int = 8
    alpha: float = 16.0
    tt_rank: int = 5
    n_cores: int = 3
    dropout: float = 0.0
    targets: tuple[str, ...] = ("attention",)

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(self, "r")
        _check_tt(self)
        probability(self, "dropout")
        as_str_tuple(self, "targets")


class TTLoRALayer(nn.Module):
    """A linear layer (nn.Linear or GPT-2 Conv1D) plus a tensor-train low-rank update that can be merged into it."""

    def __init__(self, base_layer: nn.Module, config: LorettaRepConfig):
        super().__init__()
        self.base_layer = base_layer
        in_dim, out_dim = linear_dims(base_layer)
        self.tt_a = TTMatrix(in_dim, config.r, config.tt_rank, config.n_cores)
        self.tt_b = TTMatrix(config.r, out_dim, config.tt_rank, config.n_cores, zero_last=True)
        self.dropout = nn.Dropout(config.dropout)
        self.scaling = config.alpha / config.r
        self.merged = False

    def delta(self) -> torch.Tensor:
        """Dense update, (in, out)."""
        return self.scaling * (self.tt_a.dense() @ self.tt_b.dense())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        out = self.base_layer(x)
        if self.merged:
            return out
        return out + self.scaling * self.tt_b(self.tt_a(self.dropout(x))).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self._add(self.delta())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self._add(-self.delta())
            self.merged = False

    def _add(self, delta: torch.Tensor) -> None:
        weight = self.base_layer.weight
        # Conv1D keeps its weight as (in, out); nn.Linear as (out, in).
        weight += (delta if isinstance(self.base_layer, Conv1D) else delta.T).to(weight.dtype)


def apply_loretta_rep(model: nn.Module, config: LorettaRepConfig) -> tuple[nn.Module, Owned]:
    owned: Owned = []
    for name in resolve_targets(model, config.targets, config.layers):
        base_layer = model.get_submodule(name)
        layer = TTLoRALayer(base_layer, config).to(base_layer.weight.device, base_layer.weight.dtype)
        replace_module(model, name, layer)
        owned += [(p, "adapter") for sub in (layer.tt_a, layer.tt_b) for p in sub.parameters()]
    return model, owned


def apply_loretta_adp(model: nn.Module, config: LorettaAdpConfig) -> tuple[nn.Module, Owned]:
    def make(width: int) -> BottleneckAdapter:
        down = TTMatrix(width, config.bottleneck, config.tt_rank, config.n_cores)
        up = TTMatrix(config.bottleneck, width, config.tt_rank, config.n_cores, zero_last=True)
        return BottleneckAdapter(down, up, config.activation)

    return model, place_adapters(model, config, make)

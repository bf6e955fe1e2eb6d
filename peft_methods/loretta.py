"""LoRETTA (Yang et al. 2024): tensor-train adapters (_adp) and tensor-train low-rank updates (_rep).

Takes a causal LM or RETRO model; gives the same module adapted in place. The defaults reproduce the authors'
reference code (github.com/yifanycc/loretta) on the widths they chose shapes for:

- _adp: three adapters per layer around the MLP, not Houlsby's two: one on the input of each MLP input projection
  (LLaMA: gate_proj and up_proj; GPT-2: c_fc; NeoX: dense_h_to_4h) and one on the output of the MLP output
  projection (down_proj / c_proj / dense_4h_to_h). Each is x + up(tanh(down(x))) with TT down/up projections that
  carry biases. On LLaMA-2-7B (width 4096, bottleneck 64, TT rank 5, modes [16,16,16 | 4,4,4]) each TT matrix has
  16*5 + 5*16*5 + 5*16*5 + 5*4*5 + 5*4*5 + 5*4 = 1,100 parameters, an adapter 2*1,100 + 64 + 4,096 = 6,360, and the
  model 32 layers * 3 * 6,360 = 610,560, the reference's count. `placement='houlsby'` keeps the after-attention /
  after-MLP placement of bottleneck adapters.
- _rep: LoRA's A (in, r) and B (r, out) as TT matrices, on q_proj and v_proj as in the reference; with r = 8 and
  TT rank 5 the authors' modes for width 4096 are [16,16,8,4,4]: 16*5 + 5*16*5 + 5*8*5 + 5*4*5 + 5*4 = 800
  parameters per factor, 2 * 2 * 800 * 32 = 102,400 on LLaMA-2-7B.
- Norms: the reference's _adp trains none (its norm-marking loop reads a stale variable) and its _rep marks
  parameters named '*Norm*' (BERT's LayerNorm; none on LLaMA), so both default to `train_norms=False`, which is
  what their LLaMA counts contain; `train_norms=True` trains the norms of the adapted layers.
- Shapes: `shapes='paper'` uses the authors' modes where they chose some for this (inner, model) width pair and
  `auto_modes` (near-equal factors <= `max_mode`) elsewhere, e.g. SmolLM2's 576 -> [12, 8, 6]; `shapes='auto'`
  always factorises automatically.

Unlike the reference code both variants are exact no-ops at initialisation (the last TT core of the up/B factor and
the up bias start at zero), and _rep merges by contracting the train into a dense update.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .adapters import ACTIVATIONS, BottleneckAdapter, place_adapters
from .core import MethodConfig, Owned, as_str_tuple, choice, positive, probability
from .targets import BLOCKS, adapter_blocks, linear_dims, replace_module, resolve_targets
from .tensor_train import TTMatrix, auto_modes

# The authors' hand-chosen tensor modes. _adp, by (bottleneck, model width): (down modes, up modes); the down
# projection (width -> bottleneck) reshapes a tensor over its modes row-major into (width, bottleneck).
PAPER_ADP_MODES: dict[tuple[int, int], tuple[list[int], list[int]]] = {
    (64, 768): ([8, 8, 12, 8, 8], [8, 8, 12, 8, 8]),
    (64, 1024): ([4, 8, 8, 8, 8, 4], [4, 8, 8, 8, 8, 4]),
    (64, 4096): ([16, 16, 16, 4, 4, 4], [4, 4, 4, 16, 16, 16]),
    (64, 5120): ([5, 8, 8, 16, 8, 8], [8, 8, 16, 8, 8, 5]),
    (64, 8192): ([16, 16, 16, 8, 4, 4], [4, 4, 8, 16, 16, 16]),
}
# _rep, by (LoRA rank r, model width): the modes of both A (width -> r) and B (r -> width) for that width.
PAPER_REP_MODES: dict[tuple[int, int], list[int]] = {
    (8, 768): [8, 8, 12, 8], (8, 1024): [4, 8, 8, 8, 4], (8, 4096): [16, 16, 8, 4, 4],
    (8, 5120): [8, 8, 10, 8, 8], (8, 8192): [4, 16, 16, 16, 4],
    (16, 768): [8, 16, 12, 8], (16, 1024): [4, 8, 16, 8, 4], (16, 4096): [16, 16, 16, 4, 4],
    (16, 5120): [8, 16, 10, 8, 8], (16, 8192): [4, 16, 16, 16, 8],
}
SHAPES = ("paper", "auto")
PLACEMENTS = ("paper", "houlsby")


def _check_tt(config) -> None:
    positive(config, "tt_rank", "max_mode")
    choice(config, "shapes", SHAPES)


@dataclass
class LorettaAdpConfig(MethodConfig):
    """Tensor-train adapters; defaults as in the authors' code (placement around the MLP, biases, tanh, no norms)."""

    method = "loretta_adp"
    bottleneck: int = 64  # adapter width between the down and up projections
    tt_rank: int = 5  # rank of the tensor-train cores
    shapes: str = "paper"  # paper: the authors' tensor modes where they chose some, else auto | auto
    max_mode: int = 16  # largest tensor mode when shapes are factorised automatically
    placement: str = "paper"  # paper: around the MLP, three per layer | houlsby: after attention and MLP
    bias: bool = True  # TT projections carry biases, as in the authors' code
    activation: str = "tanh"  # between the projections, as in the authors' code
    blocks: tuple[str, ...] = ("decoder",)  # decoder and/or retro_encoder layers get adapters

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(self, "bottleneck")
        _check_tt(self)
        choice(self, "placement", PLACEMENTS)
        as_str_tuple(self, "blocks", BLOCKS)
        choice(self, "activation", ACTIVATIONS)


@dataclass
class LorettaRepConfig(MethodConfig):
    """W + (alpha/r) A B with A (in, r) and B (r, out) tensor-train matrices; B's last core starts at zero."""

    method = "loretta_rep"
    r: int = 8  # rank of the update (the TT matrices A and B)
    alpha: float = 16.0  # the update is scaled by alpha / r
    tt_rank: int = 5  # rank of the tensor-train cores
    shapes: str = "paper"  # paper: the authors' tensor modes where they chose some, else auto | auto
    max_mode: int = 16  # largest tensor mode when shapes are factorised automatically
    dropout: float = 0.0  # dropout on the adapted layers' input
    targets: tuple[str, ...] = ("attention_qv",)  # q/v projections, as in the authors' code

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(self, "r")
        _check_tt(self)
        probability(self, "dropout")
        as_str_tuple(self, "targets")


def rep_modes(in_dim: int, out_dim: int, r: int, shapes: str, max_mode: int) -> tuple[list[int], list[int]]:
    """Modes of A (in_dim -> r) and B (r -> out_dim)."""
    def modes(width: int, first: bool) -> list[int]:
        if shapes == "paper" and (r, width) in PAPER_REP_MODES:
            return list(PAPER_REP_MODES[(r, width)])
        auto = auto_modes(width, max_mode), auto_modes(r, max_mode)
        return auto[0] + auto[1] if first else auto[1] + auto[0]

    return modes(in_dim, True), modes(out_dim, False)


def adp_modes(width: int, bottleneck: int, shapes: str, max_mode: int) -> tuple[list[int], list[int]]:
    """Modes of the down (width -> bottleneck) and up (bottleneck -> width) projections."""
    if shapes == "paper" and (bottleneck, width) in PAPER_ADP_MODES:
        down, up = PAPER_ADP_MODES[(bottleneck, width)]
        return list(down), list(up)
    w, b = auto_modes(width, max_mode), auto_modes(bottleneck, max_mode)
    return w + b, b + w


class TTLoRALayer(nn.Module):
    """A linear layer (nn.Linear or GPT-2 Conv1D) plus a tensor-train low-rank update that can be merged into it."""

    def __init__(self, base_layer: nn.Module, config: LorettaRepConfig):
        super().__init__()
        self.base_layer = base_layer
        in_dim, out_dim = linear_dims(base_layer)
        modes_a, modes_b = rep_modes(in_dim, out_dim, config.r, config.shapes, config.max_mode)
        self.tt_a = TTMatrix(in_dim, config.r, modes_a, config.tt_rank)
        self.tt_b = TTMatrix(config.r, out_dim, modes_b, config.tt_rank, zero_last=True)
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
        if not torch.is_grad_enabled() and (not self.training or self.dropout.p == 0):
            # inference: the two dense factors, cached while the cores are unchanged, in one fused multiply-add
            a, b = self._inference_factors()
            flat = x.reshape(-1, a.shape[0])
            return torch.addmm(out.reshape(-1, b.shape[1]), flat @ a.to(x.dtype), b.to(out.dtype)).view(out.shape)
        return out + self.scaling * self.tt_b(self.tt_a(self.dropout(x))).to(out.dtype)

    def _inference_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (in, r), scaling * B (r, out)), rebuilt when a core changed (in place, moved or replaced)."""
        key = tuple((c._version, c.data_ptr(), c.dtype) for m in (self.tt_a, self.tt_b) for c in m.cores)
        cache = self.__dict__.get("_factors")
        if cache is None or cache[0] != key:
            cache = (key, self.tt_a.dense(), self.scaling * self.tt_b.dense())
            self.__dict__["_factors"] = cache
        return cache[1], cache[2]

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_factors", None)
        return state

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


class TTLinear(nn.Module):
    """A TT matrix plus an optional bias: (..., in) -> (..., out)."""

    def __init__(self, in_dim: int, out_dim: int, modes: list[int], rank: int, bias: bool, zero: bool = False):
        super().__init__()
        self.tt = TTMatrix(in_dim, out_dim, modes, rank, zero_last=zero)
        self.bias = nn.Parameter(torch.zeros(out_dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.tt(x)
        return out if self.bias is None else out + self.bias.to(out.dtype)


def apply_loretta_rep(model: nn.Module, config: LorettaRepConfig) -> tuple[nn.Module, Owned]:
    owned: Owned = []
    for name in resolve_targets(model, config.targets, config.layers):
        base_layer = model.get_submodule(name)
        layer = TTLoRALayer(base_layer, config).to(base_layer.weight.device, base_layer.weight.dtype)
        replace_module(model, name, layer)
        owned += [(p, "adapter") for sub in (layer.tt_a, layer.tt_b) for p in sub.parameters()]
    return model, owned


ADAPTER_ATTR = "loretta_adapter"  # child of the adapted linear layer, so it moves with .to() and deep copies


def _adapt_input(module: nn.Module, args):
    """Forward pre-hook: the layer reads adapter(x) instead of x (found on the module, so copies work)."""
    return (getattr(module, ADAPTER_ATTR)(args[0]),) + tuple(args[1:])


def _adapt_linear_output(module: nn.Module, args, output):
    return getattr(module, ADAPTER_ATTR)(output)


def apply_loretta_adp(model: nn.Module, config: LorettaAdpConfig) -> tuple[nn.Module, Owned]:
    def make(width: int) -> BottleneckAdapter:
        down_modes, up_modes = adp_modes(width, config.bottleneck, config.shapes, config.max_mode)
        down = TTLinear(width, config.bottleneck, down_modes, config.tt_rank, config.bias)
        up = TTLinear(config.bottleneck, width, up_modes, config.tt_rank, config.bias, zero=True)
        return BottleneckAdapter(down, up, config.activation)

    if config.placement == "houlsby":
        return model, place_adapters(model, config, make)
    owned: Owned = []
    for block in adapter_blocks(model, config.blocks, config.layers):
        names = block.linears("mlp")
        for name in names:
            layer = model.get_submodule(name)
            is_output = name == names[-1]
            width = linear_dims(layer)[1 if is_output else 0]
            adapter = make(width).to(layer.weight.device, layer.weight.dtype)
            layer.add_module(ADAPTER_ATTR, adapter)
            hook: Callable = _adapt_linear_output if is_output else _adapt_input
            if is_output:
                layer.register_forward_hook(hook)
            else:
                layer.register_forward_pre_hook(hook)
            owned += [(p, "adapter") for p in adapter.parameters()]
    return model, owned

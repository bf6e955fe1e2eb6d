"""Where methods attach: named target presets and layer selection, resolved per model family.

Takes any causal LM (Llama, GPT-2, GPT-NeoX, ...) or a RETRO model (recognised by duck typing: a `chunk_size`
attribute and the wrapped HF model at `.base`, added modules at `.cca` and `.encoder`) and gives full module
names (from the model root) of the linear layers to adapt, or the attention/MLP blocks adapters hook onto.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D

from .core import LayerSpec, is_norm, select_layers

# Presets a config may name; anything else is a module leaf name matched inside the selected decoder layers.
# attention_qv / attention_kv: query and value (key and value) projections; where one fused layer computes q, k and v
# (GPT-2's c_attn, NeoX's query_key_value) that layer is the target, so the method also touches the third.
PRESETS = ("attention", "attention_qv", "attention_kv", "mlp", "mlp_out", "cca", "retro_encoder")
BLOCKS = ("decoder", "retro_encoder")

_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")
# Leaf names of separate query/key/value projections, and of fused ones (GPT-2, NeoX) that hold all three.
_PROJECTION_NAMES = {"q": ("q_proj", "query", "q"), "k": ("k_proj", "key", "k"), "v": ("v_proj", "value", "v")}
_FUSED_QKV = ("c_attn", "query_key_value", "qkv_proj", "Wqkv", "qkv")


def is_retro(model: nn.Module) -> bool:
    return getattr(model, "chunk_size", None) is not None and isinstance(getattr(model, "base", None), nn.Module)


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features); GPT-2's Conv1D stores its weight transposed, as (in, out)."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def decoder_of(model: nn.Module) -> tuple[str, nn.Module]:
    """(name prefix, module) of the Hugging Face decoder inside `model` (the model itself unless RETRO)."""
    return ("base.", model.base) if is_retro(model) else ("", model)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Full name and module of the decoder's layer list: the longest list of identical blocks in the HF model."""
    prefix, hf = decoder_of(model)
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in hf.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            if best is None or len(module) > len(best[1]):
                best = (prefix + name, module)
    if best is None:
        raise ValueError(f"found no decoder layer list (nn.ModuleList of blocks) in {type(hf).__name__}")
    return best


def _child(layer: nn.Module, names: tuple[str, ...], what: str, where: str) -> tuple[str, nn.Module]:
    for name in names:
        if isinstance(getattr(layer, name, None), nn.Module):
            return name, getattr(layer, name)
    children = [n for n, _ in layer.named_children()]
    raise ValueError(f"{where} ({type(layer).__name__}) has no {what} block named one of {names}; children: {children}")


@dataclass
class Block:
    """One decoder (or RETRO encoder) layer: where its attention and MLP live and which norms it has."""

    name: str
    layer: nn.Module
    attention: tuple[str, nn.Module]
    mlp: tuple[str, nn.Module]

    def linears(self, part: str) -> list[str]:
        child_name, child = self.attention if part == "attention" else self.mlp
        return [f"{self.name}.{child_name}.{n}" for n, m in child.named_modules() if is_linear_like(m)]

    def projections(self, which: str) -> list[str]:
        """Attention linears computing the given ones of q/k/v ('qv', 'kv'); a fused q/k/v layer counts for all."""
        leaves = {name for part in which for name in _PROJECTION_NAMES[part]} | set(_FUSED_QKV)
        return [n for n in self.linears("attention") if n.rsplit(".", 1)[1] in leaves]

    def norms(self) -> list[nn.Module]:
        return [m for _, m in self.layer.named_children() if is_norm(m)]


def _block(name: str, layer: nn.Module) -> Block:
    attention = _child(layer, _ATTENTION_NAMES, "attention", name)
    return Block(name, layer, attention, _child(layer, _MLP_NAMES, "MLP", name))


def selected_blocks(model: nn.Module, layers: LayerSpec) -> list[tuple[int, Block]]:
    list_name, module_list = decoder_layers(model)
    return [(i, _block(f"{list_name}.{i}", module_list[i])) for i in select_layers(layers, len(module_list))]


def check_retro_targets(names, retro: bool, encoder: bool) -> None:
    """Refuse targets or blocks that only RETRO has ('cca', 'retro_encoder') on another model, and 'retro_encoder'
    on a RETRO model without its own neighbour encoder (`encoder` False: attention='joint')."""
    for name in ("cca", "retro_encoder"):
        if name in names and not retro:
            raise ValueError(f"target {name!r} needs a RETRO model (one with .chunk_size, .base and .cca); drop it "
                             f"from the targets of this model")
    if "retro_encoder" in names and not encoder:
        raise ValueError("target 'retro_encoder': this RETRO model has no trained neighbour encoder (with "
                         "attention='joint' the frozen decoder encodes the neighbours, so the decoder's own targets "
                         "adapt both); drop 'retro_encoder' from the targets")


def retro_encoder_blocks(model: nn.Module) -> list[Block]:
    check_retro_targets(("retro_encoder",), is_retro(model), is_retro(model) and hasattr(model.encoder, "layers"))
    return [_block(f"encoder.layers.{i}", layer) for i, layer in enumerate(model.encoder.layers)]


def resolve_targets(model: nn.Module, targets: tuple[str, ...], layers: LayerSpec) -> list[str]:
    """Full names of the linear layers named by `targets` in the selected layers, in model order, no repeats."""
    blocks = selected_blocks(model, layers)
    modules = dict(model.named_modules())
    names: list[str] = []
    for target in targets:
        if target in ("attention", "mlp"):
            found = [n for _, b in blocks for n in b.linears(target)]
        elif target in ("attention_qv", "attention_kv"):
            found = [n for _, b in blocks for n in b.projections(target.rsplit("_", 1)[1])]
        elif target == "mlp_out":
            found = [b.linears("mlp")[-1] for _, b in blocks]
        elif target == "cca":
            check_retro_targets(("cca",), is_retro(model), True)
            chosen = {str(i) for i, _ in blocks}
            found = [f"cca.{key}.{n}" for key, sub in model.cca.items() if key in chosen
                     for n, m in sub.named_modules() if is_linear_like(m)]
        elif target == "retro_encoder":
            found = [f"{b.name}.{n}" for b in retro_encoder_blocks(model)
                     for n, m in b.layer.named_modules() if is_linear_like(m)]
        else:
            found = [n for _, b in blocks for n, m in modules.items()
                     if n.startswith(b.name + ".") and n.endswith("." + target) and is_linear_like(m)]
        if not found:
            raise ValueError(f"target {target!r} matched no linear layer in the selected layers; "
                             f"use a preset {PRESETS} or a module leaf name such as 'q_proj'")
        names += [n for n in found if n not in names]
    order = {n: i for i, n in enumerate(modules)}
    return sorted(names, key=order.__getitem__)


def adapter_blocks(model: nn.Module, blocks: tuple[str, ...], layers: LayerSpec) -> list[Block]:
    """Blocks that get bottleneck adapters: selected decoder layers and, on RETRO, the neighbour encoder layers."""
    out: list[Block] = []
    if "decoder" in blocks:
        out += [b for _, b in selected_blocks(model, layers)]
    if "retro_encoder" in blocks:
        out += retro_encoder_blocks(model)
    return out


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, new)


def norm_parameters(model: nn.Module, layers: LayerSpec, blocks: tuple[str, ...] = ("decoder",)) -> list[nn.Parameter]:
    """Parameters of the norms inside the selected decoder layers (and RETRO's encoder layers if `blocks` names it)."""
    return [p for block in adapter_blocks(model, blocks, layers) for norm in block.norms() for p in norm.parameters()]

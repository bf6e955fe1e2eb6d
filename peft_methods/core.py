"""What every PEFT method shares: the config base class, parameter kinds, the record of owned parameters.

A method's `apply(model, config)` gives back the adapted module and the parameters it owns, each tagged with a
kind. `registry.apply_peft` turns that into a `PeftRecord` kept on the returned module; trainability, saving and
parameter counts are all read from that record, never from parameter-name patterns.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterable, Iterator, Sequence, Union

import torch
from torch import nn

# Kinds a trainable parameter can have; reports break counts down by these.
KINDS = ("adapter", "bias", "norm", "prompt", "encoder", "retro", "base")

LayerSpec = Union[str, Sequence[int]]
Owned = list[tuple[nn.Parameter, str]]
ApplyFn = Callable[[nn.Module, "MethodConfig"], tuple[nn.Module, Owned]]

RECORD_ATTR = "peft_record"


def _check_layer_spec(layers: LayerSpec, where: str) -> LayerSpec:
    if isinstance(layers, str):
        if layers == "all":
            return layers
        head, _, count = layers.partition(":")
        if head in ("top", "bottom") and count.isdigit() and int(count) > 0:
            return layers
        raise ValueError(f"{where}.layers={layers!r}: use 'all', 'top:N', 'bottom:N' (N >= 1) "
                         "or a list of layer indices")
    try:
        indices = tuple(int(i) for i in layers)
    except (TypeError, ValueError):
        raise ValueError(f"{where}.layers={layers!r}: a list of layer indices must hold integers") from None
    if not indices or len(set(indices)) != len(indices) or min(indices) < 0:
        raise ValueError(f"{where}.layers={layers!r}: give distinct, non-negative layer indices (at least one)")
    return indices


def select_layers(layers: LayerSpec, n_layers: int) -> list[int]:
    """Indices of the decoder layers a method adapts; 'top' means nearest the output, as in Pu et al."""
    if layers == "all":
        return list(range(n_layers))
    if isinstance(layers, str):
        head, _, count = layers.partition(":")
        n = min(int(count), n_layers)
        return list(range(n_layers - n, n_layers)) if head == "top" else list(range(n))
    bad = [i for i in layers if i >= n_layers]
    if bad:
        raise ValueError(f"layers {bad} do not exist: the model has {n_layers} decoder layers (0..{n_layers - 1})")
    return sorted(layers)


@dataclass
class MethodConfig:
    """Fields every method has. `layers` picks decoder layers; `train_retro` also trains RETRO's added modules;
    `train_norms` also trains the norms of the selected layers (counted as kind 'norm'). Each method's default for
    `train_norms` is its paper's: only Houlsby adapters train them."""

    method: ClassVar[str] = ""
    layers: LayerSpec = "all"  # decoder layers: all, "top:4", "bottom:4" or a list of indices
    train_retro: bool = False
    train_norms: bool = False

    def __post_init__(self) -> None:
        self.layers = _check_layer_spec(self.layers, type(self).__name__)

    def to_dict(self) -> dict:
        out = {"method": self.method}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def positive(config: MethodConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{type(config).__name__}.{name}={value!r}: must be a positive integer")


def probability(config: MethodConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not 0.0 <= float(value) < 1.0:
            raise ValueError(f"{type(config).__name__}.{name}={value!r}: must lie in [0, 1)")


def choice(config: MethodConfig, name: str, allowed: Iterable[str]) -> None:
    value = getattr(config, name)
    if value not in allowed:
        raise ValueError(f"{type(config).__name__}.{name}={value!r}: choose from {sorted(allowed)}")


def as_str_tuple(config: MethodConfig, name: str, allowed: Iterable[str] | None = None) -> None:
    value = getattr(config, name)
    value = (value,) if isinstance(value, str) else tuple(value)
    if not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{type(config).__name__}.{name}={value!r}: give a non-empty list of names")
    if allowed is not None:
        unknown = [v for v in value if v not in allowed]
        if unknown:
            raise ValueError(f"{type(config).__name__}.{name}: unknown {unknown}; choose from {sorted(allowed)}")
    setattr(config, name, value)


@dataclass
class PeftRecord:
    """What a method owns on the module it returned: parameter name -> kind, plus what is needed to reload it."""

    config: MethodConfig
    owned: dict[str, str]
    fingerprint: str
    hf_format: bool = False
    merged: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.config.method


def get_record(model: nn.Module) -> PeftRecord:
    record = getattr(model, RECORD_ATTR, None)
    if not isinstance(record, PeftRecord):
        raise ValueError(f"{type(model).__name__} carries no PEFT record: build it with peft_methods.apply_peft first")
    return record


def owned_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, str]]:
    """(name, parameter, kind) for every parameter the applied method owns."""
    owned = get_record(model).owned
    for name, param in model.named_parameters():
        if name in owned:
            yield name, param, owned[name]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimiser should see."""
    return [p for _, p, _ in owned_parameters(model)]


def count_trainable(model: nn.Module) -> dict[str, int]:
    """Exact trainable-parameter counts by kind, plus 'trainable' (their sum) and 'total' (all parameters)."""
    counts = {kind: 0 for kind in KINDS}
    for _, param, kind in owned_parameters(model):
        counts[kind] += param.numel()
    counts["trainable"] = sum(counts[k] for k in KINDS)
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def is_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or name.endswith(("RMSNorm", "LayerNorm"))


def classify_existing(model: nn.Module) -> dict[int, str]:
    """Kind of each parameter already in `model` if it were trained: norm, bias or base weight."""
    kinds: dict[int, str] = {}
    for module in model.modules():
        for attr, param in module.named_parameters(recurse=False):
            if id(param) in kinds:
                continue
            kinds[id(param)] = "norm" if is_norm(module) else "bias" if attr == "bias" else "base"
    return kinds


def fingerprint(named: Sequence[tuple[str, torch.Tensor]], skip_values: set[int]) -> str:
    """Hash of a base model's parameters; values of parameters the method will overwrite are left out.

    Values are hashed at bfloat16 precision, so the same weights loaded in float32 or bfloat16 match. A model on
    the meta device (shapes, no weights: for counting parameters) is hashed by names and shapes alone.
    """
    digest = hashlib.sha256()
    for name, param in sorted(named, key=lambda item: item[0]):
        digest.update(f"{name}:{tuple(param.shape)}".encode())
        if id(param) not in skip_values and not param.is_meta:
            values = param.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16)
            digest.update(values.numpy().tobytes())
    return digest.hexdigest()[:32]

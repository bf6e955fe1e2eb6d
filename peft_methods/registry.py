"""The method registry and `apply_peft`, the one entry point that adapts a model.

Takes a model (HF causal LM or RETRO) and a method config (or a dict naming the method); gives the adapted model
carrying a `PeftRecord`: exactly the parameters the method owns require grad, everything else is frozen.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, Union

from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .core import RECORD_ATTR, ApplyFn, MethodConfig, PeftRecord, fingerprint, get_record
from .loretta import TTLoRALayer
from .targets import check_retro_targets, is_retro, norm_parameters


@dataclass(frozen=True)
class Method:
    config_cls: type[MethodConfig]
    apply: ApplyFn
    mergeable: bool = False


METHODS: dict[str, Method] = {}


def register_method(config_cls: type[MethodConfig], apply: ApplyFn, mergeable: bool = False) -> None:
    """Make a method available by its config's `method` name (the one step adding a method takes)."""
    name = config_cls.method
    if not name or name in METHODS:
        raise ValueError(f"cannot register {config_cls.__name__}: method name {name!r} is empty or already taken")
    METHODS[name] = Method(config_cls, apply, mergeable)


def known_methods() -> list[str]:
    return sorted(METHODS)


def peft_config_from_dict(data: Mapping, where: str = "peft config") -> MethodConfig:
    """Build a method config from {'method': name, **fields}, e.g. a YAML section; `where` names it in errors."""
    fields = dict(data)
    name = fields.pop("method", None)
    if name not in METHODS:
        raise ValueError(f"{where}: method={name!r} is not a known PEFT method; known methods: {known_methods()}")
    config_cls = METHODS[name].config_cls
    allowed = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise ValueError(f"{where}: field(s) {unknown} do not exist for method {name!r}; "
                         f"valid fields: {sorted(allowed)}")
    try:
        return config_cls(**fields)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def check_fits(config: MethodConfig, retro: bool, encoder: bool = True, base: nn.Module | None = None) -> None:
    """The refusals `apply_peft` would make for this method on a model of this kind, decided without the model:
    `retro` (a RETRO model), `encoder` (RETRO with its own neighbour encoder, not attention='joint'), `base` (the
    decoder, e.g. built on the meta device, for methods that depend on its layers). ValueError with the reason."""
    from .bitfit import bias_parameters
    from .ptuning import PREFIX_ON_RETRO

    if config.method == "prefix_tuning" and retro:
        raise ValueError(PREFIX_ON_RETRO)
    if config.train_retro and not retro:
        raise ValueError(f"{type(config).__name__}.train_retro=True needs a RETRO model; this is the GPT baseline")
    check_retro_targets(tuple(getattr(config, "targets", None) or ()) + tuple(getattr(config, "blocks", None) or ()),
                        retro, encoder)
    if config.method == "bitfit" and base is not None:
        bias_parameters(base, config.layers)


def apply_peft(model: nn.Module, config: Union[MethodConfig, Mapping]) -> nn.Module:
    """Adapt `model` with the method `config` names; the result carries the record of what the method owns.

    On a plain HF model LoRA/IA3 give a `peft.PeftModel` and P-tuning a `PTuningModel` wrapper; the other methods
    adapt the model in place and give it back.
    """
    if isinstance(config, Mapping):
        config = peft_config_from_dict(config)
    if config.method not in METHODS:
        raise ValueError(f"method {config.method!r} is not registered; known methods: {known_methods()}")
    if isinstance(getattr(model, RECORD_ATTR, None), PeftRecord):
        raise ValueError("this model already carries a PEFT method; apply methods to a fresh base model")
    retro = is_retro(model)
    if config.train_retro and not retro:
        raise ValueError(f"{type(config).__name__}.train_retro=True needs a RETRO model; "
                         f"this is {type(model).__name__}")
    before = list(model.named_parameters())
    retro_ids = {id(p) for p in model.retro_parameters()} if retro and hasattr(model, "retro_parameters") else set()
    for param in model.parameters():
        param.requires_grad_(False)

    adapted, owned = METHODS[config.method].apply(model, config)
    if config.train_norms:
        owned += [(p, "norm") for p in norm_parameters(model, config.layers, getattr(config, "blocks", ("decoder",)))]
    if config.train_retro:
        owned += [(p, "retro") for p in model.retro_parameters()]

    kinds: dict[int, str] = {}
    for param, kind in owned:
        # RETRO's added modules count as 'retro' whichever method trains them (weights, biases and norms alike).
        kinds.setdefault(id(param), "retro" if id(param) in retro_ids else kind)
    names: dict[str, str] = {}
    for name, param in adapted.named_parameters():
        param.requires_grad_(id(param) in kinds)
        if id(param) in kinds:
            names[name] = kinds[id(param)]
    record = PeftRecord(config, names, fingerprint(before, skip_values=set(kinds)),
                        hf_format=isinstance(adapted, PeftModel))
    setattr(adapted, RECORD_ATTR, record)
    return adapted


def _mergeable_layers(model: nn.Module) -> list[nn.Module]:
    record = get_record(model)
    if not METHODS[record.method].mergeable:
        mergeable = [n for n, m in METHODS.items() if m.mergeable]
        raise ValueError(f"method {record.method!r} has no merge; methods that merge: {mergeable}")
    return [m for m in model.modules() if isinstance(m, (BaseTunerLayer, TTLoRALayer))]


def merge_peft(model: nn.Module) -> nn.Module:
    """Fold the learned update into the base weights in place (same outputs, no extra inference cost)."""
    for layer in _mergeable_layers(model):
        layer.merge()
    get_record(model).merged = True
    return model


def unmerge_peft(model: nn.Module) -> nn.Module:
    for layer in _mergeable_layers(model):
        layer.unmerge()
    get_record(model).merged = False
    return model
